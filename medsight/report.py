"""After training: evaluate the best checkpoint, draw the figures, write metrics.json and report.html."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from medsight.checkpoint import load_model, save_atomic, write_text_atomic
from medsight.config import DEFAULT_DATA, Config, config_to_dict
from medsight.data import DataBundle, ImageDataset
from medsight.explain import BORDER_WARN, border_score, explain, overlay
from medsight.metrics import best_threshold, checklist, classification_metrics
from medsight.plots import plot_confusion, plot_curves, plot_faithfulness, plot_gallery, plot_roc

__all__ = ["finish_run", "write_report", "gradcam_gallery", "PNEUMONIAMNIST_BASELINES", "baseline_table"]

#: Published test-set results on PneumoniaMNIST (MedMNIST v2, Yang et al. 2023, Table 3).
PNEUMONIAMNIST_BASELINES = [
    ("ResNet-18 (28)", 0.944, 0.854),
    ("ResNet-18 (224)", 0.956, 0.864),
    ("ResNet-50 (28)", 0.948, 0.854),
    ("ResNet-50 (224)", 0.962, 0.884),
    ("auto-sklearn", 0.942, 0.855),
    ("AutoKeras", 0.947, 0.878),
    ("Google AutoML Vision", 0.991, 0.946),
]


def baseline_table(name: str, auc: float | None, acc: float) -> str:
    rows = [(f"medsight {name}", auc, acc)] + PNEUMONIAMNIST_BASELINES
    lines = [f"{'PneumoniaMNIST test':<28} {'AUC':>6} {'ACC':>6}"]
    for label, a, c in sorted(rows, key=lambda r: -(r[1] or 0)):
        mark = "  <-- this run" if label.startswith("medsight") else ""
        lines.append(f"{label:<28} {a if a is not None else float('nan'):>6.3f} {c:>6.3f}{mark}")
    return "\n".join(lines)


def _display(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).clamp(0, 1).numpy()


def gradcam_gallery(model: torch.nn.Module, ds: ImageDataset, probs: np.ndarray, labels: np.ndarray,
                    classes: list[str], device: torch.device, method: str, target_layer: str | None,
                    per_class: int, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Gallery rows (correct / misclassified per class) and border scores over a test sample.

    The scores are summarized overall and per explained (predicted) class: a shortcut usually belongs to
    one class (the marker on the positive cases), so the warning looks at the highest class mean.
    """
    rng = np.random.default_rng(seed)
    pred = probs.argmax(1)
    chosen: list[tuple[str, list[int]]] = []
    for c, name in enumerate(classes):
        for kind, mask in (("correct", (labels == c) & (pred == c)), ("misclassified", (labels == c) & (pred != c))):
            idx = np.flatnonzero(mask)
            pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
            chosen.append((f"{name}: {kind}", [int(i) for i in pick]))
    sample = rng.choice(len(labels), size=min(len(labels), 256), replace=False)
    wanted = sorted({i for _, ids in chosen for i in ids} | {int(i) for i in sample})
    size = ds.transform.transforms[0].size
    heat: dict[int, np.ndarray] = {}
    scores, explained = [], []
    for start in range(0, len(wanted), 64):
        ids = wanted[start:start + 64]
        items = [ds[i] for i in ids]
        keep = [(i, x) for i, (x, _) in zip(ids, items) if x is not None]
        if not keep:
            continue
        x = torch.stack([x for _, x in keep]).to(device)
        maps = explain(model, x, method=method, target_layer=target_layer)
        scores.append(border_score(maps).cpu())
        explained += [int(pred[i]) for i, _ in keep]
        for (i, _), m in zip(keep, maps.cpu().numpy()):
            heat[i] = m
    rows = []
    for title, ids in chosen:
        items = []
        for i in ids:
            if i not in heat:
                continue
            img = torch.nn.functional.interpolate(ds.load(i)[None], size=size, mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
            disp = _display(img)
            items.append({"image": disp, "overlay": overlay(disp, heat[i]),
                          "caption": f"pred {classes[pred[i]]} {probs[i, pred[i]]:.2f}"})
        rows.append({"title": title, "items": items})
    allscores = torch.cat(scores).numpy() if scores else np.empty(0)
    cls = np.array(explained)
    ok = ~np.isnan(allscores)  # empty maps have no location
    per = {classes[c]: float(allscores[ok & (cls == c)].mean()) for c in range(len(classes))
           if (ok & (cls == c)).sum() >= 3}
    mean = float(allscores[ok].mean()) if ok.any() else None
    worst = max(per.values()) if per else mean
    return rows, {"border_score_mean": mean, "border_score_per_class": per, "n": int(ok.sum()),
                  "border_warning": bool(worst is not None and worst > BORDER_WARN),
                  "border_score_max_class": worst}


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.warn { color: #a00; font-weight: bold; }
.note { color: #666; }
"""


def img_tag(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def save_predictions(out: Path, val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                     test_labels: np.ndarray, classes: list[str]) -> None:
    """``predictions.npz``: the validation and test probabilities that compare and ensemble work from."""
    np.savez_compressed(out / "predictions.npz", val_probs=val_probs, val_labels=val_labels, test_probs=test_probs,
                        test_labels=test_labels, classes=np.array(classes))


def fmt_cell(v: Any) -> str:
    """A table cell: floats to 4 places, None as n/a, everything HTML-escaped."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _fmt_scores(per: dict[str, float]) -> str:
    return ", ".join(f"{c} {v:.3f}" for c, v in per.items()) or "n/a"


def checklist_html(check: dict[str, Any] | None) -> str:
    """The validation checklist as an HTML table (empty when no thresholds are configured)."""
    if not check:
        return ""
    rows = "".join(f"<tr><td style='text-align:left'>{html.escape(c['check'])} {c['threshold']:g}</td>"
                   f"<td>{fmt_cell(c['value'])}</td><td>{'PASS' if c['pass'] else '<b>FAIL</b>'}</td></tr>"
                   for c in check["checks"])
    return (f"<h3>Validation checklist: {'PASS' if check['pass'] else 'FAIL'}</h3>"
            f"<table><tr><th>check</th><th>test value</th><th>result</th></tr>{rows}</table>")


def write_report(out: Path, cfg: Config, metrics: dict[str, Any], title: str = "medsight run") -> Path:
    """A self-contained HTML page (figures embedded) with config, metrics, plots and the gallery."""
    test = metrics["test"]
    val = metrics.get("val", {})
    rows = []
    for key in ("accuracy", "balanced_accuracy", "auc", "ece", "accuracy_at_threshold"):
        if key in test:
            ci = test.get("ci95", {}).get(key)
            ci_txt = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            rows.append(f"<tr><td>{key}</td><td>{fmt_cell(val.get(key))}</td><td>{fmt_cell(test[key])}{ci_txt}</td></tr>")
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{fmt_cell(m[k])}</td>" for k in
                                                   ("precision", "recall", "specificity", "f1", "support")) + "</tr>"
        for c, m in test["per_class"].items())
    expl = metrics.get("explain", {})
    warn = ""
    if expl.get("border_warning"):
        warn = (f'<p class="warn">⚠ Border score {expl["border_score_max_class"]:.3f} &gt; {BORDER_WARN} (highest class mean): the '
                f'heatmaps concentrate on image borders/corners — check for shortcuts (markers, text, '
                f'collimation).</p>')
    baseline = metrics.get("baselines")
    baseline_html = f"<h2>Published baselines</h2><pre>{html.escape(baseline)}</pre>" if baseline else ""
    skipped = metrics.get("skipped_files", [])
    skipped_html = (f"<p class='warn'>{len(skipped)} unreadable file(s) skipped: "
                    f"{html.escape(', '.join(skipped[:20]))}</p>") if skipped else ""
    check_html = checklist_html(metrics.get("checklist"))
    faith = metrics.get("faithfulness")
    faith_html = ""
    if faith:
        rows_f = "".join(f"<tr><td>{html.escape(m)}</td><td>{v['deletion_auc']:.3f}</td><td>{v['insertion_auc']:.3f}</td></tr>"
                         for m, v in faith["methods"].items())
        faith_html = (f"<h3>Faithfulness ({faith['images']} test images)</h3><p>Deletion: the probability of the "
                      f"explained class as the hottest pixels are replaced by the mean colour (lower area = more faithful); "
                      f"insertion: as they are restored (higher = more faithful). The random map is the yardstick."
                      f"</p><table><tr><th>method</th><th>deletion AUC ↓</th><th>insertion AUC ↑</th></tr>{rows_f}"
                      f"</table>{img_tag(out / 'faithfulness.png')}")
    sh = metrics.get("sharpness")
    sharp_html = (f"<h3>Sharpness</h3><p>max L(w+ε) − L(w) over ‖ε‖ ≤ {sh['rho']:g} on {sh['images']} training "
                  f"images: gradient ascent {sh['ascent']:.4f}, random directions {sh['random']:.4f} "
                  f"(loss at w {sh['loss']:.4f}). Flatter minima (smaller values) tend to generalize better.</p>"
                  if sh else "")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Research use only — not for clinical use. Model {html.escape(cfg.model.name)} ·
optimizer {html.escape(cfg.optim.name)} · best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')} ·
{metrics.get('parameters', 0) / 1e6:.2f}M parameters · data {html.escape(str(metrics.get('data')))}</p>
{skipped_html}
<h2>Metrics</h2>
<table><tr><th>metric</th><th>val</th><th>test (95% CI)</th></tr>{''.join(rows)}</table>
<h3>Per class (test)</h3>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>specificity</th><th>F1</th><th>support</th></tr>
{per_class}</table>
<pre>{html.escape(test.get('report', ''))}</pre>
{check_html}{baseline_html}{sharp_html}
<h2>Training curves</h2>{img_tag(out / 'curves.png')}
<h2>Confusion matrix and ROC</h2>{img_tag(out / 'confusion_matrix.png')} {img_tag(out / 'roc.png')}
<h2>Grad-CAM gallery ({html.escape(expl.get('method', ''))}, layer {html.escape(str(expl.get('target_layer')))})</h2>
<p>Mean border score over {expl.get('n', 0)} test images: {fmt_cell(expl.get('border_score_mean'))}; per explained
class: {html.escape(_fmt_scores(expl.get('border_score_per_class', {})))}
(share of heat in the outer 10% band; a uniform map scores 0.36).</p>{warn}
{img_tag(out / 'gradcam_gallery.png')}
{faith_html}
<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))}</pre>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(page, path)
    return path


def finish_run(out: Path, cfg: Config, bundle: DataBundle, val_loader: DataLoader, test_loader: DataLoader,
               test_ds: ImageDataset, device: torch.device, history: list[dict[str, float]], best_epoch: int,
               skipped: list[str], n_params: int, train_ds: ImageDataset | None = None) -> dict[str, Any]:
    """Reload best.pt, evaluate on val and test, measure sharpness, write figures, metrics.json, report.html."""
    from medsight.models import cam_target
    from medsight.train import predict_proba

    model, ckpt = load_model(out / "best.pt", device)
    model = model.to(memory_format=torch.channels_last)
    vp, vl, _, _ = predict_proba(model, val_loader, device, desc="val")
    tp, tl, _, _ = predict_proba(model, test_loader, device, desc="test")
    classes = bundle.classes
    threshold = best_threshold(vl, vp) if len(classes) == 2 and len(np.unique(vl)) == 2 else None
    if threshold is not None:  # kept with the model: `medsight evaluate` reports accuracy at it too
        save_atomic({**ckpt, "threshold": float(threshold)}, out / "best.pt")
    val_m = classification_metrics(vl, vp, classes, n_boot=0, threshold=threshold)
    test_m = classification_metrics(tl, tp, classes, n_boot=1000, seed=cfg.train.seed, threshold=threshold)
    plot_curves(history, out / "curves.png", best_epoch)
    plot_confusion(test_m["confusion_matrix"], classes, out / "confusion_matrix.png")
    plot_roc({"val": (vl, vp), "test": (tl, tp)}, classes, out / "roc.png")
    layer = cam_target(model, cfg.explain.target_layer, img_size=cfg.data.image_size).name
    rows, border_info = gradcam_gallery(model, test_ds, tp, tl, classes, device, cfg.explain.method,
                                             cfg.explain.target_layer, cfg.explain.gallery_per_class,
                                             seed=cfg.train.seed)
    plot_gallery(rows, out / "gradcam_gallery.png")
    metrics: dict[str, Any] = {
        "val": val_m, "test": test_m, "classes": classes, "best_epoch": best_epoch, "epochs_run": len(history),
        "monitor": cfg.train.monitor, "parameters": n_params, "data": bundle.source,
        "train_seconds": float(sum(r["seconds"] for r in history)),
        "explain": {"method": cfg.explain.method, "target_layer": layer, **border_info},
        "skipped_files": skipped,
    }
    from medsight.sharpness import fixed_batches

    if cfg.explain.faithfulness_images:
        from medsight.faithfulness import faithfulness

        sample = fixed_batches(test_ds, 1, batch_size=cfg.explain.faithfulness_images, seed=cfg.train.seed)
        if sample:
            faith = faithfulness(model, sample[0][0].to(device), cfg.explain.faithfulness_methods,
                                 cfg.explain.target_layer, seed=cfg.train.seed)
            metrics["faithfulness"] = faith
            plot_faithfulness(faith, out / "faithfulness.png")
    check = checklist(test_m, **dataclasses.asdict(cfg.checklist))
    if check:
        metrics["checklist"] = check
    save_predictions(out, vp, vl, tp, tl, classes)
    if train_ds is not None and cfg.train.sharpness_batches:
        from medsight.sharpness import sharpness

        batches = fixed_batches(train_ds, cfg.train.sharpness_batches, batch_size=64, seed=cfg.train.seed)
        metrics["sharpness"] = sharpness(model, batches, rho=cfg.optim.rho, seed=cfg.train.seed)
    if Path(bundle.source) == DEFAULT_DATA:
        metrics["baselines"] = baseline_table(cfg.model.name, test_m["auc"], test_m["accuracy"])
    write_text_atomic(json.dumps(metrics, indent=2), out / "metrics.json")
    write_report(out, cfg, metrics, title=f"medsight run: {out.name}")
    ci = test_m.get("ci95", {})
    auc_ci = ci.get("auc")
    print(f"test: accuracy {test_m['accuracy']:.4f} [{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}] · "
          f"balanced {test_m['balanced_accuracy']:.4f} · AUC "
          + (f"{test_m['auc']:.4f} [{auc_ci[0]:.4f}, {auc_ci[1]:.4f}]" if auc_ci else "n/a")
          + f" · ECE {test_m['ece']:.4f}")
    if "accuracy_at_threshold" in test_m:
        print(f"test: accuracy {test_m['accuracy_at_threshold']:.4f} at the threshold chosen on val "
              f"({test_m['threshold']:.3f})")
    if "checklist" in metrics:
        failed = [f"{c['check']} {c['threshold']:g}" for c in metrics["checklist"]["checks"] if not c["pass"]]
        print(f"checklist: {'PASS' if not failed else 'FAIL (' + '; '.join(failed) + ')'}")
    if "sharpness" in metrics:
        sh = metrics["sharpness"]
        print(f"sharpness (rho {sh['rho']:g}, {sh['images']} training images): ascent {sh['ascent']:.4f} · "
              f"random {sh['random']:.4f} · loss {sh['loss']:.4f}")
    if border_info["border_warning"]:
        print(f"WARNING: Grad-CAM border score {border_info['border_score_max_class']:.3f} > {BORDER_WARN} "
              f"(highest class mean; per class {_fmt_scores(border_info['border_score_per_class'])}): the model may rely on "
              f"image borders/corners (shortcut); see {out / 'report.html'}")
    if "baselines" in metrics:
        print(metrics["baselines"])
    print(f"run folder: {out}  (report: {out / 'report.html'})")
    return metrics
