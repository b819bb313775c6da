"""Multi-label chest X-ray findings on the 1,000-image ChestX-ray14 subset: medsight's default plan against a
plain reference, same seeds, in one run.

medsight: `medsight train --data data/nih_cxr14_1000.npz --set train.seed=S` and nothing else (the plan picks
every option from the data). Reference: a short hand-written loop with no medsight feature — timm's
ResNet-18 from scratch on the 64-px grayscale images (x / 255, normalized by 0.5), plain BCE, Adam lr 1e-3,
batch 128, a fixed number of epochs (``--ref-epochs``, default 30), the last epoch's weights, no
augmentation, no validation-based selection. Both are scored by the same per-finding test AUC
(scikit-learn), the mean over the findings with test positives (all 14 of this test split).

Target (issue "Chest X-ray findings are multi-label"): medsight's mean test AUC >= the reference's + 0.02
(means of 3 seeds), each medsight run <= 10 minutes on the 2-core CPU. Published rows (trained on ~78k
images or the full set, far more than these 572): ChestMNIST ResNet-18 (28) 0.768 and Google AutoML Vision 0.778 (MedMNIST
v2), CheXNet 0.841 (DenseNet-121, 224 px, Rajpurkar et al. 2017).

Runs are kept in benchmarks/runs/chest14/ (medsight-seedS/ run folders, reference-seedS.json); finished ones
are read, not trained again, and the results file is rewritten after every run, so the benchmark resumes.

    python benchmarks/chest14.py                        # seeds 0-2 -> benchmarks/results/chest14.json
    python benchmarks/chest14.py --seeds 0 --ref-epochs 2 --quick   # a smoke test (tiny, not a measurement)
    python benchmarks/chest14.py --table                # the README table from the saved results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, mean_sd, save_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "nih_cxr14_1000.npz"
RUNS = Path(__file__).parent / "runs" / "chest14"
PUBLISHED = {"ChestMNIST ResNet-18 (28), MedMNIST v2": 0.768, "ChestMNIST Google AutoML Vision, MedMNIST v2": 0.778,
             "CheXNet (DenseNet-121, 224 px), Rajpurkar et al. 2017": 0.841}
TARGET_GAIN, MAX_SECONDS = 0.02, 600


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def per_finding_auc(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    return {n: _r(roc_auc_score(labels[:, k], probs[:, k])) if 0 < labels[:, k].sum() < len(labels) else None
            for k, n in enumerate(names)}


def run_medsight(seed: int, quick: bool) -> dict:
    """`medsight train --data DATA --set train.seed=S` (``quick``: 1 epoch, for smoke tests only)."""
    folder = RUNS / f"medsight-seed{seed}{'-quick' if quick else ''}"
    extra = ["--data", str(DATA), "--set", f"train.seed={seed}"] + (["--epochs", "1"] if quick else [])
    if folder.exists() and not (folder / "metrics.json").is_file():
        shutil.rmtree(folder)  # an unfinished run: start it again
    if not folder.exists():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            subprocess.run([sys.executable, "-m", "medsight", "train", "--no-progress", *extra, "--out",
                            str(folder.resolve())], cwd=tmp, check=True, env=env)  # this checkout's medsight
            (folder / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    m = json.loads((folder / "metrics.json").read_text())
    plan = json.loads((folder / "plan.json").read_text())
    t = m["test"]
    return {"who": "medsight", "seed": seed, "command": " ".join(["medsight train", *extra]),
            "seconds": float((folder / "wall_seconds.txt").read_text()), "test_mean_auc": _r(t["auc"]),
            "test_mean_auc_ci95": [_r(v) for v in t["ci95"]["auc"]], "test_micro_auc": _r(t["micro_auc"]),
            "test_map": _r(t["map"]), "val_mean_auc": _r(m["val"]["auc"]), "best_epoch": m["best_epoch"],
            "epochs_run": m["epochs_run"], "per_finding_auc": {c: _r(f["auc"]) for c, f in t["findings"].items()},
            "unscoreable_val": m["val"]["unscoreable"],
            "plan": {d["key"]: d["value"] for d in plan["decisions"]}}


def run_reference(seed: int, epochs: int) -> dict:
    """The plain loop: timm ResNet-18 from scratch, BCE, Adam; nothing else."""
    path = RUNS / f"reference-seed{seed}-e{epochs}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import timm
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    z = np.load(DATA)
    names = [str(c) for c in z["class_names"]]

    def tensor(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(z[f"{split}_images"]).float()[:, None] / 255.0
        return (x - 0.5) / 0.5, torch.from_numpy(z[f"{split}_labels"]).float()

    (xtr, ytr), (xte, yte) = tensor("train"), tensor("test")
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(names), in_chans=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(128):
            opt.zero_grad()
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(xte[i:i + 256])) for i in range(0, len(xte), 256)]).numpy()
    per = per_finding_auc(yte.numpy(), probs, names)
    scored = [v for v in per.values() if v is not None]
    row = {"who": "reference", "seed": seed, "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1),
           "test_mean_auc": _r(np.mean(scored)), "per_finding_auc": per,
           "recipe": f"timm resnet18 from scratch, 1 channel, BCE, Adam 1e-3, batch 128, {epochs} epochs, last epoch"}
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2))
    return row


def summarize(rows: list[dict]) -> dict:
    seeds = sorted({r["seed"] for r in rows if r["who"] == "medsight"} & {r["seed"] for r in rows if r["who"] == "reference"})
    out: dict = {"seeds_complete": seeds, "runs": rows, "means": {}}
    for who in ("medsight", "reference"):
        done = [r for r in rows if r["who"] == who and r["seed"] in seeds]
        if done:
            names = list(done[0]["per_finding_auc"])
            out["means"][who] = {
                "test_mean_auc": mean_sd([r["test_mean_auc"] for r in done]),
                "seconds": mean_sd([r["seconds"] for r in done]),
                "per_finding_auc": {n: mean_sd([r["per_finding_auc"][n] for r in done])["mean"]
                                    if all(r["per_finding_auc"][n] is not None for r in done) else None for n in names}}
    if len(seeds) >= 3 and len(out["means"]) == 2:
        m, ref = out["means"]["medsight"], out["means"]["reference"]
        out["targets_met"] = {
            "mean_auc_gain_0.02": m["test_mean_auc"]["mean"] >= ref["test_mean_auc"]["mean"] + TARGET_GAIN,
            "time_600s": max(r["seconds"] for r in rows if r["who"] == "medsight" and r["seed"] in seeds) <= MAX_SECONDS}
    else:
        out["targets_met"] = "undecided: fewer than 3 seeds finished for both"
    return out


def table(results: dict) -> str:
    means, n = results["means"], len(results["seeds_complete"])
    lines = ["| model | test mean AUC (14 findings) | time per run | training images |", "|---|---|---|---|"]
    labels = {"medsight": "**medsight default** (`medsight train --data data/nih_cxr14_1000.npz`)",
              "reference": "plain reference (timm ResNet-18 from scratch, BCE, Adam)"}
    for who, m in means.items():
        a = m["test_mean_auc"]
        lines.append(f"| {labels[who]} | {a['mean']:.3f} ± {a['sd']:.3f} ({n} seed{'s' if n != 1 else ''}) | "
                     f"{m['seconds']['mean']:.0f} s | 572 |")
    for name, auc in PUBLISHED.items():
        lines.append(f"| {name} (published) | {auc:.3f} | – | {'full ChestX-ray14' if 'CheXNet' in name else '~78k'} |")
    if len(means) == 2:
        names = list(means["medsight"]["per_finding_auc"])
        lines += ["", "| finding | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for who, m in means.items():
            lines.append(f"| {who} | " + " | ".join("–" if m["per_finding_auc"][f] is None else
                                                    f"{m['per_finding_auc'][f]:.3f}" for f in names) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ref-epochs", type=int, default=30, help="epochs of the plain reference loop")
    ap.add_argument("--quick", action="store_true", help="one medsight epoch: a smoke test, not a measurement "
                                                         "(results go to chest14_quick.json)")
    ap.add_argument("--table", action="store_true", help="print the README table of the saved results")
    args = ap.parse_args()
    name = "chest14_quick.json" if args.quick else "chest14.json"
    path = RESULTS / name
    if args.table:
        print(table(json.loads(path.read_text())))
        return 0
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    rows = [r for r in old if r["seed"] not in args.seeds]
    for seed in args.seeds:
        for row in (run_reference(seed, args.ref_epochs), run_medsight(seed, args.quick)):
            rows.append(row)
            print(f"{row['who']} seed {seed}: test mean AUC {row['test_mean_auc']:.4f} · {row['seconds']:.0f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            results = {**summarize(rows), "machine": machine()}
            save_result(name, results, echo=False)  # after every run: a stopped sweep keeps its rows
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
