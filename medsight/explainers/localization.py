"""Do the heatmaps point at the disease? Heatmaps scored against radiologists' bounding boxes.

A box list (NIH's ``BBox_List_2017.csv``, or a plain CSV ``image,finding,x,y,w,h[,width,height]``) is read
with every row checked, each box is carried into the model's input frame (the run's resize policy: squash,
letterbox or centre crop), and each heatmap of the box's finding is scored three ways:

- **pointing game** (Zhang et al., "Top-down Neural Attention by Excitation Backprop", IJCV 2018): a hit
  when the map's maximum lies within ``tolerance`` pixels of the box (they use 15 px at 224 px; here the
  same share of the input side unless given);
- **energy in the box** relative to the box's share of the image (Wang et al., "Score-CAM", CVPR-W 2020
  report the energy share; divided by the area share, a uniform map scores exactly 1);
- **IoU** of the map thresholded at a share of its maximum (default 0.5) with the box.

Beside every method, the same scores for a centre prior (a Gaussian at the image centre) and for a random
map, so a user sees whether the heatmap beats a trivial guess. Each mean carries a percentile-bootstrap
interval over the boxes and its n. Written here because no maintained library scores saliency maps
against boxes; the maps themselves come from the grad-cam library (:func:`medsight.explainers.explain`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError
from medsight.metrics.bootstrap import LEVEL, bootstrap_cis

__all__ = ["Box", "BoxListError", "read_boxes", "FINDING_ALIASES", "NIH_SIZE", "box_in_view", "box_mask",
           "pointing_hits", "energy_ratios", "threshold_ious", "centre_prior", "random_maps", "score_maps",
           "summarize", "default_tolerance", "match_boxes", "index_images", "bootstrap_mean", "SCORES", "Matched"]

#: The size of the images NIH's box coordinates refer to (the 1024 × 1024 originals).
NIH_SIZE = (1024, 1024)
#: Names a box list may use for a finding the labels spell otherwise (NIH's list says Infiltrate).
FINDING_ALIASES = {"infiltrate": "Infiltration"}
#: Largest box list read (bytes): NIH's full list is 60 kB.
MAX_BYTES = 50_000_000
_NIH_HEADER = ("image index", "finding label")


class BoxListError(MedsightError, ValueError):
    """A box list medsight cannot use: the file, or every row in it, is at fault (the rows are named)."""


@dataclass(frozen=True)
class Box:
    """One box in its list's coordinates: top-left ``x, y``, size ``w, h``, on an image of ``width`` ×
    ``height`` pixels; ``row`` is its line in the file (the header is line 1)."""

    image: str
    finding: str
    x: float
    y: float
    w: float
    h: float
    width: float
    height: float
    row: int

    def where(self) -> str:
        return f"row {self.row} ({self.image}, {self.finding})"


def _number(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


def _plain_image_name(name: str) -> bool:
    return bool(name) and name == os.path.basename(name) and "\\" not in name and name not in (".", "..")


def read_boxes(path: str | Path, size: tuple[float, float] | None = None) -> tuple[list[Box], list[str]]:
    """The boxes of a list, and one message per row that cannot be used (and why).

    Args:
        path: NIH's ``BBox_List_2017.csv`` (header ``Image Index,Finding Label,Bbox [x,y,w,h]``, six fields
            a row, coordinates in the 1024 × 1024 originals) or a CSV with columns image, finding, x, y, w, h
            and, optionally, width, height (the coordinates' image size).
        size: (width, height) the coordinates refer to, for lists without width/height columns (overrides
            NIH's 1024 × 1024).

    Raises:
        BoxListError: the file is missing, too large, not a box list, or no row is usable.
    """
    p = Path(path)
    rows = _read_rows(p, size)
    header = [h.strip().lower() for h in rows[0]]
    cols, default = _columns(p, rows[0], header, size)
    boxes, problems = [], []
    for line, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        found = _row_box(r, line, cols, default, len(header))
        if isinstance(found, Box):
            boxes.append(found)
        else:
            problems.append(found)
    if not boxes:
        raise BoxListError(f"no usable box in {p}: " + ("; ".join(problems[:20]) if problems else "it has no rows"))
    return boxes, problems


def _read_rows(p: Path, size: tuple[float, float] | None) -> list[list[str]]:
    """The CSV rows of a box list (header first), the file and ``size`` checked."""
    if not p.is_file():
        raise BoxListError(f"box list not found: {p}")
    if p.stat().st_size > MAX_BYTES:
        raise BoxListError(f"box list {p} is {p.stat().st_size:,} bytes, more than the {MAX_BYTES:,} read")
    if size is not None and not (size[0] > 0 and size[1] > 0):
        raise BoxListError(f"the box coordinates' image size must be positive, got {size[0]:g}x{size[1]:g}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise BoxListError(f"box list {p} is not UTF-8 text") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise BoxListError(f"box list {p} is empty")
    return rows


def _columns(p: Path, first: list[str], header: list[str],
             size: tuple[float, float] | None) -> tuple[dict[str, int], tuple[float, float] | None]:
    """Where each field sits in a row (NIH's layout or named columns) and the coordinates' default image size."""
    if tuple(header[:2]) == _NIH_HEADER and len(header) == 6 and header[2].startswith("bbox"):
        return {"image": 0, "finding": 1, "x": 2, "y": 3, "w": 4, "h": 5}, size or NIH_SIZE
    need = ("image", "finding", "x", "y", "w", "h")
    missing = [c for c in need if c not in header]
    if missing:
        raise BoxListError(f"box list {p} lacks column(s) {', '.join(missing)}: expected NIH's "
                           f"'Image Index,Finding Label,Bbox [x,y,w,h]' or image,finding,x,y,w,h[,width,height]; "
                           f"its header is {','.join(first)}")
    cols = {c: header.index(c) for c in need}
    if "width" in header and "height" in header:
        cols.update(width=header.index("width"), height=header.index("height"))
    elif size is None:
        raise BoxListError(f"box list {p} does not say the image size its coordinates refer to: add width,height "
                           f"columns or give the size (--box-size WxH)")
    return cols, size


def _row_box(r: list[str], line: int, cols: dict[str, int], default: tuple[float, float] | None,
             n_header: int) -> Box | str:
    """The box of row ``line``, or the message saying why it cannot be used."""
    if len(r) <= max(cols.values()):
        return f"row {line}: {len(r)} fields, expected {n_header}"
    image, finding = r[cols["image"]].strip(), r[cols["finding"]].strip()
    where = f"row {line} ({image}, {finding})"
    if not _plain_image_name(image):
        return f"{where}: the image must be a file name, without folders"
    try:
        x, y, w, h = (_number(r[cols[k]]) for k in ("x", "y", "w", "h"))
        width, height = ((_number(r[cols["width"]]), _number(r[cols["height"]])) if "width" in cols
                         else (float(default[0]), float(default[1])))  # type: ignore[index]
    except ValueError:
        return f"{where}: x, y, w, h{', width, height' if 'width' in cols else ''} must be numbers"
    if w <= 0 or h <= 0 or width <= 0 or height <= 0:
        return f"{where}: box size {w:g}x{h:g} on a {width:g}x{height:g} image must be positive"
    slack = 0.5  # half a pixel: rounding in published lists
    if x < -slack or y < -slack or x + w > width + slack or y + h > height + slack:
        return (f"{where}: box x {x:g}..{x + w:g}, y {y:g}..{y + h:g} lies outside the {width:g}x"
                f"{height:g} image its coordinates refer to")
    return Box(image, finding, x, y, w, h, width, height, line)


def box_in_view(box: Box, image_hw: tuple[int, int], size: int, resize: str = "squash") -> tuple[float, ...] | None:
    """The box in the model's input frame (``size`` × ``size`` pixels, the frame heatmaps are made in) as
    (x0, y0, x1, y1), following :class:`medsight.data.transforms.AspectResize`: ``squash`` stretches each
    axis, ``pad`` scales by the longer side and letterboxes, ``crop`` scales by the shorter side and cuts
    the centre (the box is clipped to it; None when nothing of it is left)."""
    h, w = image_hw
    sx, sy = w / box.width, h / box.height  # list coordinates -> this file's pixels
    x0, y0, x1, y1 = box.x * sx, box.y * sy, (box.x + box.w) * sx, (box.y + box.h) * sy
    if resize == "squash" or h == w:
        fx, fy, ox, oy = size / w, size / h, 0.0, 0.0
    elif resize in ("pad", "crop"):
        scale = size / (max(h, w) if resize == "pad" else min(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        fx, fy = nw / w, nh / h
        if resize == "pad":
            ox, oy = (size - nw) // 2, (size - nh) // 2
        else:  # torchvision's center_crop: top = round((nh - size) / 2)
            ox, oy = -int(round((nw - size) / 2.0)), -int(round((nh - size) / 2.0))
    else:
        raise BoxListError(f"boxes cannot be placed under resize policy {resize!r}")
    v = (x0 * fx + ox, y0 * fy + oy, x1 * fx + ox, y1 * fy + oy)
    c = (max(0.0, v[0]), max(0.0, v[1]), min(float(size), v[2]), min(float(size), v[3]))
    return c if c[2] > c[0] and c[3] > c[1] else None


def box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies in the box (x0, y0, x1, y1); a box smaller than a pixel keeps the pixel
    holding its centre."""
    hh, ww = shape
    cx, cy = np.arange(ww) + 0.5, np.arange(hh) + 0.5
    m = ((cy[:, None] >= box[1]) & (cy[:, None] < box[3])) & ((cx[None, :] >= box[0]) & (cx[None, :] < box[2]))
    if not m.any():
        m[min(hh - 1, int((box[1] + box[3]) / 2)), min(ww - 1, int((box[0] + box[2]) / 2))] = True
    return m


def default_tolerance(size: int) -> float:
    """Zhang et al.'s 15 px at 224 px, as the same share of a ``size``-pixel input."""
    return 15 * size / 224


def pointing_hits(maps: np.ndarray, boxes: np.ndarray, tolerance: float) -> np.ndarray:
    """1 where a map's maximum (the first, in row-major order, if tied) has its pixel centre within
    ``tolerance`` pixels of the box (x0, y0, x1, y1), else 0; an all-zero map points nowhere (0)."""
    n, hh, ww = maps.shape
    flat = maps.reshape(n, -1)
    idx = flat.argmax(1)
    px, py = idx % ww + 0.5, idx // ww + 0.5
    dx = np.maximum.reduce([boxes[:, 0] - px, np.zeros(n), px - boxes[:, 2]])
    dy = np.maximum.reduce([boxes[:, 1] - py, np.zeros(n), py - boxes[:, 3]])
    hit = np.hypot(dx, dy) <= tolerance
    return (hit & (flat.max(1) > 0)).astype(np.float64)


def energy_ratios(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's heat inside its box mask, divided by the mask's share of the image: 1 for a
    uniform map, above 1 when heat gathers in the box; an all-zero map scores 0."""
    total = maps.reshape(len(maps), -1).sum(1)
    inside = (maps * masks).reshape(len(maps), -1).sum(1)
    share = masks.reshape(len(masks), -1).mean(1)
    return np.where(total > 0, inside / np.maximum(total, 1e-12), 0.0) / share


def threshold_ious(maps: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """IoU of each map's region at or above ``threshold`` × its maximum with its box mask (0 for an
    all-zero map)."""
    peak = maps.reshape(len(maps), -1).max(1)
    region = (maps >= threshold * peak[:, None, None]) & (peak[:, None, None] > 0)
    inter = (region & masks).reshape(len(maps), -1).sum(1)
    union = (region | masks).reshape(len(maps), -1).sum(1)
    return inter / np.maximum(union, 1)


def centre_prior(size: int, sigma: float = 0.25) -> np.ndarray:
    """A Gaussian at the image centre with standard deviation ``sigma`` × the side: the trivial guess that
    findings lie mid-image."""
    c = np.arange(size) + 0.5 - size / 2
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * (sigma * size) ** 2))
    return g / g.max()


def random_maps(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Uniform noise maps: the chance yardstick."""
    return np.random.default_rng(seed).random((n, size, size))


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                   level: float = LEVEL) -> dict[str, Any]:
    """Mean, percentile-bootstrap interval (medsight's one bootstrap and its rule) and n of per-box scores."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    ci = bootstrap_cis(lambda idx: {"mean": float(v[idx].mean())}, len(v), n_boot, seed=seed, level=level)["mean"]
    return {"mean": float(v.mean()), "ci95": ci, "n": int(len(v))}


SCORES = ("pointing", "energy_ratio", "iou")


def score_maps(maps: np.ndarray, boxes: np.ndarray, tolerance: float, iou_threshold: float = 0.5
               ) -> dict[str, np.ndarray]:
    """Per box: pointing hit, energy ratio and IoU of ``maps`` (N, H, W) against ``boxes`` (N, 4) in the
    maps' pixel frame."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.stack([box_mask(b, maps.shape[1:]) for b in boxes])
    return {"pointing": pointing_hits(maps, boxes, tolerance), "energy_ratio": energy_ratios(maps, masks),
            "iou": threshold_ious(maps, masks, iou_threshold)}


def summarize(scores: Mapping[str, np.ndarray], findings: Sequence[str], n_boot: int = 1000, seed: int = 0
              ) -> dict[str, Any]:
    """Each score's mean with its bootstrap interval and n, overall and per finding."""
    f = np.asarray(findings)
    out: dict[str, Any] = {"overall": {k: bootstrap_mean(scores[k], n_boot, seed) for k in SCORES}, "findings": {}}
    for name in dict.fromkeys(findings):
        out["findings"][name] = {k: bootstrap_mean(scores[k][f == name], n_boot, seed) for k in SCORES}
    return out


def index_images(folders: Iterable[str | Path]) -> dict[str, Path]:
    """Image files under ``folders`` (recursively) by file name; a name found twice is ambiguous and left
    out (a box naming it is reported)."""
    from medsight.data.imageio import IMAGE_EXTS

    found: dict[str, Path] = {}
    twice: set[str] = set()
    for folder in folders:
        root = Path(folder).resolve()
        if root.is_file():
            files: Iterable[Path] = [root]
        elif root.is_dir():
            files = (f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        else:
            raise FileNotFoundError(f"no such image or folder: {folder}")
        for f in files:
            r = f.resolve()
            if not f.is_file() or (root.is_dir() and not r.is_relative_to(root)):
                continue  # links out of the folder are not followed
            if f.name in found and found[f.name] != r:
                twice.add(f.name)
            found[f.name] = r
    return {k: v for k, v in found.items() if k not in twice}


@dataclass
class Matched:
    """Boxes matched to an image file and to one of the model's outputs, and the rows left out (why)."""

    boxes: list[tuple[Box, Path, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def match_boxes(boxes: Sequence[Box], images: Mapping[str, Path], classes: Sequence[str],
                where: str = "the images given") -> Matched:
    """Each box with its image file and the index of its finding among ``classes`` (``FINDING_ALIASES``
    applied, case ignored); a row naming no image or a finding the model does not have is reported."""
    lookup = {c.casefold(): i for i, c in enumerate(classes)}
    for alias, name in FINDING_ALIASES.items():
        if name.casefold() in lookup:
            lookup.setdefault(alias, lookup[name.casefold()])
    out = Matched()
    for b in boxes:
        k = lookup.get(b.finding.casefold())
        if k is None:
            out.problems.append(f"{b.where()}: the model has no finding '{b.finding}' (it has "
                                f"{', '.join(classes)})")
        elif b.image not in images:
            out.problems.append(f"{b.where()}: no image named {b.image} in {where}")
        else:
            out.boxes.append((b, images[b.image], k))
    return out
