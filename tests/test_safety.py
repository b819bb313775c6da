"""Nothing lost, nothing half-written, nothing read wrongly: run folders are private, results are not
overwritten, a process killed mid-write leaves nothing a resume trips over, and hand-edited files are
refused by name. Probed with real files and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.api import OutputExistsError, evaluate
from medsight.checkpoint import CheckpointError, load_checkpoint, load_model
from medsight.cli import main
from medsight.config import Config, apply_overrides
from medsight.engine import train
from medsight.inference import EnsembleFileError, load_predictor
from medsight.utils.files import OutputNotWritableError, check_writable, make_private

from conftest import tiny_overrides, write_class_folders


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


# ---------------------------------------------------------------------------------- a finished run folder

@pytest.fixture(scope="module")
def run_with_corrupt_files(tmp_path_factory) -> Path:
    """A run on pre-split class folders with one unreadable file in val and one in test."""
    root = tmp_path_factory.mktemp("corrupt")
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        write_class_folders(root / "data" / split, n_per_class=n, seed=n)
    (root / "data" / "val" / "normal" / "zz_broken_val.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (root / "data" / "test" / "pneumonia" / "zz_broken_test.png").write_bytes(b"")
    cfg = apply_overrides(Config(), tiny_overrides(root / "run", root / "data") + [
        "train.sharpness_batches=0", "explain.faithfulness_images=0"])
    train(cfg, progress=False)
    return root / "run"


def test_skipped_files_in_metrics_include_the_val_and_test_splits(run_with_corrupt_files):
    skipped = json.loads((run_with_corrupt_files / "metrics.json").read_text())["skipped_files"]
    assert any(s.endswith("zz_broken_test.png") for s in skipped), skipped
    assert any(s.endswith("zz_broken_val.png") for s in skipped), skipped


def test_every_file_of_a_finished_run_is_private_to_its_user(run_with_corrupt_files):
    modes = _modes(run_with_corrupt_files)
    assert {"best.pt", "last.pt", "config.yaml", "history.csv", "metrics.json", "report.html", "predictions.npz",
            "gradcam_gallery.png", "curves.png", "roc.png", "confusion_matrix.png"} <= set(modes)
    for name, mode in modes.items():
        is_dir = (run_with_corrupt_files / name).is_dir()
        assert mode == (0o700 if is_dir else 0o600), (name, oct(mode))


def test_make_private_touches_only_what_it_is_given(tmp_path):
    (tmp_path / "mine.txt").write_text("the user's own file")
    os.chmod(tmp_path / "mine.txt", 0o644)
    (tmp_path / "metrics.json").write_text("{}")
    os.chmod(tmp_path / "metrics.json", 0o644)
    make_private(tmp_path, only=["metrics.json", "missing.png"])
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "mine.txt").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------- evaluate --out

def test_evaluate_into_a_run_folder_is_refused_and_the_run_is_untouched(tiny_run, tmp_path, capsys):
    data = write_class_folders(tmp_path / "external", n_per_class=4, seed=9)
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    with pytest.raises(OutputExistsError, match="is a run folder.*--out .*external"):
        evaluate(tiny_run / "best.pt", str(data), out=tiny_run, device="cpu")
    assert main(["evaluate", str(tiny_run / "best.pt"), "--data", str(data), "--out", str(tiny_run)]) == 2
    assert "is a run folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()} == before
    # into a new folder it works, and what it writes is private like a run's files
    out = tmp_path / "eval"
    evaluate(tiny_run / "best.pt", str(data), out=out, device="cpu")
    assert set(_modes(out).values()) == {0o700, 0o600} and _modes(out)["."] == 0o700
    with pytest.raises(OutputExistsError, match="already holds a metrics.json"):
        evaluate(tiny_run / "best.pt", str(data), out=out, device="cpu")


# ----------------------------------------------------------------------------------- unwritable --out

def test_check_writable_refuses_what_cannot_be_written_even_for_root(tmp_path):
    check_writable(tmp_path / "new" / "run")  # need not exist yet
    assert not (tmp_path / "new").exists()  # and the check leaves nothing behind
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputNotWritableError, match="is a file, not a folder"):
        check_writable(a_file)
    with pytest.raises(OutputNotWritableError, match=r"cannot be created: .*a_file is a file"):
        check_writable(a_file / "run")
    # permission bits do not stop root; a virtual file system does (os.access says yes here, wrongly)
    with pytest.raises(OutputNotWritableError, match=r"/proc/medsight_run cannot be written"):
        check_writable("/proc/medsight_run")
    assert isinstance(OutputNotWritableError("x"), ValueError)  # every command reports ValueErrors cleanly


# ------------------------------------------------------------------------- SIGKILL in the middle of a write

_KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    real_save, seen = torch.save, {"n": 0}
    def save(obj, f, *args, **kwargs):  # the second last.pt is written slowly: half a file, then a long pause
        if Path(str(f)).name.startswith(".last.pt."):
            seen["n"] += 1
            if seen["n"] == 2:
                with open(f, "wb") as fh:
                    fh.write(b"half a checkpoint")
                print("MID-WRITE", flush=True)
                time.sleep(600)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
    from medsight.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_run_killed_mid_write_resumes_and_its_half_written_files_are_removed(tmp_path, small_npz):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", *(f"--set={o}" for o in tiny_overrides(out, small_npz, epochs=2)
                                                          + ["train.sharpness_batches=0", "explain.faithfulness_images=0"])]
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline, lines = time.time() + 300, []
    try:
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "MID-WRITE" in line or (not line and proc.poll() is not None):
                break
        assert "MID-WRITE" in lines[-1], "".join(lines)
        stale = list(out.glob(".last.pt.*.tmp"))
        assert stale and stale[0].read_bytes() == b"half a checkpoint"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # the finished epoch's file is whole
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert list(out.glob(".*.tmp")) == []
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and (out / "metrics.json").is_file()


# ------------------------------------------------------------------------------ hand-edited checkpoints

@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("model"), "lacks the 'model' entry"),
    (lambda c: c.update(image_size="abc"), "image_size must be a positive integer, got 'abc'"),
    (lambda c: c.update(mean=[0.5, 0.5]), r"mean must be three numbers .* got \[0.5, 0.5\]"),
    (lambda c: c.update(std=[0.2, 0.0, 0.2]), "std must be positive"),
])
def test_hand_edited_checkpoints_are_refused_naming_the_entry(tiny_run, tmp_path, capsys, edit, words):
    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=words):
        load_model(path)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert "edited.pt" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- hand-edited ensembles

@pytest.mark.parametrize("content, words", [
    ("[1, 2, 3]", "not a medsight ensemble file: it holds a JSON list"),
    ('"members"', "it holds a JSON str"),
    ('{"format": "medsight-ensemble-1", "method": "soft", "classes": ["a", "b"], "combiner": {}}',
     "'members' must be a non-empty list of checkpoint paths"),
    ('{"format": "medsight-ensemble-1", "method": "soft", "classes": ["a", "b"], "combiner": {}, "members": "x.pt"}',
     "'members' must be a non-empty list"),
    ('{"format": "medsight-ensemble-1", "members": ["a.pt"], "classes": "ab", "method": "soft", "combiner": {}}',
     "'classes' must be a list"),
    ("\x00\x01binary", "not a readable ensemble file"),
])
def test_bad_ensemble_files_are_refused_by_name(tmp_path, capsys, content, words):
    spec = tmp_path / "ensemble.json"
    spec.write_text(content)
    with pytest.raises(EnsembleFileError, match=words):
        load_predictor(spec, "cpu")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    assert main(["predict", str(spec), str(image)]) == 2
    assert "Traceback" not in capsys.readouterr().err
