"""The Task seam in three parts: a slim Task (label strategy), typed fitted rules that old checkpoints still
fill, heads as strategy objects, and presentation in reporting."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsight.tasks import (TASKS, FittedRules, MultiLabelTask, OrdinalTask, RulesError, SingleLabelTask,
                            fresh_task, task_from_state)
from medsight.tasks.heads import Corn, DistanceSmoothed, GradeHead, Regression

ROOT = Path(__file__).resolve().parent.parent


def _members(cls_node: ast.ClassDef) -> set[str]:
    """Names a class body defines, plus the attributes its __init__ assigns on self."""
    names: set[str] = set()
    for node in cls_node.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
            if node.name == "__init__":
                names |= {t.attr for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign))
                          for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                          if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_task_has_at_most_fifteen_members():
    tree = ast.parse((ROOT / "medsight" / "tasks" / "base.py").read_text())
    (task,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Task"]
    members = _members(task)
    assert len(members) <= 15, sorted(members)
    assert {"head", "rules", "readout", "decide", "metrics", "state"} <= members


def test_ordinal_task_never_switches_on_its_head():
    """Each ordinal head is a strategy object: the task module names the head classes only where it builds one."""
    src = (ROOT / "medsight" / "tasks" / "ordinal.py").read_text()
    assert "isinstance(" not in src
    assert src.count('options["head"]') + src.count("self.head ==") <= 1


@pytest.mark.parametrize("head, cls", [("ce", GradeHead), ("smooth", DistanceSmoothed), ("corn", Corn),
                                       ("regression", Regression)])
def test_one_decoder_for_numpy_and_the_training_loop(head, cls):
    """decide (numpy, float64) and head.correct (device tensors) read the same grades."""
    task = OrdinalTask(["0", "1", "2", "3", "4"], {"cutpoints": [0.7, 1.4, 2.6, 3.2]} if head == "regression" else None,
                       {"head": head})
    assert isinstance(task.head, cls) and task.head.name == head
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(1)) * 3
    grades = task.decide(task.head.activation(logits).numpy())
    for g in range(5):
        labels = torch.full((64,), g)
        assert task.head.correct(logits, labels, task.rules).item() == int((grades == g).sum())


def test_old_checkpoint_decision_dict_loads_into_fitted_rules():
    old = {"kind": "multilabel", "classes": ["a", "b"],
           "decision": {"thresholds": [0.2, 0.7], "rule": "youden", "not_fitted": {"b": "one answer"},
                        "loss_logit_offset": [0.5, 1.0], "temperature": [1.5, 2.0], "tta": True,
                        "abstain_below": 0.6, "abstain_fraction": 0.1}}
    task = task_from_state(old)
    r = task.rules
    assert r.thresholds == [0.2, 0.7] and r.threshold_rule == "youden" and r.thresholds_not_fitted == {"b": "one answer"}
    assert r.logit_offset == [0.5, 1.0] and r.temperature == [1.5, 2.0] and r.tta and r.abstain_below == 0.6
    assert task.decide(np.array([[0.3, 0.6]])).tolist() == [[1, 0]]
    z = torch.tensor([[1.0, 2.0]])
    np.testing.assert_allclose(task.probabilities(z).numpy(), torch.sigmoid((z - torch.tensor([0.5, 1.0])) /
                                                                            torch.tensor([1.5, 2.0])).numpy())
    again = task_from_state(json.loads(json.dumps(task.state())))  # written the new way, read back the same
    assert again.rules == task.rules and "rules" in task.state() and "decision" not in task.state()


def test_unreadable_rules_name_the_field():
    with pytest.raises(RulesError, match="threshold"):
        task_from_state({"kind": "single_label", "classes": ["a", "b"], "decision": {"threshold": "high"}})
    with pytest.raises(RulesError, match="surprise"):
        task_from_state({"kind": "single_label", "classes": ["a", "b"], "rules": {"surprise": 1}})


def test_fresh_task_keeps_kind_and_options_but_no_fitted_rule():
    task = OrdinalTask(["0", "1", "2"], {"refer_threshold": 0.4, "tta": True}, {"head": "corn"})
    fresh = fresh_task(task)
    assert fresh.kind == "ordinal" and fresh.options == task.options and fresh.rules == FittedRules()
    assert task.rules.refer_threshold == 0.4  # the original is untouched


def test_rules_are_typed():
    r = FittedRules()
    with pytest.raises(Exception):
        r.threshold = "not a number"
    r.thresholds = [np.float64(0.25), 0.5]
    assert r.thresholds == [0.25, 0.5] and isinstance(r.state()["thresholds"][0], float)


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_kind_is_presented_by_reporting(kind):
    from medsight.reporting.tables import CHECKLISTS, SUMMARIES, TABLES

    assert kind in SUMMARIES and kind in TABLES and kind in CHECKLISTS


def test_a_kind_without_presentation_falls_back_to_its_scalar_metrics():
    from medsight.reporting.tables import metric_tables, summary_line

    class Other(SingleLabelTask):
        kind = "other"

    task = Other(["a", "b"])
    assert summary_line(task, {"accuracy": 0.5, "auc": 0.75, "per_class": {}}) == "accuracy 0.5000 · auc 0.7500"
    (table,) = metric_tables(task, {"test": {"accuracy": 0.5}, "val": {"accuracy": 0.25}})
    assert table.rows == [["accuracy", 0.25, 0.5]]
    from medsight.reporting.figures import task_figures

    assert task_figures(task, Path("."), {}, {}) == []  # no figures of its own yet, and no error


def test_multilabel_and_single_label_readouts_differ_where_they_should():
    multi = MultiLabelTask(["a", "b"], {"thresholds": [0.2, 0.5]})
    single = SingleLabelTask(["a", "b"])
    p = np.array([[0.3, 0.4]])
    assert multi.readout.explained_output(p[0]) == 1 and single.readout.explained_output(p[0]) == 1
    assert multi.readout.record(p[0])["findings"] == ["a"]
    assert single.readout.record(p[0])["label"] == "b"
    y = np.array([[1, -1]])
    assert multi.readout.view_labelled(y).tolist() == [[True, False]]


def test_calibration_fits_the_temperature_after_undoing_the_logit_offset():
    """Weighted training shifts a finding's logits by log w and sharpens them by 1/T: the fitted rules must
    recover T from the logits with the shift removed (a temperature fitted on shifted logits comes out wrong)."""
    from medsight.evaluation.trust import fit_calibration

    rng = np.random.default_rng(4)
    z0 = rng.normal(-2.0, 1.5, (20000, 1))
    y = (rng.random(z0.shape) < 1 / (1 + np.exp(-z0))).astype(np.int64)
    task = MultiLabelTask(["rare"], {"logit_offset": [np.log(9.0)]})
    fit_calibration(task, 2.0 * z0 + np.log(9.0), y)
    assert task.rules.temperature[0] == pytest.approx(2.0, abs=0.15)


def test_console_lines_name_each_number_right():
    from medsight.reporting.tables import summary_line

    graded = OrdinalTask(["0", "1", "2"])
    m = {"qwk": 0.61, "accuracy": 0.52, "within_one": 0.9, "mae": 0.6, "auc": 0.7, "ci95": {},
         "refer": {"grade": 2, "threshold": 0.3, "sensitivity": 0.875, "specificity": 0.25, "auc": 0.66}}
    line = summary_line(graded, m)
    assert "QWK 0.6100" in line and "accuracy 0.5200" in line and "MAE 0.6000" in line
    assert "sensitivity 0.8750" in line and "specificity 0.2500" in line and "grade ≥ 2" in line
    single = SingleLabelTask(["a", "b"])
    line = summary_line(single, {"accuracy": 0.8, "balanced_accuracy": 0.7, "auc": 0.9, "ece": 0.05,
                                 "ci95": {"auc": [0.85, 0.95]}})
    assert line.startswith("accuracy 0.8000 · balanced 0.7000 · AUC 0.9000 [0.8500, 0.9500]")
    assert "ECE 0.0500" in line
