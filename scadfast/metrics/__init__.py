"""Evaluation metrics (docs/design.md §9): FID, KID, precision/recall, CLIP score, PPD/mPPD and the shapes
ground-truth metrics; :mod:`.reference` is the real set (and its captions) they compare with.

All metrics stream images batch by batch (nothing holds all images) and run batched on the GPU when
there is one. ``python -m scadfast.evaluate`` is the command-line front end.

Submodules are imported lazily (FID needs torch-fidelity, which is an optional dependency).
"""

from .features import RunningMoments, iter_generated, iter_image_files, list_image_files  # noqa: F401
from .fid import frechet_distance  # noqa: F401

__all__ = ["RunningMoments", "iter_generated", "iter_image_files", "list_image_files", "frechet_distance",
           "fid", "kid", "reference", "clip_score", "ppd", "shapes_truth", "features"]
