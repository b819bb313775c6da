"""The error every model-building function raises."""

from medsight.errors import MedsightError

__all__ = ["ModelError"]


class ModelError(MedsightError, ValueError):
    """A model that cannot be built: unknown name, weights that do not fit, no network for --pretrained."""
