"""On-disk index of webdataset shards, built once and reused by later starts and by every rank.

Reading a shard's member list means walking every tar header of the file; for a data set of
thousands of shards that is minutes per start and per rank. :func:`index_shards` does it once per
shard and keeps the result in a cache directory (``<cache>/wds-index`` by default):

``<H>-<S>.idx``
    the shard's index in DALI's ``wds2idx`` format (version ``v1.2``): a first line
    ``v1.2 <samples>``, then one line per sample listing each member as ``ext offset size name``
    (offset of the member's data in the tar, bytes). The file can be handed to
    ``fn.readers.webdataset(paths=[shard], index_paths=[idx])`` unchanged (:func:`index_path`);
    scadfast's own loader reads the image bytes at the offsets it lists.
``<H>-<S>.<check>.json``
    what the index alone does not say: each image sample's caption (the ``.txt`` member, read
    once) and the verdict of the indexing-time image check (``header``, ``decode`` or ``none``,
    see :mod:`scadfast.data.sources`).

``H`` is a hash of the shard's real path and ``S`` of its size and modification time: a shard that
changes gets a new entry (the stale one is removed) and one that does not is never re-read. Samples
are the members sharing a key (the name up to the first dot of its base name), in the order their
first member appears; hidden members and members without an extension are left out.

With several ranks (``rank``/``world_size``/``sync``) each rank indexes its share of the uncached
shards (shard ``i`` on rank ``i % world_size``), all wait for each other, then every rank reads the
whole index from the cache; a shard missing there (a cache directory that is not shared between
nodes) is indexed by the rank that needs it. Rank 0 prints a progress line while shards are being
indexed and one summary line.

Shards must be local files (or on a mounted file system): the loader reads images by offset, so
``pipe:`` commands and URLs are refused with an error that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from . import shapes as _shapes
from .image_check import _HEAD, _TAIL, IMAGE_EXTENSIONS, _pil_decode_error, check_image_bytes

__all__ = ["ShardIndex", "check_local", "default_index_dir", "index_path", "index_shards", "parse_line",
           "read_idx", "scan_shard", "write_idx"]

IDX_VERSION = "v1.2"
_META_FORMAT = 1
_PROGRESS_EVERY_S = 5.0

# One member of a sample: (extension as in the tar, data offset, size, member name).
Member = Tuple[str, int, int, str]


@dataclass
class ShardIndex:
    """One shard: its index lines (one per sample, ``ext offset size name`` per member), the image
    records and the images the check skipped.

    ``records`` and ``skipped`` name an image by ``(sample, member)`` position in ``lines``;
    ``records`` carry the caption, ``skipped`` the reason.
    """

    shard: str
    lines: List[str]
    records: List[Tuple[int, int, str]]
    skipped: List[Tuple[int, int, str]]

    def member(self, sample: int, member: int) -> Member:
        t = self.lines[sample].split()
        ext, offset, size, name = t[4 * member:4 * member + 4]
        return ext, int(offset), int(size), name

    def _key(self, ext: str, name: str) -> str:
        # SHARD:STEM.ext with the extension in lower case (what messages have always shown)
        return f"{self.shard}:{name[: len(name) - len(ext)]}{ext.lower()}"

    def columns(self) -> Tuple[List[str], List[str], List[int], List[int]]:
        """``(captions, keys, offsets, sizes)`` of the image records."""
        caps, keys, offsets, sizes = [], [], [], []
        for sample, member, caption in self.records:
            ext, offset, size, name = self.member(sample, member)
            caps.append(caption)
            keys.append(self._key(ext, name))
            offsets.append(offset)
            sizes.append(size)
        return caps, keys, offsets, sizes

    def skipped_keys(self) -> List[Tuple[str, str]]:
        out = []
        for sample, member, why in self.skipped:
            ext, _, _, name = self.member(sample, member)
            out.append((self._key(ext, name), why))
        return out


def parse_line(line: str) -> List[Member]:
    """The members ``(ext, offset, size, name)`` of one sample line of an index file."""
    t = line.split()
    if not t or len(t) % 4:
        raise ValueError(f"malformed webdataset index line {line[:80]!r}")
    return [(t[i], int(t[i + 1]), int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)]


def default_index_dir() -> Path:
    return _shapes.default_cache_dir() / "wds-index"


def check_local(shard: str, spec: str) -> None:
    """Refuse ``pipe:`` and URL shards with one line that says what to do."""
    if shard.startswith("pipe:") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", shard):
        raise ValueError(f"data spec '{spec}': shard {shard!r} is not a local file; pipe: commands and "
                         "URLs are not supported (the loader reads images by offset): copy the shards to "
                         "a local disk or mount the bucket (e.g. with a FUSE file system)")


# --------------------------------------------------------------------------------------------
# Scanning one shard (the slow path)
# --------------------------------------------------------------------------------------------


def scan_shard(shard: str, source: str, mode: str) -> ShardIndex:
    """Walk ``shard``'s tar headers, read its captions and check its images (``mode``)."""
    try:
        tf = tarfile.open(shard, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{source}: shard {shard!r} is not a readable tar file ({e})") from None
    groups: dict = {}  # stem -> {ext lower: TarInfo}, in order of first appearance
    with tf, open(shard, "rb") as raw:
        shard_size = os.fstat(raw.fileno()).st_size
        try:
            listed = list(tf)  # a truncated shard fails here (tarfile.ReadError)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{source}: shard {shard!r} is truncated or corrupt ({e})") from None
        # tarfile stops quietly at a torn header; a complete shard ends with zero blocks there.
        raw.seek(tf.offset)
        rest = raw.read(1024)
        if len(rest) < 1024 or any(rest):
            raise ValueError(f"{source}: shard {shard!r} is truncated or corrupt (no end-of-archive "
                             f"marker after byte {tf.offset} of {shard_size})")
        for m in listed:
            if not m.isfile():
                continue
            if m.offset_data + m.size > shard_size:
                raise ValueError(f"{source}: shard {shard!r} is truncated (member {m.name} ends past "
                                 f"the end of the file)")
            name = os.path.basename(m.name)
            if name.startswith("."):
                continue
            # img2dataset keys have no dots; the extension is everything after the first dot of the
            # base name.
            base_stem, dot, ext = name.partition(".")
            if not dot:
                continue
            if any(ch.isspace() for ch in m.name):
                raise ValueError(f"{source}: shard {shard!r}: member name {m.name!r} contains white space, "
                                 "which the webdataset index format cannot hold")
            stem = os.path.join(os.path.dirname(m.name), base_stem)
            groups.setdefault(stem, {})[ext.lower()] = m
        lines: List[str] = []
        records: List[Tuple[int, int, str]] = []
        skipped: List[Tuple[int, int, str]] = []
        for stem, group in groups.items():
            si = len(lines)
            lines.append(" ".join(f"{m.name[len(stem) + 1:]} {m.offset_data} {m.size} {m.name}"
                                  for m in group.values()))
            exts = list(group)
            img_ext = next((e for e in exts if "." + e in IMAGE_EXTENSIONS), None)
            if img_ext is None:
                continue  # metadata-only sample (e.g. a failed download's .json)
            if "txt" not in group:
                raise FileNotFoundError(f"{source}: shard {shard!r}: caption member {stem}.txt "
                                        f"missing for image {stem}.{img_ext}")
            cap_m, img_m = group["txt"], group[img_ext]
            raw.seek(cap_m.offset_data)
            try:
                caption = " ".join(raw.read(cap_m.size).decode("utf-8").split())
            except UnicodeDecodeError:
                raise ValueError(f"{source}: shard {shard!r}: {stem}.txt is not UTF-8") from None
            if not caption:
                raise ValueError(f"{source}: shard {shard!r}: {stem}.txt is empty")
            mi = exts.index(img_ext)
            why = None
            if mode != "none":
                raw.seek(img_m.offset_data)
                head = raw.read(min(_HEAD, img_m.size))
                raw.seek(img_m.offset_data + max(img_m.size - _TAIL, 0))
                tail = raw.read(min(_TAIL, img_m.size))
                why = check_image_bytes(head, tail, img_m.size)
                if why is None and mode == "decode":
                    raw.seek(img_m.offset_data)
                    why = _pil_decode_error(raw.read(img_m.size))
            if why is None:
                records.append((si, mi, caption))
            else:
                skipped.append((si, mi, why))
    return ShardIndex(shard, lines, records, skipped)


# --------------------------------------------------------------------------------------------
# DALI's index format
# --------------------------------------------------------------------------------------------


def write_idx(path: str, lines: Sequence[str]) -> int:
    """Write sample ``lines`` in ``wds2idx``'s ``v1.2`` format (atomically); returns the file's size."""
    text = "\n".join([f"{IDX_VERSION} {len(lines)}", *lines]) + "\n"
    _atomic_write(path, text)
    return len(text.encode())


def read_idx(path: str) -> List[str]:
    """The sample lines of a ``v1.2`` index file (:func:`parse_line` reads one); ``ValueError`` if
    it is not one."""
    with open(path, encoding="utf-8") as f:
        head, *lines = f.read().splitlines()
    h = head.split()
    if len(h) != 2 or h[0] != IDX_VERSION:
        raise ValueError(f"{path}: not a {IDX_VERSION} webdataset index")
    if len(lines) != int(h[1]):
        raise ValueError(f"{path}: {len(lines)} samples, header says {h[1]}")
    return lines


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def _stamp(shard: str) -> Tuple[str, int, int]:
    st = os.stat(shard)
    return os.path.realpath(shard), st.st_size, st.st_mtime_ns


def _names(root: Path, stamp: Tuple[str, int, int]) -> Tuple[str, str]:
    real, size, mtime = stamp
    h = hashlib.sha256(real.encode()).hexdigest()[:20]
    s = hashlib.sha256(f"{size}:{mtime}".encode()).hexdigest()[:12]
    return h, f"{h}-{s}"


def index_path(shard: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """The cached ``.idx`` file of ``shard`` as it is now, or ``None`` if it has not been indexed."""
    root = Path(cache_dir) if cache_dir else default_index_dir()
    p = root / (_names(root, _stamp(shard))[1] + ".idx")
    return str(p) if p.is_file() else None


def _finish(entry: ShardIndex) -> tuple:
    """What the record set needs of a shard: ``(columns, skipped keys)``; the index lines are dropped."""
    return entry.columns(), entry.skipped_keys()


def _load(root: Path, shard: str, stamp, mode: str) -> Optional[tuple]:
    """:func:`_finish` of the cached entry of ``shard``, or ``None`` if absent, stale or damaged."""
    base = root / _names(root, stamp)[1]
    try:
        with open(f"{base}.{mode}.json", encoding="utf-8") as f:
            meta = json.load(f)
        if (meta.get("format"), meta.get("shard"), meta.get("size"), meta.get("mtime_ns"), meta.get("check")) != \
                (_META_FORMAT, stamp[0], stamp[1], stamp[2], mode):
            return None
        if os.path.getsize(f"{base}.idx") != meta["idx_bytes"]:
            return None
        entry = ShardIndex(shard, read_idx(f"{base}.idx"), meta["records"], meta["skipped"])
        if len(entry.lines) != meta["samples"]:
            return None
        return _finish(entry)  # parsing every record's line also validates the pair
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _save(root: Path, entry: ShardIndex, stamp, mode: str) -> None:
    """Store ``entry`` (a cache only: an unwritable directory never fails the indexing)."""
    h, name = _names(root, stamp)
    try:
        os.makedirs(root, exist_ok=True)
        idx_bytes = write_idx(str(root / f"{name}.idx"), entry.lines)
        meta = {"format": _META_FORMAT, "shard": stamp[0], "size": stamp[1], "mtime_ns": stamp[2], "check": mode,
                "samples": len(entry.lines), "idx_bytes": idx_bytes, "records": entry.records,
                "skipped": entry.skipped}
        _atomic_write(str(root / f"{name}.{mode}.json"), json.dumps(meta, ensure_ascii=False))
        for old in root.glob(f"{h}-*"):  # entries of earlier versions of this shard
            if not old.name.startswith(name + "."):
                old.unlink()
    except OSError:
        pass


class _Progress:
    """Rank 0's progress line while it indexes its share of the shards (every few seconds)."""

    def __init__(self, enabled: bool, todo: int, source: str, world_size: int):
        self.enabled, self.todo, self.source, self.world = enabled, todo, source, world_size
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            whose = f" (rank 0's share; {self.world} ranks index in parallel)" if self.world > 1 else ""
            print(f"[scadfast] indexing {self.source}: {done}/{self.todo} shards{whose}, {now - self.t0:.0f} s",
                  file=sys.stderr, flush=True)


def index_shards(
    shards: Sequence[str],
    source: str,
    mode: str,
    *,
    cache_dir: Optional[str] = None,
    rank: int = 0,
    world_size: int = 1,
    sync: Optional[Callable[[bool], bool]] = None,
    verbose: bool = True,
) -> List[tuple]:
    """Per shard, from the cache or built (and stored): its image records as columns
    ``(captions, keys, offsets, sizes)`` (:meth:`ShardIndex.columns`) and the ``(key, reason)`` of
    the images the check skipped; see the module docstring.

    ``sync(flag) -> bool`` is a collective that is true iff ``flag`` is true on every rank
    (:func:`scadfast.distributed.all_true`); without it the ranks do not wait for each other.
    """
    root = Path(cache_dir) if cache_dir else default_index_dir()
    t0 = time.perf_counter()
    stamps = [_stamp(s) for s in shards]
    loaded = {i: _load(root, shards[i], stamps[i], mode) for i in range(rank, len(shards), world_size)}
    mine = [i for i, got in loaded.items() if got is None]
    progress = _Progress(verbose and rank == 0, len(mine), source, world_size)
    error = None
    try:
        for n, i in enumerate(mine):
            loaded[i] = _finish(_build(root, shards[i], stamps[i], source, mode))
            progress(n + 1)
    except Exception as e:  # noqa: BLE001 - raised after the collective, so no rank waits forever
        error = e
    if sync is not None and world_size > 1:
        if not sync(error is None):
            if error is not None:
                raise error
            raise ValueError(f"{source}: another rank failed while indexing the shards (see its error)")
    elif error is not None:
        raise error
    out, built_here = [], 0
    for i, (shard, stamp) in enumerate(zip(shards, stamps)):
        got = loaded.get(i) or _load(root, shard, stamp, mode)
        if got is None:  # another rank's share in a directory we do not see, or an unwritable cache
            got = _finish(_build(root, shard, stamp, source, mode))
            built_here += 1
        out.append(got)
    if verbose and rank == 0:
        built = len(mine) + built_here
        others = " (+ the other ranks' shares)" if world_size > 1 else ""
        print(f"[scadfast] {source}: {len(shards)} shard(s), {sum(len(cols[0]) for cols, _ in out)} records; "
              f"{built} indexed by rank 0{others}, the rest read from the index cache {root} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return out


def _build(root: Path, shard: str, stamp, source: str, mode: str) -> ShardIndex:
    entry = scan_shard(shard, source, mode)
    if _stamp(shard) == stamp:  # not modified while being read
        _save(root, entry, stamp, mode)
    return entry
