"""What the model looked at: the Grad-CAM family behind one registry (cam.py), shortcut checks (the border
score, cam.py), faithfulness curves (faithfulness.py) and the run's gallery (gallery.py). A new explainer
is one entry in ``EXPLAINERS`` and its name in ``medsight.config.CamMethod``."""

from medsight.explainers.cam import BORDER_WARN, EXPLAINERS, border_score, explain, overlay, resolve_classes
from medsight.explainers.faithfulness import deletion_insertion, faithfulness

__all__ = ["EXPLAINERS", "explain", "overlay", "border_score", "BORDER_WARN", "resolve_classes",
           "deletion_insertion", "faithfulness"]
