"""``request.websocket``: the connection object a Django view talks through.

:class:`WebSocket` serves sync views, :class:`AsyncWebSocket` async ones; both
have the same members. Neither knows which server carries the connection: an
*opener* (``dwebsocket.transports.opener``) answers the handshake and provides
the transport.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from django.core import signals
from django.http import HttpRequest, HttpResponse, QueryDict
from django.http.response import HttpResponseBase

from . import conf, groups
from . import metrics as _metrics
from .connection import CLOSED, CONNECTING, OPEN, Connection, Transport, wake_future
from .handshake import HandshakeError
from .messages import Message, check_close_code, check_message
from .session import Resume, Session, answer, plain, split_offer, take_resume
from .transports.opener import Opener, opener_for
from .transports.policy import Limits

__all__ = ["AsyncWebSocket", "WebSocket", "arun_websocket_view", "attach", "run_websocket_view"]

logger = logging.getLogger("dwebsocket")


_UNKNOWN = object()

_FULL = (
    "This server holds as many connections as WEBSOCKET_MAX_CONNECTIONS allows; try again later."
)
_FULL_LOG_EVERY = 10.0  # seconds between two warnings that the process is full
# When the last such warning was written. Read and written without a lock: two
# threads that race here write two warnings instead of one, nothing worse.
_full_warned_at = -_FULL_LOG_EVERY


def _warn_full() -> None:
    """Log that a connection was refused for WEBSOCKET_MAX_CONNECTIONS, at most every few seconds."""
    global _full_warned_at
    now = time.monotonic()
    if now - _full_warned_at >= _FULL_LOG_EVERY:
        _full_warned_at = now
        logger.warning(
            "dwebsocket: refused a connection (503): this process holds %s, WEBSOCKET_MAX_CONNECTIONS.",
            conf.get("WEBSOCKET_MAX_CONNECTIONS"),
        )


def _user_id(request: HttpRequest) -> str | None:
    try:
        user = request.user  # type: ignore[attr-defined]
        if user is not None and user.is_authenticated:
            return str(user.pk)
    except Exception:  # no auth middleware, or a lazy user that cannot load here (async)
        pass
    return None


# The _accept_lock of every connection whose handshake answer is claimed (see WebSocket.__init__).
_CLAIMED = threading.Lock()

# The latest connection of each page (dwebsocket.v1 client id) in this
# process, held weakly; guarded by _pages_lock.
_pages: weakref.WeakValueDictionary[str, WebSocket] = weakref.WeakValueDictionary()
_pages_lock = threading.Lock()


class WebSocket(Connection):
    """The WebSocket of one request, as ``request.websocket`` in a sync view.

    The handshake is answered when the view first uses the connection (any
    method or :attr:`connected`), so a view may still refuse the client by
    returning an ordinary response (a 403, a login redirect) before touching
    it. Every member is documented on :class:`dwebsocket.connection.Connection`.
    """

    __slots__ = (
        "_accept_lock", "_accepted", "_finished_response", "_opener", "_prepared", "_request", "_resume",
        "_subprotocol", "_supported_subprotocols", "_user_id", "_wire_subprotocol",
    )

    def __init__(self, request: HttpRequest, opener: Opener) -> None:
        super().__init__(Limits.from_settings())
        self._request = request
        self._opener = opener
        self._prepared = False
        self._supported_subprotocols: tuple[str, ...] = ()
        self._subprotocol: str | None = None  # the view's (the page's own)
        self._wire_subprotocol: str | None = None  # the handshake's answer
        # What a dwebsocket.v1 client says it has (the resume parameter, taken
        # out of the request by attach()).
        self._resume: Resume | None = None
        # Guarded by _accept_lock: the handshake is answered once, by whichever
        # thread or coroutine uses the connection first; the others wait for the
        # answer. Once it is given (the state is no longer CONNECTING, for good)
        # nobody waits on the lock any more: it is replaced by one shared lock
        # (_CLAIMED), so an open connection keeps none.
        self._accept_lock = threading.Lock()
        self._accepted = False
        self._finished_response: HttpResponseBase | None = None
        self._user_id: object = _UNKNOWN

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol agreed with the client, or ``None``."""
        self._start()
        return self._subprotocol

    @property
    def protocol(self) -> str | None:
        """Same as :attr:`subprotocol` (the original dwebsocket's name)."""
        return self.subprotocol

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._request.path} {self._state}>"

    @property
    def user_id(self) -> str | None:
        """The primary key of ``request.user``, if it is logged in and already loaded."""
        if self._user_id is _UNKNOWN:
            self._user_id = _user_id(self._request)
        return self._user_id  # type: ignore[return-value]

    def join(self, group: str) -> None:
        """Add this connection to *group*; it leaves by itself when it closes.

        Answers the handshake first, if the view has not used the connection yet.
        A ``dwebsocket.js`` client that was in *group* before it reconnected
        first gets the broadcasts it missed (docs/delivery.md).
        """
        self._start()
        session = self._session
        if session is None:
            groups.wait_join(groups.join(self._link, group))
            return
        asked = session.hold(group)
        try:
            groups.wait_join(groups.join(self._link, group))
        except BaseException:
            session.unhold(group)
            raise
        self._recovered(session, group, asked, groups.history_since(group, asked))

    def _recovered(self, session: Session, group: str, asked: tuple[str, int] | None, found: Any) -> None:
        entries, current, complete = found
        transport = self._open_transport()
        if transport is None:
            session.unhold(group)
        else:
            session.recovered(group, transport, asked, entries, current, complete)

    def leave(self, group: str) -> None:
        """Remove this connection from *group*."""
        groups.wait_join(groups.leave(self._link, group))
        if self._session is not None:
            self._session.left(group, self._open_transport())

    # -- driven by the decorators and the middleware ----------------------------

    def _prepare(self, subprotocols: Iterable[str] | None) -> HttpResponse | None:
        """Check the handshake before the view runs; a response refuses it."""
        if self._prepared:
            return None
        self._prepared = True
        try:
            self._opener.prepare(self._request)
        except HandshakeError as exc:
            if exc.status >= 500:
                logger.error("dwebsocket: %s", exc.message)
            self._refuse()
            _metrics.refused(exc.status)
            return exc.response()
        if not self.admit(conf.get("WEBSOCKET_MAX_CONNECTIONS")):
            _warn_full()
            self._refuse()
            _metrics.refused(503)
            return HandshakeError(503, _FULL).response()
        self._supported_subprotocols = tuple(subprotocols or ())
        return None

    def _claim(self) -> bool:
        """Whether the caller (holding _accept_lock) is the one to answer the handshake."""
        if self._accepted or not self._prepared or self._state != CONNECTING:
            return False
        self._accepted = True
        speaks, offered = split_offer(self._opener.offered_subprotocols)
        self._subprotocol = next((p for p in offered if p in self._supported_subprotocols), None)
        if speaks:
            self._wire_subprotocol = answer(self._subprotocol)
            with self._cond:  # before the transport exists: read without a lock from then on
                self._session = Session(self.id, self._resume)
        else:
            self._wire_subprotocol = self._subprotocol
        return True

    def _welcome(self, read: int | None) -> None:
        """A dwebsocket.v1 connection just opened: tell the client its id (and *read*, see :meth:`_last_read`)."""
        transport = self._open_transport()
        session = self._session
        if session is not None and transport is not None:
            if read is not None:
                with self._cond:
                    session.accepted = max(session.accepted, read)
            session.welcome(transport, read)

    def _last_read(self) -> int | None:
        """For a client that numbers its messages: the last of them a view has read (0: none).

        First takes over from the page's earlier connection in this process,
        if it is still open here (the server has not noticed the drop yet):
        that one's view must not read what the page will send again.
        """
        session = self._session
        if session is None or session.client is None:
            return None
        with _pages_lock:
            earlier = _pages.get(session.client)
            _pages[session.client] = self
        if earlier is not None and earlier is not self:
            earlier._supersede()
        return groups.last_read(session.client)

    def _acknowledge(self, number: int) -> None:
        session = self._session
        if session is not None and session.client is not None:
            groups.record_read(session.client, number)
            session.acknowledge(number, self._open_transport())

    def _start(self) -> None:
        if self._state != CONNECTING:
            return
        with self._accept_lock:
            if not self._claim():
                return
            if self._opener.open(self._link, self._wire_subprotocol) is None:
                self._link.closed_with(1006)
            elif self._session is not None:
                self._welcome(self._last_read())
            # Answered (OPEN, or CLOSED): whoever takes the lock from now on finds
            # it so. Not before: a thread that uses the connection meanwhile must
            # wait here for the answer, not go on while it is CONNECTING.
            self._accept_lock = _CLAIMED

    async def _astart(self) -> None:
        if self._state != CONNECTING:
            return
        # Never block the event loop on the lock: a thread holding it may be
        # waiting for this very loop to send the handshake answer.
        lock = self._accept_lock  # the one to release: the attribute may change meanwhile
        while not lock.acquire(blocking=False):
            await asyncio.sleep(0.001)
            lock = self._accept_lock
        try:
            if not self._claim():
                return
            if await self._opener.aopen(self._link, self._wire_subprotocol) is None:
                self._link.closed_with(1006)
            elif self._session is not None:
                if self._session.client is None or groups.get_broker().synchronous:
                    read = self._last_read()
                else:  # Redis: not on the event loop
                    read = await asyncio.get_running_loop().run_in_executor(None, self._last_read)
                self._welcome(read)
            self._accept_lock = _CLAIMED  # answered: see _start
        finally:
            lock.release()

    def _refuse(self) -> None:
        """The handshake is answered with plain HTTP: never accept it afterwards."""
        with self._accept_lock:
            self._accepted = True
        self._link.closed_with(1006)

    def _finish(self) -> HttpResponseBase:
        """End the connection after the view returned; the response for the server.

        A view that returned without touching the connection still answers the
        handshake, so the client sees a normal close rather than an error.
        """
        if self._finished_response is None:
            self._start()
            self._finished_response = self._opener.finish(self._open_transport_any())
            self._link.closed_with(1006)  # no-op unless the transport never reported the close
            self._discard()  # nobody reads any more: free the queue now, not at the next GC
        return self._finished_response

    async def _afinish(self) -> HttpResponseBase:
        if self._finished_response is None:
            await self._astart()
            self._finished_response = await self._opener.afinish(self._open_transport_any())
            self._link.closed_with(1006)
            self._discard()
        return self._finished_response

    def _open_transport_any(self) -> Transport | None:
        with self._cond:
            return self._transport


class AsyncWebSocket:
    """The WebSocket of one request, as ``request.websocket`` in an ``async def`` view.

    The same members as :class:`WebSocket`; those that wait are coroutines::

        async for message in request.websocket:
            await request.websocket.send(message)

    The handshake is answered at the first ``await`` on the connection. Until
    then :attr:`connected` is ``True``: the connection is not closed yet.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    def __repr__(self) -> str:
        return f"<AsyncWebSocket {self._ws._request.path} {self._ws._state}>"

    async def wait(self, timeout: float | None = None) -> Message | None:
        """The next message (``str`` or ``bytes``); ``None`` once closed or after *timeout*."""
        ws = self._ws
        await ws._astart()
        with ws._cond:  # a message already waiting needs no wake-up
            message = ws._pop()
        if message is not None:
            ws._acknowledge_read()
            return message
        if ws._state in (CLOSED, CONNECTING):
            return None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed, listener = wake_future(loop)
            remove = ws._link.listen(listener)
            try:
                with ws._cond:
                    message = ws._pop()
                if message is not None:
                    ws._acknowledge_read()
                    return message
                if ws._state in (CLOSED, CONNECTING):
                    return None
                if deadline is None:
                    await changed  # no wait_for: an idle view keeps one coroutine frame fewer
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(changed, remaining)
                except asyncio.TimeoutError:
                    return None
            finally:
                remove()

    async def read(self) -> Message | None:
        """The next received message at once, or ``None`` if there is none."""
        await self._ws._astart()
        with self._ws._cond:
            message = self._ws._pop()
        self._ws._acknowledge_read()
        return message

    async def send(self, message: Message) -> bool:
        """Send ``str`` as a text frame, ``bytes`` as a binary one; ``False`` if closed."""
        message = check_message(message)
        await self._ws._astart()
        transport = self._ws._open_transport()
        if transport is None:
            return False
        if self._ws._session is not None:
            message = plain(message)
        _metrics.sent(message)
        return await transport.asend(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; idempotent."""
        check_close_code(code, reason)
        await self._ws._astart()
        transport = self._ws._link.begin_close()
        if transport is not None:
            await transport.aclose(code, reason)

    async def disconnect(self) -> None:
        """Close normally (1000); idempotent."""
        await self.close()

    async def join(self, group: str) -> None:
        """Add this connection to *group*; it leaves by itself when it closes (see :meth:`WebSocket.join`)."""
        ws = self._ws
        await ws._astart()
        session = ws._session
        if session is None:
            await groups.await_join(groups.join(ws._link, group))
            return
        asked = session.hold(group)
        try:
            await groups.await_join(groups.join(ws._link, group))
        except BaseException:
            session.unhold(group)
            raise
        ws._recovered(session, group, asked, await groups.ahistory_since(group, asked))

    async def leave(self, group: str) -> None:
        """Remove this connection from *group*."""
        await groups.await_join(groups.leave(self._ws._link, group))
        if self._ws._session is not None:
            self._ws._session.left(group, self._ws._open_transport())

    @property
    def id(self) -> str:
        """A unique id for this connection, across every process of a deployment."""
        return self._ws.id

    def count_messages(self) -> int:
        """The number of received messages waiting to be read."""
        with self._ws._cond:
            return len(self._ws._messages)

    def has_messages(self) -> bool:
        """Whether a received message is waiting to be read."""
        return self.count_messages() > 0

    @property
    def connected(self) -> bool:
        """``True`` until a close frame is sent or received."""
        return self._ws._state in (CONNECTING, OPEN)

    @property
    def closed(self) -> bool:
        return self._ws.closed

    def is_closed(self) -> bool:
        return self._ws.closed

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str:
        return self._ws.close_reason

    @property
    def subprotocol(self) -> str | None:
        """The negotiated subprotocol (known once the handshake is answered)."""
        return self._ws._subprotocol

    @property
    def protocol(self) -> str | None:
        return self._ws._subprotocol

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while (message := await self.wait()) is not None:
            yield message


def _name(view: Callable[..., Any]) -> str:
    return getattr(view, "__qualname__", None) or repr(view)


def _view_failed(websocket: WebSocket, view: Callable[..., Any]) -> bool:
    """After the view raised: True to re-raise (nothing sent yet), else log it."""
    if websocket._state == CONNECTING:
        websocket._refuse()
        return True  # Django answers the handshake with its usual 500 page
    logger.exception("dwebsocket: error in WebSocket view %s", _name(view))
    # As Django does for any view's error (error reporters, the test client).
    signals.got_request_exception.send(sender=None, request=websocket._request)
    return False


def _refusal(websocket: WebSocket, response: Any) -> HttpResponseBase | None:
    """A response the view returned before touching the connection refuses the handshake."""
    if isinstance(response, HttpResponseBase) and websocket._state == CONNECTING:
        websocket._refuse()
        return response
    return None


def run_websocket_view(
    view: Callable[..., Any],
    request: HttpRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    subprotocols: Iterable[str] | None = None,
) -> HttpResponseBase:
    """Run a sync *view* for a WebSocket handshake; the response for the server.

    The handshake is checked first (a bad one or a foreign origin is refused
    before the view runs). If the view returns a response without having used
    ``request.websocket``, that response refuses the handshake. Otherwise the
    connection is closed when the view returns, with 1011 if it raised.
    """
    websocket = attach(request)
    assert websocket is not None
    refusal = websocket._prepare(subprotocols)
    if refusal is not None:
        return refusal
    try:
        response = view(request, *args, **kwargs)
    except Exception:
        if _view_failed(websocket, view):
            raise
        websocket.close(1011, "internal error")
    else:
        refused = _refusal(websocket, response)
        if refused is not None:
            return refused
    return websocket._finish()


async def arun_websocket_view(
    view: Callable[..., Any],
    request: HttpRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    subprotocols: Iterable[str] | None = None,
) -> HttpResponseBase:
    """:func:`run_websocket_view` for an ``async def`` view."""
    assert attach(request) is not None
    return await _async_view_runner(view, subprotocols)(request, *args, **kwargs)  # type: ignore[no-any-return]


def _async_view_runner(
    view: Callable[..., Any],
    subprotocols: Iterable[str] | None,
    plain: Callable[[], HttpResponseBase] | None = None,
) -> Callable[..., Any]:
    """An ``async def`` that runs *view* for a request as :func:`arun_websocket_view` does.

    A request that is no handshake gets ``plain()`` if given, else goes to
    *view* as it is. What ``@require_websocket`` and ``@accept_websocket`` make
    of an async view: the whole run in the one coroutine every connection
    keeps while its view runs, not a second one awaited by it.
    """

    async def run(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        websocket = attach(request)
        if websocket is None:
            if plain is not None:
                return plain()
            return await view(request, *args, **kwargs)  # type: ignore[no-any-return]
        refusal = websocket._prepare(subprotocols)
        if refusal is not None:
            return refusal
        connection = AsyncWebSocket(websocket)
        request.websocket = connection  # type: ignore[attr-defined]
        try:
            response = await view(request, *args, **kwargs)
        except Exception:
            if _view_failed(websocket, view):
                raise
            await connection.close(1011, "internal error")
        else:
            refused = _refusal(websocket, response)
            if refused is not None:
                return refused
        return await websocket._afinish()

    return run


def _take_resume(request: HttpRequest) -> Resume | None:
    """Take a dwebsocket.v1 client's resume out of *request*: the view sees the query string without it."""
    resume, rest = take_resume(request.META.get("QUERY_STRING", ""))
    if resume is not None:
        request.META["QUERY_STRING"] = rest
        request.GET = QueryDict(rest, encoding=request.encoding)
    return resume


def attach(request: HttpRequest) -> WebSocket | None:
    """Set ``request.websocket`` and ``request.is_websocket()``; idempotent."""
    if "websocket" in request.__dict__:
        current = request.websocket  # type: ignore[attr-defined]
        return current._ws if isinstance(current, AsyncWebSocket) else current
    opener = opener_for(request)
    websocket = WebSocket(request, opener) if opener is not None else None
    if websocket is not None:
        websocket._resume = _take_resume(request)
    request.websocket = websocket  # type: ignore[attr-defined]
    # One of two shared functions, not a closure per request (an idle connection keeps its request).
    request.is_websocket = _is_websocket if websocket is not None else _is_not_websocket  # type: ignore[attr-defined]
    return websocket


def _is_websocket() -> bool:
    """``request.is_websocket()`` of a WebSocket handshake."""
    return True


def _is_not_websocket() -> bool:
    """``request.is_websocket()`` of any other request."""
    return False
