"""AdamW vs SAM vs LookSAM on the embedded default: test AUC/ACC and sharpness side by side, over seeds.

Each run is `medsight train --optimizer NAME --set train.seed=S` with every other option at its default
(coatnet_tiny, 64 px, 4 epochs, batch 64, lr 2e-3, cosine), so any run can be repeated by hand. One seed
is noise on a 624-image test set, so the summary gives each optimizer's mean and standard deviation over
the seeds, and judges the target of the issue "SAM at full speed and at scale" on the means: LookSAM keeps
at least 90% of SAM's gain over AdamW (on test AUC, and on test accuracy).

Run folders are kept in benchmarks/runs/NAME (seed 0, for benchmarks/ensembles.py) and NAME-seedS;
a run already there is read, not trained again (delete the folder to rerun it), and the results file
is rewritten after every run, so an interrupted benchmark resumes where it stopped.

    python benchmarks/optimizers.py                       # seeds 0 1 2 -> benchmarks/results/optimizers.json
    python benchmarks/optimizers.py --seeds 0             # one seed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import mean_sd, save_result  # noqa: E402
from default_run import measure  # noqa: E402

NAMES = ("adamw", "sam-adamw", "looksam-adamw")
METRICS = ("test_auc", "test_acc", "test_acc_at_val_threshold", "test_balanced_acc", "seconds")


def keeps_gain(means: dict[str, dict[str, float]], metric: str) -> dict[str, object]:
    """SAM's and LookSAM's mean gain over AdamW on one metric, and whether LookSAM keeps >= 90% of SAM's."""
    sam = means["sam-adamw"][metric]["mean"] - means["adamw"][metric]["mean"]
    look = means["looksam-adamw"][metric]["mean"] - means["adamw"][metric]["mean"]
    return {"sam_gain": round(sam, 4), "looksam_gain": round(look, 4),
            "fraction_kept": round(look / sam, 3) if sam > 0 else None,
            # without a gain from SAM there is nothing to keep: the target cannot be judged, not "met"
            "looksam_keeps_90pct": bool(look >= 0.9 * sam) if sam > 0 else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    keep = Path(__file__).parent / "runs"  # seed-0 runs kept for benchmarks/ensembles.py
    keep.mkdir(exist_ok=True)
    runs: list[dict] = []
    for seed in args.seeds:
        for name in NAMES:
            folder = keep / (name if seed == 0 else f"{name}-seed{seed}")
            row = measure(["--optimizer", name, "--set", f"train.seed={seed}"], keep=folder, reuse=True)
            row.update(optimizer=name, seed=seed)
            runs.append(row)
            print(f"{name} seed {seed}: AUC {row['test_auc']:.4f} ACC {row['test_acc']:.4f} "
                  f"sharpness {row['sharpness']['ascent']:.3f}", flush=True)
            save_result("optimizers.json", summarize(runs), echo=False)
    save_result("optimizers.json", summarize(runs))
    return 0


def summarize(runs: list[dict]) -> dict:
    """Mean and sd per optimizer over the seeds run so far, and the LookSAM target judged on the means."""
    seeds = sorted({r["seed"] for r in runs})
    complete = [s for s in seeds if {r["optimizer"] for r in runs if r["seed"] == s} == set(NAMES)]
    done = [r for r in runs if r["seed"] in complete]  # compare optimizers on the same seeds only
    means = {}
    for name in NAMES:
        mine = [r for r in done if r["optimizer"] == name]
        if not mine:
            return {"seeds_complete": complete, "runs": runs}
        means[name] = {m: mean_sd([r[m] for r in mine]) for m in METRICS}
        means[name]["sharpness_ascent"] = mean_sd([r["sharpness"]["ascent"] for r in mine])
    return {"seeds_complete": complete, "means": means,
            "target_looksam_keeps_90pct_of_sam_gain": {m: keeps_gain(means, m) for m in ("test_auc", "test_acc")},
            "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
