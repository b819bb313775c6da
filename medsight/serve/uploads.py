"""The page's uploads: a private folder of this server process, files named by opaque tokens.

An upload is stored as ``<folder>/<token>`` (a random name the server issues; the user's file name stays
in memory) and is referred to by that token alone: the folder's path is never sent. A file reference in a
request is honoured only when it names a token this server issued (:meth:`UploadFolder.resolve`), so a
path to anything else on the host — absolute, ``..``, a symlink, URL-encoded, a Windows path — is refused
with one message that says nothing about what is there. Each upload is deleted when it is read; one that
no request reads is deleted after ``ttl_s``, and the unread uploads together hold at most
``max_pending_bytes`` (past that, a new upload waits: 429).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from medsight.errors import MedsightError
from medsight.serve.batching import ServerBusyError

__all__ = ["UploadFolder", "UploadRefusedError", "REFUSED", "UPLOAD_TTL_S", "MAX_PENDING_BYTES"]

log = logging.getLogger(__name__)

#: Unread uploads are deleted this long after they arrive (seconds).
UPLOAD_TTL_S = 600.0
#: The unread uploads together hold at most this many bytes.
MAX_PENDING_BYTES = 256 * 1024 * 1024
#: Tokens already read are remembered this long (a page session re-sends its file's token with each run).
_RECORD_TTL_S = 3600.0
_MAX_RECORDS = 10_000
#: At most this many unread uploads at once (empty files too).
_MAX_UNREAD = 1000

#: The one answer to a file reference that is not an upload of this server (whatever it points at).
REFUSED = ("not an upload of this server: send the file to /gradio_api/upload (the page does) and pass "
           "the name it returns")

_PREFIX = "medsight-uploads-"
_TOKEN_BYTES = 24


class UploadRefusedError(MedsightError, ValueError):
    """A file reference that names no upload of this server."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


@dataclass
class _Upload:
    token: str
    name: str  # the user's file name (its extension tells DICOM apart), kept in memory only
    size: int
    created: float
    read: bool = False


class UploadFolder:
    """A private folder (0700) for the page's uploads, removed when the server stops.

    Creating it points Gradio at it (``GRADIO_TEMP_DIR``, read when Gradio builds the page and its
    routes), so it must exist before the page is built. Folders left by servers that were killed
    (``SIGKILL`` runs no clean-up) are removed when the next server starts.
    """

    def __init__(self, ttl_s: float = UPLOAD_TTL_S, max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        _remove_orphans()
        self.ttl_s, self.max_pending_bytes = float(ttl_s), int(max_pending_bytes)
        self.path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))  # mkdtemp: mode 0700
        self._real = self.path.resolve()
        self._uploads: OrderedDict[str, _Upload] = OrderedDict()  # by token, oldest first
        self._pending = 0  # bytes of unread uploads
        self._lock = threading.Lock()
        self._previous = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="medsight-upload-sweeper", daemon=True)
        self._sweeper.start()
        atexit.register(self.remove)

    # ------------------------------------------------------------------------------------------ storing

    def store(self, src: BinaryIO, name: str, size: int) -> str:
        """Copy an upload of ``size`` bytes into the folder; returns its token. Past the cap on unread
        uploads, :class:`ServerBusyError` (429) with the time until the oldest one expires."""
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        with self._lock:
            self._sweep(time.monotonic())
            unread = sum(not u.read for u in self._uploads.values())
            if self._pending + size > self.max_pending_bytes or unread >= _MAX_UNREAD:
                oldest = next((u.created for u in self._uploads.values() if not u.read), time.monotonic())
                wait = int(max(1, oldest + self.ttl_s - time.monotonic()))
                raise ServerBusyError(f"the server holds {unread} unread uploads, {self._pending:,} bytes (limits "
                                      f"{_MAX_UNREAD}, {self.max_pending_bytes:,}); try again shortly", retry_after=wait)
            self._pending += size  # reserved before the copy, so concurrent uploads cannot pass the cap together
        try:
            fd = os.open(self.path / token, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except BaseException:
            with self._lock:
                self._pending -= size
            (self.path / token).unlink(missing_ok=True)
            raise
        with self._lock:
            self._uploads[token] = _Upload(token, os.path.basename(name.replace("\\", "/"))[:255] or "upload",
                                           size, time.monotonic())
        return token

    # ------------------------------------------------------------------------------------------ reading

    def resolve(self, ref: Any) -> tuple[str, str]:
        """(token, the user's file name) of a file reference from a request: a token, a ``{"path": ...}``
        file object, or the stored path of a token. Anything else raises :class:`UploadRefusedError`."""
        value = ref.get("path") if isinstance(ref, dict) else ref
        if not isinstance(value, str) or not value or len(value) > 4096:
            raise UploadRefusedError()
        with self._lock:
            upload = self._uploads.get(value)
        if upload is None:
            try:  # the stored path, as Gradio passes it to the page's functions: resolved, symlinks included
                p = Path(value).resolve()
            except (OSError, RuntimeError, ValueError):
                raise UploadRefusedError() from None
            if p.parent != self._real:
                raise UploadRefusedError()
            with self._lock:
                upload = self._uploads.get(p.name)
        if upload is None:
            raise UploadRefusedError()
        return upload.token, upload.name

    def stored_path(self, token: str) -> Path:
        """Where an upload lies (for the page framework, which is handed files by path; never sent out)."""
        return self.path / token

    def read(self, ref: Any, limit: int) -> tuple[str, str, bytes | None]:
        """(token, file name, content) of an upload, which is deleted as it is read; content is None when
        the upload was read (or expired) before. ``limit``: bytes past which only ``limit + 1`` are read."""
        token, name = self.resolve(ref)
        with self._lock:
            upload = self._uploads.get(token)
            if upload is None or upload.read:
                return token, name, None
            upload.read = True
            self._pending -= upload.size
        path = self.path / token
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # the server wrote it; a link is never followed
        except OSError:
            return token, name, None
        try:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(limit + 1) if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) else None
        finally:
            path.unlink(missing_ok=True)
        return token, name, data

    # ------------------------------------------------------------------------------------------ expiry

    def _sweep(self, now: float) -> None:
        """Delete unread uploads past ``ttl_s``; forget tokens past their record time (lock held)."""
        for token, upload in list(self._uploads.items()):
            if not upload.read and now - upload.created > self.ttl_s:
                upload.read = True
                self._pending -= upload.size
                (self.path / token).unlink(missing_ok=True)
                log.info("deleted an upload that no request read within %g s", self.ttl_s)
        for token, upload in list(self._uploads.items()):  # oldest first
            if upload.read and (now - upload.created > _RECORD_TTL_S or len(self._uploads) > _MAX_RECORDS):
                del self._uploads[token]

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(30.0, max(0.05, self.ttl_s / 4))):
            with self._lock:
                self._sweep(time.monotonic())

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def remove(self) -> None:
        """Delete the folder and everything in it (idempotent)."""
        self._stop.set()
        shutil.rmtree(self.path, ignore_errors=True)
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.path):
            if self._previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous


def _remove_orphans() -> None:
    """Remove this user's upload folders whose server process no longer runs."""
    for d in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        try:
            pid = int(d.name[len(_PREFIX):].split("-", 1)[0])
            if d.stat().st_uid != os.getuid() or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s, left by a server that was stopped without clean-up", d)
        except (ValueError, OSError):
            continue
