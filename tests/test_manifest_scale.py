"""A CheXpert-sized manifest: the patient-level split equals scikit-learn's at a fraction of the cost, and
missing files are listed and left out (timed in benchmarks/loader.py, not here)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold

from medsight.config import DataConfig
from medsight.data import load_data
from medsight.data.splits import stratified_group_fold


@pytest.mark.parametrize("seed,n,patients,folds,classes", [(0, 300, 60, 7, 2), (1, 2000, 500, 10, 3),
                                                          (2, 400, 400, 2, 5)])
def test_group_folds_equal_scikit_learns(seed, n, patients, folds, classes):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    groups = np.array([f"p{g}" for g in rng.integers(0, patients, n)])
    mine = stratified_group_fold(y, groups, folds, seed)
    theirs = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.arange(n), y, groups)
    for k, (_, test) in enumerate(theirs):
        np.testing.assert_array_equal(np.nonzero(mine == k)[0], test)


def test_a_5000_row_manifest_is_split_by_patient_and_lists_missing_files(tmp_path, caplog):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    (tmp_path / "img").mkdir()
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i in range(5000):
            name = f"img/{i:05d}.png"
            if i % 100 != 7:  # 50 files the manifest names are missing
                (tmp_path / name).write_bytes(buf.getvalue())
            w.writerow([name, ("normal", "effusion", "edema")[i % 3], f"p{i // 4}"])
    bundle = load_data(DataConfig(path=str(tmp_path / "labels.csv")))
    assert sum(len(s) for s in bundle.splits.values()) == 4950
    patients = {name: set(s.groups) for name, s in bundle.splits.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    note = next(n for n in bundle.notes if "do not exist" in n)
    assert note.startswith("50 image file(s)") and "img/00007.png (row 9)" in note and "(50 in all)" in note
    kept = {p for s in bundle.splits.values() for p in s.paths}
    assert len(kept) == 4950 and not any(int(Path(p).stem) % 100 == 7 for p in kept)
    assert 0.12 < len(bundle.splits["test"]) / 4950 < 0.18  # the test fraction of 15%, in images
