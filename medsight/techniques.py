"""The twelve techniques of the research notes medsight follows, each as the settings that switch it on.

One table that ``medsight train --help``, the README's evidence table and ``benchmarks/techniques.py`` read.
A technique is switched on alone against the plain default plan; ``settings`` are ``--set`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Technique", "TECHNIQUES", "technique", "help_text"]


@dataclass(frozen=True)
class Technique:
    name: str
    settings: tuple[str, ...]  # --set KEY=VALUE overrides that switch it on
    purpose: str  # what the notes say it is for
    claim: str  # the claimed gain ("" when none is claimed)
    source: str


TECHNIQUES: tuple[Technique, ...] = (
    Technique("evidential", ("train.head=evidential",), "uncertainty quantification", "",
              "Sensoy et al. 2018"),
    Technique("prototypical", ("train.head=prototypical",), "few-shot learning (with --shots K)", "",
              "Snell et al. 2017"),
    Technique("triplet", ("train.triplet_weight=0.1",), "metric learning", "", "Schroff et al. 2015"),
    Technique("center", ("train.center_weight=0.01",), "tight clusters", "", "Wen et al. 2016"),
    Technique("manifold_mixup", ("train.manifold_mixup=2.0",), "semantic-preserving regularization", "",
              "Verma et al. 2019"),
    Technique("cosine", ("train.head=cosine",), "robustness across scanners", "", "Chen et al. 2019"),
    Technique("se_blocks", ("model.name=seresnet18",), "channel attention (timm's SE backbones)", "",
              "Hu et al. 2018"),
    Technique("distance_smoothing", ("data.task=ordinal", "train.ordinal=smooth"), "ordinal awareness (grades)",
              "", "distance-aware label smoothing"),
    Technique("sam", ("optim.name=sam-adamw",), "flat minima", "+3–5 % accuracy", "Foret et al. 2021"),
    Technique("cnn_transformer", ("model.name=cnn_transformer_resnet18",), "local + global features",
              "+2–4 % accuracy", "CNN + Transformer adapter"),
    Technique("progressive", ("finetune.progressive=true",), "layer-specific adaptation (pretrained weights)",
              "+4–6 % accuracy", "Howard & Ruder 2018"),
    Technique("stacking", (), "combine diverse models (medsight ensemble --method stacking)", "+1–3 % accuracy",
              "Wolpert 1992"),
)


def technique(name: str) -> Technique:
    return next(t for t in TECHNIQUES if t.name == name)


def help_text() -> str:
    """The techniques as the epilog of ``medsight train --help``."""
    lines = ["techniques (each one switch; see README, 'Techniques and the evidence'):"]
    for i, t in enumerate(TECHNIQUES, 1):
        how = " ".join(f"--set {s}" for s in t.settings) or "medsight ensemble RUN... --method stacking"
        lines.append(f"  {i:2d}. {t.name:<19} {how}  ({t.purpose})")
    return "\n".join(lines)
