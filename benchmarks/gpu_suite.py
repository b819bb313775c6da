"""The main job on one GPU, in one script of at most 8 minutes on one H100, writing one JSON file.

Sections, each saved as soon as it is measured (a killed run keeps what it measured; running the script
again skips what the file holds, ``--fresh`` starts over):

* ``prepare``: ``medsight prepare`` of the embedded PneumoniaMNIST at 224 px (the cache every later section
  reads);
* ``loader``: the training loader alone over that cache, images/s per worker count, batched cache reads with
  the augmentation on the device against the per-image path (alternating rounds, median);
* ``loop``: the training loop on the cache against the step alone (one batch in memory), coatnet_0_rw_224,
  bf16, AdamW (alternating rounds, median);
* ``optimizers``: AdamW, SAM-AdamW and LookSAM-AdamW step time (alternating rounds, median; ratios to AdamW);
* ``gradcam``: Grad-CAM images/s;
* ``end_to_end``: ``medsight train`` on PneumoniaMNIST at 224 px, CoAtNet-0 (coatnet_0_rw_224), SAM-AdamW, bf16,
  from the prepared cache, through evaluation (with robustness) and report; wall time split into data
  preparation, training, validation and each end-of-run step (the run's timing.json), test AUC/ACC beside
  the published MedMNIST v2 ResNet-50 (224) row.

    python benchmarks/gpu_suite.py                 # one H100: writes benchmarks/results/gpu_suite_gpu.json
    python benchmarks/gpu_suite.py --quick         # CPU proof: tiny sizes, seconds (gpu_suite_quick.json)
    python benchmarks/gpu_suite.py --sections loader --device cpu   # one section on this machine

Targets (issue "The main job on one GPU"): the suite inside 8 minutes on one H100; the loop >= 0.90 of the
step at 224 px; SAM <= 2.05x and LookSAM <= 1.35x AdamW's step time; the end-to-end test AUC/ACC reported
beside ResNet-50 (224) 0.962 / 0.884.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _results import RESULTS, positive_int
from explain_speed import device_name, gradcam_speed
from loader import med, spread
from pneumoniamnist import CONFIGS, PUBLISHED, quick_data
from sam_overhead import OPTIMIZERS, step_throughput

SECTIONS = ("prepare", "loader", "loop", "optimizers", "gradcam", "end_to_end")
ROOT = Path(__file__).resolve().parent.parent
REFERENCE = next((auc, acc) for name, auc, acc in PUBLISHED if name == "ResNet-50 (224)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    """The suite's JSON file, rewritten whole (atomically) after every section."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.doc: dict[str, Any] = {} if fresh or not path.is_file() else json.loads(path.read_text())
        self.doc.setdefault("sections", {})

    def done(self, name: str) -> bool:
        return name in self.doc["sections"]

    def save(self, name: str | None = None, row: Any = None) -> None:
        if name is not None:
            self.doc["sections"][name] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        tmp.replace(self.path)


def medsight(*args: str) -> float:
    """Run ``python -m medsight ARGS`` (its output shown); its wall seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medsight", *args], check=True, env=env)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- sections

def prepare(a: argparse.Namespace) -> dict[str, Any]:
    seconds = medsight("prepare", "--data", str(a.data), "--size", str(a.size), "--channels", "1",
                       "--out", str(a.cache), *(["--workers", "0"] if a.quick else []))
    n = sum(int(np.load(f, mmap_mode="r").shape[0]) for f in a.cache.glob("*_images.npy"))
    return {"command": f"medsight prepare --data {a.data.name} --size {a.size} --channels 1", "images": n,
            "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)}


def _train_dataset(a: argparse.Namespace, model_cfg: dict[str, Any]) -> Any:
    from medsight.config import DataConfig
    from medsight.data import ImageDataset, make_transform
    from medsight.data.cache import open_cache

    splits = open_cache(a.cache)[0]
    cfg = DataConfig(image_size=a.size, hflip=True, rotate_degrees=10)  # flip + a 10° turn, as loader.py times
    return ImageDataset(splits["train"], make_transform(a.size, model_cfg["mean"], model_cfg["std"], train=True,
                                                        cfg=cfg))


def loader_alone(a: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the training loader alone (batches delivered on the device), per worker count."""
    from medsight.data.loader import build_loader, loader_settings

    ds = _train_dataset(a, {"mean": [0.5] * 3, "std": [0.5] * 3})
    cores = os.cpu_count() or 1
    counts = sorted({w for w in (0, 1, 2, 4, 8) if w <= max(0, cores - 1)})
    loaders = {}
    for w in counts:
        settings = loader_settings(a.device, num_workers=w)
        for kind, batched in (("batched_on_device", True), ("per_image", False)):
            loaders[(kind, w)] = build_loader(ds, a.batch, True, settings, a.device, batched=batched)

    def speed(loader: Any) -> float:
        sync(a.device)
        t0, n = time.perf_counter(), 0
        for k, (x, _, _) in enumerate(loader):
            x = x.to(a.device, non_blocking=True)  # the per-image path's copy (the batched one is there already)
            n += len(x)
            if k + 1 == a.loader_batches:
                break
        sync(a.device)
        return n / (time.perf_counter() - t0)

    for loader in loaders.values():
        speed(loader)  # warm-up: workers started, pages read
    rounds: dict[tuple[str, int], list[float]] = {key: [] for key in loaders}
    for _ in range(a.rounds):  # every variant in turn, each round
        for key, loader in loaders.items():
            rounds[key].append(speed(loader))
    out: dict[str, Any] = {"batch": a.batch, "batches_per_round": a.loader_batches, "rounds": a.rounds,
                           "augmentation": "flip + 10° rotation", "cores": cores, "device": device_name(a.device)}
    for kind in ("batched_on_device", "per_image"):
        out[kind] = {str(w): {"images_per_s": med(rounds[(kind, w)], 1), "range": spread(rounds[(kind, w)], 1)}
                     for w in counts}
    return out


def loop_vs_step(a: argparse.Namespace) -> dict[str, Any]:
    """The loop (medsight's loader over the cache + the step) against the step alone on one batch in memory."""
    from medsight.config import OptimConfig
    from medsight.data.loader import build_loader, loader_settings
    from medsight.engine.step import StepOptions, train_step
    from medsight.models import create_model, data_config
    from medsight.optim import create_optimizer

    gpu = a.device.type == "cuda"
    model = create_model(a.model, num_classes=2, img_size=a.size).to(a.device).to(memory_format=torch.channels_last)
    settings = loader_settings(a.device)
    loader = build_loader(_train_dataset(a, data_config(model)), a.batch, True, settings, a.device, drop_last=True)
    opt = create_optimizer(model, OptimConfig(name="adamw", lr=1e-4), fused=gpu)
    loss_fn, opts = torch.nn.CrossEntropyLoss(), StepOptions(precision=a.precision)
    x0, y0, _ = next(iter(loader))
    x0, y0 = x0.to(a.device), y0.to(a.device)

    def step_only() -> float:
        sync(a.device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            train_step(model, x0, y0, opt, loss_fn, opts=opts)
        sync(a.device)
        return a.steps * a.batch / (time.perf_counter() - t0)

    def loop() -> float:
        sync(a.device)
        t0, k = time.perf_counter(), 0
        for x, y, _ in loader:
            x = x.to(a.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            train_step(model, x, y.to(a.device, non_blocking=True), opt, loss_fn, opts=opts)
            k += 1
            if k == a.steps:
                break
        sync(a.device)
        return k * a.batch / (time.perf_counter() - t0)

    step_only(), loop()  # warm-up: kernels, allocator, workers
    steps, loops = [], []
    for _ in range(a.rounds):
        steps.append(step_only())
        loops.append(loop())
    ratios = [lp / st for lp, st in zip(loops, steps)]
    return {"model": a.model, "image_size": a.size, "batch": a.batch, "precision": a.precision, "optimizer": "adamw",
            "steps_per_round": a.steps, "rounds": a.rounds, "loader": settings.as_dict(),
            "batched_on_device": type(loader).__name__ == "DeviceLoader", "device": device_name(a.device),
            "step_images_per_s": med(steps, 1), "loop_images_per_s": med(loops, 1),
            "loop_over_step": med(ratios, 3), "loop_over_step_range": spread(ratios, 3),
            "target_met": med(ratios, 3) >= 0.90}


def optimizers(a: argparse.Namespace) -> dict[str, Any]:
    """Step time of each optimizer, the optimizers taking turns each round (sam_overhead's step, median)."""
    args = argparse.Namespace(model=a.model, image_size=a.size, batch=a.batch, precision=a.precision,
                              steps=a.steps, warmup=a.warmup, compile=False)
    per: dict[str, list[float]] = {n: [] for n in OPTIMIZERS}
    for r in range(a.rounds):
        for n in OPTIMIZERS:
            per[n].append(a.batch / step_throughput(args, n, a.device))  # seconds per step
        log(f"optimizers: round {r + 1}/{a.rounds}")
    ratios = {n: [t / base for t, base in zip(per[n], per["adamw"])] for n in OPTIMIZERS}
    row = {"model": a.model, "image_size": a.size, "batch": a.batch, "precision": a.precision, "steps": a.steps,
           "rounds": a.rounds, "device": device_name(a.device),
           "step_ms": {n: med([1000 * t for t in v], 2) for n, v in per.items()},
           "time_ratio_vs_adamw": {n: med(v, 3) for n, v in ratios.items()},
           "time_ratio_range": {n: spread(v, 3) for n, v in ratios.items()}}
    row["targets_met"] = {"sam_le_2.05x": row["time_ratio_vs_adamw"]["sam-adamw"] <= 2.05,
                          "looksam_le_1.35x": row["time_ratio_vs_adamw"]["looksam-adamw"] <= 1.35}
    return row


def gradcam(a: argparse.Namespace) -> dict[str, Any]:
    return gradcam_speed(a.model, a.size, a.cam_batch, a.cam_images, "gradcam", a.device)


def end_to_end(a: argparse.Namespace) -> dict[str, Any]:
    """`medsight train` from the prepared cache through the report; the wall time split by the run's timing.json."""
    run = a.work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"  # a new folder: a killed attempt's is left as it is
    sets = [*CONFIGS["coatnet0_sam"], f"model.name={a.model}", f"train.epochs={a.epochs}",
            f"train.batch_size={a.batch}", f"data.image_size={a.size}", f"train.precision={a.precision}",
            f"data.path={a.data}", f"data.cache={a.cache}", "eval.robustness=true", *a.extra]
    overrides = [f"{k}={v}" for k, v in dict(kv.split("=", 1) for kv in sets).items()]  # the last value of a key
    args = ["train", "--no-progress", "--force", "--out", str(run)]
    for kv in overrides:
        args += ["--set", kv]
    wall = medsight(*args)
    timing = json.loads((run / "timing.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    inside = timing["train_seconds"] + timing["validation_seconds"] + timing["end_of_run_seconds"]
    prep = a.results.doc["sections"].get("prepare", {}).get("seconds", 0.0)
    test = metrics["test"]
    return {"command": "medsight train " + " ".join(f"--set {kv}" for kv in overrides),
            "wall_seconds": round(wall, 1), "epochs": metrics["epochs_run"], "best_epoch": metrics["best_epoch"],
            "seconds": {"data_preparation": round(prep + wall - inside, 1),
                        "of_which_prepare_cache": prep, "of_which_start_up_and_loading": round(wall - inside, 1),
                        "training": timing["train_seconds"], "validation": timing["validation_seconds"],
                        "end_of_run": timing["end_of_run_seconds"], "end_of_run_steps": timing["end_of_run_steps"]},
            "end_of_run_share": timing["end_of_run_share"],
            "test_auc": round(test["auc"], 4), "test_acc": round(test["accuracy"], 4),
            "test_auc_ci95": [round(v, 4) for v in test["ci95"]["auc"]],
            "published_resnet50_224": {"auc": REFERENCE[0], "acc": REFERENCE[1]},
            "above_published": {"auc": test["auc"] >= REFERENCE[0], "acc": test["accuracy"] >= REFERENCE[1]},
            "robustness_mean_drop": metrics.get("robustness", {}).get("mean_drop"),
            "device": device_name(a.device)}


RUNNERS = {"prepare": prepare, "loader": loader_alone, "loop": loop_vs_step, "optimizers": optimizers,
           "gradcam": gradcam, "end_to_end": end_to_end}
assert tuple(RUNNERS) == SECTIONS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--quick", action="store_true", help="CPU proof: coatnet_tiny, 32 px, a small subset, 1 epoch")
    p.add_argument("--fresh", action="store_true", help="measure every section again (default: resume)")
    p.add_argument("--output", type=Path, help="the JSON file (default benchmarks/results/gpu_suite_DEVICE.json)")
    p.add_argument("--work", type=Path, help="folder for the cache and the run (default: a folder in the temp dir)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="coatnet_0_rw_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--steps", type=positive_int, default=20, help="steps per round (loop, optimizers)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=positive_int, default=5, help="alternating rounds (the median is reported)")
    p.add_argument("--loader-batches", type=positive_int, default=10, help="batches per loader round")
    p.add_argument("--cam-batch", type=positive_int, default=64)
    p.add_argument("--cam-images", type=positive_int, default=2000)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra config override for the end-to-end run (repeatable)")
    a = p.parse_args(argv)
    a.device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                            ("cpu" if a.device == "auto" else a.device))
    tag = "quick" if a.quick else ("gpu" if a.device.type == "cuda" else "cpu")
    a.output = a.output or RESULTS / f"gpu_suite_{tag}.json"
    a.work = a.work or Path(tempfile.gettempdir()) / f"medsight_gpu_suite_{tag}"
    a.work.mkdir(parents=True, exist_ok=True)
    a.cache = a.work / f"cache{a.size if not a.quick else 32}"
    from medsight.config import DEFAULT_DATA

    a.data = DEFAULT_DATA
    if a.quick:
        a.model, a.size, a.batch, a.epochs, a.steps, a.warmup, a.rounds = "coatnet_tiny", 32, 8, 1, 2, 1, 2
        if a.device.type == "cpu":
            a.precision = "fp32"  # bf16 on a CPU without bf16 units is emulated: minutes instead of seconds
        a.loader_batches, a.cam_batch, a.cam_images = 3, 4, 8
        a.data = quick_data(a.work, n_train=64, n_eval=24)
        a.extra = ["explain.faithfulness_images=4", "explain.faithfulness_methods=[gradcam]",
                   "explain.gallery_per_class=1", "train.sharpness_batches=1", "eval.bootstrap=50",
                   "schedule.warmup_epochs=0", *a.extra]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    a.results = Results(a.output, a.fresh)
    a.results.doc.update({"device": device_name(a.device), "torch": torch.__version__, "quick": a.quick,
                          "model": a.model, "image_size": a.size, "batch": a.batch, "precision": a.precision})
    t_start = time.perf_counter()
    for name in a.sections:
        if a.results.done(name):
            log(f"{name}: in {a.output.name} already (--fresh to measure again)")
            continue
        if name != "prepare" and not (a.cache / "manifest.json").is_file() and name in ("loader", "loop", "end_to_end"):
            log("prepare: the cache the next sections read")
            a.results.save("prepare", prepare(a))
        log(f"{name}: measuring")
        t0 = time.perf_counter()
        row = RUNNERS[name](a)
        row["section_seconds"] = round(time.perf_counter() - t0, 1)
        a.results.save(name, row)
        log(f"{name}: {json.dumps(row)[:400]}")
    a.results.doc["suite_seconds_this_call"] = round(time.perf_counter() - t_start, 1)
    a.results.save()
    log(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
