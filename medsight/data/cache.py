"""A prepared cache: every image decoded, framed and resized once, into memory-mapped uint8 arrays.

``prepare_cache`` reads a source (any format ``load_data`` reads), decodes each image for the input size
(``read_image(..., reduce_to=2 * size)``), applies the run's deterministic geometric step (``data.resize``
squash / pad / crop, or the fundus preset with optional Graham normalization) and writes the result as
one ``<split>_images.npy`` per source split, shape (N, S, S, C), uint8. Random augmentation stays at
training time, on the cached images. Beside the arrays: labels, patient IDs and file names
(``<split>_labels.npy``, ``<split>_meta.json``), ``manifest.json`` (format, class names, the source's
fingerprint, the preprocessing key, progress) and ``skipped.json`` (files that could not be read, and why).

Why memory-mapped arrays and not tar shards: training reads images in random order, which a ``.npy``
serves by offset (``np.load(mmap_mode="r")``: no decode, no copy until a row is touched); DataLoader
workers share the operating system's page cache instead of each holding a copy; one file per split is
easy to check and to move. Shards (WebDataset) pay off when data streams from an object store or to many
nodes without a shared file system, neither of which medsight's runs need.

A cache is tied to its source and preprocessing: opening it for a run whose source changed (files added,
removed, resized or touched) or whose preprocessing differs is refused with the reason (``prepare`` rebuilds
it, saying why). Preparing is resumable (rows are written in chunks; the manifest records the chunks done,
and a re-run continues) and runs chunks on parallel worker processes. A full disk removes the partial
output and says so.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.transforms import v2

from medsight.data.dataset import ImageDataset
from medsight.data.imageio import ImageReadError
from medsight.data.readers import Source, check_output_outside, read_source, reader_options
from medsight.data.sources import DataError, SplitData
from medsight.data.transforms import FovNotFoundWarning, geometric_step
from medsight.utils.files import write_text_atomic

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["CacheError", "Preprocessing", "Rows", "prepare_cache", "open_cache", "verify_cache",
           "is_cache", "cache_source", "cache_preprocessing", "CACHE_FORMAT", "CACHE_VERSION"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "medsight-prepared-cache"
CACHE_VERSION = 2  # 2: content digests of source files, checksums of every file and a sealed manifest
MANIFEST = "manifest.json"
SKIPPED = "skipped.json"
#: Rows per chunk: the unit of parallel work, of resuming and of the image checksums.
CHUNK = 256
#: Bytes read from each end of a source file for its content digest.
PROBE = 4096
#: The only names a cache writes (and so the only files it ever deletes or overwrites).
_OWNED = re.compile(r"(?:train|val|test|all)_(?:images\.npy|labels\.npy|meta\.json|rows\.npy)|manifest\.json|skipped\.json")


class CacheError(DataError):
    """A cache that cannot be used for this run: not a cache, built differently, stale or incomplete."""


@dataclass(frozen=True)
class Preprocessing:
    """What the cached images went through: the key a run's data config must match."""

    size: int
    resize: str = "squash"
    preset: str = "none"
    graham: bool = False
    channels: int = 3

    @classmethod
    def from_config(cls, cfg: DataConfig, channels: int = 3) -> Preprocessing:
        return cls(size=int(cfg.image_size), resize=cfg.resize, preset=cfg.preset, graham=bool(cfg.graham),
                   channels=int(channels))

    def differences(self, other: dict[str, Any]) -> list[str]:
        """``key: cache X, run Y`` for each setting that differs (channels: a choice of the cache, not compared)."""
        return [f"{k}: cache {other.get(k)!r}, run {v!r}" for k, v in asdict(self).items()
                if k != "channels" and other.get(k) != v]


class Rows:
    """Rows ``index`` of an array (a memory map), selected without copying: ``rows[i]`` reads one row,
    ``rows[idx]`` is another view. ``SplitData.subset`` keeps a cached split on disk this way."""

    def __init__(self, base: np.ndarray, index: np.ndarray) -> None:
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: Any) -> Any:
        if np.ndim(i) == 0:
            return np.array(self.base[int(self.index[i])])  # one row, read into memory (writable)
        return Rows(self.base, self.index[i])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])


# ------------------------------------------------------------------------------------------ fingerprint

def _file_stats(paths: list[str]) -> tuple[list[int], list[int], list[str]]:
    """(size, mtime_ns, content digest) per file; -1, -1, "" for a file that cannot be read. The digest is a
    BLAKE2 hash of the file's first and last ``PROBE`` bytes: a file rewritten with the same size and time
    (an image edited in place, a copy that kept the old time) still changes it, at two small reads per file."""
    sizes, mtimes, digests = [], [], []
    for p in paths:
        try:
            with open(p, "rb") as fh:
                st = os.fstat(fh.fileno())
                head = fh.read(PROBE)
                tail = b""
                if st.st_size > PROBE:
                    fh.seek(max(PROBE, st.st_size - PROBE))
                    tail = fh.read(PROBE)
        except OSError:
            sizes.append(-1)
            mtimes.append(-1)
            digests.append("")
            continue
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
        digests.append(hashlib.blake2b(head + b"\0" + tail, digest_size=8).hexdigest())
    return sizes, mtimes, digests


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


Stats = tuple[list[int], list[int], list[str]]


def _fingerprint(source: str, splits: dict[str, SplitData], options: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Stats]]:
    """The source's fingerprint (a hash of every file's name, size, modification time and content digest,
    the labels and patients, and the bytes of a manifest or .npz source file) and the per-split file stats."""
    source = os.path.abspath(source)  # the same source named from another working folder is the same source
    h = hashlib.sha256(json.dumps({"source": source, "options": options}, sort_keys=True).encode())
    stats: dict[str, Stats] = {}
    for name in sorted(splits):
        s = splits[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(s.labels).tobytes())
        h.update("\0".join(s.groups or []).encode())
        if s.paths is None:
            continue
        stats[name] = _file_stats(s.paths)
        h.update("\0".join(os.path.abspath(p) for p in s.paths).encode())
        h.update(np.asarray(stats[name][:2], dtype=np.int64).tobytes())
        h.update("".join(stats[name][2]).encode())
    src = Path(source)
    if src.is_file():  # a manifest or an .npz: its bytes (labels, patients, splits, arrays)
        h.update(_sha256_file(src).encode())
    return {"path": source, "options": options, "sha256": h.hexdigest()}, stats


# ---------------------------------------------------------------------------------------------- writing

def _npy_header(path: Path, shape: tuple[int, ...]) -> int:
    """Create ``path`` as a .npy of uint8 ``shape`` (a sparse file: rows are written later); its header size."""
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
        offset = fh.tell()
        fh.truncate(offset + int(np.prod(shape)))
    return offset


def _write_rows(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``path`` with ordinary file writes, so that a full disk is an
    ``OSError`` here (writing through a memory map would end the process with SIGBUS instead)."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _to_uint8(img: torch.Tensor, channels: int) -> np.ndarray:
    if channels == 1 and img.shape[0] == 3:  # ITU-R 601 luma, as Pillow's "L"
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def prepared_image(img: torch.Tensor, geometry: Callable[[torch.Tensor], torch.Tensor], channels: int) -> np.ndarray:
    """One decoded float [C, H, W] image in [0, 1] through the geometric step, as uint8 (S, S, channels)."""
    return _to_uint8(geometry(img), channels)


_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    torch.set_num_threads(1)  # one process per core
    _STATE.clear()
    _STATE.update(state)


def _prepare_chunk(split: str, chunk: int) -> tuple[str, int, list[dict[str, Any]], str]:
    """Decode, frame and write rows of one chunk; the files that could not be read (with the reason) and
    the SHA-256 of the rows written (``verify_cache`` checks it)."""
    s: SplitData = _STATE["splits"][split]
    geometry, channels = _STATE["geometry"], _STATE["channels"]
    ds = ImageDataset(s, v2.Compose([geometry]))
    start, stop = chunk * CHUNK, min(len(s), (chunk + 1) * CHUNK)
    out = np.zeros((stop - start, *_STATE["row_shape"]), dtype=np.uint8)
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FovNotFoundWarning)  # counted by the caller's log, not per image
        for k, i in enumerate(range(start, stop)):
            try:
                out[k] = prepared_image(ds.load(i), geometry, channels)
            except ImageReadError as exc:
                skipped.append({"split": split, "row": i, "file": s.describe(i), "reason": str(exc)})
    row_bytes = int(np.prod(_STATE["row_shape"]))
    data = out.tobytes()
    _write_rows(_STATE["files"][split], _STATE["offsets"][split] + start * row_bytes, data)
    return split, chunk, skipped, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- manifest

def _read_manifest(folder: Path) -> dict[str, Any] | None:
    p = folder / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        raise CacheError(f"{p} is not readable JSON: not a medsight cache, or a damaged one; prepare it again "
                         f"into an empty folder") from None
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT:
        raise CacheError(f"{folder} is not a medsight prepared cache ({MANIFEST} has no format "
                         f"'{CACHE_FORMAT}')")
    if m.get("version") != CACHE_VERSION:
        raise CacheError(f"{folder} is a version {m.get('version')} cache; this medsight reads version "
                         f"{CACHE_VERSION}: prepare it again")
    return m


def is_cache(folder: str | Path) -> bool:
    """Whether ``folder`` holds a medsight cache's manifest."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(json.dumps(manifest, indent=1), folder / MANIFEST)


def _seal(manifest: dict[str, Any]) -> str:
    """SHA-256 of everything the manifest says (class names, source, preprocessing, checksums, notes)."""
    body = {k: v for k, v in manifest.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _stale_reason(manifest: dict[str, Any], source: dict[str, Any], pre: Preprocessing) -> str | None:
    """Why a cache does not fit this source and preprocessing (None: it fits)."""
    diffs = pre.differences(manifest.get("preprocessing", {}))
    if diffs:
        return "it was prepared with other preprocessing (" + "; ".join(diffs) + ")"
    if manifest.get("source", {}).get("path") != source["path"]:
        return f"it was prepared from {manifest.get('source', {}).get('path')}, not {source['path']}"
    if manifest.get("source", {}).get("options") != source["options"]:
        return f"it was read with other reader options ({manifest['source'].get('options')})"
    if manifest.get("source", {}).get("sha256") != source["sha256"]:
        return (f"the source {source['path']} changed since it was prepared (files added, removed, edited, or with "
                f"another size or modification time, or other labels)")
    return None


def _changed_files(folder: Path, manifest: dict[str, Any], splits: dict[str, SplitData],
                   stats: dict[str, Stats]) -> list[str]:
    """Up to five files whose name, size, modification time or content differ from the cache's record."""
    changed: list[str] = []
    for name, s in splits.items():
        meta_path = folder / f"{name}_meta.json"
        if s.paths is None or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
            old = dict(zip(meta["paths"], zip(meta["sizes"], meta["mtimes"], meta["digests"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        now = dict(zip(s.paths, zip(*stats[name])))
        changed += sorted(p for p in set(old) | set(now) if old.get(p) != now.get(p))
    return changed[:5]


# ---------------------------------------------------------------------------------------------- prepare

def _owned(manifest: dict[str, Any] | None) -> list[str]:
    """The files a cache wrote: those its manifest lists that have a cache file's name (a damaged or edited
    manifest cannot name a user's file), and the manifest last."""
    if manifest is None:
        return []
    listed = manifest.get("files") or []
    names = {n for n in listed if isinstance(n, str) and _OWNED.fullmatch(n)} - {MANIFEST}
    return sorted(names) + [MANIFEST]


def _remove_output(folder: Path, manifest: dict[str, Any] | None) -> None:
    """Delete the files the cache wrote, and nothing else: a user's notes or folders beside it stay."""
    for n in _owned(manifest):
        p = folder / n
        if p.is_symlink() or p.is_file():
            p.unlink()


def _files(splits: dict[str, SplitData]) -> list[str]:
    return sorted(f"{n}_{kind}" for n in splits for kind in ("images.npy", "labels.npy", "meta.json", "rows.npy")) \
        + [SKIPPED, MANIFEST]


def _start(folder: Path, manifest: dict[str, Any], splits: dict[str, SplitData], stats: dict[str, Stats],
           row_shape: tuple[int, ...]) -> None:
    """Fresh files for every split: labels, names, patient IDs, file stats, and empty image arrays. The
    manifest listing them is written first, so that whatever happens next the cache knows its files."""
    need = sum(len(s) for s in splits.values()) * int(np.prod(row_shape))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CacheError(f"the cache needs {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; "
                         f"free space or choose another --out")
    taken = [n for n in _files(splits) if (folder / n).exists() or (folder / n).is_symlink()]
    if taken:
        raise CacheError(f"{folder} holds {', '.join(taken)}, which the cache would overwrite and did not write; "
                         f"move them or choose another --out")
    manifest["files"] = _files(splits)
    manifest["progress"] = {name: {"rows": len(s), "chunks": -(-len(s) // CHUNK), "done": [], "sha256": {}}
                            for name, s in splits.items()}
    manifest["skipped"] = []
    _write_manifest(folder, manifest)
    for name, s in splits.items():
        _npy_header(folder / f"{name}_images.npy", (len(s), *row_shape))
        np.save(folder / f"{name}_labels.npy", s.labels)
        sizes, mtimes, digests = stats.get(name, ([], [], []))
        meta = {"paths": s.paths, "groups": s.groups, "sizes": sizes, "mtimes": mtimes, "digests": digests}
        write_text_atomic(json.dumps(meta), folder / f"{name}_meta.json")


def _run_chunks(folder: Path, manifest: dict[str, Any], state: dict[str, Any], workers: int) -> None:
    """Every chunk not yet done, in this process or on ``workers`` processes; progress saved per chunk."""
    todo = [(name, c) for name, p in manifest["progress"].items() for c in range(p["chunks"])
            if c not in set(p["done"])]
    if not todo:
        return

    def record(result: tuple[str, int, list[dict[str, Any]], str]) -> None:
        name, chunk, skipped, digest = result
        manifest["progress"][name]["done"].append(chunk)
        manifest["progress"][name]["sha256"][str(chunk)] = digest
        manifest["skipped"] += skipped
        _write_manifest(folder, manifest)

    if workers <= 1:
        saved = dict(_STATE)
        _STATE.update(state)
        try:
            for name, c in todo:
                record(_prepare_chunk(name, c))
        finally:
            _STATE.clear()
            _STATE.update(saved)
        return
    with cf.ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(state,)) as pool:
        futures = [pool.submit(_prepare_chunk, name, c) for name, c in todo]
        try:
            for f in cf.as_completed(futures):
                record(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _finish(folder: Path, manifest: dict[str, Any]) -> None:
    """The rows that decoded (``<split>_rows.npy``), skipped.json, the checksum of every small file, and the
    manifest marked complete and sealed."""
    bad: dict[str, set[int]] = {}
    for s in manifest["skipped"]:
        bad.setdefault(s["split"], set()).add(int(s["row"]))
    for name, p in manifest["progress"].items():
        rows = np.array([i for i in range(p["rows"]) if i not in bad.get(name, set())], dtype=np.int64)
        np.save(folder / f"{name}_rows.npy", rows)
    skipped = sorted(manifest["skipped"], key=lambda s: (s["split"], s["row"]))
    write_text_atomic(json.dumps(skipped, indent=1), folder / SKIPPED)
    manifest["checksums"] = {n: _sha256_file(folder / n) for n in _files(manifest["progress"])
                             if not n.endswith("_images.npy") and n != MANIFEST}
    manifest["complete"] = True
    manifest["seal"] = _seal(manifest)
    _write_manifest(folder, manifest)


def _check_folder(folder: Path) -> dict[str, Any] | None:
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"{folder} is a file, not a folder for a cache")
    manifest = _read_manifest(folder) if folder.is_dir() else None
    if manifest is None and folder.is_dir() and any(folder.iterdir()):
        raise CacheError(f"{folder} is not a medsight prepared cache (no {MANIFEST}) and not empty; give a new "
                         f"or empty folder")
    return manifest


def prepare_cache(cfg: DataConfig, out: str | Path, *, workers: int = 0, channels: int = 3,
                  rebuild: bool = True) -> dict[str, Any]:
    """Prepare (or finish, or check) the cache of ``cfg``'s source and preprocessing in ``out``.

    Args:
        cfg: the data config: ``path`` and the reader options name the source; ``image_size``, ``resize``,
            ``preset`` and ``graham`` the preprocessing.
        out: the cache folder (new, empty, or a cache of this source); never inside a source folder.
        workers: worker processes (0 or 1: this process).
        channels: 3, or 1 to store one grey channel (RGB converted with ITU-R 601 weights; a third of the disk).
        rebuild: a cache of another source or preprocessing is rebuilt (with a log line saying why; only the
            files the cache wrote are replaced); ``False`` refuses it with the reason instead.

    Returns:
        The manifest.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    folder = Path(out).expanduser()
    check_output_outside(folder, cfg.path, "--out (the cache folder)")
    manifest = _check_folder(folder)
    options = reader_options(cfg)
    src_data = read_source(cfg.path, **options)
    splits, classes, source, notes = src_data.splits, src_data.classes, src_data.path, src_data.notes
    if Path(source).resolve() == folder.resolve():
        raise CacheError(f"{folder} is the source itself; give another folder for the cache")
    src, stats = _fingerprint(source, splits, options)
    pre = Preprocessing.from_config(cfg, channels)
    if manifest is not None:
        reason = _stale(folder, manifest, src, pre, channels, splits, stats)
        if reason is None and manifest.get("complete"):
            _check_integrity(folder, manifest)
            log.info("%s: the prepared cache is up to date", folder)
            return manifest
        if reason is not None:
            if not rebuild:
                raise CacheError(f"{folder} cannot be used: {reason}")
            log.warning("%s: rebuilding the prepared cache: %s", folder, reason)
            _remove_output(folder, manifest)
            manifest = None
    folder.mkdir(parents=True, exist_ok=True)
    row_shape = (pre.size, pre.size, channels)
    if manifest is None:
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": src, "preprocessing": asdict(pre),
                    "classes": list(classes), "splits": sorted(splits), "notes": notes,
                    "source_skipped": list(src_data.skipped), "complete": False}
        _start(folder, manifest, splits, stats, row_shape)
    else:
        done = sum(len(p["done"]) for p in manifest["progress"].values())
        total = sum(p["chunks"] for p in manifest["progress"].values())
        log.info("%s: continuing an interrupted preparation (%d of %d chunks done)", folder, done, total)
    state = {"splits": splits, "geometry": geometric_step(pre.size, cfg), "channels": channels,
             "row_shape": row_shape, "files": {n: folder / f"{n}_images.npy" for n in splits},
             "offsets": {n: _header_size(folder / f"{n}_images.npy") for n in splits}}
    _run_or_clean_up(folder, manifest, state, workers)
    _finish(folder, manifest)
    if manifest["skipped"]:
        log.warning("%s: %d file(s) could not be read and were left out (listed in %s)", folder,
                    len(manifest["skipped"]), folder / SKIPPED)
    return manifest


def _stale(folder: Path, manifest: dict[str, Any], src: dict[str, Any], pre: Preprocessing, channels: int,
           splits: dict[str, SplitData], stats: dict[str, Stats]) -> str | None:
    """Why the cache in ``folder`` does not fit this source and preprocessing (with files that changed, when
    known), or None when it does."""
    reason = _stale_reason(manifest, src, pre)
    if reason is None and manifest.get("preprocessing", {}).get("channels") != channels:
        reason = f"it holds {manifest['preprocessing'].get('channels')} channel(s), not {channels}"
    if reason is not None:
        changed = _changed_files(folder, manifest, splits, stats)
        reason += f" (e.g. {', '.join(changed)})" if changed else ""
    return reason


def _run_or_clean_up(folder: Path, manifest: dict[str, Any], state: dict[str, Any], workers: int) -> None:
    """Prepare the chunks still to do; a full disk removes the partial output and says so."""
    try:
        _run_chunks(folder, manifest, state, workers)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _remove_output(folder, manifest)
        raise CacheError(f"the disk holding {folder} is full ({exc.strerror or exc}); the partial cache was "
                         f"removed. Free space or choose another --out") from None


def _header_size(path: Path) -> int:
    """Where the rows of a .npy start (its header's size, as numpy's memory map reads it)."""
    return int(np.load(path, mmap_mode="r").offset)


# ---------------------------------------------------------------------------------------------- checking

def _check_integrity(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a cache whose manifest or small files (labels, rows, names, patients, skipped list) changed
    after it was written: their SHA-256 are in the sealed manifest. Cheap: the image arrays are not read
    (``verify_cache`` checks them)."""
    if manifest.get("seal") != _seal(manifest):
        raise CacheError(f"{folder / MANIFEST} was changed after the cache was written (its class names, source, "
                         f"preprocessing or checksums differ from what was sealed); prepare the cache again")
    sums = manifest.get("checksums") or {}
    for name in _files(manifest["progress"]):
        if name.endswith("_images.npy") or name == MANIFEST:
            continue
        try:
            ok = sums.get(name) == _sha256_file(folder / name)
        except OSError:
            raise CacheError(f"{folder}: {name} is missing; prepare the cache again") from None
        if not ok:
            raise CacheError(f"{folder}: {name} was changed after the cache was written (checksum differs); "
                             f"prepare the cache again")


def _load_split(folder: Path, name: str, manifest: dict[str, Any]) -> SplitData:
    try:
        images = np.load(folder / f"{name}_images.npy", mmap_mode="r")
        rows = np.load(folder / f"{name}_rows.npy")
        labels = np.load(folder / f"{name}_labels.npy")
        meta = json.loads((folder / f"{name}_meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{folder}: the '{name}' split is missing or damaged ({exc}); prepare it again") from None
    n = manifest["progress"][name]["rows"]
    paths, groups = meta.get("paths"), meta.get("groups")
    sizes = {"images": len(images), "labels": len(labels), **({"paths": len(paths)} if paths is not None else {}),
             **({"groups": len(groups)} if groups is not None else {})}
    wrong = {k: v for k, v in sizes.items() if v != n}
    if wrong or rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n or (np.diff(rows) <= 0).any())):
        raise CacheError(f"{folder}: the '{name}' split is inconsistent ({n} rows prepared; "
                         f"{', '.join(f'{k} {v}' for k, v in wrong.items()) or 'row numbers out of range'}); "
                         f"prepare it again")
    return SplitData(labels=labels[rows], images=Rows(images, rows),
                     paths=[paths[i] for i in rows] if paths is not None else None,
                     groups=[groups[i] for i in rows] if groups is not None else None,
                     prepared=dict(manifest["preprocessing"]))


def _opened_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CacheError(f"prepared cache not found: {folder}")
    manifest = _read_manifest(folder)
    if manifest is None:
        raise CacheError(f"{folder} is not a medsight prepared cache (no {MANIFEST}); make one with "
                         f"medsight prepare --data SOURCE --size S --out {folder}")
    if not manifest.get("complete"):
        p = manifest.get("progress", {})
        done, total = sum(len(v["done"]) for v in p.values()), sum(v["chunks"] for v in p.values())
        raise CacheError(f"{folder} was interrupted while being prepared ({done} of {total} chunks); run "
                         f"medsight prepare again to finish it")
    _check_integrity(folder, manifest)
    return manifest


def _check_source(folder: Path, manifest: dict[str, Any]) -> None:
    """Compare the cache with its source when the source is at hand (a cache moved without it is used as is)."""
    src = manifest["source"]
    if not Path(src["path"]).exists():
        log.info("%s: the source %s is not at hand; the cache is used as prepared", folder, src["path"])
        return
    try:
        now = read_source(src["path"], **src["options"])
    except DataError as exc:
        raise CacheError(f"{folder}: its source {src['path']} can no longer be read ({exc}); prepare the cache "
                         f"again or move the source away") from None
    current, stats = _fingerprint(now.path, now.splits, src["options"])
    if current["sha256"] != src["sha256"]:
        changed = _changed_files(folder, manifest, now.splits, stats)
        raise CacheError(f"{folder} cannot be used: the source {src['path']} changed since it was prepared"
                         + (f" (e.g. {', '.join(changed)})" if changed else "")
                         + f"; run medsight prepare --data {src['path']} --out {folder} again")


def open_cache(folder: str | Path, *, check_source: bool = False
               ) -> tuple[dict[str, SplitData], list[str], str, list[str], dict[str, Any]]:
    """``(splits, classes, source, notes, manifest)`` of a complete cache; images stay on disk
    (memory-mapped rows, see :class:`Rows`) and carry the cache's preprocessing. The manifest's seal and the
    checksums of labels, rows, names and patients are verified on every open; with ``check_source``, the
    source too when it is at hand."""
    folder = Path(folder).expanduser()
    manifest = _opened_manifest(folder)
    if check_source:
        _check_source(folder, manifest)
    splits = {name: _load_split(folder, name, manifest) for name in manifest["splits"]}
    return splits, list(manifest["classes"]), manifest["source"]["path"], list(manifest.get("notes", [])), manifest


def verify_cache(folder: str | Path) -> dict[str, Any]:
    """Everything ``open_cache`` checks, and every image chunk against the SHA-256 recorded when it was written.

    Returns:
        ``{"images": rows checked, "chunks": chunks checked}``.

    Raises:
        CacheError: naming the split and rows whose images differ.
    """
    folder = Path(folder).expanduser()
    manifest = _opened_manifest(folder)
    _check_source(folder, manifest)
    rows = chunks = 0
    for name, p in manifest["progress"].items():
        path = folder / f"{name}_images.npy"
        images = np.load(path, mmap_mode="r")
        row_bytes = int(np.prod(images.shape[1:]))
        with path.open("rb") as fh:
            for c in range(p["chunks"]):
                start, stop = c * CHUNK, min(p["rows"], (c + 1) * CHUNK)
                fh.seek(int(images.offset) + start * row_bytes)
                if hashlib.sha256(fh.read((stop - start) * row_bytes)).hexdigest() != p["sha256"].get(str(c)):
                    raise CacheError(f"{folder}: images of the '{name}' split, rows {start}-{stop - 1}, changed after "
                                     f"the cache was written (checksum differs); prepare the cache again")
                rows, chunks = rows + stop - start, chunks + 1
    return {"images": rows, "chunks": chunks}


def cache_preprocessing(folder: str | Path) -> dict[str, Any] | None:
    """The preprocessing a complete cache in ``folder`` went through (None: no complete cache there)."""
    try:
        m = _read_manifest(Path(folder).expanduser())
    except CacheError:
        return None
    return dict(m["preprocessing"]) if m and m.get("complete") else None


def cache_source(cfg: DataConfig) -> Source:
    """The source of ``cfg`` read from its cache ``cfg.cache``: prepared first when the folder is new
    or empty or was interrupted; refused with the reason when it holds another source or preprocessing.

    Under ``torch.distributed``, rank 0 prepares while the other ranks wait, then every rank opens it.
    """
    folder = Path(cfg.cache).expanduser()
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    if rank == 0:  # prepares a new or interrupted cache; checks a complete one against the source
        manifest = _check_folder(folder)
        prepare_cache(cfg, folder, channels=int((manifest or {}).get("preprocessing", {}).get("channels", 3)),
                      rebuild=False)
    if dist:
        torch.distributed.barrier()
    splits, classes, source, notes, manifest = open_cache(folder)
    diffs = Preprocessing.from_config(cfg).differences(manifest["preprocessing"])
    if diffs:
        raise CacheError(f"{folder} cannot be used: it was prepared with other preprocessing ({'; '.join(diffs)})")
    return Source(splits, classes, source, notes, list(manifest.get("source_skipped", [])))
