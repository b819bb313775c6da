"""The server's one gate: an ASGI middleware in front of the REST API and the Gradio page.

- **One admission limit.** ``/predict``, ``/explain``, the page's upload and every page call (``/gradio_api/
  queue/join``, ``call/*``, ``call/v2/*``, ``run/*``, ``api/*``) take a place in the same
  :class:`~medsight.serve.batching.Admission` (``--queue-limit``); past it they are answered 429 with
  ``Retry-After`` before their body is read. A page call that Gradio queues keeps its place until its
  function ends (:func:`release`), or :data:`PAGE_HOLD_S` at the latest.
- **Only the server's own uploads.** Gradio copies any file a page call names into its cache before the
  page's function runs, and skips its own path check in a mounted app; so every file object in a page
  call is checked here, before Gradio sees it: it must name an upload this server issued
  (:meth:`UploadFolder.resolve`), else the call is refused (400) with one message, whatever the path
  points at. Accepted objects are rewritten to the stored file alone (the client's ``url``, size or
  other fields are dropped). At most :data:`MAX_FILES` file per call.
- **Only the routes the page uses.** Gradio's routes that serve or fetch files (``file=``, ``proxy=``,
  ``stream``), record or replay runs, monitor or edit the app are answered 404.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from medsight.serve.batching import Admission, ServerBusyError, Ticket
from medsight.serve.uploads import UploadFolder, UploadRefusedError

__all__ = ["Guard", "release", "PAGE_HOLD_S", "MAX_PAGE_BODY", "MAX_FILES", "TICKET"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Scope key of a request's admission ticket (the page's functions give queued calls' places back).
TICKET = "medsight.ticket"
#: A queued page call whose function never runs (cancelled, or refused by Gradio) frees its place after this.
PAGE_HOLD_S = 120.0
#: A page call's JSON body (a file token, a method name) is a few hundred bytes; larger ones get 413.
MAX_PAGE_BODY = 64 * 1024
#: Files a page call may carry: every page endpoint takes one image.
MAX_FILES = 1

_REST = frozenset({"/predict", "/explain"})
UPLOAD = "/gradio_api/upload"
_QUEUED = re.compile(r"/gradio_api/(?:queue/join|call/(?:v2/)?[^/]+)/?")  # answered with an event id
_DIRECT = re.compile(r"/gradio_api/(?:run|api)/[^/]+/?")  # answered when the function returns
_PAGE_POST = frozenset({"/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/reset/"})
_PAGE_GET = re.compile(
    r"/|/config/?|/(?:assets|static|svelte)/.+|/favicon\.ico|/theme\.css|/robots\.txt|/manifest\.json"
    r"|/pwa_icon(?:/[^/]+)?|/gradio_api/(?:info/?|openapi\.json|heartbeat/[^/]+|queue/data|queue/status"
    r"|call/(?:v2/)?[^/]+/[^/]+|startup-events|theme\.css|upload_progress|app_id/?|user/?|login_check/?)")
_API_GET = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def release(request: Any) -> None:
    """Give back the place of the page call behind ``request`` (a ``gr.Request``; idempotent)."""
    scope = getattr(getattr(request, "request", None), "scope", None)
    ticket = scope.get(TICKET) if isinstance(scope, dict) else None
    if isinstance(ticket, Ticket):
        ticket.release()


def _is_file_object(node: dict[str, Any]) -> bool:
    meta = node.get("meta")
    return "path" in node or "url" in node or (isinstance(meta, dict) and "_type" in meta)


class Guard:
    """ASGI middleware: admission, upload-only file references, and the page's route list (module notes)."""

    def __init__(self, app: Any, admission: Admission, uploads: UploadFolder | None) -> None:
        self.app, self.admission, self.uploads = app, admission, uploads

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # the page needs no websocket
            await send({"type": "websocket.close", "code": 1008})
            return
        path, method = scope["path"], scope["method"]
        page = self.uploads is not None
        try:
            if method == "POST" and (path in _REST or (page and path == UPLOAD)):
                await self._admitted(scope, receive, send, hold=False)
            elif page and method == "POST" and (_QUEUED.fullmatch(path) or _DIRECT.fullmatch(path)):
                await self._page_call(scope, receive, send, queued=bool(_QUEUED.fullmatch(path)))
            elif path in _API_GET or (page and ((method in ("GET", "HEAD") and _PAGE_GET.fullmatch(path))
                                                or (method == "POST" and path in _PAGE_POST))):
                await self.app(scope, receive, send)
            elif path in _REST or (page and path == UPLOAD):
                raise _Refused(405, "Method Not Allowed")
            else:
                raise _Refused(404, "Not Found")
        except ServerBusyError as exc:
            await JSONResponse({"detail": str(exc)}, status_code=429,
                               headers={"Retry-After": str(exc.retry_after)})(scope, receive, send)
        except _Refused as exc:
            await JSONResponse({"detail": exc.detail}, status_code=exc.status)(scope, receive, send)

    async def _admitted(self, scope: _Scope, receive: _Receive, send: _Send, hold: bool) -> None:
        ticket = self.admission.ticket(PAGE_HOLD_S if hold else None)
        try:
            await self.app({**scope, TICKET: ticket}, receive, send)
        finally:
            ticket.release()

    async def _page_call(self, scope: _Scope, receive: _Receive, send: _Send, queued: bool) -> None:
        """Admit, check every file object in the JSON body, forward the rewritten body. A queued call keeps
        its place when Gradio accepted it (200): its function gives it back (:func:`release`)."""
        ticket = self.admission.ticket(PAGE_HOLD_S if queued else None)
        status = 0
        try:
            body = self._checked(await _read_body(receive, MAX_PAGE_BODY))
            headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")]
            headers.append((b"content-length", str(len(body)).encode()))
            sent = False

            async def replay() -> MutableMapping[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            async def watch(message: MutableMapping[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app({**scope, "headers": headers, TICKET: ticket}, replay, watch)
        finally:
            if not (queued and status == 200):
                ticket.release()

    def _checked(self, body: bytes) -> bytes:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise _Refused(400, "the body must be JSON") from None
        count = [0]
        try:
            payload = self._rewrite(payload, count)
        except RecursionError:
            raise _Refused(400, "the body nests too deeply") from None
        return json.dumps(payload).encode()

    def _rewrite(self, node: Any, count: list[int]) -> Any:
        """``node`` with every file object replaced by the stored upload it names (or :class:`_Refused`)."""
        if isinstance(node, list):
            return [self._rewrite(v, count) for v in node]
        if not isinstance(node, dict):
            return node
        if not _is_file_object(node):
            return {k: self._rewrite(v, count) for k, v in node.items()}
        count[0] += 1
        if count[0] > MAX_FILES:
            raise _Refused(400, f"too many files: each page call takes {MAX_FILES}")
        assert self.uploads is not None  # noqa: S101 - page calls are routed here only with a page
        try:
            token, name = self.uploads.resolve(node)
        except UploadRefusedError as exc:
            raise _Refused(400, str(exc)) from None
        return {"path": str(self.uploads.stored_path(token)), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


async def _read_body(receive: _Receive, limit: int) -> bytes:
    """The whole request body, or :class:`_Refused` (413) past ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(413, f"a page call's body is limited to {limit:,} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
