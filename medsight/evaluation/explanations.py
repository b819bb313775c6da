"""One trained run's explanations checked: heatmaps against a box list, and the saliency sanity checks.

:func:`audit_run` is what ``medsight explain RUN --boxes BOXES.csv`` and ``--sanity`` call: it finds the boxed
images (in the folders given, else beside the run's own data), scores every method against the boxes
(:func:`localize`), runs the cascading model-randomization test and, given
a run trained on shuffled labels, the data-randomization test (:mod:`medsight.explainers.sanity`), and
writes ``localization.json``, the overlays and a ``report.html``; with ``store``, the results also go into the
run's metrics.json, model card and report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.explainers.localization import (SCORES, Box, BoxListError, box_in_view, centre_prior, default_tolerance,
                                              index_images,
                                              match_boxes, random_maps, read_boxes, score_maps, summarize)
from medsight.inference.predictor import Predictor
from medsight.explainers.sanity import cascading_randomization, data_randomization

__all__ = ["audit_run", "run_checkpoint", "store_in_run", "localize"]

log = logging.getLogger(__name__)


def run_checkpoint(run: str | Path) -> Path:
    """A run folder's best.pt, or the checkpoint file itself."""
    p = Path(run)
    if p.is_dir():
        if not (p / "best.pt").is_file():
            raise FileNotFoundError(f"{p} holds no best.pt: give a medsight run folder or a checkpoint file")
        return p / "best.pt"
    return p


def _image_folders(pred: Any, images: Sequence[str | Path] | None) -> tuple[list[Path], str]:
    """Where boxed images are looked up: the folders given, else the folder of the run's own data."""
    if images:
        return [Path(i) for i in images], ", ".join(map(str, images))
    source = Path(str(pred.data_cfg.path or "")).expanduser()
    folder = source if source.is_dir() else source.parent if source.suffix.lower() == ".csv" else None
    if folder is None or not folder.is_dir():
        raise BoxListError(f"the run's data ({source or 'the embedded default'}) has no image files to match box "
                           f"names against: give the folder(s) holding the boxed images")
    return [folder], str(folder)


def _sanity_images(pred: Any, boxed: list[dict[str, Any]], paths: dict[str, Path], inputs: Sequence[str | Path] | None,
                   limit: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Normalized images and the output explained per image: the boxed images (their findings), else the
    images given, else a sample of the run's test split (the trained model's explained outputs)."""
    from medsight.data import ImageDataset, load_data
    from medsight.data.imageio import read_image
    from medsight.inference import collect_images

    if boxed:
        pairs = [(pred.preprocess(read_image(paths[b["image"]]))[0], pred.classes.index(b["finding"]))
                 for b in boxed[:limit]]
        return torch.stack([x for x, _ in pairs]), [k for _, k in pairs]
    if inputs:
        xs = [pred.preprocess(read_image(p))[0] for p in collect_images(inputs)[:limit]]
    else:
        split = load_data(pred.data_cfg).splits["test"]
        ds = ImageDataset(split, pred.transform)
        order = np.random.default_rng(seed).permutation(len(ds))
        xs = [item for item in (ds[int(i)][0] for i in order[: 2 * limit]) if item is not None][:limit]
    x = torch.stack(xs).to(pred.device)
    with torch.no_grad():
        probs = pred.task.probabilities(pred.model(x)).cpu().numpy()
    return x, [int(pred.task.readout.explained_output(p)) for p in probs]


def audit_run(run: str | Path, out: str | Path, boxes: str | Path | None = None,
              images: Sequence[str | Path] | None = None, methods: Sequence[str] = ("gradcam",),
              target_layer: str | None = None, box_size: tuple[float, float] | None = None,
              tolerance: float | None = None, iou_threshold: float = 0.5, sanity: bool = False,
              shuffled_run: str | Path | None = None, sanity_images: int = 32, n_boot: int = 1000, seed: int = 0,
              store: bool = False, device: str = "auto", max_overlays: int | None = None) -> dict[str, Any]:
    """Localization against ``boxes`` and/or the sanity checks for a run; writes ``out/localization.json``,
    overlays (``out/boxes/``) and ``out/report.html``.

    Args:
        run: a run folder (its best.pt) or a checkpoint.
        images: folders (or files) holding the boxed images, or the images for the sanity checks.
        box_size: the coordinates' image size for lists without width/height columns.
        shuffled_run: a run of the same model trained on shuffled labels, for the data-randomization test.
        store: also add the results to the run's metrics.json and redraw its model card and report.
        max_overlays: draw the overlays of the first boxes only (default: every box).
    """
    from medsight.inference import Predictor

    if boxes is None and not sanity:
        raise ValueError("nothing to check: give --boxes BOXES.csv and/or --sanity")
    pred = Predictor(run_checkpoint(run), device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"checkpoint": str(run_checkpoint(run)), "methods": list(methods)}
    paths: dict[str, Path] = {}
    boxed: list[dict[str, Any]] = []
    if boxes is not None:
        rows, problems = read_boxes(boxes, box_size)
        folders, where = _image_folders(pred, images)
        paths = index_images(folders)
        loc = localize(pred, rows, paths, methods, target_layer, tolerance, iou_threshold, n_boot, seed,
                       out=out / "boxes", where=where, problems=problems, max_overlays=max_overlays)
        loc["box_list"] = str(boxes)
        for line in loc["skipped"]:
            log.warning("box list: %s", line)
        result["localization"] = loc
        boxed = loc["boxes"]
    if sanity:
        x, cls = _sanity_images(pred, boxed, paths, None if boxes is not None else images, sanity_images, seed)
        result["sanity"] = _sanity_checks(pred, x, cls, methods, target_layer, shuffled_run, device, n_boot, seed)
    _write_checks(result, out)
    if store:
        result["stored"] = store_in_run(run, result)
    return result


def _sanity_checks(pred: Any, x: torch.Tensor, cls: list[int], methods: Sequence[str], target_layer: str | None,
                   shuffled_run: str | Path | None, device: str, n_boot: int, seed: int) -> dict[str, Any]:
    """The cascading model-randomization test and, given ``shuffled_run`` (the same model trained on shuffled
    labels), the data-randomization test."""
    from medsight.inference import Predictor

    checks: dict[str, Any] = {"cascading": cascading_randomization(pred.model, x, cls, methods, target_layer, seed,
                                                                   n_boot)}
    if shuffled_run is not None:
        other = Predictor(run_checkpoint(shuffled_run), device)
        if other.name != pred.name or other.classes != pred.classes:
            raise ValueError(f"--shuffled-run {shuffled_run} is a {other.name} with classes "
                             f"{', '.join(other.classes)}; the data-randomization test needs the same model "
                             f"({pred.name}, {', '.join(pred.classes)}) trained on shuffled labels")
        checks["data"] = data_randomization(pred.model, other.model, x, cls, methods, target_layer, n_boot, seed)
        checks["data"]["shuffled_run"] = str(shuffled_run)
    return checks


def _write_checks(result: dict[str, Any], out: Path) -> None:
    """``out/localization.json`` and ``out/report.html``."""
    from medsight.reporting.html import page
    from medsight.reporting.localization import localization_sections, overlays_html
    from medsight.reporting.model_card import to_html
    from medsight.utils.files import write_text_atomic

    write_text_atomic(json.dumps(result, indent=2), out / "localization.json")
    body = to_html(localization_sections(result)) + overlays_html(result, out)
    write_text_atomic(page(f"medsight explanation checks: {Path(result['checkpoint']).parent.name}", body),
                      out / "report.html")


def store_in_run(run: str | Path, result: dict[str, Any]) -> str:
    """The results under ``localization`` / ``sanity`` in the run's metrics.json, and its model card and report
    redrawn with them (when the run's data can still be read for the card's data section)."""
    from medsight.checkpoint import load_checkpoint
    from medsight.config import config_from_dict
    from medsight.data import DataError, load_data
    from medsight.reporting.html import write_report
    from medsight.reporting.model_card import model_card_sections, to_html, to_markdown
    from medsight.reporting.run_report import RunReport
    from medsight.tasks import task_from_checkpoint
    from medsight.utils.files import write_text_atomic

    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no metrics.json: --store needs a run folder")
    metrics = RunReport.read(path).added(**{k: result[k] for k in ("localization", "sanity") if k in result})
    metrics.write(path)
    ckpt = load_checkpoint(run_checkpoint(run))
    cfg = config_from_dict(ckpt["config"])
    try:
        summary = load_data(cfg.data).summary()
    except DataError as exc:
        log.warning("stored in %s; the report is not redrawn: the run's data cannot be read (%s)", path, exc)
        return str(path)
    card = model_card_sections(metrics, ckpt["config"], summary)
    write_text_atomic(to_markdown(card, folder.name), folder / "model_card.md")
    write_report(folder, cfg, metrics, task_from_checkpoint(ckpt), title=f"medsight run: {folder.name}",
                 card=to_html(card))
    return str(path)


def localize(pred: Predictor, boxes: Sequence[Box], images: Mapping[str, Path], methods: Sequence[str] = ("gradcam",),
             target_layer: str | None = None, tolerance: float | None = None, iou_threshold: float = 0.5,
             n_boot: int = 1000, seed: int = 0, out: str | Path | None = None, where: str = "the images given",
             problems: Sequence[str] = (), max_overlays: int | None = None) -> dict[str, Any]:
    """Score each method's heatmaps of the boxed findings against the boxes, beside a centre prior and a
    random map.

    Args:
        pred: a loaded checkpoint (:class:`medsight.inference.Predictor`).
        boxes: from :func:`read_boxes`; images: file name -> path (:func:`index_images`).
        methods: CAM methods (keys of :data:`medsight.explainers.EXPLAINERS`).
        tolerance: pointing-game tolerance in input pixels (default :func:`default_tolerance`).
        iou_threshold: the share of a map's maximum above which it counts as the map's region for IoU.
        out: a folder for one overlay PNG per box (the box drawn on the image and on each method's map), for
            the first ``max_overlays`` boxes (default: all).
        problems: rows already left out (from :func:`read_boxes`), carried into the result.

    Returns:
        ``settings``, ``methods`` (each method's and ``centre`` / ``random``'s scores overall and per finding),
        ``boxes`` (per box: where it landed and its scores) and ``skipped`` (the rows left out, why).
    """
    from medsight.explainers.cam import EXPLAINERS

    for m in methods:
        if m not in EXPLAINERS:
            raise ValueError(f"unknown explanation method {m!r}; choose from {', '.join(EXPLAINERS)}")
    view = pred.data_cfg
    if view.preset == "fundus":
        raise BoxListError("boxes cannot be placed on fundus-preset runs (the field-of-view crop differs per image)")
    size = pred.image_size
    tol = default_tolerance(size) if tolerance is None else float(tolerance)
    matched = match_boxes(boxes, images, pred.classes, where)
    skipped = list(problems) + matched.problems
    kept, maps = _box_heatmaps(pred, matched.boxes, methods, target_layer, skipped, out, max_overlays)
    if not kept:
        raise BoxListError("no box could be scored: " + "; ".join(skipped[:20]))
    all_maps = {m: np.stack(maps[m]) for m in methods}
    all_maps["centre"] = np.broadcast_to(centre_prior(size), (len(kept), size, size))
    all_maps["random"] = random_maps(len(kept), size, seed)
    result = _score_boxes(kept, all_maps, tol, iou_threshold, n_boot, seed)
    settings = {"image_size": size, "resize": view.resize, "tolerance_px": round(tol, 3),
                "iou_threshold": iou_threshold, "centre_sigma": 0.25, "n_boot": n_boot, "seed": seed,
                **pred.cam_layer(target_layer)}
    return {"settings": settings, "methods": result, "boxes": kept, "skipped": skipped}


def _box_heatmaps(pred: Predictor, matched: Sequence[tuple[Box, Path, int]], methods: Sequence[str],
                  target_layer: str | None, skipped: list[str], out: str | Path | None,
                  max_overlays: int | None) -> tuple[list[dict[str, Any]], dict[str, list[np.ndarray]]]:
    """The record of each box that can be scored and each method's heatmap of it (overlays drawn into ``out``
    for the first ``max_overlays``); the boxes that cannot are added to ``skipped``, with the reason."""
    from medsight.data.imageio import ImageReadError, read_image

    kept: list[dict[str, Any]] = []
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for box, path, k in matched:
        try:
            img = read_image(path)
        except ImageReadError as exc:
            skipped.append(f"{box.where()}: {exc}")
            continue
        v = _placed(box, img.shape[-2:], pred.image_size, pred.data_cfg.resize)
        if isinstance(v, str):
            skipped.append(v)
            continue
        heat = {m: pred.heatmap(img, m, target_layer, k) for m in methods}
        for m in methods:
            maps[m].append(heat[m])
        rec = {"image": box.image, "finding": pred.classes[k], "row": box.row, "box_input": [round(c, 2) for c in v],
               "probability": float(pred.probabilities(img)[k])}
        if out is not None and (max_overlays is None or len(kept) < max_overlays):
            rec["overlay"] = _draw(pred, img, heat, v, box, Path(out))
        kept.append(rec)
    return kept, maps


def _placed(box: Box, hw: tuple[int, int], size: int, resize: str) -> tuple[float, ...] | str:
    """The box in the input frame of an image of ``hw`` pixels, or why it cannot be placed there."""
    h, w = hw
    if abs((box.width / box.height) / (w / h) - 1) > 0.02:
        return (f"{box.where()}: its coordinates refer to a {box.width:g}x{box.height:g} image, but "
                f"{box.image} is {w}x{h} (another shape); give the coordinates' size (width,height "
                f"columns or --box-size)")
    v = box_in_view(box, (h, w), size, resize)
    if v is None:
        return f"{box.where()}: the box lies outside the part of the image the model sees (resize {resize})"
    return v


def _score_boxes(kept: list[dict[str, Any]], all_maps: Mapping[str, np.ndarray], tol: float, iou_threshold: float,
                 n_boot: int, seed: int) -> dict[str, Any]:
    """Each map set's scores summarized (overall and per finding); each box's own scores added to its record."""
    rect = np.array([r["box_input"] for r in kept], dtype=np.float64)
    findings = [r["finding"] for r in kept]
    result: dict[str, Any] = {}
    for name, mm in all_maps.items():
        s = score_maps(mm, rect, tol, iou_threshold)
        result[name] = summarize(s, findings, n_boot, seed)
        for r, *vals in zip(kept, *(s[k] for k in SCORES)):
            r.setdefault("scores", {})[name] = dict(zip(SCORES, (float(x) for x in vals)))
    return result


def _draw(pred: Predictor, img: Any, heat: Mapping[str, np.ndarray], v: Sequence[float], box: Box, out: Path) -> str:
    """The image and each method's overlay with the box drawn (in the display frame); returns the file name."""
    from medsight.explainers.cam import overlay
    from medsight.reporting.plots import plot_explanation

    disp = pred.display(img, max_side=256)
    dh, dw = disp.shape[:2]
    s = pred.image_size
    rect = (v[0] * dw / s, v[1] * dh / s, v[2] * dw / s, v[3] * dh / s)
    overlays = {m: overlay(disp, hm) for m, hm in heat.items()}
    stem = Path(box.image).stem
    name = f"box_{box.row:05d}_{stem}.png"
    out.mkdir(parents=True, exist_ok=True)
    plot_explanation(disp, overlays, f"{box.image}: {box.finding} (row {box.row})", out / name, box=rect)
    return name
