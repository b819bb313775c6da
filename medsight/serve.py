"""One process that serves a trained model: a web page (Gradio) and a REST API (FastAPI).

    GET  /health    -> {"status": "ok", "model": NAME, "classes": [...]}
    POST /predict   multipart field ``file``              -> {"label", "probabilities": {class: p}}
    POST /explain   multipart ``file`` [+ form ``method``] -> PNG: the image beside its Grad-CAM overlay
    GET  /          the web page: upload PNG/JPEG/DICOM, see probabilities, the overlay and any warning

Both call the same :class:`medsight.api.Predictor` the command line uses. Bad uploads (not an image,
empty, too large, DICOM without pixel data) get a 4xx with a message; the server keeps serving.
"""


import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.api import load_predictor
from medsight.explain import BORDER_WARN, EXPLAINERS, border_score, overlay
from medsight.imageio import ImageReadError, read_image_bytes

__all__ = ["create_app", "serve", "NOTICE", "MAX_UPLOAD_BYTES"]

NOTICE = "Research software: not for clinical use. Predictions must not guide diagnosis or treatment."
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


class Service:
    """Model, lock and the three operations behind both the page and the API."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        self.predictor = load_predictor(checkpoint, device, onnx=False)  # a checkpoint or an ensemble.json
        # Grad-CAM registers hooks on the shared model: one explanation at a time. Plain predictions run
        # concurrently (inference mode, no shared state).
        self._cam_lock = threading.Lock()

    @property
    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"status": "ok", "model": p.name, "classes": p.classes, "image_size": p.image_size}

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        if len(data) > MAX_UPLOAD_BYTES:
            raise ImageReadError(f"{name}: {len(data):,} bytes is more than the {MAX_UPLOAD_BYTES:,}-byte limit")
        return read_image_bytes(data, name)

    def predict(self, img: torch.Tensor) -> dict[str, Any]:
        with torch.inference_mode():
            probs = self.predictor.probabilities(img)
        label = int(probs.argmax())
        return {"label": self.predictor.classes[label],
                "probabilities": {c: float(v) for c, v in zip(self.predictor.classes, probs)}}

    def explain(self, img: torch.Tensor, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray, float]:
        """(display image, overlay, border score) for ``img``; both images H×W×3 in [0, 1]."""
        if method not in EXPLAINERS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(EXPLAINERS)}")
        disp = self.predictor.display(img)
        with self._cam_lock:
            heat = self.predictor.heatmap(img, method)
        border = float(border_score(torch.from_numpy(heat)[None])[0])
        return disp, overlay(disp, heat), border

    def explain_png(self, img: torch.Tensor, method: str) -> tuple[bytes, dict[str, Any]]:
        from PIL import Image

        result = self.predict(img)
        disp, ov, border = self.explain(img, method)
        side = np.concatenate([disp, ov], axis=1)
        big = Image.fromarray((side * 255).round().astype(np.uint8)).resize(
            (2 * max(256, disp.shape[1]), max(256, disp.shape[0])), Image.NEAREST)
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        return buf.getvalue(), {**result, "border_score": border, "method": method}


def _page(service: Service) -> Any:
    import gradio as gr

    def run(file_path: str | None, method: str) -> tuple[dict[str, float], Any, str]:
        if not file_path:
            raise gr.Error("Choose an image or DICOM file first.")
        try:
            img = service.decode(Path(file_path).read_bytes(), Path(file_path).name)
            result = service.predict(img)
            _, ov, border = service.explain(img, method)
        except (ImageReadError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        p = result["probabilities"][result["label"]]
        text = f"**Prediction: {result['label']}** ({p:.1%})  \n" + (
            f"Grad-CAM border score {border:.2f}" if border == border else "The heatmap is empty (no positive evidence).")
        if border > BORDER_WARN:
            text += (f"  \n⚠️ **Warning:** the heat sits mostly at the image border (score {border:.2f} > "
                     f"{BORDER_WARN}); the model may be using a shortcut such as a marker or text.")
        return result["probabilities"], (ov * 255).round().astype(np.uint8), text

    info = service.info
    with gr.Blocks(title="medsight") as page:
        gr.Markdown(f"# medsight · {info['model']}\nClasses: {', '.join(info['classes'])}\n\n"
                    f"> ⚠️ **{NOTICE}**")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image (PNG, JPEG, TIFF, BMP or DICOM)", type="filepath",
                                 elem_id="upload")
                method = gr.Dropdown(list(EXPLAINERS), value="gradcam", label="Explanation method",
                                     elem_id="method")
                button = gr.Button("Predict and explain", variant="primary", elem_id="run")
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                probs = gr.Label(label="Class probabilities", elem_id="probabilities")
                cam = gr.Image(label="Grad-CAM overlay", elem_id="overlay")
        button.click(run, [upload, method], [probs, cam, verdict])
    return page


def create_app(checkpoint: str | Path, device: str = "auto", page: bool = True) -> Any:
    """The FastAPI application (REST API, with the Gradio page mounted at ``/`` when ``page``)."""
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import Response

    service = Service(checkpoint, device)
    app = FastAPI(title="medsight", description=NOTICE)

    async def _read(file: UploadFile) -> torch.Tensor:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        try:
            return service.decode(data, file.filename or "upload")
        except ImageReadError as exc:
            code = 413 if "limit" in str(exc) or "too large" in str(exc) else 400
            raise HTTPException(status_code=code, detail=str(exc)) from exc

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.info

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)) -> dict[str, Any]:
        img = await _read(file)
        return {"file": file.filename, **service.predict(img)}

    @app.post("/explain")
    async def explain(file: UploadFile = File(...), method: str = Form("gradcam")) -> Response:
        if method not in EXPLAINERS:
            raise HTTPException(status_code=400, detail=f"unknown method {method!r}; choose from "
                                                        f"{', '.join(EXPLAINERS)}")
        img = await _read(file)
        png, meta = service.explain_png(img, method)
        return Response(png, media_type="image/png", headers={
            "X-Label": meta["label"], "X-Probability": f"{meta['probabilities'][meta['label']]:.6f}",
            "X-Border-Score": f"{meta['border_score']:.6f}" if meta["border_score"] == meta["border_score"] else "n/a",
            "X-Method": method})

    if page:
        import gradio as gr

        app = gr.mount_gradio_app(app, _page(service), path="/")
    return app


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          page: bool = True) -> None:
    """Run the app with uvicorn until interrupted (binds to localhost unless told otherwise)."""
    import uvicorn

    app = create_app(checkpoint, device, page=page)
    print(f"medsight serving {checkpoint} on http://{host}:{port}  ({NOTICE})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
