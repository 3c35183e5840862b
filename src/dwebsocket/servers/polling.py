"""Long-polling: the same view and ``request.websocket`` for clients without WebSocket.

The browser client (``static/dwebsocket/dwebsocket.js``) falls back to this
when a WebSocket cannot be opened. It speaks JSON over HTTP on the view's own
URL, the action chosen by the ``dwebsocket`` query parameter::

    POST ?dwebsocket=open              {"protocols": [...]}   -> {"sid": S, "subprotocol": P, "timeout": T}
    GET  ?dwebsocket=poll&sid=S                               -> {"messages": [...], "close": null}
    POST ?dwebsocket=send&sid=S        {"messages": [...]}    -> 204
    POST ?dwebsocket=close&sid=S       {"code": C, "reason": R} -> 204

A message is ``{"text": "..."}`` or ``{"binary": "<base64>"}``. ``open`` runs
through the whole middleware stack, then the view runs in a thread of its own
for the life of the session, exactly as for a WebSocket. The session id is
unguessable and bound to the client's session cookie; it is the only thing
that lets a request reach a session, so ``send`` and ``close`` are safe from
CSRF without a token. A session whose client stops polling expires, and the
view sees the connection close (1006).

Sessions live in the process that opened them, unless ``WEBSOCKET_BROKER`` is
Redis: then their queues live in Redis and any process serves any request
(``servers/polling_shared.py``). Under an ASGI server nothing here holds a
thread while it waits: ``open`` awaits the view's accept, ``poll`` its messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import threading
import time
from collections import deque
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase

from .. import conf
from ..connection import Connection, Message, wake_future
from ..handshake import HandshakeError, check_origin

logger = logging.getLogger("dwebsocket")

ACTIONS = ("open", "poll", "send", "close")
_OUTBOX = 1024  # messages waiting for the client's next poll, before it counts as too slow


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _encode(message: Message) -> dict[str, str]:
    if isinstance(message, str):
        return {"text": message}
    return {"binary": base64.b64encode(message).decode("ascii")}


def _decode(item: Any) -> Message:
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    if isinstance(item, dict) and isinstance(item.get("binary"), str):
        return base64.b64decode(item["binary"], validate=True)
    raise ValueError("a message is {\"text\": str} or {\"binary\": base64}")


class _Accepted:
    """Set once, when the view accepted the session or ended without accepting.

    A thread (:meth:`wait`) or a coroutine (:meth:`await_set`) can wait for it.
    ``_lock`` guards ``_wakes``, the wake-ups of waiting coroutines.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._wakes: list[Any] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            wakes, self._wakes = self._wakes, []
        for wake in wakes:
            wake()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    async def await_set(self, timeout: float) -> bool:
        done, wake = wake_future(asyncio.get_running_loop())
        with self._lock:
            if self._event.is_set():
                return True
            self._wakes.append(wake)
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            pass
        return self._event.is_set()


class PollingSession:
    """One client's session: its outbound queue, and the view's connection.

    ``_cond`` guards ``_outbox``, ``_close``, ``_polling`` and ``_last_seen``.
    """

    def __init__(self, binding: str | None) -> None:
        self.sid = secrets.token_urlsafe(24)
        self.binding = binding
        self.connection: Connection | None = None
        self.accepted = _Accepted()
        self.refusal: HttpResponseBase | None = None
        self._cond = threading.Condition()
        self._outbox: deque[dict[str, str]] = deque()
        self._close: dict[str, Any] | None = None
        self._polling = 0
        self._last_seen = time.monotonic()
        self._listeners: set[Any] = set()  # wake-ups of async polls, called under _cond
        # With a Redis broker the queues live in Redis (servers/polling_shared.py).
        self.shared: Any = None
        self.finished = False

    # -- the view's side (through PollingTransport) -----------------------------

    def push(self, message: Message) -> bool:
        if self.shared is not None:
            if self.finished:
                return False
            self.shared.push(self.sid, _encode(message))
            return True
        with self._cond:
            if self._close is not None:
                return False
            if len(self._outbox) >= _OUTBOX:
                self._close = {"code": 1013, "reason": "too slow"}
            else:
                self._outbox.append(_encode(message))
            self._changed()
            return self._close is None

    def close(self, code: int, reason: str) -> None:
        with self._cond:
            first = self._close is None
            if first:
                self._close = {"code": code, "reason": reason}
            self.finished = True
            self._changed()
        if first and self.shared is not None:
            self.shared.push(self.sid, {"close": {"code": code, "reason": reason}})
            self.shared.finished(self)
        if self.connection is not None:
            self.connection._closed(code, reason)

    # -- the client's side ----------------------------------------------------

    def take(self, timeout: float) -> dict[str, Any]:
        """Wait up to *timeout* for messages; the batch for one poll response."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._polling += 1
            try:
                while not self._outbox and self._close is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                messages = list(self._outbox)
                self._outbox.clear()
                return {"messages": messages, "close": self._close}
            finally:
                self._polling -= 1
                self._last_seen = time.monotonic()

    async def atake(self, timeout: float) -> dict[str, Any]:
        """:meth:`take` for an ASGI server: waits without holding a thread."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(changed.set)

        deadline = time.monotonic() + timeout
        with self._cond:
            self._polling += 1
            self._listeners.add(wake)
        try:
            while True:
                with self._cond:
                    changed.clear()
                    if self._outbox or self._close is not None:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            with self._cond:
                messages = list(self._outbox)
                self._outbox.clear()
                return {"messages": messages, "close": self._close}
        finally:
            with self._cond:
                self._listeners.discard(wake)
                self._polling -= 1
                self._last_seen = time.monotonic()

    def _changed(self) -> None:
        self._cond.notify_all()
        for wake in self._listeners:
            wake()

    def touch(self) -> None:
        """Start the expiry clock afresh (when the open request is answered)."""
        with self._cond:
            self._last_seen = time.monotonic()

    def expired(self, now: float, grace: float) -> bool:
        with self._cond:
            return self._polling == 0 and now - self._last_seen > grace


class _RemoteSession:
    """A session whose queues are in Redis, as a poll, send or close request sees it."""

    def __init__(self, shared: Any, sid: str, binding: str | None, owner: str) -> None:
        self.shared = shared
        self.sid = sid
        self.binding = binding
        self.owner = owner

    def take(self, timeout: float) -> dict[str, Any]:
        return self.shared.take(self.sid, timeout)  # type: ignore[no-any-return]

    async def atake(self, timeout: float) -> dict[str, Any]:
        return await self.shared.atake(self.sid, timeout)  # type: ignore[no-any-return]


class PollingTransport:
    """The transport of a connection whose client long-polls."""

    def __init__(self, session: PollingSession) -> None:
        self._session = session

    def send(self, message: Message) -> bool:
        return self._session.push(message)

    async def asend(self, message: Message) -> bool:
        if self._session.shared is not None:  # a Redis round trip: off the loop
            return await sync_to_async(self._session.push, thread_sensitive=False)(message)
        return self._session.push(message)

    def close(self, code: int, reason: str) -> None:
        self._session.close(code, reason)

    async def aclose(self, code: int, reason: str) -> None:
        if self._session.shared is not None:
            await sync_to_async(self._session.close, thread_sensitive=False)(code, reason)
        else:
            self._session.close(code, reason)

    def offer(self, encoded: Any) -> bool:
        return self._session.push(encoded.message)


class PollingOpener:
    """Answers an ``open`` request: the handshake of a polling session."""

    def __init__(self, session: PollingSession, offered: list[str]) -> None:
        self._session = session
        self.offered_subprotocols = offered
        self.subprotocol: str | None = None

    def prepare(self, request: Any) -> None:
        check_origin(request)

    def open(self, connection: Connection, subprotocol: str | None) -> PollingTransport:
        transport = PollingTransport(self._session)
        self._session.connection = connection
        self.subprotocol = subprotocol
        connection._opened(transport)
        self._session.accepted.set()
        if self._session.finished:  # the open request stopped waiting: nobody will poll
            connection._closed(1006, "the view accepted after the open request timed out")
        return transport

    async def aopen(self, connection: Connection, subprotocol: str | None) -> PollingTransport:
        return self.open(connection, subprotocol)

    def finish(self, transport: Any) -> HttpResponseBase:
        self._session.close(1000, "")
        return HttpResponse(status=204)

    async def afinish(self, transport: Any) -> HttpResponseBase:
        return self.finish(transport)


class _Sessions:
    """This process's polling sessions. ``_lock`` guards ``_sessions``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, PollingSession] = {}
        self._reaper: threading.Thread | None = None

    def add(self, session: PollingSession) -> None:
        with self._lock:
            self._sessions[session.sid] = session
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="dwebsocket-polling", daemon=True)
                self._reaper.start()

    def get(self, sid: str | None) -> PollingSession | None:
        with self._lock:
            return self._sessions.get(sid or "")

    def remove(self, session: PollingSession) -> None:
        with self._lock:
            self._sessions.pop(session.sid, None)

    def _reap(self) -> None:
        while True:
            time.sleep(1.0)
            grace = conf.get("WEBSOCKET_POLL_EXPIRY")
            now = time.monotonic()
            with self._lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                if session.expired(now, grace):
                    self.remove(session)
                    session.close(1006, "the client stopped polling")


sessions = _Sessions()


def _binding(request: HttpRequest) -> str | None:
    return request.COOKIES.get(settings.SESSION_COOKIE_NAME)


def prepare_open(request: HttpRequest) -> None:
    """Before the middleware stack runs: make ``request.websocket`` a polling connection."""
    try:
        body = json.loads(request.body or b"{}")
        offered = [str(p) for p in body.get("protocols", [])]
    except (ValueError, AttributeError, TypeError):
        offered = []
    session = PollingSession(_binding(request))
    request._dwebsocket_opener = PollingOpener(session, offered)  # type: ignore[attr-defined]
    request._dwebsocket_polling = session  # type: ignore[attr-defined]


def start(view: Any, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HttpResponseBase:
    """Run *view* for a polling session in a thread of its own; answer the open request."""
    session = _register(request)
    threading.Thread(
        target=_run_view, args=(session, view, request, args, kwargs),
        name="dwebsocket-polling-view", daemon=True,
    ).start()
    session.accepted.wait(conf.get("WEBSOCKET_POLL_TIMEOUT"))
    return _answer(request, session)


async def astart(view: Any, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HttpResponseBase:
    """:func:`start` under an ASGI server: the open request holds no thread.

    A sync view gets a thread of its own, as under WSGI; an async view runs
    as a task on the server's event loop.
    """
    if shared_sessions() is not None:  # a Redis round trip: off the loop
        session = await sync_to_async(_register, thread_sensitive=False)(request)
    else:
        session = _register(request)
    if iscoroutinefunction(view):
        task = asyncio.ensure_future(_arun_view(session, view, request, args, kwargs))
        _view_tasks.add(task)
        task.add_done_callback(_view_tasks.discard)
    else:
        threading.Thread(
            target=_run_view, args=(session, view, request, args, kwargs),
            name="dwebsocket-polling-view", daemon=True,
        ).start()
    await session.accepted.await_set(conf.get("WEBSOCKET_POLL_TIMEOUT"))
    return _answer(request, session)


# The tasks of async polling views, kept referenced until they end (the event
# loop holds tasks only weakly). Touched on the event loop only.
_view_tasks: set[asyncio.Future[None]] = set()


def _register(request: HttpRequest) -> PollingSession:
    """Make the request's session findable by its polls (here, or in Redis)."""
    session: PollingSession = request._dwebsocket_polling  # type: ignore[attr-defined]
    shared = shared_sessions()
    if shared is not None:
        session.shared = shared
        shared.create(session)
    else:
        sessions.add(session)
    return session


def _run_view(session: PollingSession, view: Any, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The life of a polling session's view, in its own thread."""
    try:
        call = async_to_sync(view) if iscoroutinefunction(view) else view
        _ended(session, response=call(request, *args, **kwargs))
    except Exception:
        logger.exception("dwebsocket: error in the view of a polling session")
        _ended(session, failed=True)
    finally:
        session.accepted.set()  # wake the open request if it still waits
        signals.request_finished.send(sender=PollingSession)


async def _arun_view(session: PollingSession, view: Any, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The life of a polling session's async view, on the event loop."""
    try:
        _ended(session, response=await view(request, *args, **kwargs))
    except Exception:
        logger.exception("dwebsocket: error in the view of a polling session")
        _ended(session, failed=True)
    finally:
        session.accepted.set()
        # Django's own handlers (closing database connections) are sync.
        await sync_to_async(signals.request_finished.send, thread_sensitive=True)(sender=PollingSession)


def _ended(session: PollingSession, response: Any = None, failed: bool = False) -> None:
    """The view returned *response* (or raised): a refusal, or the end of the session."""
    if not session.accepted.is_set():
        session.refusal = HttpResponse("Internal Server Error\n", status=500) if failed else response
    elif failed:
        session.close(1011, "internal error")


def _answer(request: HttpRequest, session: PollingSession) -> HttpResponseBase:
    """The answer to the open request, once the view accepted, refused or timed out."""
    opener: PollingOpener = request._dwebsocket_opener  # type: ignore[attr-defined]
    if session.refusal is not None or session.connection is None:
        sessions.remove(session)
        # A view that accepts later finds the session closed, and leaves no
        # thread waiting for a client that got its 503.
        session.close(1006, "the view did not accept in time")
        return session.refusal or _error(
            503, "the view did not accept the connection within WEBSOCKET_POLL_TIMEOUT seconds"
        )
    session.touch()
    return JsonResponse({
        "sid": session.sid,
        "subprotocol": opener.subprotocol,
        "timeout": conf.get("WEBSOCKET_POLL_TIMEOUT"),  # how long a poll may be held
    })


_shared: Any = None  # (url, SharedSessions) for the current WEBSOCKET_BROKER; guarded by _shared_lock
_shared_lock = threading.Lock()


def shared_sessions() -> Any:
    """The Redis session store when WEBSOCKET_BROKER is Redis, else None."""
    global _shared
    url = conf.get("WEBSOCKET_BROKER")
    if not (isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://"))):
        return None
    with _shared_lock:
        if _shared is None or _shared[0] != url:
            from .polling_shared import SharedSessions

            _shared = (url, SharedSessions(url))
        return _shared[1]


def _find(request: HttpRequest, action: str) -> tuple[PollingSession | None, HttpResponseBase | None]:
    if action not in ("poll", "send", "close"):
        return None, _error(400, f"?dwebsocket= takes one of {', '.join(ACTIONS)}; open with POST")
    sid = request.GET.get("sid") or ""
    shared = shared_sessions()
    session: Any
    if shared is not None:
        # Any process serves the session: a stand-in that reaches its queues in Redis.
        found = shared.lookup(sid) if sid else None
        session = None if found is None else _RemoteSession(shared, sid, found[0] or None, found[1])
    else:
        session = sessions.get(sid)
    if session is None or session.binding != _binding(request):
        return None, _error(404, "unknown or expired polling session; open a new one")
    try:
        check_origin(request)
    except HandshakeError as exc:
        return None, _error(403, exc.message)
    return session, None


async def ahandle(request: HttpRequest, action: str) -> HttpResponseBase:
    """:func:`handle` under an ASGI server: a poll holds no thread while it waits."""
    if action != "poll":
        return await sync_to_async(handle, thread_sensitive=False)(request, action)
    session, error = _find(request, action)
    if session is None:
        assert error is not None
        return error
    if request.method != "GET":
        return _error(405, "poll with GET")
    return JsonResponse(await session.atake(conf.get("WEBSOCKET_POLL_TIMEOUT")))


def handle(request: HttpRequest, action: str) -> HttpResponseBase:
    """Answer a ``poll``, ``send`` or ``close`` request."""
    session, error = _find(request, action)
    if session is None:
        assert error is not None
        return error
    if action == "poll":
        if request.method != "GET":
            return _error(405, "poll with GET")
        return JsonResponse(session.take(conf.get("WEBSOCKET_POLL_TIMEOUT")))
    if request.method != "POST":
        return _error(405, f"{action} with POST")
    limit = conf.get("WEBSOCKET_MAX_MESSAGE_SIZE")
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _error(400, "bad Content-Length")
    if limit is not None and length > 2 * limit + 65536:
        return _error(413, f"a request body may carry at most WEBSOCKET_MAX_MESSAGE_SIZE ({limit}) bytes of messages")
    try:
        body = json.loads(request.body or b"{}")
        if action == "close":
            code, reason = int(body.get("code", 1000)), str(body.get("reason", ""))
            messages: list[Message] = []
        else:
            messages = [_decode(item) for item in body["messages"]]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        return _error(400, f"malformed {action} request: {exc}")
    too_big = limit is not None and any(
        (len(m) if isinstance(m, bytes) else len(m.encode("utf-8"))) > limit for m in messages
    )
    if too_big:
        action, code, reason = "close", 1009, "message too big"
    if isinstance(session, _RemoteSession):
        # The view runs in the process that opened the session: its queue is in Redis.
        if action == "close":
            session.shared.send(session.sid, session.owner, [{"close": {"code": code, "reason": reason}}])
        else:
            session.shared.send(session.sid, session.owner, [_encode(m) for m in messages])
    elif action == "close":
        session.close(code, reason)
        if not too_big:  # the client still polls for the 1009 close
            sessions.remove(session)
    else:
        assert session.connection is not None
        for message in messages:
            session.connection._deliver(message)  # waits while the view's queue is full
    if too_big:
        return _error(413, f"a message is larger than WEBSOCKET_MAX_MESSAGE_SIZE ({limit})")
    return HttpResponse(status=204)
