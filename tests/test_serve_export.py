"""The served model (REST API in a real server process, web page in a real browser) and ONNX export."""

import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.api import predict
from medsight.inference import Predictor
from medsight.cli import main
from medsight.inference import ExportError, OnnxPredictor, export_onnx

from conftest import blob_image, free_port


def png_bytes(label: int, size: int = 28, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_image(label, np.random.default_rng(seed))).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ ONNX

def test_onnx_export_matches_pytorch_and_predict_uses_it(tiny_run, tmp_path, capsys):
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(tiny_run / "best.pt"), "--out", str(onnx_path)]) == 0
    assert "max |Δp|" in capsys.readouterr().out
    ort_pred, torch_pred = OnnxPredictor(onnx_path), Predictor(tiny_run / "best.pt", "cpu")
    assert ort_pred.classes == torch_pred.classes and ort_pred.image_size == torch_pred.image_size
    for label in (0, 1):
        img = torch.from_numpy(np.array(Image.open(io.BytesIO(png_bytes(label))))).float()[None] / 255
        np.testing.assert_allclose(ort_pred.probabilities(img), torch_pred.probabilities(img), atol=1e-4)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        (images / f"x{i}.png").write_bytes(png_bytes(i % 2, seed=i))
    via_onnx = predict(onnx_path, [images])
    via_torch = predict(tiny_run / "best.pt", [images], device="cpu")
    for a, b in zip(via_onnx, via_torch):
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) <= 1e-4
    assert main(["predict", str(onnx_path), str(images / "x0.png"), "--onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] == via_torch[0]["label"]


def test_onnx_bad_inputs(tiny_run, tmp_path, capsys):
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a loadable ONNX model"):
        OnnxPredictor(not_onnx)
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------ REST API

@pytest.fixture(scope="module")
def server(tiny_run):
    """`medsight serve` in its own process, as a user starts it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medsight", "serve", str(tiny_run / "best.pt"), "--port",
                             str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_health_predict_explain(server, tiny_run):
    import httpx

    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["classes"] == ["normal", "pneumonia"]
    r = httpx.post(f"{server}/predict", files={"file": ("a.png", png_bytes(1), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = Predictor(tiny_run / "best.pt", "cpu").probabilities(
        torch.from_numpy(np.array(Image.open(io.BytesIO(png_bytes(1))))).float()[None] / 255)
    assert body["label"] == ["normal", "pneumonia"][int(expected.argmax())]
    assert body["probabilities"]["pneumonia"] == pytest.approx(float(expected[1]), abs=1e-5)
    r = httpx.post(f"{server}/explain", files={"file": ("a.png", png_bytes(1), "image/png")},
                   data={"method": "gradcam++"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.width == 2 * img.height  # original beside overlay
    border = r.headers["x-border-score"]
    assert border == "n/a" or 0 <= float(border) <= 1  # n/a: an empty map


def test_bad_uploads_get_4xx_and_the_server_keeps_serving(server, tmp_path):
    import httpx

    from pydicom import examples

    ds = examples.ct
    del ds.PixelData
    dcm = tmp_path / "nopixels.dcm"
    ds.save_as(dcm)
    huge = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(huge, format="PNG")
    cases = [("notes.txt", b"hello, not an image", 400, "not a readable image"),
             ("empty.png", b"", 400, "empty"),
             ("huge.png", huge.getvalue(), 413, "too large"),
             ("nopixels.dcm", dcm.read_bytes(), 400, "pixel")]
    for name, data, code, words in cases:
        r = httpx.post(f"{server}/predict", files={"file": (name, data)}, timeout=60)
        assert r.status_code == code, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert words in detail.lower() and name in detail, (name, detail)  # the cause, and which file
        assert " at 0x" not in detail, detail  # no Python object reprs in what a client sees
    r = httpx.post(f"{server}/explain", files={"file": ("a.png", png_bytes(0))}, data={"method": "magic"})
    assert r.status_code == 400 and "unknown method" in r.json()["detail"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_real_dicom_is_predicted(server):
    import httpx
    from pydicom import examples

    for name in ("ct", "mr"):
        data = Path(examples.get_path(name)).read_bytes()
        r = httpx.post(f"{server}/predict", files={"file": (f"{name}.dcm", data, "application/dicom")})
        assert r.status_code == 200, r.text
        assert abs(sum(r.json()["probabilities"].values()) - 1) < 1e-5


def test_fifty_concurrent_predictions_all_answered_correctly(server):
    import httpx

    payloads = [png_bytes(i % 2, seed=i) for i in range(50)]
    with httpx.Client() as c:
        sequential = [c.post(f"{server}/predict", files={"file": ("x.png", p)}).json()["probabilities"]
                      for p in payloads]

    def post(p):
        with httpx.Client(timeout=120) as c:
            return c.post(f"{server}/predict", files={"file": ("x.png", p)})

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, payloads))
    assert all(a.status_code == 200 for a in answers)
    for a, ref in zip(answers, sequential):
        got = a.json()["probabilities"]
        assert all(abs(got[k] - ref[k]) < 1e-5 for k in ref)


# ------------------------------------------------------------------------------------------ web page

def _chromium() -> str | None:
    return os.environ.get("MEDSIGHT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_web_page_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    browser_path = _chromium()
    assert browser_path, "Chromium is needed for the browser test (.ci/run installs Debian's chromium)"
    image = tmp_path / "xray.png"
    image.write_bytes(png_bytes(1, size=64))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server + "/", timeout=60_000)
        page.get_by_text("not for clinical use").first.wait_for(timeout=60_000)
        page.locator("#upload input[type=file]").set_input_files(str(image))
        page.wait_for_timeout(1000)
        page.locator("#run").click()
        verdict = page.locator("#verdict")
        verdict.get_by_text("Prediction:").wait_for(timeout=60_000)
        text = verdict.inner_text()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    import httpx

    api = httpx.post(f"{server}/predict", files={"file": ("xray.png", image.read_bytes())}).json()
    assert f"Prediction: {api['label']}" in text  # the page shows what the API answers for the same file
    assert (tmp_path / "page.png").stat().st_size > 10_000
