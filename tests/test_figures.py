"""Each task kind's figures are drawn by reporting (tasks never import matplotlib)."""

import numpy as np
import pytest

from medsight.config import Config, apply_overrides
from medsight.reporting.figures import FIGURES, task_figures
from medsight.tasks import TASKS, build_task


def test_every_task_kind_has_its_figures():
    assert set(FIGURES) == set(TASKS)


@pytest.mark.parametrize("kind, classes, files", [
    ("single_label", ["normal", "pneumonia"], ["confusion_matrix.png", "roc.png"]),
    ("ordinal", ["0", "1", "2", "3"], ["confusion_matrix.png", "roc.png", "refer_roc.png"]),
    ("multilabel", ["effusion", "mass"], ["roc_findings.png"]),
])
def test_task_figures_writes_the_kinds_files(tmp_path, kind, classes, files):
    rng = np.random.default_rng(0)
    n, k = 40, len(classes)
    if kind == "multilabel":
        labels = (rng.random((n, k)) < 0.5).astype(float)
        probs = rng.random((n, k))
    else:
        labels = np.arange(n) % k
        probs = rng.dirichlet(np.ones(k), n)
    cfg = apply_overrides(Config(), ["data.task=ordinal"]) if kind == "ordinal" else None
    task = build_task(kind, classes, labels, cfg)
    test = task.metrics(labels, probs, n_boot=0)
    written = task_figures(task, tmp_path, {"val": (labels, probs), "test": (labels, probs)}, test, title="t")
    assert written == files
    assert all((tmp_path / f).stat().st_size > 0 for f in files)
