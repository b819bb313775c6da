"""Each task kind's metrics as people read them: the console line, the report's tables and the PASS/FAIL
checklist. The presentation of a task's metrics lives here, beside its figures (:mod:`medsight.reporting.figures`),
so that tasks compute and reporting presents.

A table is a typed :class:`MetricTable` (title, header, rows); every renderer (HTML report, ensemble report,
model card) reads those. A new task kind adds its functions to ``SUMMARIES``, ``TABLES`` and ``CHECKLISTS``
under its ``kind``; until it does, its scalar metrics are shown as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from medsight.metrics import checklist, format_ci, ordinal_checklist

if TYPE_CHECKING:
    from medsight.tasks import Task

__all__ = ["MetricTable", "summary_line", "metric_tables", "task_checklist"]


class MetricTable(NamedTuple):
    """One table of a report: its title, column names and rows (numbers are formatted by the renderer)."""

    title: str
    header: list[str]
    rows: list[list[Any]]


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _with_ci(x: float | None, ci: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}" + (f" {format_ci(ci)}" if ci else "")


# ------------------------------------------------------------------------------------------- summaries
def _single_label_summary(task: Task, m: dict[str, Any]) -> str:
    ci = m.get("ci95", {})
    line = (f"accuracy {_with_ci(m['accuracy'], ci.get('accuracy'))} · balanced {m['balanced_accuracy']:.4f} · "
            f"AUC {_with_ci(m['auc'], ci.get('auc'))} · ECE {m['ece']:.4f}")
    if "accuracy_at_threshold" in m:
        line += f"\n  accuracy {m['accuracy_at_threshold']:.4f} at the threshold chosen on val ({m['threshold']:.3f})"
    return line


def _ordinal_summary(task: Task, m: dict[str, Any]) -> str:
    ci, r = m.get("ci95", {}), m["refer"]
    line = (f"QWK {_with_ci(m['qwk'], ci.get('qwk'))} · accuracy {_with_ci(m['accuracy'], ci.get('accuracy'))} · "
            f"within one grade {m['within_one']:.4f} · MAE {m['mae']:.4f} · AUC {_with_ci(m['auc'], ci.get('auc'))}")
    if r.get("threshold") is not None:
        rc = r.get("ci95", {})
        line += (f"\n  refer (grade ≥ {task.classes[r['grade']]}) at the val threshold {r['threshold']:.3f}: "
                 f"sensitivity {_with_ci(r.get('sensitivity'), rc.get('sensitivity'))} · specificity "
                 f"{_with_ci(r.get('specificity'), rc.get('specificity'))} · AUC {_with_ci(r.get('auc'), rc.get('auc'))}")
    return line


def _multilabel_summary(task: Task, m: dict[str, Any]) -> str:
    line = (f"mean AUC {_with_ci(m['auc'], (m.get('ci95') or {}).get('auc'))} over {len(m['scored'])} findings · "
            f"micro AUC {_f(m['micro_auc'])} · mAP {_f(m['map'])} · exact match {m['exact_match']:.4f} · "
            f"Hamming {m['hamming_accuracy']:.4f}")
    if m["unscoreable"]:
        line += "\n  not scoreable: " + "; ".join(f"{c} ({w})" for c, w in m["unscoreable"].items())
    return line


# ---------------------------------------------------------------------------------------------- tables
def _single_label_tables(task: Task, metrics: dict[str, Any]) -> list[MetricTable]:
    test, val = metrics["test"], metrics.get("val", {})
    rows = [[key, val.get(key), test[key], format_ci(test.get("ci95", {}).get(key))]
            for key in ("accuracy", "balanced_accuracy", "auc", "ece", "accuracy_at_threshold") if key in test]
    per_class = [[c] + [m[k] for k in ("precision", "recall", "specificity", "f1", "support")]
                 for c, m in test["per_class"].items()]
    return [MetricTable("Metrics", ["metric", "val", "test", "95% CI"], rows),
            MetricTable("Per class (test)", ["class", "precision", "recall", "specificity", "F1", "support"], per_class)]


_ORDINAL_NAMES = {"qwk": "quadratic weighted kappa", "linear_kappa": "linear weighted kappa", "accuracy": "accuracy",
                  "within_one": "accuracy within one grade", "mae": "mean absolute grade error",
                  "balanced_accuracy": "balanced accuracy", "auc": "AUC (macro, one grade vs rest)", "ece": "ECE"}


def _ordinal_tables(task: Task, metrics: dict[str, Any]) -> list[MetricTable]:
    test, val = metrics["test"], metrics.get("val", {})

    def ci(d: dict[str, Any], key: str) -> str:
        return format_ci(d.get("ci95", {}).get(key))

    rows = [[label, val.get(key), test.get(key), ci(test, key)] for key, label in _ORDINAL_NAMES.items() if key in test]
    r, rv = test["refer"], val.get("refer", {})
    grade = task.classes[r["grade"]]
    refer_rows = [
        ["threshold (chosen on val)", rv.get("threshold"), r.get("threshold"), ""],
        [f"sensitivity (target {r.get('target_sensitivity', 0):.2f} on val)", rv.get("sensitivity"),
         r.get("sensitivity"), ci(r, "sensitivity")],
        ["specificity", rv.get("specificity"), r.get("specificity"), ci(r, "specificity")],
        ["AUC", rv.get("auc"), r.get("auc"), ci(r, "auc")],
        [f"sensitivity of decided grade ≥ {grade}", rv.get("sensitivity_at_grade"), r.get("sensitivity_at_grade"), ""],
        [f"specificity of decided grade ≥ {grade}", rv.get("specificity_at_grade"), r.get("specificity_at_grade"), ""],
        ["referable images / all", f"{rv.get('n_refer')} / {rv.get('n')}" if rv else "", f"{r['n_refer']} / {r['n']}", ""]]
    per_grade = [[c, test["auc_per_grade"].get(c)] + [m[k] for k in ("precision", "recall", "specificity", "f1", "support")]
                 for c, m in test["per_class"].items()]
    head = [f"head: {test.get('head')}"] + ([f"cut-points {', '.join(f'{c:.3f}' for c in test['cutpoints'])}"]
                                             if test.get("cutpoints") else [])
    return [MetricTable(f"Metrics ({'; '.join(head)})", ["metric", "val", "test", "95% CI"], rows),
            MetricTable(f"Referable: grade ≥ {grade}", ["", "val", "test", "95% CI"], refer_rows),
            MetricTable("Per grade (test)", ["grade", "AUC", "precision", "recall", "specificity", "F1", "support"],
                        per_grade)]


_MULTILABEL_ROWS = (("micro_auc", "micro AUC"), ("map", "mAP"), ("exact_match", "exact-match accuracy"),
                    ("hamming_accuracy", "Hamming accuracy"), ("balanced_accuracy", "mean balanced accuracy"),
                    ("ece", "mean ECE"))


def _multilabel_tables(task: Task, metrics: dict[str, Any]) -> list[MetricTable]:
    test, val = metrics["test"], metrics.get("val", {})
    rows = [["mean AUC (scoreable findings)", val.get("auc"), test["auc"], format_ci((test.get("ci95") or {}).get("auc"))]]
    rows += [[label, val.get(key), test.get(key), ""] for key, label in _MULTILABEL_ROWS]
    vf, not_fitted = val.get("findings", {}), test.get("thresholds_not_fitted", {})
    per = [[c, f"{f['positives']} / {f['n']}", f["prevalence"], f["auc"], format_ci((f.get("ci95") or {}).get("auc"), 3),
            f["ap"], f["threshold"], f["sensitivity"], f["specificity"], f["ece"], (vf.get(c) or {}).get("auc"),
            test["unscoreable"].get(c) or (f"threshold 0.5 (val: {not_fitted[c]})" if c in not_fitted else "")]
           for c, f in test["findings"].items()]
    tables = [MetricTable("Metrics", ["metric", "val", "test", "95% CI"], rows),
              MetricTable(f"Per finding (test; thresholds by {test.get('threshold_rule')} on validation)",
                          ["finding", "positives / labelled", "prevalence", "AUC", "95% CI", "AP", "threshold",
                           "sensitivity", "specificity", "ECE", "val AUC", "note"], per)]
    if test["unscoreable"]:
        tables.append(MetricTable("Not scoreable on test", ["finding", "why"],
                                  [[c, w] for c, w in test["unscoreable"].items()]))
    return tables


# ------------------------------------------------------------------------------------------ checklists
_BASIC = ("min_accuracy", "min_auc", "min_recall", "max_ece")


def _single_label_checklist(task: Task, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
    return checklist(m, **{k: thresholds.get(k) for k in _BASIC})


def _ordinal_checklist(task: Task, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
    return ordinal_checklist(m, **thresholds)


def _multilabel_checklist(task: Task, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
    scored = {**m, "per_class": {c: v for c, v in m["per_class"].items() if v["recall"] is not None}}
    return checklist(scored, **{k: thresholds.get(k) for k in _BASIC})


SUMMARIES: dict[str, Callable[[Task, dict[str, Any]], str]] = {
    "single_label": _single_label_summary, "ordinal": _ordinal_summary, "multilabel": _multilabel_summary}
TABLES: dict[str, Callable[[Task, dict[str, Any]], list[MetricTable]]] = {
    "single_label": _single_label_tables, "ordinal": _ordinal_tables, "multilabel": _multilabel_tables}
CHECKLISTS: dict[str, Callable[[Task, dict[str, Any], dict[str, float | None]], dict[str, Any] | None]] = {
    "single_label": _single_label_checklist, "ordinal": _ordinal_checklist, "multilabel": _multilabel_checklist}


def _scalars(m: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_line(task: Task, m: dict[str, Any]) -> str:
    """One console line for ``task``'s metrics on one split (:meth:`medsight.tasks.Task.metrics`)."""
    if task.kind in SUMMARIES:
        return SUMMARIES[task.kind](task, m)
    return " · ".join(f"{k} {v:.4f}" for k, v in _scalars(m).items())


def metric_tables(task: Task, metrics: dict[str, Any]) -> list[MetricTable]:
    """The report's tables for a run's metrics ({"val": ..., "test": ...})."""
    if task.kind in TABLES:
        return TABLES[task.kind](task, metrics)
    test, val = metrics["test"], metrics.get("val", {})
    return [MetricTable("Metrics", ["metric", "val", "test"], [[k, val.get(k), v] for k, v in _scalars(test).items()])]


def task_checklist(task: Task, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
    """PASS/FAIL lines for the configured thresholds (``checklist.*``), or None when none is set."""
    return CHECKLISTS.get(task.kind, _single_label_checklist)(task, m, thresholds)
