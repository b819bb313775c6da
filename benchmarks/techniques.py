"""The technique evidence table: each of the twelve techniques (medsight.techniques) switched on alone against
the plain default plan, on the panel, paired by seed, measuring what each one claims.

Every run is `medsight train --data DATA [panel settings] [--set technique settings] --set train.seed=S`, into
benchmarks/runs/techniques/DATASET/VARIANT-seedS; one JSON per finished run lands next to it (row.json), and
a finished run is read, not trained again, so the benchmark resumes where it stopped. The table
(benchmarks/results/techniques.json) is rebuilt from the row files after every run.

What is measured, per technique (the plain default measured the same way on the same seed):
  every technique     test AUC and ACC (QWK for grades, mean AUC for findings), difference per seed
  evidential          AURC of its confidence (1 − u) and ECE, against the plain model's max probability
  prototypical        few-shot accuracy with --shots k (k = 5, 10, 20) against the plain model fine-tuned on k
  cosine              mean AUC drop under `medsight robustness`'s corruptions, against the plain head
  center, triplet     silhouette of the test embeddings (cosine distance), against the plain model's
  sam                 the plain default uses SAM: its "off" run (optim.name=adamw) is the baseline
  stacking            `medsight ensemble --method stacking` of the seed's plain, SE and cosine runs
  progressive         against plain fine-tuning (variant "finetune") from the same local weights (WEIGHTS)
  recipe              the plan's small-data rule (AdamW, TTA decisions; under 2,000 training images) against the
                      default the rows were measured against (SAM, no TTA: every other row pins it, PINNED)
Verdict per metric: confirmed (mean gain > the seed spread of the gains), worse (mean loss > spread),
otherwise not confirmed; "incomplete" with fewer than 3 paired seeds.

    python benchmarks/techniques.py --datasets pneumonia500 --techniques plain          # the small-data row
    python benchmarks/techniques.py --datasets pneumonia500 retinamnist nih1000 --techniques recipe
    python benchmarks/techniques.py --datasets retinamnist --techniques plain corn sam
    python benchmarks/techniques.py --import-measured   # rows other benchmarks measured (panel, ordinal, optimizers)
    python benchmarks/techniques.py --table          # the README table from benchmarks/results/techniques.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import save_result  # noqa: E402
from default_run import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from medsight.techniques import TECHNIQUES  # noqa: E402

RUNS = Path(__file__).parent / "runs" / "techniques"
#: data set -> (npz, settings of the panel row). pneumonia500: 500 training images, stratified, full test split.
PANEL: dict[str, tuple[Path, tuple[str, ...]]] = {
    "pneumonia500": (ROOT / "data" / "pneumoniamnist.npz", ("data.train_fraction=0.1062",)),
    "pneumoniamnist": (ROOT / "data" / "pneumoniamnist.npz", ()),
    "retinamnist": (ROOT / "data" / "retinamnist.npz", ()),
    "nih1000": (ROOT / "data" / "nih_cxr14_1000.npz", ()),
}
SHOTS = (5, 10, 20)
#: the panel's findings data sets (several labels per image)
MULTI_LABEL = {"nih1000"}
#: variants beyond the twelve: the plain default, SAM switched off, and the ordinal default (CORN, by the plan)
EXTRA = {"plain": (), "sam_off": ("optim.name=adamw",), "corn": ("data.task=ordinal",),
         "ordinal_ce": ("data.task=ordinal", "train.ordinal=ce"), "recipe": ()}
#: The default every technique row is measured against: SAM on AdamW, decisions on the image as it is — the plan
#: before its small-data rule. Every row pins it, so the table's commands still repeat its runs; only ``recipe``
#: (the plan as it is now: AdamW and test-time augmentation under 2,000 training images) runs unpinned.
PINNED = ("optim.name=sam-adamw", "eval.tta=false")
#: where a technique is the plain default already, its baseline is the run without it; progressive fine-tuning
#: is judged against plain fine-tuning from the same weights, stacking against the plain model in its stack
BASELINE = {"sam": "sam_off", "progressive": "finetune", "stacking": "stack_plain"}
#: No pretrained weights can be downloaded here, so the fine-tuning rows start from local ones: a ResNet-18 at
#: 64 px trained on the full PneumoniaMNIST (chest X-rays, seed 0), fine-tuned on another set (RetinaMNIST's
#: fundus photographs) as a user fine-tunes weights from elsewhere.
WEIGHTS = RUNS / "weights" / "pneumoniamnist-resnet18"
FINETUNE = ("model.name=resnet18", "data.image_size=64")
SEEDS = (0, 1, 2)


def train_args(data: Path, sets: list[str] | tuple[str, ...]) -> list[str]:
    """`medsight train`'s arguments for ``data`` with each of ``sets`` as a ``--set``."""
    return ["--data", str(data), *sum((["--set", s] for s in sets), [])]


def weights_settings() -> tuple[str, ...]:
    """The fine-tuning rows' model and local weights (trained here once, the first time a row needs them)."""
    best = WEIGHTS / "best.pt"
    if not best.is_file():
        sets = [*FINETUNE, "train.seed=0"]
        measure(train_args(PANEL["pneumoniamnist"][0], sets), keep=WEIGHTS, reuse=True)
    return (*FINETUNE, f"model.weights={best}")


def settings_of(variant: str) -> tuple[str, ...]:
    if variant == "finetune":
        return weights_settings()
    if variant == "progressive":
        return (*weights_settings(), "finetune.progressive=true")
    if variant in EXTRA:
        return EXTRA[variant]
    if variant.startswith(("prototypical-k", "plain-k")):
        name, k = variant.rsplit("-k", 1)
        return (*settings_of(name), f"data.shots={k}")
    return next(t.settings for t in TECHNIQUES if t.name == variant)


def applies(dataset: str, variant: str) -> str | None:
    """Why ``variant`` does not apply to ``dataset`` (None: it does)."""
    multi, ordinal_only = dataset in MULTI_LABEL, variant in ("distance_smoothing", "corn", "ordinal_ce")
    if ordinal_only and dataset != "retinamnist":
        return "grades only (RetinaMNIST)"
    if multi and variant.split("-k")[0] in ("evidential", "prototypical", "triplet", "center", "manifold_mixup"):
        return "needs one class per image; the NIH set has several findings per image"
    if "-k" in variant and multi:
        return "few-shot rows pit prototypes against plain training; prototypes need one class per image"
    if "-k" in variant and dataset == "pneumonia500":
        return ("K images per class are drawn from the training split: drawn from these 500 images they are the "
                "PneumoniaMNIST few-shot rows again")
    if variant == "se_blocks" and dataset == "pneumoniamnist":
        return "the plan's CoAtNet already has SE blocks in its MBConv stages"
    if variant in ("progressive", "finetune") and dataset.startswith("pneumonia"):
        return "its local pretrained weights were trained on PneumoniaMNIST itself"
    if variant == "recipe" and dataset == "pneumoniamnist":
        return "the small-data rule holds under 2,000 training images; on 4,708 the plan is the plain default"
    return None


def _r(v: Any) -> Any:
    return None if v is None else round(float(v), 4)


def _qwk(run: Path) -> float | None:
    import numpy as np
    from sklearn.metrics import cohen_kappa_score

    p = np.load(run / "predictions.npz")
    if p["test_labels"].ndim != 1:
        return None
    return float(cohen_kappa_score(p["test_labels"], p["test_probs"].argmax(1), weights="quadratic"))


def _silhouette(run: Path) -> float | None:
    """Silhouette (cosine distance) of the best checkpoint's test embeddings, by true class."""
    import numpy as np
    import torch
    from sklearn.metrics import silhouette_score

    from medsight.checkpoint import load_model
    from medsight.config import config_from_dict
    from medsight.data import ImageDataset, load_data, make_loader, make_transform
    from medsight.models import EmbeddingTap

    model, ckpt = load_model(run / "best.pt")
    cfg = config_from_dict(ckpt["config"])
    bundle = load_data(cfg.data)
    tf = make_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"], train=False, cfg=cfg.data)
    feats, labels = [], []
    with EmbeddingTap(model) as tap, torch.no_grad():
        for x, y, _ in make_loader(ImageDataset(bundle.splits["test"], tf), 128, False, 0):
            model(x)
            feats.append(tap.take().numpy())
            labels.append(y.numpy())
    y = np.concatenate(labels)
    return None if y.ndim != 1 else float(silhouette_score(np.concatenate(feats), y, metric="cosine"))


def _robustness(run: Path) -> float | None:
    out = run / "robustness"
    if not (out / "robustness.json").is_file():
        subprocess.run([sys.executable, "-m", "medsight", "robustness", str(run / "best.pt"), "--out", str(out)],
                       check=True, cwd=ROOT)
    return json.loads((out / "robustness.json").read_text()).get("mean_drop")


def _test_scores(run: Path) -> dict[str, Any]:
    """A finished run's test AUC (mean AUC for findings), accuracy and QWK."""
    t = json.loads((run / "metrics.json").read_text())["test"]
    return {"test_auc": _r(t.get("auc") if t.get("auc") is not None else t.get("mean_auc")),
            "test_acc": _r(t.get("accuracy")), "test_qwk": _r(t["qwk"] if "qwk" in t else _qwk(run))}


def measures(run: Path, variant: str, robustness: bool = False) -> dict[str, Any]:
    """The row's metrics beyond AUC/ACC: QWK, uncertainty, cluster quality and robustness as they apply."""
    m = json.loads((run / "metrics.json").read_text())
    t, trust = m["test"], m.get("trust", {})
    row = {**_test_scores(run), "test_ece": _r(t.get("ece")),
           "aurc": _r(trust.get("selective", {}).get("aurc", {}).get("max probability"))}
    base = variant.split("-k")[0]
    if base in ("plain", "center", "triplet"):
        row["silhouette"] = _r(_silhouette(run))
    if robustness and base in ("plain", "cosine") and "-k" not in variant:
        row["robustness_mean_drop"] = _r(_robustness(run))
    return row


def _imported_without_qwk(row: dict, dataset: str) -> bool:
    """A row another benchmark measured (imported) that lacks the kappa a grade data set is judged by: this
    benchmark measures that cell itself."""
    return "source" in row and dataset == "retinamnist" and row.get("test_qwk") is None


def _train(dataset: str, variant: str, seed: int, folder: Path) -> dict[str, Any]:
    """Train ``variant`` on ``dataset`` into ``folder`` (a finished run there is read, not trained again)."""
    data, panel = PANEL[dataset]
    sets = [*panel, *(() if variant == "recipe" else PINNED), *settings_of(variant), f"train.seed={seed}"]
    return _relative(measure(train_args(data, sets), keep=folder, reuse=True))


def run_variant(dataset: str, variant: str, seed: int, robustness: bool = False) -> dict[str, Any]:
    folder = RUNS / dataset / f"{variant}-seed{seed}"
    saved = folder.parent / f"{folder.name}.json"
    if saved.is_file() and not _imported_without_qwk(json.loads(saved.read_text()), dataset):
        row = json.loads(saved.read_text())
        if robustness and "robustness_mean_drop" not in row and variant in ("plain", "cosine"):
            row["robustness_mean_drop"] = _r(_robustness(folder))  # the slow claim, added on request
            saved.write_text(json.dumps(row, indent=2) + "\n")
        return row
    row = _train(dataset, variant, seed, folder)
    row.update(measures(folder, variant, robustness), dataset=dataset, variant=variant, seed=seed,
               load=round(os.getloadavg()[0], 1))
    plan = folder / "plan.json"
    if plan.is_file():
        row["plan"] = {d["key"]: d["value"] for d in json.loads(plan.read_text())["decisions"]}
    saved.write_text(json.dumps(row, indent=2) + "\n")
    return row


#: the stack: three models that differ in backbone (SE-ResNet) and head (cosine) as well as in weights
STACK = ("plain", "se_blocks", "cosine")


def run_stacking(dataset: str, seed: int) -> dict[str, Any]:
    """Stack the seed's STACK runs (a member whose run folder is gone is trained again with its command).
    Besides the stack's row, its plain member's own scores are saved as variant ``stack_plain``: the stack is
    judged against the plain model it was built from, which is the plain row itself unless that was retrained."""
    from medsight.evaluation.ensemble import ensemble

    members = [RUNS / dataset / f"{v}-seed{seed}" for v in STACK]
    for variant, folder in zip(STACK, members):
        if not (folder / "metrics.json").is_file():
            _train(dataset, variant, seed, folder)
    folder = RUNS / dataset / f"stacking-seed{seed}"
    if not (folder / "metrics.json").is_file():
        ensemble(members, "stacking", folder, seed=seed)
    rows = {"stacking": {**_test_scores(folder), "members": [m.name for m in members], "seconds": 0.0},
            "stack_plain": {**_test_scores(members[0]), "command": f"the plain member of stacking-seed{seed}"}}
    for variant, row in rows.items():
        row.update(dataset=dataset, variant=variant, seed=seed)
        (folder.parent / f"{variant}-seed{seed}.json").write_text(json.dumps(row, indent=2) + "\n")
    return rows["stacking"]


def _gain(rows: list[dict], a: str, b: str, key: str, lower_better: bool = False) -> dict[str, Any] | None:
    """Paired differences a − b of ``key`` over the seeds both have (sign flipped when lower is better)."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    seeds = sorted(s for (v, s) in by if v == a and (b, s) in by and by[(a, s)].get(key) is not None
                   and by[(b, s)].get(key) is not None)
    if not seeds:
        return None
    d = [(by[(a, s)][key] - by[(b, s)][key]) * (-1 if lower_better else 1) for s in seeds]
    mean, sd = statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else 0.0
    verdict = ("incomplete" if len(d) < 3 else "confirmed" if mean > sd and mean > 0
               else "worse" if mean < -sd and mean < 0 else "not confirmed")
    return {"seeds": seeds, "gain_mean": round(mean, 4), "gain_sd": round(sd, 4), "verdict": verdict,
            "a_mean": round(statistics.fmean(by[(a, s)][key] for s in seeds), 4),
            "b_mean": round(statistics.fmean(by[(b, s)][key] for s in seeds), 4)}


#: technique -> the metrics its claim is judged by (lower_better flags), beyond AUC and ACC
CLAIMS = {"evidential": [("aurc", True), ("test_ece", True)], "cosine": [("robustness_mean_drop", True)],
          "center": [("silhouette", False)], "triplet": [("silhouette", False)]}


def summarize(rows: list[dict]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for dataset in PANEL:
        rs = [r for r in rows if r["dataset"] == dataset]
        if not rs:
            continue
        cells: dict[str, Any] = {}
        for name in [t.name for t in TECHNIQUES] + ["corn"]:
            why = applies(dataset, name)
            if why:
                cells[name] = {"not_applicable": why}
                continue
            base = BASELINE.get(name, "plain")
            a = "plain" if name == "sam" else name
            keys = [("test_qwk", False)] if dataset == "retinamnist" else []
            # findings are judged by the mean AUC: their "accuracy" is the exact match of all 14 answers at once
            keys += [("test_auc", False), *([] if dataset in MULTI_LABEL else [("test_acc", False)]),
                     *CLAIMS.get(name, [])]
            cell = {k: g for k, lb in keys if (g := _gain(rs, a, base, k, lb)) is not None}
            if name in ("corn", "distance_smoothing"):  # QWK: against the ordinal task's cross-entropy head
                g = _gain(rs, name, "ordinal_ce", "test_qwk")
                if g:
                    cell["test_qwk_vs_ordinal_ce"] = g
            if name == "prototypical":
                if why := applies(dataset, f"prototypical-k{SHOTS[0]}"):
                    cell["few_shot_acc"] = {"not_applicable": why}
                for k in SHOTS:
                    g = _gain(rs, f"prototypical-k{k}", f"plain-k{k}", "test_acc")
                    if g:
                        cell[f"few_shot_acc_k{k}"] = g
            cells[name] = cell or {"not_run": True}
        if why := applies(dataset, "recipe"):
            cells["recipe"] = {"not_applicable": why}
        else:  # the plan's small-data recipe against the default the rows above were measured against, and
            # against that default's latest runs (the stacks' plain members: one thread, like the recipe rows,
            # and on RetinaMNIST trained on the recipe's processor, not the first rows')
            # (run times are not paired here: the recipe rows ran three to a 2-core CPU, the plain rows two)
            keys = ["test_qwk"] * (dataset == "retinamnist") + ["test_auc"]
            keys += ["test_acc"] * (dataset not in MULTI_LABEL)
            cell = {k: g for k in keys if (g := _gain(rs, "recipe", "plain", k))}
            cell |= {f"{k}_vs_stack_plain": g for k in keys if (g := _gain(rs, "recipe", "stack_plain", k))}
            cells["recipe"] = cell or {"not_run": True}
        plain = [r for r in rs if r["variant"] == "plain"]
        table[dataset] = {"plain": {k: {"mean": round(statistics.fmean(v), 4),
                                        "sd": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0}
                                    for k in ("test_auc", "test_acc", "test_qwk", "seconds")
                                    if (v := [r[k] for r in plain if r.get(k) is not None])},
                          "plain_seeds": sorted(r["seed"] for r in plain), "techniques": cells}
    machines = sorted({r["machine"] for r in rows if "machine" in r})
    return {"machine": machines, "table": table, "runs": rows}


def import_measured() -> int:
    """Rows of runs other benchmarks already made with the same commands and seeds, each marked with its
    source file: the panel's plain default (panel.json), the ordinal heads on RetinaMNIST (retina_ordinal.json:
    corn, smooth = distance-aware smoothing) and SAM off on PneumoniaMNIST (optimizers.json, seed 0).
    Returns how many rows were written; a row this benchmark measured itself is never replaced."""
    results = Path(__file__).parent / "results"
    found: list[dict] = []
    panel = json.loads((results / "panel.json").read_text())["sets"]
    for dataset in ("pneumoniamnist", "retinamnist"):
        found += [{**r, "variant": "plain", "dataset": dataset, "source": "panel.json"} for r in panel[dataset]["runs"]]
    heads = {"corn": "corn", "smooth": "distance_smoothing", "ce": "ordinal_ce"}
    for r in json.loads((results / "retina_ordinal.json").read_text())["runs"]:
        if r.get("head") in heads:
            found.append({**r, "variant": heads[r["head"]], "dataset": "retinamnist", "source": "retina_ordinal.json"})
    for r in json.loads((results / "optimizers.json").read_text())["rows"]:
        if r["command"] == "medsight train --optimizer adamw":
            found.append({**r, "variant": "sam_off", "dataset": "pneumoniamnist", "seed": 0, "source": "optimizers.json"})
    written = 0
    for r in found:
        path = RUNS / r["dataset"] / f"{r['variant']}-seed{r['seed']}.json"
        if path.is_file() and "source" not in json.loads(path.read_text()):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: r.get(k) for k in ("command", "seconds", "test_auc", "test_acc", "test_qwk", "test_ece", "machine",
                                      "dataset", "variant", "seed", "source")}
        path.write_text(json.dumps(keep, indent=2) + "\n")
        written += 1
    return written


def _relative(row: dict) -> dict:
    """The row with its command's paths written from the project folder (as a reader reruns it)."""
    if isinstance(row.get("command"), str):
        row["command"] = re.sub(r"[^\s=]*/((data/[\w.]+\.npz)|(benchmarks/runs/\S+))", r"\1", row["command"])
    return row


def collect() -> list[dict]:
    return [_relative(json.loads(p.read_text())) for p in sorted(RUNS.glob("*/*-seed*.json"))]


def table_md(results: dict) -> str:
    lines = ["| technique | data set | metric | technique − plain (mean ± sd) | seeds | verdict |", "|---|---|---|---|---|---|"]
    for dataset, d in results["table"].items():
        for name, cell in d["techniques"].items():
            if "not_applicable" in cell:
                lines.append(f"| {name} | {dataset} | – | n/a: {cell['not_applicable']} | – | – |")
            elif "not_run" in cell:
                lines.append(f"| {name} | {dataset} | – | not run yet | – | – |")
            else:
                for metric, g in cell.items():
                    if "not_applicable" in g:
                        lines.append(f"| {name} | {dataset} | {metric} | n/a: {g['not_applicable']} | – | – |")
                        continue
                    lines.append(f"| {name} | {dataset} | {metric} | {g['gain_mean']:+.4f} ± {g['gain_sd']:.4f} "
                                 f"({g['a_mean']:.4f} vs {g['b_mean']:.4f}) | {len(g['seeds'])} | {g['verdict']} |")
    return "\n".join(lines)


def main() -> int:
    variants = ["plain", "sam_off", "corn", "ordinal_ce", "finetune", "recipe",
                *[t.name for t in TECHNIQUES if t.name != "stacking"],
                *[f"{v}-k{k}" for k in SHOTS for v in ("plain", "prototypical")]]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(PANEL), choices=list(PANEL))
    ap.add_argument("--techniques", nargs="+", default=variants + ["stacking"], choices=variants + ["stacking"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--robustness", action="store_true", help="also run `medsight robustness` on the plain and "
                    "cosine runs (18 passes over the test split each)")
    ap.add_argument("--table", action="store_true", help="print the README table of the saved results")
    ap.add_argument("--import-measured", action="store_true", help="take the rows other benchmarks measured with "
                    "the same commands and seeds (panel, ordinal heads, optimizers), then write the table")
    args = ap.parse_args()
    if args.import_measured:
        print(f"{import_measured()} rows imported")
        save_result("techniques.json", summarize(collect()), echo=False)
        print(table_md(summarize(collect())))
        return 0
    if args.table:
        print(table_md(summarize(collect())))
        return 0
    for seed in args.seeds:
        for dataset in args.datasets:
            for variant in args.techniques:
                if variant == "stacking":
                    row = run_stacking(dataset, seed)
                elif variant == "sam" or applies(dataset, variant):
                    continue  # sam is the plain run; n/a cells say why in the table
                else:
                    row = run_variant(dataset, variant, seed, args.robustness)
                print(f"{dataset} {variant} seed {seed}: AUC {row['test_auc']} ACC {row['test_acc']} "
                      f"QWK {row.get('test_qwk')} {row['seconds']:.0f}s (load {row.get('load')})", flush=True)
                save_result("techniques.json", summarize(collect()), echo=False)
    save_result("techniques.json", summarize(collect()), echo=False)
    print(table_md(summarize(collect())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
