"""Training losses. A new loss goes in a module here and is chosen by its task (``medsight.tasks``)."""

from medsight.losses.classification import ClassificationLoss, class_weights

__all__ = ["ClassificationLoss", "class_weights"]
