"""The run's HTML report: self-contained (figures embedded), with the task's tables and figures."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medsight.config import Config, config_to_dict
from medsight.explainers.cam import BORDER_WARN
from medsight.reporting.run_report import RunReport
from medsight.reporting.tables import metric_tables
from medsight.utils.files import write_text_atomic

if TYPE_CHECKING:
    from medsight.tasks import Task

__all__ = ["write_report", "PNEUMONIAMNIST_BASELINES", "baseline_table", "STYLE", "img_tag", "fmt_cell",
           "checklist_html", "html_table", "page"]

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


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    """A self-contained HTML page with medsight's style and the research-use notice."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='warn'>Research software: not for clinical use.</p>{body}</body></html>")


def _faithfulness_html(faith: dict[str, Any] | None, out: Path) -> str:
    if not faith:
        return ""
    rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{v['deletion_auc']:.3f}</td><td>{v['insertion_auc']:.3f}</td></tr>"
                   for m, v in faith["methods"].items())
    return (f"<h3>Faithfulness ({faith['images']} test images)</h3><p>Deletion: the probability of the "
            f"explained class as the hottest pixels are replaced by the mean colour (lower area = more faithful); "
            f"insertion: as they are restored (higher = more faithful). The random map is the yardstick."
            f"</p><table><tr><th>method</th><th>deletion AUC ↓</th><th>insertion AUC ↑</th></tr>{rows}"
            f"</table>{img_tag(out / 'faithfulness.png')}")


def _sharpness_html(sh: dict[str, Any] | None) -> str:
    return (f"<h3>Sharpness</h3><p>max L(w+ε) − L(w) over ‖ε‖ ≤ {sh['rho']:g} on {sh['images']} training "
            f"images: gradient ascent {sh['ascent']:.4f}, random directions {sh['random']:.4f} "
            f"(loss at w {sh['loss']:.4f}). Flatter minima (smaller values) tend to generalize better.</p>"
            if sh else "")


def _gallery_html(expl: dict[str, Any], out: Path) -> str:
    warn = ""
    if expl.get("border_warning"):
        warn = (f'<p class="warn">⚠ Border score {expl["border_score_max_class"]:.3f} &gt; {BORDER_WARN} (highest class mean): the '
                f'heatmaps concentrate on image borders/corners — check for shortcuts (markers, text, '
                f'collimation).</p>')
    return f"""<h2>Grad-CAM gallery ({html.escape(expl.get('method', ''))}, layer {html.escape(str(expl.get('target_layer')))})</h2>
<p>Mean border score over {expl.get('n', 0)} test images: {fmt_cell(expl.get('border_score_mean'))}; per explained
class: {html.escape(_fmt_scores(expl.get('border_score_per_class', {})))}
(share of heat in the outer 10% band; a uniform map scores 0.36).</p>{warn}
{img_tag(out / 'gradcam_gallery.png')}"""


def write_report(out: Path, cfg: Config, metrics: RunReport | dict[str, Any], task: Task, title: str = "medsight run",
                 card: str = "") -> Path:
    """A self-contained HTML page (figures embedded) with config, metrics, plots and the gallery, from the run's
    report; the metric tables and test figures are the task's; ``card`` is the model card's HTML."""
    report = RunReport.of(metrics)
    tables = "".join(f"<h3>{html.escape(name)}</h3>{html_table(header, rows)}"
                     for name, header, rows in metric_tables(task, report.plain()))
    figures = " ".join(img_tag(out / f) for f in report.figures)
    baseline_html = (f"<h2>Published baselines</h2><pre>{html.escape(report.baselines)}</pre>"
                     if report.baselines else "")
    skipped = report.skipped_files
    skipped_html = (f"<p class='warn'>{len(skipped)} unreadable file(s) skipped: "
                    f"{html.escape(', '.join(skipped[:20]))}</p>") if skipped else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Research use only — not for clinical use. Model {html.escape(cfg.model.name)} ·
optimizer {html.escape(cfg.optim.name)} · best epoch {report.best_epoch} of {report.epochs_run} ·
{(report.parameters or 0) / 1e6:.2f}M parameters · data {html.escape(str(report.data))}</p>
{skipped_html}
<h2>Metrics ({html.escape(task.kind.replace('_', '-'))})</h2>
{tables}
<pre>{html.escape(report.test.get('report', ''))}</pre>
{checklist_html(report.checklist)}{baseline_html}{_sharpness_html(report.sharpness)}
<h2>Training curves</h2>{img_tag(out / 'curves.png')}
<h2>Test figures</h2>{figures}
{_gallery_html(report.explain or {}, out)}
{_faithfulness_html(report.faithfulness, out)}
{f"<h2>Model card</h2>{card}" if card else ""}
<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))}</pre>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(page, path)
    return path
