"""Do the heatmaps point at the disease? Localization against boxes and saliency sanity checks, measured.

(a) A synthetic set where the answer is known: 64-px grey images of smooth noise; the class ``patch`` has a
small bright square at a random place, ``none`` has none; the boxes are the squares. The default model
(coatnet_tiny, 64 px) is trained briefly on it, then scored with ``medsight.explainers.localize`` (pointing
game, energy in the box, IoU; beside a centre prior and a random map) and with the cascading
model-randomization and data-randomization tests (``medsight.explainers.sanity``). The data-randomization
run is the same training on the same images with the training labels shuffled.

(b) The NIH 1,000-image ChestX-ray14 set: the default plan trained on its ``Data_Entry.csv`` manifest and
scored against the nine radiologists' boxes of NIH's ``BBox_List_2017.csv`` that fall on its images (all
in its test split; the rows are in tests/data/nih_bbox_nine.csv).

Targets (issue "Do the heatmaps point at the disease?"): on (a), pointing game >= 0.9 for Grad-CAM on the
default model, and the maps' similarity to the trained maps falling as layers are randomized.

Runs are kept in benchmarks/runs/localization/ and are read, not trained again, when finished.

    python benchmarks/localization.py --nih-dir DIR     # DIR: the folder holding Data_Entry.csv and images/
    python benchmarks/localization.py --train-only ...  # only the trainings (to run them early, in the background)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, save_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path(__file__).parent / "runs" / "localization"
NINE = ROOT / "tests" / "data" / "nih_bbox_nine.csv"
SIZE, PATCH = 64, 6
TARGET_POINTING = 0.9
#: the sanity checks run for a gradient-based and a gradient-free method (each step redraws every map)
SANITY_METHODS = ["gradcam", "eigencam"]


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def make_synthetic(folder: Path, n: dict[str, int], seed: int = 0) -> None:
    """PNGs, a manifest (path,label,split), the same with shuffled training labels, and the boxes (image,
    finding,x,y,w,h,width,height) of the test images that carry the patch."""
    import cv2

    if (folder / "boxes.csv").is_file():
        return
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, boxes = [], []
    for split, count in n.items():
        labels = np.array([1] * (count // 2) + [0] * (count - count // 2))
        rng.shuffle(labels)
        for i, y in enumerate(labels):
            noise = rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32)
            img = cv2.GaussianBlur(noise, (0, 0), 3.0)
            img = 110 + 40 * img / (img.std() + 1e-6)  # smooth grey texture, mean 110
            name = f"{split}_{i:04d}.png"
            if y:
                x0, y0 = (int(v) for v in rng.integers(2, SIZE - PATCH - 2, 2))
                img[y0:y0 + PATCH, x0:x0 + PATCH] = 235
                if split == "test":
                    boxes.append([name, "patch", x0, y0, PATCH, PATCH, SIZE, SIZE])
            cv2.imwrite(str(folder / "images" / name), np.clip(img, 0, 255).astype(np.uint8))
            rows.append([f"images/{name}", "patch" if y else "none", split])
    shuffled = [r[:] for r in rows]
    train = [i for i, r in enumerate(shuffled) if r[2] == "train"]
    perm = rng.permutation([shuffled[i][1] for i in train])
    for i, lab in zip(train, perm):
        shuffled[i][1] = lab
    for name, table, header in (("manifest.csv", rows, ["path", "label", "split"]),
                                ("manifest_shuffled.csv", shuffled, ["path", "label", "split"]),
                                ("boxes.csv", boxes, ["image", "finding", "x", "y", "w", "h", "width", "height"])):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(table)


def train(folder: Path, args: list[str]) -> dict:
    """``medsight train ARGS --out FOLDER`` in a temporary working folder (this checkout's medsight), once."""
    if not (folder / "metrics.json").is_file():
        if folder.exists():
            import shutil

            shutil.rmtree(folder)  # an unfinished run: start it again
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            subprocess.run([sys.executable, "-m", "medsight", "train", "--no-progress", *args, "--out",
                            str(folder.resolve())], cwd=tmp, check=True, env=env)
            (folder / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return describe(folder, args)


def finished(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def describe(folder: Path, args: list[str] | None) -> dict:
    """A run: its command, and wall time and test figures when it finished; an unfinished one (stopped for
    time) is described by its history, and scored from the best.pt it has so far."""
    out: dict = {"command": " ".join(["medsight train", *(args or [])]), "finished": finished(folder)}
    if not finished(folder):
        import csv as _csv

        rows = list(_csv.DictReader(open(folder / "history.csv")))
        plan = json.loads((folder / "plan.json").read_text())
        epochs = next((d["value"] for d in plan.get("decisions", []) + plan.get("user_set", []) if d["key"] == "train.epochs"),
                      None)
        return {**out, "epochs_done": len(rows), "epochs_planned": epochs,
                "val_auc_per_epoch": [_r(float(r["val_auc"])) for r in rows],
                "seconds_so_far": round(sum(float(r["seconds"]) for r in rows), 1)}
    m = json.loads((folder / "metrics.json").read_text())
    t = m["test"]
    wall = folder / "wall_seconds.txt"  # absent for a run trained by hand: its epochs' seconds instead
    seconds = float(wall.read_text()) if wall.is_file() else round(float(m.get("train_seconds") or 0), 1)
    return {**out, "seconds": seconds, "wall_clock": wall.is_file(), "test_auc": _r(t.get("auc")),
            "test_accuracy": _r(t.get("accuracy")), "epochs_run": m["epochs_run"], "best_epoch": m["best_epoch"]}


def usable(folder: Path) -> bool:
    return (folder / "best.pt").is_file() and (folder / "history.csv").is_file()


#: after training, the run's sharpness estimate and faithfulness curves are skipped (they do not change the model)
NO_EXTRAS = ["--device", "cpu", "--set", "train.sharpness_batches=0", "--set", "explain.faithfulness_images=0"]
SYNTH_TRAIN = ["--model", "coatnet_tiny", "--image-size", "64", "--epochs", "20", *NO_EXTRAS]
#: the same at 32 px with AdamW (no SAM): a quarter of the compute per image and half per step, for a CPU
#: shared with other jobs (the 64-px run is reported where it finished)
FAST_TRAIN = ["--model", "coatnet_tiny", "--image-size", "32", "--epochs", "6", "--optimizer", "adamw", *NO_EXTRAS]
PARTS = ("synthetic", "nih", "synthetic_shuffled", "synthetic_fast", "synthetic_fast_shuffled", "synthetic_plan",
         "synthetic_plan_shuffled")


def commands(nih_dir: Path | None) -> dict[str, list[str]]:
    """Run folder name -> its ``medsight train`` arguments."""
    synth = RUNS / "synthetic-data"
    out = {"synthetic": ["--data", str(synth / "manifest.csv"), *SYNTH_TRAIN],
           "synthetic-shuffled": ["--data", str(synth / "manifest_shuffled.csv"), *SYNTH_TRAIN],
           "synthetic-fast": ["--data", str(synth / "manifest.csv"), *FAST_TRAIN],
           "synthetic-fast-shuffled": ["--data", str(synth / "manifest_shuffled.csv"), *FAST_TRAIN],
           # the plan's own choice for 600 images (a CNN, ResNet-18 at 64 px), nothing pinned
           "synthetic-plan": ["--data", str(synth / "manifest.csv"), *NO_EXTRAS],
           "synthetic-plan-shuffled": ["--data", str(synth / "manifest_shuffled.csv"), *NO_EXTRAS]}
    if nih_dir is not None:
        out["nih"] = ["--data", str(nih_dir / "Data_Entry.csv"), *NO_EXTRAS]
    return out


def train_all(nih_dir: Path | None, only: str | None = None) -> dict:
    make_synthetic(RUNS / "synthetic-data", {"train": 600, "val": 100, "test": 200})
    return {name: train(RUNS / name, args) for name, args in commands(nih_dir).items()
            if only in (None, name.replace("-", "_"))}


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def _compact(loc: dict) -> dict:
    """The localization result without the per-box records (kept beside the runs), rounded."""
    def score(s: dict) -> dict:
        return {"mean": _r(s["mean"]), "ci95": [_r(v) for v in s["ci95"]] if s["ci95"] else None, "n": s["n"]}

    return {"settings": loc["settings"], "skipped": loc["skipped"],
            "methods": {m: {"overall": {k: score(v) for k, v in r["overall"].items()},
                            "findings": {f: {k: score(v) for k, v in fr.items()} for f, fr in r["findings"].items()}}
                        for m, r in loc["methods"].items()}}


def curve_falls(spearman: list[float]) -> bool:
    """The maps' similarity to the trained maps (1 before any layer is re-initialized) falls: below 1 at every
    step of the cascade, and below 0.5 once every layer is random."""
    return bool(spearman and all(v < 1.0 for v in spearman) and spearman[-1] < 0.5)


def _curves(sanity: dict) -> dict:
    out = {}
    for m, r in sanity["cascading"]["methods"].items():
        sp = [s["spearman"]["mean"] for s in r["steps"]]
        out[m] = {"randomized": [s["randomized"] for s in r["steps"]], "spearman": [_r(v) for v in sp],
                  "spearman_ci95": [[_r(v) for v in s["spearman"]["ci95"]] for s in r["steps"]],
                  "ssim": [_r(s["ssim"]["mean"]) for s in r["steps"]], "n": r["steps"][0]["spearman"]["n"],
                  "falls": curve_falls(sp),
                  "explains_model": r["explains_model"]}
    if "data" in sanity:
        for m, r in sanity["data"]["methods"].items():
            out[m]["shuffled_labels"] = {"spearman": _r(r["spearman"]["mean"]), "ssim": _r(r["ssim"]["mean"]),
                                         "n": r["spearman"]["n"], "explains_model": r["explains_model"]}
    return out


def check(run: Path, out: Path, boxes: Path, images: Path, shuffled: Path | None, methods: list[str]) -> dict:
    """``medsight explain RUN --boxes BOXES --compare --sanity [--shuffled-run]``, through the library."""
    from medsight.evaluation.explanations import audit_run

    t0 = time.perf_counter()
    r = audit_run(run, out, boxes=boxes, images=[images], methods=methods, device="cpu", max_overlays=9)
    t1 = time.perf_counter()
    s = audit_run(run, out / "sanity", sanity=True, shuffled_run=shuffled, images=[images], methods=SANITY_METHODS,
                  device="cpu", sanity_images=16)
    return {"seconds_localization": round(t1 - t0, 1), "seconds_sanity": round(time.perf_counter() - t1, 1),
            "localization": _compact(r["localization"]), "sanity": _curves(s["sanity"])}


#: the layer the default rule chose before it asked for 7 cells a side (a 4 × 4 map at 64 px)
OLD_DEFAULT_LAYER = "stages.2"


def ablation(run: Path, boxes: Path, images: Path) -> dict:
    """Grad-CAM's pointing game with the earlier default layer and the current one, each with the maps as the
    grad-cam library places them and registered to where the layer's cells look (``explain(register=...)``)."""
    import torch

    from medsight.data.imageio import read_image
    from medsight.explainers import explain
    from medsight.explainers.localization import (bootstrap_mean, box_in_view, default_tolerance, pointing_hits,
                                                  read_boxes)
    from medsight.inference import Predictor

    pred = Predictor(run / "best.pt", "cpu")
    rows, _ = read_boxes(boxes)
    k = pred.classes.index(rows[0].finding)
    imgs = [read_image(images / b.image) for b in rows]
    x = torch.cat([pred.preprocess(i) for i in imgs])
    rect = np.array([box_in_view(b, tuple(i.shape[-2:]), pred.image_size, pred.data_cfg.resize) for b, i in
                     zip(rows, imgs)])
    out = {}
    for layer in (OLD_DEFAULT_LAYER, pred.cam_layer()["target_layer"]):
        for register in (False, True):
            maps = np.concatenate([explain(pred.model, x[i:i + 1], "gradcam", layer, class_idx=k,
                                           register=register).numpy() for i in range(len(x))])  # as localize does
            s = bootstrap_mean(pointing_hits(maps, rect, default_tolerance(pred.image_size)))
            out[f"{layer}, {'registered' if register else 'as placed by the library'}"] = {
                "mean": _r(s["mean"]), "ci95": [_r(v) for v in s["ci95"]], "n": s["n"]}
    return out


def _cell(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"


def table(result: dict) -> str:
    """The README tables from a saved result."""
    lines = []
    for part in ("synthetic", "synthetic_plan", "nih"):
        if part not in result:
            continue
        loc = result[part]["localization"]
        n = next(iter(loc["methods"].values()))["overall"]["pointing"]["n"]
        lines += [f"**{part}** ({n} boxes, tolerance {loc['settings']['tolerance_px']:g} px, IoU at "
                  f"{loc['settings']['iou_threshold']:g} × max)", "",
                  "| map | pointing game | energy in box ÷ area share | IoU |", "|---|---|---|---|"]
        for m, r in loc["methods"].items():
            o = r["overall"]
            lines.append(f"| {m} | {_cell(o['pointing'])} | {_cell(o['energy_ratio'])} | {_cell(o['iou'])} |")
        lines.append("")
        for name, c in result[part].get("gradcam_pointing_ablation", {}).items():
            lines.append(f"- Grad-CAM pointing game, {name}: {_cell(c)} (n {c['n']})")
        san = result[part]["sanity"]
        for m, c in san.items():
            steps = " → ".join(f"{v:.2f}" for v in c["spearman"])
            extra = (f"; shuffled labels {c['shuffled_labels']['spearman']:.2f}" if "shuffled_labels" in c else "")
            lines.append(f"- {m}: Spearman with the trained maps, randomizing {' → '.join(c['randomized'])}: "
                         f"{steps} (SSIM {' → '.join(f'{v:.2f}' for v in c['ssim'])}; n {c['n']}){extra}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nih-dir", type=Path, help="the NIH 1,000-image folder (Data_Entry.csv, images/); "
                   "without it, part (b) is left out")
    p.add_argument("--train-only", action="store_true", help="only the trainings")
    p.add_argument("--only", choices=PARTS, help="with --train-only: one of the trainings")
    p.add_argument("--methods", nargs="+", help="CAM methods to score (default: every one)")
    p.add_argument("--table", action="store_true", help="print the README tables from the saved results")
    p.add_argument("--part", choices=("synthetic", "nih", "synthetic_plan"), help="score one part only (the results file keeps the other)")
    p.add_argument("--max-boxes", type=int, help="score the first N boxes of the synthetic set only")
    args = p.parse_args(argv)
    if args.nih_dir is not None:
        args.nih_dir = args.nih_dir.resolve()  # the trainings run in a temporary folder
    if args.table:
        print(table(json.loads((RESULTS / "localization.json").read_text())))
        return 0
    if args.train_only:
        print(json.dumps(train_all(args.nih_dir, args.only), indent=2))
        return 0
    from medsight.config import CamMethod, choices

    methods = args.methods or list(choices(CamMethod))
    synth = RUNS / "synthetic-data"
    # the 64-px run where it finished, else the 32-px AdamW one; its shuffled-label twin where that finished
    def save(part: str, trainings: dict, scores: dict) -> None:
        """Into the results file as it is now (the other part may have been written meanwhile)."""
        path = RESULTS / "localization.json"
        result: dict = json.loads(path.read_text()) if path.is_file() else {}
        result.update({"machine": "2-core x86-64 CPU", "detail": machine(),
                       "command": "python benchmarks/localization.py --nih-dir DIR", part: scores})
        result.setdefault("trainings", {}).update(trainings)
        text = json.dumps(result)  # paths of this machine out: the repository's relative, the NIH folder as NIH_DIR
        text = text.replace(str(args.nih_dir or "NIH_DIR"), "NIH_DIR").replace(str(ROOT) + os.sep, "")
        save_result("localization.json", json.loads(text), echo=False)

    known = commands(args.nih_dir)
    if args.part in (None, "nih") and args.nih_dir is not None and usable(RUNS / "nih"):
        save("nih", {"nih": describe(RUNS / "nih", known["nih"])},
             check(RUNS / "nih", RUNS / "nih-checks", NINE, args.nih_dir, None, methods))
    if args.part == "nih":
        return 0
    if args.part == "synthetic_plan":  # the plan's default model for this set, with its shuffled-label twin
        run, twin = RUNS / "synthetic-plan", RUNS / "synthetic-plan-shuffled"
        trainings = {n.name: describe(n, known.get(n.name)) for n in (run, twin) if usable(n)}
        a = check(run, RUNS / "synthetic-plan-checks", synth / "boxes.csv", synth / "images",
                  twin if usable(twin) else None, methods)
        g = a["localization"]["methods"]["gradcam"]["overall"]["pointing"]["mean"]
        a["targets"] = {"pointing_gradcam": g, "pointing_target": TARGET_POINTING,
                        "pointing_met": bool(g >= TARGET_POINTING), "randomization_curve_falls": a["sanity"]["gradcam"]["falls"]}
        save("synthetic_plan", trainings, a)
        return 0
    order = [n for n in ("synthetic", "synthetic-fast") if finished(RUNS / n)] + ["synthetic", "synthetic-fast"]
    name = next(n for n in order if usable(RUNS / n))
    twin = RUNS / f"{name}-shuffled"
    trainings = {n: describe(RUNS / n, known.get(n)) for n in (name, twin.name) if usable(RUNS / n)}
    boxes = synth / "boxes.csv"
    if args.max_boxes:
        rows = boxes.read_text().splitlines()
        boxes = synth / f"boxes_first{args.max_boxes}.csv"
        boxes.write_text("\n".join(rows[: args.max_boxes + 1]) + "\n")
    a = check(RUNS / name, RUNS / f"{name}-checks", boxes, synth / "images", twin if usable(twin) else None, methods)
    a["run"] = name
    a["gradcam_pointing_ablation"] = ablation(RUNS / name, boxes, synth / "images")
    g = a["localization"]["methods"]["gradcam"]["overall"]["pointing"]["mean"]
    a["targets"] = {"pointing_gradcam": g, "pointing_target": TARGET_POINTING, "pointing_met": bool(g >= TARGET_POINTING),
                    "randomization_curve_falls": a["sanity"]["gradcam"]["falls"]}
    save("synthetic", trainings, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
