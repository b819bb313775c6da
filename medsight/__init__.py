"""medsight: medical image classifiers that generalize (CoAtNet + SAM) and show what they looked at."""

__version__ = "0.1.0"

__all__ = ["__version__"]
