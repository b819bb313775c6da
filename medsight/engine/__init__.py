"""The training engine: build a run from its config (build.py), one step for every optimizer (step.py),
the epoch loop (loop.py), handlers around it (callbacks.py, loggers.py — a new logger goes there), the
end-of-run evaluation and report (finish.py), many processes (distributed.py) and ``train`` (trainer.py)."""

from medsight.engine.build import build_model, make_mixer, mix_batch, seed_everything
from medsight.engine.callbacks import HISTORY_FIELDS, Callback
from medsight.engine.dry_run import dry_run
from medsight.engine.loop import TrainingError
from medsight.engine.step import StepOptions, autocast, train_step
from medsight.engine.trainer import RunResult, train

__all__ = ["train", "dry_run", "train_step", "StepOptions", "autocast", "TrainingError", "RunResult", "HISTORY_FIELDS",
           "Callback", "build_model", "make_mixer", "mix_batch", "seed_everything"]
