"""Experiment trackers as callbacks (``train.loggers``): TensorBoard and MLflow, each an optional extra.

Both write into the run folder (``tensorboard/``, ``mlruns/``), never to a server, unless the user has
pointed MLflow at one with ``MLFLOW_TRACKING_URI``. Only numbers and the config are logged — no image.
"""

from __future__ import annotations

import os
from typing import Any

from medsight.config import LoggerName, choices, config_to_dict
from medsight.engine.build import Run
from medsight.engine.callbacks import Callback
from medsight.engine.loop import EpochState
from medsight.errors import MedsightError
from medsight.utils.files import make_private

__all__ = ["TensorBoardLogger", "MLflowLogger", "LOGGERS", "make_loggers", "LoggerUnavailable"]

_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr")


class LoggerUnavailable(MedsightError, RuntimeError):
    """A logger was asked for but its package is not installed."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TensorBoardLogger(Callback):
    """Scalars per epoch and the final test metrics, in ``RUN/tensorboard`` (``tensorboard --logdir RUN``)."""

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise LoggerUnavailable("train.loggers asks for tensorboard: pip install 'medsight[tensorboard]'") from exc
        self._cls, self.writer = SummaryWriter, None

    def on_train_start(self, run: Run, state: EpochState) -> None:
        self.writer = self._cls(log_dir=str(run.out / "tensorboard"))
        self.writer.add_text("config", f"```\n{config_to_dict(run.cfg)}\n```")

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None:
        for k in _SCALARS:
            if row.get(k) == row.get(k):  # skip NaN (no AUC)
                self.writer.add_scalar(k, row[k], row["epoch"])
        self.writer.flush()

    def on_train_end(self, run: Run, state: EpochState, metrics: dict[str, Any] | None) -> None:
        if metrics:
            for k in ("accuracy", "auc", "balanced_accuracy", "ece"):
                if isinstance(metrics["test"].get(k), float):
                    self.writer.add_scalar(f"test/{k}", metrics["test"][k], len(state.history))
        self.writer.close()
        make_private(run.out / "tensorboard")  # the run folder's policy: owner-only files


class MLflowLogger(Callback):
    """Parameters (the flattened config), metrics per epoch and the final test metrics, in a file store
    at ``RUN/mlruns`` (``mlflow ui --backend-store-uri RUN/mlruns``) unless MLFLOW_TRACKING_URI is set."""

    def __init__(self) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
        try:
            import mlflow
        except ImportError as exc:
            raise LoggerUnavailable("train.loggers asks for mlflow: pip install 'medsight[mlflow]'") from exc
        self.mlflow, self.active = mlflow, None

    def on_train_start(self, run: Run, state: EpochState) -> None:
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder, no database server
            self.mlflow.set_tracking_uri((run.out / "mlruns").resolve().as_uri())
        self.mlflow.set_experiment("medsight")
        self.active = self.mlflow.start_run(run_name=run.out.name)
        params = {k: str(v)[:500] for k, v in _flat(config_to_dict(run.cfg)).items()}
        self.mlflow.log_params(params)

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None:
        self.mlflow.log_metrics({k: float(row[k]) for k in _SCALARS if row.get(k) == row.get(k)}, step=row["epoch"])

    def on_train_end(self, run: Run, state: EpochState, metrics: dict[str, Any] | None) -> None:
        if metrics:
            self.mlflow.log_metrics({f"test_{k}": float(metrics["test"][k]) for k in ("accuracy", "auc", "ece")
                                     if isinstance(metrics["test"].get(k), float)})
        self.mlflow.end_run()
        make_private(run.out / "mlruns")  # the run folder's policy: owner-only files (absent with a tracking server)


LOGGERS: dict[str, type[Callback]] = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
assert tuple(LOGGERS) == choices(LoggerName), "medsight.config.LoggerName and LOGGERS disagree"


def make_loggers(names: list[str]) -> list[Callback]:
    return [LOGGERS[n]() for n in names]
