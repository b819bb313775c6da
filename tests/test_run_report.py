"""metrics.json has one typed shape (RunReport): written and read through it, refused where it is wrong."""

from __future__ import annotations

import json

import pytest

from medsight.reporting.run_report import RunReport, RunReportError


def _report(**extra):
    return RunReport.of({"task": "single_label", "classes": ["a", "b"], "test": {"accuracy": 0.5}, **extra})


def test_written_and_read_back_with_the_sections_that_were_set(tmp_path):
    path = _report(best_epoch=3, figures=["roc.png"]).write(tmp_path)
    data = json.loads(path.read_text())
    assert path.name == "metrics.json" and list(data) == ["task", "classes", "test", "best_epoch", "figures"]
    back = RunReport.read(tmp_path)
    assert back.best_epoch == 3 and back.trust is None and back.plain() == data


def test_a_stored_section_replaces_the_old_one_and_keeps_the_rest(tmp_path):
    first = _report(robustness={"mean_drop": 0.1}, checklist={"pass": True, "checks": []})
    second = first.added(robustness={"mean_drop": 0.2})
    assert second.robustness == {"mean_drop": 0.2} and second.checklist == first.checklist
    assert first.robustness == {"mean_drop": 0.1}  # the original is not changed


def test_unknown_or_mistyped_sections_are_refused_with_their_name(tmp_path):
    with pytest.raises(RunReportError, match="robustnes"):
        _report(robustnes={"mean_drop": 0.1})
    with pytest.raises(RunReportError, match="best_epoch"):
        _report(best_epoch="three")
    with pytest.raises(RunReportError, match="test"):
        RunReport.of({"task": "single_label", "classes": ["a"]})
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(RunReportError, match="metrics.json"):
        RunReport.read(tmp_path)


def test_the_model_card_reads_the_report():
    from medsight.reporting.model_card import model_card_sections, to_markdown

    card = to_markdown(model_card_sections(_report(epochs_run=7, best_epoch=5, monitor="auc"), {}, None), "r")
    assert "7 (5)" in card and "validation auc" in card and "Task: single_label; classes: a, b." in card
