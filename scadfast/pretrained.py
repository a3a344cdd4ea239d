"""Load a trained model pair (generator, discriminator, frozen CLIP) back from a training checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checkpoint as ckpt_lib
from . import variants


@dataclass
class Loaded:
    pair: object  # the GANPair (see scadfast.variants)
    clip: object  # FrozenCLIP
    state: dict  # the raw checkpoint (step, cfg, ...)
    device: torch.device

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Sentence embeddings (B, d_txt) of prompts under the training CLIP."""
        tokens = self.clip.tokenize(list(prompts)).to(self.device)
        return self.clip.encode_text(tokens).float()


def load(path: str, device: str | torch.device | None = None, clip_pretrained: str | None = None) -> Loaded:
    """Rebuild the pair recorded in checkpoint ``path`` (a file or a run directory) on ``device``.

    The CLIP is rebuilt from the name and weights recorded at training time; pass ``clip_pretrained``
    if the weights file has moved. ``pair.G`` holds the EMA generator when the run kept one.
    """
    from .models.clip import FrozenCLIP

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = ckpt_lib.load(path, map_location="cpu")
    for key in ("cfg", "G", "D", "clip", "image_size"):
        if key not in state:
            raise ckpt_lib.CheckpointError(f"{path}: checkpoint has no {key!r} entry; not a training checkpoint")
    fields = variants.VariantConfig.__dataclass_fields__
    cfg = variants.VariantConfig(**{k: v for k, v in state["cfg"].items() if k in fields})
    clip_info = state["clip"]
    clip = FrozenCLIP(clip_info["name"], pretrained=clip_pretrained or clip_info.get("pretrained"), device=device)
    pair = variants.build(cfg, clip, img_size=state["image_size"]).to(device)
    # The EMA generator (--ema-kimg) is the one to sample from, as in StyleGAN; G itself otherwise.
    pair.G.load_state_dict(state.get("G_ema") or state["G"])
    pair.D.load_state_dict(state["D"])
    pair.G.eval()
    pair.D.eval()
    return Loaded(pair, clip, state, device)
