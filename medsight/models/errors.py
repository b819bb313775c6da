"""The error every model-building function raises."""

__all__ = ["ModelError"]


class ModelError(ValueError):
    """A model that cannot be built: unknown name, weights that do not fit, no network for --pretrained."""
