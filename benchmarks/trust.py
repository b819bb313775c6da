"""Trust for clinical use on the embedded PneumoniaMNIST default, on RetinaMNIST (ordinal) and on the NIH
ChestX-ray14 1000-image set (multi-label, 14 findings): temperature scaling's effect on test ECE, 90% split-conformal coverage and set size on test, the AURC of max-probability against
the TTA-based scores, TTA's effect on AUC and ECE, a robustness table (6 corruptions x 3 severities) and a
subgroup demo.

For the multi-label set every number is per finding (one temperature, one conformal set and one operating
point per finding) and the summary is their mean; the pooled ECE is over every labelled (image, finding).

Each data set gets one `medsight train --data X` run (the plan decides the rest; `--run NAME=FOLDER` reuses
a finished run folder instead). Everything is read from the run's metrics.json (the trust section every run
writes) and from `medsight robustness RUN/best.pt` on the run's own test split.

The subgroup demo: the embedded sets carry no metadata, and the NIH ChestX-ray14 sample manifest carries
patient IDs only (no sex, age or site), so the demo assigns a **synthetic** site column ("site A" / "site B",
drawn at random with a fixed seed) to the test images and runs the subgroup analysis on it. A random split
has no real gap, so the gap's interval should include zero (not flagged): the demo checks the machinery and
the false-alarm side, not any real disparity.

Targets (issue "Trust for clinical use"): temperature scaling lowers test ECE on both sets; 90% conformal sets
reach 87-93% empirical coverage on test; the best uncertainty score's AURC is below max-probability's (or the
README says it is not); >= 5 corruptions x 3 severities.

Beside the validation-fitted figures, ``exchangeable_check`` fits temperature and conformal sets on random
halves of the test split and measures them on the other halves: what the methods give when the calibration
data is exchangeable with the data measured, which validation data is not when the test split is shifted.

    python benchmarks/trust.py                      # the three data sets -> benchmarks/results/trust.json
    python benchmarks/trust.py --run pneumoniamnist=runs/cxr --run retinamnist=runs/retina --run chest14=runs/nih
    python benchmarks/trust.py --quick              # smoke test: 1 epoch, 10% of the labels, 32 px
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _results import mean_sd, save_result  # noqa: E402
from medsight.evaluation.runs import RunData, load_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {"pneumoniamnist": ROOT / "data" / "pneumoniamnist.npz", "retinamnist": ROOT / "data" / "retinamnist.npz",
            "chest14": ROOT / "data" / "nih_cxr14_1000.npz"}
RUNS = Path(__file__).parent / "runs" / "trust"
QUICK = ["train.epochs=1", "data.train_fraction=0.1", "data.image_size=32", "train.sharpness_batches=0",
         "explain.faithfulness_images=0"]


def _r(v: float | None, n: int = 4) -> float | None:
    return None if v is None else round(float(v), n)


def _relative(path: Path) -> str:
    """A run folder as the results file names it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def train_run(name: str, quick: bool) -> Path:
    from medsight.config import Config, apply_overrides
    from medsight.engine import train

    folder = RUNS / (f"{name}-quick" if quick else name)
    if (folder / "metrics.json").is_file():
        return folder
    cfg = apply_overrides(Config(), [f"data.path={DATASETS[name]}", f"out={folder}"] + (QUICK if quick else []))
    train(cfg, progress=False, force=True)
    return folder


def subgroup_demo(rd: RunData, seed: int = 0) -> dict:
    """The subgroup analysis on a synthetic, random two-site column of the run's test images."""
    from medsight.evaluation.subgroups import subgroup_metrics

    task, labels, probs = rd.task, rd.test_labels, rd.test_probs
    sites = np.where(np.random.default_rng(seed).random(len(labels)) < 0.5, "site A", "site B")
    views = (task.rules.operating_points or {}).get("views", {})
    labelled = task.readout.view_labelled(labels)  # a finding's masked labels leave images out of its view
    out = {}
    for v, (name, y, s) in enumerate(task.readout.binary_views(labels, probs)):
        r = subgroup_metrics(y, s, views.get(name, {}).get("threshold"), sites[labelled[:, v]].tolist(), n_boot=1000,
                             seed=seed)
        out[name] = {"groups": {g: {k: (_r(v) if isinstance(v, float) else v) for k, v in row.items()
                                    if k in ("n", "n_positive", "auc", "sensitivity")} for g, row in r["groups"].items()},
                     "gaps": r["gaps"]}
    return {"column": "synthetic random site (not real metadata)", "views": out}


def exchangeable_check(rd: RunData, splits: int = 200, coverage: float = 0.9, seed: int = 0) -> dict:
    """Temperature scaling and 90% conformal sets when the calibration data *is* exchangeable with the data
    measured: the run's test images split at random into halves, fitted on one half, measured on the other,
    ``splits`` times (mean and sd). Set beside the validation-fitted figures, it separates a method that does
    not work from a validation split that does not look like the test split.

    Works on the stored probabilities, which already carry the validation-fitted temperature: the check
    refits a temperature on top of it from the test half (``ece_validation_temperature`` against
    ``ece_test_half_temperature``, both on the other half). A single-label or ordinal run's log-probabilities stand for its logits
    (exact for a softmax head; a proxy for CORN's conditional outputs), a multi-label run's per-finding
    log-odds for each finding's logit (one temperature and one conformal threshold per finding, then the
    mean over findings)."""
    import torch

    from medsight.metrics.calibration import binary_ece, fit_temperature, reliability_bins
    from medsight.metrics.conformal import (binary_set_metrics, fit_binary_conformal, fit_conformal,
                                            prediction_sets, set_metrics)

    labels, probs = rd.test_labels, rd.test_probs.astype(np.float64)
    rng = np.random.default_rng(seed)
    rows = []
    if labels.ndim == 1:  # one answer per image: softmax temperature on log-probabilities
        logp = np.log(np.clip(probs, 1e-12, 1.0))

        def scaled(idx, t):
            z = logp[idx] / t
            e = np.exp(z - z.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        def ece(idx, p):
            return reliability_bins(p.max(1), (p.argmax(1) == labels[idx]).astype(float))["ece"]

        for _ in range(splits):
            idx = rng.permutation(len(labels))
            a, b = idx[: len(idx) // 2], idx[len(idx) // 2:]
            t = fit_temperature(logp[a], labels[a])
            cov = set_metrics(labels[b], prediction_sets(probs[b], fit_conformal(labels[a], probs[a], coverage)))
            rows.append((ece(b, probs[b]), ece(b, scaled(b, t)), cov["coverage"]))
    else:  # per finding: binary temperature on log-odds, one conformal threshold per finding
        def bce(z, y):
            return torch.nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype))

        views = []  # (labels, probability, log-odds) per finding
        for _, y, s in rd.task.readout.binary_views(labels, probs):
            s = np.clip(s, 1e-12, 1 - 1e-12)
            views.append((y, s, np.log(s / (1 - s))))
        for _ in range(splits):
            per = []
            for y, s, z in views:
                idx = rng.permutation(len(y))
                a, b = idx[: len(idx) // 2], idx[len(idx) // 2:]
                if y[a].min() == y[a].max():
                    continue  # a half without a positive case fits nothing
                t = fit_temperature(z[a], y[a], nll=bce)
                cov = binary_set_metrics(y[b], s[b], fit_binary_conformal(y[a], s[a], coverage))
                per.append((binary_ece(y[b], s[b]), binary_ece(y[b], 1 / (1 + np.exp(-z[b] / t))), cov["coverage"]))
            rows.append(tuple(np.mean(per, 0)))
    arr = np.asarray(rows)
    keys = ("ece_validation_temperature", "ece_test_half_temperature", "conformal_coverage")
    return {"splits": splits, "target_coverage": coverage,
            **{k: mean_sd(arr[:, i].tolist()) for i, k in enumerate(keys)},
            "ece_lowered_share": _r(float((arr[:, 1] < arr[:, 0]).mean()), 3)}


def summarize(rd: RunData, robustness: dict) -> dict:
    m = rd.metrics
    tr = m["trust"]
    cal, conf, sel, tta = tr["calibration"], tr["conformal"], tr["selective"], tr["tta"]
    t = cal["temperature"]
    per_finding = {"conformal_per_finding": {n: _r(c["coverage"]) for n, c in conf["per_finding"].items()},
                   "conformal_all_findings_covered": _r(conf["all_findings_covered"]),
                   "ece_per_finding": {n: [_r(v["ece_before"]), _r(v["ece_after"])] for n, v in cal["per_view"].items()}
                   } if "per_finding" in conf else {}
    return {
        "run": _relative(rd.path), "test_auc": _r(m["test"].get("auc")), "test_accuracy": _r(m["test"].get("accuracy")),
        "temperature": [_r(x) for x in t] if isinstance(t, list) else _r(t), "ece_before": _r(cal["ece_before"]), "ece_after": _r(cal["ece_after"]),
        "ece_lowered": cal["ece_after"] < cal["ece_before"],
        "conformal_target": conf["target_coverage"], "conformal_coverage": _r(conf["coverage"]),
        "conformal_within_3_points": abs(conf["coverage"] - conf["target_coverage"]) <= 0.03,
        "conformal_mean_set_size": _r(conf["mean_set_size"]),
        "aurc": {k: _r(v) for k, v in sel["aurc"].items()}, "aurc_best": sel["best"],
        "tta": {k: _r(v) if isinstance(v, float) else v for k, v in tta.items()},
        "operating_points": {k: {x: _r(v[x]) for x in ("threshold", "sensitivity", "specificity", "ppv", "npv")}
                             for k, v in tr["operating_points"]["views"].items()},
        "robustness": {"metric": robustness["metric"], "clean": _r(robustness["clean"]),
                       "mean_drop": _r(robustness["mean_drop"]),
                       "table": {c: [_r(x[robustness["metric"]]) for x in rows]
                                 for c, rows in robustness["corruptions"].items()}},
        **per_finding,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], metavar="NAME=FOLDER",
                    help="reuse a finished run folder for a data set (pneumoniamnist, retinamnist, chest14)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny runs; proves the harness, not the numbers")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = ap.parse_args(argv)
    given = dict(item.split("=", 1) for item in args.run)
    from medsight.api import robustness_check

    results: dict = {"quick": args.quick, "datasets": {}}
    for name in args.datasets:
        t0 = time.time()
        run = Path(given[name]) if name in given else train_run(name, args.quick)
        rob = robustness_check(run / "best.pt", seed=0)
        rd = load_run(run)  # predictions, metrics and task, read once
        row = summarize(rd, rob)
        row["subgroup_demo"] = subgroup_demo(rd)
        row["exchangeable_check"] = exchangeable_check(rd)
        row["seconds"] = round(time.time() - t0, 1)
        results["datasets"][name] = row
        save_result("trust_quick.json" if args.quick else "trust.json", results, echo=False)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
