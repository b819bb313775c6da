"""The shared row rules of every manifest reader (medsight.data.readers.rows): paths kept inside the
manifest's folder (symbolic links followed first), duplicates merged or refused by row, missing files left
out and listed, ambiguous names refused, and patients never silently lost."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.config import DataConfig
from medsight.data import DataError, load_data
from medsight.data.readers import check_output_outside, read_source


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _write(path: Path, fields: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        w.writerows(rows)
    return path


def _chexpert(root: Path, n_patients: int = 10, per: int = 2) -> list[list[str]]:
    rows = []
    for p in range(n_patients):
        for s in range(per):
            rel = f"train/patient{p:05d}/study{s}/view1.png"
            _png(root / rel, p * 10 + s)
            rows.append([rel, str((p + s) % 2), str(p % 2), ""])
    return rows


CHEX = ["Path", "Edema", "Effusion", "Pneumonia"]


def test_chexpert_missing_files_are_left_out_and_listed_in_skipped(tmp_path):
    rows = _chexpert(tmp_path)
    os.remove(tmp_path / rows[3][0])
    src = read_source(str(_write(tmp_path / "train.csv", CHEX, rows)), label_columns=["Edema", "Effusion"])
    assert len(src.splits["all"]) == len(rows) - 1
    assert len(src.skipped) == 1 and rows[3][0] in src.skipped[0] and "row 5" in src.skipped[0]
    assert any("do not exist" in n and "row 5" in n for n in src.notes)
    bundle = load_data(DataConfig(path=str(tmp_path / "train.csv"), label_columns=["Edema", "Effusion"]))
    assert bundle.skipped == src.skipped and bundle.summary()["skipped_files"] == src.skipped


def test_chexpert_duplicates_merged_when_identical_and_refused_by_row_when_they_conflict(tmp_path):
    rows = _chexpert(tmp_path)
    same = _write(tmp_path / "same.csv", CHEX, rows + [rows[0], rows[0]])
    src = read_source(str(same), label_columns=["Edema", "Effusion"])
    assert len(src.splits["all"]) == len(rows)
    assert any("dropped 2 duplicate row(s)" in n for n in src.notes)
    conflict = rows + [[rows[0][0], "1" if rows[0][1] == "0" else "0", rows[0][2], ""]]
    with pytest.raises(DataError, match=r"has label .* on row 2 and .* on row 22"):
        read_source(str(_write(tmp_path / "conflict.csv", CHEX, conflict)), label_columns=["Edema", "Effusion"])


@pytest.mark.parametrize("bad", ["../outside/x.png", "ABS"])
def test_chexpert_paths_outside_the_manifests_folder_are_refused(tmp_path, bad):
    root = tmp_path / "data"
    rows = _chexpert(root)
    _png(tmp_path / "outside" / "x.png")
    bad = str(tmp_path / "outside" / "x.png") if bad == "ABS" else bad
    with pytest.raises(DataError, match=r"row 22: .* outside the manifest's folder.*allow_outside_paths"):
        read_source(str(_write(root / "train.csv", CHEX, rows + [[bad, "1", "0", ""]])), label_columns=["Edema"])
    src = read_source(str(root / "train.csv"), label_columns=["Edema"], allow_outside_paths=True)
    assert len(src.splits["all"]) == len(rows) + 1


def test_chexpert_data_set_folder_prefix_is_read_inside_the_folder(tmp_path):
    root = tmp_path / "CheXpert-small"
    rows = [[f"CheXpert-small/{r[0]}", *r[1:]] for r in _chexpert(root)]
    src = read_source(str(_write(root / "train.csv", CHEX, rows)), label_columns=["Edema"])
    assert len(src.splits["all"]) == len(rows)
    assert all(p.startswith(str(root)) for p in src.splits["all"].paths)


def test_a_row_without_a_patient_in_its_path_is_its_own_patient_and_said(tmp_path):
    rows = _chexpert(tmp_path, n_patients=12, per=3)
    _png(tmp_path / "extra" / "loose.png")
    rows.append(["extra/loose.png", "1", "0", ""])
    manifest = _write(tmp_path / "train.csv", CHEX, rows)
    bundle = load_data(DataConfig(path=str(manifest), label_columns=["Edema", "Effusion"]))
    assert any("carry no patient" in n and "row 38" in n for n in bundle.notes)
    groups = {name: set(s.groups) for name, s in bundle.splits.items()}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    every = [g for s in bundle.splits.values() for g in s.groups]
    assert len(set(every)) == 13 and sum(g.startswith("patient") for g in every) == 36


def test_a_finding_column_named_by_the_user_that_is_blank_everywhere_is_named(tmp_path):
    rows = _chexpert(tmp_path)
    with pytest.raises(DataError, match=r"Pneumonia named in data.label_columns are blank in every row"):
        read_source(str(_write(tmp_path / "train.csv", CHEX, rows)), label_columns=["Edema", "Pneumonia"])


def _nih(root: Path, names: list[str]) -> Path:
    rows = [[n, "Effusion" if i % 2 else "No Finding", f"{i // 2}"] for i, n in enumerate(names)]
    return _write(root / "Data_Entry.csv", ["Image Index", "Finding Labels", "Patient ID"], rows)


def test_nih_a_file_name_in_two_folders_is_refused(tmp_path):
    names = [f"{i:08d}_000.png" for i in range(8)]
    for i, n in enumerate(names):
        _png(tmp_path / "images_001" / n, i)
    _png(tmp_path / "images_002" / names[3], 99)
    with pytest.raises(DataError, match=rf"row 5: {names[3]} is found in 2 folders"):
        read_source(str(_nih(tmp_path, names)))


def test_nih_a_symlink_leaving_the_folder_is_refused(tmp_path):
    root = tmp_path / "nih"
    names = [f"{i:08d}_000.png" for i in range(8)]
    for i, n in enumerate(names[:-1]):
        _png(root / "images" / n, i)
    _png(tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", root / "images" / names[-1])
    with pytest.raises(DataError, match=r"row 9: .* links outside the manifest's folder"):
        read_source(str(_nih(root, names)))


def test_manifest_symlink_leaving_the_folder_is_refused_before_it_is_read(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _png(root / f"{i}.png", i)
    _png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    rows = [[f"{i}.png", str(i % 2)] for i in range(6)] + [["link.png", "1"]]
    with pytest.raises(DataError, match=r"row 8: link.png lies outside .*symbolic links followed"):
        read_source(str(_write(root / "m.csv", ["path", "label"], rows)))
    os.symlink(tmp_path, root / "up")  # a linked folder: the same rule
    with pytest.raises(DataError, match=r"row 2: up/secret.png lies outside"):
        read_source(str(_write(root / "m.csv", ["path", "label"], [["up/secret.png", "0"]] + rows[:6])))


def test_manifest_two_names_of_one_file_are_one_image(tmp_path):
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", i)
    os.symlink(tmp_path / "img" / "2.png", tmp_path / "img" / "alias.png")
    rows = [[f"img/{i}.png", str(i % 2)] for i in range(6)] + [["img/alias.png", "1"]]
    with pytest.raises(DataError, match=r"img/alias.png has label '0' on row 4 and '1' on row 8"):
        read_source(str(_write(tmp_path / "m.csv", ["path", "label"], rows)))


def test_folder_source_leaves_out_files_linking_outside(tmp_path):
    root = tmp_path / "classes"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png", i)
    _png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "a" / "link.png")
    src = read_source(str(root))
    assert sum(len(s) for s in src.splits.values()) == 6
    assert any("link outside" in n and "link.png" in n for n in src.notes)


def test_an_output_folder_inside_a_folder_source_is_refused(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"--out .*runs/x lies inside the data folder"):
        check_output_outside(tmp_path / "data" / "runs" / "x", str(tmp_path / "data"), "--out")
    check_output_outside(tmp_path / "runs", str(tmp_path / "data"), "--out")  # beside it: fine
    manifest = _write(tmp_path / "data" / "m.csv", ["path", "label"], [["a/1.png", "0"]])
    check_output_outside(tmp_path / "data" / "runs", str(manifest), "--out")  # a manifest's folder is not scanned


def test_train_refuses_a_run_folder_inside_a_folder_source(tmp_path):
    from medsight.config import load_config
    from medsight.engine import train

    for c in ("a", "b"):
        for i in range(4):
            _png(tmp_path / "data" / c / f"{i}.png", i * 20)
    cfg = load_config(None, [f"data.path={tmp_path / 'data'}", f"out={tmp_path / 'data' / 'run'}"])
    with pytest.raises(DataError, match="inside the data folder"):
        train(cfg, progress=False)
    assert not (tmp_path / "data" / "run").exists()


def test_no_module_imports_another_modules_private_names():
    import ast

    root = Path(__file__).resolve().parent.parent / "medsight"
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medsight"):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_a_grading_layouts_image_linking_outside_is_refused(tmp_path):
    root = tmp_path / "aptos"
    ids = [f"{i:04x}" for i in range(6)]
    for i in ids[:-1]:
        _png(root / "train_images" / f"{i}.png")
    _png(tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", root / "train_images" / f"{ids[-1]}.png")
    _write(root / "train.csv", ["id_code", "diagnosis"], [[i, str(k % 5)] for k, i in enumerate(ids)])
    with pytest.raises(DataError, match=r"row 7: .* links outside"):
        read_source(str(root))
    assert len(read_source(str(root), allow_outside_paths=True).splits["all"]) == 6
