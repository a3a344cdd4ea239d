"""Sample images from a trained checkpoint.

    python -m scadfast.sample --ckpt RUN/ckpt.pt --prompt "a red circle" --prompt "a blue square" -n 16 --out grid.png

One grid with a row per prompt (``n`` columns, the same noise in each column so rows are comparable),
one PNG grid per prompt with ``--per-prompt``, or one PNG per image with ``--per-image`` (files
``PPPPP_JJ.png`` = prompt P, column j, for external FID tools; written as they are generated, so 30,000
captions never sit in memory at once). Column j uses noise seeded by ``--seed + j``; the seeds,
prompts and checkpoint are written beside the PNGs as JSON so any image can be regenerated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from .cli import prog


def noise(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """Column j's noise vector comes from its own generator seeded ``seed + j`` (reproducible per image)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(seed + j)) for j in range(n)])


@torch.no_grad()
def generate(loaded, prompts: list[str], n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), n, 3, H, W) images in [-1, 1]."""
    z = noise(n, loaded.pair.z_dim, seed).to(loaded.device)
    s_all = loaded.embed(prompts)
    out = []
    for s in s_all:
        imgs = []
        for i in range(0, n, batch_size):
            zb = z[i:i + batch_size]
            imgs.append(loaded.pair.generate(zb, s.expand(zb.shape[0], -1)).float().clamp(-1, 1))
        out.append(torch.cat(imgs))
    return torch.stack(out)


@torch.no_grad()
def iter_per_image(loaded, prompts: list[str], n: int, seed: int = 0, batch_size: int = 64):
    """Yield ``(prompt index, column j, image (3, H, W) in [-1, 1])`` for every prompt and column,
    batching across prompts; the same images as :func:`generate` (column j's noise is ``seed + j``)."""
    z = noise(n, loaded.pair.z_dim, seed).to(loaded.device)
    for p0 in range(0, len(prompts), batch_size):
        s = loaded.embed(prompts[p0:p0 + batch_size])
        for j in range(n):
            imgs = loaded.pair.generate(z[j:j + 1].expand(s.shape[0], -1), s).float().clamp(-1, 1)
            for k, img in enumerate(imgs):
                yield p0 + k, j, img


def save_png(image: torch.Tensor, path: str) -> str:
    """One (3, H, W) image in [-1, 1] as an 8-bit RGB PNG, written atomically."""
    import io

    from PIL import Image

    from .checkpoint import atomic_write_bytes
    from .grid import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog("scadfast.sample"), description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file with one prompt per line")
    p.add_argument("-n", type=int, default=16, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="column j uses seed + j")
    p.add_argument("--out", default="samples.png", help="output PNG (or directory with --per-prompt / --per-image)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--per-prompt", action="store_true", help="one PNG grid per prompt")
    layout.add_argument("--per-image", action="store_true",
                        help="one PNG per image, PPPPP_JJ.png (prompt, column), e.g. for external FID tools")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--clip-pretrained", default=None, help="override the CLIP weights path recorded in the checkpoint")
    a = p.parse_args(argv)
    prompts = list(a.prompt)
    if a.prompts:
        if not os.path.isfile(a.prompts):
            p.error(f"--prompts {a.prompts}: file not found")
        prompts += [line.strip() for line in open(a.prompts, encoding="utf-8") if line.strip()]
    if not prompts:
        p.error("give at least one --prompt or a --prompts file")
    if a.n < 1:
        p.error("-n must be >= 1")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")

    from .outputs import unwritable_reason

    why = unwritable_reason(a.out, directory=a.per_prompt or a.per_image)
    if why:  # checked before the checkpoint is loaded and anything is generated
        p.error(f"--out {a.out}: cannot write there: {why}")

    from . import runs
    from .checkpoint import CheckpointError
    from .grid import save_grid

    try:
        loaded = runs.load(a.ckpt, a.device, a.clip_pretrained)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    written = []
    if a.per_image:
        os.makedirs(a.out, exist_ok=True)
        for i, j, img in iter_per_image(loaded, prompts, a.n, a.seed, a.batch_size):
            written.append(save_png(img, os.path.join(a.out, f"{i:05d}_{j:02d}.png")))
        meta_path = os.path.join(a.out, "samples.json")
    elif a.per_prompt:
        os.makedirs(a.out, exist_ok=True)
        for i, (prompt, row) in enumerate(zip(prompts, generate(loaded, prompts, a.n, a.seed, a.batch_size))):
            written.append(save_grid(row, os.path.join(a.out, f"{i:03d}_{_slug(prompt)}.png")))
        meta_path = os.path.join(a.out, "samples.json")
    else:
        written.append(save_grid(generate(loaded, prompts, a.n, a.seed, a.batch_size).flatten(0, 1), a.out, nrow=a.n))
        meta_path = os.path.splitext(a.out)[0] + ".json"
    meta = {"ckpt": os.path.abspath(a.ckpt), "step": loaded.state.get("step"), "variant": loaded.state.get("variant"),
            "prompts": prompts, "n": a.n, "seeds": [a.seed + j for j in range(a.n)],
            "layout": ("one file per image: PPPPP_JJ.png = prompt P, column j (seed + j)" if a.per_image else
                       "one file per prompt" if a.per_prompt else "rows = prompts, columns = seeds"),
            "files": written}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    shown = ", ".join(written[:5]) + (f" ... ({len(written)} files)" if len(written) > 5 else "")
    print(f"wrote {shown} ({len(prompts)} prompts × {a.n}) and {meta_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
