"""Report sections for heatmaps checked against boxes and the saliency sanity checks (see
:mod:`medsight.explainers.localization` and :mod:`medsight.explainers.sanity`): one list of tables that the
model card renders as markdown and HTML, and the box overlays as an HTML fragment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsight.reporting.html import img_tag

__all__ = ["localization_sections", "overlays_html", "fmt_score"]

Part = str | tuple[list[str], list[list[Any]]]  # a paragraph or a table, as in the model card
_NAMES = {"pointing": "pointing game", "energy_ratio": "energy in box ÷ area share", "iou": "IoU"}


def fmt_score(s: dict[str, Any] | None) -> str:
    """``mean [lo, hi] (n)``, or n/a."""
    if not s or s.get("mean") is None:
        return "n/a"
    ci = s.get("ci95")
    return f"{s['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" (n {s['n']})"


def _loc_tables(loc: dict[str, Any]) -> list[Part]:
    st = loc["settings"]
    parts: list[Part] = [
        f"Heatmaps of each boxed finding against the box ({len(loc['boxes'])} boxes from `{loc.get('box_list', '')}`, "
        f"at the {st['image_size']}-px input, resize {st['resize']}). Pointing game: the map's maximum within "
        f"{st['tolerance_px']:g} px of the box (Zhang et al.'s 15 px at 224). Energy: the map's share of heat in the "
        f"box divided by the box's share of the image (uniform map = 1). IoU: the map at >= {st['iou_threshold']:g} × "
        f"its maximum against the box. Means with 95% bootstrap intervals and n; `centre` is a Gaussian at the "
        f"image centre (σ = {st['centre_sigma']:g} × side), `random` a uniform noise map."]
    first = next(iter(loc["methods"].values()))
    for finding in ["overall", *first["findings"]]:
        rows = []
        for name, m in loc["methods"].items():
            s = m["overall"] if finding == "overall" else m["findings"].get(finding, {})
            rows.append([name] + [fmt_score(s.get(k)) for k in _NAMES])
        parts += [f"**{finding}**", (["map", *_NAMES.values()], rows)]
    if loc.get("skipped"):
        parts.append(f"Rows left out ({len(loc['skipped'])}): " + "; ".join(loc["skipped"][:10])
                     + (" ..." if len(loc["skipped"]) > 10 else ""))
    return parts


def _sanity_tables(san: dict[str, Any]) -> list[Part]:
    cas = san["cascading"]
    intro = (
        f"Cascading model randomization (Adebayo et al., NeurIPS 2018) on {cas['images']} images: layers re-initialized "
        f"from the head down, cumulatively; similarity of each step's maps to the trained model's (Spearman rank "
        f"correlation, SSIM; 1 = unchanged). A method whose maps keep a mean rank correlation >= "
        f"{cas['similar_at']:g} with every layer random does not explain the model.")
    parts: list[Part] = [intro]
    for name, m in cas["methods"].items():
        rows = [[s["randomized"], s["layers_random"], fmt_score(s["spearman"]), fmt_score(s["ssim"])]
                for s in m["steps"]]
        parts += [f"**{name}**: {m['verdict']}.", (["randomized down to", "groups random", "Spearman", "SSIM"], rows)]
    if "data" in san:
        d = san["data"]
        parts.append(f"Data randomization: maps of the trained model against those of the same model trained on "
                     f"shuffled labels (`{d.get('shuffled_run', '')}`), {d['images']} images.")
        parts.append((["method", "Spearman", "SSIM", "verdict"],
                      [[n, fmt_score(m["spearman"]), fmt_score(m["ssim"]), m["verdict"]]
                       for n, m in d["methods"].items()]))
    return parts


def localization_sections(metrics: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """Model-card sections for the results present in ``metrics`` (none when neither was measured)."""
    out = []
    if metrics.get("localization"):
        out.append(("Do the heatmaps point at the finding?", _loc_tables(metrics["localization"])))
    if metrics.get("sanity"):
        out.append(("Saliency sanity checks", _sanity_tables(metrics["sanity"])))
    return out


def overlays_html(result: dict[str, Any], folder: Path, limit: int = 12) -> str:
    """Up to ``limit`` box overlays (from ``folder/boxes``) embedded, under a heading."""
    loc = result.get("localization")
    imgs = [img_tag(folder / "boxes" / b["overlay"]) for b in (loc or {}).get("boxes", [])[:limit] if b.get("overlay")]
    return f"<h3>Boxes on the heatmaps (first {len(imgs)})</h3>" + " ".join(imgs) if any(imgs) else ""
