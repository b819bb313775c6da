"""What a hostile request, file or setting can make medsight do — probed as an attacker would.

Regression tests for "the server reads any image on the host": a page call naming a file outside the
server's uploads, by any spelling, is refused with one message before anything is read; page and REST
calls share one admission limit; every image format meets the same pixel limit before decoding; ONNX
metadata, task JSON, YAML configs, ``--set`` values and checkpoints are read without trusting them.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import pickle
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.checkpoint import CheckpointError, load_checkpoint
from medsight.config import MAX_CONFIG_BYTES, Config, ConfigError, apply_overrides, config_from_dict, load_config
from medsight.data.imageio import ImageReadError, ImageTooLargeError, pixel_limit, read_image_bytes
from medsight.serve.batching import ServerBusyError
from medsight.serve.uploads import REFUSED, UploadFolder, UploadRefusedError

from conftest import blob_image, start_server


def _png(label: int = 1, seed: int = 0, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_image(label, np.random.default_rng(seed), size)).save(buf, format="PNG")
    return buf.getvalue()


def _dicom(rows: int, cols: int, frames: int = 1, deflated: bool = False, pixels: bool = True) -> bytes:
    """An 8-bit DICOM whose header says rows × cols × frames (with that much pixel data, or two bytes)."""
    from pydicom import examples
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    ds = examples.ct.copy()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = rows, cols, 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(rows * cols * frames) if pixels else b"\0\0"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- --set

def test_set_values_read_by_yaml_1_2_and_the_field_type():
    cfg = apply_overrides(Config(), ["train.epochs=010", "data.path=0777", "model.name=0x1", "optim.lr=1e-3",
                                     "train.seed=+7", "data.class_names=[a, b]"])
    assert cfg.train.epochs == 10  # YAML 1.1: octal 8
    assert cfg.data.path == "0777" and cfg.model.name == "0x1"  # text fields keep what was typed
    assert cfg.optim.lr == 1e-3 and cfg.train.seed == 7 and cfg.data.class_names == ["a", "b"]


@pytest.mark.parametrize("item, message", [
    ("train.seed=1:30", "train.seed: expected an integer, got str '1:30'"),  # YAML 1.1: 90 (base 60)
    ("optim.lr=0x1", "optim.lr: expected a number, got str '0x1'"),  # YAML 1.1: 1
    ("train.epochs=0o7", "train.epochs: expected an integer"),
    ("train.class_weights=yes", "train.class_weights: expected true or false"),  # YAML 1.1: True
    ("out=*x", "--set out: .*anchors and aliases"),
])
def test_set_values_yaml_1_1_would_misread_are_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [item])


# -------------------------------------------------------------------------------------------- configs

def _laughs(depth: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines)


def test_yaml_alias_bomb_in_a_valid_key_is_refused_at_once(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text("data:\n  class_names: &top [a, b]\n" + _laughs().replace("\n", "\n# ") + "\n")
    bomb = tmp_path / "bomb.yaml"  # 9^9 strings once expanded
    bomb.write_text(_laughs() + "\ndata:\n  class_names: *a8\n")
    start = time.perf_counter()
    for p in (path, bomb):
        with pytest.raises(ConfigError, match=f"{p.name} is not valid YAML: YAML anchors and aliases"):
            load_config(p)
    assert time.perf_counter() - start < 5


def test_oversized_config_is_refused_before_parsing(tmp_path, monkeypatch):
    import medsight.config as config

    path = tmp_path / "huge.yaml"
    path.write_text("train:\n  epochs: 3\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    monkeypatch.setattr(config, "read_yaml", lambda text: pytest.fail("parsed an oversized file"))
    with pytest.raises(ConfigError, match=f"{path.name} is larger than {MAX_CONFIG_BYTES:,} bytes"):
        load_config(path)


def test_deep_nesting_and_huge_numbers_are_refused_not_crashed(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 20_000)
    with pytest.raises(ConfigError, match="deep.yaml is not valid YAML"):
        load_config(deep)
    with pytest.raises(ConfigError, match="train.epochs: .* is not a plain YAML value .*digits"):
        apply_overrides(Config(), ["train.epochs=" + "9" * 10_000])


def test_config_errors_never_repr_an_unbounded_value():
    huge = "x" * 1_000_000
    for attempt in (lambda: config_from_dict({"data": {"task": huge}}),
                    lambda: config_from_dict({"train": {"epochs": [huge] * 1000}}),
                    lambda: config_from_dict({huge: 1}),
                    lambda: apply_overrides(Config(), [f"train.epochs={huge}"]),
                    lambda: apply_overrides(Config(), [f"optim.{huge}=1"])):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert len(str(err.value)) < 1000, str(err.value)[:200]  # of a million characters


# ---------------------------------------------------------------------------------------- checkpoints

class _System:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_checkpoint_holding_code_is_reported_as_such(tmp_path):
    torch.save({"format": "medsight-checkpoint-1", "x": _System()}, tmp_path / "zip.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"x": _System()}, protocol=2))
    for name in ("zip.pt", "raw.pt"):
        with pytest.raises(CheckpointError, match=f"{name} holds code/objects, refused: .*system") as err:
            load_checkpoint(tmp_path / name)
        assert "truncated" not in str(err.value)
    data = (tmp_path / "zip.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is not a readable checkpoint \\(truncated"):
        load_checkpoint(tmp_path / "cut.pt")


# ---------------------------------------------------------------------------------------------- images

def test_every_format_meets_the_same_pixel_limit_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    assert pixel_limit() == 50_000
    assert read_image_bytes(_png(size=200), "ok.png").shape[-2:] == (200, 200)  # 40,000 pixels: within
    assert read_image_bytes(_dicom(200, 200), "ok.dcm").shape[-2:] == (200, 200)
    with pytest.raises(ImageTooLargeError, match="big.png: image too large .*90000 pixels.* 50000"):  # Pillow's check
        read_image_bytes(_png(size=300), "big.png")
    # the header alone is read: two bytes of pixel data would fail to decode with another error
    with pytest.raises(ImageTooLargeError, match="big.dcm: 300x300 pixels x 1 frame.* 50,000-pixel limit"):
        read_image_bytes(_dicom(300, 300, pixels=False), "big.dcm")
    with pytest.raises(ImageTooLargeError, match="frames.dcm: 100x100 pixels x 10 frame"):
        read_image_bytes(_dicom(100, 100, frames=10, pixels=False), "frames.dcm")
    with pytest.raises(ImageReadError, match="no pixel data|cannot decode"):
        read_image_bytes(_dicom(100, 100, pixels=False), "liar.dcm")  # within the limit: decoded, and refused


def test_a_deflated_dicom_bomb_is_refused_from_its_header():
    bomb = _dicom(10_000, 10_000, deflated=True)  # 100 megapixels in about 100 kB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLargeError, match="10000x10000 pixels"):
        read_image_bytes(bomb, "bomb.dcm")


# ------------------------------------------------------------------------------------------------ ONNX

META = {"medsight_classes": json.dumps(["normal", "pneumonia"]), "medsight_image_size": "32",
        "medsight_mean": "[0.5, 0.5, 0.5]", "medsight_std": "[0.25, 0.25, 0.25]", "medsight_model": "tiny",
        "medsight_task": json.dumps({"kind": "single_label", "classes": ["normal", "pneumonia"]})}


def _onnx(path: Path, size: int = 32, **meta: str) -> Path:
    """A two-class graph (channel means -> linear -> softmax) with medsight's metadata, ``meta`` overriding."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, -1.0] * 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for k, v in {**META, **meta}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


def test_valid_onnx_metadata_loads_and_predicts(tmp_path):
    from medsight.inference import OnnxPredictor

    p = OnnxPredictor(_onnx(tmp_path / "ok.onnx"))
    assert (p.classes, p.image_size) == (["normal", "pneumonia"], 32)
    assert set(p.predict(torch.rand(1, 48, 40))["probabilities"]) == {"normal", "pneumonia"}


@pytest.mark.parametrize("field, value, message", [
    ("medsight_image_size", "30000", "must be an integer from 16 to 2048"),
    ("medsight_image_size", "lots", "must be an integer from 16 to 2048"),
    ("medsight_image_size", "64", "disagrees with the graph's input shape"),
    ("medsight_classes", '"normal"', "must be a JSON list"),
    ("medsight_classes", '["a", "b", "c"]', "disagrees with the graph's 2 outputs|same classes"),
    ("medsight_mean", '["a", 1, 2]', "must be three finite numbers"),
    ("medsight_std", "[1, 0, 1]", "must be three finite numbers above 0"),
    ("medsight_task", '{"kind": "single_label", "classes": ["normal", "pn', "is not valid JSON"),
    ("medsight_task", '{"kind": "nope", "classes": ["normal", "pneumonia"]}', "is not a medsight task"),
    ("medsight_preprocess", '{"resize": "explode"}', "is not a valid preprocessing setting"),
    ("medsight_preprocess", '{"evil": 1}', "must be a JSON object of"),
    ("medsight_clahe_clip", "-1", "is not a valid preprocessing setting"),
])
def test_bad_onnx_metadata_names_the_file_and_the_field(tmp_path, field, value, message):
    from medsight.inference import ExportError, OnnxPredictor

    path = _onnx(tmp_path / "bad.onnx", **{field: value})
    with pytest.raises(ExportError, match=message) as err:
        OnnxPredictor(path)
    assert str(path) in str(err.value) and (field in str(err.value) or "medsight_task" in str(err.value))


# --------------------------------------------------------------------------------------------- uploads

def test_upload_folder_resolves_only_its_own_tokens(tmp_path):
    folder = UploadFolder(ttl_s=60)
    try:
        token = folder.store(io.BytesIO(_png()), "C:\\scans\\chest.png", len(_png()))
        assert folder.resolve(token) == (token, "chest.png")
        assert folder.resolve({"path": str(folder.stored_path(token))})[0] == token
        outside = tmp_path / "secret.png"
        outside.write_bytes(_png())
        (folder.path / "link").symlink_to(outside)  # planted inside the folder, pointing out
        for ref in (str(outside), str(tmp_path / "missing.png"), str(folder.path / "link"), "link",
                    f"{folder.path}/../{folder.path.name}/{token}x", str(folder.path / ".." / outside.name),
                    quote(str(folder.stored_path(token)), safe=""), token.upper() if token.upper() != token else "x",
                    {"url": f"/gradio_api/file={folder.stored_path(token)}"}, [token], None, "", 7):
            with pytest.raises(UploadRefusedError) as err:
                folder.resolve(ref)
            assert str(err.value) == REFUSED
        _, name, data = folder.read(token, limit=1 << 20)
        assert (name, data) == ("chest.png", _png()) and not folder.stored_path(token).exists()
        assert folder.read(token, limit=1 << 20)[2] is None  # read once
    finally:
        folder.remove()
    assert not folder.path.exists() and outside.exists()


def test_unread_uploads_expire_and_their_total_is_capped():
    folder = UploadFolder(ttl_s=0.3, max_pending_bytes=100)
    try:
        first = folder.store(io.BytesIO(b"x" * 60), "a.png", 60)
        with pytest.raises(ServerBusyError, match="unread uploads") as err:
            folder.store(io.BytesIO(b"y" * 60), "b.png", 60)
        assert err.value.retry_after >= 1 and len(list(folder.path.iterdir())) == 1
        deadline = time.monotonic() + 10
        while folder.stored_path(first).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not folder.stored_path(first).exists() and folder.pending_bytes == 0  # the sweeper deleted it
        assert folder.read(first, limit=100)[2] is None
        folder.store(io.BytesIO(b"y" * 60), "b.png", 60)  # room again
    finally:
        folder.remove()


# --------------------------------------------------------------------------------------- a real server

class _Server:
    def __init__(self, ckpt: Path, tmp: Path, *args: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.proc, self.url = start_server([str(ckpt), *args], env={"TMPDIR": str(tmp)}, timeout=600)
        import httpx

        self.http = httpx.Client(base_url=self.url, timeout=120)
        info = self.http.get("/gradio_api/info").json()["named_endpoints"]
        deps = self.http.get("/config").json()["dependencies"]
        self.endpoints = {name.lstrip("/"): [p["parameter_name"] for p in spec["parameters"]]
                          for name, spec in info.items()}
        self.fn_index = {d["api_name"]: d["id"] for d in deps if d.get("api_name")}

    @property
    def folder(self) -> Path:
        (folder,) = self.tmp.glob("medsight-uploads-*")
        return folder

    def upload(self, data: bytes, name: str = "scan.png") -> str:
        r = self.http.post("/gradio_api/upload", files={"files": (name, data)})
        assert r.status_code == 200, r.text
        return r.json()[0]

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _file(path: str, **extra) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, **extra}


def _args(params: list[str], file: object) -> list[object]:
    """A page endpoint's arguments: ``file`` where it takes the image, plausible values elsewhere."""
    return [file if p in ("file", "upload") or i == 0 else ("gradcam" if "method" in p else "normal")
            for i, p in enumerate(params)]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    s = _Server(tiny_run / "best.pt", tmp_path_factory.mktemp("server_tmp"))
    yield s
    s.stop()


def _post_every_way(server: _Server, endpoint: str, file: object) -> list:
    """The same page call through every route that runs it: /call, /call/v2, /run, /api and /queue/join."""
    params = server.endpoints[endpoint]
    data = _args(params, file)
    h = server.http
    return [h.post(f"/gradio_api/call/{endpoint}", json={"data": data}),
            h.post(f"/gradio_api/call/v2/{endpoint}", json=dict(zip(params, data))),
            h.post(f"/gradio_api/run/{endpoint}", json={"data": data}),
            h.post(f"/gradio_api/api/{endpoint}/", json={"data": data}),
            h.post("/gradio_api/queue/join", json={"data": data, "fn_index": server.fn_index[endpoint],
                                                   "session_hash": "probe", "event_data": None})]


def test_page_calls_naming_files_outside_the_uploads_are_refused_alike(server, tmp_path):
    secret = tmp_path / "patient.png"
    secret.write_bytes(_png(1, seed=5))
    (tmp_path / "notes.txt").write_text("not an image")
    token = server.upload(_png(0, seed=6))
    folder = server.folder
    link = folder / "planted"
    link.symlink_to(secret)
    before = sorted(p.name for p in folder.iterdir())
    rel = os.path.relpath(secret, folder)
    spellings = [
        _file(str(secret)), _file(str(tmp_path / "missing.png")), _file(str(tmp_path / "notes.txt")),
        _file(f"{folder}/{rel}"), _file(f"{folder}/{token}/../{rel}"), _file(str(link)), _file("planted"),
        _file(quote(str(secret), safe="")), _file("..\\..\\" + rel.replace("/", "\\")), _file("C:\\Windows\\win.ini"),
        _file(f"{token}/../../{rel}"), {"url": f"{server.url}/gradio_api/file={secret}",
                                       "meta": {"_type": "gradio.FileData"}},
        {"url": "https://example.org/scan.png"}, {"path": str(secret), "orig_name": token, "is_stream": False},
    ]
    assert set(server.endpoints) == {"receive", "run", "explain_finding"}  # every page endpoint is probed
    for endpoint in server.endpoints:
        for file in spellings:
            for r in _post_every_way(server, endpoint, file):
                assert (r.status_code, r.json()) == (400, {"detail": REFUSED}), (endpoint, file, r.text[:300])
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing was copied in
    link.unlink()


def test_an_upload_answers_through_every_route_and_no_answer_shows_the_folder(server):
    folder = str(server.folder)
    for route in ("call", "run", "api", "join"):
        token = server.upload(_png(1, seed=7))
        assert folder not in token and "/" not in token
        data = _args(server.endpoints["run"], _file(token, url="http://elsewhere/x", size=10**12, extra=[1]))
        h = server.http
        if route == "call":
            event = h.post("/gradio_api/call/run", json={"data": data})
            answer = h.get(f"/gradio_api/call/run/{event.json()['event_id']}").text
            assert "event: complete" in answer, answer[:300]
        elif route == "join":
            r = h.post("/gradio_api/queue/join", json={"data": [*data, None], "fn_index": server.fn_index["run"],
                                                       "session_hash": f"s{token[:8]}", "event_data": None})
            assert r.status_code == 200, r.text
            answer = h.get("/gradio_api/queue/data", params={"session_hash": f"s{token[:8]}"}).text
            assert "process_completed" in answer and '"success":true' in answer.replace(" ", ""), answer[:300]
        else:
            r = h.post(f"/gradio_api/{route}/run", json={"data": [*data, None]})  # the full inputs: the State too
            answer = r.text
            assert r.status_code == 200 and "Prediction" in answer, answer[:300]
        assert folder not in answer
    for path in ("/config", "/gradio_api/info", "/"):
        assert folder not in server.http.get(path).text


def test_gradio_routes_that_serve_or_fetch_files_are_closed(server):
    token = server.upload(_png(1, seed=8))
    stored = server.folder / token
    h = server.http
    for method, path in [("GET", f"/gradio_api/file={stored}"), ("HEAD", f"/gradio_api/file={stored}"),
                         ("GET", f"/gradio_api/file/{stored}"), ("GET", "/gradio_api/file=/etc/hostname"),
                         ("GET", "/gradio_api/proxy=https://example.org/x"), ("GET", "/monitoring"),
                         ("GET", "/gradio_api/run-history/buckets"), ("POST", "/gradio_api/process_recording"),
                         ("POST", "/gradio_api/component_server"), ("POST", "/gradio_api/stream/x"),
                         ("POST", "/gradio_api/vibe-edit"), ("GET", "/gradio_api/deep_link")]:
        assert h.request(method, path).status_code == 404, (method, path)
    assert stored.exists()  # still waiting for its page call


def test_more_files_than_an_endpoint_takes_are_refused(server):
    two = [("file", ("a.png", _png(0))), ("file", ("b.png", _png(1)))]
    h = server.http
    assert h.post("/predict", files=two).status_code == 400
    assert h.post("/explain", files=two).status_code == 400
    before = set(server.folder.iterdir())
    fifty = [("files", (f"{i}.png", _png(i % 2, seed=i))) for i in range(50)]
    r = h.post("/gradio_api/upload", files=fifty)
    assert r.status_code == 400 and "Too many files" in r.text
    assert set(server.folder.iterdir()) == before  # nothing stored
    a, b = server.upload(_png(0)), server.upload(_png(1))
    r = h.post("/gradio_api/call/run", json={"data": [[_file(a), _file(b)], "gradcam"]})
    assert r.status_code == 400 and "too many files" in r.text


def test_pixel_bombs_of_every_format_are_refused(server):
    png = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(png, format="PNG")  # 100 megapixels, about 100 kB
    bombs = {"bomb.png": png.getvalue(), "bomb.dcm": _dicom(10_000, 10_000, deflated=True)}
    h = server.http
    for name, data in bombs.items():
        r = h.post("/predict", files={"file": (name, data)})
        assert r.status_code == 413, (name, r.status_code, r.text[:200])
        token = server.upload(data, name)
        event = h.post("/gradio_api/call/run", json={"data": [_file(token), "gradcam"]})
        answer = h.get(f"/gradio_api/call/run/{event.json()['event_id']}").text
        assert "event: error" in answer and "pixel" in answer, answer[:300]


def test_page_and_rest_calls_share_the_queue_limit(tiny_run, tmp_path):
    s = _Server(tiny_run / "best.pt", tmp_path / "limited", "--queue-limit", "2")
    try:
        tokens = [s.upload(_png(i % 2, seed=i)) for i in range(16)]
        barrier = threading.Barrier(len(tokens) + 4)

        def page(token):
            import httpx

            with httpx.Client(base_url=s.url, timeout=120) as c:
                barrier.wait(timeout=120)
                r = c.post("/gradio_api/call/run", json={"data": [_file(token), "gradcam"]})
                if r.status_code != 200:
                    return r.status_code, r.headers.get("retry-after")
                return 200, "event: complete" in c.get(f"/gradio_api/call/run/{r.json()['event_id']}").text

        def rest(i):
            import httpx

            with httpx.Client(base_url=s.url, timeout=120) as c:
                barrier.wait(timeout=120)
                r = c.post("/explain", files={"file": ("x.png", _png(i % 2, seed=i))})
                return r.status_code, r.headers.get("retry-after") if r.status_code == 429 else True

        with concurrent.futures.ThreadPoolExecutor(len(tokens) + 4) as pool:
            pages, rests = pool.map(page, tokens), pool.map(rest, range(4))  # all submitted before any is awaited
            answers = list(pages) + list(rests)
        busy = [a for a in answers if a[0] == 429]
        assert len(busy) >= len(answers) // 2, answers  # two places: most of 20 simultaneous calls are turned away
        assert all(int(retry) >= 1 for _, retry in busy)
        assert all(ok is True for code, ok in answers if code == 200), answers
        token = s.upload(_png(1, seed=99))  # places freed when the calls ended
        event = s.http.post("/gradio_api/call/run", json={"data": [_file(token), "gradcam"]})
        assert event.status_code == 200
        assert "event: complete" in s.http.get(f"/gradio_api/call/run/{event.json()['event_id']}").text
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ CLI

def test_serve_refuses_a_remote_host_without_allow_remote(tiny_run, monkeypatch, capsys):
    import medsight.serve
    from medsight.cli import main

    ckpt = str(tiny_run / "best.pt")
    for host in ("0.0.0.0", "::", "192.168.1.20", "medsight.example.org"):
        assert main(["serve", ckpt, "--host", host]) == 2
        assert "--allow-remote" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(medsight.serve, "serve", lambda *a, **k: calls.append(k["host"]))
    assert main(["serve", ckpt, "--host", "0.0.0.0", "--allow-remote"]) == 0
    assert calls == ["0.0.0.0"] and "warning" in capsys.readouterr().err
    for host in ("127.0.0.1", "localhost", "::1"):
        assert main(["serve", ckpt, "--host", host]) == 0
        assert "warning" not in capsys.readouterr().err
    assert calls[1:] == ["127.0.0.1", "localhost", "::1"]
