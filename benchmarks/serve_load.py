"""Load on the REST API: N concurrent POST /predict against `medsight serve`, throughput and latency.

    python benchmarks/serve_load.py RUN/best.pt [--requests 50] [--concurrency 50]

Starts the server as a user would (its own process, 127.0.0.1), checks every answer against a
sequential one, and writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import platform
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

from _results import save_result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=50)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "medsight", "serve", args.checkpoint, "--port", str(port),
                             "--no-page", "--device", "cpu"])
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        rng = np.random.default_rng(0)
        payloads = []
        for _ in range(args.requests):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8)).save(buf, format="PNG")
            payloads.append(buf.getvalue())
        with httpx.Client() as c:
            reference = [c.post(f"{url}/predict", files={"file": ("x.png", b)}).json()["label"] for b in payloads]

        def post(b: bytes) -> tuple[float, int, str]:
            t0 = time.perf_counter()
            with httpx.Client(timeout=300) as c:
                r = c.post(f"{url}/predict", files={"file": ("x.png", b)})
            return time.perf_counter() - t0, r.status_code, r.json().get("label", "")

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(post, payloads))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = [a[0] for a in answers]
    result = {"requests": args.requests, "concurrency": args.concurrency,
              "all_ok": all(a[1] == 200 for a in answers),
              "all_match_sequential": all(a[2] == r for a, r in zip(answers, reference)),
              "throughput_req_per_s": round(args.requests / wall, 1),
              "latency_ms_p50": round(1000 * float(np.percentile(lat, 50)), 1),
              "latency_ms_p95": round(1000 * float(np.percentile(lat, 95)), 1),
              "image": "224x224 8-bit PNG",
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores"}
    save_result("serve_load.json", result)
    return 0 if result["all_ok"] and result["all_match_sequential"] else 1


if __name__ == "__main__":
    sys.exit(main())
