"""The web page (Gradio): upload an image or DICOM, see the probabilities, the overlay and any warning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medsight.config import CamMethod, choices
from medsight.explainers.cam import BORDER_WARN
from medsight.serve.service import NOTICE, Service, UnknownMethodError

__all__ = ["build_page"]

# A medical tool sends nothing anywhere: Gradio's usage analytics off before Gradio is imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def build_page(service: Service) -> Any:
    import gradio as gr

    from medsight.data.imageio import ImageReadError

    def run(file_path: str | None, method: str) -> tuple[dict[str, float], Any, str]:
        if not file_path:
            raise gr.Error("Choose an image or DICOM file first.")
        try:
            img = service.decode(Path(file_path).read_bytes(), Path(file_path).name)
            result = service.predict(img)
            _, ov, border = service.explain(img, method)
        except (ImageReadError, UnknownMethodError) as exc:
            raise gr.Error(str(exc)) from None
        p = result["probabilities"][result["label"]]
        text = f"**Prediction: {result['label']}** ({p:.1%})  \n" + (
            f"Grad-CAM border score {border:.2f}" if border == border else "The heatmap is empty (no positive evidence).")
        if border > BORDER_WARN:
            text += (f"  \n⚠️ **Warning:** the heat sits mostly at the image border (score {border:.2f} > "
                     f"{BORDER_WARN}); the model may be using a shortcut such as a marker or text.")
        return result["probabilities"], (ov * 255).round().astype(np.uint8), text

    info = service.info
    with gr.Blocks(title="medsight", analytics_enabled=False) as page:
        gr.Markdown(f"# medsight · {info['model']}\nClasses: {', '.join(info['classes'])}\n\n"
                    f"> ⚠️ **{NOTICE}**")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image (PNG, JPEG, TIFF, BMP or DICOM)", type="filepath", elem_id="upload")
                method = gr.Dropdown(list(choices(CamMethod)), value="gradcam", label="Explanation method",
                                     elem_id="method")
                button = gr.Button("Predict and explain", variant="primary", elem_id="run")
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                probs = gr.Label(label="Class probabilities", elem_id="probabilities")
                cam = gr.Image(label="Grad-CAM overlay", elem_id="overlay")
        button.click(run, [upload, method], [probs, cam, verdict])
    return page
