"""``medsight`` command line: thin wrappers over the library functions."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from medsight.errors import MedsightError, UsageError

__all__ = ["main", "build_parser"]


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Turn the convenience flags into ``--set`` overrides (the config stays the single source)."""
    sets = []
    flag_keys = {"data": "data.path", "model": "model.name", "epochs": "train.epochs", "out": "out",
                 "optimizer": "optim.name", "lr": "optim.lr", "batch_size": "train.batch_size",
                 "weights": "model.weights", "image_size": "data.image_size", "device": "train.device",
                 "layout": "model.layout", "time_budget": "train.time_budget", "shots": "data.shots"}
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if getattr(args, "pretrained", False):
        sets.append("model.pretrained=true")
    return sets + list(args.set or [])


def _cmd_train(args: argparse.Namespace) -> int:
    from medsight.config import load_config
    from medsight.engine import train

    config_path = args.config
    if args.resume and config_path is None and args.out:
        from pathlib import Path

        saved = Path(args.out) / "config.yaml"
        config_path = str(saved) if saved.exists() else None
    if args.synthetic and not args.dry_run:
        raise UsageError("--synthetic only goes with --dry-run")
    if args.dry_run:
        from medsight.engine import dry_run

        names = args.models or [None]
        for name in names:
            sets = _train_overrides(args) + ([f"model.name={name}"] if name else [])
            r = dry_run(load_config(config_path, sets), synthetic=args.synthetic)
            frozen = f" ({r['frozen'] / 1e6:.2f}M frozen)" if r["frozen"] else ""
            print(f"dry run OK: {r['model']} · {r['parameters'] / 1e6:.2f}M parameters{frozen}"
                  f" · {r['classes']} classes · {len(r['losses'])} training steps (loss "
                  f"{' -> '.join(f'{v:.4f}' for v in r['losses'])}) and one evaluation step on {r['images']} "
                  f"{'generated' if r['synthetic'] else 'real'} images · {r['seconds']:.1f}s"
                  + (" · pretrained weights not loaded in a dry run" if r["pretrained_skipped"] else ""))
        return 0
    if args.models:
        return _train_many(args, config_path)
    cfg = load_config(config_path, _train_overrides(args))
    result = train(cfg, resume=args.resume, progress=not args.no_progress, force=args.force)
    return 130 if result.interrupted else 0


def _train_many(args: argparse.Namespace, config_path: str | None) -> int:
    """One run per backbone, in sibling folders OUT/MODEL, then a comparison of them in OUT/compare."""
    from datetime import datetime
    from pathlib import Path

    from medsight.config import load_config, validate_config
    from medsight.engine import train
    from medsight.evaluation.compare import compare

    if args.model or args.resume:
        raise UsageError("--models trains several backbones; do not combine it with --model or --resume")
    base = Path(args.out or f"runs/multi-{datetime.now():%Y%m%d-%H%M%S}")
    cfgs = []
    for name in args.models:  # check every config before the first run starts
        cfg = load_config(config_path, _train_overrides(args) + [f"model.name={name}", f"out={base / name}"])
        validate_config(cfg)
        cfgs.append(cfg)
    from medsight.models import create_model

    for cfg in cfgs:
        create_model(cfg.model.name, num_classes=2, img_size=cfg.data.image_size, layout=cfg.model.layout)
    runs = []
    for cfg in cfgs:
        print(f"=== {cfg.model.name} -> {cfg.out}")
        result = train(cfg, progress=not args.no_progress, force=args.force)
        if result.interrupted:
            return 130
        runs.append(result.out)
    if len(runs) > 1:
        compare(runs, base / "compare")
        print(f"comparison: {base / 'compare' / 'compare.html'}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from medsight.config import load_config
    from medsight.planning import plan_for

    plan = plan_for(load_config(args.config, _train_overrides(args)))
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(plan.lines()))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medsight.api import evaluate

    result = evaluate(args.checkpoint, args.data, out=args.out, device=args.device)
    from medsight.checkpoint import load_checkpoint
    from medsight.reporting.tables import summary_line
    from medsight.tasks import task_from_checkpoint

    m = result["test"]
    task = task_from_checkpoint(load_checkpoint(args.checkpoint))
    if m.get("report"):
        print(m["report"])
    print(f"{result['data']}: n {m['n']} · {summary_line(task, m)}")
    if result["skipped_files"]:
        print(f"skipped {len(result['skipped_files'])} unreadable file(s)")
    tr = result["trust"]
    cal, conf = tr["calibration"], tr.get("conformal")
    print(f"calibration here: ECE {cal['ece_before']:.4f} before temperature, {cal['ece_after']:.4f} after"
          + (f" · conformal coverage {conf['coverage']:.3f} (stated {conf['target_coverage']:.2f}), mean set size "
             f"{conf['mean_set_size']:.2f}" if conf else ""))
    if args.out:
        print(f"wrote {args.out}/metrics.json, model_card.md and report.html")
    return 0


def _cmd_robustness(args: argparse.Namespace) -> int:
    from medsight.api import robustness_check

    r = robustness_check(args.checkpoint, data=args.data, out=args.out, device=args.device,
                         corruptions=args.corruptions, seed=args.seed, write=args.store)
    m = r["metric"]
    print(f"{r['data']}: clean {m} {r['clean']:.4f} ({r['n']} images)")
    for name, rows in r["corruptions"].items():
        print(f"  {name:<15} " + "  ".join(f"s{x['severity']} {x[m]:.4f} ({-x['drop']:+.4f})" if x[m] is not None
                                           else f"s{x['severity']} n/a" for x in rows))
    print(f"mean {m} drop {r['mean_drop']:.4f}")
    if r.get("written"):
        print(f"stored in {r['written']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medsight.api import predict

    for rec in predict(args.checkpoint, args.images, device=args.device, onnx=args.onnx or None):
        if args.json:
            print(json.dumps(rec))
        elif "error" in rec:
            print(f"{rec['file']}: ERROR {rec['error']}")
        else:
            probs = ", ".join(f"{c} {p:.3f}" for c, p in rec["probabilities"].items())
            print(f"{rec['file']}: {rec['label']}  ({probs})")
    return 0


def _box_size(text: str) -> tuple[float, float]:
    """``WxH`` (e.g. 1024x1024): the image size box coordinates refer to."""
    try:
        w, h = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x1024, got {text!r}") from None
    if not (w > 0 and h > 0):
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return w, h


def _cmd_explain_checks(args: argparse.Namespace) -> int:
    """--boxes / --sanity: heatmaps against a box list and the saliency sanity checks."""
    from medsight.config import CamMethod, choices
    from medsight.evaluation.explanations import audit_run
    from medsight.reporting.localization import fmt_score

    methods = list(choices(CamMethod)) if args.compare else [args.method]
    r = audit_run(args.checkpoint, args.out, boxes=args.boxes, images=args.images or None, methods=methods,
                  target_layer=args.target_layer, box_size=args.box_size, tolerance=args.tolerance,
                  iou_threshold=args.iou_threshold, sanity=args.sanity, shuffled_run=args.shuffled_run,
                  sanity_images=args.sanity_images, store=args.store, device=args.device)
    loc = r.get("localization")
    if loc:
        st = loc["settings"]
        print(f"{len(loc['boxes'])} box(es) scored, {len(loc['skipped'])} row(s) left out; pointing tolerance "
              f"{st['tolerance_px']:g} px, IoU at {st['iou_threshold']:g} x the map's maximum")
        for name, m in loc["methods"].items():
            o = m["overall"]
            print(f"  {name:<10} pointing {fmt_score(o['pointing'])} · energy ratio {fmt_score(o['energy_ratio'])}"
                  f" · IoU {fmt_score(o['iou'])}")
    for name, m in r.get("sanity", {}).get("cascading", {}).get("methods", {}).items():
        steps = " -> ".join(f"{s['spearman']['mean']:.2f}" for s in m["steps"])
        print(f"  {name}: Spearman with the trained maps as layers are randomized {steps}: {m['verdict']}")
    for name, m in r.get("sanity", {}).get("data", {}).get("methods", {}).items():
        print(f"  {name}: shuffled-label model, Spearman {fmt_score(m['spearman'])}: {m['verdict']}")
    print(f"wrote {args.out}/localization.json and report.html" + (f"; stored in {r['stored']}" if r.get("stored") else ""))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from medsight.api import explain_files

    if args.boxes or args.sanity:
        return _cmd_explain_checks(args)
    if args.store or args.shuffled_run:
        raise ValueError("--store and --shuffled-run go with --boxes or --sanity")
    if not args.images:
        raise ValueError("give image files or folders to explain (or --boxes BOXES.csv / --sanity)")
    results = explain_files(args.checkpoint, args.images, args.out, method=args.method,
                            target_layer=args.target_layer, class_idx=args.class_idx, compare=args.compare,
                            device=args.device)
    for rec in results:
        if "error" in rec:
            print(f"{rec['file']}: ERROR {rec['error']}")
        else:
            print(f"{rec['file']}: {rec['label']} ({rec['probability']:.3f}) -> {rec['overlay']}")
    print(f"wrote {len(results)} explanation(s) to {args.out} (explanations.jsonl)")
    return 0


def _cmd_sharpness(args: argparse.Namespace) -> int:
    from medsight.api import checkpoint_sharpness

    result = checkpoint_sharpness(args.checkpoint, data=args.data, rho=args.rho, n_batches=args.batches,
                                  device=args.device, seed=args.seed, write=not args.no_write)
    print(f"sharpness (rho {result['rho']:g}, {result['images']} images of {result['data']}): "
          f"ascent {result['ascent']:.4f} · random {result['random']:.4f} · loss {result['loss']:.4f}")
    if result.get("written"):
        print(f"stored in {result['written']}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from medsight.config import load_config
    from medsight.data.cache import prepare_cache, verify_cache
    from medsight.planning import plan_preprocessing

    if args.verify and not args.data:
        r = verify_cache(args.out)
        print(f"verified cache {args.out}: manifest, labels, rows, names and {r['images']} images "
              f"({r['chunks']} chunks) match their checksums; the source matches where it is at hand")
        return 0
    if not args.data:
        raise ValueError("prepare needs --data (the source to cache), or --verify to check a cache in --out")
    sets = [f"data.path={json.dumps(args.data)}"] + ([f"data.image_size={args.size}"] if args.size else [])
    cfg, lines = plan_preprocessing(load_config(args.config, sets + list(args.set or [])))
    for line in lines:  # the size and resize policy train would plan for this data
        print(line)
    m = prepare_cache(cfg.data, args.out, workers=args.workers, channels=args.channels)
    if args.verify:
        verify_cache(args.out)
    rows = sum(p["rows"] for p in m["progress"].values())
    pre = m["preprocessing"]
    print(f"prepared cache {args.out}: {rows - len(m['skipped'])} of {rows} images at {pre['size']} px "
          f"({pre['resize']}, preset {pre['preset']}, {pre['channels']} channel(s)), splits {', '.join(m['splits'])}"
          + (f"; {len(m['skipped'])} unreadable file(s) listed in skipped.json" if m["skipped"] else "")
          + ("; verified" if args.verify else "")
          + f". Train with --set data.cache={args.out} (its size and resize are taken from the cache)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medsight.inference import export_onnx

    result = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"wrote {result['out']} (opset {result['opset']}; onnxruntime vs PyTorch max |Δp| "
          f"{result['max_abs_diff']:.1e})")
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    from medsight.serve import NOTICE, BatchSettings, serve

    if not _loopback(args.host):
        if not args.allow_remote:
            print(f"medsight: error: --host {args.host} lets other machines reach the server, which has no "
                  f"authentication or TLS of its own; put it behind a reverse proxy that adds both (README: "
                  f"Security) and pass --allow-remote, or keep the default 127.0.0.1", file=sys.stderr)
            return 2
        print(f"medsight: warning: binding {args.host}: anyone who can reach this port can send images and read "
              f"predictions; serve it only behind a reverse proxy with authentication and TLS", file=sys.stderr)
    print(f"medsight serving {args.checkpoint} on http://{args.host}:{args.port}  ({NOTICE})", flush=True)
    batching = BatchSettings(enabled=not args.no_batching, max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms,
                             queue_limit=args.queue_limit)
    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, page=not args.no_page,
          onnx=args.onnx or None, batching=batching)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from medsight.evaluation.compare import compare

    result = compare(args.runs, args.out, speed=not args.no_speed)
    for r in result["runs"]:
        auc = f"{r['auc']:.4f}" if r["auc"] is not None else "n/a"
        print(f"{r['run']:<32} {r['model']:<20} AUC {auc} · accuracy {r['accuracy']:.4f} · "
              f"balanced {r['balanced_accuracy']:.4f} · ECE {r['ece']:.4f}")
    print(f"wrote {args.out}/compare.html")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from medsight.evaluation.ensemble import ensemble

    m = ensemble(args.runs, args.method, args.out, meta=args.meta)
    t = m["test"]
    auc = f"{t['auc']:.4f}" if t["auc"] is not None else "n/a"
    for member in m["members"]:
        print(f"member {member['run']}: AUC {member['test_auc']:.4f} · accuracy {member['test_accuracy']:.4f}")
    print(f"{args.method} ensemble: AUC {auc} · accuracy {t['accuracy']:.4f} · balanced {t['balanced_accuracy']:.4f}")
    if "checklist" in m:
        print(f"checklist: {'PASS' if m['checklist']['pass'] else 'FAIL'}")
    print(f"wrote {args.out}/ensemble.json (use it like a checkpoint) and {args.out}/report.html")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from medsight.models import BACKBONES, count_parameters, create_model, list_models

    if args.pattern or args.all:
        names = list_models(args.pattern or "")
        purpose = {n: BACKBONES[n].purpose if n in BACKBONES else "" for n in names}
    else:  # medsight's recommended backbones, with what each is for
        names = list(BACKBONES)
        purpose = {n: f"{b.family}: {b.purpose}" for n, b in BACKBONES.items()}
    for n in names:
        size = BACKBONES[n].image_size if n in BACKBONES else 224
        params = (f"{count_parameters(create_model(n, num_classes=2, img_size=size)) / 1e6:8.2f}M  "
                  if args.params else "")
        print(f"{n:<34} {params}{purpose[n]}".rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from medsight import __version__
    from medsight.config import CamMethod, CorruptionName, OptimizerName, choices
    from medsight.evaluation.ensemble import METHODS

    p = argparse.ArgumentParser(prog="medsight", description="Train medical image classifiers that generalize "
                                "(CoAtNet + SAM) and see what they looked at (Grad-CAM).")
    p.add_argument("--version", action="version", version=f"medsight {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = p.add_subparsers(dest="command", required=True)

    from medsight.techniques import help_text

    t = sub.add_parser("train", help="train, evaluate on test, explain, and write a run folder with a report",
                       epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML config file (defaults: the embedded PneumoniaMNIST run)")
    t.add_argument("--data", help="class-per-folder directory, CSV manifest (path,label[,patient_id][,split]) or .npz")
    t.add_argument("--model", help="any timm model name, or coatnet_tiny / coatnet_0 / coatnet_1 / coatnet_2")
    t.add_argument("--models", nargs="+", metavar="MODEL", help="train one run per backbone into OUT/MODEL and "
                   "compare them")
    t.add_argument("--layout", help="block layout of medsight's CoAtNets: CCTT or CCCT")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--optimizer", choices=choices(OptimizerName))
    t.add_argument("--image-size", type=int)
    t.add_argument("--out", help="run folder (default runs/MODEL-TIMESTAMP)")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs network)")
    t.add_argument("--weights", help="start from a local weights file (.pt, .pth, .safetensors)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--force", action="store_true", help="write into a non-empty --out that holds no run")
    t.add_argument("--shots", type=int, help="few-shot: keep K labelled training images per class (e.g. with "
                   "--set train.head=prototypical)")
    t.add_argument("--time-budget", help="fit the run into this much time on this machine, e.g. 5m, 90s, 1h")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config option, e.g. --set optim.rho=0.1")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines still print)")
    t.add_argument("--dry-run", action="store_true", help="build everything, run two training steps and one "
                   "evaluation step, print OK (checks a config in seconds)")
    t.add_argument("--synthetic", action="store_true", help="with --dry-run: generated images of the configured "
                   "size and class count instead of the data set")
    t.set_defaults(func=_cmd_train)

    pl = sub.add_parser("plan", help="print the data set's fingerprint and the plan training would use")
    pl.add_argument("--data", help="folder, CSV or .npz (default: the embedded PneumoniaMNIST)")
    pl.add_argument("--config", help="YAML config: what it sets, the plan leaves alone")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config option")
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    pl.set_defaults(func=_cmd_plan)

    pr = sub.add_parser("prepare", help="decode and resize every image once into a memory-mapped cache "
                                        "(train with --set data.cache=DIR)")
    pr.add_argument("--data", help="folder, CSV or .npz (optional with --verify)")
    pr.add_argument("--size", type=int, help="input size in pixels (default: the size train would plan for the data)")
    pr.add_argument("--verify", action="store_true", help="check the cache in --out: its files and every image "
                                                          "array against their checksums, and its source")
    pr.add_argument("--out", required=True, help="the cache folder (new, empty, or a cache to update)")
    pr.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    pr.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1: store grey images (a third of the disk)")
    pr.add_argument("--config", help="YAML config: data.resize, data.preset, data.graham, reader options")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config option")
    pr.set_defaults(func=_cmd_prepare)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on another data set")
    e.add_argument("checkpoint")
    e.add_argument("--data", required=True, help="folder, CSV or .npz (its test split, else every image)")
    e.add_argument("--out", help="folder for metrics.json and plots")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_evaluate)

    rb = sub.add_parser("robustness", help="the metric under noise, blur, contrast, brightness, JPEG and "
                                           "resolution loss at 3 severities")
    rb.add_argument("checkpoint")
    rb.add_argument("--data", help="folder, CSV or .npz (default: the checkpoint's own data, its test split)")
    rb.add_argument("--out", help="folder for robustness.json and robustness.png")
    rb.add_argument("--corruptions", nargs="+", choices=choices(CorruptionName), help="a subset (default: all)")
    rb.add_argument("--seed", type=int, default=0)
    rb.add_argument("--store", action="store_true", help="also store the result in the run's metrics.json")
    rb.add_argument("--device", default="auto")
    rb.set_defaults(func=_cmd_robustness)

    x = sub.add_parser("explain", help="Grad-CAM overlays for images; heatmaps against boxes; sanity checks")
    x.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.pt)")
    x.add_argument("images", nargs="*", help="image files or folders (PNG, JPEG, BMP, TIFF, DICOM); with --boxes, "
                   "where the boxed images are (default: beside the run's data)")
    x.add_argument("--out", required=True)
    x.add_argument("--method", default="gradcam", choices=choices(CamMethod))
    x.add_argument("--target-layer", help="dotted module name; default: the deepest stage whose map has at least "
                   "7 cells on a side at the run's input size (the layer used is recorded in the output)")
    x.add_argument("--class", dest="class_idx", type=int, help="class index to explain (default: predicted)")
    x.add_argument("--compare", action="store_true", help="draw every method side by side (with --boxes, "
                   "--sanity: check every method)")
    x.add_argument("--device", default="auto")
    x.add_argument("--boxes", help="box list to score the heatmaps against: NIH's BBox_List_2017.csv, or a CSV "
                   "image,finding,x,y,w,h[,width,height]")
    x.add_argument("--box-size", type=_box_size, metavar="WxH", help="the image size the box coordinates refer "
                   "to, for lists without width,height columns (NIH's list: 1024x1024)")
    x.add_argument("--tolerance", type=float, help="pointing-game tolerance in input pixels (default: 15 px at "
                   "224, scaled to the input size)")
    x.add_argument("--iou-threshold", type=float, default=0.5, help="the share of a map's maximum that makes its "
                   "region for IoU (default 0.5)")
    x.add_argument("--sanity", action="store_true", help="cascading model-randomization test (Adebayo et al. 2018)")
    x.add_argument("--shuffled-run", help="with --sanity: a run of the same model trained on shuffled labels "
                   "(data-randomization test)")
    x.add_argument("--sanity-images", type=int, default=32, help="images for --sanity (default 32)")
    x.add_argument("--store", action="store_true", help="with --boxes/--sanity: also add the results to the run's "
                   "metrics.json, model card and report")
    x.set_defaults(func=_cmd_explain)

    r = sub.add_parser("predict", help="class probabilities for images")
    r.add_argument("checkpoint")
    r.add_argument("images", nargs="+")
    r.add_argument("--json", action="store_true", help="one JSON object per line")
    r.add_argument("--onnx", action="store_true", help="CHECKPOINT is an exported .onnx model: run it in onnxruntime")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=_cmd_predict)

    s = sub.add_parser("sharpness", help="estimate max L(w+e) - L(w) over ||e|| <= rho on fixed training batches")
    s.add_argument("checkpoint")
    s.add_argument("--rho", type=float, default=0.05)
    s.add_argument("--data", help="images to measure on (default: the run's training split)")
    s.add_argument("--batches", type=int, default=4, help="batches of 64 images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-write", action="store_true", help="do not add the result to the run's metrics.json")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cmd_sharpness)

    o = sub.add_parser("export", help="export a checkpoint to ONNX (checked against PyTorch with onnxruntime)")
    o.add_argument("checkpoint")
    o.add_argument("--out", required=True, help="the .onnx file to write")
    o.add_argument("--opset", type=int, default=18)
    o.set_defaults(func=_cmd_export)

    v = sub.add_parser("serve", help="web page and REST API for a checkpoint (/health, /predict, /explain)")
    v.add_argument("checkpoint")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only; any other "
                   "address needs --allow-remote)")
    v.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (put the server behind a proxy with auth and TLS)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--device", default="auto")
    v.add_argument("--no-page", action="store_true", help="REST API only, no web page")
    v.add_argument("--onnx", action="store_true",
                   help="CHECKPOINT is an exported .onnx model: serve it in onnxruntime (predictions, no explanations)")
    v.add_argument("--max-batch", type=int, default=32, help="most images in one model call (default 32)")
    v.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5 ms)")
    v.add_argument("--queue-limit", type=int, default=256,
                   help="most requests inside the server at once; more are answered 429 with Retry-After (default 256)")
    v.add_argument("--no-batching", action="store_true", help="answer each request on its own (one model call each)")
    v.set_defaults(func=_cmd_serve)

    c = sub.add_parser("compare", help="compare finished runs: table, ROC curves, recall bars, diversity")
    c.add_argument("runs", nargs="+", help="run folders")
    c.add_argument("--out", required=True)
    c.add_argument("--no-speed", action="store_true", help="skip timing each model")
    c.set_defaults(func=_cmd_compare)

    n = sub.add_parser("ensemble", help="combine finished runs (fit on validation predictions only)")
    n.add_argument("runs", nargs="+", help="run folders")
    n.add_argument("--method", default="soft", choices=METHODS)
    n.add_argument("--meta", default="logistic", choices=["logistic", "mlp"], help="stacking's meta-learner")
    n.add_argument("--out", required=True)
    n.set_defaults(func=_cmd_ensemble)

    m = sub.add_parser("models", help="medsight's recommended backbones (or any of timm's with a pattern)")
    m.add_argument("pattern", nargs="?", help="wildcard filter over timm's registry, e.g. 'convnext*'")
    m.add_argument("--all", action="store_true", help="every timm model")
    m.add_argument("--params", action="store_true", help="build each and print its parameter count")
    m.set_defaults(func=_cmd_models)
    return p


class _ConsoleHandler(logging.Handler):
    """Library log records to the console: information to stdout (through tqdm, so progress bars stay
    intact), warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        msg = self.format(record)
        if record.levelno >= logging.WARNING:
            tqdm.write(f"WARNING: {msg}", file=sys.stderr)
        else:
            tqdm.write(msg, file=sys.stdout)


@contextlib.contextmanager
def _console_logging(verbose: bool) -> Iterator[None]:
    """The CLI decides what the console shows: medsight's INFO lines (DEBUG with -v); the logger's previous
    set-up is restored afterwards, so calling ``main`` from Python leaves logging as it found it."""
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("medsight")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. An expected error (:class:`medsight.errors.MedsightError`: a bad option, a missing
    file, unusable data) prints as one line and returns 2; any other exception is a bug and propagates with
    its traceback."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if getattr(args, "resume", False) and not getattr(args, "out", None):
        print("medsight: error: --resume needs --out, the run folder to continue", file=sys.stderr)
        return 2
    try:
        with _console_logging(args.verbose):
            return args.func(args)
    except MedsightError as exc:
        print(f"medsight: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
