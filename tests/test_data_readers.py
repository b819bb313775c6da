"""Data readers on small real files: manifests that must not reach outside their folder or merge wrong
rows, .npz archives that must not be read wrongly, published layouts read as downloaded, and evaluation
data matched to a model's classes by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.api import evaluate
from medsight.config import DataConfig
from medsight.data import DataError, ImageDataset, load_data, load_eval_data, make_loader, make_transform

from conftest import blob_image, write_class_folders


def _images(folder, names, seed=0, label=None, fmt=None):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = Image.fromarray(blob_image(i % 2 if label is None else label, rng))
        img.save(folder / name, format=fmt)


def _csv(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _bundle(path, **kw):
    return load_data(DataConfig(path=str(path), **kw))


# ------------------------------------------------------------------------------------------- CSV manifests

def test_csv_paths_outside_the_manifest_folder_are_refused_naming_the_row(tmp_path):
    data = tmp_path / "data"
    _images(data, [f"{i}.png" for i in range(8)])
    _images(tmp_path / "elsewhere", ["x.png"])
    rows = [f"{i}.png,{i % 2}" for i in range(8)]
    for bad in ("../../etc/passwd", "/etc/passwd", "../elsewhere/x.png", "sub/../../elsewhere/x.png"):
        manifest = _csv(data / "m.csv", "path,label", rows[:2] + [f"{bad},1"] + rows[2:])
        with pytest.raises(DataError, match=r"row 4: .* outside the manifest's folder.*allow_outside_paths"):
            _bundle(manifest)
    # inside, however written, is fine; the option lets a manifest name images elsewhere
    ok = _csv(data / "m.csv", "path,label", rows + ["./sub/../0.png,0", f"{data / '1.png'},1"])
    assert len(load_eval_data(str(ok), ["0", "1"], prefer=("all",))[0]) == 8  # two duplicates of rows above dropped
    outside = _csv(data / "m.csv", "path,label", rows + ["../elsewhere/x.png,1"])
    split, _ = load_eval_data(str(outside), ["0", "1"], prefer=("all",), allow_outside_paths=True)
    assert any(p.endswith("elsewhere/x.png") for p in split.paths)


def test_csv_labels_that_differ_only_in_case_or_spaces_are_one_class(tmp_path, caplog):
    _images(tmp_path, [f"{i}.png" for i in range(12)])
    labels = ["Pneumonia", "pneumonia ", " PNEUMONIA", "normal", "Normal", "normal"] * 2
    manifest = _csv(tmp_path / "m.csv", "path,label", [f"{i}.png,{lab}" for i, lab in enumerate(labels)])
    with caplog.at_level(logging.WARNING, logger="medsight"):
        bundle = _bundle(manifest, val_fraction=0.25, test_fraction=0.25)
    assert bundle.classes == ["Pneumonia", "normal"]  # each spelled as most rows spell it
    assert sum(bundle.counts()["train"]) + sum(bundle.counts()["val"]) + sum(bundle.counts()["test"]) == 12
    assert "taken as one class" in caplog.text and "'pneumonia '" in caplog.text


def test_csv_duplicate_rows_are_dropped_and_one_image_with_two_labels_is_refused(tmp_path, caplog):
    _images(tmp_path, [f"{i}.png" for i in range(12)])
    rows = [f"{i}.png,{i % 2},{s}" for i, s in zip(range(12), ["train"] * 8 + ["val"] * 2 + ["test"] * 2)]
    dup = rows + ["./3.png,1,train", "3.png,1,train"]  # the same image named twice more, same label and split
    with caplog.at_level(logging.WARNING, logger="medsight"):
        bundle = _bundle(_csv(tmp_path / "m.csv", "path,label,split", dup))
    assert {k: sum(v) for k, v in bundle.counts().items()} == {"train": 8, "val": 2, "test": 2}
    assert any("dropped 2 duplicate row(s)" in n and "14, 15" in n for n in bundle.notes)
    assert "duplicate" in caplog.text
    with pytest.raises(DataError, match=r"3.png has label '1' on row 5 and '0' on row 14"):
        _bundle(_csv(tmp_path / "m.csv", "path,label,split", rows + ["3.png,0,train"]))
    with pytest.raises(DataError, match=r"3.png has split 'train' on row 5 and 'test' on row 14"):
        _bundle(_csv(tmp_path / "m.csv", "path,label,split", rows + ["3.png,1,test"]))  # one image in train and test


def test_csv_blank_split_value_is_refused_naming_the_row(tmp_path):
    _images(tmp_path, [f"{i}.png" for i in range(8)])
    rows = [f"{i}.png,{i % 2},{'train' if i < 6 else 'test'}" for i in range(8)]
    rows[4] = "4.png,0,  "
    with pytest.raises(DataError, match=r"row 6: split is blank"):
        _bundle(_csv(tmp_path / "m.csv", "path,label,split", rows))
    # a split column left empty everywhere means: split for me
    bundle = _bundle(_csv(tmp_path / "m.csv", "path,label,split", [f"{i}.png,{i % 2}," for i in range(8)]),
                     val_fraction=0.25, test_fraction=0.25)
    assert set(bundle.splits) == {"train", "val", "test"}


def test_csv_columns_with_other_names_are_found_or_named_by_the_caller(tmp_path, caplog):
    _images(tmp_path, [f"img_{i}.png" for i in range(8)])
    manifest = _csv(tmp_path / "m.csv", "age,image_file,diagnosis",
                    [f"{40 + i},img_{i}.png,{'pneumonia' if i % 2 else 'normal'}" for i in range(8)])
    with caplog.at_level(logging.INFO, logger="medsight"):
        split, _ = load_eval_data(str(manifest), ["normal", "pneumonia"], prefer=("all",))
    assert split.paths[1].endswith("img_1.png") and split.labels.tolist() == [0, 1] * 4
    assert "column 'image_file'" in caplog.text and "column 'diagnosis'" in caplog.text
    two = _csv(tmp_path / "m.csv", "image_file,class,target",
               [f"img_{i}.png,{i % 2},{1 - i % 2}" for i in range(8)])
    with pytest.raises(DataError, match=r"columns class, target could each be it.*image_file, class, target.*"
                                        r"data.label_column"):
        load_eval_data(str(two), ["0", "1"], prefer=("all",))
    split, _ = load_eval_data(str(two), ["0", "1"], prefer=("all",), label_column="target")
    assert split.labels.tolist() == [1, 0] * 4
    with pytest.raises(DataError, match=r"no column 'file' \(data.path_column\)"):
        load_eval_data(str(two), ["0", "1"], prefer=("all",), path_column="file")


# ---------------------------------------------------------------------------------------------- npz files

def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _arrays(n=(20, 6, 6), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for s, k in zip(("train", "val", "test"), n):
        labels = np.arange(k) % 2
        out[f"{s}_images"] = np.stack([blob_image(int(y), rng) for y in labels]).astype(dtype)
        out[f"{s}_labels"] = labels[:, None]
    return out


@pytest.mark.parametrize("change, message", [
    ({"train_images": np.array([["a", "b"], ["c", "d"]])}, "train_images holds text"),
    ({"train_images": np.array([object(), object()], dtype=object)}, "train_images' holds Python objects"),
    ({"train_labels": np.array([0, 1, -1] + [0] * 17)}, r"negative labels \(e.g. -1 at index 2\)"),
    ({"train_labels": np.array([0.0, 1.0, 0.5] + [0.0] * 17)}, r"non-integer values \(e.g. 0.5 at index 2\)"),
    ({"train_labels": np.array([0.0, np.nan] + [1.0] * 18)}, r"non-integer values \(e.g. nan at index 1\)"),
    ({"train_images": np.zeros((0, 32, 32), np.uint8), "train_labels": np.zeros(0)}, "training split is empty"),
    ({"train_labels": np.zeros((20, 14))}, "multi-label"),
    ({"train_images": np.zeros((20, 32, 32, 2), np.uint8)}, "2 channels"),
    ({"train_images": np.full((20, 8, 8), -5, np.int32)}, "int32 pixels from -5 to -5"),
])
def test_npz_that_would_be_read_wrongly_is_refused_by_name(tmp_path, change, message):
    path = _npz(tmp_path / "d.npz", **{**_arrays(), **change})
    with pytest.raises(DataError, match=message):
        _bundle(path)


def test_random_bytes_or_a_single_array_are_not_an_npz(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="not an .npz archive"):
        _bundle(junk)
    one = tmp_path / "one.npz"
    with one.open("wb") as fh:
        np.save(fh, np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match="not an .npz archive"):
        _bundle(one)


def test_npz_integer_valued_float_labels_and_wide_integer_pixels_are_read(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.float64)
    arrays["train_images"] = arrays["train_images"].astype(np.int64)  # 0..255 values in a wide type
    bundle = _bundle(_npz(tmp_path / "d.npz", **arrays))
    assert bundle.splits["train"].labels.dtype == np.int64 and bundle.counts()["train"] == [10, 10]
    ds = ImageDataset(bundle.splits["train"], make_transform(32, [0] * 3, [1] * 3, train=False))
    ref = torch.from_numpy(_arrays()["train_images"][3].astype(np.float32) / 255)
    assert torch.allclose(ds.load(3)[0], ref)  # not divided by int64's maximum
    assert any("read as uint8" in n for n in bundle.notes)


def test_npz_float_images_in_0_255_are_rescaled_and_say_so(tmp_path, caplog):
    as_uint8 = _arrays()
    as_float = {k: v.astype(np.float32) if k.endswith("images") else v for k, v in as_uint8.items()}
    with caplog.at_level(logging.WARNING, logger="medsight"):
        rescaled = _bundle(_npz(tmp_path / "f.npz", **as_float))
    assert "divided by 255" in caplog.text and any("divided by 255" in n for n in rescaled.notes)
    reference = _bundle(_npz(tmp_path / "u.npz", **as_uint8))
    tf = make_transform(32, [0.5] * 3, [0.5] * 3, train=False)
    for s in ("train", "test"):
        a, b = ImageDataset(rescaled.splits[s], tf), ImageDataset(reference.splits[s], tf)
        assert torch.allclose(a.load(1), b.load(1), atol=1e-6) and float(a.load(1).max()) <= 1.0
    # floats already in [0, 1] are left alone
    unit = {k: v / np.float32(255) if k.endswith("images") else v for k, v in as_float.items()}
    assert not any("255" in n for n in _bundle(_npz(tmp_path / "one.npz", **unit)).notes)


def test_nan_pixels_are_skipped_as_unreadable_not_trained_on(tmp_path, caplog):
    arrays = {k: v.astype(np.float32) / 255 if k.endswith("images") else v for k, v in _arrays().items()}
    arrays["train_images"][5, 3, 3] = np.nan
    bundle = _bundle(_npz(tmp_path / "d.npz", **arrays))
    ds = ImageDataset(bundle.splits["train"], make_transform(32, [0.5] * 3, [0.5] * 3, train=True))
    skipped, seen = [], 0
    with caplog.at_level(logging.WARNING, logger="medsight"):
        for x, y, bad in make_loader(ds, 8, shuffle=False, num_workers=0):
            skipped += bad
            seen += len(y)
            assert torch.isfinite(x).all()
    assert skipped == ["#5"] and seen == 19
    assert "NaN or infinite" in caplog.text


@pytest.mark.parametrize("key", ["class_names", "classes"])
def test_npz_class_names_name_the_classes(tmp_path, key):
    path = _npz(tmp_path / "d.npz", **_arrays(), **{key: np.array(["normal", "pneumonia"])})
    bundle = _bundle(path)
    assert bundle.classes == ["normal", "pneumonia"]
    split, _ = load_eval_data(str(path), ["pneumonia", "normal"])  # and evaluation matches them by name
    assert split.labels.tolist() == (1 - np.arange(6) % 2).tolist()
    with pytest.raises(DataError, match="has 1 names but the labels go up to 1"):
        _bundle(_npz(tmp_path / "e.npz", **_arrays(), **{key: np.array(["normal"])}))


def test_npz_class_names_reach_the_run_report_and_predictions(tmp_path):
    from medsight.config import Config, apply_overrides
    from medsight.engine import train

    from conftest import tiny_overrides

    path = _npz(tmp_path / "d.npz", **_arrays((24, 8, 8)), class_names=np.array(["benign", "malignant"]))
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", path) + [
        "train.sharpness_batches=0", "explain.faithfulness_images=0", "data.image_size=32"])
    metrics = train(cfg, progress=False).metrics
    assert metrics["classes"] == ["benign", "malignant"]
    assert set(metrics["test"]["per_class"]) == {"benign", "malignant"}
    assert "malignant" in (tmp_path / "run" / "report.html").read_text()
    with np.load(tmp_path / "run" / "predictions.npz") as z:
        assert z["classes"].tolist() == ["benign", "malignant"]


# --------------------------------------------------------------------------------------- published layouts

def test_tiny_imagenet_is_read_as_published(tmp_path, caplog):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n02012849"]
    words = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
             "n02012849": "crane", "n99999999": "crane"}  # words.txt covers all of WordNet; repeats exist
    for i, w in enumerate(wnids):
        _images(root / "train" / w / "images", [f"{w}_{k}.JPEG" for k in range(6)], seed=i, label=i % 2, fmt="JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{k}.JPEG\t0\t0\t8\t8\n" for k in range(6)))
    _images(root / "val" / "images", [f"val_{k}.JPEG" for k in range(6)], fmt="JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{k}.JPEG\t{wnids[k % 3]}\t0\t0\t8\t8\n" for k in range(6)) + "val_99.JPEG\tn01443537\t0\t0\t8\t8\n")
    _images(root / "test" / "images", ["test_0.JPEG"], fmt="JPEG")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in words.items()))
    with caplog.at_level(logging.WARNING, logger="medsight"):
        bundle = _bundle(root, test_fraction=0.2)
    assert bundle.classes == ["goldfish", "European fire salamander", "crane"]
    assert bundle.splits["val"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert all("/val/images/" in p for p in bundle.splits["val"].paths)
    assert sum(bundle.counts()["train"]) + sum(bundle.counts()["test"]) == 18  # test held out of train
    assert not any("/test/" in p for s in bundle.splits.values() for p in s.paths)
    assert any("test/ has no labels" in n for n in bundle.notes)
    assert "val_99.JPEG" in caplog.text  # listed in the annotations, missing on disk: named and skipped
    (root / "words.txt").unlink()
    assert _bundle(root).classes == wnids


def _graded(root, csv_name, id_col, grade_col, folder, ext, ids, grades, missing=()):
    _images(root / folder, [f"{i}.{ext}" for i in ids if i not in missing])
    return _csv(root / csv_name, f"{id_col},{grade_col}", [f"{i},{g}" for i, g in zip(ids, grades)])


def test_kaggle_retinopathy_layout_is_read_from_the_csv_or_its_folder(tmp_path, caplog):
    ids = [f"{p}_{eye}" for p in range(1, 16) for eye in ("left", "right")]
    grades = [(p * 7 + e) % 5 for p in range(1, 16) for e in (0, 1)]
    csv_path = _graded(tmp_path, "trainLabels.csv", "image", "level", "train", "jpeg", ids, grades,
                       missing=("15_right",))
    (tmp_path / "test").mkdir()
    for data in (csv_path, tmp_path):
        with caplog.at_level(logging.WARNING, logger="medsight"):
            bundle = _bundle(data, val_fraction=0.2, test_fraction=0.2)
        assert bundle.classes == ["0", "1", "2", "3", "4"]
        assert sum(sum(c) for c in bundle.counts().values()) == 29
        assert "15_right" in caplog.text
        patients = {s: {g for g in d.groups} for s, d in bundle.splits.items()}  # both eyes in one split
        assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
        path_of = {p.rsplit("/", 1)[1]: y for s in bundle.splits.values() for p, y in zip(s.paths, s.labels)}
        assert path_of["3_left.jpeg"] == grades[ids.index("3_left")]
    with pytest.raises(DataError, match="none of its 2 images"):
        _bundle(_csv(tmp_path / "trainLabels.csv", "image,level", ["99_left,0", "99_right,1"]))


def test_aptos_layout_is_read_as_published(tmp_path):
    ids = [f"{i:012x}" for i in range(25)]
    _graded(tmp_path, "train.csv", "id_code", "diagnosis", "train_images", "png", ids, [i % 5 for i in range(25)])
    (tmp_path / "test_images").mkdir()
    _csv(tmp_path / "test.csv", "id_code", ["aaaa"])
    bundle = _bundle(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert bundle.classes == ["0", "1", "2", "3", "4"]
    assert sum(sum(c) for c in bundle.counts().values()) == 25
    assert all("/train_images/" in p for s in bundle.splits.values() for p in s.paths)
    assert any("test_images/ has no labels" in n for n in bundle.notes)
    with pytest.raises(DataError, match="row 3: diagnosis must be a grade 0-4, got '7'"):
        _bundle(_csv(tmp_path / "train.csv", "id_code,diagnosis", [f"{ids[0]},1", f"{ids[1]},7"]))


# ------------------------------------------------------------------------------------- evaluation classes

def test_evaluate_matches_class_folders_to_the_model_by_name(tiny_run, tmp_path):
    """A model whose classes are [normal, abnormal] on folders abnormal/, normal/ (sorted the other way)
    scores exactly what the same model scores on the same images in folders in its own order."""
    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    ckpt["classes"] = ["normal", "abnormal"]
    ckpt["task"] = {**ckpt["task"], "classes": ["normal", "abnormal"]}
    renamed = tmp_path / "renamed.pt"
    torch.save(ckpt, renamed)
    own = write_class_folders(tmp_path / "own", n_per_class=10, seed=5)  # normal/, pneumonia/: the model's order
    other = tmp_path / "other"
    for src, dst in (("normal", "normal"), ("pneumonia", "abnormal")):
        (other / dst).mkdir(parents=True)
        for f in (own / src).iterdir():
            (other / dst / f.name).write_bytes(f.read_bytes())
    right = evaluate(tiny_run / "best.pt", str(own), device="cpu")["test"]
    mapped = evaluate(renamed, str(other), device="cpu")["test"]
    assert mapped["accuracy"] == right["accuracy"] and mapped["auc"] == right["auc"]
    assert abs(right["auc"] - 0.5) > 0.1  # the model ranks the classes, so matching by position would flip the AUC
    (other / "abnormal").rename(other / "sick")
    with pytest.raises(DataError, match="has classes normal, sick but the model knows normal, abnormal"):
        evaluate(renamed, str(other), device="cpu")
