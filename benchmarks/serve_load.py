"""Load on the REST API: concurrent clients POSTing /predict to `medsight serve`, one answer at a time
(batching off) against micro-batches, for the checkpoint and its ONNX export: throughput and latency.

    python benchmarks/serve_load.py RUN/best.pt [--requests 500] [--concurrency 50] [--modes sequential batched onnx]
    python benchmarks/serve_load.py RUN/best.pt --quick      # a smoke test: 60 requests, 10 clients

Each mode starts the server as a user would (its own process, 127.0.0.1, REST API only); the servers stay up
side by side and the modes take turns (A B C A B C ..., ``--repeats`` rounds): each figure is the median of
the rounds with its range, and the speed-up is the median of each round's ratio. Every answer is checked
against the answer the server without batching gives to the same image sent alone. Writes
benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from _results import positive_int, save_result

#: mode -> the serve flags that make it
MODES = {"sequential": ["--no-batching"], "batched": [], "onnx": ["--onnx"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`medsight serve MODEL FLAGS` in its own process, until the ``with`` block ends."""

    def __init__(self, model: str, flags: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "medsight", "serve", model, "--port", str(self.port),
                                      "--no-page", "--device", "cpu", *flags])

    def __enter__(self) -> "Server":
        for _ in range(480):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.25)
        raise RuntimeError("the server did not start in 2 minutes")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def payloads(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def sequential_answers(url: str, images: list[bytes]) -> list[dict[str, float]]:
    with httpx.Client(timeout=60) as c:
        return [c.post(f"{url}/predict", files={"file": ("x.png", b)}).json()["probabilities"] for b in images]


def load(url: str, images: list[bytes], requests: int, concurrency: int, new_client: bool = False
         ) -> tuple[float, list[tuple[float, int, Any]]]:
    """``requests`` POSTs from ``concurrency`` clients (one connection each, or a new client per request
    with ``new_client``): (wall seconds, per request (latency, status, probabilities))."""
    local = threading.local()

    def post(i: int) -> tuple[float, int, Any]:
        if new_client or not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        t0 = time.perf_counter()
        r = local.client.post(f"{url}/predict", files={"file": ("x.png", images[i % len(images)])})
        return time.perf_counter() - t0, r.status_code, r.json().get("probabilities") if r.status_code == 200 else None

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, range(concurrency)))  # warm-up: every client connected, the model's first calls made
        t0 = time.perf_counter()
        answers = list(pool.map(post, range(requests)))
        wall = time.perf_counter() - t0
    return wall, answers


def _diffs(answers: list[tuple[float, int, Any]], reference: list[dict[str, float]]) -> tuple[float, bool]:
    """(max |Δp|, every label the same) of the answers against the reference answers of the same images."""
    worst, same = 0.0, True
    for i, (_, _, probs) in enumerate(answers):
        if probs is None:
            continue
        ref = reference[i % len(reference)]
        worst = max(worst, max(abs(probs[k] - ref[k]) for k in ref))
        same &= max(probs, key=probs.get) == max(ref, key=ref.get)
    return float(f"{worst:.2e}"), bool(same)


def summarize(wall: float, answers: list[tuple[float, int, Any]], alone: list[dict[str, float]],
              pytorch: list[dict[str, float]]) -> dict[str, Any]:
    """Throughput, latency, and the answers against each image sent alone to the same server (``alone``)
    and to the PyTorch server without batching (``pytorch``, today's answer)."""
    lat = [a[0] for a in answers]
    diff_alone, labels_alone = _diffs(answers, alone)
    diff_torch, labels_torch = _diffs(answers, pytorch)
    return {"all_ok": all(a[1] == 200 for a in answers), "statuses": sorted({a[1] for a in answers}),
            "throughput_req_per_s": round(len(answers) / wall, 1),
            "latency_ms_p50": round(1000 * float(np.percentile(lat, 50)), 1),
            "latency_ms_p95": round(1000 * float(np.percentile(lat, 95)), 1),
            "labels_match_alone": labels_alone, "max_abs_prob_diff_vs_alone": diff_alone,
            "labels_match_pytorch_sequential": labels_torch, "max_abs_prob_diff_vs_pytorch_sequential": diff_torch}


def median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one row: medians (with the throughput's range and every round's figure), answers
    checked in every round."""
    tp = [r["throughput_req_per_s"] for r in rounds]
    med = lambda k: round(float(np.median([r[k] for r in rounds])), 1)  # noqa: E731
    return {"all_ok": all(r["all_ok"] for r in rounds), "statuses": sorted({s for r in rounds for s in r["statuses"]}),
            "throughput_req_per_s": med("throughput_req_per_s"), "throughput_range": [min(tp), max(tp)],
            "throughput_rounds": tp, "latency_ms_p50": med("latency_ms_p50"), "latency_ms_p95": med("latency_ms_p95"),
            **{k: all(r[k] for r in rounds) for k in ("labels_match_alone", "labels_match_pytorch_sequential")},
            **{k: max(r[k] for r in rounds) for k in ("max_abs_prob_diff_vs_alone",
                                                      "max_abs_prob_diff_vs_pytorch_sequential")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--requests", type=positive_int, default=500)
    p.add_argument("--concurrency", type=positive_int, default=50)
    p.add_argument("--images", type=positive_int, default=50, help="distinct images, sent in turn")
    p.add_argument("--size", type=int, default=224, help="side of the PNG uploads")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds of the modes in turn (the median is reported)")
    p.add_argument("--quick", action="store_true", help="smoke test: 60 requests from 10 clients, 2 rounds")
    p.add_argument("--new-client-per-request", action="store_true",
                   help="the earlier benchmark's client: a new httpx.Client (tens of milliseconds of client CPU to "
                        "build its TLS context) for every request; on 2 cores that cost is measured along with the server")
    p.add_argument("--out", help="results file name under benchmarks/results (default serve_load[_quick].json)")
    args = p.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.images, args.repeats = 60, 10, 10, 2
    images = payloads(args.images, args.size)
    result: dict[str, Any] = {"requests": args.requests, "concurrency": args.concurrency,
                              "client": "a new httpx.Client per request" if args.new_client_per_request
                              else "one httpx.Client (connection) per concurrent client",
                              "image": f"{args.size}x{args.size} 8-bit PNG, {args.images} distinct",
                              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                              "repeats": args.repeats, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = {"sequential": args.checkpoint, "batched": args.checkpoint}
        if "onnx" in args.modes:
            from medsight.inference import export_onnx

            models["onnx"] = str(Path(tmp) / "model.onnx")
            export_onnx(args.checkpoint, models["onnx"])
        order = ["sequential", *[m for m in args.modes if m != "sequential"]]
        servers = {m: stack.enter_context(Server(models[m], MODES[m])) for m in order}
        alone = {m: sequential_answers(servers[m].url, images) for m in order}  # each image alone: a batch of one
        pytorch = alone["sequential"]  # PyTorch without batching: today's answers
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                rounds[mode].append(summarize(*load(servers[mode].url, images, args.requests, args.concurrency,
                                                    args.new_client_per_request), alone[mode], pytorch))
        for mode in args.modes:
            result["modes"][mode] = {"settings": httpx.get(f"{servers[mode].url}/health").json()["batching"],
                                     **median_row(rounds[mode])}
    for mode in args.modes:
        if "sequential" in rounds and mode != "sequential":
            ratios = [a["throughput_req_per_s"] / b["throughput_req_per_s"]
                      for a, b in zip(rounds[mode], rounds["sequential"])]
            result["modes"][mode]["speedup_vs_sequential"] = round(float(np.median(ratios)), 2)
            result["modes"][mode]["speedup_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    result["targets"] = ("batched: >= 4x sequential and >= 110 requests/s with p95 <= 500 ms; every answer as the "
                         "same server gives for the image alone (|dp| <= 1e-5, same label)")
    save_result(args.out or ("serve_load_quick.json" if args.quick else "serve_load.json"), result)
    good = all(r["all_ok"] and r["labels_match_alone"] and r["max_abs_prob_diff_vs_alone"] <= 1e-5
               for r in result["modes"].values())
    return 0 if good else 1

if __name__ == "__main__":
    sys.exit(main())
