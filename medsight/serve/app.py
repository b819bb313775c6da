"""The REST API (FastAPI), with the web page mounted at ``/``.

    GET  /health    -> {"status": "ok", "model": NAME, "classes": [...], "task": KIND}
    POST /predict   multipart field ``file``              -> the task's record: {"label", "probabilities": {...}}
    POST /explain   multipart ``file`` [+ form ``method``, ``target`` (a class or finding name)] -> PNG: the image
                    beside the Grad-CAM overlay of ``target`` (default: the decided class, or the most probable
                    finding); headers X-Label, X-Explained, X-Probability, X-Border-Score (X-Findings for multi-label)
    GET  /          the web page: upload PNG/JPEG/DICOM, see probabilities, the overlay and any warning

Endpoints are plain (sync) functions: FastAPI runs them in its worker threads, so model work never
blocks the event loop and requests are served concurrently. Typed errors map to status codes
(``medsight.serve.service.STATUS``); the server keeps serving after any bad upload.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from medsight.serve.service import MAX_UPLOAD_BYTES, NOTICE, STATUS, Service

__all__ = ["create_app", "serve"]


def _header(text: str) -> str:
    """HTTP headers are Latin-1: non-ASCII class names are sent percent-encoded (UTF-8)."""
    return text if text.isascii() else quote(text)


def create_app(checkpoint: str | Path, device: str = "auto", page: bool = True) -> Any:
    """The FastAPI application (REST API, with the Gradio page mounted at ``/`` when ``page``).

    The REST API reads each upload into memory and keeps nothing. The page's uploads go to a private
    folder that is emptied as they are read and removed when the app shuts down (``page.UploadFolder``);
    Gradio's upload endpoint refuses files over ``MAX_UPLOAD_BYTES`` (413).
    """
    service = Service(checkpoint, device)
    uploads = None
    if page:
        from medsight.serve.page import UploadFolder

        uploads = UploadFolder()  # before Gradio builds anything: it points Gradio's file cache there

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if uploads is not None:
                uploads.remove()

    app = FastAPI(title="medsight", description=NOTICE, lifespan=lifespan)

    for exc_type, code in STATUS:
        def handler(_: Request, exc: Exception, code: int = code) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=code)
        app.add_exception_handler(exc_type, handler)

    def read(file: UploadFile) -> Any:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        return service.decode(data, file.filename or "upload")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.info

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:
        return {"file": file.filename, **service.predict(read(file))}

    @app.post("/explain")
    def explain(file: UploadFile = File(...), method: str = Form("gradcam"), target: str = Form("")) -> Response:
        img = read(file)
        png, meta = service.explain_png(img, method, target or None)
        border = meta["border_score"]
        headers = {"X-Label": _header(meta["label"]), "X-Explained": _header(meta["explained"]),
                   "X-Probability": f"{meta['probabilities'][meta['explained']]:.6f}",
                   "X-Border-Score": f"{border:.6f}" if border == border else "n/a", "X-Method": method}
        if "findings" in meta:  # multi-label: every finding above its threshold
            headers["X-Findings"] = _header("|".join(meta["findings"]))
        return Response(png, media_type="image/png", headers=headers)

    if page:
        import gradio as gr

        from medsight.serve.page import build_page

        app = gr.mount_gradio_app(app, build_page(service, uploads), path="/", max_file_size=MAX_UPLOAD_BYTES)
    return app


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          page: bool = True) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    app = create_app(checkpoint, device, page=page)
    uvicorn.run(app, host=host, port=port, log_level="warning")
