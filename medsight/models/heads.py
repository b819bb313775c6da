"""Classifier heads beyond timm's linear layer, installed in place of any timm backbone's classifier.

timm gives every backbone the same ``get_classifier()``; medsight swaps that module for another head of the
same shape, so the model stays one ``nn.Module`` from image to logits and Grad-CAM, ONNX export, serving and
ensembles need nothing new. timm has no cosine, prototype or Dirichlet head, hence this module.

* ``cosine``: logits = s · cos(feature, class weight), normalized features and weights times a learned or
  fixed scale s (the normalized softmax of Wang et al. 2017 / Chen et al. 2019's "Baseline++").
* ``prototypical``: logits = −‖f − c_k‖², the squared Euclidean distance to class prototypes c_k, the mean
  embedding of the labelled images of class k (Snell et al., NeurIPS 2017). The prototypes are a buffer,
  recomputed from the training images (evaluation transform) before every validation, so a checkpoint
  carries the prototypes of its own weights.
* ``evidential``: the linear layer's outputs z become Dirichlet evidence e = z − min_k z_k ≥ 0 (Sensoy et al.,
  NeurIPS 2018 use e = ReLU(z); shifting by the minimum makes the least-supported class carry no evidence,
  which is where the paper's KL term drives every non-target class). α = e + 1, S = Σα, the expected
  probabilities are α/S and the uncertainty u = K/S. Because min_k α_k = 1, S = 1/min_k p_k: u = K·min_k p_k is
  read back from the probabilities alone, so abstention, risk–coverage, serving and ONNX need no second output.

:class:`EmbeddingTap` captures the classifier's input (the embedding) during training for the embedding
losses (triplet, center, prototypical) without changing what the model returns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.errors import ModelError

__all__ = ["classifier_name", "CosineClassifier", "PrototypeClassifier", "install_head", "EmbeddingTap",
           "evidential_alpha", "evidential_probabilities", "EvidentialProbabilities", "evidential_uncertainty",
           "set_prototypes", "HEADS"]

#: The heads :func:`install_head` builds (the linear one is timm's own); every name of config.HeadName.
HEADS = ("linear", "evidential", "cosine", "prototypical")


def classifier_name(model: nn.Module) -> str:
    """The dotted name of the backbone's final linear classifier (timm's ``get_classifier()``)."""
    get = getattr(model, "get_classifier", None)
    fc = get() if callable(get) else None
    for name, module in model.named_modules():
        if fc is not None and module is fc and name:
            return name
    raise ModelError(f"{type(model).__name__} has no classifier module medsight can replace (timm's "
                     f"get_classifier()); use train.head=linear with this backbone")


def _in_features(model: nn.Module, name: str) -> int:
    fc = model.get_submodule(name)
    if isinstance(fc, (nn.Linear, CosineClassifier)):
        return fc.in_features
    if isinstance(fc, PrototypeClassifier):
        return fc.prototypes.shape[1]
    raise ModelError(f"{type(model).__name__}'s classifier {name} is {type(fc).__name__}, not a linear layer")


class CosineClassifier(nn.Module):
    """s · normalize(x) · normalize(W)ᵀ: every logit lies in [−s, s]. The scale is learned as log s (so it
    stays positive) or fixed."""

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0, learn_scale: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's own initialization
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log(), requires_grad=learn_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class PrototypeClassifier(nn.Module):
    """−‖x − c_k‖² for each class prototype c_k (a buffer set by :func:`set_prototypes`)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("prototypes", torch.zeros(num_classes, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.prototypes.to(x.dtype)
        # ‖x‖² − 2 x·c + ‖c‖², as a matrix product (cdist has no ONNX export and a NaN gradient at distance 0)
        return -((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None])


def install_head(model: nn.Module, head: str, num_outputs: int, scale: float = 16.0,
                 learn_scale: bool = True) -> nn.Module:
    """Replace ``model``'s classifier by ``head`` (``linear`` and ``evidential`` keep timm's linear layer;
    the evidential head differs in its activation and loss, which its task owns). Returns the model."""
    if head in ("linear", "evidential"):
        return model
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    name = classifier_name(model)
    d = _in_features(model, name)
    new = (CosineClassifier(d, num_outputs, scale, learn_scale) if head == "cosine"
           else PrototypeClassifier(d, num_outputs))
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


class EmbeddingTap:
    """Keeps the input of the model's classifier (the embedding) from the last forward pass that builds a
    graph; a context manager that removes its hook on exit (and :meth:`close`)."""

    def __init__(self, model: nn.Module) -> None:
        self.features: torch.Tensor | None = None

        # a closure, not a bound method: a deep copy of the model (the time-budget probe) shares it, and so
        # feeds this tap, where a copied bound method would feed a copied tap that no loss reads
        def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if torch.is_grad_enabled() or not module.training:
                self.features = inputs[0]

        self._hook = model.get_submodule(classifier_name(model)).register_forward_hook(keep)

    def take(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no embedding captured: the model's classifier did not run")
        f, self.features = self.features, None
        return f

    def close(self) -> None:
        self._hook.remove()

    def __enter__(self) -> EmbeddingTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def set_prototypes(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Set the prototype head's c_k to the mean embedding of each class over ``batches`` of (images, labels);
    returns the per-class image counts. Runs in eval mode and restores the model's mode."""
    head = model.get_submodule(classifier_name(model))
    if not isinstance(head, PrototypeClassifier):
        raise ModelError("set_prototypes needs a model with train.head=prototypical")
    was_training = model.training
    model.eval()
    k, d = head.prototypes.shape
    sums, counts = torch.zeros(k, d, device=head.prototypes.device), torch.zeros(k, device=head.prototypes.device)
    with EmbeddingTap(model) as tap:
        for x, y in batches:
            model(x.to(device))
            f, y = tap.take().float(), y.to(sums.device).long()
            sums.index_add_(0, y, f.to(sums.device))
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
    if (counts == 0).any():
        missing = [int(i) for i in torch.nonzero(counts == 0).flatten()]
        raise ModelError(f"no labelled image of class(es) {missing}: a prototype needs at least one")
    head.prototypes.copy_(sums / counts[:, None])
    model.train(was_training)
    return counts


def evidential_alpha(logits: torch.Tensor) -> torch.Tensor:
    """Dirichlet parameters α = e + 1 with evidence e = z − min_k z_k (see the module docstring)."""
    z = logits.float()
    return z - z.min(1, keepdim=True).values + 1


def evidential_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The Dirichlet's expected class probabilities α / S."""
    alpha = evidential_alpha(logits)
    return alpha / alpha.sum(1, keepdim=True)


class EvidentialProbabilities(nn.Module):
    """:func:`evidential_probabilities` as a module (the activation of an exported graph)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return evidential_probabilities(logits)


def evidential_uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """u = K/S in [0, 1] from the expected probabilities: S = 1 / min_k p_k because min_k α_k = 1."""
    return (probs.shape[1] * probs.min(1).values).clamp(0, 1)
