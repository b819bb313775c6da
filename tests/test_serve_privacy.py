"""What the server keeps (nothing beyond the request) and what it sends (no analytics), probed as a user
would: `medsight serve` in its own process, real uploads to Gradio's upload endpoint, a real run of the page."""

from __future__ import annotations

import io
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.serve import MAX_UPLOAD_BYTES

from conftest import blob_image, start_server

CYRILLIC = ["норма", "пневмония"]  # outside Latin-1, which HTTP headers are limited to


def _png(label: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_image(label, np.random.default_rng(seed))).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """`medsight serve CKPT` in its own process with its own temporary folder (TMPDIR)."""

    def __init__(self, checkpoint: Path, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc, self.url = start_server([str(checkpoint)], env={"TMPDIR": str(tmp)})

    def upload_folders(self) -> list[Path]:
        return sorted(self.tmp.glob("medsight-uploads-*"))

    def files(self) -> list[Path]:
        return [p for d in self.upload_folders() for p in d.rglob("*") if p.is_file()]

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM, as a service manager or Ctrl-C stops it
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def cyrillic_checkpoint(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's checkpoint with class names outside Latin-1 (training accepts such names)."""
    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    ckpt["classes"] = list(CYRILLIC)
    ckpt["task"] = {**ckpt["task"], "classes": list(CYRILLIC)}
    path = tmp_path_factory.mktemp("cyrillic") / "best.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def server(cyrillic_checkpoint, tmp_path_factory):
    s = Server(cyrillic_checkpoint, tmp_path_factory.mktemp("server_tmp"))
    yield s
    s.stop()


def test_gradio_config_reports_analytics_off(server):
    import httpx

    config = httpx.get(f"{server.url}/config", timeout=30)  # Gradio 6 serves its page config here
    assert config.status_code == 200, config.text[:200]
    assert config.json()["analytics_enabled"] is False


def test_gradio_upload_over_the_size_limit_is_refused_and_not_kept(server):
    import httpx

    too_big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    r = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("big.png", too_big)}, timeout=120)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert not [p for p in server.files() if p.stat().st_size > 0], server.files()


def test_uploads_live_in_a_private_folder(server):
    import httpx

    r = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("scan.png", _png(1))}, timeout=60)
    assert r.status_code == 200, r.text
    (token,) = r.json()
    (folder,) = server.upload_folders()  # under the server's own TMPDIR, not a shared /tmp/gradio
    assert str(folder) not in r.text and "/" not in token and "scan" not in token  # an opaque name, no path
    stored = folder / token
    assert stored.is_file() and stored.read_bytes() == _png(1)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_explain_sends_non_latin1_class_names_percent_encoded(server):
    import httpx

    r = httpx.post(f"{server.url}/explain", files={"file": ("a.png", _png(1))}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    label = r.headers["x-label"]
    assert label.isascii() and unquote(label) in CYRILLIC
    assert unquote(label) == httpx.post(f"{server.url}/predict", files={"file": ("a.png", _png(1))}).json()["label"]


def test_page_run_leaves_no_upload_behind_and_shutdown_removes_the_folder(cyrillic_checkpoint, tmp_path):
    from gradio_client import Client, handle_file

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / "server_tmp" / f"medsight-uploads-{int(dead.stdout)}-left"  # from a server killed earlier
    (orphan / "abc").mkdir(parents=True)
    (orphan / "abc" / "scan.png").write_bytes(_png(0))
    s = Server(cyrillic_checkpoint, tmp_path / "server_tmp")
    assert not orphan.exists()  # a new server removes what a killed one (no clean-up on SIGKILL) left
    try:
        image = tmp_path / "patient_scan.png"
        image.write_bytes(_png(1, seed=3))
        client = Client(f"{s.url}/", verbose=False)
        try:  # the page's own endpoint: the client uploads through /gradio_api/upload, then runs the page
            probs, overlay, verdict = client.predict(handle_file(str(image)), "gradcam", api_name="/run")
        finally:
            client.close()
        assert probs["label"] in CYRILLIC and f"Prediction: {probs['label']}" in verdict
        assert overlay.startswith('<img alt="Grad-CAM overlay" src="data:image/png;base64,')  # inline, not a file
        (folder,) = s.upload_folders()
        assert s.files() == []  # the upload was deleted once read; nothing else was written
    finally:
        code = s.stop()
    assert code in (0, -15), s.proc.stdout.read()
    assert not folder.exists() and s.upload_folders() == []
