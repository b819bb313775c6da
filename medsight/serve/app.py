"""The REST API (FastAPI), with the web page mounted at ``/``.

    GET  /health    -> {"status": "ok", "model": NAME, "classes": [...], "task": KIND}
    POST /predict   multipart field ``file``              -> the task's record: {"label", "probabilities": {...}}
    POST /explain   multipart ``file`` [+ form ``method``, ``target`` (a class or finding name)] -> PNG: the image
                    beside the Grad-CAM overlay of ``target`` (default: the decided class, or the most probable
                    finding); headers X-Label, X-Explained, X-Probability, X-Border-Score (X-Findings for multi-label)
    GET  /          the web page: upload PNG/JPEG/DICOM, see probabilities, the overlay and any warning

No model work runs on the event loop. With batching on (the default), ``/predict`` decodes and fits the
upload in a worker thread and waits for the next micro-batch (``medsight.serve.batching``); with it off,
and for ``/explain``, the endpoint is a plain function that FastAPI runs in its worker threads. At most
``queue_limit`` requests are inside at once: one more is answered 429 with ``Retry-After`` before its
body is read. Typed errors map to status codes (``medsight.serve.service.STATUS``); the server keeps
serving after any bad upload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.concurrency import run_in_threadpool

from medsight.serve.batching import Admission, BatchSettings, ServerBusyError
from medsight.serve.service import MAX_UPLOAD_BYTES, NOTICE, STATUS, Service

__all__ = ["create_app", "serve"]


def _header(text: str) -> str:
    """HTTP headers are Latin-1: non-ASCII class names are sent percent-encoded (UTF-8)."""
    return text if text.isascii() else quote(text)


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: The endpoints that run the model; the page, /health and the docs are never refused.
_BOUNDED = ("/predict", "/explain")


class AdmissionLimit:
    """ASGI middleware: a model request past the admission limit gets 429 with ``Retry-After`` at once,
    before its upload is read, so a flood costs the server almost nothing."""

    def __init__(self, app: Any, admission: Admission) -> None:
        self.app, self.admission = app, admission

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope["path"] not in _BOUNDED:
            await self.app(scope, receive, send)
            return
        try:
            self.admission.enter()
        except ServerBusyError as exc:
            await JSONResponse({"detail": str(exc)}, status_code=429,
                               headers={"Retry-After": str(exc.retry_after)})(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()


def create_app(checkpoint: str | Path, device: str = "auto", page: bool = True, onnx: bool | None = None,
               batching: BatchSettings | None = None) -> Any:
    """The FastAPI application (REST API, with the Gradio page mounted at ``/`` when ``page``).

    ``onnx`` serves an exported model in onnxruntime (default: when the file name ends in ``.onnx``);
    ``batching`` sets the micro-batches and the queue limit (:class:`BatchSettings`; default on).

    The REST API reads each upload into memory and keeps nothing. The page's uploads go to a private
    folder that is emptied as they are read and removed when the app shuts down (``page.UploadFolder``);
    Gradio's upload endpoint refuses files over ``MAX_UPLOAD_BYTES`` (413).
    """
    service = Service(checkpoint, device, onnx=onnx, batching=batching)
    uploads = None
    if page:
        from medsight.serve.page import UploadFolder

        uploads = UploadFolder()  # before Gradio builds anything: it points Gradio's file cache there

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()
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

    if service.batcher is not None:
        @app.post("/predict")
        async def predict(file: UploadFile = File(...)) -> dict[str, Any]:
            data = await file.read(MAX_UPLOAD_BYTES + 1)
            prepared = await run_in_threadpool(service.prepare, data, file.filename or "upload")
            return {"file": file.filename, **await asyncio.wrap_future(service.submit(prepared))}
    else:
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
    app.add_middleware(AdmissionLimit, admission=service.admission)
    app.state.service = service
    return app


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          page: bool = True, onnx: bool | None = None, batching: BatchSettings | None = None) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    app = create_app(checkpoint, device, page=page, onnx=onnx, batching=batching)
    uvicorn.run(app, host=host, port=port, log_level="warning")
