"""The run's Grad-CAM gallery and border (shortcut) scores over a test sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medsight.data.dataset import ImageDataset
from medsight.data.transforms import display_view, view_settings
from medsight.explainers.cam import BORDER_WARN, border_score, explain, overlay

if TYPE_CHECKING:
    from medsight.tasks import Task

__all__ = ["gradcam_gallery"]


def _display(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).clamp(0, 1).numpy()


def gradcam_gallery(model: torch.nn.Module, ds: ImageDataset, probs: np.ndarray, labels: np.ndarray, task: Task,
                    device: torch.device, method: str, target_layer: str | None, per_class: int,
                    seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Gallery rows (the task's groups, e.g. correct / misclassified per class) and border scores.

    Border scores are summarized overall and per explained output: a shortcut usually belongs to one
    class (the marker on the positive cases), so the warning looks at the highest class mean.
    """
    rng = np.random.default_rng(seed)
    groups = task.readout.gallery_groups(labels, probs, per_class, rng)
    sample = rng.choice(len(labels), size=min(len(labels), 256), replace=False)
    # (image, explained output) pairs: the border sample's (multi-label images are scored for each finding
    # they carry, see Readout.border_outputs) and the gallery's
    outputs = {int(i): task.readout.border_outputs(labels[int(i)], probs[int(i)]) for i in sample}
    for _, ids, outs in groups:  # an image in several groups (one per finding it carries) keeps every output
        for i, o in zip(ids, outs):
            if o not in outputs.setdefault(i, []):
                outputs[i].append(o)
    wanted = sorted((i, o) for i, outs in outputs.items() for o in outs)
    view = view_settings(ds.transform)  # the model's framing (resize policy, fundus crop), redone for display
    fov = view["preset"] == "fundus"
    heat: dict[tuple[int, int], np.ndarray] = {}
    scores, explained = [], []
    for start in range(0, len(wanted), 64):
        pairs = wanted[start:start + 64]
        items = {i: ds[i][0] for i in dict.fromkeys(i for i, _ in pairs)}
        keep = [(i, o) for i, o in pairs if items[i] is not None]
        if not keep:
            continue
        x = torch.stack([items[i] for i, _ in keep]).to(device)
        maps = explain(model, x, method=method, target_layer=target_layer, class_idx=[o for _, o in keep])
        scores.append(border_score(maps, fov=fov).cpu())
        explained += [o for _, o in keep]
        for pair, m in zip(keep, maps.cpu().numpy()):
            heat[pair] = m
    rows = []
    for title, ids, outs in groups:
        items = []
        for i, o in zip(ids, outs):
            if (i, o) not in heat:
                continue
            disp = _display(display_view(ds.load(i), view["size"], view["resize"], view["preset"], max_side=224))
            items.append({"image": disp, "overlay": overlay(disp, heat[(i, o)]),
                          "caption": f"{'' if task.kind == 'multilabel' else 'pred '}{task.classes[o]} {probs[i, o]:.2f}"})
        rows.append({"title": title, "items": items})
    allscores = torch.cat(scores).numpy() if scores else np.empty(0)
    cls = np.array(explained)
    ok = ~np.isnan(allscores)  # empty maps have no location
    per = {task.classes[c]: float(allscores[ok & (cls == c)].mean()) for c in range(task.head.num_outputs)
           if (ok & (cls == c)).sum() >= 3}
    mean = float(allscores[ok].mean()) if ok.any() else None
    worst = max(per.values()) if per else mean
    return rows, {"border_score_mean": mean, "border_score_per_class": per, "n": int(ok.sum()),
                  "border_warning": bool(worst is not None and worst > BORDER_WARN),
                  "border_score_max_class": worst}
