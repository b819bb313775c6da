"""The attacker's probe of `medsight serve`, re-run against the server as a user starts it (its own process,
127.0.0.1, web page on), with fresh files: what a request, a config or a model file can make medsight do.

    python benchmarks/security_probe.py RUN/best.pt

- file reads: every page endpoint listed by /gradio_api/info, through /call, /call/v2, /run, /api and
  /queue/join, naming a real radiograph outside the uploads, a missing file and a non-image by absolute,
  ``..``, symlinked, URL-encoded and Windows paths and by a FileData ``url`` — answers that read it, and
  how many distinct answers the spellings get (1: no existence oracle); any answer holding the upload folder
- admission: 30 simultaneous page calls and 10 REST calls under ``--queue-limit 2``
- uploads: 60 unread 5 MB uploads (the cap on unread uploads), 50 files in one request
- pixel bombs: PNG, JPEG and deflated DICOM of 13,000 x 13,000 and a 40-frame DICOM, through /predict and
  the page: status and the server's peak memory growth
- configs and model files, each in its own process: a YAML alias bomb inside a valid key, a 50 MB YAML, an
  ONNX file whose metadata says image_size=30000, a broken task JSON, a pickle checkpoint holding code, and
  ``--set train.epochs=010``: seconds, peak memory over the bare interpreter with medsight imported, message

Writes benchmarks/results/security_probe.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

from _results import save_result


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`medsight serve CKPT FLAGS` with the page, in its own process and its own TMPDIR."""

    def __init__(self, ckpt: str, tmp: Path, *flags: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        port = _port()
        self.tmp, self.url = tmp, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "medsight", "serve", ckpt, "--port", str(port),
                                      "--device", "cpu", *flags], env={**os.environ, "TMPDIR": str(tmp)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
        self.http = httpx.Client(base_url=self.url, timeout=300)
        info = self.http.get("/gradio_api/info").json()["named_endpoints"]
        self.endpoints = {n.lstrip("/"): [p["parameter_name"] for p in spec["parameters"]] for n, spec in info.items()}
        self.fn_index = {d["api_name"]: d["id"] for d in self.http.get("/config").json()["dependencies"]
                         if d.get("api_name")}
        (self.folder,) = tmp.glob("medsight-uploads-*")

    def rss_mb(self, peak: bool = False) -> float:
        key = "VmHWM" if peak else "VmRSS"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")

    def upload(self, data: bytes, name: str) -> httpx.Response:
        return self.http.post("/gradio_api/upload", files={"files": (name, data)})

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _png(size: int = 256, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _file(path: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, **extra}


def _args(params: list[str], file: Any) -> list[Any]:
    return [file if i == 0 else ("gradcam" if "method" in p else "normal") for i, p in enumerate(params)]


def _every_way(s: Server, endpoint: str, file: Any) -> list[httpx.Response]:
    params, h = s.endpoints[endpoint], s.http
    data = _args(params, file)
    return [h.post(f"/gradio_api/call/{endpoint}", json={"data": data}),
            h.post(f"/gradio_api/call/v2/{endpoint}", json=dict(zip(params, data))),
            h.post(f"/gradio_api/run/{endpoint}", json={"data": data}),
            h.post(f"/gradio_api/api/{endpoint}", json={"data": data}),
            h.post("/gradio_api/queue/join", json={"data": [*data, None], "fn_index": s.fn_index[endpoint],
                                                   "session_hash": "probe", "event_data": None})]


def _answer(s: Server, r: httpx.Response, endpoint: str) -> str:
    """The whole answer of a page call: the POST's, and for a queued call its event stream."""
    text = r.text
    if r.status_code == 200 and "event_id" in text:
        if "/call/" in str(r.request.url):
            text += s.http.get(f"/gradio_api/call/{endpoint}/{r.json()['event_id']}").text
        else:
            text += s.http.get("/gradio_api/queue/data", params={"session_hash": "probe"}).text
    return text


def probe_file_reads(s: Server, work: Path) -> dict[str, Any]:
    secret = work / "patient_scan.png"
    secret.write_bytes(_png(seed=11))
    (work / "notes.txt").write_text("not an image")
    link = work / "innocent.png"
    link.symlink_to(secret)
    token = s.upload(_png(seed=12), "mine.png").json()[0]
    rel = os.path.relpath(secret, s.folder)
    spellings = {
        "absolute": _file(str(secret)), "missing": _file(str(work / "missing.png")),
        "non-image": _file(str(work / "notes.txt")), "dotdot from the folder": _file(f"{s.folder}/{rel}"),
        "dotdot after a token": _file(f"{token}/../../{rel}"), "symlink": _file(str(link)),
        "url-encoded": _file(quote(str(secret), safe="")), "windows": _file("..\\..\\" + rel.replace("/", "\\")),
        "url only": {"url": f"{s.url}/gradio_api/file={secret}", "meta": {"_type": "gradio.FileData"}},
        "bare string": str(secret), "extra fields": _file(str(secret), orig_name="mine.png", size=1, is_stream=False),
        "bare missing": str(work / "missing.png"), "bare non-image": str(work / "notes.txt"),
    }
    # an existence oracle: the same route answering a file that exists, one that does not and a non-image apart
    trios = (("absolute", "missing", "non-image"), ("bare string", "bare missing", "bare non-image"))
    by_spelling: dict[tuple[str, int, str], str] = {}
    reads, statuses, bodies, leaks, calls = 0, Counter(), set(), 0, 0
    for endpoint in s.endpoints:
        for name, file in spellings.items():
            for route, r in enumerate(_every_way(s, endpoint, file)):
                calls += 1
                text = _answer(s, r, endpoint)
                norm = re.sub(r"[0-9a-f]{32}", "ID", text)
                for p in (str(secret), str(work / "missing.png"), str(work / "notes.txt")):
                    norm = norm.replace(p, "PATH")  # the client's own path echoed back is no oracle
                by_spelling[(endpoint, route, name)] = f"{r.status_code} {norm}"
                statuses[r.status_code] += 1
                bodies.add(r.text if r.status_code != 200 else "200")
                reads += ("Prediction" in text or '"label"' in text or "confidences" in text)
                leaks += str(s.folder) in text
    oracles = sorted({f"{e}/{route}" for (e, route, name) in by_spelling for trio in trios if name == trio[0]
                      and len({by_spelling[(e, route, n)] for n in trio}) > 1})
    copied = [p.name for p in s.folder.iterdir() if p.name != token and p.is_file()]
    return {"calls": calls, "endpoints": sorted(s.endpoints), "spellings": list(spellings), "answers_that_read_the_file":
            reads, "statuses": dict(statuses), "distinct_refusals": len(bodies), "answers_showing_the_folder": leaks,
            "existence_oracles": oracles, "files_copied_into_the_folder": len(copied)}


def probe_own_upload(s: Server) -> dict[str, Any]:
    r = s.upload(_png(seed=13), "scan.png")
    token = r.json()[0]
    event = s.http.post("/gradio_api/call/run", json={"data": [_file(token), "gradcam"]})
    answer = _answer(s, event, "run")
    return {"upload_answer_shows_folder": str(s.folder) in r.text, "run_completed": "event: complete" in answer,
            "run_answer_shows_folder": str(s.folder) in answer,
            "file_route_status": s.http.get(f"/gradio_api/file={s.folder / token}").status_code}


def probe_admission(ckpt: str, work: Path) -> dict[str, Any]:
    s = Server(ckpt, work / "limited", "--queue-limit", "2")
    try:
        tokens = [s.upload(_png(64, seed=i), "x.png").json()[0] for i in range(30)]
        barrier = threading.Barrier(40)

        def page(token: str) -> int:
            with httpx.Client(base_url=s.url, timeout=300) as c:
                barrier.wait(timeout=300)
                r = c.post("/gradio_api/call/run", json={"data": [_file(token), "gradcam"]})
                if r.status_code == 200:
                    c.get(f"/gradio_api/call/run/{r.json()['event_id']}")
                return r.status_code

        def rest(i: int) -> int:
            with httpx.Client(base_url=s.url, timeout=300) as c:
                barrier.wait(timeout=300)
                return c.post("/predict", files={"file": ("x.png", _png(64, seed=100 + i))}).status_code

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            pages_f = [pool.submit(page, t) for t in tokens]  # all 40 submitted before any is awaited
            rests_f = [pool.submit(rest, i) for i in range(10)]
            pages = [f.result() for f in pages_f]
            rests = [f.result() for f in rests_f]
        return {"queue_limit": 2, "page_calls": dict(Counter(pages)), "rest_calls": dict(Counter(rests))}
    finally:
        s.close()


def probe_uploads(s: Server) -> dict[str, Any]:
    blob = os.urandom(5 * 1024 * 1024)
    codes = Counter(s.upload(blob, f"{i}.png").status_code for i in range(60))
    held_mb = sum(p.stat().st_size for p in s.folder.iterdir()) / 2**20
    many = s.http.post("/gradio_api/upload", files=[("files", (f"{i}.png", _png(32, i))) for i in range(50)])
    predict50 = s.http.post("/predict", files=[("file", (f"{i}.png", _png(32, i))) for i in range(50)])
    return {"unread_5mb_uploads": dict(codes), "unread_mb_held": round(held_mb, 1),
            "fifty_files_upload_status": many.status_code, "fifty_files_predict_status": predict50.status_code}


def _bombs() -> dict[str, bytes]:
    from pydicom import examples
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    def dicom(rows: int, cols: int, frames: int, deflated: bool) -> bytes:
        ds = examples.ct.copy()
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 8, 8, 7
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = bytes(rows * cols * frames)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("L", (13_000, 13_000)).save(buf, fmt)
        out[f"bomb.{fmt.lower()}"] = buf.getvalue()
    out["bomb.dcm"] = dicom(13_000, 13_000, 1, deflated=True)
    out["frames.dcm"] = dicom(1_500, 1_500, 40, deflated=True)
    return out


def probe_bombs(s: Server) -> dict[str, Any]:
    result: dict[str, Any] = {}
    before = s.rss_mb()
    for name, data in _bombs().items():
        rest = s.http.post("/predict", files={"file": (name, data)})
        up = s.upload(data, name)
        event = s.http.post("/gradio_api/call/run", json={"data": [_file(up.json()[0]), "gradcam"]})
        answer = _answer(s, event, "run")
        result[name] = {"bytes": len(data), "predict_status": rest.status_code,
                        "page": "complete (200)" if "event: complete" in answer else "error",
                        "message": rest.json().get("detail", "")[:160]}
    result["server_rss_mb_before"] = round(before, 1)
    result["server_peak_rss_mb_after"] = round(s.rss_mb(peak=True), 1)
    return result


_CHILD = """
import json, resource, sys, time
import medsight.config, medsight.checkpoint, medsight.inference, torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    {code}
    out = "accepted"
except Exception as exc:
    out = f"{{type(exc).__name__}}: {{str(exc)[:300]}}"
print(json.dumps({{"seconds": round(time.perf_counter() - t, 2), "message": out, "value": locals().get("value"),
                  "peak_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, 1)}}))
"""


def _child(code: str, timeout: float = 300) -> dict[str, Any]:
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD.format(code=code)], capture_output=True, text=True,
                           timeout=timeout)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"seconds": timeout, "message": "timed out (hang)"}


def _tiny_onnx(path: Path, **meta: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image", "axes"], ["p"], keepdims=0),
         helper.make_node("MatMul", ["p", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["probabilities"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "s", "s"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, -1.0] * 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    base = {"medsight_classes": '["a", "b"]', "medsight_image_size": "32", "medsight_mean": "[0.5, 0.5, 0.5]",
            "medsight_std": "[0.2, 0.2, 0.2]", "medsight_task": '{"kind": "single_label", "classes": ["a", "b"]}'}
    for k, v in {**base, **meta}.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))


def probe_files(work: Path) -> dict[str, Any]:
    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (work / "laughs.yaml").write_text("\n".join(laughs) + "\ndata:\n  class_names: *a9\n")
    with (work / "big.yaml").open("w") as fh:
        fh.write("data:\n  class_names:\n")
        for i in range(50 * 1024 * 1024 // 16):
            fh.write(f"  - n{i:011d}\n")
    _tiny_onnx(work / "huge.onnx", medsight_image_size="30000")
    _tiny_onnx(work / "task.onnx", medsight_task='{"kind": "single_label", "classes": ["a", ')

    class _Code:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo must-never-run",))

    import torch

    torch.save({"format": "medsight-checkpoint-1", "x": _Code()}, work / "code.pt")
    return {
        "yaml_alias_bomb": _child(f"medsight.config.load_config({str(work / 'laughs.yaml')!r})"),
        "yaml_50mb": _child(f"medsight.config.load_config({str(work / 'big.yaml')!r})"),
        "onnx_image_size_30000": _child(f"medsight.inference.OnnxPredictor({str(work / 'huge.onnx')!r})"),
        "onnx_broken_task_json": _child(f"medsight.inference.OnnxPredictor({str(work / 'task.onnx')!r})"),
        "checkpoint_with_code": _child(f"medsight.checkpoint.load_checkpoint({str(work / 'code.pt')!r})"),
        "set_train_epochs_010": _child("value = medsight.config.load_config(None, ['train.epochs=010']).train.epochs"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {"command": "python benchmarks/security_probe.py RUN/best.pt",
                                  "machine": f"2-core {platform.machine()} CPU", "python": platform.python_version()}
        s = Server(args.checkpoint, work / "server")
        try:
            result["file_reads"] = probe_file_reads(s, work)
            result["own_upload"] = probe_own_upload(s)
            result["pixel_bombs"] = probe_bombs(s)
            result["uploads"] = probe_uploads(s)
        finally:
            s.close()
        result["admission"] = probe_admission(args.checkpoint, work)
        result["files"] = probe_files(work)
    result["seconds"] = round(time.time() - started, 1)
    save_result("security_probe.json", result)


if __name__ == "__main__":
    main()
