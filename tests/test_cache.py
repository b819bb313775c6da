"""The prepared cache (medsight prepare / data.cache): same images as the direct path, invalidation, resume,
parallel workers, bad input, and two DDP ranks reading one cache."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from medsight.config import DataConfig
from medsight.data import ImageDataset, load_data
from medsight.data import cache as cache_mod
from medsight.data.cache import CacheError, Rows, open_cache, prepare_cache
from medsight.data.readers import read_source
from medsight.data.sources import DataError
from medsight.data.transforms import make_transform
from torchvision.transforms import v2

SIZE = 24
N = 24  # images: 12 patients, enough for patient-level splits


def write_source(root: Path, n: int = N, seed: int = 0) -> Path:
    """A CSV manifest over non-square RGB JPEGs, 8-bit grey PNGs and 16-bit PNGs, two patients per class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        base = rng.random((h // 4 + 2, w // 4 + 2))
        smooth = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
        if i % 3 == 0:
            name = f"img{i}.jpg"
            Image.fromarray(np.stack([smooth, 255 - smooth, smooth // 2], -1)).save(root / name, quality=95)
        elif i % 3 == 1:
            name = f"img{i}.png"
            Image.fromarray(smooth).save(root / name)
        else:
            name = f"img{i}.png"
            Image.fromarray(smooth.astype(np.uint16) * 16).save(root / name)
        rows.append({"path": name, "label": "a" if i % 2 else "b", "patient_id": f"p{i // 2}"})
    with (root / "labels.csv").open("w", newline="") as fh:
        w_ = csv.DictWriter(fh, ["path", "label", "patient_id"])
        w_.writeheader()
        w_.writerows(rows)
    return root / "labels.csv"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_source(tmp_path / "src")


def cfg_of(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), image_size=SIZE, **kw)


def eval_tf(cfg: DataConfig):
    return make_transform(cfg.image_size, [0.0] * 3, [1.0] * 3, train=False, cfg=cfg)


@pytest.mark.parametrize("resize", ["squash", "pad", "crop"])
def test_cached_images_equal_the_direct_path_within_uint8_rounding(source, tmp_path, resize):
    cfg = cfg_of(source, resize=resize)
    prepare_cache(cfg, tmp_path / "cache")
    splits, classes, _, _, manifest = open_cache(tmp_path / "cache")
    src = read_source(str(source))
    direct, direct_classes = src.splits, src.classes
    assert classes == direct_classes and manifest["preprocessing"]["resize"] == resize
    cached, plain = ImageDataset(splits["all"], eval_tf(cfg)), ImageDataset(direct["all"], eval_tf(cfg))
    assert len(cached) == len(plain) == N
    assert isinstance(splits["all"].images, Rows)  # on disk, not read into memory
    assert splits["all"].groups == direct["all"].groups and splits["all"].paths == direct["all"].paths
    for i in range(len(plain)):
        (a, ya), (b, yb) = cached[i], plain[i]
        assert ya == yb and a.shape == b.shape == (3, SIZE, SIZE)
        assert float((a - b).abs().max()) <= 0.5 / 255 + 1e-6


def test_fundus_preset_and_one_channel_cache_match_the_direct_path(source, tmp_path):
    cfg = cfg_of(source, preset="fundus", graham=True)
    prepare_cache(cfg, tmp_path / "cache", channels=1)
    splits, *_ = open_cache(tmp_path / "cache")
    assert splits["all"].images.shape == (N, SIZE, SIZE, 1)
    direct = read_source(str(source)).splits
    plain = ImageDataset(direct["all"], eval_tf(cfg))
    cached = ImageDataset(splits["all"], eval_tf(cfg))
    for i in (1, 2):  # grey files: one channel loses nothing
        assert float((cached[i][0] - plain[i][0]).abs().max()) <= 0.5 / 255 + 1e-6


def test_parallel_workers_write_the_same_cache_as_one_process(source, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK", 6)  # four chunks over two processes
    cfg = cfg_of(source)
    prepare_cache(cfg, tmp_path / "one", workers=0)
    prepare_cache(cfg, tmp_path / "two", workers=2)
    one = np.load(tmp_path / "one" / "all_images.npy")
    two = np.load(tmp_path / "two" / "all_images.npy")
    assert one.shape == (N, SIZE, SIZE, 3) and one.std() > 0
    np.testing.assert_array_equal(one, two)


def test_unreadable_and_missing_files_are_listed_and_left_out(source, tmp_path):
    (source.parent / "img3.jpg").write_bytes(b"not a jpeg")
    (source.parent / "img4.png").unlink()
    m = prepare_cache(cfg_of(source), tmp_path / "cache")
    skipped = json.loads((tmp_path / "cache" / "skipped.json").read_text())
    assert [Path(s["file"]).name for s in skipped] == ["img3.jpg"]
    assert "not a readable image" in skipped[0]["reason"] and len(m["skipped"]) == 1
    assert any("img4.png (row 6)" in n for n in m["notes"])  # the manifest's reader lists the missing file
    splits, _, _, notes, _ = open_cache(tmp_path / "cache")
    assert len(splits["all"]) == N - 2 and notes == m["notes"]
    assert not {"img3.jpg", "img4.png"} & {Path(p).name for p in splits["all"].paths}


def test_other_preprocessing_is_refused_with_the_reason_or_rebuilt_saying_why(source, tmp_path, caplog):
    prepare_cache(cfg_of(source), tmp_path / "cache")
    with pytest.raises(CacheError, match=r"size: cache 24, run 32"):
        prepare_cache(DataConfig(path=str(source), image_size=32), tmp_path / "cache", rebuild=False)
    with pytest.raises(CacheError, match=r"resize: cache 'squash', run 'pad'"):
        load_data(cfg_of(source, resize="pad", cache=str(tmp_path / "cache")))
    with caplog.at_level(logging.WARNING, logger="medsight.data.cache"):
        prepare_cache(DataConfig(path=str(source), image_size=32), tmp_path / "cache")
    assert "rebuilding the prepared cache" in caplog.text and "size: cache 24, run 32" in caplog.text
    assert np.load(tmp_path / "cache" / "all_images.npy", mmap_mode="r").shape[1] == 32


def test_a_changed_source_file_makes_the_cache_stale_and_is_named(source, tmp_path):
    cfg = cfg_of(source, cache=str(tmp_path / "cache"))
    load_data(cfg)  # prepares the new cache
    assert (tmp_path / "cache" / "manifest.json").is_file()
    changed = source.parent / "img5.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    with pytest.raises(CacheError, match=r"changed since it was prepared.*img5\.png"):
        load_data(cfg)


def test_the_model_transform_must_match_the_cache(source, tmp_path):
    prepare_cache(cfg_of(source), tmp_path / "cache")
    splits, *_ = open_cache(tmp_path / "cache")
    other = DataConfig(path=str(source), image_size=32)
    with pytest.raises(DataError, match="size: cache 24, transform 32"):
        ImageDataset(splits["all"], eval_tf(other))


def test_a_folder_that_is_not_a_cache_is_refused(source, tmp_path):
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a medsight prepared cache"):
        prepare_cache(cfg_of(source), stray)
    assert (stray / "notes.txt").read_text() == "mine"  # nothing of the user's is touched
    (stray / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(CacheError, match="not a medsight prepared cache"):
        open_cache(stray)
    with pytest.raises(CacheError, match="not found"):
        open_cache(tmp_path / "nowhere")


def test_an_interrupted_preparation_is_refused_then_resumed(source, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_mod, "CHUNK", 6)
    real, calls = cache_mod._prepare_chunk, []

    def interrupted(split, chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(chunk)
        return real(split, chunk)

    monkeypatch.setattr(cache_mod, "_prepare_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(cfg_of(source), tmp_path / "cache")
    with pytest.raises(CacheError, match=r"interrupted.*2 of 4 chunks"):
        open_cache(tmp_path / "cache")
    calls.clear()
    monkeypatch.setattr(cache_mod, "_prepare_chunk", lambda s, c: (calls.append(c), real(s, c))[1])
    with caplog.at_level(logging.INFO, logger="medsight.data.cache"):
        prepare_cache(cfg_of(source), tmp_path / "cache")
    assert "continuing an interrupted preparation (2 of 4 chunks done)" in caplog.text
    assert sorted(calls) == [2, 3]  # only what was missing
    prepare_cache(cfg_of(source), tmp_path / "fresh")
    np.testing.assert_array_equal(np.load(tmp_path / "cache" / "all_images.npy"),
                                  np.load(tmp_path / "fresh" / "all_images.npy"))


def test_a_full_disk_removes_the_partial_cache_with_a_clear_message(source, tmp_path, monkeypatch):
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod, "_write_rows", full)
    with pytest.raises(CacheError, match="full.*removed"):
        prepare_cache(cfg_of(source), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_training_data_from_the_cache_splits_by_patient_without_reading_images_into_memory(source, tmp_path):
    bundle = load_data(cfg_of(source, cache=str(tmp_path / "cache"), train_fraction=0.5))
    direct = load_data(cfg_of(source, train_fraction=0.5))
    for name in ("train", "val", "test"):
        assert isinstance(bundle.splits[name].images, Rows)
        assert bundle.splits[name].paths == direct.splits[name].paths  # the same split as without a cache
        np.testing.assert_array_equal(bundle.splits[name].labels, direct.splits[name].labels)
    x, y = ImageDataset(bundle.splits["train"], make_transform(SIZE, [0.5] * 3, [0.5] * 3, True,
                                                               cfg_of(source)))[0]
    assert x.shape == (3, SIZE, SIZE) and torch.isfinite(x).all()


def test_the_cli_prepares_and_a_cache_folder_reads_as_data(source, tmp_path, capsys):
    from medsight.cli import main

    assert main(["prepare", "--data", str(source), "--size", str(SIZE), "--out", str(tmp_path / "c"),
                 "--workers", "0", "--set", "data.resize=pad"]) == 0
    assert f"{N} of {N} images at 24 px (pad" in capsys.readouterr().out
    bundle = load_data(DataConfig(path=str(tmp_path / "c"), image_size=SIZE, resize="pad"))
    assert sum(len(s) for s in bundle.splits.values()) == N


# ---------------------------------------------------------------------------------------- two processes

def _rank_reads_cache(rank: int, port: int, src: str, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        bundle = load_data(DataConfig(path=src, image_size=SIZE, cache=cache))
        train = bundle.splits["train"]
        total = sum(int(np.asarray(train.images[i], dtype=np.int64).sum()) for i in range(len(train)))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"paths": train.paths, "sum": total}))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_read_one_cache_that_rank_0_prepares(source, tmp_path):
    from conftest import free_port

    cache = tmp_path / "cache"
    mp.start_processes(_rank_reads_cache, args=(free_port(), str(source), str(cache), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["sum"] > 0 and len(r0["paths"]) > 0
    assert json.loads((cache / "manifest.json").read_text())["complete"] is True


@pytest.mark.slow  # a whole run with its report: over 30 s on a busy two-core machine
def test_a_run_trains_on_the_cache_and_evaluate_reads_the_cache_folder(source, tmp_path):
    from conftest import tiny_overrides

    from medsight.api import evaluate
    from medsight.config import Config, apply_overrides
    from medsight.engine import train

    cache = tmp_path / "cache"
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", source) + [f"data.cache={cache}",
                                                                                 "train.sharpness_batches=1"])
    train(cfg, progress=False)
    assert json.loads((cache / "manifest.json").read_text())["preprocessing"]["size"] == 32
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1
    result = evaluate(tmp_path / "run" / "best.pt", str(cache))
    assert result["data"] == str(cache) and 0.0 <= result["test"]["accuracy"] <= 1.0
    assert result["skipped_files"] == []


@pytest.mark.parametrize("channels", [3, 1])
def test_training_augmentation_on_the_cache_runs_on_uint8_and_matches_the_float_path(source, tmp_path, channels):
    cfg = cfg_of(source, hflip=True, rotate_degrees=15)
    prepare_cache(cfg, tmp_path / "cache", channels=channels)
    split = open_cache(tmp_path / "cache")[0]["all"]
    tf = make_transform(SIZE, [0.5] * 3, [0.25] * 3, train=True, cfg=cfg)
    fast = ImageDataset(split, tf)
    assert fast._uint8_steps is not None  # flip and rotation run on the 8-bit image
    assert [type(t).__name__ for t in fast._uint8_steps.transforms] == ["RandomHorizontalFlip", "RandomAffine"]
    float_path = v2.Compose(tf.transforms[1:])  # the same steps on the float image, as before
    agree = []
    for i in range(len(fast)):
        torch.manual_seed(i)
        a, _ = fast[i]
        torch.manual_seed(i)
        b = float_path(fast.load(i))
        assert a.shape == b.shape == (3, SIZE, SIZE) and a.dtype == torch.float32
        agree.append(float(((a - b).abs() <= 1e-5).float().mean()))
    # the same random draws give the same picture; nearest-neighbour sampling may round a pixel the other way
    assert min(agree) >= 0.98
    torch.manual_seed(0)
    outs = {tuple(fast[0][0].flatten()[:50].tolist()) for _ in range(6)}
    assert len(outs) > 1  # augmentation is random, not skipped


def test_eval_transform_on_the_cache_has_no_uint8_steps(source, tmp_path):
    cfg = cfg_of(source, clahe=True, hflip=True)
    prepare_cache(cfg, tmp_path / "cache")
    split = open_cache(tmp_path / "cache")[0]["all"]
    assert ImageDataset(split, eval_tf(cfg))._uint8_steps is None
    # CLAHE comes before the flip: nothing may be moved ahead of it
    train_tf = make_transform(SIZE, [0.0] * 3, [1.0] * 3, train=True, cfg=cfg)
    assert ImageDataset(split, train_tf)._uint8_steps is None


# ------------------------------------------------------------------------------ files the cache owns, integrity

def test_rebuilding_a_cache_deletes_only_the_files_it_wrote(source, tmp_path, caplog):
    cache = tmp_path / "cache"
    prepare_cache(cfg_of(source), cache)
    (cache / "NOTES.txt").write_text("mine")
    (cache / "sub").mkdir()
    (cache / "sub" / "keep.txt").write_text("mine too")
    m = json.loads((cache / "manifest.json").read_text())
    assert set(m["files"]) >= {"all_images.npy", "all_labels.npy", "all_meta.json", "all_rows.npy", "manifest.json"}
    with caplog.at_level(logging.WARNING, logger="medsight.data.cache"):
        prepare_cache(DataConfig(path=str(source), image_size=32), cache)  # other preprocessing: rebuilt
    assert "rebuilding" in caplog.text
    assert (cache / "NOTES.txt").read_text() == "mine" and (cache / "sub" / "keep.txt").read_text() == "mine too"
    assert np.load(cache / "all_images.npy", mmap_mode="r").shape[1] == 32


def test_a_manifest_listing_a_users_file_cannot_delete_it(source, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache(cfg_of(source), cache)
    (cache / "NOTES.txt").write_text("mine")
    m = json.loads((cache / "manifest.json").read_text())
    m["files"].append("NOTES.txt")
    (cache / "manifest.json").write_text(json.dumps(m))
    prepare_cache(DataConfig(path=str(source), image_size=32), cache)
    assert (cache / "NOTES.txt").read_text() == "mine"


def test_a_cache_inside_a_class_folder_source_is_refused(tmp_path):
    root = tmp_path / "folders"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), i * 30, np.uint8)).save(root / c / f"{i}.png")
    with pytest.raises(DataError, match=r"--out .*inside the data folder"):
        prepare_cache(DataConfig(path=str(root), image_size=SIZE), root / "cache")
    assert not (root / "cache").exists()
    assert load_data(DataConfig(path=str(root), image_size=SIZE, val_fraction=0.25, test_fraction=0.25)).classes == ["a", "b"]


@pytest.mark.parametrize("edit", ["classes", "labels", "rows", "groups", "preprocessing"])
def test_a_tampered_cache_is_refused_on_open(source, tmp_path, edit):
    cache = tmp_path / "cache"
    prepare_cache(cfg_of(source), cache)
    m = json.loads((cache / "manifest.json").read_text())
    if edit == "classes":
        m["classes"] = m["classes"][::-1]
        (cache / "manifest.json").write_text(json.dumps(m))
    elif edit == "preprocessing":
        m["preprocessing"]["size"] = 32
        (cache / "manifest.json").write_text(json.dumps(m))
    elif edit == "labels":
        labels = np.load(cache / "all_labels.npy")
        np.save(cache / "all_labels.npy", 1 - labels)
    elif edit == "rows":
        np.save(cache / "all_rows.npy", np.arange(N + 5))
    else:
        meta = json.loads((cache / "all_meta.json").read_text())
        meta["groups"] = ["p0"] * len(meta["groups"])
        (cache / "all_meta.json").write_text(json.dumps(meta))
    what = "manifest.json was changed" if edit in ("classes", "preprocessing") else "was changed after"
    with pytest.raises(CacheError, match=what):
        open_cache(cache)
    with pytest.raises(CacheError):
        load_data(cfg_of(source, cache=str(cache)))


def test_rows_out_of_range_are_refused_even_with_matching_checksums(source, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache(cfg_of(source), cache)
    np.save(cache / "all_rows.npy", np.array([0, 1, N + 3]))
    m = json.loads((cache / "manifest.json").read_text())
    m["checksums"]["all_rows.npy"] = cache_mod._sha256_file(cache / "all_rows.npy")
    m["seal"] = cache_mod._seal(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="'all' split is inconsistent.*out of range"):
        open_cache(cache)


def test_verify_checks_the_image_arrays(source, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache(cfg_of(source), cache)
    assert cache_mod.verify_cache(cache) == {"images": N, "chunks": 1}
    images = np.load(cache / "all_images.npy", mmap_mode="r+")
    images[5, 0, 0, 0] ^= 1
    images.flush()
    del images
    open_cache(cache)  # the cheap check on open does not read images
    with pytest.raises(CacheError, match=r"'all' split, rows 0-23, changed"):
        cache_mod.verify_cache(cache)


def test_content_changed_with_the_same_size_and_time_makes_the_cache_stale(source, tmp_path):
    cache = tmp_path / "cache"
    target = source.parent / "img1.png"
    noise = np.random.default_rng(1).integers(0, 255, (96, 96), dtype=np.uint8)
    Image.fromarray(noise).save(target)  # larger than both probes: the change below is in its last bytes only
    assert target.stat().st_size > 2 * cache_mod.PROBE
    prepare_cache(cfg_of(source), cache)
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # inside the last bytes: same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(CacheError, match=r"changed since it was prepared.*img1\.png"):
        prepare_cache(cfg_of(source), cache, rebuild=False)
    with pytest.raises(CacheError, match=r"source .* changed since it was prepared"):  # --data CACHE
        load_data(DataConfig(path=str(cache), image_size=SIZE))


def test_a_cache_read_as_data_is_checked_against_its_source_when_present(source, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache(cfg_of(source), cache)
    rows = list(csv.DictReader(source.open()))
    rows[0]["label"] = "b" if rows[0]["label"] == "a" else "a"  # a relabelled image
    with source.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(CacheError, match="changed since it was prepared"):
        load_data(DataConfig(path=str(cache), image_size=SIZE))
    source.rename(source.with_suffix(".moved"))  # the source not at hand: the cache is used as prepared
    assert sum(len(s) for s in load_data(DataConfig(path=str(cache), image_size=SIZE)).splits.values()) == N


def test_cache_labels_match_a_direct_read_label_for_label_after_skipped_files(source, tmp_path):
    (source.parent / "img3.jpg").write_bytes(b"not a jpeg")  # skipped while preparing
    (source.parent / "img10.png").write_bytes(b"broken")
    prepare_cache(cfg_of(source), tmp_path / "cache")
    splits, classes, *_ = open_cache(tmp_path / "cache")
    direct = read_source(str(source))
    truth = dict(zip(direct.splits["all"].paths, direct.splits["all"].labels.tolist()))
    cached = splits["all"]
    assert len(cached) == N - 2 and classes == direct.classes
    assert [truth[p] for p in cached.paths] == cached.labels.tolist()
    assert np.asarray(cached.images[3]).std() > 0  # row 3 is img4's image, not the skipped img3's zeros
    ds = ImageDataset(cached, eval_tf(cfg_of(source)))
    plain = ImageDataset(direct.splits["all"], eval_tf(cfg_of(source)))
    j = direct.splits["all"].paths.index(cached.paths[3])
    assert float((ds[3][0] - plain[j][0]).abs().max()) <= 0.5 / 255 + 1e-6


def test_prepare_caches_what_the_plan_would_use_and_a_run_takes_the_caches_preprocessing(tmp_path, capsys):
    from medsight.cli import main
    from medsight.config import load_config
    from medsight.planning import adopt_cache, plan_for

    rng = np.random.default_rng(0)
    src = tmp_path / "fundus"
    for c in ("0", "1"):
        (src / c).mkdir(parents=True)
        for i in range(6):  # full-resolution, non-square photographs
            Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(src / c / f"{i}.jpg")
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(src), "--out", str(cache), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "plan: data.image_size = 224" in out and "plan: data.resize = pad" in out
    m = json.loads((cache / "manifest.json").read_text())
    assert m["preprocessing"]["size"] == 224 and m["preprocessing"]["resize"] == "pad"
    cfg = adopt_cache(load_config(None, [f"data.path={src}", f"data.cache={cache}"]))
    assert cfg.data.image_size == 224 and cfg.data.resize == "pad"
    decided = {d.key: d.value for d in plan_for(cfg).decisions}
    assert decided["data.image_size"] == 224 and decided["data.resize"] == "pad"
    assert load_data(cfg.data).splits["train"].prepared["size"] == 224
    mine = adopt_cache(load_config(None, [f"data.path={src}", f"data.cache={cache}", "data.image_size=128"]))
    with pytest.raises(CacheError, match=r"size: cache 224, run 128"):  # the user's own setting is not overridden
        load_data(mine.data)
