"""Load a trained GAN run back: the model pair (generator, discriminator, frozen CLIP) from a training
checkpoint or run directory, or the generator alone from a file written by :mod:`scadfast.export`.
``sample`` and ``evaluate`` start here."""

from __future__ import annotations

import sys
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
        """Sentence embeddings (B, d_txt) of prompts under the training CLIP.

        Prompts longer than the CLIP context are truncated by CLIP itself; that is said once per
        process (with the token limit), and so is an empty prompt."""
        check_prompts(self.clip, prompts)
        tokens = self.clip.tokenize(list(prompts)).to(self.device)
        return self.clip.encode_text(tokens).float()


_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"[scadfast] warning: {msg}", file=sys.stderr, flush=True)


def check_prompts(clip, prompts) -> None:
    """Warn (once per process and kind) about empty prompts and prompts that CLIP will truncate."""
    prompts = list(prompts)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        _warn_once("empty", f"{len(empty)} empty prompt(s) (number {', '.join(str(i + 1) for i in empty[:5])}); "
                            "the images are conditioned on nothing but CLIP's start/end tokens")
    limit = int(getattr(clip, "context_length", 0) or 0)
    tok = getattr(clip, "_tokenizer", None)
    if not limit or tok is None:
        return
    long = []
    for i, p in enumerate(prompts):
        if len(p.encode("utf-8")) + 2 <= limit or not p.strip():  # a token covers >= 1 byte
            continue
        try:
            ids = tok([p], context_length=len(p.encode("utf-8")) + 2)
        except Exception:  # noqa: BLE001 - a tokenizer without that signature: no check
            return
        n = int((ids[0] != 0).sum())
        if n > limit:
            long.append((i, n))
    if long:
        shown = ", ".join(f"number {i + 1} ({n} tokens)" for i, n in long[:5])
        _warn_once("long", f"{len(long)} prompt(s) exceed CLIP's context of {limit} tokens and are truncated "
                           f"to it (the rest of the text has no effect): {shown}")


def _load_with_hint(path: str) -> dict:
    """``checkpoint.load``; a damaged file's error names the newest intact checkpoint beside it."""
    import os

    try:
        return ckpt_lib.load(path, map_location="cpu")
    except ckpt_lib.CheckpointError as e:
        run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        bad = os.path.join(path, ckpt_lib.LATEST) if os.path.isdir(path) else path
        alt, _ = ckpt_lib.newest_intact(run_dir, exclude=(bad,)) if os.path.exists(bad) else (None, None)
        if alt is None:
            raise
        raise ckpt_lib.CheckpointError(f"{e}; the newest intact checkpoint there is {alt}") from None


def load(path: str, device: str | torch.device | None = None, clip_pretrained: str | None = None) -> Loaded:
    """Rebuild the pair recorded in checkpoint ``path`` (a file or a run directory) on ``device``.

    ``path`` may also be a ``.safetensors`` generator written by :mod:`scadfast.export`; then only
    ``pair.G`` holds trained weights (``pair.D`` is freshly initialised and unused for sampling).

    The CLIP is rebuilt from the name and weights recorded at training time; pass ``clip_pretrained``
    if the weights file has moved. ``pair.G`` holds the EMA generator when the run kept one.
    """
    from .models.clip import FrozenCLIP

    from . import export

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if export.is_export(path):  # a generator exported with scadfast.export (no D inside)
        g_state, meta = export.load_export(path)
        state = {**meta, "G": g_state}
    else:
        state = _load_with_hint(path)
    for key in ("cfg", "G", "clip", "image_size") + (() if export.is_export(path) else ("D",)):
        if key not in state:
            raise ckpt_lib.CheckpointError(f"{path}: checkpoint has no {key!r} entry; not a training checkpoint")
    fields = variants.VariantConfig.__dataclass_fields__
    cfg = variants.VariantConfig(**{k: v for k, v in state["cfg"].items() if k in fields})
    clip_info = state["clip"]
    clip = FrozenCLIP(clip_info["name"], pretrained=clip_pretrained or clip_info.get("pretrained"), device=device)
    pair = variants.build(cfg, clip, img_size=state["image_size"]).to(device)
    try:
        # The EMA generator (--ema-kimg) is the one to sample from, as in StyleGAN; G itself otherwise.
        pair.G.load_state_dict(state.get("G_ema") or state["G"])
        if "D" in state:
            pair.D.load_state_dict(state["D"])
    except RuntimeError as e:
        raise ckpt_lib.CheckpointError(
            f"{path}: the weights do not fit the {state.get('variant')} model they name "
            f"({str(e).splitlines()[0]})") from None
    pair.G.eval()
    pair.D.eval()
    return Loaded(pair, clip, state, device)
