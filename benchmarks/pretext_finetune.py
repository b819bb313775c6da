"""From scratch vs progressive fine-tuning on the embedded default, at CPU scale and without downloads.

Progressive fine-tuning needs a pretrained backbone. ImageNet weights need network access, so the
backbone here is pretrained by medsight itself, without labels: `configs/rotation_pretext.yaml` teaches
coatnet_tiny to tell how far each PneumoniaMNIST training image was turned. Then, with all training labels
and with 10% of them (`data.train_fraction`), two runs with every other option at its default:

  scratch:      medsight train --set data.train_fraction=F --set train.seed=S
  progressive:  medsight train --weights PRETEXT/best.pt --set finetune.progressive=true \\
                    --set data.train_fraction=F --set train.seed=S       (phases 1 + 1 + 2 epochs)

The 10% rows are noisy (471 training images), so they run over three seeds; the summary gives means.
Run folders are kept in benchmarks/runs/pretext/ and reused when finished; the results file is rewritten
after every run.

    python benchmarks/pretext_finetune.py        # writes benchmarks/results/pretext_finetune.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import save_result  # noqa: E402
from default_run import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLAN = ((0.1, (0, 1, 2)), (1.0, (0,)))  # (label fraction, seeds)


def main() -> int:
    runs_dir = Path(__file__).parent / "runs" / "pretext"
    runs_dir.mkdir(parents=True, exist_ok=True)
    pretext_dir = runs_dir / "rotation"
    pretext = measure(["--config", str(ROOT / "configs" / "rotation_pretext.yaml")], keep=pretext_dir, reuse=True)
    print(f"pretext: rotation accuracy on test {pretext['test_acc']:.4f} ({pretext['seconds']:.0f} s)", flush=True)
    weights = str(pretext_dir / "best.pt")
    rows = []
    for fraction, seeds in PLAN:
        for seed in seeds:
            common = ["--set", f"data.train_fraction={fraction:g}", "--set", f"train.seed={seed}"]
            for recipe, extra in (("scratch", []),
                                  ("progressive", ["--weights", weights, "--set", "finetune.progressive=true"])):
                folder = runs_dir / f"{recipe}-{fraction:g}-seed{seed}"
                row = measure(extra + common, keep=folder, reuse=True)
                row.update(recipe=recipe, train_fraction=fraction, seed=seed)
                rows.append(row)
                print(f"{recipe} {fraction:.0%} labels seed {seed}: AUC {row['test_auc']:.4f} ACC {row['test_acc']:.4f}",
                      flush=True)
                save_result("pretext_finetune.json", {"pretext": pretext, "summary": summarize(rows), "runs": rows},
                            echo=False)
    save_result("pretext_finetune.json", {"pretext": pretext, "summary": summarize(rows), "runs": rows})
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and sd over seeds) of each recipe at each label fraction, over the runs so far."""
    summary = []
    for fraction, _ in PLAN:
        for recipe in ("scratch", "progressive"):
            mine = [r for r in rows if r["recipe"] == recipe and r["train_fraction"] == fraction]
            if not mine:
                continue
            summary.append({"recipe": recipe, "train_fraction": fraction, "seeds": [r["seed"] for r in mine],
                            **{f"{m}_mean": round(statistics.fmean(r[m] for r in mine), 4)
                               for m in ("test_auc", "test_acc", "test_acc_at_val_threshold", "seconds")},
                            **({f"{m}_sd": round(statistics.stdev(r[m] for r in mine), 4)
                                for m in ("test_auc", "test_acc")} if len(mine) > 1 else {})})
    return summary


if __name__ == "__main__":
    sys.exit(main())
