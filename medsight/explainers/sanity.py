"""Sanity checks for saliency maps (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

A map that explains the model must change when the model does. **Cascading model randomization**
re-initializes the layers from the head downwards, cumulatively (head; head + last stage; ...; every
layer), and measures how similar each step's maps are to the trained model's: Spearman rank correlation
and SSIM, per image, with bootstrap intervals. **Data randomization** compares the maps of the trained
model with those of the same architecture trained on shuffled labels. A method whose maps stay similar
(mean rank correlation >= :data:`SIMILAR` once every layer is random, or under the shuffled-label model) is
reported as not explaining the model: it draws the image, not the decision.

Layer groups come from timm's group matcher (:func:`medsight.models.targets.layer_groups`); re-initializing
uses each module's own ``reset_parameters`` (its default initialization). Written here because no maintained
library packages these tests for CAM maps; SSIM is hand-written too (scikit-image, which has one, is not a
dependency) following Wang et al., "Image Quality Assessment: From Error Visibility to Structural
Similarity", IEEE TIP 2004 (Gaussian window σ = 1.5, 11 × 11, valid region, data range 1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from medsight.explainers.cam import explain
from medsight.explainers.localization import bootstrap_mean

__all__ = ["SIMILAR", "ssim", "rank_correlation", "map_similarity", "randomization_steps", "reinitialize",
           "cascading_randomization", "data_randomization"]

#: Mean rank correlation with the trained maps at or above which a method is said not to explain the model.
SIMILAR = 0.5


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    """Mean SSIM of each pair of maps (N, H, W) over the valid region of an 11 × 11 Gaussian window (smaller
    for maps under 11 px)."""
    x = torch.as_tensor(np.asarray(a, dtype=np.float64))[:, None]
    y = torch.as_tensor(np.asarray(b, dtype=np.float64))[:, None]
    k = min(11, x.shape[-1], x.shape[-2])
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]
    f = lambda z: torch.nn.functional.conv2d(z, win)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps (scipy). A constant map has no ranking: against a
    varying map it scores 0, against another constant map 1."""
    out = []
    for x, y in zip(np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)):
        cx, cy = np.ptp(x) == 0, np.ptp(y) == 0
        out.append(1.0 if cx and cy else 0.0 if cx or cy else float(spearmanr(x, y).statistic))
    return np.array(out)


def map_similarity(reference: np.ndarray, other: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Spearman and SSIM of ``other`` against ``reference``: means with bootstrap intervals and n."""
    return {"spearman": bootstrap_mean(rank_correlation(reference, other), n_boot, seed),
            "ssim": bootstrap_mean(ssim(reference, other), n_boot, seed)}


def _label(names: Sequence[str]) -> str:
    """A group's top-level modules, numbered containers with their index: ``stages.3 + norm``, ``head``."""
    tops = []
    for n in names:
        parts = n.split(".")
        top = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if top not in tops:
            tops.append(top)
    heads = {t.split(".")[0] for t in tops}
    return heads.pop() if len(tops) > 1 and len(heads) == 1 else " + ".join(tops)  # layer4.0 + layer4.1 -> layer4


def randomization_steps(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Parameter-name groups from the head down to the stem: timm's layer groups where the model has them,
    else its top-level children in reverse order."""
    from medsight.models.errors import ModelError
    from medsight.models.targets import layer_groups

    try:
        groups = layer_groups(model)
    except ModelError:
        groups = [[f"{c}.{n}" for n, _ in child.named_parameters()] for c, child in model.named_children()]
    groups = [g for g in groups if g]
    return [(_label(g), g) for g in reversed(groups)]


def reinitialize(model: nn.Module, names: set[str], seed: int) -> None:
    """Re-initialize, in place, every parameter named in ``names``: modules that own one are reset with
    their own ``reset_parameters`` (BatchNorm's running statistics too); a parameter of a module without
    one is drawn from N(0, 0.02²)."""
    torch.manual_seed(seed)
    done: set[str] = set()
    for mname, module in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
        if own and any(n in names for n in own) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            done.update(own)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names and n not in done:
                p.normal_(0, 0.02)


def _maps(model: nn.Module, images: torch.Tensor, method: str, target_layer: str | None,
          class_idx: Sequence[int]) -> np.ndarray:
    return explain(model, images, method=method, target_layer=target_layer, class_idx=list(class_idx)).cpu().numpy()


def _verdict(final: dict[str, Any]) -> dict[str, Any]:
    m = final["spearman"]["mean"]
    ok = m is not None and m < SIMILAR
    return {"explains_model": bool(ok),
            "verdict": ("the maps change when the model does" if ok else
                        f"the maps stay similar (mean rank correlation {m:.2f} >= {SIMILAR}) when the model is "
                        f"destroyed: they do not explain the model")}


def cascading_randomization(model: nn.Module, images: torch.Tensor, class_idx: Sequence[int],
                            methods: Sequence[str] = ("gradcam",), target_layer: str | None = None, seed: int = 0,
                            n_boot: int = 1000,
                            steps: Callable[[nn.Module], list[tuple[str, list[str]]]] = randomization_steps
                            ) -> dict[str, Any]:
    """Adebayo et al.'s cascading test: per method, the similarity of the maps to the trained model's after
    each cumulative re-initialization step (head first), and whether the method passes.

    Args:
        model: the trained model (left untouched; a copy is randomized).
        images: normalized (B, 3, H, W); class_idx: the output explained per image (the trained model's).
    """
    groups = steps(model)
    trained = {m: _maps(model, images, m, target_layer, class_idx) for m in methods}
    work = copy.deepcopy(model)
    out: dict[str, Any] = {m: {"steps": []} for m in methods}
    names: set[str] = set()
    for i, (label, group) in enumerate(groups):
        names |= set(group)
        reinitialize(work, set(group), seed + i)
        for m in methods:
            row = {"randomized": label, "layers_random": i + 1,
                   **map_similarity(trained[m], _maps(work, images, m, target_layer, class_idx), n_boot, seed)}
            out[m]["steps"].append(row)
    for m in methods:
        out[m].update(_verdict(out[m]["steps"][-1]))
    return {"images": int(len(images)), "order": [g for g, _ in groups], "similar_at": SIMILAR, "methods": out}


def data_randomization(model: nn.Module, shuffled: nn.Module, images: torch.Tensor, class_idx: Sequence[int],
                       methods: Sequence[str] = ("gradcam",), target_layer: str | None = None, n_boot: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """Adebayo et al.'s data-randomization test: per method, the similarity of the trained model's maps to
    those of ``shuffled`` (the same architecture trained on shuffled labels), and whether the method passes."""
    out = {}
    for m in methods:
        sim = map_similarity(_maps(model, images, m, target_layer, class_idx),
                             _maps(shuffled, images, m, target_layer, class_idx), n_boot, seed)
        out[m] = {**sim, **_verdict(sim)}
    return {"images": int(len(images)), "similar_at": SIMILAR, "methods": out}
