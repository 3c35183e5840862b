"""The HTTP side of long-polling: the ``open``, ``poll``, ``send`` and ``close`` requests.

``WebSocketMiddleware`` calls in here. An ``open`` request first gets a
:class:`~.session.PollingSession` (:func:`prepare_open`, before the middleware
stack runs, so ``request.websocket`` is a polling connection); once the
stack chose the view, :func:`start` (:func:`astart` under ASGI) runs the view
for the life of the session and answers the ``open`` when the view accepts,
refuses, or takes longer than ``WEBSOCKET_POLL_TIMEOUT``. The other requests
(:func:`handle`, :func:`ahandle`) find the session in its store and answer at
once, or, for a poll, when there is something to send.

The session store is chosen here, from ``WEBSOCKET_BROKER``; nothing below
asks which one it has. Under an ASGI server nothing here holds a thread while
it waits: ``open`` awaits the view's accept, ``poll`` its messages.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from asgiref.sync import async_to_sync, iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase

from ... import conf
from ... import metrics as _metrics
from ...connection import Connection
from ...handshake import HandshakeError, check_origin
from ..opener import OPENER_KEY
from ..policy import Limits, too_big
from . import wire
from .session import PollingOpener, PollingSession
from .store import ClientEnd, LocalStore, SessionStore, StoreUnavailable

__all__ = ["ACTIONS", "ahandle", "astart", "handle", "prepare_open", "session_of", "start"]

logger = logging.getLogger("dwebsocket")

#: The values of ``?dwebsocket=`` (see :mod:`.wire`).
ACTIONS = wire.ACTIONS

#: A view as the middleware hands it over (sync or async).
View = Callable[..., object]


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse(wire.error(message), status=status)


def _binding(request: HttpRequest) -> str | None:
    return request.COOKIES.get(settings.SESSION_COOKIE_NAME)


# -- the session store -------------------------------------------------------------

# The store for each WEBSOCKET_BROKER value seen (override_settings can change
# it): "memory" -> this process's, a Redis URL -> Redis. Guarded by _stores_lock.
_stores: dict[str, SessionStore] = {}
_stores_lock = threading.Lock()


def _store() -> SessionStore:
    """The session store that ``WEBSOCKET_BROKER`` asks for."""
    url = conf.get("WEBSOCKET_BROKER")
    key = url if conf.is_redis_url(url) else "memory"
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            if key == "memory":
                store = LocalStore()
            else:
                # Imported here because redis-py is an optional dependency (dwebsocket[redis]).
                from .redis_store import RedisStore

                store = RedisStore(key)
            _stores[key] = store
        return store


# -- open -----------------------------------------------------------------------


def prepare_open(request: HttpRequest) -> None:
    """Before the middleware stack runs: make ``request.websocket`` a polling connection."""
    session = PollingSession(_binding(request), _store())
    request.META[OPENER_KEY] = PollingOpener(session, wire.parse_open(request.body))


def session_of(request: HttpRequest) -> PollingSession | None:
    """The polling session an ``open`` request opens, or ``None`` for any other request."""
    opener = request.META.get(OPENER_KEY)
    return opener.session if isinstance(opener, PollingOpener) else None


_FULL = "this server holds as many connections as WEBSOCKET_MAX_CONNECTIONS allows; try again later"


def _admit(session: PollingSession, request: HttpRequest) -> HttpResponseBase | None:
    """Take the session's place among the process's connections before its view gets a thread; 503 if full.

    The place is the connection's (``request.websocket``): it is given back
    when the session ends, or when its view returns without accepting (see
    :func:`_run_view`).
    """
    connection = request.__dict__.get("websocket")
    if isinstance(connection, Connection) and not connection.admit(conf.get("WEBSOCKET_MAX_CONNECTIONS")):
        session.give_up()
        _metrics.refused(503)
        return _error(503, _FULL)
    return None


def start(
    session: PollingSession, view: View, request: HttpRequest, args: tuple[object, ...], kwargs: dict[str, object]
) -> HttpResponseBase:
    """Run *view* for *session* in a thread of its own; answer the ``open`` request."""
    full = _admit(session, request)
    if full is not None:
        return full
    threading.Thread(
        target=_run_view, args=(session, view, request, args, kwargs),
        name="dwebsocket-polling-view", daemon=True,
    ).start()
    session.accepted.wait(conf.get("WEBSOCKET_POLL_TIMEOUT"))
    return _answer(session)


async def astart(
    session: PollingSession, view: View, request: HttpRequest, args: tuple[object, ...], kwargs: dict[str, object]
) -> HttpResponseBase:
    """:func:`start` under an ASGI server: the ``open`` request holds no thread.

    A sync view gets a thread of its own, as under WSGI; an async view runs
    as a task on the server's event loop.
    """
    full = _admit(session, request)
    if full is not None:
        return full
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
    return _answer(session)


# The tasks of async polling views, kept referenced until they end (the event
# loop holds tasks only weakly). Touched on the event loop only.
_view_tasks: set[asyncio.Future[None]] = set()


def _run_view(
    session: PollingSession, view: View, request: HttpRequest, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    """The life of a polling session's view, in its own thread."""
    try:
        call = async_to_sync(view) if iscoroutinefunction(view) else view
        _refused(session, call(request, *args, **kwargs))
    except Exception:
        logger.exception("dwebsocket: error in the view of a polling session")
        if not _refused(session, HttpResponse("Internal Server Error\n", status=500)):
            session.close(1011, "internal error")
    finally:
        session.accepted.set()  # wake the open request if it still waits
        _abandon(request)
        signals.request_finished.send(sender=PollingSession)


def _abandon(request: HttpRequest) -> None:
    """The view returned: its connection is closed, so its place is given back (see :func:`_admit`)."""
    connection = request.__dict__.get("websocket")
    connection = getattr(connection, "_ws", connection)  # an async view's AsyncWebSocket wraps it
    if isinstance(connection, Connection):
        connection.abandon()


async def _arun_view(
    session: PollingSession, view: View, request: HttpRequest, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    """The life of a polling session's async view, on the event loop."""
    try:
        response = view(request, *args, **kwargs)
        _refused(session, await response if isinstance(response, Awaitable) else response)
    except Exception:
        logger.exception("dwebsocket: error in the view of a polling session")
        if not _refused(session, HttpResponse("Internal Server Error\n", status=500)):
            await session.aclose(1011, "internal error")
    finally:
        session.accepted.set()
        _abandon(request)
        # Django's own handlers (closing database connections) are sync.
        await sync_to_async(signals.request_finished.send, thread_sensitive=True)(sender=PollingSession)


def _refused(session: PollingSession, response: object) -> bool:
    """The view ended with *response*: a refusal if it never accepted (returns whether)."""
    if session.accepted.is_set():
        return False
    session.refusal = response if isinstance(response, HttpResponseBase) else None
    return True


def _answer(session: PollingSession) -> HttpResponseBase:
    """The answer to the ``open`` request, once the view accepted, refused or timed out."""
    if session.refusal is not None:
        return session.refusal
    if session.give_up():  # a view that accepts later finds the session closed (1006)
        return _error(503, "the view did not accept the connection within WEBSOCKET_POLL_TIMEOUT seconds")
    return JsonResponse(wire.open_answer(session.sid, session.subprotocol, conf.get("WEBSOCKET_POLL_TIMEOUT")))


# -- poll, send, close --------------------------------------------------------------


def _check(request: HttpRequest, found: ClientEnd | None) -> ClientEnd | HttpResponseBase:
    """*found* if this request may reach it, else the error answer."""
    if found is None or found.binding != _binding(request):
        return _error(404, "unknown or expired polling session; open a new one")
    try:
        check_origin(request)
    except HandshakeError as exc:
        return _error(403, exc.message)
    return found


def _bad_action() -> HttpResponseBase:
    return _error(400, f"?dwebsocket= takes one of {', '.join(ACTIONS)}; open with POST")


def _unavailable(exc: StoreUnavailable) -> HttpResponseBase:
    """503 for a request the shared store could not serve: the client tries again (one log line)."""
    logger.warning("dwebsocket: a long-polling request got 503: %s", exc)
    response = _error(503, "the server's session store (Redis) did not answer; try again shortly")
    response["Retry-After"] = "1"
    return response


async def ahandle(request: HttpRequest, action: str) -> HttpResponseBase:
    """:func:`handle` under an ASGI server: a poll holds no thread while it waits."""
    try:
        return await _ahandle(request, action)
    except StoreUnavailable as exc:
        return _unavailable(exc)


async def _ahandle(request: HttpRequest, action: str) -> HttpResponseBase:
    if action != "poll":
        return await sync_to_async(handle, thread_sensitive=False)(request, action)
    found = _check(request, await _store().afind(request.GET.get("sid") or ""))
    if isinstance(found, HttpResponseBase):
        return found
    if request.method != "GET":
        return _error(405, "poll with GET")
    return JsonResponse(await found.atake(conf.get("WEBSOCKET_POLL_TIMEOUT")))


def handle(request: HttpRequest, action: str) -> HttpResponseBase:
    """Answer a ``poll``, ``send`` or ``close`` request."""
    try:
        return _handle(request, action)
    except StoreUnavailable as exc:
        return _unavailable(exc)


def _handle(request: HttpRequest, action: str) -> HttpResponseBase:
    if action not in ("poll", "send", "close"):
        return _bad_action()
    found = _check(request, _store().find(request.GET.get("sid") or ""))
    if isinstance(found, HttpResponseBase):
        return found
    if action == "poll":
        if request.method != "GET":
            return _error(405, "poll with GET")
        return JsonResponse(found.take(conf.get("WEBSOCKET_POLL_TIMEOUT")))
    if request.method != "POST":
        return _error(405, f"{action} with POST")
    limits = Limits.from_settings()
    limit = limits.max_message_size
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _error(400, "bad Content-Length")
    # Room for base64 (4/3) and JSON around the messages, without reading the body.
    if limit is not None and length > 2 * limit + 65536:
        return _error(413, f"a request body may carry at most WEBSOCKET_MAX_MESSAGE_SIZE ({limit}) bytes of messages")
    try:
        close = wire.parse_close(request.body) if action == "close" else None
        messages = wire.parse_send(request.body) if action == "send" else []
    except wire.WireError as exc:
        return _error(400, str(exc))
    if any(too_big(message, limits) for message in messages):
        found.close(1009, "message too big", polled=True)  # the client polls for the close
        return _error(413, f"a message is larger than WEBSOCKET_MAX_MESSAGE_SIZE ({limit})")
    if close is not None:
        found.close(close.code, close.reason, polled=False)
    elif not found.send(messages):  # never waits: a request thread is not the view's to hold
        return _error(429, "the view has not read what was sent before; send again later")
    return HttpResponse(status=204)
