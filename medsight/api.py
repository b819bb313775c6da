"""The user-level functions behind the CLI and the web app: evaluate, predict, explain files, sharpness.

Each composes the layers below (data, inference, explainers, reporting, evaluation) and writes files
only where the user asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsight.checkpoint import Trained, load_trained
from medsight.config import CamMethod, choices
from medsight.data import (DataError, ImageDataset, ImageReadError, label_counts, label_policy, load_data,
                           load_eval_data, make_loader, read_image)
from medsight.errors import MedsightError, UsageError
from medsight.evaluation.robustness import robustness
from medsight.evaluation.trust import decision_probs, measure
from medsight.evaluation.sharpness import fixed_batches, sharpness
from medsight.explainers.cam import overlay
from medsight.inference import collect_images, load_predictor
from medsight.inference.predictor import predict_logits
from medsight.reporting.figures import task_figures
from medsight.reporting.html import img_tag, page
from medsight.reporting.model_card import model_card_sections, to_html, to_markdown
from medsight.reporting.plots import plot_explanation, plot_robustness
from medsight.reporting.run_report import RunReport
from medsight.utils.device import resolve_device
from medsight.utils.files import PRIVATE_DIR, make_private, write_text_atomic

__all__ = ["evaluate", "predict", "explain_files", "checkpoint_sharpness", "robustness_check", "OutputExistsError"]


class OutputExistsError(MedsightError, FileExistsError):
    """An output folder that holds results medsight must not overwrite."""


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], device: str = "auto",
            onnx: bool | None = None) -> list[dict[str, Any]]:
    """The task's answer per image (label and probabilities); unreadable files get an ``error`` entry.

    ``onnx`` runs an exported model in onnxruntime (default: when the file name ends in ``.onnx``).
    """
    pred = load_predictor(checkpoint, device, onnx)
    results = []
    for path in collect_images(inputs):
        try:
            rec = pred.predict(read_image(path))
        except ImageReadError as exc:
            results.append({"file": str(path), "error": str(exc)})
            continue
        rec.pop("probability", None)
        results.append({"file": str(path), **rec})
    return results


def _eval_data(trained: Trained, data: str, prefer: Sequence[str] = ("test", "all")) -> Any:
    """Images of ``data`` for a checkpoint, read with the run's own multi-label policies."""
    task = trained.task
    return load_eval_data(data, task.classes, prefer, multilabel=task.kind == "multilabel",
                          label_policy=label_policy(trained.config.data))


def _check_eval_out(out: Path) -> None:
    if (out / "best.pt").exists() or (out / "last.pt").exists():
        raise OutputExistsError(f"{out} is a run folder; evaluating into it would replace the run's own metrics.json "
                                f"and plots. Give a new folder, e.g. --out {out / 'external'}")
    if (out / "metrics.json").exists():
        raise OutputExistsError(f"{out} already holds a metrics.json; give another --out")


def evaluate(checkpoint: str | Path, data: str, out: str | Path | None = None, device: str = "auto",
             batch_size: int = 128) -> dict[str, Any]:
    """Re-evaluate a trained model on another data set (its test split, or every image if unsplit): external
    validation. The decision rule, temperature, operating points, conformal quantile and abstention threshold
    stay the ones fitted on the model's own validation data; calibration, coverage and subgroup gaps are
    measured on the new data. With ``out``: metrics.json, figures, model_card.md and report.html."""
    if out is not None:
        _check_eval_out(Path(out))
    dev = resolve_device(device)
    trained = load_trained(checkpoint, dev)
    model, ckpt, task, cfg = trained.model, trained.checkpoint, trained.task, trained.config
    split, source = _eval_data(trained, data)
    ds = ImageDataset(split, trained.transform())
    logits, labels, skipped = predict_logits(model, make_loader(ds, batch_size, False, 0), dev, tta=True)
    probs = decision_probs(task, logits)
    metrics = task.metrics(labels, probs, n_boot=1000)
    result = {"checkpoint": str(checkpoint), "data": source, "task": task.kind, "classes": task.classes,
              "test": metrics, "skipped_files": skipped}
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        out_path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    result["trust"] = measure(task, cfg.eval, logits, labels, meta=split.meta, out=out_path, seed=cfg.train.seed)
    if out_path is not None:
        figures = task_figures(task, out_path, {Path(source).name: (labels, probs)}, metrics, title=f"{source}")
        result["figures"] = figures + result["trust"].pop("figures")
        report = RunReport.of(result)
        report.write(out_path / "metrics.json")
        summary = {"source": source, "classes": task.classes,
                   "counts": {"external": label_counts(labels, len(task.classes))}, "images": {"external": len(labels)},
                   "patients": {"external": len(set(split.groups)) if split.groups else None},
                   "notes": [f"external validation of {checkpoint}: the rules fitted on the model's own validation "
                             f"data, measured on this data"]}
        card = model_card_sections(report, ckpt["config"], summary)
        write_text_atomic(to_markdown(card, f"{Path(checkpoint).parent.name} on {Path(source).name}"),
                          out_path / "model_card.md")
        figs = " ".join(img_tag(out_path / f) for f in result["figures"])
        write_text_atomic(page(f"medsight external validation: {Path(source).name}",
                               f"<h2>Figures</h2>{figs}<h2>Model card</h2>{to_html(card)}"), out_path / "report.html")
        make_private(out_path, only=["metrics.json", "model_card.md", "report.html", *result["figures"]])
    return result


def robustness_check(checkpoint: str | Path, data: str | None = None, out: str | Path | None = None,
                     device: str = "auto", corruptions: Sequence[str] | None = None, seed: int = 0,
                     batch_size: int = 128, write: bool = False) -> dict[str, Any]:
    """The checkpoint's metric under corruptions × 3 severities on its own test split (or on ``data``).

    ``out``: robustness.json and robustness.png there; ``write``: the result is also stored under
    ``"robustness"`` in the metrics.json beside the checkpoint (and its model card refers to it).
    """
    dev = resolve_device(device)
    trained = load_trained(checkpoint, dev)
    model, task = trained.model, trained.task
    if data is None:
        stored = trained.config.data
        try:
            bundle = load_data(stored)
        except DataError as exc:
            raise DataError(f"the data {checkpoint} was trained on cannot be found ({exc}); give it with --data "
                            f"(a folder, CSV or .npz with the classes {', '.join(task.classes)})") from None
        split, source = bundle.splits["test"], bundle.source
    else:
        split, source = _eval_data(trained, data)
    result = robustness(model, task, split, trained.transform(), dev, corruptions=list(corruptions or []) or None,
                        batch_size=batch_size, seed=seed)
    result["data"] = source
    if out is not None:
        o = Path(out)
        o.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        write_text_atomic(json.dumps(result, indent=2), o / "robustness.json")
        plot_robustness(result, o / "robustness.png")
        make_private(o, only=["robustness.json", "robustness.png"])
    metrics_path = Path(checkpoint).parent / "metrics.json"
    if write and metrics_path.is_file():
        RunReport.read(metrics_path).added(robustness=result).write(metrics_path)
        result["written"] = str(metrics_path)
    return result


def explain_files(checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path, method: str = "gradcam",
                  target_layer: str | None = None, class_idx: int | None = None, compare: bool = False,
                  device: str = "auto") -> list[dict[str, Any]]:
    """Per image: an overlay PNG (original beside heatmap, decision and probability in the title) and one
    JSON line in ``out/explanations.jsonl``. ``compare`` draws every method side by side."""
    pred = load_predictor(checkpoint, device, onnx=False)
    if class_idx is not None and not 0 <= class_idx < len(pred.classes):
        raise UsageError(f"class index {class_idx} is out of range: the model has {len(pred.classes)} classes "
                         f"({', '.join(f'{i}={c}' for i, c in enumerate(pred.classes))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(choices(CamMethod)) if compare else [method]
    layer = pred.cam_layer(target_layer) if hasattr(pred, "cam_layer") else {"target_layer": target_layer}
    lines, results = [], []
    for path in collect_images(inputs):
        try:
            img = read_image(path)
        except ImageReadError as exc:
            rec = {"file": str(path), "error": str(exc)}
            results.append(rec)
            lines.append(json.dumps(rec))
            continue
        probs = pred.probabilities(img)
        record = pred.task.readout.record(probs)
        target = class_idx if class_idx is not None else pred.task.readout.explained_output(probs)
        disp = pred.display(img)
        overlays, borders = {}, {}
        for m in methods:
            heat = pred.heatmap(img, m, target_layer, target)
            overlays[m] = overlay(disp, heat)
            borders[m] = pred.border(heat)  # None: an empty map; inside the field of view for fundus images
        png = out / f"{path.stem}_{'compare' if compare else method.replace('+', 'p')}.png"
        plot_explanation(disp, overlays, f"{path.name}: predicted {record['label']} ({record['probability']:.3f})"
                         f" · explaining '{pred.classes[target]}'", png)
        rec = {"file": str(path), **record, "explained_class": pred.classes[target], "methods": methods,
               **layer, "border_score": borders, "overlay": str(png)}
        results.append(rec)
        lines.append(json.dumps(rec))
    write_text_atomic("\n".join(lines) + "\n", out / "explanations.jsonl")
    return results


def checkpoint_sharpness(checkpoint: str | Path, data: str | None = None, rho: float = 0.05, n_batches: int = 4,
                         device: str = "auto", seed: int = 0, write: bool = True) -> dict[str, Any]:
    """ρ-sharpness of a checkpoint on fixed batches of its training images (or of ``data``).

    With ``write``, the result is added under ``"sharpness"`` to the metrics.json beside the checkpoint.
    """
    if not rho > 0:
        raise UsageError(f"--rho must be > 0, got {rho}")
    if n_batches < 1:
        raise UsageError(f"--batches must be >= 1, got {n_batches}")
    dev = resolve_device(device)
    trained = load_trained(checkpoint, dev)
    model, task = trained.model, trained.task
    if data is None:
        bundle = load_data(trained.config.data)
        split, source = bundle.splits["train"], bundle.source
    else:
        split, source = _eval_data(trained, data, prefer=("train", "all", "val", "test"))
    ds = ImageDataset(split, trained.transform())
    result = sharpness(model, fixed_batches(ds, n_batches, seed=seed), rho=rho, loss_fn=task.head.eval_loss(), seed=seed)
    result["data"] = source
    metrics_path = Path(checkpoint).parent / "metrics.json"
    if write and metrics_path.is_file():
        RunReport.read(metrics_path).added(sharpness={k: v for k, v in result.items() if k != "written"}).write(
            metrics_path)
        result["written"] = str(metrics_path)
    return result
