"""Export a trained generator for sharing: ``python -m scadfast.export --ckpt RUN --out G.safetensors``.

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: the generator's
tensors (the EMA generator when the run kept one) plus string metadata (``scadfast`` = a JSON object with the variant, its configuration, the
CLIP name and weights tag, the image size, the data spec and the step). Loading it never unpickles
anything, so it cannot run code. ``scadfast.sample`` and ``scadfast.evaluate`` accept it as
``--ckpt`` (only the generator is in it; the discriminator, optimisers and RNG states are not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .cli import prog

META_KEY = "scadfast"
FORMAT = "scadfast-generator-1"


def export_generator(ckpt: str, out: str) -> str:
    """Write the generator of checkpoint ``ckpt`` (a file or run directory) to ``out``."""
    from safetensors.torch import save

    from .checkpoint import CheckpointError, atomic_write_bytes, load

    state = load(ckpt, map_location="cpu")
    for key in ("cfg", "G", "clip", "image_size"):
        if key not in state:
            raise CheckpointError(f"{ckpt}: checkpoint has no {key!r} entry; not a training checkpoint")
    # The EMA generator when the run kept one (what sample/evaluate use), G itself otherwise.
    ema = state.get("G_ema") is not None
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in (state["G_ema"] if ema else state["G"]).items()}
    meta = {"format": FORMAT, "variant": state.get("variant"), "cfg": state["cfg"], "clip": state["clip"],
            "image_size": state["image_size"], "data": state.get("data"), "step": state.get("step"), "ema": ema}
    data = save(tensors, metadata={META_KEY: json.dumps(meta)})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_bytes(out, data)
    return out


def is_export(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".safetensors")


def load_export(path: str) -> tuple[dict, dict]:
    """(generator state dict, metadata) of an exported file; CheckpointError naming it if invalid."""
    from safetensors import safe_open

    from .checkpoint import CheckpointError

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON errors: all "unreadable"
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: safetensors file without scadfast generator metadata "
                              f"(write one with python -m scadfast.export)")
    cfg = dict(meta["cfg"])
    if isinstance(cfg.get("betas"), list):
        cfg["betas"] = tuple(cfg["betas"])
    meta["cfg"] = cfg
    return tensors, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog("scadfast.export"), description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    a = p.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        p.error(f"--out {a.out}: the file name must end in .safetensors")
    from .checkpoint import CheckpointError

    try:
        export_generator(a.ckpt, a.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: --out {a.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in load_export(a.out)[0].values())
    print(f"wrote {a.out} (generator, {n / 1e6:.2f} M parameters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
