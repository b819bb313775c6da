"""The fitted rules: everything chosen on validation data that every later command applies.

One typed object, fitted by training's last step (:func:`medsight.evaluation.trust.fit_on_validation` and the
task's :meth:`~medsight.tasks.Task.fit_decision`), stored in the checkpoint as plain data (:meth:`FittedRules.state`)
and read by predict, serve, export, evaluate and ensembles. Nothing else writes to it.

Checkpoints written before this object kept the same values in a ``decision`` dict with a few other key names;
:meth:`FittedRules.from_state` reads both.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from medsight.errors import MedsightError

__all__ = ["FittedRules", "RulesError", "Temperature"]

#: key names of the older ``decision`` dict -> field names
_RENAMED = {"loss_logit_offset": "logit_offset", "rule": "threshold_rule", "not_fitted": "thresholds_not_fitted"}


class RulesError(MedsightError, ValueError):
    """A checkpoint's fitted rules that medsight cannot read."""


class Temperature(nn.Module):
    """Divides logits by fitted temperatures (one, or one per output), after subtracting a per-output offset
    when one is given: the calibration step of an ONNX graph."""

    def __init__(self, temperature: float | list[float], offset: list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("t", torch.as_tensor(temperature, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(offset if offset is not None else 0.0, dtype=torch.float32))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits - self.b) / self.t


class FittedRules(BaseModel):
    """What validation data decided. ``None`` (or empty) means not fitted: the rule's default applies."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # calibration
    temperature: float | list[float] | None = None  # one, or one per finding (multi-label)
    temperature_not_fitted: list[str] = []  # findings whose validation labels hold one answer (kept at 1.0)
    logit_offset: list[float] | None = None  # the shift a weighted training loss put into the logits (log w)
    # decision
    threshold: float | None = None  # binary: the Youden threshold (reported beside argmax)
    thresholds: list[float] | None = None  # multi-label: one per finding
    threshold_rule: str | None = None
    thresholds_not_fitted: dict[str, str] = {}  # finding -> why its threshold stayed 0.5
    cutpoints: list[float] | None = None  # ordinal regression head: cuts on the expected grade
    refer_threshold: float | None = None  # ordinal: refer when P(grade >= refer grade) reaches it
    # trust
    tta: bool = False  # decisions read the mean over test-time-augmentation views
    operating_points: dict[str, Any] | None = None
    conformal: dict[str, Any] | None = None
    abstain_below: float | None = None  # refer an image whose confidence is below this
    abstain_fraction: float | None = None

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> FittedRules:
        """Rules from a checkpoint's plain data (this object's, or an older checkpoint's ``decision`` dict)."""
        data = {_RENAMED.get(k, k): v for k, v in (state or {}).items()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise RulesError(f"the checkpoint's fitted rules cannot be read ({where})") from None

    def state(self) -> dict[str, Any]:
        """Plain data for the checkpoint: every field, ``None`` where nothing was fitted."""
        return self.model_dump()

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """(Logits − :attr:`logit_offset`) divided by the fitted temperature (unchanged when none is fitted)."""
        t, b = self.temperature, self.logit_offset
        if t is None:
            return logits
        if b is not None:
            logits = logits - torch.as_tensor(b, dtype=logits.dtype, device=logits.device)
        return logits / torch.as_tensor(t, dtype=logits.dtype, device=logits.device)

    def calibration_module(self) -> nn.Module:
        """:meth:`calibrate` as a module (ONNX export), or identity."""
        return nn.Identity() if self.temperature is None else Temperature(self.temperature, self.logit_offset)

    def clear_trust(self) -> None:
        """Forget what trust fits (before fitting it again on validation); the decision and offset stay."""
        for name in ("temperature", "temperature_not_fitted", "tta", "operating_points", "conformal",
                     "abstain_below", "abstain_fraction"):
            setattr(self, name, FittedRules.model_fields[name].get_default(call_default_factory=True))
