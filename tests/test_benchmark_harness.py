"""The PneumoniaMNIST benchmark harness: a CPU smoke run and a table writer that refuses bad rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import pneumoniamnist as bench  # noqa: E402


def test_quick_run_writes_rows_through_medsights_train(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pneumoniamnist.py"), "--quick", "--configs",
                           "coatnet_tiny_sam", "resnet18_paper", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [("coatnet_tiny_sam", 0), ("resnet18_paper", 0)]
    for r in rows:
        assert r["status"] == "ok" and r["epochs"] == 1 and 0 <= r["test_auc"] <= 1 and r["device"] == "CPU"
    assert "| coatnet_tiny_sam | 1 |" in proc.stdout and "Google AutoML Vision (published)" in proc.stdout


def row(**kw):
    base = {"config": "coatnet0_sam", "seed": 0, "test_auc": 0.97, "test_acc": 0.9, "val_auc": 0.99, "epochs": 30,
            "seconds": 100.0, "device": "GPU", "status": "ok", "sharpness": 0.5, "test_acc_at_val_threshold": 0.92}
    base.update(kw)
    return base


def test_table_refuses_rows_without_seed_or_config():
    with pytest.raises(ValueError, match="lacks seed"):
        bench.table([row(seed=None)])
    bad = row()
    del bad["config"]
    with pytest.raises(ValueError, match="lacks config"):
        bench.table([bad])
    with pytest.raises(ValueError, match="no finite test metrics"):
        bench.table([row(test_auc=float("nan"))])


def test_table_means_and_reports_diverged_runs():
    rows = [row(seed=0, test_auc=0.96), row(seed=1, test_auc=0.98),
            row(seed=2, status="diverged", test_auc=None, test_acc=None)]
    text = bench.table(rows)
    assert "| coatnet0_sam | 2 (+1 diverged) | 0.970 ± 0.014 |" in text


def test_looksam_target_is_judged_on_mean_gains_and_never_passes_without_a_sam_gain():
    import optimizers

    def runs(auc):  # per optimizer: test AUC of seeds 0 and 1 (other metrics fixed)
        return [{"optimizer": name, "seed": s, "test_auc": a, "test_acc": 0.9, "test_acc_at_val_threshold": 0.9,
                 "test_balanced_acc": 0.9, "seconds": 1.0, "sharpness": {"ascent": 1.0}}
                for name, pair in auc.items() for s, a in enumerate(pair)]

    kept = optimizers.summarize(runs({"adamw": [0.90, 0.92], "sam-adamw": [0.94, 0.96], "looksam-adamw": [0.93, 0.96]}))
    target = kept["target_looksam_keeps_90pct_of_sam_gain"]["test_auc"]
    assert target["sam_gain"] == pytest.approx(0.04) and target["fraction_kept"] == pytest.approx(0.875)
    assert target["looksam_keeps_90pct"] is False
    no_gain = optimizers.summarize(runs({"adamw": [0.95, 0.95], "sam-adamw": [0.94, 0.95], "looksam-adamw": [0.96, 0.96]}))
    assert no_gain["target_looksam_keeps_90pct_of_sam_gain"]["test_auc"]["looksam_keeps_90pct"] is None
    partial = optimizers.summarize(runs({"adamw": [0.9, 0.9], "sam-adamw": [0.9]}))  # seed 1 of SAM unfinished
    assert partial["seeds_complete"] == [] and "means" not in partial


def test_loader_loop_against_step_alternates_rounds_on_a_prepared_cache(tmp_path):
    import argparse

    import torch

    import loader
    from medsight.config import DataConfig

    args = argparse.Namespace(batch=4, steps=2, rounds=3, size=32, loader_workers=0, cpu_model="resnet18",
                              gpu_model="coatnet_0_rw_224")
    r = loader.loop_against_step(tmp_path, DataConfig(image_size=32, hflip=True, rotate_degrees=10), args,
                                 torch.device("cpu"))
    assert r["model"] == "resnet18" and r["precision"] == "fp32" and r["rounds"] == 3
    assert len(r["step_rounds"]) == len(r["loop_rounds"]) == 3
    # the three figures are rounded (2 and 3 decimals): on a slow or busy machine, at a few images/s, the
    # rounding alone is worth more than a fixed 0.002, so the ratio is checked to what the rounding allows
    loop, step, ratio = r["loop_on_cache_images_per_s"], r["step_only_images_per_s"], r["loop_over_step"]
    assert abs(ratio - loop / step) <= 0.0005 + ratio * (0.005 / loop + 0.005 / step) * 1.01
    assert (tmp_path / "loop_cache").is_dir()


def test_trust_exchangeable_check_covers_when_calibration_and_test_are_exchangeable(tiny_run):
    import trust
    from medsight.evaluation.runs import load_run

    r = trust.exchangeable_check(load_run(tiny_run), splits=40)
    assert r["splits"] == 40 and r["target_coverage"] == 0.9
    # split conformal's guarantee: mean coverage >= 90% over random exchangeable halves (up to the splits' noise)
    assert 0.85 <= r["conformal_coverage"]["mean"] <= 1.0
    for k in ("ece_validation_temperature", "ece_test_half_temperature"):
        assert 0 <= r[k]["mean"] <= 1 and r[k]["sd"] >= 0
    assert 0 <= r["ece_lowered_share"] <= 1


def test_serve_load_rounds_become_medians_with_their_range():
    import serve_load

    def rnd(tp, p95, ok=True, diff=1e-7):
        return {"all_ok": ok, "statuses": [200], "throughput_req_per_s": tp, "latency_ms_p50": p95 / 2,
                "latency_ms_p95": p95, "labels_match_alone": ok, "labels_match_pytorch_sequential": True,
                "max_abs_prob_diff_vs_alone": diff, "max_abs_prob_diff_vs_pytorch_sequential": diff}

    row = serve_load.median_row([rnd(100, 300), rnd(140, 250), rnd(120, 900, ok=False, diff=3e-7)])
    assert row["throughput_req_per_s"] == 120 and row["throughput_range"] == [100, 140]
    assert row["latency_ms_p95"] == 300 and row["throughput_rounds"] == [100, 140, 120]
    assert row["all_ok"] is False and row["labels_match_alone"] is False  # one bad round spoils the mode
    assert row["max_abs_prob_diff_vs_alone"] == 3e-7


def test_benchmark_round_counts_below_one_are_refused_by_name():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--decode-rounds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--decode-rounds: must be at least 1, got 0" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "run/best.pt", "--repeats", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--repeats: expected a whole number, got 'x'" in proc.stderr


def test_technique_verdicts_pair_by_seed_and_need_the_gain_beyond_its_spread():
    import techniques as tech

    def rows(variant, values, key="m"):
        return [{"variant": variant, "seed": s, key: v} for s, v in values.items()]

    base = rows("plain", {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.9})
    up = tech._gain(base + rows("t", {0: 0.52, 1: 0.63, 2: 0.575}), "t", "plain", "m")
    assert up["seeds"] == [0, 1, 2] and up["verdict"] == "confirmed"  # seed 3 has no pair
    assert up["gain_mean"] == 0.025 and up["b_mean"] == 0.55
    noisy = tech._gain(base + rows("t", {0: 0.55, 1: 0.56, 2: 0.57}), "t", "plain", "m")
    assert noisy["verdict"] == "not confirmed"  # +0.01 mean, spread 0.046
    down = tech._gain(base + rows("t", {0: 0.45, 1: 0.56, 2: 0.50}), "t", "plain", "m")
    assert down["verdict"] == "worse" and down["gain_mean"] < 0
    lower = tech._gain(base + rows("t", {0: 0.45, 1: 0.56, 2: 0.50}), "t", "plain", "m", lower_better=True)
    assert lower["verdict"] == "confirmed" and lower["gain_mean"] > 0  # a lower AURC / ECE / drop is a gain
    assert tech._gain(base + rows("t", {0: 0.9, 1: 0.9}), "t", "plain", "m")["verdict"] == "incomplete"


def test_technique_cells_say_why_they_do_not_apply_and_progressive_has_its_own_baseline():
    import techniques as tech

    assert tech.applies("nih1000", "triplet") and tech.applies("pneumoniamnist", "corn")
    assert tech.applies("retinamnist", "progressive") is None and tech.applies("pneumonia500", "progressive")
    # few-shot pairs: the NIH set has no single class per image, and K-shot draws from 500 images repeat the
    # PneumoniaMNIST rows; they run on the sets where they mean something
    assert tech.applies("nih1000", "plain-k5") and tech.applies("pneumonia500", "prototypical-k20")
    assert tech.applies("pneumoniamnist", "plain-k10") is None and tech.applies("retinamnist", "prototypical-k5") is None
    assert tech.applies("nih1000", "cosine") is None and tech.applies("pneumonia500", "se_blocks") is None
    rows = [{"dataset": "pneumonia500", "variant": v, "seed": s, "test_auc": 0.9, "test_acc": 0.8}
            for v in ("plain", "prototypical") for s in (0, 1, 2)]
    cell = tech.summarize(rows)["table"]["pneumonia500"]["techniques"]["prototypical"]
    assert "not_applicable" in cell["few_shot_acc"] and cell["test_auc"]["seeds"] == [0, 1, 2]
    assert "n/a: K images per class" in tech.table_md(tech.summarize(rows))
    nih = [{**r, "dataset": "nih1000", "variant": v} for r in rows for v in ("plain", "cosine") if r["variant"] == "plain"]
    assert set(tech.summarize(nih)["table"]["nih1000"]["techniques"]["cosine"]) == {"test_auc"}  # mean AUC only
    assert tech.BASELINE["progressive"] == "finetune" and tech.BASELINE["sam"] == "sam_off"
    row = tech._relative({"command": "medsight train --data /x/y/data/retinamnist.npz --set "
                                     "model.weights=/x/y/benchmarks/runs/techniques/weights/w/best.pt"})
    assert row["command"] == ("medsight train --data data/retinamnist.npz --set "
                              "model.weights=benchmarks/runs/techniques/weights/w/best.pt")


def test_stacking_trains_only_its_missing_members_and_is_judged_against_its_own_plain_member(tmp_path, monkeypatch):
    import techniques as tech

    def finish(folder, auc):  # a finished run folder with test scores
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"test": {"auc": auc, "accuracy": auc - 0.2, "qwk": auc - 0.1}}))

    trained, stacked = [], []
    monkeypatch.setattr(tech, "RUNS", tmp_path)
    monkeypatch.setattr(tech, "_train", lambda d, v, s, folder: (trained.append(v), finish(folder, 0.70)))
    monkeypatch.setattr("medsight.evaluation.ensemble.ensemble",
                        lambda members, method, out, seed: (stacked.append((method, [m.name for m in members])),
                                                            finish(Path(out), 0.80)))
    rows = []
    for seed, plain_auc in ((0, 0.74), (1, 0.76), (2, 0.75)):
        finish(tmp_path / "retinamnist" / f"plain-seed{seed}", plain_auc)  # the member actually stacked
        finish(tmp_path / "retinamnist" / f"se_blocks-seed{seed}", 0.72)
        rows.append({"dataset": "retinamnist", "variant": "plain", "seed": seed, "test_auc": 0.60})  # saved row
        assert tech.run_stacking("retinamnist", seed)["test_auc"] == 0.80
    assert trained == ["cosine"] * 3  # plain and se_blocks were on disk
    assert stacked[0] == ("stacking", ["plain-seed0", "se_blocks-seed0", "cosine-seed0"])
    saved = json.loads((tmp_path / "retinamnist" / "stack_plain-seed1.json").read_text())
    assert saved["test_auc"] == 0.76 and saved["variant"] == "stack_plain"
    cell = tech.summarize(rows + tech.collect())["table"]["retinamnist"]["techniques"]["stacking"]
    assert cell["test_auc"]["b_mean"] == 0.75 and cell["test_auc"]["gain_mean"] == pytest.approx(0.05)


def test_a_findings_runs_row_has_no_accuracy_interval_and_a_class_runs_row_has_one(tmp_path):
    from default_run import run_row

    def row(ci95):
        (tmp_path / "metrics.json").write_text(json.dumps({
            "test": {"auc": 0.61, "accuracy": 0.003, "balanced_accuracy": 0.55, "ece": 0.05, "ci95": ci95},
            "val": {"auc": 0.64}, "best_epoch": 8}))
        return run_row(tmp_path, ["--data", "x.npz"], 12.0)

    findings = row({"auc": [0.56, 0.64]})  # multi-label: an interval for the mean AUC only
    assert findings["test_acc_ci95"] is None and findings["test_auc_ci95"] == [0.56, 0.64]
    assert findings["test_auc"] == 0.61 and findings["command"] == "medsight train --data x.npz"
    assert row({"auc": [0.5, 0.7], "accuracy": [0.8, 0.9]})["test_acc_ci95"] == [0.8, 0.9]


def test_technique_rows_pin_the_default_they_were_measured_against_and_the_recipe_row_runs_the_plan(monkeypatch):
    import techniques as tech

    commands = []
    monkeypatch.setattr(tech, "measure", lambda argv, keep, reuse: commands.append(argv) or {"command": ""})
    for variant in ("plain", "sam_off", "cosine", "plain-k5", "recipe"):
        tech._train("pneumonia500", variant, 1, Path("unused"))
    sets = [[a for a in argv[1:] if "=" in a] for argv in commands]
    for variant_sets in sets[:4]:  # SAM and no TTA first, the technique's own settings after them (later wins)
        assert variant_sets[1:3] == list(tech.PINNED) and variant_sets[-1] == "train.seed=1"
    assert sets[1][3] == "optim.name=adamw" and sets[3][3] == "data.shots=5"
    assert not any(s in sets[4] for s in tech.PINNED) and sets[4] == ["data.train_fraction=0.1062", "train.seed=1"]
    assert tech.applies("pneumoniamnist", "recipe") and tech.applies("retinamnist", "recipe") is None
    rows = [{"dataset": "retinamnist", "variant": v, "seed": s, "test_auc": a + s / 100, "test_acc": 0.5,
             "test_qwk": 0.6} for v, a in (("plain", 0.70), ("recipe", 0.72), ("stack_plain", 0.75)) for s in (0, 1, 2)]
    cell = tech.summarize(rows)["table"]["retinamnist"]["techniques"]["recipe"]
    assert cell["test_auc"]["verdict"] == "confirmed" and cell["test_auc_vs_stack_plain"]["verdict"] == "worse"
    assert set(cell) == {f"{k}{vs}" for k in ("test_qwk", "test_auc", "test_acc") for vs in ("", "_vs_stack_plain")}


def test_small_data_timing_alternates_the_recipe_and_the_former_default(monkeypatch):
    import small_data_time as sdt

    calls, saved = [], {}
    seconds = iter([100.0, 200.0, 310.0, 180.0, 110.0, 220.0])

    def fake_measure(argv):
        calls.append("optim.name=sam-adamw" in argv)
        return {"seconds": next(seconds), "test_auc": 0.9, "test_acc": 0.8, "command": " ".join(argv), "machine": "m"}

    monkeypatch.setattr(sdt, "measure", fake_measure)
    monkeypatch.setattr(sdt, "save_result", lambda name, data: saved.update(data))
    monkeypatch.setattr(sys, "argv", ["small_data_time.py", "--rounds", "3"])
    assert sdt.main() == 0
    assert calls == [False, True] * 3  # A B A B A B: the recipe unpinned, the former default pinned
    recipe, former = saved["runs"].values()
    assert (recipe["median_seconds"], recipe["max_seconds"]) == (110.0, 310.0) and not recipe["within_target"]
    assert former["median_seconds"] == 200.0 and former["within_target"]
    assert saved["former_over_recipe"] == round(200 / 110, 2)
