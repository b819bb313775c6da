"""The web page (Gradio): upload an image or DICOM, see the probabilities, the overlay and any warning.

What the page keeps: nothing beyond the request. Gradio writes each upload to disk before the page
sees it; here that disk is a private folder of this server process (:class:`UploadFolder`, mode
0700), each upload is deleted as soon as it is decoded (the decoded image stays in server memory for
that browser session, at most an hour, so the method can be changed and run again), the overlay goes
back inline rather than as a cached file, and the folder is removed when the server stops. Gradio's
usage analytics are off.
"""

from __future__ import annotations

import atexit
import base64
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medsight.config import CamMethod, choices
from medsight.explainers.cam import BORDER_WARN
from medsight.serve.service import NOTICE, Service, UnknownClassError, UnknownMethodError

__all__ = ["build_page", "UploadFolder"]

log = logging.getLogger(__name__)

# A medical tool sends nothing anywhere: Gradio's usage analytics off before Gradio is imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

_PREFIX = "medsight-uploads-"


class UploadFolder:
    """A private folder (0700) for Gradio's uploads, removed when the server stops.

    Creating it points Gradio at it (``GRADIO_TEMP_DIR``, read when Gradio builds the page and its
    routes), so it must exist before the page is built. Folders left by servers that were killed
    (``SIGKILL`` runs no clean-up) are removed when the next server starts.
    """

    def __init__(self) -> None:
        _remove_orphans()
        self.path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))  # mkdtemp: mode 0700
        self._previous = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)
        atexit.register(self.remove)

    def discard(self, file: str | Path) -> None:
        """Delete an upload and the folders Gradio made for it (up to, not including, this folder)."""
        p = Path(file).absolute()
        if self.path not in p.parents:
            return
        p.unlink(missing_ok=True)
        for parent in p.parents:
            if parent == self.path:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: another upload of the same content is still pending
                break

    def remove(self) -> None:
        """Delete the folder and everything in it (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.path):
            if self._previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous


def _remove_orphans() -> None:
    """Remove this user's upload folders whose server process no longer runs."""
    for d in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        try:
            pid = int(d.name[len(_PREFIX):].split("-", 1)[0])
            if d.stat().st_uid != os.getuid() or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s, left by a server that was stopped without clean-up", d)
        except (ValueError, OSError):
            continue


def _png_html(rgb: np.ndarray) -> str:
    """The overlay as an inline PNG: it travels in the answer and is never written to disk."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img alt="Grad-CAM overlay" src="data:image/png;base64,{data}" '
            f'style="width:100%;max-width:512px;image-rendering:pixelated">')


def _upload(file: Any) -> tuple[Path, str] | None:
    """(path on disk, the user's file name) of the page's raw file value (events run with
    ``preprocess=False``: gr.File's preprocessing leaves an empty temporary file behind on every call in
    gradio 6, components/file.py)."""
    if not file:
        return None
    if isinstance(file, dict):
        path = Path(file["path"])
        return path, str(file.get("orig_name") or path.name)
    return Path(file), Path(file).name


#: The selector's default: the decided class (single-label) or the most probable finding (multi-label).
MOST_PROBABLE = "(the decided / most probable)"


def build_page(service: Service, uploads: UploadFolder | None = None) -> Any:
    """The Gradio page over ``service``; with ``uploads``, every upload is deleted once decoded."""
    import gradio as gr

    from medsight.data.imageio import ImageReadError

    def receive(file: Any) -> Any:
        """Decode an upload into the session's memory and delete its file."""
        found = _upload(file)
        if found is None:
            return None
        path, name = found
        if not path.is_file():  # already read and deleted by a run that came first
            return gr.skip()
        if uploads is not None and uploads.path not in path.absolute().parents:
            raise gr.Error(f"{name} is not an upload of this page")
        try:
            return str(path), service.decode(path.read_bytes(), name)  # the path names the content (a hash)
        except ImageReadError as exc:
            raise gr.Error(str(exc)) from None
        finally:
            if uploads is not None:
                uploads.discard(path)

    def run(file: Any, method: str, held: Any) -> tuple[dict[str, float], str, str, Any]:
        return run_for(file, method, held, None)

    def show(file: Any, method: str, target: str, held: Any) -> tuple[dict[str, float], str, str, Any]:
        """The heatmap of the class or finding chosen in the selector."""
        return run_for(file, method, held, None if target == MOST_PROBABLE else target)

    def run_for(file: Any, method: str, held: Any, target: str | None) -> tuple[dict[str, float], str, str, Any]:
        found = _upload(file)
        if found is None:
            raise gr.Error("Choose an image or DICOM file first.")
        path, name = found
        if held is None or held[0] != str(path):
            if not path.is_file():
                raise gr.Error("The upload was deleted after it was read; choose the file again.")
            held = receive(file)
        img = held[1]
        try:
            result = service.predict(img)
            if not service.can_explain:  # an exported ONNX model: the prediction only
                p = result["probabilities"][result["label"]]
                return (result["probabilities"], "", f"**Prediction: {result['label']}** ({p:.1%})  \n"
                        "No overlay: this server runs an exported ONNX model, which cannot explain.", held)
            index = service.explained_index(result, target)
            _, ov, border = service.explain(img, method, index)
        except (ImageReadError, UnknownMethodError, UnknownClassError) as exc:
            raise gr.Error(str(exc)) from None
        shown = service.predictor.classes[index]
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
        return result["probabilities"], _png_html(ov), text, held

    info = service.info
    with gr.Blocks(title="medsight", analytics_enabled=False) as page:
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
        upload.upload(receive, upload, held, preprocess=False)
        button.click(run, [upload, method, held], [probs, cam, verdict, held], api_name="run", preprocess=False)
        target.input(show, [upload, method, target, held], [probs, cam, verdict, held], api_name="explain_finding",
                     preprocess=False)
    return page
