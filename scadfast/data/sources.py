"""Index (image, caption) records from the supported data sources.

A *data spec* names a source (:func:`parse_data_spec`):

``shapes``                       the embedded shapes set, built on demand in the cache
                                 (:func:`scadfast.data.shapes.make_shapes_dataset`; seed 0,
                                 n = ``DEFAULT_SET_SIZE`` there — ``scadfast.train`` passes its
                                 ``--shapes-n`` —, rendered at the loader's image size)
``shapes:n=2000,size=64,seed=1`` the same with parameters (keys ``n``, ``size``, ``seed``,
                                 ``quality``, ``root``)
``shapes:PATH``                  an existing shapes set (a directory holding ``captions.jsonl``)
``coco:ROOT``                    COCO captions: ``ROOT/annotations/captions_<split>.json`` and the
                                 images in ``ROOT/<split>/``. With several annotation files the
                                 newest ``train`` split is used; name another one explicitly:
``coco:ANNOTATION.json``         images in ``<dir of annotations>/../<split>/`` (split from the name)
``coco:ANNOTATION.json,IMAGES``  explicit annotation file and image folder
``folder:PATH``                  every image under PATH (recursively) with a same-stem ``.txt``
                                 caption next to it
``wds:PATTERN``                  webdataset tar shards in img2dataset layout (members ``KEY.jpg``
                                 (or png/webp/...) + ``KEY.txt``); PATTERN may use brace ranges
                                 ``shard-{00000..00099}.tar``, brace lists ``{a,b}`` and globs
                                 (local files or a mounted file system; ``pipe:`` and URLs are
                                 refused). Each shard is read once: its index (DALI's ``wds2idx``
                                 format) and captions are cached on disk, keyed by path, size and
                                 modification time (:mod:`scadfast.data.wds_index`)

A record is one (image, caption) pair. COCO has about five captions per image: each pair is its
own record, so an image appears once per caption in an epoch.

Error policy (the same for every source):

* a missing path, an empty source (no images found), an unreadable/malformed caption or
  annotation file, and an image without a caption (folder: no ``KEY.txt``; webdataset: no
  ``KEY.txt`` member) raise, naming the file;
* a *corrupt or unreadable image* is skipped with a :class:`DataWarning` that names the files
  (the first few) and how many were dropped. With ``check_images="header"`` (default) indexing
  checks cheaply that each image is non-empty, starts with the signature of a format the DALI
  decoder reads (JPEG, PNG, BMP, TIFF, WebP, JPEG 2000, PNM) and, for JPEG and PNG, that it is not
  truncated (ends with the EOI marker / has an IEND chunk). ``check_images="decode"`` fully
  decodes every image with Pillow (slow; for auditing a new data set; ``train --check-images``);
  the files it verified are remembered in ``<cache>/verified-images.json`` (keyed by path, size
  and modification time), so the next indexing of the same files is fast. ``"none"`` trusts the
  data. Corruption that passes the chosen check surfaces later as a DALI decoding error, which the
  loader names and skips (:mod:`scadfast.data.dali`).
  If no readable image is left the indexing raises.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import shapes as _shapes
from .image_check import _HEAD, _TAIL, IMAGE_EXTENSIONS, _pil_decode_error, check_image_bytes

__all__ = [
    "DataSpec",
    "DataWarning",
    "IMAGE_EXTENSIONS",
    "RecordSet",
    "check_image_bytes",
    "expand_braces",
    "load_records",
    "parse_data_spec",
]

CHECK_MODES = ("header", "decode", "none")
SHAPES_DEFAULTS = {"n": _shapes.DEFAULT_SET_SIZE, "seed": 0, "quality": 95}


class DataWarning(UserWarning):
    """Records were skipped while indexing a data source (e.g. corrupt images)."""


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: ``kind`` in {shapes, coco, folder, wds}, a ``path`` and ``options``."""

    kind: str
    path: Optional[str] = None
    options: Dict[str, object] = field(default_factory=dict)
    images: Optional[str] = None  # coco: explicit image folder

    def __str__(self) -> str:
        if self.kind == "shapes" and self.path is None:
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            return "shapes" + (f":{opts}" if opts else "")
        extra = f",{self.images}" if self.images else ""
        return f"{self.kind}:{self.path}{extra}"


_SPEC_FORMS = ("shapes", "shapes:n=N,size=S,seed=K", "shapes:PATH", "coco:ROOT",
               "coco:ANNOTATION.json[,IMAGES]", "folder:PATH", "wds:PATTERN")


def parse_data_spec(spec: Union[str, DataSpec]) -> DataSpec:
    """Parse a data spec string (see the module docstring); a :class:`DataSpec` passes through."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}; forms: {_SPEC_FORMS}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "shapes":
        if not sep or not rest:
            return DataSpec("shapes")
        if "=" in rest and "/" not in rest.split("=", 1)[0]:
            options: Dict[str, object] = {}
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq or key not in ("n", "size", "seed", "quality", "root"):
                    raise ValueError(f"data spec {spec!r}: bad shapes option {item!r}; "
                                     "expected n=, size=, seed=, quality= or root=")
                if key == "root":
                    options[key] = value.strip()
                else:
                    try:
                        options[key] = int(value)
                    except ValueError:
                        raise ValueError(f"data spec {spec!r}: {key} must be an int, got {value!r}") from None
            return DataSpec("shapes", None, options)
        return DataSpec("shapes", rest)
    if kind in ("coco", "folder", "wds"):
        if not rest:
            raise ValueError(f"data spec {spec!r}: missing path after '{kind}:'")
        if kind == "coco" and "," in rest:
            ann, images = rest.split(",", 1)
            return DataSpec("coco", ann, {}, images)
        return DataSpec(kind, rest)
    raise ValueError(f"data spec {spec!r}: unknown source {kind!r}; forms: {', '.join(_SPEC_FORMS)}")


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{a,b}`` lists and ``{000..009}`` ranges (zero padding kept), left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


# --------------------------------------------------------------------------------------------
# Image checks
# --------------------------------------------------------------------------------------------

class _VerifiedCache:
    """Files a full decode found readable: ``key -> "size:mtime_ns"`` in ``<cache>/verified-images.json``."""

    def __init__(self):
        self.path = _shapes.default_cache_dir() / "verified-images.json"
        self.dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                self.entries = dict(json.load(f))
        except (OSError, ValueError, TypeError):
            self.entries = {}

    def ok(self, key: str, stamp: str) -> bool:
        return self.entries.get(key) == stamp

    def add(self, key: str, stamp: str) -> None:
        self.entries[key] = stamp
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            os.makedirs(self.path.parent, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError:  # a cache only: never fail indexing for it
            try:
                os.remove(tmp)
            except OSError:
                pass
        self.dirty = False


def _check_file(path: str, mode: str, verified: Optional[_VerifiedCache] = None) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(_HEAD)
            f.seek(max(size - _TAIL, 0))
            tail = f.read(_TAIL)
            reason = check_image_bytes(head, tail, size)
            if reason is None and mode == "decode":
                key, stamp = os.path.abspath(path), f"{size}:{st.st_mtime_ns}"
                if verified is not None and verified.ok(key, stamp):
                    return None
                f.seek(0)
                reason = _pil_decode_error(f.read())
                if reason is None and verified is not None:
                    verified.add(key, stamp)
            return reason
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def _warn_skipped(source: str, skipped: List[Tuple[str, str]]) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    warnings.warn(f"{source}: skipped {len(skipped)} unreadable image(s): {shown}{more}",
                  DataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Record sets
# --------------------------------------------------------------------------------------------


@dataclass
class RecordSet:
    """The indexed records of one source, in a fixed order; record ``i`` is ``(image i, caption i)``.

    File-based sources (shapes, coco, folder) set ``files``; webdataset sets ``tar_paths`` and the
    per-record ``tar_index``/``offsets``/``sizes`` of the image member inside its shard. ``attrs``
    and ``mentioned`` are the shapes ground truth (``None`` for other sources). ``keys`` identify
    records in messages (file path, COCO image id, webdataset key).
    """

    kind: str
    source: str
    captions: List[str]
    keys: List[str]
    files: Optional[List[str]] = None
    tar_paths: Optional[List[str]] = None
    tar_index: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None
    sizes: Optional[np.ndarray] = None
    attrs: Optional[List[Dict[str, str]]] = None
    mentioned: Optional[List[List[str]]] = None
    root: Optional[str] = None

    def __post_init__(self) -> None:
        n = len(self.captions)
        if n == 0:
            raise ValueError(f"{self.source}: no records")
        if (self.files is None) == (self.tar_paths is None):
            raise ValueError("RecordSet: exactly one of files / tar_paths must be given")
        cols = {"keys": self.keys, "files": self.files, "tar_index": self.tar_index,
                "offsets": self.offsets, "sizes": self.sizes, "attrs": self.attrs,
                "mentioned": self.mentioned}
        for name, col in cols.items():
            if col is not None and len(col) != n:
                raise ValueError(f"RecordSet: {name} has {len(col)} entries, captions {n}")
        if self.tar_paths is not None and any(c is None for c in (self.tar_index, self.offsets, self.sizes)):
            raise ValueError("RecordSet: webdataset records need tar_index, offsets and sizes")

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def is_tar(self) -> bool:
        return self.tar_paths is not None

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of record ``i``."""
        if self.files is not None:
            with open(self.files[i], "rb") as f:
                return f.read()
        with open(self.tar_paths[int(self.tar_index[i])], "rb") as f:
            f.seek(int(self.offsets[i]))
            return f.read(int(self.sizes[i]))


def load_records(
    spec: Union[str, DataSpec],
    *,
    image_size: Optional[int] = None,
    check_images: str = "header",
    index: Optional[dict] = None,
) -> RecordSet:
    """Index a data source (see the module docstring for specs and the error policy).

    ``image_size`` is the size the embedded shapes set is rendered at when the spec does not say
    (default 64); it is ignored by the other sources (the loader resizes).
    ``index``: keyword arguments of :func:`scadfast.data.wds_index.index_shards` for webdataset
    sources (``cache_dir``, ``rank``, ``world_size``, ``sync``, ``verbose``); the shard index is
    cached on disk either way.
    """
    if check_images not in CHECK_MODES:
        raise ValueError(f"check_images={check_images!r} is not one of {CHECK_MODES}")
    ds = parse_data_spec(spec)
    if ds.kind == "shapes":
        return _load_shapes(ds, image_size, check_images)
    if ds.kind == "coco":
        return _load_coco(ds, check_images)
    if ds.kind == "folder":
        return _load_folder(ds, check_images)
    if ds.kind == "wds":
        return _load_wds(ds, check_images, index)
    raise ValueError(f"unknown data source kind {ds.kind!r}")  # pragma: no cover


def _existing(path: str, spec: DataSpec, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data spec '{spec}': {what} {str(p)!r} does not exist")
    return p


def _filter_files(source: str, files: Sequence[str], mode: str) -> List[bool]:
    if mode == "none":
        return [True] * len(files)
    keep, skipped = [], []
    verified = _VerifiedCache() if mode == "decode" else None
    for path in files:
        why = _check_file(path, mode, verified)
        keep.append(why is None)
        if why is not None:
            skipped.append((path, why))
    if verified is not None:
        verified.save()
    _warn_skipped(source, skipped)
    if not any(keep):
        raise ValueError(f"{source}: no readable images ({len(files)} found, all unreadable; "
                         f"first: {skipped[0][0]} ({skipped[0][1]}))")
    return keep


def _load_shapes(ds: DataSpec, image_size: Optional[int], mode: str) -> RecordSet:
    if ds.path is not None:
        path = _existing(ds.path, ds, "shapes data set")
    else:
        opts = {**SHAPES_DEFAULTS, **ds.options}
        size = int(opts.get("size", image_size if image_size is not None else 64))
        path = _shapes.make_shapes_dataset(opts.get("root"), n=int(opts["n"]), image_size=size,
                                           seed=int(opts["seed"]), jpeg_quality=int(opts["quality"]))
    rows = _shapes.load_shapes_index(path)
    source = f"shapes data set {str(path)!r}"
    keep = _filter_files(source, [r["file"] for r in rows], mode)
    rows = [r for r, k in zip(rows, keep) if k]
    return RecordSet(
        kind="shapes", source=source, root=str(path),
        captions=[r["caption"] for r in rows], keys=[r["file"] for r in rows],
        files=[r["file"] for r in rows], attrs=[r["attrs"] for r in rows],
        mentioned=[r.get("mentioned") for r in rows],
    )


def _find_coco_annotation(root: Path, ds: DataSpec) -> Path:
    ann_dir = root / "annotations"
    cands = sorted(ann_dir.glob("captions_*.json")) if ann_dir.is_dir() else []
    if not cands:
        raise FileNotFoundError(f"data spec '{ds}': no annotations/captions_*.json under {str(root)!r}")
    if len(cands) == 1:
        return cands[0]
    train = [c for c in cands if c.stem.startswith("captions_train")]
    if train:
        return sorted(train, key=lambda c: re.sub(r"\D", "", c.stem))[-1]
    raise ValueError(f"data spec '{ds}': several caption annotation files {[c.name for c in cands]} "
                     "and none is a train split; name one: coco:PATH/annotations/captions_<split>.json")


def _load_coco(ds: DataSpec, mode: str) -> RecordSet:
    p = _existing(ds.path, ds, "COCO path")
    if p.is_dir():
        ann = _find_coco_annotation(p, ds)
    else:
        ann = p
    if ds.images:
        images = _existing(ds.images, ds, "COCO image folder")
    else:
        split = ann.stem.split("captions_", 1)[-1]
        images = ann.parent.parent / split
        if not images.is_dir():
            raise FileNotFoundError(f"data spec '{ds}': image folder {str(images)!r} for annotation "
                                    f"{ann.name} does not exist; give it: coco:{ann},IMAGE_FOLDER")
    try:
        with open(ann) as f:
            data = json.load(f)
        id_to_file = {int(im["id"]): im["file_name"] for im in data["images"]}
        anns = sorted(((int(a["image_id"]), int(a.get("id", 0)), str(a["caption"]))
                       for a in data["annotations"]), key=lambda t: (t[0], t[1]))
    except OSError as e:
        raise OSError(f"COCO annotation {str(ann)!r} cannot be read: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"COCO annotation {str(ann)!r} is not a valid captions file "
                         f"({type(e).__name__}: {e})") from None
    source = f"COCO captions {str(ann)!r}"
    if not anns:
        raise ValueError(f"{source}: no caption annotations")
    missing_ids = sorted({i for i, _, _ in anns if i not in id_to_file})
    if missing_ids:
        raise ValueError(f"{source}: captions refer to image ids not in 'images': {missing_ids[:5]}")
    image_ids = sorted({i for i, _, _ in anns})
    paths = {i: str(images / id_to_file[i]) for i in image_ids}
    if mode == "none":
        ok = {i: True for i in image_ids}
    else:
        # A file that is missing on disk is treated like an unreadable image.
        keep = _filter_files(f"{source} (images in {str(images)!r})", [paths[i] for i in image_ids], mode)
        ok = dict(zip(image_ids, keep))
    rows = [(i, c) for i, _, c in anns if ok[i]]
    return RecordSet(
        kind="coco", source=source, root=str(images),
        captions=[" ".join(c.split()) for _, c in rows], keys=[str(i) for i, _ in rows],
        files=[paths[i] for i, _ in rows],
    )


def _read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {str(path)!r} is not UTF-8 text ({e})") from None
    return " ".join(text.split())


def _load_folder(ds: DataSpec, mode: str) -> RecordSet:
    root = _existing(ds.path, ds, "image folder")
    if not root.is_dir():
        raise NotADirectoryError(f"data spec '{ds}': {str(root)!r} is not a directory")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    source = f"image folder {str(root)!r}"
    if not images:
        raise ValueError(f"{source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    no_caption, empty, captions = [], [], []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            no_caption.append(str(img))
            continue
        cap = _read_caption(txt)
        if not cap:
            empty.append(str(txt))
        captions.append(cap)
    if no_caption:
        more = f" and {len(no_caption) - 5} more" if len(no_caption) > 5 else ""
        raise FileNotFoundError(f"{source}: caption file missing (same stem, .txt) for "
                                f"{len(no_caption)} image(s): {no_caption[:5]}{more}")
    if empty:
        raise ValueError(f"{source}: empty caption file(s): {empty[:5]}")
    files = [str(p) for p in images]
    keep = _filter_files(source, files, mode)
    files = [f for f, k in zip(files, keep) if k]
    captions = [c for c, k in zip(captions, keep) if k]
    return RecordSet(kind="folder", source=source, root=str(root), captions=captions,
                     keys=files, files=files)


def _load_wds(ds: DataSpec, mode: str, index: Optional[dict] = None) -> RecordSet:
    from .wds_index import check_local, index_shards

    shards: List[str] = []
    for pat in expand_braces(os.path.expanduser(ds.path)):
        check_local(pat, str(ds))
        if glob.has_magic(pat):
            hits = sorted(glob.glob(pat))
            if not hits:
                raise FileNotFoundError(f"data spec '{ds}': no shard matches {pat!r}")
            shards.extend(hits)
        else:
            if not os.path.isfile(pat):
                raise FileNotFoundError(f"data spec '{ds}': shard {pat!r} does not exist")
            shards.append(pat)
    source = f"webdataset '{ds.path}'"
    captions: List[str] = []
    keys: List[str] = []
    tar_index: List[int] = []
    offsets: List[int] = []
    sizes: List[int] = []
    skipped: List[Tuple[str, str]] = []
    for si, ((caps, keys_, offs, szs), skipped_here) in enumerate(index_shards(shards, source, mode, **(index or {}))):
        skipped += skipped_here
        captions += caps
        keys += keys_
        offsets += offs
        sizes += szs
        tar_index += [si] * len(caps)
    _warn_skipped(source, skipped)
    if not captions:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise ValueError(f"{source}: no images found in {len(shards)} shard(s){detail}")
    return RecordSet(
        kind="wds", source=source, captions=captions, keys=keys, tar_paths=shards,
        tar_index=np.asarray(tar_index, np.int32), offsets=np.asarray(offsets, np.int64),
        sizes=np.asarray(sizes, np.int64),
    )
