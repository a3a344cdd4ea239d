"""The embedded "shapes" data set: procedurally generated, captioned, deterministic from a seed.

Each image shows one coloured shape on a background. Every image has five ground-truth
attributes, drawn **independently and uniformly** from :data:`ATTRIBUTES`:

============  ===============================================================================
attribute     values
============  ===============================================================================
shape         circle, square, triangle, star, hexagon, cross
color         red, orange, yellow, green, cyan, blue, purple, pink
size          small, medium, large
position      the 3x3 grid of named regions: top left, top, top right, left, center, right,
              bottom left, bottom, bottom right
background    black, white, gray, gradient, noise
============  ===============================================================================

The caption of an image always names the shape; each other attribute is *mentioned* independently
with probability :data:`MENTION_PROB` (color 0.75, size 0.5, position 0.5, background 0.25), and
the mention decisions are drawn independently of the attribute values. Captions follow one
grammar (see :func:`format_caption`), e.g. ``"a small red circle"``, ``"a blue square at the top
left"``, ``"an orange star on a noise background"``.

**The per-prompt distribution is known exactly.** Because the values are independent and uniform
and the mention mask is independent of the values, conditioning on a caption fixes the mentioned
attributes and leaves every unmentioned attribute uniform over its full vocabulary, independently
of the others. :func:`free_attributes` returns that distribution for any caption and
:func:`sample_prompt_attrs` samples from it; the shapes metrics (docs/design.md §9) compare generated images
against it.

Nuisance variation that is *not* an attribute (so a caption can never pin it down): the shape's
centre is jittered by up to ±0.03 of the image side around its region centre (regions centres are
at 0.2, 0.5 and 0.8 of the side), its radius by ±8 %, each colour channel by ±12 levels, and the
background as described in :func:`render`. Shapes never leave the image.

Generation is deterministic: image ``i`` of a set with seed ``s`` uses its own generator
``numpy.random.default_rng([s, i])``, so the first ``k`` images of any set with the same seed and
image size are identical whatever ``n`` is, and the JPEG bytes are reproducible for a given Pillow/
libjpeg build.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_NAMES",
    "MENTION_PROB",
    "SHAPES_VERSION",
    "DEFAULT_SET_SIZE",
    "GAN_TRAIN_SET_SIZE",
    "PRETRAIN_SET_SIZE",
    "PromptTemplate",
    "caption_templates",
    "default_cache_dir",
    "format_caption",
    "free_attributes",
    "iter_prompts",
    "load_shapes_index",
    "make_shapes_dataset",
    "parse_caption",
    "prompts_with_free_attributes",
    "render",
    "sample_attrs",
    "sample_prompt_attrs",
    "sample_prompts",
]

#: Bump when rendering or caption generation changes; it is part of the data set's directory name
#: so an old cache is never reused for new code.
SHAPES_VERSION = 1

# Shapes-set sizes, one per purpose (why they differ):
#: A set asked for without a size (:func:`make_shapes_dataset`, a ``shapes:k=v`` data spec without
#: ``n=``): a general-purpose size that no shipped file or measured run depends on. So
#: ``--data shapes:seed=1`` trains on this many images while plain ``--data shapes`` uses the next one.
DEFAULT_SET_SIZE = 20_000
#: The GAN training set of the embedded default run (``scadfast.train --shapes-n``; ``--data shapes``
#: with no options). It is built on the user's first run, on a CPU, and its captions are embedded
#: once; 600 steps of 16 images (9,600 draws) pass over it about five times, whereas most of a
#: 20,000-image set would be built and embedded and never drawn. The README's measured default run
#: used this size: changing it changes that run.
GAN_TRAIN_SET_SIZE = 2_000
#: The sets the embedded CLIP (``scadfast.pretrain_clip``) and the attribute classifier
#: (``scadfast.shapes_classifier``) are trained on, on a GPU. Contrastive training and a five-head
#: classifier need many distinct attribute combinations (6·9·4·10·6 = 12,960 distinct captions); the
#: shipped weights of both were trained with it, and the classifier is looked up by this size.
PRETRAIN_SET_SIZE = 16_000

ATTRIBUTES: Dict[str, List[str]] = {
    "shape": ["circle", "square", "triangle", "star", "hexagon", "cross"],
    "color": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"],
    "size": ["small", "medium", "large"],
    "position": [
        "top left", "top", "top right",
        "left", "center", "right",
        "bottom left", "bottom", "bottom right",
    ],
    "background": ["black", "white", "gray", "gradient", "noise"],
}
#: Attribute names in the order they are sampled.
ATTRIBUTE_NAMES: Tuple[str, ...] = ("shape", "color", "size", "position", "background")

#: Probability that a caption mentions each attribute (the shape always).
MENTION_PROB: Dict[str, float] = {
    "shape": 1.0,
    "color": 0.75,
    "size": 0.5,
    "position": 0.5,
    "background": 0.25,
}

_OPTIONAL = tuple(a for a in ATTRIBUTE_NAMES if MENTION_PROB[a] < 1.0)

_COLOR_RGB = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}
_SIZE_RADIUS = {"small": 0.06, "medium": 0.10, "large": 0.14}  # fraction of the image side
_REGION_CENTRE = (0.2, 0.5, 0.8)
_POS_JITTER = 0.03
_RADIUS_JITTER = 0.08
_COLOR_JITTER = 12

_POSITION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_PHRASE_POSITION = {v: k for k, v in _POSITION_PHRASE.items()}


def default_cache_dir() -> Path:
    """``$SCADFAST_CACHE`` if set, else ``~/.cache/scadfast``."""
    env = os.environ.get("SCADFAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scadfast"


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _check_attrs(attrs: Mapping[str, str], names: Sequence[str], what: str) -> None:
    for name in names:
        if name not in attrs:
            raise ValueError(f"{what}: missing attribute {name!r} (have {sorted(attrs)})")
        if attrs[name] not in ATTRIBUTES[name]:
            raise ValueError(
                f"{what}: {name}={attrs[name]!r} is not one of {ATTRIBUTES[name]}"
            )


def format_caption(attrs: Mapping[str, str], mentioned: Sequence[str]) -> str:
    """The caption naming exactly the attributes in ``mentioned`` (which must include ``shape``).

    Grammar: ``a|an [SIZE] [COLOR] SHAPE [POSITION PHRASE] [on a BACKGROUND background]`` where the
    position phrase is "at the top left", "at the top", "on the left", "in the center", ... and the
    article is "an" before a vowel.
    """
    mentioned = set(mentioned)
    unknown = mentioned - set(ATTRIBUTE_NAMES)
    if unknown:
        raise ValueError(f"format_caption: unknown attribute(s) {sorted(unknown)}")
    if "shape" not in mentioned:
        raise ValueError("format_caption: every caption names the shape; 'shape' must be mentioned")
    _check_attrs(attrs, sorted(mentioned), "format_caption")
    words = []
    if "size" in mentioned:
        words.append(attrs["size"])
    if "color" in mentioned:
        words.append(attrs["color"])
    words.append(attrs["shape"])
    article = "an" if words[0][0] in "aeiou" else "a"
    caption = " ".join([article] + words)
    if "position" in mentioned:
        caption += " " + _POSITION_PHRASE[attrs["position"]]
    if "background" in mentioned:
        caption += f" on a {attrs['background']} background"
    return caption


def _alt(values: Sequence[str]) -> str:
    # Longest first so "top left" wins over "top".
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


_CAPTION_RE = re.compile(
    rf"^an? (?:(?P<size>{_alt(ATTRIBUTES['size'])}) )?(?:(?P<color>{_alt(ATTRIBUTES['color'])}) )?"
    rf"(?P<shape>{_alt(ATTRIBUTES['shape'])})"
    rf"(?: (?P<position>{_alt(list(_PHRASE_POSITION))}))?"
    rf"(?: on an? (?P<background>{_alt(ATTRIBUTES['background'])}) background)?$"
)


def parse_caption(caption: str) -> Dict[str, str]:
    """The attributes a shapes caption specifies, e.g. ``{"shape": "circle", "color": "red"}``.

    Inverse of :func:`format_caption`; case, surrounding white space, repeated spaces and a final
    full stop are ignored. Raises ``ValueError`` naming the caption if it is not in the grammar.
    """
    if not isinstance(caption, str):
        raise TypeError(f"parse_caption: caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.strip().lower().rstrip(".").split())
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(f"parse_caption: {caption!r} is not a shapes caption")
    out = {k: v for k, v in m.groupdict().items() if v is not None}
    if "position" in out:
        out["position"] = _PHRASE_POSITION[out["position"]]
    article = text.split(" ", 1)[0]
    first = out.get("size") or out.get("color") or out["shape"]
    if article != ("an" if first[0] in "aeiou" else "a"):
        raise ValueError(f"parse_caption: {caption!r} has the wrong article {article!r}")
    return {k: out[k] for k in ATTRIBUTE_NAMES if k in out}


def free_attributes(caption: str) -> Dict[str, List[str]]:
    """The known conditional distribution of a caption's unmentioned attributes.

    Returns ``{attribute: values}`` for every attribute the caption leaves out; under the data
    distribution each is uniform over ``values`` and independent of the others.
    """
    spec = parse_caption(caption)
    return {a: list(ATTRIBUTES[a]) for a in ATTRIBUTE_NAMES if a not in spec}


class PromptTemplate(NamedTuple):
    """One caption template: which attributes it mentions, which are free, and how often it occurs."""

    mentioned: Tuple[str, ...]
    free: Tuple[str, ...]
    probability: float
    num_prompts: int


def caption_templates() -> List[PromptTemplate]:
    """All 16 caption templates (subsets of the optional attributes), with their probabilities."""
    out = []
    for mask in itertools.product((False, True), repeat=len(_OPTIONAL)):
        mentioned = ("shape",) + tuple(a for a, m in zip(_OPTIONAL, mask) if m)
        mentioned = tuple(a for a in ATTRIBUTE_NAMES if a in mentioned)
        free = tuple(a for a in ATTRIBUTE_NAMES if a not in mentioned)
        p = 1.0
        for a, m in zip(_OPTIONAL, mask):
            p *= MENTION_PROB[a] if m else 1.0 - MENTION_PROB[a]
        n = int(np.prod([len(ATTRIBUTES[a]) for a in mentioned]))
        out.append(PromptTemplate(mentioned, free, p, n))
    return out


def iter_prompts(mentioned: Sequence[str]) -> Iterator[Tuple[str, Dict[str, str]]]:
    """Every distinct caption of one template, as ``(caption, specified attributes)``."""
    mentioned = [a for a in ATTRIBUTE_NAMES if a in set(mentioned)]
    for values in itertools.product(*(ATTRIBUTES[a] for a in mentioned)):
        spec = dict(zip(mentioned, values))
        yield format_caption(spec, mentioned), spec


def prompts_with_free_attributes(
    templates: Optional[Sequence[Sequence[str]]] = None,
) -> List[Dict[str, object]]:
    """Every distinct prompt (optionally only of some templates), with its free attributes.

    Each entry is ``{"caption", "specified": {attr: value}, "free": [attr, ...],
    "probability": P(caption)}``; the free attributes are uniform (see :func:`free_attributes`).
    There are 12 960 prompts in all.
    """
    if templates is None:
        templates = [t.mentioned for t in caption_templates()]
    probs = {t.mentioned: t.probability / t.num_prompts for t in caption_templates()}
    out = []
    for mentioned in templates:
        key = tuple(a for a in ATTRIBUTE_NAMES if a in set(mentioned))
        if key not in probs:
            raise ValueError(f"prompts_with_free_attributes: {list(mentioned)} is not a template "
                             "(it must include 'shape' and only attribute names)")
        free = [a for a in ATTRIBUTE_NAMES if a not in key]
        for caption, spec in iter_prompts(key):
            out.append({"caption": caption, "specified": spec, "free": free,
                        "probability": probs[key]})
    return out


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def sample_attrs(rng) -> Tuple[Dict[str, str], List[str]]:
    """Draw one image's ground truth: ``(attrs, mentioned)``, exactly as the data set does.

    Attribute values first (uniform, in :data:`ATTRIBUTE_NAMES` order), then one mention coin per
    optional attribute (in the same order).
    """
    rng = _as_rng(rng)
    attrs = {a: ATTRIBUTES[a][int(rng.integers(len(ATTRIBUTES[a])))] for a in ATTRIBUTE_NAMES}
    coins = rng.random(len(_OPTIONAL))
    mentioned = ["shape"] + [a for a, c in zip(_OPTIONAL, coins) if c < MENTION_PROB[a]]
    mentioned = [a for a in ATTRIBUTE_NAMES if a in mentioned]
    return attrs, mentioned


def sample_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` captions drawn from the data set's caption distribution."""
    rng = np.random.default_rng(seed)
    return [format_caption(*sample_attrs(rng)) for _ in range(n)]


def sample_prompt_attrs(caption: str, n: int, rng=None) -> List[Dict[str, str]]:
    """``n`` full attribute sets drawn from the true conditional distribution of ``caption``."""
    rng = _as_rng(rng)
    spec = parse_caption(caption)
    out = []
    for _ in range(n):
        attrs = dict(spec)
        for a in ATTRIBUTE_NAMES:
            if a not in spec:
                attrs[a] = ATTRIBUTES[a][int(rng.integers(len(ATTRIBUTES[a])))]
        out.append({a: attrs[a] for a in ATTRIBUTE_NAMES})
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _regular_polygon(n: int, radius: float, phase: float) -> np.ndarray:
    ang = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(ang), -radius * np.sin(ang)], axis=1)  # y grows downwards


def _star(radius: float) -> np.ndarray:
    ang = np.pi / 2 + np.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return np.stack([r * np.cos(ang), -r * np.sin(ang)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the points."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, 1), np.roll(py, 1)
    for x0, y0, x1, y1 in zip(px, py, qx, qy):
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xint)
    return inside


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with (circum)radius ``r`` at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.78 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "cross":
        arm = 0.32 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "triangle":
        # Centroid-centred equilateral triangle, nudged down so it looks centred in its region.
        return _inside_polygon(dx, dy - 0.15 * r, _regular_polygon(3, 1.1 * r, np.pi / 2))
    if shape == "hexagon":
        return _inside_polygon(dx, dy, _regular_polygon(6, r, 0.0))
    if shape == "star":
        return _inside_polygon(dx, dy + 0.05 * r, _star(1.1 * r))
    raise ValueError(f"render: unknown shape {shape!r}; expected one of {ATTRIBUTES['shape']}")


def _background(kind: str, size: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    def u(lo, hi, mid):
        return mid if rng is None else float(rng.uniform(lo, hi))

    if kind == "black":
        return np.full((size, size, 3), u(5, 30, 15), np.float32)
    if kind == "white":
        return np.full((size, size, 3), u(225, 250, 240), np.float32)
    if kind == "gray":
        return np.full((size, size, 3), u(105, 150, 128), np.float32)
    if kind == "gradient":
        a, b = u(20, 90, 40), u(165, 235, 215)
        theta = u(0.0, 2 * np.pi, 0.5 * np.pi)
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        proj = np.cos(theta) * t[None, :] + np.sin(theta) * t[:, None]
        proj = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        img = a + (b - a) * proj
        return np.repeat(img[:, :, None], 3, axis=2).astype(np.float32)
    if kind == "noise":
        g = rng if rng is not None else np.random.default_rng(0)
        coarse = g.uniform(50, 200, size=(5, 5)).astype(np.float32)
        low = np.asarray(
            Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR), np.float32
        )
        fine = g.normal(0.0, 10.0, size=(size, size)).astype(np.float32)
        return np.repeat((low + fine)[:, :, None], 3, axis=2)
    raise ValueError(f"render: unknown background {kind!r}; expected one of {ATTRIBUTES['background']}")


def render(
    attrs: Mapping[str, str],
    size: int = 64,
    rng: Union[np.random.Generator, int, None] = None,
    supersample: int = 4,
) -> np.ndarray:
    """Render one image; returns ``uint8`` array ``(size, size, 3)`` (RGB).

    ``attrs`` needs all five attributes. ``rng`` drives the nuisance jitter (shape centre, radius,
    colour, background levels/direction/noise); ``None`` renders the canonical image (no jitter,
    fixed background levels). The shape edge is antialiased by ``supersample``² samples per pixel.
    Backgrounds: ``black``/``white``/``gray`` are flat neutral levels, ``gradient`` a linear ramp
    between a dark and a light gray in a random direction, ``noise`` smooth gray value noise plus
    fine grain. Backgrounds are always neutral, so the shape's colour stays unambiguous.
    """
    _check_attrs(attrs, ATTRIBUTE_NAMES, "render")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"render: size must be an int >= 8, got {size!r}")
    if not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise ValueError(f"render: supersample must be a positive int, got {supersample!r}")
    g = None if rng is None else _as_rng(rng)

    def jit(scale):
        return 0.0 if g is None else float(g.uniform(-scale, scale))

    row, col = divmod(ATTRIBUTES["position"].index(attrs["position"]), 3)
    cx = _REGION_CENTRE[col] + jit(_POS_JITTER)
    cy = _REGION_CENTRE[row] + jit(_POS_JITTER)
    r = _SIZE_RADIUS[attrs["size"]] * (1.0 + jit(_RADIUS_JITTER))
    base = np.array(_COLOR_RGB[attrs["color"]], np.float32)
    color = np.clip(base + np.array([jit(_COLOR_JITTER) for _ in range(3)], np.float32), 0, 255)

    img = _background(attrs["background"], int(size), g)

    # Coverage of the shape on its bounding box only, by supersampling.
    x0 = max(int(np.floor((cx - 1.2 * r) * size)), 0)
    x1 = min(int(np.ceil((cx + 1.2 * r) * size)), size)
    y0 = max(int(np.floor((cy - 1.2 * r) * size)), 0)
    y1 = min(int(np.ceil((cy + 1.2 * r) * size)), size)
    ss = int(supersample)
    xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float64) + 0.5) / (size * ss) - cx
    ys = (np.arange(y0 * ss, y1 * ss, dtype=np.float64) + 0.5) / (size * ss) - cy
    mask = _shape_mask(attrs["shape"], xs[None, :], ys[:, None], r).astype(np.float32)
    cover = mask.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[:, :, None]
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch * (1.0 - cover) + color * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The data set on disk
# --------------------------------------------------------------------------------------------

CAPTIONS_FILE = "captions.jsonl"
META_FILE = "meta.json"


def _dataset_name(n: int, image_size: int, seed: int, jpeg_quality: int) -> str:
    return f"shapes-v{SHAPES_VERSION}-n{n}-{image_size}px-seed{seed}-q{jpeg_quality}"


def _meta(n: int, image_size: int, seed: int, jpeg_quality: int) -> Dict[str, object]:
    return {"kind": "shapes", "version": SHAPES_VERSION, "n": n, "image_size": image_size,
            "seed": seed, "jpeg_quality": jpeg_quality, "attributes": ATTRIBUTES,
            "mention_prob": MENTION_PROB}


def _is_complete(path: Path, meta: Mapping[str, object]) -> bool:
    try:
        with open(path / META_FILE) as f:
            have = json.load(f)
        if have != json.loads(json.dumps(meta)):
            return False
        with open(path / CAPTIONS_FILE) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return False
    if len(rows) != meta["n"]:
        return False
    return all((path / row["file"]).is_file() for row in rows)


def _build(tmp: Path, n: int, image_size: int, seed: int, jpeg_quality: int) -> None:
    (tmp / "images").mkdir(parents=True)
    width = max(6, len(str(n - 1)))
    with open(tmp / CAPTIONS_FILE, "w") as cap:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            attrs, mentioned = sample_attrs(rng)
            img = render(attrs, image_size, rng)
            rel = f"images/{i:0{width}d}.jpg"
            Image.fromarray(img).save(tmp / rel, format="JPEG", quality=jpeg_quality)
            row = {"file": rel, "caption": format_caption(attrs, mentioned), "attrs": attrs,
                   "mentioned": mentioned}
            cap.write(json.dumps(row) + "\n")
    with open(tmp / META_FILE, "w") as f:
        json.dump(_meta(n, image_size, seed, jpeg_quality), f, indent=1)


def make_shapes_dataset(
    root: Union[str, os.PathLike, None] = None,
    n: int = DEFAULT_SET_SIZE,
    image_size: int = 64,
    seed: int = 0,
    jpeg_quality: int = 95,
) -> Path:
    """Write (or reuse) a shapes data set under ``root``; returns its directory.

    The directory ``root/shapes-v{VERSION}-n{n}-{image_size}px-seed{seed}-q{jpeg_quality}``
    holds ``images/NNNNNN.jpg`` (real JPEG files), ``captions.jsonl`` — one JSON object per image,
    in index order: ``{"file": relative path, "caption": str, "attrs": {all five ground-truth
    attributes}, "mentioned": [attributes the caption names]}`` — and ``meta.json`` with the
    parameters (written last).

    Idempotent: a complete set with the same parameters (meta matches, ``n`` caption rows, every
    image file present) is reused as is; anything else at that path (a partial or stale set) is
    removed and rebuilt. The set is built in a temporary directory next to it and renamed into
    place, so a reader never sees a half-written set and concurrent builders do not clash.
    ``root`` defaults to ``default_cache_dir() / "data"``.
    """
    for name, v, lo in (("n", n, 1), ("image_size", image_size, 8), ("jpeg_quality", jpeg_quality, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"make_shapes_dataset: {name} must be an int >= {lo}, got {v!r}")
    if jpeg_quality > 100:
        raise ValueError(f"make_shapes_dataset: jpeg_quality must be <= 100, got {jpeg_quality}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_shapes_dataset: seed must be a non-negative int, got {seed!r}")
    n, image_size, seed, jpeg_quality = int(n), int(image_size), int(seed), int(jpeg_quality)
    root = Path(root).expanduser() if root is not None else default_cache_dir() / "data"
    root.mkdir(parents=True, exist_ok=True)
    path = root / _dataset_name(n, image_size, seed, jpeg_quality)
    meta = _meta(n, image_size, seed, jpeg_quality)
    if _is_complete(path, meta):
        return path
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=root))
    try:
        _build(tmp, n, image_size, seed, jpeg_quality)
        if path.exists() and not _is_complete(path, meta):
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            # Someone else renamed a complete set into place first: use theirs.
            if not _is_complete(path, meta):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_shapes_index(path: Union[str, os.PathLike]) -> List[Dict[str, object]]:
    """The rows of a shapes set's ``captions.jsonl`` (with ``file`` made absolute), in index order."""
    path = Path(path)
    cap = path / CAPTIONS_FILE
    if not cap.is_file():
        raise FileNotFoundError(f"shapes data set {str(path)!r}: caption file {CAPTIONS_FILE} is missing")
    rows = []
    with open(cap) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["file"] = str(path / row["file"])
                row["caption"], row["attrs"]  # noqa: B018 - presence check
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{cap}:{lineno}: malformed row ({e})") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"shapes data set {str(path)!r}: {CAPTIONS_FILE} has no rows")
    return rows
