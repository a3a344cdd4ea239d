"""The CLIP-aided generator of the GALIP family (docs/design.md §4): Dec1 → frozen CLIP mapper → Dec2.

Every size comes from the :class:`~scadfast.models.clip.FrozenCLIP`: the patch grid ``g``, the
vision width and the number of prompt blocks. With ViT-B/32 at 224 px and ``ngf=64`` this is GALIP's
generator (up-sampling 7→14→28→56→112→224 with 512, 512, 512, 256, 128, 64 channels).

Choices the sources leave open [ours]:

* Dec1's code map has ``code_ch=64`` channels and its residual blocks ``mid_ch=32`` (GALIP's values,
  independent of ``ngf``).
* Up-sampling: each block doubles the size (nearest) except the last, which goes straight to
  ``img_size``; the number of blocks is ``ceil(log2(img_size / g))``. Channels: ``ngf ·
  min(2^(n_up − i), 8)`` for i = 0..n_up (the first is the Dec2 fuse conv's output).
* The text-affine MLPs take cond = [z ‖ s] (GALIP) and start as the identity (γ = 1, β = 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedRef:
    """Holds an object that module copies must share, not duplicate (``copy.deepcopy`` returns the
    same holder): used for the frozen CLIP, so that an EMA copy of G does not clone CLIP."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class Affine(nn.Module):
    """Per-channel text affine ``γ(cond)·x + β(cond)``; γ, β are 2-layer MLPs initialised to (1, 0)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        nn.init.zeros_(self.gamma[2].weight)
        nn.init.ones_(self.gamma[2].bias)
        nn.init.zeros_(self.beta[2].weight)
        nn.init.zeros_(self.beta[2].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        g = self.gamma(cond)[:, :, None, None]
        b = self.beta(cond)[:, :, None, None]
        return g * x + b


class DFBlock(nn.Module):
    """DF-GAN fusion block: affine → LReLU(0.2) → affine → LReLU(0.2)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.affine0 = Affine(cond_dim, channels)
        self.affine1 = Affine(cond_dim, channels)

    def forward(self, x, cond):
        x = F.leaky_relu(self.affine0(x, cond), 0.2)
        return F.leaky_relu(self.affine1(x, cond), 0.2)


class BridgeBlock(nn.Module):
    """Dec1 residual block: ``sc(x) + DF(conv3×3(DF(conv3×3(x))))`` (GALIP's M_Block)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, cond):
        h = self.fuse1(self.conv1(x), cond)
        h = self.fuse2(self.conv2(h), cond)
        return self.shortcut(x) + h


class UpBlock(nn.Module):
    """Dec2 block: nearest resize to ``size``, then ``sc(x) + conv3×3(DF(conv3×3(DF(x))))``
    with a 1×1 shortcut when the channel count changes (GALIP's G_Block)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, size: int):
        super().__init__()
        self.size = int(size)
        self.fuse1 = DFBlock(cond_dim, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, cond):
        x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        h = self.conv1(self.fuse1(x, cond))
        h = self.conv2(self.fuse2(h, cond))
        return self.shortcut(x) + h

    def extra_repr(self) -> str:
        return f"size={self.size}"


def up_schedule(grid: int, img_size: int, ngf: int) -> tuple[list[int], list[int]]:
    """(sizes, channels) of Dec2: ``sizes[i]`` is the output size of up-block i, ``channels[0]`` the
    fuse conv's output and ``channels[i+1]`` up-block i's output (see module doc)."""
    if img_size < grid:
        raise ValueError(f"img_size ({img_size}) must be >= the CLIP patch grid ({grid})")
    n_up = max(0, math.ceil(math.log2(img_size / grid) - 1e-9))
    sizes = [grid * 2 ** (i + 1) for i in range(n_up)]
    if n_up:
        sizes[-1] = img_size
    channels = [max(1, ngf * min(2 ** (n_up - i), 8)) for i in range(n_up + 1)]
    return sizes, channels


class CLIPAidedGenerator(nn.Module):
    """GALIP's CLIP-aided generator (docs/design.md §4).

    Args:
        clip: the frozen CLIP (kept out of this module's parameters and state_dict).
        z_dim: noise size.
        ngf: base width; Dec2's channels scale with ``ngf / 64``.
        img_size: output size (default: ``clip.image_size``).
        code_ch, mid_ch: Dec1's code-map and residual-block widths (GALIP: 64, 32).
        n_bridge_blocks: residual blocks in Dec1 (GALIP: 4).

    ``forward(z (B, z_dim), s (B, clip.embed_dim)) -> image (B, 3, img_size, img_size)``, unbounded
    (no tanh; clamp to [-1, 1] only for saving/evaluating).
    """

    def __init__(self, clip, z_dim: int = 100, ngf: int = 64, img_size: int | None = None,
                 code_ch: int = 64, mid_ch: int = 32, n_bridge_blocks: int = 4):
        super().__init__()
        self._clip = SharedRef(clip)  # not a submodule: frozen, never in G.parameters() or state_dict
        self.z_dim, self.ngf = int(z_dim), int(ngf)
        self.txt_dim = int(clip.embed_dim)
        self.img_size = int(img_size or clip.image_size)
        self.grid, self.clip_width = int(clip.grid), int(clip.width)
        self.n_prompts = len(clip.prompt_blocks)
        self.code_ch = int(code_ch)
        cond_dim = self.z_dim + self.txt_dim
        g = self.grid

        # Dec1: the bridge from noise to CLIP's patch-token space.
        self.fc_code = nn.Linear(self.z_dim, code_ch * g * g)
        self.bridge = nn.ModuleList(
            [BridgeBlock(code_ch, mid_ch, code_ch, cond_dim) for _ in range(n_bridge_blocks)])
        self.to_clip = nn.Conv2d(code_ch, self.clip_width, 5, 1, 2)
        # Learned prompts for the frozen CLIP mapper.
        self.fc_prompt = nn.Linear(cond_dim, self.n_prompts * self.clip_width)
        # Dec2.
        sizes, chans = up_schedule(g, self.img_size, self.ngf)
        self.fuse = nn.Conv2d(self.clip_width, chans[0], 5, 1, 2)
        self.up = nn.ModuleList([UpBlock(chans[i], chans[i + 1], cond_dim, sizes[i]) for i in range(len(sizes))])
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, 1, 1)

    @property
    def clip(self):
        return self._clip.obj

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"CLIPAidedGenerator: z must be (B, {self.z_dim}), got {tuple(z.shape)}")
        if s.ndim != 2 or s.shape != (z.shape[0], self.txt_dim):
            raise ValueError(f"CLIPAidedGenerator: s must be (B={z.shape[0]}, {self.txt_dim}), got {tuple(s.shape)}")
        b = z.shape[0]
        s = s.to(z.dtype)
        cond = torch.cat([z, s], dim=1)
        x = self.fc_code(z).view(b, self.code_ch, self.grid, self.grid)
        for blk in self.bridge:
            x = blk(x, cond)
        feat1 = self.to_clip(x)
        prompts = self.fc_prompt(cond).view(b, self.n_prompts, self.clip_width)
        feat2 = self.clip.mapper(feat1, prompts).to(feat1.dtype)
        x = self.fuse(feat1 + 0.1 * feat2)
        for blk in self.up:
            x = blk(x, cond)
        return self.to_rgb(F.leaky_relu(x, 0.2))

    def extra_repr(self) -> str:
        return (f"z_dim={self.z_dim}, txt_dim={self.txt_dim}, ngf={self.ngf}, img_size={self.img_size}, "
                f"grid={self.grid}, clip_width={self.clip_width}, n_prompts={self.n_prompts}")
