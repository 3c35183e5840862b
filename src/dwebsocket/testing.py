"""Test your WebSocket views without a server, the way ``django.test.Client`` tests the others.

::

    from django.test import TestCase
    from dwebsocket.testing import WebSocketClient

    class EchoTests(TestCase):
        def test_echo(self):
            client = WebSocketClient()
            with client.connect("/echo/") as ws:
                ws.send("hello")
                self.assertEqual(ws.receive(), "You said: hello")

The request goes through the project's whole middleware stack and URL
resolver, and the view gets the same ``request.websocket`` as under a real
server; only the bytes stay in memory. The view runs in a thread of its own
(as under a server) that uses the test's database connections, so it sees the
data of a ``TestCase``, as views called by ``django.test.Client`` do.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.cookies import SimpleCookie
from types import TracebackType
from typing import Any

from django.core import signals
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.test import Client, RequestFactory
from django.test.client import ClientHandler

from .connection import Link
from .handshake import Handshake
from .messages import Frame, Message, check_close_code, check_message
from .session import PROTOCOL, RESUME_PARAMETER
from .transports.opener import OPENER_KEY
from .transports.policy import OVERFLOW_CLOSE, RATE_CLOSE, RateMeter, offer_verdict, too_big

__all__ = ["ClientConnection", "HandshakeRefused", "WebSocketClient"]


class HandshakeRefused(Exception):
    """The view (or a middleware) answered the handshake with a plain HTTP response.

    :attr:`response` is that response: a 400 from ``@require_websocket``, a
    403, a login redirect, a 404 for a URL that matches no view...
    """

    def __init__(self, response: HttpResponseBase) -> None:
        super().__init__(f"the WebSocket handshake was refused with {response.status_code}")
        self.response = response
        self.status_code = response.status_code


class WebSocketClient:
    """Opens WebSocket connections to the project's views, in memory.

    Holds cookies like ``django.test.Client``: :meth:`login` and
    :meth:`force_login` make the connections it opens belong to that user.
    *headers* are sent with every handshake; with *raise_view_exception*
    (the default, as for ``django.test.Client``) an exception raised by a
    view is raised again in the test.
    """

    def __init__(
        self, *, headers: dict[str, str] | None = None, raise_view_exception: bool = True
    ) -> None:
        self._http = Client(headers=headers)
        self._headers = dict(headers or {})
        self._handler = ClientHandler(enforce_csrf_checks=False)
        self._handler_lock = threading.Lock()  # guards _handler_loaded
        self._handler_loaded = False
        self.raise_view_exception = raise_view_exception

    @property
    def cookies(self) -> SimpleCookie:
        """The cookies sent with each handshake (shared with :attr:`http`)."""
        return self._http.cookies

    @property
    def http(self) -> Client:
        """A ``django.test.Client`` with the same cookies, for plain requests."""
        return self._http

    def login(self, **credentials: Any) -> bool:
        """Log in as ``django.test.Client.login`` does."""
        return self._http.login(**credentials)

    def force_login(self, user: Any, backend: str | None = None) -> None:
        """Log *user* in without credentials, as ``django.test.Client.force_login`` does."""
        self._http.force_login(user, backend)

    def logout(self) -> None:
        """Log out, as ``django.test.Client.logout`` does."""
        self._http.logout()

    def connect(
        self,
        path: str,
        data: dict[str, Any] | None = None,
        *,
        subprotocols: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        recovery: bool = False,
        resume: ClientConnection | None = None,
    ) -> ClientConnection:
        """Open a connection to the view at *path*, with *data* as its query string.

        Returns once the view accepted the connection (its first use of
        ``request.websocket``). Raises :class:`HandshakeRefused` if it answered
        with a response instead, the view's exception if it raised first, and
        ``TimeoutError`` if it did neither within *timeout* seconds.

        With *recovery*, the connection speaks ``dwebsocket.v1`` as
        ``dwebsocket.js`` does (docs/delivery.md): it keeps each group's
        position (:attr:`ClientConnection.positions`) and what each join
        recovered (:attr:`ClientConnection.recovered`). *resume*, an earlier
        such connection (closed), reconnects as ``dwebsocket.js`` does after a
        drop: the view's joins first deliver what that connection missed.
        """
        recovery = recovery or resume is not None
        if recovery:
            subprotocols = [*(f"{PROTOCOL}+{p}" for p in subprotocols), PROTOCOL]
            if resume is not None:
                data = {**(data or {}), RESUME_PARAMETER: json.dumps(resume._resume())}
        handshake = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        if subprotocols:
            handshake["Sec-WebSocket-Protocol"] = ", ".join(subprotocols)
        all_headers = {"Host": "testserver", **self._headers, **handshake, **(headers or {})}
        request = RequestFactory().get(path, data, headers=all_headers)
        environ = dict(request.environ)
        cookies = "; ".join(f"{m.key}={m.coded_value}" for m in self.cookies.values())
        if cookies:
            environ["HTTP_COOKIE"] = cookies
        connection = ClientConnection(self, recovery, resume)
        environ[OPENER_KEY] = _InMemoryOpener(connection)
        with self._handler_lock:
            if not self._handler_loaded:  # at the first connect, as django.test.Client does
                self._handler.load_middleware()
                self._handler_loaded = True
        connection._run(self._handler, environ)
        connection._wait_open(timeout)
        if recovery:
            connection._welcome(timeout)
        return connection


class ClientConnection:
    """The test's end of a connection; the view's end is ``request.websocket``.

    It has the same shape: :meth:`send` returns ``False`` once closed and
    :meth:`receive` returns ``None`` once closed, so a test reads like the view.
    """

    def __init__(
        self, client: WebSocketClient, recovery: bool = False, resume: ClientConnection | None = None
    ) -> None:
        self._client = client
        self._recovery = recovery
        #: With ``recovery``: the position of the last broadcast received from each group.
        self.positions: dict[str, str] = dict(resume.positions) if resume is not None else {}
        #: With ``recovery``: for each group the view joined, whether what was missed was recovered
        #: (``None``: there was nothing to recover, the connection had no position in it).
        self.recovered: dict[str, bool | None] = {}
        #: With ``recovery``: the group of each message received so far that was a broadcast, else ``None``.
        self.groups: list[str | None] = []
        #: With ``recovery``: this connection's id (what ``exclude=`` names it by).
        self.id: str | None = None
        self._ids: list[str] = list(resume._ids) if resume is not None else []
        # Messages and the close from the view, in order; put by the view's
        # thread (or loop), taken by the test's thread.
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        # Guarded by _lock: the view's connection, the close, and how the view ended.
        self._lock = threading.Lock()
        self._server: Link | None = None
        self._rate: RateMeter | None = None  # WEBSOCKET_RATE_LIMIT, made at the accept
        self._close: tuple[int, str] | None = None
        self._opened = threading.Event()
        self._finished = threading.Event()
        self._response: HttpResponseBase | None = None
        self._exception: BaseException | None = None
        self._thread: threading.Thread | None = None
        # When the test last received a message (or its inbox became non-empty), for
        # the slow-client policy of broadcasts; guarded by _lock.
        self._progress = time.monotonic()
        self.subprotocol: str | None = None
        """The subprotocol the view agreed to, or ``None``."""

    # -- the test's side ----------------------------------------------------

    def send(self, message: Message, timeout: float = 5.0) -> bool:
        """Send ``str`` as text or ``bytes`` as binary to the view; ``False`` once closed.

        Waits while the view's queue is full (``WEBSOCKET_MAX_QUEUE``), as a
        real client waits for the server to read; raises ``TimeoutError`` if
        the view reads nothing for *timeout* seconds. A message over
        ``WEBSOCKET_MAX_MESSAGE_SIZE`` closes the connection with 1009, and
        one over ``WEBSOCKET_RATE_LIMIT`` with 1008, as a server does.
        """
        message = check_message(message)
        if self._recovery:
            message = "\n" + message if isinstance(message, str) else b"\n" + message
        with self._lock:
            server = self._server if self._close is None else None
            over_rate = server is not None and self._rate is not None and not self._rate.allow()
        if server is None:
            return False
        if too_big(message, server.limits) or over_rate:
            code, reason = (1009, "message too big") if not over_rate else RATE_CLOSE
            self._closed_by_view(code, reason)
            server.closed_with(code, reason)
            return True  # sent: the server's answer is the close
        deadline = time.monotonic() + timeout
        while not server.deliver_nowait(message):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the view read none of its queued messages for {timeout} s")
            time.sleep(0.005)
        return True

    def receive(self, timeout: float = 5.0) -> Message | None:
        """The next message from the view; ``None`` once the connection is closed.

        Raises ``TimeoutError`` if the view sends nothing for *timeout*
        seconds while the connection is open, and the view's exception if it
        raised.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, value = self._inbox.get(timeout=max(deadline - time.monotonic(), 0))
                with self._lock:
                    self._progress = time.monotonic()
            except queue.Empty:
                raise TimeoutError(f"the view sent nothing for {timeout} s") from None
            if kind == "close":
                self._inbox.put((kind, value))  # every later receive() sees the close too
                self._join(timeout)
                self._raise_view_exception()
                return None
            if not self._recovery:
                return value  # type: ignore[no-any-return]
            message = self._unwrap(value)
            if message is not None:
                return message

    def _unwrap(self, raw: Message) -> Message | None:
        """A dwebsocket.v1 message's payload, or ``None`` for a control message (which it applies)."""
        newline = raw.find("\n" if isinstance(raw, str) else b"\n")  # type: ignore[arg-type]
        head, payload = raw[:newline], raw[newline + 1:]
        header = json.loads(head) if head else {}
        kind = header.get("t")
        if kind == "welcome":
            self.id = header["id"]
            self._ids.append(header["id"])
        elif kind == "joined":
            self.recovered[header["g"]] = header["r"]
            if header.get("p"):
                self.positions[header["g"]] = header["p"]
        elif kind == "left":
            self.positions.pop(header["g"], None)
        elif kind is None:
            if "p" in header:
                self.positions[header["g"]] = header["p"]
            self.groups.append(header.get("g"))
            return payload
        return None

    def _welcome(self, timeout: float) -> None:
        """Take the welcome, the first message of a dwebsocket.v1 connection."""
        kind, value = self._inbox.get(timeout=timeout)
        if kind != "message":
            self._inbox.put((kind, value))
            return
        self._unwrap(value)
        if self.id is None:
            raise AssertionError(f"a dwebsocket.v1 connection began with {value!r}, not its welcome")

    def _resume(self) -> dict[str, Any]:
        """What this connection tells the server when it reconnects (the resume parameter)."""
        return {"p": self.positions, "x": self._ids[-5:]}

    def close(self, code: int = 1000, reason: str = "", timeout: float = 5.0) -> None:
        """Close from the client's side and wait for the view to return.

        Once it returns, whatever the view did on the close (saving, leaving
        a group) is done. Raises the view's exception if it raised.
        """
        check_close_code(code, reason)
        self._close_and_join(code, reason, timeout)
        self._raise_view_exception()

    @property
    def closed(self) -> bool:
        """Whether either side closed the connection."""
        with self._lock:
            return self._close is not None

    @property
    def close_code(self) -> int | None:
        """The close code, once closed: the view's, or the test's if it closed first."""
        with self._lock:
            return None if self._close is None else self._close[0]

    @property
    def close_reason(self) -> str:
        """The close reason, once closed."""
        with self._lock:
            return "" if self._close is None else self._close[1]

    def __iter__(self) -> Iterator[Message]:
        """The messages from the view until it closes."""
        while (message := self.receive()) is not None:
            yield message

    def __enter__(self) -> ClientConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # the test failed already: close, and let its own error through
            self._close_and_join(1000, "", 5.0)

    def _close_and_join(self, code: int, reason: str, timeout: float) -> None:
        with self._lock:
            server = self._server
            first = self._close is None
            if first:
                self._close = (code, reason)
        if first:
            self._inbox.put(("close", (code, reason)))
            if server is not None:
                server.closed_with(code, reason)
        self._join(timeout)

    # -- the view's side (through _InMemoryOpener and _InMemoryTransport) -------

    def _run(self, handler: ClientHandler, environ: dict[str, Any]) -> None:
        """Run the request in a thread that uses this thread's database connections."""
        shared = [connections[alias] for alias in connections]
        for db in shared:
            db.inc_thread_sharing()

        def record(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
            if request is not None and request.META.get(OPENER_KEY) is environ[OPENER_KEY]:
                with self._lock:
                    self._exception = sys.exc_info()[1]

        def run() -> None:
            for db in shared:
                connections[db.alias] = db
            signals.got_request_exception.connect(record, weak=False)
            response: HttpResponseBase
            try:
                response = handler(environ)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                with self._lock:
                    self._exception = self._exception or exc
                response = HttpResponse(status=500)
            finally:
                signals.got_request_exception.disconnect(record)
                for db in shared:
                    db.dec_thread_sharing()
            with self._lock:
                self._response = response
                if self._close is None:
                    self._close = (1006, "")
                    self._inbox.put(("close", self._close))
            self._finished.set()
            self._opened.set()

        self._thread = threading.Thread(target=run, name="dwebsocket-test-view", daemon=True)
        self._thread.start()

    def _wait_open(self, timeout: float) -> None:
        if not self._opened.wait(timeout):
            raise TimeoutError(f"the view neither accepted nor refused the connection in {timeout} s")
        with self._lock:
            server = self._server
            response = self._response
        if server is None:
            self._join(timeout)
            self._raise_view_exception()
            assert response is not None
            raise HandshakeRefused(response)

    def _join(self, timeout: float) -> None:
        if self._thread is not None and not self._finished.wait(timeout):
            raise TimeoutError(f"the view did not return within {timeout} s of the close")

    def _raise_view_exception(self) -> None:
        with self._lock:
            exception, self._exception = self._exception, None
        if exception is not None and self._client.raise_view_exception:
            raise exception

    def _accepted(self, server: Link, subprotocol: str | None) -> None:
        if self._recovery and subprotocol is not None and subprotocol.startswith(PROTOCOL):
            subprotocol = subprotocol[len(PROTOCOL) + 1:] or None  # the page's own, as dwebsocket.js shows it
        with self._lock:
            self._server = server
            self._rate = RateMeter(server.limits)
            self.subprotocol = subprotocol
        self._opened.set()

    def _from_view(self, message: Message) -> bool:
        with self._lock:
            if self._close is not None:
                return False
            self._inbox.put(("message", message))
            return True

    def _offered(self, message: Message, link: Link) -> bool:
        """A broadcast: taken unless the test fell WEBSOCKET_BROADCAST_QUEUE messages behind."""
        with self._lock:
            if self._close is not None:
                return False
            waiting = self._inbox.qsize()
            if waiting == 0:
                self._progress = time.monotonic()
            verdict = offer_verdict(waiting, time.monotonic() - self._progress, link.limits)
            if verdict == "queued":
                self._inbox.put(("message", message))
                return True
        if verdict == "overflow":
            self._closed_by_view(*OVERFLOW_CLOSE)
            link.closed_with(*OVERFLOW_CLOSE)
        return False

    def _closed_by_view(self, code: int, reason: str) -> None:
        with self._lock:
            if self._close is not None:
                return
            self._close = (code, reason)
            self._inbox.put(("close", self._close))


class _InMemoryOpener:
    """Answers the handshake of a :class:`WebSocketClient` connection."""

    def __init__(self, client_side: ClientConnection) -> None:
        self._client_side = client_side
        self.offered_subprotocols: list[str] = []

    def prepare(self, request: HttpRequest) -> None:
        # The same validation (and Origin check) as under a server.
        self.offered_subprotocols = Handshake(request).offered_subprotocols

    def open(self, link: Link, subprotocol: str | None) -> _InMemoryTransport:
        transport = _InMemoryTransport(self._client_side, link)
        link.opened(transport)
        self._client_side._accepted(link, subprotocol)
        return transport

    async def aopen(self, link: Link, subprotocol: str | None) -> _InMemoryTransport:
        return self.open(link, subprotocol)

    def finish(self, transport: object) -> HttpResponseBase:
        if isinstance(transport, _InMemoryTransport):
            transport.close(1000, "")
        return HttpResponse(status=101)

    async def afinish(self, transport: object) -> HttpResponseBase:
        return self.finish(transport)


class _InMemoryTransport:
    """Carries one connection's messages from the view to the test."""

    def __init__(self, client_side: ClientConnection, link: Link) -> None:
        self._client_side = client_side
        self._link = link

    def send(self, message: Message) -> bool:
        return self._client_side._from_view(message)

    async def asend(self, message: Message) -> bool:
        return self.send(message)

    def close(self, code: int, reason: str) -> None:
        self._client_side._closed_by_view(code, reason)
        self._link.closed_with(code, reason)

    async def aclose(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def offer(self, frame: Frame) -> bool:
        return self._client_side._offered(frame.message, self._link)
