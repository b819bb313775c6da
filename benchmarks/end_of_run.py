"""What share of the default run the end-of-run work takes: `medsight train` (no arguments), with each
end-of-run step's seconds (evaluation, trust, Grad-CAM gallery, faithfulness, sharpness, robustness, report)
from the run's timing.json, against training and validation.

Target (issue "The main job on one GPU"): the end-of-run work at most 25% of the run (training +
validation + end of run).

    python benchmarks/end_of_run.py --label after     # writes benchmarks/results/end_of_run.json["after"]
    python benchmarks/end_of_run.py --label before --set train.epochs=1 --keep /tmp/eor   # the share at the
                                   # default 4 epochs from one epoch's training and validation seconds

Each label's row is kept in the file beside the others (a before/after pair is two runs of this script, one on
each version of the code).

    python benchmarks/end_of_run.py --finish-only RUN --label after   # the end of run again, on a copy of RUN

``--finish-only`` times only the end-of-run work of a finished run (a copy of its folder; RUN is not
changed) with this version of the code, set against the run's own training and validation seconds
(its timing.json): the end of run of two versions of the code on one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _results import RESULTS, save_result
from default_run import measure

TARGET_SHARE = 0.25


def shares(timing: dict, epochs_run: int) -> dict:
    """Each end-of-run step's share of the run, and the end-of-run share of the default run's epochs (per-epoch
    training and validation seconds times the default epoch count: a shorter run measures the same per-epoch
    and end-of-run costs)."""
    from medsight.config import Config

    steps, end = timing["end_of_run_steps"], timing["end_of_run_seconds"]
    total = timing["train_seconds"] + timing["validation_seconds"] + end
    default_epochs = Config().train.epochs
    per_epoch = (timing["train_seconds"] + timing["validation_seconds"]) / epochs_run
    projected = end / (default_epochs * per_epoch + end)
    return {"step_share": {k: round(v / total, 4) for k, v in steps.items()},
            "default_epochs": default_epochs, "epochs_run": epochs_run,
            "end_of_run_share_at_default_epochs": round(projected, 4), "target_met": projected <= TARGET_SHARE}


def end_of_run_row(extra: list[str], keep: Path | None = None) -> dict:
    """Run `medsight train [extra]` once (into ``keep``, or a temporary folder); its time split and test metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        run = keep or Path(tmp) / "run"
        row = measure(extra, keep=run)
        timing = json.loads((run / "timing.json").read_text())
        epochs = json.loads((run / "metrics.json").read_text())["epochs_run"]
    return {**row, "timing": timing, **shares(timing, epochs)}


def finish_only(run: Path) -> dict:
    """The end-of-run work of the finished run ``run`` again, on a copy of its folder: its steps' seconds and
    the test figures, with training and validation seconds from the run's timing.json."""
    import shutil

    import torch

    from medsight.checkpoint import load_checkpoint
    from medsight.config import load_config
    from medsight.engine.build import build_run
    from medsight.engine.distributed import DistInfo
    from medsight.engine.finish import finish_run, run_timing
    from medsight.engine.loop import EpochState

    before = json.loads((run / "timing.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        shutil.copytree(run, out)
        saved = load_checkpoint(out / "last.pt")
        cfg = load_config(out / "config.yaml", [f"out={out}"])
        r = build_run(cfg, out, DistInfo(), torch.device("cpu"))
        state = EpochState(history=list(saved["history"]), best=saved["best"], best_epoch=saved["best_epoch"],
                           skipped=set(saved.get("skipped", [])))
        metrics = finish_run(r, state)
        steps = json.loads((out / "timing.json").read_text())["end_of_run_steps"]
    timing = run_timing(state.history, steps)
    timing["train_seconds"], timing["validation_seconds"] = before["train_seconds"], before["validation_seconds"]
    total = timing["train_seconds"] + timing["validation_seconds"] + timing["end_of_run_seconds"]
    timing["end_of_run_share"] = round(timing["end_of_run_seconds"] / total, 4)
    test = metrics["test"]
    return {"finish_only": run.name, "timing": timing, **shares(timing, len(state.history)),
            "test_auc": round(test["auc"], 4), "test_acc": round(test["accuracy"], 4),
            "test_ece": round(test["ece"], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", help="the row's name in end_of_run.json (e.g. before, after)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the run (repeatable)")
    p.add_argument("--output", default="end_of_run.json")
    p.add_argument("--finish-only", type=Path, metavar="RUN", help="time only the end of run of this finished run")
    p.add_argument("--keep", type=Path, metavar="DIR", help="train into DIR (kept) instead of a temporary folder")
    args = p.parse_args()
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    row = finish_only(args.finish_only) if args.finish_only else end_of_run_row(extra, args.keep)
    path = RESULTS / args.output
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[args.label] = row
    save_result(args.output, doc, echo=False)
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
