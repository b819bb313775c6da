"""The cases of metrics_before_after.py: every task kind's metrics, summary, report tables and checklist, the operating
points and the subgroup audit, on fixed predictions, dumped as JSON (argv[1]); argv[2]: a predictions.npz."""
import json
import sys

import numpy as np

from medsight.config import Config, apply_overrides
from medsight.tasks import build_task
from medsight.evaluation.subgroups import subgroup_metrics
from medsight.metrics.operating_points import choose_threshold, operating_point

rng = np.random.default_rng(0)
out = {}

def probs_for(labels, k, strength):
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += strength
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)

def present(task, mt, metrics, thresholds):
    """The console line, report tables and checklist: in reporting since the Task seam was split, on the task
    before (this script runs under both source trees)."""
    try:
        from medsight.reporting.tables import metric_tables, summary_line, task_checklist
    except ImportError:
        return task.summary(mt), task.report_tables(metrics), task.checklist(mt, thresholds)
    return summary_line(task, mt), [list(t) for t in metric_tables(task, metrics)], task_checklist(task, mt, thresholds)

def fitted(task):
    """The fitted decision rule, under either tree (a typed FittedRules now, a dict before), keys as before."""
    renamed = {"logit_offset": "loss_logit_offset", "threshold_rule": "rule", "thresholds_not_fitted": "not_fitted"}
    rules = task.rules.state() if hasattr(task, "rules") else task.decision
    return {renamed.get(k, k): v for k, v in rules.items() if v is not None and not (isinstance(v, (list, dict, bool)) and not v)}

def run_task(name, task, yv, pv, yt, pt):
    task.fit_decision(yv, pv)
    mt = task.metrics(yt, pt, n_boot=1000, seed=0)
    mv = task.metrics(yv, pv, n_boot=0)
    mt.pop("report", None); mv.pop("report", None)
    metrics = {"test": mt, "val": mv}
    thresholds = {"min_accuracy": 0.5, "min_auc": 0.6, "min_recall": 0.3, "max_ece": 0.2,
                  **({"min_qwk": 0.3, "min_refer_sensitivity": 0.8} if task.kind == "ordinal" else {})}
    summary, tables, check = present(task, mt, metrics, thresholds)
    out[name] = {"decision": {"kind": task.kind, "classes": task.classes, "options": task.options, "fitted": fitted(task)},
                 "test": mt, "val": mv, "summary": summary, "tables": tables, "checklist": check}

# single label: the default run's own predictions when given, else simulated
if len(sys.argv) > 2:
    z = np.load(sys.argv[2])
    yv, pv, yt, pt = z["val_labels"], z["val_probs"], z["test_labels"], z["test_probs"]
else:
    yv, yt = rng.integers(0, 2, 300), rng.integers(0, 2, 600)
    pv, pt = probs_for(yv, 2, 1.0), probs_for(yt, 2, 1.0)
run_task("binary", build_task("single_label", ["normal", "pneumonia"]), yv, pv, yt, pt)
y3v, y3t = rng.integers(0, 3, 200), rng.integers(0, 3, 400)
run_task("three_class", build_task("single_label", ["a", "b", "c"]), y3v, probs_for(y3v, 3, 1.2), y3t, probs_for(y3t, 3, 1.2))
for head in ("ce", "regression", "corn"):
    cfg = apply_overrides(Config(), ["data.task=ordinal", f"train.ordinal={head}"])
    g5v, g5t = rng.integers(0, 5, 300), rng.integers(0, 5, 400)
    run_task(f"ordinal_{head}", build_task("ordinal", [str(i) for i in range(5)], g5v, cfg),
             g5v, probs_for(g5v, 5, 1.0), g5t, probs_for(g5t, 5, 1.0))
# multi-label with masked labels and a rare finding
k = 6
def ml(n):
    y = (rng.random((n, k)) < np.array([0.3, 0.2, 0.1, 0.05, 0.02, 0.4])).astype(float)
    y[rng.random((n, k)) < 0.1] = -1
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.5 * (y == 1) - 1)))
    return y, p
ymv, pmv = ml(300); ymt, pmt = ml(500)
run_task("multilabel", build_task("multilabel", [f"f{i}" for i in range(k)], ymv), ymv, pmv, ymt, pmt)
yb, sb = yt == 1, pt[:, 1]
for tgt in ((None, None), (0.9, None), (None, 0.9)):
    t = choose_threshold(yv == 1, pv[:, 1], *tgt)
    out[f"operating_point_{tgt}"] = operating_point(yb, sb, t, n_boot=1000, seed=0)
groups = [("F", "M", "X")[i % 3] if i % 7 else "small" for i in range(len(yb))]
out["subgroups"] = subgroup_metrics(yb, sb, 0.5, groups, min_size=20, n_boot=1000, seed=0)
json.dump(out, open(sys.argv[1], "w"), indent=1, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
