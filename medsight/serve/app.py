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
``queue_limit`` requests — REST calls, page uploads and page calls alike — are inside at once: one more
is answered 429 with ``Retry-After`` before its body is read (``medsight.serve.guard``). Typed errors map to status codes (``medsight.serve.service.STATUS``); the server keeps
serving after any bad upload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.concurrency import run_in_threadpool

from medsight.data.imageio import ImageTooLargeError
from medsight.serve.batching import BatchSettings
from medsight.serve.guard import UPLOAD, Guard
from medsight.serve.service import MAX_UPLOAD_BYTES, NOTICE, STATUS, Service
from medsight.serve.uploads import UploadFolder

__all__ = ["create_app", "serve"]


def _header(text: str) -> str:
    """HTTP headers are Latin-1: non-ASCII class names are sent percent-encoded (UTF-8)."""
    return text if text.isascii() else quote(text)


#: Multipart overhead allowed past the upload limit (boundaries, headers, the form fields of /explain).
_FORM_OVERHEAD = 64 * 1024
_ONE_FILE = {"max_files": 1, "max_fields": 0, "max_part_size": 1024}


def create_app(checkpoint: str | Path, device: str = "auto", page: bool = True, onnx: bool | None = None,
               batching: BatchSettings | None = None) -> Any:
    """The FastAPI application (REST API, with the Gradio page mounted at ``/`` when ``page``).

    ``onnx`` serves an exported model in onnxruntime (default: when the file name ends in ``.onnx``);
    ``batching`` sets the micro-batches and the queue limit (:class:`BatchSettings`; default on).

    The REST API reads each upload into memory and keeps nothing; a request with more than one file is
    refused (400), one over ``MAX_UPLOAD_BYTES`` too (413). The page's uploads go to a private folder under
    opaque names (``uploads.UploadFolder``), are deleted as they are read (unread ones after a while) and
    the folder is removed when the app shuts down. Every request passes ``guard.Guard``: one admission
    limit, file references only to this server's uploads, only the page routes the page uses.
    """
    service = Service(checkpoint, device, onnx=onnx, batching=batching)
    uploads = UploadFolder() if page else None  # before Gradio builds anything: it points Gradio's cache there
    app = FastAPI(title="medsight", description=NOTICE, lifespan=_lifespan(service, uploads))
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.info

    _add_predict(app, service)
    _add_explain(app, service)
    if uploads is not None:
        app = _mount_page(app, service, uploads)
    app.add_middleware(Guard, admission=service.admission, uploads=uploads)
    app.state.service = service
    return app


def _lifespan(service: Service, uploads: UploadFolder | None) -> Any:
    """The app's lifespan: on shutdown the service closes and the page's upload folder is removed."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()
            if uploads is not None:
                uploads.remove()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Each typed error answered with its status code (``service.STATUS``) and its message."""
    for exc_type, code in STATUS:
        def handler(_: Request, exc: Exception, code: int = code) -> JSONResponse:
            retry = getattr(exc, "retry_after", None)
            return JSONResponse({"detail": str(exc)}, status_code=code,
                                headers={"Retry-After": str(retry)} if retry is not None else None)
        app.add_exception_handler(exc_type, handler)


def _read(service: Service, file: UploadFile) -> Any:
    data = file.file.read(MAX_UPLOAD_BYTES + 1)
    return service.decode(data, file.filename or "upload")


#: The route settings of an endpoint taking one uploaded file.
_ONE_FILE_ROUTE = {"max_body_size": MAX_UPLOAD_BYTES + _FORM_OVERHEAD, "form_limits": _ONE_FILE}


def _add_predict(app: FastAPI, service: Service) -> None:
    """``POST /predict``: through the micro-batcher when batching is on, else a plain threaded call."""
    if service.batcher is not None:
        @app.post("/predict", **_ONE_FILE_ROUTE)
        async def predict(file: UploadFile = File(...)) -> dict[str, Any]:
            data = await file.read(MAX_UPLOAD_BYTES + 1)
            prepared = await run_in_threadpool(service.prepare, data, file.filename or "upload")
            return {"file": file.filename, **await asyncio.wrap_future(service.submit(prepared))}
    else:
        @app.post("/predict", **_ONE_FILE_ROUTE)
        def predict(file: UploadFile = File(...)) -> dict[str, Any]:
            return {"file": file.filename, **service.predict(_read(service, file))}


def _add_explain(app: FastAPI, service: Service) -> None:
    """``POST /explain``: the image beside its overlay as a PNG, the prediction in the headers."""

    @app.post("/explain", max_body_size=MAX_UPLOAD_BYTES + _FORM_OVERHEAD, form_limits={**_ONE_FILE, "max_fields": 2})
    def explain(file: UploadFile = File(...), method: str = Form("gradcam"), target: str = Form("")) -> Response:
        img = _read(service, file)
        png, meta = service.explain_png(img, method, target or None)
        border = meta["border_score"]
        headers = {"X-Label": _header(meta["label"]), "X-Explained": _header(meta["explained"]),
                   "X-Probability": f"{meta['probabilities'][meta['explained']]:.6f}",
                   "X-Border-Score": f"{border:.6f}" if border == border else "n/a", "X-Method": method}
        if "findings" in meta:  # multi-label: every finding above its threshold
            headers["X-Findings"] = _header("|".join(meta["findings"]))
        return Response(png, media_type="image/png", headers=headers)


def _mount_page(app: FastAPI, service: Service, uploads: UploadFolder) -> Any:
    """The page's upload route (shadowing Gradio's own) and the Gradio page mounted at ``/``."""
    import gradio as gr

    from medsight.serve.page import build_page

    @app.post(UPLOAD, **_ONE_FILE_ROUTE)  # the page's upload (Gradio's own route is shadowed): one file -> one token
    def upload(files: list[UploadFile] = File(...)) -> list[str]:
        (file,) = files
        if file.size is None or file.size > MAX_UPLOAD_BYTES:
            raise ImageTooLargeError(f"{file.filename or 'upload'}: more than the {MAX_UPLOAD_BYTES:,}-byte "
                                     f"upload limit")
        return [uploads.store(file.file, file.filename or "upload", file.size)]

    return gr.mount_gradio_app(app, build_page(service, uploads), path="/", max_file_size=MAX_UPLOAD_BYTES)


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          page: bool = True, onnx: bool | None = None, batching: BatchSettings | None = None) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    app = create_app(checkpoint, device, page=page, onnx=onnx, batching=batching)
    uvicorn.run(app, host=host, port=port, log_level="warning")
