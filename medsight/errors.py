"""The one base class of medsight's expected errors: what a user can cause and fix (a bad option, a missing
file, data that cannot be used). The command line prints these as one line; any other exception is a bug and
keeps its traceback. Each error class also keeps the built-in base it had (``ValueError``, ``RuntimeError``...),
so code that catches those still works.
"""

from __future__ import annotations

__all__ = ["MedsightError", "UsageError", "InputNotFoundError"]


class MedsightError(Exception):
    """An expected error with a message that names its cause (the option, the file, the row)."""


class UsageError(MedsightError, ValueError):
    """An argument or option a function cannot use (out of range, unknown name, contradicting another)."""


class InputNotFoundError(MedsightError, FileNotFoundError):
    """An input file or folder the user named that does not exist."""
