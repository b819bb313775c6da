"""A run always ends with its metrics and report, and owner-only files: a CSV with metadata columns and an
unreadable test image (the subgroup table then has fewer images than metadata rows) trains to the end, and
an optional end-of-run step that fails is skipped with its reason instead of losing the run."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import blob_image, tiny_overrides
from medsight.config import Config, apply_overrides
from medsight.engine import train


def _csv_source(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for i in range(48):
        label = i % 2
        name = f"img{i:02d}.png"
        Image.fromarray(blob_image(label, rng)).save(root / name)
        split = "train" if i < 28 else "val" if i < 36 else "test"
        rows.append([name, ["normal", "pneumonia"][label], ["F", "M"][(i // 2) % 2], split])
    (root / "img40.png").write_bytes(b"not an image")  # a test image that cannot be read
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "sex", "split"])
        w.writerows(rows)
    return root / "labels.csv"


def _check_run(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "report.html").is_file() and (out / "model_card.md").is_file()
    for p in out.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name  # curves.png included
    return m


def test_a_run_with_metadata_and_an_unreadable_test_image_ends_with_metrics_and_subgroups(tmp_path):
    data = _csv_source(tmp_path / "src")
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", data) + ["train.batch_size=8"])
    train(cfg, progress=False)
    m = _check_run(tmp_path / "run")
    assert m["test"]["n"] == 11 and any("img40.png" in s for s in m["skipped_files"])
    sex = m["trust"]["subgroups"]["columns"]["sex"]
    assert sex and all(sum(g["n"] for g in view["groups"].values()) == 11  # aligned with the 11 scored images
                       for view in sex.values())
    assert "steps_skipped" not in m


def test_a_failing_optional_step_is_skipped_with_its_reason(tmp_path, monkeypatch):
    import medsight.engine.finish as finish

    def broken(*args, **kwargs):
        raise IndexError("sizes 12 vs 11")

    monkeypatch.setattr(finish, "measure", broken)
    monkeypatch.setattr(finish, "robustness", broken)
    data = _csv_source(tmp_path / "src")
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", data) + ["train.batch_size=8",
                                                                             "eval.robustness=true"])
    train(cfg, progress=False)
    m = _check_run(tmp_path / "run")
    steps = {s["step"]: s["reason"] for s in m["steps_skipped"]}
    assert "IndexError: sizes 12 vs 11" in steps["trust"] and "robustness" in steps
    assert "trust" not in m and m["test"]["n"] == 11
