"""The batching server: micro-batches, the admission limit (429), and `serve --onnx` in a real process."""

import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.inference import OnnxPredictor, export_onnx
from medsight.serve.batching import Admission, BatchSettings, MicroBatcher, ServerBusyError

from conftest import blob_image, start_server


def png_bytes(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_image(label, np.random.default_rng(seed))).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ batcher

def test_batcher_gathers_concurrent_items_and_keeps_their_order():
    sizes = []

    def double(items):
        sizes.append(len(items))
        return [2 * x for x in items]

    batcher = MicroBatcher(double, max_batch=4, max_wait_ms=200)
    try:
        futures = [batcher.submit(i) for i in range(10)]
        assert [f.result(timeout=10) for f in futures] == [2 * i for i in range(10)]
    finally:
        batcher.close()
    assert sum(sizes) == 10 and max(sizes) <= 4 and len(sizes) < 10  # gathered, never past max_batch
    assert (batcher.batches, batcher.images) == (len(sizes), 10)


def test_batcher_hands_an_error_to_its_batch_and_goes_on():
    def fail_on_negative(items):
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        return items

    batcher = MicroBatcher(fail_on_negative, max_batch=8, max_wait_ms=0)
    try:
        with pytest.raises(ValueError, match="negative input"):
            batcher.submit(-1).result(timeout=10)
        assert batcher.submit(3).result(timeout=10) == 3
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_batcher_refuses_a_wrong_number_of_results():
    batcher = MicroBatcher(lambda items: items[:1], max_batch=8, max_wait_ms=100)
    try:
        futures = [batcher.submit(i) for i in range(3)]
        with pytest.raises(RuntimeError, match="returned 1 results for 3 items"):
            futures[-1].result(timeout=10)
    finally:
        batcher.close()


def test_admission_refuses_past_its_limit_with_a_retry_time():
    gate = Admission(2)
    first = gate.ticket()
    gate.ticket()
    with pytest.raises(ServerBusyError, match="limit 2") as err:
        gate.ticket()
    assert err.value.retry_after >= 1
    first.release()
    first.release()  # giving a place back twice frees it once
    gate.ticket()  # a place freed: admitted again
    assert gate.inside == 2
    with pytest.raises(ServerBusyError):
        gate.ticket()


def test_a_held_place_is_given_back_at_its_deadline_or_earlier():
    gate = Admission(1)
    held = gate.ticket(hold_s=0.2)  # a queued page call whose function never runs
    with pytest.raises(ServerBusyError):
        gate.ticket()
    time.sleep(0.3)
    late = gate.ticket()  # the held place expired
    held.release()  # its late release frees nothing more
    assert gate.inside == 1
    late.release()
    assert gate.inside == 0


def test_batch_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="max_batch"):
        BatchSettings(max_batch=0)
    with pytest.raises(ValueError, match="queue_limit"):
        BatchSettings(queue_limit=0)


# ------------------------------------------------------------------------------------- real servers

class _Server:
    def __init__(self, *args: str) -> None:
        self.proc, self.url = start_server([*args, "--no-page"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def onnx_model(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_run / "best.pt", path)
    return path


def test_serve_onnx_batches_and_every_answer_is_the_sequential_one(onnx_model):
    import httpx

    server = _Server(str(onnx_model), "--onnx", "--max-batch", "8", "--batch-wait-ms", "50")
    try:
        health = httpx.get(f"{server.url}/health").json()
        assert health["runtime"] == "onnxruntime" and health["batching"]["max_batch"] == 8
        payloads = [png_bytes(i % 2, seed=i) for i in range(24)]
        local = OnnxPredictor(onnx_model)
        expected = [local.probabilities(torch.from_numpy(np.array(Image.open(io.BytesIO(p)))).float()[None] / 255)
                    for p in payloads]

        def post(p):
            with httpx.Client(timeout=120) as c:
                return c.post(f"{server.url}/predict", files={"file": ("x.png", p)})

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(post, payloads))
        for a, ref in zip(answers, expected):
            assert a.status_code == 200, a.text
            got = a.json()
            assert got["label"] == local.classes[int(ref.argmax())]
            assert max(abs(got["probabilities"][c] - float(ref[i])) for i, c in enumerate(local.classes)) < 1e-5
        stats = httpx.get(f"{server.url}/health").json()["batching"]
        assert stats["images_batched"] == 24 and stats["batches_run"] < 24  # answers came from shared batches
        r = httpx.post(f"{server.url}/explain", files={"file": ("x.png", payloads[0])})
        assert r.status_code == 501 and "ONNX" in r.json()["detail"]
    finally:
        server.stop()


def test_a_flood_past_the_queue_limit_gets_429_and_the_server_stays_up(tiny_run):
    import httpx

    # one place, and a batch that waits a second for company: whoever comes meanwhile is turned away
    server = _Server(str(tiny_run / "best.pt"), "--queue-limit", "1", "--batch-wait-ms", "1000")
    try:
        barrier = threading.Barrier(8)

        def post(i):
            with httpx.Client(timeout=60) as c:
                barrier.wait()
                return c.post(f"{server.url}/predict", files={"file": ("x.png", png_bytes(i % 2, seed=i))})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        codes = [a.status_code for a in answers]
        assert set(codes) == {200, 429}, codes
        busy = next(a for a in answers if a.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["detail"]
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        r = httpx.post(f"{server.url}/predict", files={"file": ("x.png", png_bytes(1, seed=99))}, timeout=60)
        assert r.status_code == 200 and server.proc.poll() is None
    finally:
        server.stop()


def test_batching_off_answers_as_batching_on(tiny_run):
    import httpx

    payloads = [png_bytes(i % 2, seed=i) for i in range(6)]
    answers = {}
    for flags in ((), ("--no-batching",)):
        server = _Server(str(tiny_run / "best.pt"), *flags)
        try:
            assert httpx.get(f"{server.url}/health").json()["batching"]["enabled"] is not bool(flags)
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers[flags] = list(pool.map(lambda p: httpx.post(f"{server.url}/predict", files={
                    "file": ("x.png", p)}, timeout=60).json()["probabilities"], payloads))
        finally:
            server.stop()
    for on, off in zip(answers[()], answers[("--no-batching",)]):
        assert max(abs(on[k] - off[k]) for k in off) < 1e-5


def test_the_heatmap_shows_the_output_the_prediction_decided(tiny_run, monkeypatch):
    """The explained class comes from the prediction the server answers with (TTA included), not from a second,
    plain model pass; a class the user names wins; an unknown name is refused."""
    from medsight.serve.service import Service, UnknownClassError

    service = Service(tiny_run / "best.pt", "cpu")
    classes = service.predictor.classes
    img = torch.rand(3, 32, 32)
    plain = service.predict(img)["label"]
    other = next(c for c in classes if c != plain)
    monkeypatch.setattr(service, "predict", lambda _img: {"label": other, "probabilities": {c: 0.5 for c in classes}})
    asked = []
    real_explain = service.explain
    monkeypatch.setattr(service, "explain", lambda im, m, i: asked.append(i) or real_explain(im, m, i))
    _, info = service.explain_png(img, "gradcam")
    assert asked == [classes.index(other)] and info["explained"] == other
    _, info = service.explain_png(img, "gradcam", target=plain)
    assert asked[-1] == classes.index(plain) and info["explained"] == plain
    assert service.explained_index({"label": other, "explained": plain}) == classes.index(plain)
    with pytest.raises(UnknownClassError, match="unknown class or finding 'nope'"):
        service.explain_png(img, "gradcam", target="nope")
