"""Files written whole or not at all, and private to their user.

A crash never leaves half a checkpoint, metrics file or report (``save_atomic``, ``write_text_atomic``).
Run folders hold patient images (the Grad-CAM gallery, the report embeds them) and predictions, so
their policy is one: every file medsight writes there is readable by its user only (0600, folders
0700) — ``make_private`` applies it to a finished folder. ``check_writable`` refuses an output folder
that cannot be written before any work starts.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from medsight.errors import MedsightError

__all__ = ["save_atomic", "write_text_atomic", "make_private", "check_writable", "OutputNotWritableError",
           "PRIVATE_FILE", "PRIVATE_DIR"]

#: Modes of every file and folder medsight writes into a run or output folder.
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


class OutputNotWritableError(MedsightError, PermissionError, ValueError):
    """An output folder that cannot be created or written (a ValueError too, so every command reports it)."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` to a temporary file beside ``path`` (mode 0600), then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_private(folder: str | Path, only: Iterable[str] | None = None) -> None:
    """Make ``folder`` and everything in it readable by its owner only (files 0600, folders 0700).

    Called on every finished run folder: it embeds patient images. With ``only``, just those entries of
    ``folder`` (names relative to it) are tightened and the folder itself is left as it is — for output
    folders that may hold the user's own files (``evaluate --out``, ``ensemble --out``). Symbolic links
    are left alone (their targets are not medsight's).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    if only is not None:
        for name in only:
            p = folder / name
            if p.is_symlink() or not p.exists():
                continue
            if p.is_dir():
                make_private(p)
            else:
                os.chmod(p, PRIVATE_FILE)
        return
    os.chmod(folder, PRIVATE_DIR)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, PRIVATE_DIR)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p) and stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, PRIVATE_FILE)


def check_writable(out: str | Path) -> None:
    """Refuse an output folder that cannot be written, before any data is read.

    ``out`` need not exist: the nearest existing folder above it must let us create a file. The check
    writes (and removes) a probe file, since permission bits say nothing for root or on read-only and
    virtual file systems (``/proc``).

    Raises:
        OutputNotWritableError: ``out`` (or a parent) is a file, or the folder cannot be written.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(f"--out {out} is a file, not a folder")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputNotWritableError(f"--out {out} cannot be created: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".medsight-write-check.", suffix=".tmp")
    except OSError as exc:
        where = "" if probe_dir == out else f" (its nearest existing folder {probe_dir} is not writable)"
        raise OutputNotWritableError(f"--out {out} cannot be written{where}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
