"""scadfast: fast CLIP-aided text-to-image GANs (GALIP, SCAD, SCAD-MI, SCAD-DD, MS-CLIP-GAN)."""

__version__ = "0.1.0"
