"""The GPU suite proved on the CPU: every section measured, partial results kept, a second call resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_a_killed_suite_keeps_its_sections_and_the_next_call_resumes(tmp_path, monkeypatch):
    calls: list[str] = []

    def fake(name):
        def run(a):
            calls.append(name)
            if name == "gradcam" and calls.count("gradcam") == 1:
                raise KeyboardInterrupt  # the first call is stopped here
            return {"value": len(calls)}
        return run

    monkeypatch.setattr(gpu_suite, "RUNNERS", {n: fake(n) for n in gpu_suite.SECTIONS})
    args = ["--quick", "--device", "cpu", "--output", str(tmp_path / "s.json"), "--work", str(tmp_path / "w"),
            "--sections", "optimizers", "gradcam", "end_to_end"]
    monkeypatch.setattr(gpu_suite, "quick_data", lambda work, **kw: work / "data.npz")
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.main(args)
    kept = json.loads((tmp_path / "s.json").read_text())["sections"]
    assert list(kept) == ["optimizers"] and kept["optimizers"]["value"] == 1
    (tmp_path / "w" / "cache32").mkdir()
    (tmp_path / "w" / "cache32" / "manifest.json").write_text("{}")  # the cache is there: not prepared again
    gpu_suite.main(args)
    doc = json.loads((tmp_path / "s.json").read_text())["sections"]
    assert calls == ["optimizers", "gradcam", "gradcam", "end_to_end"]  # optimizers not measured again
    assert list(doc) == ["optimizers", "gradcam", "end_to_end"] and doc["optimizers"]["value"] == 1
    gpu_suite.main(args + ["--fresh"])
    assert calls[4:] == ["optimizers", "gradcam", "end_to_end"]


@pytest.mark.slow
def test_quick_suite_measures_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--quick", "--device", "cpu",
                           "--output", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads(out.read_text())["sections"]
    assert list(s) == list(gpu_suite.SECTIONS)
    assert s["prepare"]["images"] == 64 + 24 + 24 and s["prepare"]["images_per_s"] > 0
    opt = s["optimizers"]
    assert opt["time_ratio_vs_adamw"]["adamw"] == 1.0 and opt["step_ms"]["sam-adamw"] > 0
    assert set(s["loader"]["batched_on_device"]) == set(s["loader"]["per_image"]) == {"0", "1"}  # 2 cores: 0..1
    assert s["loop"]["batched_on_device"] and 0 < s["loop"]["loop_over_step"]
    assert s["gradcam"]["images"] >= 8 and s["gradcam"]["hooks_left"] == 0
    e2e = s["end_to_end"]
    sec = e2e["seconds"]
    assert e2e["epochs"] == 1 and 0 <= e2e["test_auc"] <= 1
    assert e2e["published_resnet50_224"] == {"auc": 0.962, "acc": 0.884}
    assert sec["data_preparation"] >= s["prepare"]["seconds"] and sec["training"] > 0 and sec["validation"] > 0
    steps = sec["end_of_run_steps"]
    assert {"predict", "metrics", "trust", "robustness", "gallery", "faithfulness", "sharpness", "report"} <= set(steps)
    assert abs(sum(steps.values()) - sec["end_of_run"]) < 0.01
    assert e2e["robustness_mean_drop"] is not None
    assert "--set data.cache=" in e2e["command"] and "--set optim.name=sam-adamw" in e2e["command"]


def test_run_timing_splits_each_epoch_into_training_and_validation():
    from medsight.engine.finish import StepTimer, run_timing

    timer = StepTimer()
    with timer("predict"):
        pass
    timer.seconds.update({"predict": 2.0, "report": 1.0})
    history = [{"train_seconds": 10.0, "seconds": 12.0}, {"train_seconds": 11.0, "seconds": 14.0}]
    t = run_timing(history, timer.seconds)
    assert (t["train_seconds"], t["validation_seconds"], t["end_of_run_seconds"]) == (21.0, 5.0, 3.0)
    assert t["end_of_run_share"] == round(3 / 29, 4) and t["end_of_run_steps"] == {"predict": 2.0, "report": 1.0}
    with timer("report"):  # a step timed twice adds up
        pass
    assert timer.seconds["report"] >= 1.0
