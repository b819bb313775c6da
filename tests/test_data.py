import logging

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config import DEFAULT_DATA, DataConfig
from medsight.data import DataError, ImageDataset, load_data, load_eval_data, make_loader, make_transform
from medsight.data.imageio import ImageReadError, read_image

from conftest import blob_image, write_class_folders


def _counts(bundle):
    return {k: sum(v) for k, v in bundle.counts().items()}


@pytest.mark.parametrize("mode, dtype, shape", [
    ("L", np.uint8, (20, 24)),
    ("I;16", np.uint16, (20, 24)),
    ("RGB", np.uint8, (20, 24, 3)),
    ("RGBA", np.uint8, (20, 24, 4)),
])
@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_read_image_depths_and_modes(tmp_path, mode, dtype, shape, ext):
    rng = np.random.default_rng(0)
    hi = 4095 if dtype == np.uint16 else 255  # 12-bit data in a 16-bit container, as scanners write it
    a = rng.integers(0, hi + 1, shape).astype(dtype)
    a.flat[0], a.flat[1] = 0, hi
    path = tmp_path / f"img.{ext}"
    Image.fromarray(a, mode=mode if mode != "I;16" else None).save(path)
    t = read_image(path)
    channels = 1 if len(shape) == 2 else 3
    assert t.shape == (channels, 20, 24) and t.dtype == torch.float32
    assert float(t.min()) == 0.0 and float(t.max()) == pytest.approx(1.0)
    if dtype == np.uint16:  # depth kept: 4096 levels survive, not squeezed into 256
        assert len(torch.unique(t)) > 256


def test_read_jpeg_and_bmp(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    for ext in ("jpg", "bmp"):
        Image.fromarray(a).save(tmp_path / f"x.{ext}")
        assert read_image(tmp_path / f"x.{ext}").shape == (3, 16, 16)


def test_corrupt_and_empty_files_raise_named_errors(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(empty)


def test_class_folders_split_stratified_and_reproducible(tmp_path):
    root = write_class_folders(tmp_path / "d", n_per_class=40)
    cfg = DataConfig(path=str(root), val_fraction=0.2, test_fraction=0.2, split_seed=3)
    a, b = load_data(cfg), load_data(cfg)
    assert a.classes == ["normal", "pneumonia"]
    assert a.counts() == {"train": [24, 24], "val": [8, 8], "test": [8, 8]}
    for s in ("train", "val", "test"):
        assert a.splits[s].paths == b.splits[s].paths  # fixed seed: the same split every time
    all_paths = [p for s in a.splits.values() for p in s.paths]
    assert len(all_paths) == len(set(all_paths)) == 80  # disjoint and complete
    other = load_data(DataConfig(path=str(root), val_fraction=0.2, test_fraction=0.2, split_seed=4))
    assert other.splits["test"].paths != a.splits["test"].paths


def test_presplit_folders_are_used_as_given(tmp_path):
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        write_class_folders(tmp_path / "d" / split, n_per_class=n, seed=n)
    bundle = load_data(DataConfig(path=str(tmp_path / "d")))
    assert bundle.counts() == {"train": [10, 10], "val": [4, 4], "test": [6, 6]}
    assert all("/val/" in p for p in bundle.splits["val"].paths)


def test_csv_patient_split_has_no_leak(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,label,patient_id"]
    for patient in range(30):
        label = patient % 2
        for view in range(3):  # three images per patient
            name = f"p{patient}_{view}.png"
            Image.fromarray(blob_image(label, rng)).save(tmp_path / name)
            rows.append(f"{name},{'pneumonia' if label else 'normal'},P{patient:03d}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    bundle = load_data(DataConfig(path=str(tmp_path / "manifest.csv"), val_fraction=0.2, test_fraction=0.2))
    patients = {s: set(d.groups) for s, d in bundle.splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(d) for d in bundle.splits.values()) == 90
    assert all(len(d) % 3 == 0 for d in bundle.splits.values())  # patients are never cut in pieces


def test_csv_split_column_and_leak_detection(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["path,label,patient_id,split"]
    for i in range(12):
        Image.fromarray(blob_image(i % 2, rng)).save(tmp_path / f"{i}.png")
        split = ["train", "train", "val", "test"][i % 4]
        lines.append(f"{i}.png,{i % 2},P{i},{split}")
    (tmp_path / "m.csv").write_text("\n".join(lines))
    bundle = load_data(DataConfig(path=str(tmp_path / "m.csv")))
    assert _counts(bundle) == {"train": 6, "val": 3, "test": 3}
    lines[-1] = lines[-1].replace("P11", "P0")  # patient P0 now in train and test
    (tmp_path / "m.csv").write_text("\n".join(lines))
    with pytest.raises(DataError, match="patient 'P0' appears in both"):
        load_data(DataConfig(path=str(tmp_path / "m.csv")))


def test_csv_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.png,1\n")  # a.png does not exist: no path column to find
    with pytest.raises(DataError, match="lacks column.*path.*data.path_column"):
        load_data(DataConfig(path=str(tmp_path / "m.csv")))


def test_npz_splits(small_npz):
    bundle = load_data(DataConfig(path=str(small_npz)))
    assert _counts(bundle) == {"train": 40, "val": 12, "test": 12}
    assert bundle.classes == ["0", "1"]
    ds = ImageDataset(bundle.splits["train"], make_transform(32, [0.5] * 3, [0.5] * 3, train=False))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y in (0, 1)
    assert torch.equal(x[0], x[1])  # grayscale replicated to 3 channels


def test_embedded_default_is_real_pneumoniamnist():
    bundle = load_data(DataConfig())
    assert bundle.classes == ["normal", "pneumonia"]
    assert bundle.counts() == {"train": [1214, 3494], "val": [135, 389], "test": [234, 390]}
    # named by its path (as the panel benchmark does), it is the same data set with the same names
    assert load_data(DataConfig(path=str(DEFAULT_DATA))).classes == ["normal", "pneumonia"]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data path not found: .*nowhere"):
        load_data(DataConfig(path=str(tmp_path / "nowhere")))


def test_empty_class_is_named(tmp_path):
    root = write_class_folders(tmp_path / "d", n_per_class=5)
    (root / "effusion").mkdir()
    with pytest.raises(DataError, match="class 'effusion'.*has no images"):
        load_data(DataConfig(path=str(root)))


def test_corrupt_file_is_skipped_and_counted(tmp_path, caplog):
    root = write_class_folders(tmp_path / "d", n_per_class=10)
    (root / "normal" / "zz_corrupt.png").write_bytes(b"garbage bytes, not an image")
    bundle = load_data(DataConfig(path=str(root), val_fraction=0.1, test_fraction=0.1))
    every = [p for s in bundle.splits.values() for p in s.paths]
    assert any(p.endswith("zz_corrupt.png") for p in every)
    skipped, seen = [], 0
    with caplog.at_level(logging.WARNING, logger="medsight"):
        for name, split in bundle.splits.items():
            ds = ImageDataset(split, make_transform(32, [0.5] * 3, [0.5] * 3, train=name == "train"))
            for x, y, bad in make_loader(ds, 4, shuffle=False, num_workers=0):
                skipped += bad
                seen += len(y)
    assert len(skipped) == 1 and skipped[0].endswith("zz_corrupt.png")
    assert seen == 20
    assert "zz_corrupt.png" in caplog.text


def test_eval_data_class_count_must_match(small_npz):
    with pytest.raises(DataError, match="has 2 classes.*trained on 3"):
        load_eval_data(str(small_npz), ["a", "b", "c"])


def test_train_fraction_keeps_a_stratified_share_of_training_labels_only(small_npz):
    full = load_data(DataConfig(path=str(small_npz)))
    part = load_data(DataConfig(path=str(small_npz), train_fraction=0.25))
    assert part.counts()["train"] == [5, 5]  # a quarter of 20 + 20, both classes kept
    assert part.counts()["val"] == full.counts()["val"] and part.counts()["test"] == full.counts()["test"]
    assert any("kept 10 of 40 training images" in n for n in part.notes)
    kept = {a.tobytes() for a in part.splits["train"].images}
    assert kept <= {a.tobytes() for a in full.splits["train"].images}


@pytest.mark.parametrize("key, value, words", [("data.train_fraction", "0", "train_fraction"),
                                               ("data.train_fraction", "1.5", "train_fraction"),
                                               ("data.pretext", "rotate", "'rotation'")])
def test_bad_label_budget_and_pretext_are_named(key, value, words):
    from medsight.config import ConfigError, load_config, validate_config

    with pytest.raises(ConfigError, match=words):
        validate_config(load_config(None, [f"{key}={value}"]))


def test_rotation_pretext_labels_are_the_quarter_turns(small_npz):
    from medsight.data import ROTATION_CLASSES

    plain = load_data(DataConfig(path=str(small_npz)))
    pre = load_data(DataConfig(path=str(small_npz), pretext="rotation", hflip=False))
    assert pre.classes == ROTATION_CLASSES
    n = len(plain.splits["train"])
    assert pre.counts()["train"] == [n] * 4  # every training image in all four turns
    base, turned = ImageDataset(plain.splits["train"], None), ImageDataset(pre.splits["train"], None)
    for k in range(4):
        assert torch.equal(turned.load(k * n + 3), torch.rot90(base.load(3), k, dims=(1, 2)))
    val = pre.splits["val"]
    assert len(val) == len(plain.splits["val"]) and np.array_equal(val.labels, val.quarter_turns)
    assert len(set(val.labels.tolist())) > 1  # one drawn turn per image, not all the same


def test_rotation_pretext_warns_about_flips():
    from medsight.config import load_config, validate_config

    with pytest.warns(UserWarning, match="data.hflip"):
        validate_config(load_config(None, ["data.pretext=rotation"]))  # hflip is on by default
