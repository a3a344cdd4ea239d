"""Train a CLIP-aided text-to-image GAN: ``python -m scadfast.train --variant scad_mi``.

With no other flag this runs offline on a 2-core CPU: it builds the embedded "shapes" data set in the
cache directory if missing, uses the embedded CLIP (``scadfast-tiny``), trains for the preset number of
steps and leaves checkpoints, PNG sample grids (fixed prompts × fixed noise), TensorBoard logs and a
summary in the run directory. Multi-GPU / multi-node: ``torchrun --nproc_per_node=N -m scadfast.train ...``.

One training iteration = ``n_critic`` discriminator steps and one generator step on data batches of
``--batch-size`` images per process (GALIP: one D step, then one G step on the same batch).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch

from . import checkpoint as ckpt_lib
from . import distributed as dist_lib
from . import runlock, variants
from .cli import prog
from .data.shapes import GAN_TRAIN_SET_SIZE, default_cache_dir
from .grid import make_grid, save_grid
from .models.text_cache import gather_rows
from .progress import Progress, format_seconds

# Switches that only make sense for one model family (checked so a user learns the flag is ignored).
_GALIP_ONLY = ("d_loss", "fidelity", "fidelity_loss", "mi_weight", "gp_every", "gp_weight", "augment", "edit_negatives")
_MS_ONLY = ("cond_aug", "ca_mode", "kl_weight", "label_smoothing", "use_uncond_loss")

# Defaults of the engine (flags override, a --config file sits in between).
DEFAULTS = dict(
    data="shapes", shapes_n=GAN_TRAIN_SET_SIZE, clip="scadfast-tiny", clip_pretrained=None, image_size=None,
    batch_size=16, steps=600, precision=None, compile=None, impl="auto", seed=0, out=None,
    resume=False, init_from=None, dry_run=False, log_every=25, sample_every=200, ckpt_every=200, keep_ckpts=3, device=None,
    cache_dir=None, sample_prompts=8, sample_noise=8, check_images=False, eval_every=0, eval_prompts=16,
    eval_n=16, eval_metrics=None, eval_ref=None, eval_ref_stats=None, eval_images=2000, inception_weights=None,
    ema_kimg=0.0, ema_rampup=0.05, channels_last=True, text_emb_dtype="fp32", loader="dali",
)


# Snapshot metrics (--eval-metrics); those after "shapes" are scored against --eval-ref.
EVAL_METRICS = ("shapes", "fid", "kid", "clip_score")
REF_METRICS = EVAL_METRICS[1:]

# What the embedded default (scadfast-tiny on shapes) sets on top of DEFAULTS: learning curves on and
# an EMA generator (README, "Results on the embedded default", says what each was measured to do).
EMBEDDED = dict(eval_every=100, ema_kimg=2.0, steps=1000)
# The embedded default's MA-GP weight (GALIP's k = 2 elsewhere): on the tiny CLIP's features the
# penalty k·mean(‖∇‖⁶) spikes to thousands and stalls D; k = 0.5 learned colour and place sooner
# (README, "What the default run shows").
EMBEDDED_GP_WEIGHT = 0.5
# The embedded default's bound on D's gradient norm for the SAN-loss variants (scad, scad_mi, scad_dd;
# off elsewhere): unbounded, the MA-GP penalty ran away and ruined 2 of 12 such runs; bounded at 200
# (reached only within the first ~125 D steps of a healthy run), all 12 seeds trained (README,
# "Clipping D's gradient, seed by seed"; docs/design.md §5.5).
EMBEDDED_D_GRAD_CLIP = 200.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("scadfast.train"),
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    S = argparse.SUPPRESS  # unset flags stay absent so the config file / presets can fill them
    g = p.add_argument_group("run")
    g.add_argument("--variant", required=True, choices=variants.names(), help="preset of switches (docs/design.md §2)")
    g.add_argument("--config", default=None, help="YAML file of flag values (keys = flag names); flags override it")
    g.add_argument("--out", default=S, help="run directory (default runs/<variant>-<time>)")
    g.add_argument("--resume", action="store_true", default=S, help="continue from the newest checkpoint in --out")
    g.add_argument("--init-from", default=S, metavar="CKPT",
                   help="start a new run (step 0, fresh optimisers) from another run's weights (G, D and the EMA "
                        "G) — fine-tuning; a checkpoint file or run directory. Ignored by --resume, which "
                        "continues this run's own checkpoint")
    g.add_argument("--dry-run", action="store_true", default=S,
                   help="build everything, run one training step, print its time and the peak memory, write nothing")
    g.add_argument("--steps", type=int, default=S, help=f"training iterations (default {DEFAULTS['steps']}; {EMBEDDED['steps']} for the embedded "
                        "scadfast-tiny default)")
    g.add_argument("--seed", type=int, default=S, help="seed of initialisation, noise and data order (default 0)")
    g.add_argument("--device", default=S, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=S,
                   help="autocast precision (default bf16 on GPU, fp32 on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=S,
                   help="torch.compile the networks (default on for GPU, off on CPU where compile time "
                        "dominates a short run)")
    g.add_argument("--impl", choices=["auto", "ref"], default=S, help="fused ops (auto) or their references")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=S,
                   help="keep G's and D's conv weights channels-last (NHWC), the layout oneDNN and cuDNN "
                        "convolve fastest; same arithmetic, other memory order (default on)")
    g.add_argument("--log-every", type=int, default=S, help="steps between progress lines (default 25)")
    g.add_argument("--sample-every", type=int, default=S, help="steps between sample grids (default 200)")
    g.add_argument("--ckpt-every", type=int, default=S, help="steps between checkpoints (default 200)")
    g.add_argument("--keep-ckpts", type=int, default=S, help="numbered checkpoints kept (default 3)")
    g.add_argument("--sample-prompts", type=int, default=S,
                   help="rows (distinct prompts) of the sample grid (default 8; 0 = no sample grids)")
    g.add_argument("--sample-noise", type=int, default=S,
                   help="columns (fixed noise vectors) of the sample grid (default 8; 0 = no sample grids)")
    g.add_argument("--eval-every", type=int, default=S,
                   help="steps between learning-curve snapshots of --eval-metrics (→ curves.jsonl, TensorBoard, "
                        "curves.png); 0 = off (default: on for the embedded default)")
    g.add_argument("--eval-metrics", default=S, metavar="LIST",
                   help=f"comma list of {','.join(EVAL_METRICS)}: shapes = alignment, coverage, mPPD and CLIP "
                        "score on held-out shapes prompts (shapes data only); fid, kid, clip_score = against "
                        "--eval-ref, one image per caption (default shapes with shapes data; name them otherwise)")
    g.add_argument("--eval-ref", default=S, metavar="REF",
                   help="reference set of fid/kid/clip_score: a data spec with captions, as evaluate --ref "
                        "(coco:ROOT takes its val split, coco:ANN.json[,IMAGES], folder:PATH, wds:PATTERN, shapes:...); "
                        "its captions are the prompts")
    g.add_argument("--eval-ref-stats", default=S, metavar="FILE.npz",
                   help="precomputed reference statistics (as evaluate --ref-stats/--save-stats; mu/sigma, features "
                        "too for kid) instead of reading the --eval-ref images")
    g.add_argument("--eval-images", type=int, default=S,
                   help="images per fid/kid/clip_score snapshot: one per caption, the first N of the reference's "
                        "captions in evaluate's order for --seed (default 2000; fewer if it has fewer captions)")
    g.add_argument("--inception-weights", default=S, metavar="PATH",
                   help="standard Inception-v3 FID weights (.pth) for fid/kid, as evaluate (default: torch-fidelity's "
                        "cache); checked before training starts")
    g.add_argument("--eval-prompts", type=int, default=S, help="held-out prompts per shapes snapshot (default 16)")
    g.add_argument("--eval-n", type=int, default=S, help="images per held-out prompt per shapes snapshot (default 16)")
    g.add_argument("--ema-kimg", type=float, default=S,
                   help="half-life of the EMA copy of G in thousands of images (samples, snapshots and checkpoints' "
                        "G_ema); 0 = off (default off; on for the embedded default)")
    g.add_argument("--ema-rampup", type=float, default=S,
                   help="EMA half-life at most this fraction of the images seen so far (StyleGAN's ramp-up); 0 = off")
    g = p.add_argument_group("data and CLIP")
    g.add_argument("--data", default=S, help="shapes | coco:PATH | folder:PATH | wds:PATTERN (default shapes)")
    g.add_argument("--shapes-n", type=int, default=S,
                   help=f"images in the generated shapes set (default {GAN_TRAIN_SET_SIZE})")
    g.add_argument("--cache-dir", default=S, help="data / embedding cache (default $SCADFAST_CACHE or ~/.cache/scadfast)")
    g.add_argument("--clip", default=S, help="open_clip model name (default scadfast-tiny, the embedded CLIP)")
    g.add_argument("--clip-pretrained", default=S,
                   help="open_clip tag (e.g. openai), a local checkpoint path, or 'shapes' (the shipped weights of "
                        "scadfast-tiny; the default for it), 'none' for random init")
    g.add_argument("--image-size", type=int, default=S, help="output resolution (default: the CLIP image size)")
    g.add_argument("--text-emb-dtype", choices=["fp32", "fp16"], default=S,
                   help="storage of the cached caption embeddings (kept on the host, memory-mapped; each batch's "
                        "rows are copied to the device as fp32); fp16 halves the file, e.g. for CC12M (default fp32)")
    g.add_argument("--batch-size", type=int, default=S, help="images per process per step (default 16)")
    g.add_argument("--loader", choices=["dali", "memory"], default=S,
                   help="dali: decode every batch with NVIDIA DALI (on the GPU when training on one; the default); "
                        "memory: decode every image once with Pillow and keep the set on the device (small data "
                        "sets such as the embedded shapes one; needs no DALI). Same batch order either way")
    g.add_argument("--check-images", action="store_true", default=S,
                   help="fully decode every image when indexing and skip undecodable ones (slow the first "
                        "time; verified files are cached). Without it a cheap header check runs, and an image "
                        "DALI cannot decode during training is named and skipped then")
    g = p.add_argument_group("model switches (override the variant preset)")
    g.add_argument("--d-loss", choices=["hinge", "san"], default=S)
    g.add_argument("--fidelity", choices=["none", "clip_patch", "pixel_patchgan"], default=S)
    g.add_argument("--fidelity-loss", choices=["hinge", "san"], default=S)
    g.add_argument("--mi-weight", type=float, default=S, help="λ_MI of the Q(z|x) head (0 = off)")
    g.add_argument("--clip-weight", type=float, default=S, help="λ_clip of G's CLIP-similarity term")
    g.add_argument("--gp-every", type=int, default=S, help="MA-GP every N D steps (lazy, scaled by N)")
    g.add_argument("--gp-weight", type=float, default=S, help="MA-GP k (0 = off)")
    g.add_argument("--augment", choices=["none", "translation", "translation,cutout"], default=S,
                   help="differentiable augmentation of real and fake images before CLIP reads them, in the D "
                        "and G steps (default none)")
    g.add_argument("--edit-negatives", type=float, default=S, metavar="P",
                   help="share of D's mismatched texts that are edit negatives: another training caption that "
                        "contradicts the image's caption in exactly one named attribute (shapes captions only); "
                        "the rest are GALIP's text of another sample (default 0)")
    g.add_argument("--z-dim", type=int, default=S)
    g.add_argument("--ngf", type=int, default=S, help="generator base width (default 64; 32 with scadfast-tiny)")
    g.add_argument("--ndf", type=int, default=S, help="discriminator base width (default 64; 32 with scadfast-tiny)")
    g.add_argument("--lr-g", type=float, default=S)
    g.add_argument("--lr-d", "--d-lr", dest="lr_d", type=float, default=S)
    g.add_argument("--n-critic", type=int, default=S, help="D steps per G step")
    g.add_argument("--d-grad-clip", type=float, default=S, metavar="NORM",
                   help="clip D's gradient to this total norm before each D step (0 = off; default off, "
                        f"{EMBEDDED_D_GRAD_CLIP:g} for the SAN-loss variants on the embedded default); bounds "
                        "the step an MA-GP spike can take; the pre-clip norm is logged as d/grad_norm, the "
                        "number of D steps clipped since the last log line as d/clipped_steps")
    g.add_argument("--cond-aug", action=argparse.BooleanOptionalAction, default=S, help="MS-CLIP-GAN: CA on/off")
    g.add_argument("--ca-mode", choices=["glu", "relu"], default=S)
    g.add_argument("--kl-weight", type=float, default=S)
    g.add_argument("--label-smoothing", type=float, default=S)
    g.add_argument("--use-uncond-loss", action=argparse.BooleanOptionalAction, default=S)
    return p


_CFG_FIELDS = {f for f in variants.VariantConfig.__dataclass_fields__} - {"name", "arch", "betas"}


def _flags_for(values: dict) -> str:
    """The command-line flags that set the VariantConfig fields of ``values`` (fields without a flag
    are left out), e.g. ``{"d_grad_clip": 0.0}`` -> ``"--d-grad-clip 0.0"``."""
    actions = {a.dest: a for a in build_parser()._actions}
    flags = []
    for field, value in values.items():
        if field in actions:
            names = actions[field].option_strings  # a --x/--no-x switch lists both names
            flags.append((names[0] if value else names[-1]) if isinstance(value, bool) else f"{names[0]} {value}")
    return " ".join(flags)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags > --config file > engine defaults; model switches > variant preset. Errors name the flag."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k not in ("variant", "config")}
    from_file = {}
    if ns.config:
        from_file = load_config(ns.config, parser)
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in from_file.items() if k not in _CFG_FIELDS})
    merged.update({k: v for k, v in given.items() if k not in _CFG_FIELDS})
    switches = {k: v for k, v in from_file.items() if k in _CFG_FIELDS}
    switches.update({k: v for k, v in given.items() if k in _CFG_FIELDS})
    cfg = variants.get(ns.variant)
    family_only = _MS_ONLY if cfg.arch == "galip" else _GALIP_ONLY
    bad = [k for k in switches if k in family_only]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise SystemExit(f"error: {flags} do(es) not apply to --variant {ns.variant} "
                         f"({'GALIP family' if cfg.arch == 'galip' else 'MS-CLIP-GAN'})")
    if merged["clip_pretrained"] is None and merged["clip"] == "scadfast-tiny":
        merged["clip_pretrained"] = "shapes"  # the embedded CLIP pretrained on the embedded data
    if merged["clip_pretrained"] in ("none", "None"):
        merged["clip_pretrained"] = None
    if merged["clip"] == "scadfast-tiny":
        # The embedded default is sized for a 2-core CPU: half-width networks, EMBEDDED['steps'] steps of 16 images
        # at 64 px (its measured wall time is in the README, "Two commands on a fresh machine").
        switches.setdefault("ngf", 32)
        switches.setdefault("ndf", 32)
        if cfg.arch == "galip":
            switches.setdefault("gp_weight", EMBEDDED_GP_WEIGHT)
            if switches.get("d_loss", cfg.d_loss) == "san":
                switches.setdefault("d_grad_clip", EMBEDDED_D_GRAD_CLIP)
        for k, v in EMBEDDED.items():
            if k not in given and k not in from_file and (k != "eval_every" or merged["data"].startswith("shapes")):
                merged[k] = v
    merged["cfg"] = cfg.replace(**switches)
    merged["variant"] = ns.variant
    args = argparse.Namespace(**merged)
    _validate(args)
    return args


def load_config(path: str, parser) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise SystemExit(f"error: --config {path}: file not found")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"error: --config {path}: invalid YAML ({e})")
    if not isinstance(data, dict):
        raise SystemExit(f"error: --config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key == "variant":
            continue
        if key not in actions:
            raise SystemExit(f"error: --config {path}: unknown key {k!r}")
        out[key] = _config_value(actions[key], k, v, path)
    return out


_NULLABLE = {k for k, v in DEFAULTS.items() if v is None}


def _config_value(action: argparse.Action, key, value, path: str):
    """``value`` from the YAML file checked with the type and choices of its flag (``action``)."""
    flag = action.option_strings[0]

    def bad(expected: str):
        raise SystemExit(f"error: --config {path}: key {key!r} must be {expected} (as {flag}), got {value!r}")

    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if value is None:
        if action.dest in _NULLABLE:
            return None
        bad("a value")
    typ = action.type
    if typ in (int, float):
        what = "an integer" if typ is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            bad(what)
        if typ is int and isinstance(value, float):
            bad(what)
        try:
            value = typ(value)
        except (TypeError, ValueError):
            bad(what)
        if typ is float and not math.isfinite(value):
            bad("a finite number")
    elif not isinstance(value, str):
        bad("a string")
    if action.choices is not None and value not in action.choices:
        bad("one of " + ", ".join(map(str, action.choices)))
    return value


def _validate(a) -> None:
    for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "shapes_n", "image_size", "eval_prompts"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    for name in ("keep_ckpts", "sample_prompts", "sample_noise"):
        if getattr(a, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    for name in ("z_dim", "ngf", "ndf"):
        if getattr(a.cfg, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(a.cfg, name)}")
    for name in ("lr_g", "lr_d"):
        if not getattr(a.cfg, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(a.cfg, name)}")
    for name in ("mi_weight", "clip_weight", "gp_weight", "kl_weight", "label_smoothing", "d_grad_clip"):
        if not getattr(a.cfg, name) >= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(a.cfg, name)}")
    if a.eval_every < 0 or a.eval_n < 2 or a.eval_images < 2:
        raise SystemExit(f"error: --eval-every must be >= 0 and --eval-n, --eval-images >= 2, got {a.eval_every}, "
                         f"{a.eval_n}, {a.eval_images}")
    a.eval_metrics = _eval_metrics(a)
    if a.ema_kimg < 0 or a.ema_rampup < 0:
        raise SystemExit(f"error: --ema-kimg and --ema-rampup must be >= 0, got {a.ema_kimg}, {a.ema_rampup}")
    if not 0.0 <= a.cfg.edit_negatives <= 1.0:
        raise SystemExit(f"error: --edit-negatives must be in [0, 1], got {a.cfg.edit_negatives}")
    if a.cfg.n_critic < 1:
        raise SystemExit("error: --n-critic must be >= 1")
    if a.cfg.gp_every < 1:
        raise SystemExit("error: --gp-every must be >= 1")
    if a.resume and not a.out:
        raise SystemExit("error: --resume needs --out RUN_DIR (the run to continue)")


def _eval_metrics(a) -> list:
    """The snapshot metrics as a list ([] without --eval-every); one error line for a bad combination."""
    shapes_data = a.data.startswith("shapes")
    if not a.eval_every:
        given = [f for f, v in (("--eval-metrics", a.eval_metrics), ("--eval-ref", a.eval_ref),
                                ("--eval-ref-stats", a.eval_ref_stats)) if v]
        if given:
            raise SystemExit(f"error: {', '.join(given)} take(s) effect only with --eval-every N (steps between "
                             f"snapshots, > 0)")
        return []
    if a.eval_metrics is None and not shapes_data:
        raise SystemExit(f"error: --eval-every on --data {a.data} needs --eval-metrics (fid, kid, clip_score with "
                         f"--eval-ref REF); the default, shapes, needs --data shapes")
    names = list(dict.fromkeys(m.strip() for m in (a.eval_metrics or "shapes").split(",") if m.strip()))
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown or not names:
        raise SystemExit(f"error: --eval-metrics: unknown {','.join(unknown) or repr(a.eval_metrics)}; choose from "
                         f"{','.join(EVAL_METRICS)}")
    if "shapes" in names and not shapes_data:
        raise SystemExit(f"error: --eval-metrics shapes scores held-out shapes prompts and needs --data shapes "
                         f"(got {a.data!r}); use fid, kid, clip_score with --eval-ref")
    if "shapes" in names and "clip_score" in names:
        raise SystemExit("error: --eval-metrics: shapes already reports clip_score (on held-out shapes prompts); "
                         "ask for shapes or clip_score")
    ref_metrics = [m for m in names if m in REF_METRICS]
    if ref_metrics and not a.eval_ref:
        raise SystemExit(f"error: --eval-metrics {','.join(ref_metrics)} needs --eval-ref REF (a data spec with "
                         f"captions: coco:ROOT, folder:PATH, wds:PATTERN, shapes:...)")
    if a.eval_ref and not ref_metrics:
        raise SystemExit(f"error: --eval-ref is read by fid, kid and clip_score; --eval-metrics {','.join(names)} "
                         f"has none of them")
    if a.eval_ref:
        from .metrics.reference import is_data_spec

        if not is_data_spec(a.eval_ref):
            raise SystemExit(f"error: --eval-ref {a.eval_ref}: snapshot prompts are the reference's captions; give a "
                             f"data spec with captions (coco:ROOT, folder:PATH, wds:PATTERN, shapes:...), not a "
                             f"plain image folder")
    if a.eval_ref_stats and not {"fid", "kid"} & set(names):
        raise SystemExit("error: --eval-ref-stats is read by fid and kid only; add one to --eval-metrics")
    if a.eval_ref_stats and not os.path.isfile(a.eval_ref_stats):
        raise SystemExit(f"error: --eval-ref-stats {a.eval_ref_stats}: file not found")
    return names


# ------------------------------------------------------------------------------------------------


class DataError(RuntimeError):
    """The training data cannot be used; the message names the source or file and the problem."""


class Trainer:
    """Owns the models, optimisers, data and the loop; ``state_dict`` is everything a resume needs."""

    def __init__(self, args):
        self.args = args
        self.cfg = args.cfg
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = dist_lib.init(dev)
        if dev == "cuda" and self.dist.enabled:
            dev = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(dev)
        self.precision = args.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.compile = args.compile if args.compile is not None else self.device.type == "cuda"
        self.is_main = self.dist.is_main
        self.out = args.out or os.path.join("runs", f"{args.variant}-{time.strftime('%Y%m%d-%H%M%S')}")
        self._stop_requested = False
        self.stop_signal = None  # the signal number that stopped the run, if one did
        self._lock = None
        self._last_ckpt = None  # the numbered checkpoint this process wrote last
        self._last_ckpt_step = None

        from .models.clip import FrozenCLIP
        from .models.text_cache import EmbeddingCacheError, TextEmbeddingCache

        torch.manual_seed(args.seed)  # identical initialisation on every rank
        self.clip = FrozenCLIP(args.clip, pretrained=args.clip_pretrained, device=self.device)
        self.image_size = args.image_size or self.clip.image_size
        # fid/kid/clip_score snapshots: weights, reference and its statistics before the data and models.
        self._ref_evaluator = self._make_ref_evaluator() if self.is_main else None
        self.loader = self._make_loader()
        cache_dir = os.path.join(self._cache_dir(), "text-embeddings")
        try:  # encoded once, split across the ranks; kept on the host: batches gather their rows
            self.text_store = TextEmbeddingCache(self.clip, cache_dir).embed(
                self.loader.captions, dtype={"fp16": "float16"}.get(args.text_emb_dtype, "float32"),
                rank=self.dist.rank, world_size=self.dist.world_size, sync=self._all_true)
        except EmbeddingCacheError as e:
            raise DataError(f"--cache-dir {self._cache_dir()}: {e}") from None
        self.text_emb = torch.as_tensor(self.text_store)  # (N, d) on the host, memory-mapped
        self.negatives = None
        if self.cfg.edit_negatives > 0:
            from .data.negatives import EditNegatives

            try:
                self.negatives = EditNegatives(self.loader.captions)
            except ValueError as e:
                raise DataError(f"--edit-negatives {self.cfg.edit_negatives} with --data {args.data}: {e}") from None

        torch.manual_seed(args.seed)
        self.pair = variants.build(self.cfg, self.clip, img_size=self.image_size).to(self.device)
        dist_lib.broadcast_module(self.pair.G, self.dist)
        dist_lib.broadcast_module(self.pair.D, self.dist)
        if args.channels_last:
            self.pair.to(memory_format=torch.channels_last)
        fused = self.device.type == "cuda"
        self.opt_g = torch.optim.Adam(self.pair.G.parameters(), lr=self.cfg.lr_g, betas=self.cfg.betas, fused=fused)
        self.opt_d = torch.optim.Adam(self.pair.D.parameters(), lr=self.cfg.lr_d, betas=self.cfg.betas, fused=fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # EMA copy of G (StyleGAN practice): what samples, snapshots and `sample`/`evaluate` use.
        self.g_ema = copy.deepcopy(self.pair.G).eval().requires_grad_(False) if args.ema_kimg > 0 else None
        if self.compile:
            self._compile()
        self.step, self.images_seen = 0, 0
        self._d_clipped = torch.zeros((), device=self.device)  # clipped D steps since the last log line
        # Fixed prompts × fixed noise for the sample grids (independent of the training RNG).
        gen = torch.Generator().manual_seed(args.seed + 12345)
        prompts = list(dict.fromkeys(self.loader.captions))[: args.sample_prompts]
        self.sample_prompts = prompts
        idx = [self.loader.captions.index(p) for p in prompts]
        self.sample_s = gather_rows(self.text_emb, torch.tensor(idx, dtype=torch.int64),
                                    self.device).repeat_interleave(args.sample_noise, 0)
        self.sample_z = torch.randn(args.sample_noise, self.cfg.z_dim, generator=gen).repeat(len(prompts), 1).to(self.device)
        self.evaluator = self._make_evaluator() if args.eval_metrics and self.is_main else None

    # -- setup helpers ----------------------------------------------------------------------------
    def _cache_dir(self) -> str:
        """``--cache-dir``, else ``$SCADFAST_CACHE``, else ``~/.cache/scadfast`` (``~`` expanded)."""
        return os.path.expanduser(self.args.cache_dir) if self.args.cache_dir else str(default_cache_dir())

    def _all_true(self, flag: bool) -> bool:
        return dist_lib.all_true(flag, self.dist)

    def _make_loader(self):
        from .data import make_loader

        a = self.args
        spec = a.data
        if spec == "shapes":  # the embedded default: generated (once) in the cache directory
            spec = f"shapes:n={a.shapes_n},root={os.path.join(self._cache_dir(), 'data')}"
        try:
            return make_loader(
                spec, image_size=self.image_size, batch_size=a.batch_size,
                device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
                rank=self.dist.rank, world_size=self.dist.world_size, seed=a.seed,
                check_images="decode" if a.check_images else "header", backend=a.loader,
                index={"cache_dir": os.path.join(self._cache_dir(), "wds-index"), "sync": self._all_true,
                       "verbose": self.is_main},
            )
        except (ValueError, OSError) as e:  # missing / empty / malformed data, batch > data set
            msg = str(e)
            if "give no full batch" in msg:
                msg += f" (lower --batch-size {a.batch_size})"
            raise DataError(f"--data {a.data}: {msg}") from None

    def _make_evaluator(self):
        """The snapshot evaluator of ``--eval-metrics``: the shapes metrics and/or the reference metrics."""
        from .metrics.curves import SnapshotEvaluator, heldout_prompts, merged

        parts = [self._ref_evaluator] if self._ref_evaluator is not None else []
        if "shapes" in self.args.eval_metrics:
            prompts = heldout_prompts(self.args.eval_prompts, exclude=self.loader.captions)
            parts.insert(0, SnapshotEvaluator(self.clip, prompts, self.cfg.z_dim, self.args.eval_n, seed=self.args.seed))
        return parts[0] if len(parts) == 1 else merged(parts)

    def _make_ref_evaluator(self):
        """fid/kid/clip_score against ``--eval-ref`` (None without them): the Inception weights, the reference
        captions and statistics (computed once, cached as evaluate caches them, or ``--eval-ref-stats``).
        Runs before training; a missing or bad file stops the run with one error line."""
        from .metrics import fid as fid_lib
        from .metrics.curves import ReferenceSnapshotEvaluator, isolated_rng
        from .metrics.reference import load_reference

        a = self.args
        metrics = [m for m in a.eval_metrics if m in REF_METRICS]
        if not metrics:
            return None
        extractor = None
        if {"fid", "kid"} & set(metrics):
            try:
                with isolated_rng(self.device, a.seed):  # building Inception draws (then overwritten) init weights
                    extractor = fid_lib.InceptionFeatures(a.inception_weights, self.device)
            except (fid_lib.InceptionWeightsMissing, ValueError) as e:
                raise SystemExit(f"error: --eval-metrics {','.join(metrics)}: {e}") from None
        try:
            with isolated_rng(self.device, a.seed):  # nothing here may move the training random streams
                ref = load_reference(a.eval_ref, self.image_size, flag="--eval-ref")
                real = None
                if extractor is not None:
                    real = fid_lib.reference_or_stats(
                        ref, extractor, a.eval_ref_stats, "kid" in metrics, ("--eval-ref-stats", "--eval-ref"),
                        cache_dir=self._cache_dir(), batch_size=64, size=self.image_size, progress=True)
                prompts = ref.caption_order(a.seed)[:a.eval_images]
                return ReferenceSnapshotEvaluator(self.clip, prompts, self.cfg.z_dim, metrics, extractor, real,
                                                  seed=a.seed)
        except (ValueError, OSError) as e:
            msg = str(e) if str(e).startswith("--eval-ref") else f"--eval-ref {a.eval_ref}: {e}"
            raise SystemExit(f"error: {msg}") from None

    def _compile(self):
        """Compile the generator and the discriminator parts that never see a double backward.

        ``torch.compile`` (AOTAutograd) does not support double backward, and the MA-GP differentiates
        D's output w.r.t. its inputs; so G is compiled whole and D only when the penalty is off.
        """
        self.pair.G.compile()
        if self.cfg.gp_weight == 0:
            self.pair.D.compile()

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "variant": self.args.variant, "cfg": self.cfg.__dict__.copy(),
            "clip": {"name": self.args.clip, "pretrained": self.args.clip_pretrained},
            "image_size": self.image_size, "data": self.args.data,
            "G": self.pair.G.state_dict(), "D": self.pair.D.state_dict(),
            "G_ema": self.g_ema.state_dict() if self.g_ema is not None else None,
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            "images_seen": self.images_seen, "data_position": self.loader.state_dict(),
            "rng": ckpt_lib.rng_state(), "world_size": self.dist.world_size,
            "sample_prompts": self.sample_prompts,
            "d_steps": getattr(self.pair, "d_steps", None),  # the lazy MA-GP counter (--gp-every)
        }

    def _check_same_clip(self, state: dict, what: str) -> None:
        """Refuse a checkpoint trained with another CLIP or image size (``what`` names it in the error)."""
        if state.get("image_size") != self.image_size or state.get("clip", {}).get("name") != self.args.clip:
            raise ckpt_lib.CheckpointError(
                f"{what} was trained with CLIP {state.get('clip')} at {state.get('image_size')} px, "
                f"this run uses {self.args.clip} at {self.image_size} px")

    def load_state_dict(self, state: dict, path: str) -> None:
        # A field added to VariantConfig after the checkpoint was written takes its default.
        defaults = {k: f.default for k, f in variants.VariantConfig.__dataclass_fields__.items()
                    if f.default is not dataclasses.MISSING}
        saved = {**defaults, **state.get("cfg", {})}
        if state.get("variant") != self.args.variant or saved != self.cfg.__dict__:
            diff = {k: (saved.get(k), v) for k, v in self.cfg.__dict__.items() if saved.get(k) != v}
            flags = _flags_for({k: old for k, (old, _) in diff.items()})
            raise ckpt_lib.CheckpointError(
                f"checkpoint {path} is from variant {state.get('variant')!r} with a different "
                f"configuration than this run (--variant {self.args.variant}); differing fields "
                f"(checkpoint, now): {diff}" + (f"; resume it with {flags}" if flags else ""))
        self._check_same_clip(state, f"checkpoint {path}")
        self.pair.G.load_state_dict(state["G"])
        self.pair.D.load_state_dict(state["D"])
        if self.g_ema is not None:
            self.g_ema.load_state_dict(state.get("G_ema") or state["G"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.images_seen = state["step"], state["images_seen"]
        if state.get("d_steps") is not None and hasattr(self.pair, "d_steps"):
            self.pair.d_steps = state["d_steps"]
        pos = state["data_position"]
        if state.get("world_size", 1) == self.dist.world_size:
            self.loader.load_state_dict(pos)
            ckpt_lib.set_rng_state(state["rng"])
        else:
            # Another world size shards the data differently, so the exact order and random streams
            # cannot continue: start the next epoch, with seeds re-derived from the step.
            self.loader.set_epoch(int(pos["epoch"]) + 1, 0)
            torch.manual_seed(self.args.seed + 1000003 * self.step + self.dist.rank)

    def save(self) -> str | None:
        dist_lib.check_in_sync([self.pair.G, self.pair.D], self.dist)
        if not self.is_main:
            return None
        bad = [n for n, p in list(self.pair.G.named_parameters()) + list(self.pair.D.named_parameters())
               if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"refusing to checkpoint step {self.step}: non-finite parameters ({bad[:3]}...); "
                f"the last good checkpoint in {self.out} is intact")
        self._last_ckpt = ckpt_lib.save(self.out, self.state_dict(), self.step, keep=self.args.keep_ckpts)
        self._last_ckpt_step = self.step
        return self._last_ckpt

    # -- the loop ---------------------------------------------------------------------------------
    def _batches(self):
        """Endless (images, s, caption indices) stream; the loader tracks (epoch, batch) for an exact resume."""
        while True:
            for images, idx in self.loader:
                yield images.to(self.device, non_blocking=True), gather_rows(self.text_emb, idx, self.device), idx

    def _mismatched(self, s: torch.Tensor, idx: torch.Tensor, call: int) -> torch.Tensor | None:
        """D's mismatched texts with ``--edit-negatives P``: per sample, with probability P an edit
        negative of its caption (scadfast/data/negatives.py), else GALIP's ``roll(s, 1)``. Drawn from
        a generator seeded by (seed, step, D call, rank), so a resumed run draws the same. None
        without edit negatives (the pair rolls)."""
        if self.negatives is None:
            return None
        gen = torch.Generator().manual_seed(
            ((self.args.seed * 1_000_003 + self.step) * 31 + call) * 4099 + self.dist.rank)
        neg = self.negatives.sample(idx, gen)
        use = (torch.rand(neg.shape[0], generator=gen) < self.cfg.edit_negatives) & (neg >= 0)
        s_edit = gather_rows(self.text_emb, neg.clamp(min=0), self.device)
        return torch.where(use.to(self.device)[:, None], s_edit.to(s.dtype), torch.roll(s, 1, dims=0))

    def _opt_step(self, loss, opt, params, clip: float = 0.0):
        """One optimiser step on ``loss``; with ``clip`` > 0 the (all-reduced, unscaled) gradient is
        clipped to that total norm first and its norm before clipping is returned (else None)."""
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        dist_lib.allreduce_grads(params, self.dist)
        norm = None
        if clip > 0:
            self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, clip).detach()
        self.scaler.step(opt)
        self.scaler.update()
        return norm

    def train_step(self, batches):
        """``n_critic`` D steps, then one G step on the last D step's fakes (generated once, with G's
        graph: GALIP's loop), then the EMA update."""
        cfg, impl, pair = self.cfg, self.args.impl, self.pair
        stats = {}
        for i in range(cfg.n_critic):
            real, s, idx = next(batches)
            z = torch.randn(real.shape[0], cfg.z_dim, device=self.device)
            s_mis = self._mismatched(s, idx, i)
            extra = {} if s_mis is None else {"s_mis": s_mis}
            with self._autocast():
                fake = pair.make_fake(z, s, impl=impl) if i == cfg.n_critic - 1 else None
                d_loss, d_stats = pair.d_loss(real, s, z, impl=impl, fake=fake, **extra)
            d_norm = self._opt_step(d_loss, self.opt_d, list(pair.D.parameters()), cfg.d_grad_clip)
            if d_norm is not None:
                d_stats = {**d_stats, "grad_norm": d_norm}
                self._d_clipped += d_norm > cfg.d_grad_clip  # on device: no host sync
            self.images_seen += real.shape[0] * self.dist.world_size
        with self._autocast():
            g_loss, g_stats = pair.g_loss(s, z, impl=impl, fake=fake)
        self._opt_step(g_loss, self.opt_g, list(pair.G.parameters()))
        if self.g_ema is not None:
            self._update_ema(real.shape[0] * self.dist.world_size)
        stats.update({"d_loss": d_loss.detach(), "g_loss": g_loss.detach()})
        stats.update({f"d/{k}": v for k, v in d_stats.items()})
        stats.update({f"g/{k}": v for k, v in g_stats.items()})
        return stats

    @torch.no_grad()
    def _update_ema(self, batch: int) -> None:
        """``ema ← β·ema + (1 − β)·G`` with ``β = 0.5^(batch / half-life)``; the half-life is
        ``ema_kimg`` thousand images, at most ``ema_rampup`` × the images seen so far."""
        half = self.args.ema_kimg * 1000.0
        if self.args.ema_rampup > 0:
            half = min(half, self.images_seen * self.args.ema_rampup)
        beta = 0.5 ** (batch / max(half, 1e-8))
        ema_p, p = list(self.g_ema.parameters()), list(self.pair.G.parameters())
        torch._foreach_lerp_(ema_p, p, 1.0 - beta)
        for be, b in zip(self.g_ema.buffers(), self.pair.G.buffers()):
            be.copy_(b)

    def generate(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Images from the EMA generator when there is one (else G), under the run's autocast."""
        G = self.pair.G
        with self._autocast():
            if self.g_ema is None:
                return self.pair.generate(z, s)
            self.pair.G = self.g_ema  # the pair's own generate (MS-CLIP-GAN conditions inside it)
            try:
                return self.pair.generate(z, s)
            finally:
                self.pair.G = G

    @torch.no_grad()
    def snapshot(self, progress: Progress) -> dict | None:
        """Score the (EMA) generator (``--eval-metrics``); append to curves.jsonl, TensorBoard."""
        from .metrics.curves import append_jsonl

        if self.evaluator is None:
            return None
        rec = {"step": self.step, "images_seen": self.images_seen, **self.evaluator(self.generate)}
        append_jsonl(os.path.join(self.out, "curves.jsonl"), rec)
        progress.metrics(self.step, rec)
        return rec

    def plot_curves(self) -> str | None:
        from .metrics.curves import plot_curves, read_jsonl

        path = os.path.join(self.out, "curves.jsonl")
        if self.evaluator is None or not os.path.isfile(path):
            return None
        what = ("held-out shapes prompts" if self.args.eval_metrics == ["shapes"]
                else f"{','.join(self.args.eval_metrics)}" + (f" vs {self.args.eval_ref}" if self.args.eval_ref else ""))
        return plot_curves({self.args.variant: read_jsonl(path)}, os.path.join(self.out, "curves.png"),
                           title=f"{self.args.variant}: {what} ({self.out})")

    @torch.no_grad()
    def write_samples(self, progress: Progress) -> str | None:
        if not self.is_main or self.sample_z.shape[0] == 0:  # --sample-prompts 0 / --sample-noise 0
            return None
        from .metrics.curves import isolated_rng

        imgs = []
        with isolated_rng(self.device, self.args.seed):  # MS-CLIP-GAN draws CA noise inside generate
            for i in range(0, self.sample_z.shape[0], 64):
                imgs.append(self.generate(self.sample_z[i:i + 64], self.sample_s[i:i + 64]).float())
        imgs = torch.cat(imgs)
        path = save_grid(imgs, os.path.join(self.out, "samples", f"step-{self.step:08d}.png"), nrow=self.args.sample_noise)
        save_grid(imgs, os.path.join(self.out, "samples", "latest.png"), nrow=self.args.sample_noise)
        progress.image("samples", make_grid(imgs, self.args.sample_noise), self.step)
        return path

    def request_stop(self, signum, frame):
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final checkpoint
        self._stop_requested = True
        self.stop_signal = signum
        if self.is_main:
            print(f"[scadfast] {signal.Signals(signum).name}: finishing the current step, then "
                  f"checkpointing and stopping" + (" (Ctrl-C again to abort without it)"
                                                   if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)

    # -- run directory, resume --------------------------------------------------------------------
    def _open_run_dir(self) -> None:
        """Main rank: create and lock the run directory, clear temp files a killed save left."""
        if not self.is_main:
            return
        self._lock = open_run_dir(self.out)

    def _close_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def init_from(self, path: str) -> None:
        """Copy G's, D's and the EMA G's weights from another run's checkpoint (``--init-from``);
        optimisers, step, data position and random streams stay those of a new run."""
        state = ckpt_lib.load(path, map_location=self.device)
        self._check_same_clip(state, f"--init-from {path}")
        nets = [("G", self.pair.G), ("D", self.pair.D)]
        if self.g_ema is not None:
            nets.append(("G_ema" if state.get("G_ema") is not None else "G", self.g_ema))
        for key, net in nets:
            try:
                net.load_state_dict(state[key])
            except (KeyError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ckpt_lib.CheckpointError(
                    f"--init-from {path}: its {key} does not fit --variant {self.args.variant} with these "
                    f"widths ({first[:300]})") from None

    def dry_run(self) -> dict:
        """``--dry-run``: one training step on the real batch stream; returns (and prints) its time and
        the peak memory (CUDA max allocated on a GPU, the process's peak RSS on a CPU). Writes nothing."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        stats = self.train_step(self._batches())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, what = torch.cuda.max_memory_allocated(self.device) / 2 ** 20, "CUDA max allocated"
        else:
            import resource

            peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"
        out = {"step_s": time.perf_counter() - t0, "peak_mib": peak, "peak_kind": what,
               "losses": {k: float(v) for k, v in stats.items()},
               "params_g": sum(p.numel() for p in self.pair.G.parameters()),
               "params_d": sum(p.numel() for p in self.pair.D.parameters())}
        if self.is_main:
            print(f"[scadfast] dry run: {self.args.variant} on {self.device} | one step of {self.args.batch_size} "
                  f"images in {out['step_s']:.2f} s | {what} {peak:.0f} MiB | G {out['params_g'] / 1e6:.2f} M, "
                  f"D {out['params_d'] / 1e6:.2f} M parameters | "
                  + " ".join(f"{k}={v:.4g}" for k, v in out["losses"].items() if k in ("d_loss", "g_loss")),
                  file=sys.stderr, flush=True)
        return out

    def _resume(self) -> str:
        """Load the newest checkpoint of ``--out``; a damaged ``ckpt.pt`` falls back to the newest
        intact numbered one (saying so). Returns the path resumed from."""
        path = ckpt_lib.latest(self.out)
        if path is None:
            raise SystemExit(f"error: --resume: no checkpoint in {self.out}")
        try:
            state = ckpt_lib.load(path, map_location=self.device)
        except ckpt_lib.CheckpointError as e:
            alt, state = ckpt_lib.newest_intact(self.out, map_location=self.device, exclude=(path,))
            if alt is None:
                raise ckpt_lib.CheckpointError(
                    f"{e}; no intact numbered checkpoint (ckpt-XXXXXXXX.pt) in {self.out} to fall back to") from None
            if self.is_main:
                print(f"[scadfast] warning: {e}; resuming from {alt} (step {state.get('step')}), the newest "
                      f"intact checkpoint", file=sys.stderr, flush=True)
            path = alt
        try:
            self.load_state_dict(state, path)
        except ValueError as e:  # the data loader's order-defining settings differ
            raise ckpt_lib.CheckpointError(
                f"cannot resume from {path}: {e} (resume with the --batch-size, --seed and --data of the run)"
            ) from None
        return path

    def _write_config(self) -> None:
        a = self.args
        with open(os.path.join(self.out, "config.json"), "w") as f:
            json.dump({**{k: v for k, v in vars(a).items() if k != "cfg"}, "cfg": self.cfg.__dict__,
                       "device": str(self.device), "precision": self.precision,
                       "compile": self.compile, "world_size": self.dist.world_size}, f, indent=2, default=str)

    # -- step boundary ----------------------------------------------------------------------------
    def _optional(self, what: str, fn, *args):
        """Run a step-boundary extra (samples, TensorBoard, evaluation) that must not end the run:
        a failure prints one warning line and training continues."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - anything but the checkpoint may fail here
            if self.is_main:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(f"[scadfast] warning: {what} failed at step {self.step} ({type(e).__name__}: {msg[:300]}); "
                      f"training continues", file=sys.stderr, flush=True)
            return None

    def _check_finite(self, vals: dict) -> None:
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"non-finite loss at step {self.step}: {', '.join(bad)} = "
                f"{[vals[k] for k in bad]}; stopping. The last good checkpoint in {self.out} is "
                f"intact (resume with --resume, perhaps with a lower learning rate or --precision fp32)")

    def _step_boundary(self, stats, progress: Progress) -> dict | None:
        """After a step: check losses, checkpoint (if due) FIRST, then the optional extras.

        Returns the synced loss values when they were computed this step (log or checkpoint step)."""
        a = self.args
        log_now = self.step % a.log_every == 0 or self.step == a.steps
        ckpt_now = self.step % a.ckpt_every == 0 or self.step == a.steps or self._stop_requested
        vals = None
        if log_now and self.cfg.d_grad_clip > 0:  # how many D steps the clip bound since the last line
            stats = {**stats, "d/clipped_steps": self._d_clipped.clone()}
            self._d_clipped.zero_()
        if log_now or ckpt_now:  # host sync only here
            stats = dist_lib.all_mean(stats, self.dist)
            vals = {k: float(v) for k, v in stats.items()}
            self._check_finite(vals)
        if ckpt_now:
            self.save()
        if log_now:
            self._optional("progress/TensorBoard logging", progress.log, self.step, self.images_seen, vals)
        if a.eval_metrics and (self.step % a.eval_every == 0 or self.step == a.steps):
            self._optional("learning-curve snapshot", self.snapshot, progress)
        if self.step % a.sample_every == 0 or self.step == a.steps:
            self._optional("sample grid", self.write_samples, progress)
        return vals

    def _checkpoint_before_data_stop(self, images_seen_at_step_start: int) -> str:
        """A data error interrupted a step: checkpoint the last whole step (if this step had not
        updated anything yet) and say where the run can be resumed from."""
        if self.images_seen == images_seen_at_step_start and self.step > 0 and self._last_ckpt_step != self.step:
            self.save()
        if self._last_ckpt_step is not None:
            return f"checkpoint of step {self._last_ckpt_step} written to {self.out}; fix the file(s) and --resume"
        last = ckpt_lib.latest(self.out)
        return f"the last checkpoint is {last}" if last else "no checkpoint was written"

    def _existing(self, *parts) -> str | None:
        p = os.path.join(self.out, *parts)
        return p if os.path.exists(p) else None

    def run(self) -> dict:
        self._open_run_dir()
        try:
            return self._run()
        finally:
            self._close_run_dir()

    def _run(self) -> dict:
        resumed_from = self._begin()
        progress = Progress(self.args.steps, self.step, os.path.join(self.out, "tb"), enabled=self.is_main,
                            start_images=self.images_seen)
        self._print_banner(resumed_from)
        t0, start_images = time.perf_counter(), self.images_seen
        try:
            with self._stop_signals():
                last = self._loop(progress)
        finally:
            self._optional("closing TensorBoard", progress.close)
        wall = time.perf_counter() - t0
        summary = self._summary(progress, last, wall, start_images)
        if self.is_main:
            self._write_summary(summary, last, wall)
        return summary

    def _begin(self) -> str | None:
        """Resume from the newest checkpoint of ``--out`` (``--resume``) or refuse a run directory that
        already has checkpoints; write ``config.json``. Returns the checkpoint resumed from."""
        resumed_from = None
        if self.args.resume:
            resumed_from = self._resume()
        elif self.is_main and ckpt_lib.latest(self.out):
            raise SystemExit(f"error: {self.out} already has checkpoints; pass --resume to continue it "
                             f"or choose another --out")
        if resumed_from is None and self.args.init_from:
            self.init_from(self.args.init_from)
        if self.is_main:
            self._write_config()
        return resumed_from

    def _print_banner(self, resumed_from: str | None) -> None:
        if not self.is_main:
            return
        a = self.args
        print(f"[scadfast] {a.variant} on {self.device} ×{self.dist.world_size} | {self.precision} | "
              f"compile={self.compile} | impl={a.impl} | image {self.image_size}px | batch {a.batch_size}"
              f"/process | data {a.data} ({len(self.loader.captions)} captions) | CLIP {a.clip} | "
              f"out {self.out}" + (f" | resumed from {resumed_from} at step {self.step}" if resumed_from else ""),
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training, SIGTERM (a scheduler's pre-emption, torchrun's shutdown) and SIGINT (Ctrl-C)
        ask the loop to finish the step, checkpoint and stop; ``main()`` then exits with 128 + the
        signal number. The previous handlers come back afterwards."""
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _loop(self, progress: Progress) -> dict:
        """Train until ``--steps`` or a stop signal (checkpointing before stopping); returns the loss
        values last synced at a step boundary."""
        from .data.dali import DataDecodeError

        batches, last = self._batches(), {}
        if self.evaluator is not None and self.step == 0:
            self._optional("learning-curve snapshot", self.snapshot, progress)  # the curve starts at initialisation
        while self.step < self.args.steps:
            seen = self.images_seen
            try:
                stats = self.train_step(batches)
            except DataDecodeError as e:
                raise DataError(f"{e}; {self._checkpoint_before_data_stop(seen)}") from None
            self.step += 1
            vals = self._step_boundary(stats, progress)
            if vals is not None:
                last = vals
            if self._stop_requested:
                if self._last_ckpt_step != self.step:  # the signal came after this step's boundary
                    self.save()
                if self.is_main:
                    print(f"[scadfast] stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; "
                          f"checkpoint {self._last_ckpt} written", file=sys.stderr, flush=True)
                break
        return last

    def _summary(self, progress: Progress, last: dict, wall: float, start_images: int) -> dict:
        """What ``summary.json`` holds: steps, speed, where the checkpoint and samples are, the last
        losses and (with learning curves) the last snapshot and the curves plot."""
        curves_png = self._optional("curves plot", self.plot_curves) if self.is_main else None
        summary = {
            "variant": self.args.variant, "steps": self.step, "images_seen": self.images_seen,
            "wall_s": round(wall, 2), "images_per_s": round((self.images_seen - start_images) / max(wall, 1e-9), 2),
            "device": str(self.device), "world_size": self.dist.world_size, "threads": torch.get_num_threads(),
            "run_dir": self.out,
            "checkpoint": self._existing(ckpt_lib.LATEST), "samples": self._existing("samples", "latest.png"),
            **{k: round(v, 4) for k, v in last.items()},
        }
        if progress.latest_metrics:
            summary["eval"] = progress.latest_metrics
            summary["curves"] = curves_png
        if self.stop_signal is not None:
            summary["stopped_by"] = signal.Signals(self.stop_signal).name
        return summary

    def _write_summary(self, summary: dict, last: dict, wall: float) -> None:
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        ckpt, samples = summary["checkpoint"], summary["samples"]
        losses = (f" | d_loss={last['d_loss']:.4g} g_loss={last['g_loss']:.4g}"
                  if "d_loss" in last and "g_loss" in last else "")
        print(f"[scadfast] done: {summary['variant']} {self.step} steps in {format_seconds(wall)} "
              f"({summary['images_per_s']} img/s){losses}" + (f" | samples {samples}" if samples else "")
              + (f" | checkpoint {ckpt}" if ckpt else " | no checkpoint written"), file=sys.stderr, flush=True)


def open_run_dir(out: str) -> runlock.RunLock:
    """Create ``out`` if needed, take its exclusive lock and remove stale temp files; clear errors
    (one line, naming ``--out``) for a path that is a file, unwritable or already in use."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file, not a run directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot create the run directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {out}: the run directory is not writable")
    try:
        lock = runlock.acquire(out)
    except runlock.RunDirLocked as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write in the run directory ({e.strerror or e})") from None
    removed = ckpt_lib.remove_stale_temp(out, os.path.join(out, "samples"))
    if removed:
        print(f"[scadfast] removed {len(removed)} stale temporary file(s) of an interrupted save: "
              f"{', '.join(os.path.basename(r) for r in removed[:3])}", file=sys.stderr, flush=True)
    return lock


def _remove_if_unused(out: str) -> None:
    """Remove a run directory this process created if setup failed before anything was written."""
    try:
        if set(os.listdir(out)) <= {runlock.LOCK_NAME}:
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
            os.rmdir(out)
    except OSError:
        pass


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    args = parse_args(argv)
    lock = trainer = None
    created = bool(args.out) and not os.path.exists(args.out)
    try:
        if args.dry_run:
            trainer = Trainer(args)
            trainer.dry_run()
            return 0
        if _is_main_process() and args.out:
            lock = open_run_dir(args.out)  # before the expensive setup: a busy or bad --out fails at once
        trainer = Trainer(args)
        trainer.run()
    except (ckpt_lib.CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[scadfast] interrupted" + (f"; the last checkpoint in {trainer.out} is intact" if trainer else ""),
              file=sys.stderr)
        return 128 + int(signal.SIGINT)
    finally:
        if lock is not None:
            lock.release()
            if created:
                _remove_if_unused(args.out)
        dist_lib.shutdown()
    if trainer.stop_signal is not None:
        return 128 + int(trainer.stop_signal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
