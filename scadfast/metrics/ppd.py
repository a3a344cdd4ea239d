"""Per-prompt diversity: PPD and mPPD [paper] (docs/design.md §9).

For a prompt p and N images x_1..x_N generated from independent noise z_1..z_N:

    PPD(p) = 2 / (N (N − 1)) · Σ_{i<j} d(φ(x_i), φ(x_j))

the mean pairwise distance of their image features φ; mPPD is the mean of PPD over prompts. A
conditionally mode-collapsed generator (same image for every z) has PPD = 0.

Options, all printed with the result: the backbone φ, the distance d (``cosine``: 1 − cos, in
[0, 2]; ``l2``: Euclidean norm of the difference) and N.

Backbones
---------
* **DINOv2** (the paper's choice) from local files only: ``--dinov2 PATH`` where PATH is a torch
  hub repository directory (a clone of ``facebookresearch/dinov2`` or
  ``$TORCH_HOME/hub/facebookresearch_dinov2_main``; the model ``--dinov2-model``, default
  ``dinov2_vits14``, is built with ``torch.hub.load(PATH, name, source="local")``, whose pretrained
  weights torch.hub reads from its checkpoints cache), or a file holding a TorchScript module or a
  pickled ``nn.Module``. Features: the model's output (the CLS token for DINOv2) on 224 px inputs
  normalised with the ImageNet mean/std.
* **Fallback** when no DINOv2 is given: the pooled, projected image embedding of the training CLIP
  (or ``--eval-clip``). It is labelled as a fallback in every report: CLIP features of the
  generator's own CLIP are *not* DINOv2 features and their PPD is not comparable to the paper's.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .features import ProgressLine, default_device

__all__ = ["DISTANCES", "mean_pairwise_distance", "DINOv2Features", "CLIPImageFeatures", "PPDScorer"]

DISTANCES = ("cosine", "l2")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def mean_pairwise_distance(feats: torch.Tensor, distance: str = "cosine") -> float:
    """Mean of d(f_i, f_j) over the N(N−1)/2 unordered pairs i < j of (N, D) features (N ≥ 2)."""
    if distance not in DISTANCES:
        raise ValueError(f"mean_pairwise_distance: distance must be one of {DISTANCES}, got {distance!r}")
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"mean_pairwise_distance: need (N >= 2, D) features, got {tuple(feats.shape)}")
    f = feats.double()
    if distance == "cosine":
        f = F.normalize(f, dim=-1)
        d = 1.0 - f @ f.t()
    else:
        d = torch.cdist(f, f)
    n = f.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=f.device)
    return float(d[iu[0], iu[1]].mean())


class DINOv2Features:
    """DINOv2 image features from local files (module doc). ``__call__(x in [-1, 1]) → (B, D)``."""

    def __init__(self, path: str, model_name: str = "dinov2_vits14", device=None, image_size: int = 224):
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"--dinov2 {path!r}: no such file or directory")
        if image_size % 14:
            raise ValueError(f"DINOv2 image_size must be a multiple of its patch size 14, got {image_size}")
        self.device = torch.device(device) if device is not None else default_device()
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "hubconf.py")):
                raise FileNotFoundError(f"--dinov2 {path}: a directory must be a torch hub repo (no hubconf.py)")
            model = torch.hub.load(path, model_name, source="local")
            what = f"{model_name} from hub dir {path}"
        else:
            try:
                model = torch.jit.load(path, map_location="cpu")
            except (RuntimeError, ValueError):
                model = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"--dinov2 {path}: expected a TorchScript or pickled nn.Module, got {type(model).__name__}")
            what = f"module file {path}"
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.description = f"DINOv2 ({what}), {image_size}px, ImageNet normalisation"
        self.is_fallback = False
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=bool(x.shape[-1] > self.image_size))
        out = self.model(((x + 1) * 0.5 - self._mean) / self._std)
        if not torch.is_tensor(out) or out.ndim != 2:
            raise ValueError(f"DINOv2 backbone must return (B, D) features, got "
                             f"{type(out).__name__} {tuple(out.shape) if torch.is_tensor(out) else ''}")
        return out.float()


class CLIPImageFeatures:
    """Fallback PPD backbone: the pooled, projected image embedding of a :class:`FrozenCLIP`."""

    def __init__(self, clip, label: str):
        self.clip = clip
        self.description = f"FALLBACK (no DINOv2 given): CLIP image embedding of {label}"
        self.is_fallback = True

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.image_embed(x.to(self.clip.device)).float()


class PPDScorer:
    """Streaming PPD: ``add(images_of_one_prompt)`` (all N images of a prompt), ``result()`` at the end.

    Features are computed in chunks of ``batch_size``; only the current prompt's (N, D) features
    are held.
    """

    def __init__(self, extractor, distance: str = "cosine", batch_size: int = 64, progress: bool = True,
                 total: Optional[int] = None):
        if distance not in DISTANCES:
            raise ValueError(f"PPD distance must be one of {DISTANCES}, got {distance!r}")
        self.extractor, self.distance, self.batch_size = extractor, distance, batch_size
        self.per_prompt: list[float] = []
        self.n = None
        self.bar = ProgressLine("ppd", total, enabled=progress)

    def add(self, images: torch.Tensor) -> float:
        if images.shape[0] < 2:
            raise ValueError(f"PPD needs at least 2 images per prompt, got {images.shape[0]}")
        if self.n is not None and images.shape[0] != self.n:
            raise ValueError(f"PPD: every prompt must have the same N ({self.n}), got {images.shape[0]}")
        self.n = images.shape[0]
        feats = torch.cat([self.extractor(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)])
        v = mean_pairwise_distance(feats, self.distance)
        self.per_prompt.append(v)
        self.bar.update(images.shape[0])
        return v

    def result(self) -> dict:
        if not self.per_prompt:
            raise ValueError("PPDScorer: no prompts were added")
        return {"mppd": sum(self.per_prompt) / len(self.per_prompt), "ppd_per_prompt": list(self.per_prompt),
                "backbone": self.extractor.description, "fallback_backbone": bool(self.extractor.is_fallback),
                "distance": self.distance, "n_per_prompt": self.n, "n_prompts": len(self.per_prompt)}
