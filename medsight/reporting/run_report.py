"""The run report: the one typed shape of ``metrics.json``, for a training run, an external evaluation and an
ensemble alike. Every producer builds a :class:`RunReport` and writes it with :meth:`RunReport.write`; every
reader (the model card, report.html, ``compare``/``ensemble``, the steps that add a section later such as
``robustness --store``) reads it with :meth:`RunReport.read`, so a missing or misspelt section is caught where
it is written, not where a reader trips on it.

The sections' insides stay the plain dicts their producers compute (a task's metrics, the trust measurements,
robustness, explanations); the report fixes which sections exist, which are always there, and their types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from medsight.errors import MedsightError
from medsight.utils.files import write_text_atomic

__all__ = ["RunReport", "RunReportError"]

Section = dict[str, Any]


class RunReportError(MedsightError, ValueError):
    """A metrics.json that is not a medsight run report."""


class RunReport(BaseModel):
    """metrics.json. ``task``, ``classes`` and ``test`` are always there; the rest when the step ran."""

    model_config = ConfigDict(extra="forbid")

    task: str
    classes: list[str]
    test: Section
    val: Section | None = None
    # where the predictions came from
    data: str | None = None
    checkpoint: str | None = None  # an external evaluation's model
    skipped_files: list[str] = []
    # training
    best_epoch: int | None = None
    epochs_run: int | None = None
    monitor: str | None = None
    parameters: int | None = None
    train_seconds: float | None = None
    baselines: str | None = None  # the published baselines' table (the embedded default data set)
    # ensembles
    method: str | None = None
    members: list[Section] | None = None
    diversity: Section | None = None
    # the measurements after the metrics
    trust: Section | None = None
    checklist: Section | None = None
    robustness: Section | None = None
    explain: Section | None = None
    faithfulness: Section | None = None
    sharpness: Section | None = None
    localization: Section | None = None
    sanity: Section | None = None
    figures: list[str] = []
    steps_skipped: list[Section] = []

    @classmethod
    def of(cls, data: dict[str, Any] | RunReport) -> RunReport:
        """A report from a producer's dict (a report passes through), or a :class:`RunReportError` naming the
        sections that do not fit."""
        if isinstance(data, RunReport):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:4])
            raise RunReportError(f"not a medsight run report ({where})") from None

    @classmethod
    def read(cls, path: str | Path) -> RunReport:
        """metrics.json at ``path`` (or in the folder ``path``)."""
        p = Path(path)
        p = p / "metrics.json" if p.is_dir() else p
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunReportError(f"{p}: cannot be read as a run report ({type(exc).__name__}: {exc})") from None
        try:
            return cls.of(data)
        except RunReportError as exc:
            raise RunReportError(f"{p}: {exc}") from None

    def plain(self) -> dict[str, Any]:
        """The report as metrics.json holds it: the sections that were set, in the order they were set."""
        return self.model_dump(exclude_unset=True)

    def write(self, path: str | Path) -> Path:
        """Write metrics.json atomically to ``path`` (or into the folder ``path``)."""
        p = Path(path)
        p = p / "metrics.json" if p.is_dir() else p
        write_text_atomic(json.dumps(self.plain(), indent=2), p)
        return p

    def added(self, **sections: Any) -> RunReport:
        """A copy with ``sections`` set (a later step storing its result), checked like the rest."""
        return RunReport.of({**self.plain(), **sections})
