"""The web page (Gradio): upload an image or DICOM, see the probabilities, the overlay and any warning.

What the page keeps: nothing beyond the request. Each upload is written to a private folder of this
server process under a name the server issues (:class:`UploadFolder`, mode 0700; the page's file values
are those names, checked by ``guard.Guard`` before Gradio sees them), deleted as soon as it is decoded
(the decoded image stays in server memory for that browser session, at most an hour, so the method can
be changed and run again) or after a while unread; the overlay goes back inline rather than as a cached
file, and the folder is removed when the server stops. Gradio's usage analytics are off.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np

from medsight.config import CamMethod, choices
from medsight.explainers.cam import BORDER_WARN
from medsight.serve.guard import release
from medsight.serve.service import MAX_UPLOAD_BYTES, NOTICE, Service, UnknownClassError, UnknownMethodError
from medsight.serve.uploads import UploadFolder, UploadRefusedError

__all__ = ["build_page", "UploadFolder"]

# A medical tool sends nothing anywhere: Gradio's usage analytics off before Gradio is imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402 - after the setting above


class _Page(gr.Blocks):
    """Blocks whose every processed call gives its admission place back when it ends (``guard.release``):
    after the function, or after Gradio refused the call's inputs before running it."""

    async def process_api(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return await super().process_api(*args, **kwargs)
        finally:
            request = kwargs.get("request")
            for r in request if isinstance(request, list) else [request]:
                release(r)


def _png_html(rgb: np.ndarray) -> str:
    """The overlay as an inline PNG: it travels in the answer and is never written to disk."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img alt="Grad-CAM overlay" src="data:image/png;base64,{data}" '
            f'style="width:100%;max-width:512px;image-rendering:pixelated">')


#: The selector's default: the decided class (single-label) or the most probable finding (multi-label).
MOST_PROBABLE = "(the decided / most probable)"


class _Handlers:
    """The page's event handlers over ``service``; file values are upload tokens of ``uploads``."""

    def __init__(self, service: Service, uploads: UploadFolder) -> None:
        self.service = service
        self.uploads = uploads

    def token_of(self, file: Any) -> tuple[str, str]:
        try:
            return self.uploads.resolve(file)
        except UploadRefusedError as exc:
            raise gr.Error(str(exc)) from None

    def decode(self, file: Any) -> tuple[str, Any] | None:
        """(token, decoded image) of an upload, deleting its file; None when it was read before."""
        from medsight.data.imageio import ImageReadError

        try:
            token, name, data = self.uploads.read(file, MAX_UPLOAD_BYTES)
        except UploadRefusedError as exc:
            raise gr.Error(str(exc)) from None
        if data is None:
            return None
        try:
            return token, self.service.decode(data, name)
        except ImageReadError as exc:
            raise gr.Error(str(exc)) from None

    def receive(self, file: Any) -> Any:
        """Decode an upload into the session's memory (and delete its file)."""
        if not file:
            return None
        found = self.decode(file)
        return gr.skip() if found is None else found  # None: a run that came first read it

    def run(self, file: Any, method: str, held: Any) -> tuple[dict[str, float], str, str, Any]:
        return self.run_for(file, method, held, None)

    def show(self, file: Any, method: str, target: str, held: Any) -> tuple[dict[str, float], str, str, Any]:
        """The heatmap of the class or finding chosen in the selector."""
        return self.run_for(file, method, held, None if target == MOST_PROBABLE else target)

    def held_image(self, file: Any, held: Any) -> Any:
        """The session's decoded image of ``file``, decoding the upload when the session holds another."""
        if not file:
            raise gr.Error("Choose an image or DICOM file first.")
        token, _ = self.token_of(file)
        if held is None or held[0] != token:
            held = self.decode(file)
            if held is None:
                raise gr.Error("The upload was deleted after it was read; choose the file again.")
        return held

    def run_for(self, file: Any, method: str, held: Any,
                target: str | None) -> tuple[dict[str, float], str, str, Any]:
        from medsight.data.imageio import ImageReadError

        held = self.held_image(file, held)
        img, service = held[1], self.service
        try:
            result = service.predict(img)
            if not service.can_explain:  # an exported ONNX model: the prediction only
                return result["probabilities"], "", _prediction_only(result), held
            index = service.explained_index(result, target)
            _, ov, border = service.explain(img, method, index)
        except (ImageReadError, UnknownMethodError, UnknownClassError) as exc:
            raise gr.Error(str(exc)) from None
        text = _verdict(result, service.predictor.classes[index], target, border)
        return result["probabilities"], _png_html(ov), text, held


def _prediction_only(result: dict[str, Any]) -> str:
    p = result["probabilities"][result["label"]]
    return (f"**Prediction: {result['label']}** ({p:.1%})  \n"
            "No overlay: this server runs an exported ONNX model, which cannot explain.")


def _verdict(result: dict[str, Any], shown: str, target: str | None, border: float) -> str:
    """The page's text: the prediction (or the findings), the class the heatmap shows, its border score and
    the shortcut warning when the heat sits at the border."""
    if "findings" in result:  # multi-label: every finding above its threshold, the heatmap of one
        text = (f"**Findings above their thresholds:** {result['label']}  \nHeatmap of "
                f"**{shown}** ({result['probabilities'][shown]:.1%})  \n")
    else:
        p = result["probabilities"][shown]
        text = f"**Prediction: {result['label']}** ({result['probability']:.1%})" + (
            f" · heatmap of **{shown}** ({p:.1%})" if target else "") + "  \n"
    text += (
        f"Grad-CAM border score {border:.2f}" if border == border else "The heatmap is empty (no positive evidence).")
    if border > BORDER_WARN:
        text += (f"  \n⚠️ **Warning:** the heat sits mostly at the image border (score {border:.2f} > "
                 f"{BORDER_WARN}); the model may be using a shortcut such as a marker or text.")
    return text


def build_page(service: Service, uploads: UploadFolder) -> Any:
    """The Gradio page over ``service``. Its file values are upload tokens of ``uploads`` (the server's
    guard has checked them and handed Gradio the stored file); each upload is deleted once decoded."""
    calls = _Handlers(service, uploads)
    info = service.info
    with _Page(title="medsight", analytics_enabled=False) as page:
        gr.Markdown(f"# medsight · {info['model']}\nClasses: {', '.join(info['classes'])}\n\n"
                    f"> ⚠️ **{NOTICE}**\n\nUploads are deleted as soon as they are read; nothing is kept.")
        held = gr.State(None, time_to_live=3600)  # the decoded image, in this session's memory only
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image (PNG, JPEG, TIFF, BMP or DICOM)", elem_id="upload")
                method = gr.Dropdown(list(choices(CamMethod)), value="gradcam", label="Explanation method",
                                     elem_id="method")
                target = gr.Dropdown([MOST_PROBABLE, *info["classes"]], value=MOST_PROBABLE, elem_id="target",
                                     label="Heatmap of" + (" finding" if info["task"] == "multilabel" else " class"))
                button = gr.Button("Predict and explain", variant="primary", elem_id="run")
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                probs = gr.Label(label="Class probabilities", elem_id="probabilities")
                cam = gr.HTML(label="Grad-CAM overlay", elem_id="overlay")
        upload.upload(calls.receive, upload, held, preprocess=False)
        button.click(calls.run, [upload, method, held], [probs, cam, verdict, held], api_name="run", preprocess=False)
        target.input(calls.show, [upload, method, target, held], [probs, cam, verdict, held],
                     api_name="explain_finding", preprocess=False)
    return page
