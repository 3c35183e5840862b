"""The polling session stores: LocalStore (this process) and RedisStore, through one fixture.

Each test runs on both stores. The Redis one talks to a real redis-server on a
free 127.0.0.1 port (tests.servers.start_redis). Two kinds of sessions:

- ``open_raw``: the store API alone (``store.open`` with a recording
  ``ViewEnd``), to see the :class:`Outbound` verdicts and what the store does to
  the view;
- ``open_view``: the real view's end (a ``PollingSession`` opened for a
  ``Connection``, as ``http`` does it), to see what the view and the next poll see.

Time: the modules' ``time`` is replaced by a :class:`Clock` that adds what a
test asks for to the real clock (a stalled client without waiting
STALL_SECONDS), or stands still (a burst that takes no time at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time as _time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from dwebsocket.connection import Connection
from dwebsocket.messages import Frame
from dwebsocket.transports import policy
from dwebsocket.transports.policy import (
    BURST_FACTOR,
    OVERFLOW_CLOSE,
    STALL_SECONDS,
    Limits,
)
from dwebsocket.transports.polling import redis_store as redis_store_module
from dwebsocket.transports.polling import store as store_module
from dwebsocket.transports.polling import wire
from dwebsocket.transports.polling.redis_store import RedisStore
from dwebsocket.transports.polling.session import (
    PollingOpener,
    PollingSession,
    PollingTransport,
)
from dwebsocket.transports.polling.store import ClientEnd, LocalStore

from ..servers import start_redis

QUEUE = 3  # WEBSOCKET_BROADCAST_QUEUE of these tests
TOO_SLOW = {"code": OVERFLOW_CLOSE[0], "reason": OVERFLOW_CLOSE[1]}


# -- the clock ---------------------------------------------------------------------------


class Clock:
    """The ``time`` module of the policy and the stores: the real clock, plus what a test adds."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._frozen_at: float | None = None
        self.max_sleep: float | None = None  # set it to make the stores' clocks tick faster

    def _shift(self) -> float:
        if self._frozen_at is None:
            return self._offset
        return self._offset - (_time.monotonic() - self._frozen_at)

    def monotonic(self) -> float:
        return _time.monotonic() + self._shift()

    def time(self) -> float:
        return _time.time() + self._shift()

    def sleep(self, seconds: float) -> None:
        _time.sleep(seconds if self.max_sleep is None else min(seconds, self.max_sleep))

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No time passes inside (never wait for a poll inside: its timeout would never come)."""
        self._frozen_at = _time.monotonic()
        try:
            yield
        finally:
            self._offset, self._frozen_at = self._shift(), None

    def __getattr__(self, name: str) -> object:
        return getattr(_time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    for module in (policy, store_module, redis_store_module):
        monkeypatch.setattr(module, "time", fake)
    return fake


# -- the stores --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_store() -> Iterator[RedisStore]:
    # One store (one listener thread) for the run; the server lives until the run ends,
    # so that the listener does not log a lost Redis while other tests run.
    with start_redis() as server:
        yield RedisStore(server.url)
        # Its listener lives on, and would log that it lost Redis when the run ends.
        logging.getLogger("dwebsocket").disabled = True


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, clock: Clock) -> LocalStore | RedisStore:
    if request.param == "local":
        return LocalStore()
    return request.getfixturevalue("redis_store")


class RecordingView:
    """A ViewEnd that records what the store hands it."""

    def __init__(self, binding: str | None = None) -> None:
        self.sid = secrets.token_urlsafe(24)
        self.binding = binding
        self._cond = threading.Condition()
        self.received: list[object] = []
        self.closes: list[tuple[int, str]] = []
        self.full_at: int | None = None  # deliver_nowait refuses after this many messages...
        self.refusals = 0  # ...this many times

    def deliver(self, message: object) -> None:
        with self._cond:
            self.received.append(message)
            self._cond.notify_all()

    def deliver_nowait(self, message: object) -> bool:
        with self._cond:
            if self.full_at == len(self.received) and self.refusals > 0:
                self.refusals -= 1
                return False  # the view's queue is full: retry later
        self.deliver(message)
        return True

    def deliver_all_nowait(self, messages: list[object]) -> bool:
        with self._cond:
            if self.full_at is not None and len(self.received) <= self.full_at < len(self.received) + len(messages):
                if self.refusals > 0:
                    self.refusals -= 1
                    return False  # the view's queue has no room for them all: sent again later
        for message in messages:
            self.deliver(message)
        return True

    def close(self, code: int, reason: str) -> None:
        with self._cond:
            self.closes.append((code, reason))
            self._cond.notify_all()

    def wait_for(self, what: str, count: int, timeout: float = 5.0) -> list[object]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(getattr(self, what)) >= count, timeout), (
                f"{what}: {getattr(self, what)!r} after {timeout} s"
            )
            return list(getattr(self, what))


@dataclass
class View:
    """A session opened by a view, as ``http`` opens one: the view's connection, and the client's end."""

    conn: Connection
    session: PollingSession
    transport: PollingTransport
    client: ClientEnd

    def broadcast(self, message: str | bytes) -> bool:
        return self.conn._link.offer(Frame(message))


@pytest.fixture
def open_raw(store):
    outbounds = []

    def open_(limits: Limits, binding: str | None = None):
        view = RecordingView(binding)
        outbound = store.open(view, limits)
        outbounds.append(outbound)
        client = store.find(view.sid)
        assert client is not None
        return view, outbound, client

    yield open_
    for outbound in outbounds:
        outbound.close(1000, "")


@pytest.fixture
def open_view(store):
    sessions = []

    def open_(limits: Limits, binding: str | None = None) -> View:
        conn = Connection(limits)
        session = PollingSession(binding, store)
        transport = PollingOpener(session, []).open(conn._link, None)
        assert transport is not None
        sessions.append(session)
        client = store.find(session.sid)
        assert client is not None
        return View(conn, session, transport, client)

    yield open_
    for session in sessions:
        session.close(1000, "")


def texts(batch: wire.Batch) -> list[object]:
    return [wire.decode(item) for item in batch["messages"]]


def item(message: str | bytes) -> wire.MessageItem:
    return wire.encode(message)


def within(seconds: float, function, *args):
    """What *function* returns, which must take less than *seconds* (a hang fails, not blocks the run)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{function.__name__}{args!r} still runs after {seconds} s"
    return result[0]


def fill(view: View, prefix: str) -> None:
    """Send QUEUE messages: room for each, so none may wait."""
    assert within(5, lambda: [view.conn.send(f"{prefix}{i}") for i in range(QUEUE)]) == [True] * QUEUE


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = _time.monotonic() + timeout
    while not predicate():
        assert _time.monotonic() < deadline, f"timed out waiting for {what}"
        _time.sleep(0.01)


# -- the view's messages -------------------------------------------------------------------


def test_the_views_messages_reach_a_poll_in_order(open_view):
    view = open_view(Limits(broadcast_queue=8))
    assert view.client.take(0.05) == {"messages": [], "close": None}  # nothing yet: the poll times out
    assert view.conn.send("one") and view.conn.send(b"\x00\xff\xc3(")
    assert view.broadcast("three")
    assert view.conn.send("four")
    batch = view.client.take(2)
    assert texts(batch) == ["one", b"\x00\xff\xc3(", "three", "four"]
    assert batch["close"] is None
    assert view.conn.send("five")
    assert view.client.take(2) == {"messages": [{"text": "five"}], "close": None}  # each message once


def test_a_waiting_poll_is_answered_by_the_next_send(open_view):
    view = open_view(Limits(broadcast_queue=QUEUE))
    threading.Timer(0.1, view.conn.send, args=("late",)).start()
    started = _time.monotonic()
    batch = view.client.take(5)
    assert texts(batch) == ["late"]
    assert _time.monotonic() - started < 3  # woken by the send, not by the timeout


def test_an_async_poll_waits_without_blocking_the_loop_and_wakes_on_a_send(open_view):
    view = open_view(Limits(broadcast_queue=QUEUE))

    async def main():
        assert await view.client.atake(0.05) == {"messages": [], "close": None}
        threading.Timer(0.1, view.conn.send, args=("late",)).start()
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        started = _time.monotonic()
        batch = await view.client.atake(5)
        ticker.cancel()
        return batch, _time.monotonic() - started, ticks

    batch, elapsed, ticks = asyncio.run(main())
    assert texts(batch) == ["late"]
    assert elapsed < 3
    assert ticks >= 1  # the loop kept running while the poll waited (a blocking poll: 0)


# -- slow clients ------------------------------------------------------------------------


@pytest.mark.parametrize(("overflow", "verdict"), [("close", "overflow"), ("drop", "dropped")])
def test_a_broadcast_to_a_stalled_client_with_a_full_queue_is_refused(open_raw, clock, overflow, verdict):
    _view, outbound, client = open_raw(Limits(broadcast_queue=QUEUE, broadcast_overflow=overflow))
    assert [outbound.offer(item(f"m{i}")) for i in range(QUEUE)] == ["queued"] * QUEUE
    clock.advance(STALL_SECONDS * 1.2)  # nobody polled
    assert outbound.offer(item("late")) == verdict
    assert texts(client.take(2)) == [f"m{i}" for i in range(QUEUE)]  # the refused one is not queued


def test_the_default_policy_closes_a_stalled_client_with_1013_for_the_view_and_the_poll(open_view, clock):
    assert Limits().broadcast_overflow == "close"
    view = open_view(Limits(broadcast_queue=QUEUE))
    assert [view.broadcast(f"m{i}") for i in range(QUEUE)] == [True] * QUEUE
    clock.advance(STALL_SECONDS * 1.2)
    assert view.broadcast("late") is False
    assert view.conn.closed
    assert (view.conn.close_code, view.conn.close_reason) == OVERFLOW_CLOSE
    assert view.conn.send("after") is False
    batch = view.client.take(2)
    assert texts(batch) == [f"m{i}" for i in range(QUEUE)]  # what waited still reaches the client
    assert batch["close"] == TOO_SLOW


def test_the_drop_policy_skips_a_stalled_client_and_keeps_it_open(open_view, clock):
    view = open_view(Limits(broadcast_queue=QUEUE, broadcast_overflow="drop"))
    assert [view.broadcast(f"m{i}") for i in range(QUEUE)] == [True] * QUEUE
    clock.advance(STALL_SECONDS * 1.2)
    assert view.broadcast("skipped") is False
    assert view.conn.connected and view.conn.close_code is None
    assert view.client.take(2) == {"messages": [item(f"m{i}") for i in range(QUEUE)], "close": None}
    assert view.broadcast("after the poll") is True  # it caught up
    assert view.client.take(2) == {"messages": [item("after the poll")], "close": None}


@pytest.mark.parametrize(("overflow", "verdict"), [("close", "overflow"), ("drop", "dropped")])
def test_a_burst_is_queued_up_to_burst_factor_times_the_queue(open_raw, clock, overflow, verdict):
    _view, outbound, client = open_raw(Limits(broadcast_queue=QUEUE, broadcast_overflow=overflow))
    most = BURST_FACTOR * QUEUE
    with clock.frozen():  # a burst: no time passes, the client is not stalled
        verdicts = [outbound.offer(item(f"m{i}")) for i in range(most + 2)]
    assert verdicts == ["queued"] * most + [verdict] * 2
    assert texts(client.take(2)) == [f"m{i}" for i in range(most)]


def test_a_client_that_keeps_polling_is_not_stalled(open_raw, clock):
    _view, outbound, client = open_raw(Limits(broadcast_queue=QUEUE))
    assert [outbound.offer(item(f"a{i}")) for i in range(QUEUE)] == ["queued"] * QUEUE
    clock.advance(STALL_SECONDS * 0.6)
    assert texts(client.take(2)) == [f"a{i}" for i in range(QUEUE)]
    assert [outbound.offer(item(f"b{i}")) for i in range(QUEUE + 1)] == ["queued"] * (QUEUE + 1)
    clock.advance(STALL_SECONDS * 0.6)  # 1.2 stalls since the first broadcast, 0.6 since the poll
    assert outbound.offer(item("b4")) == "queued"
    clock.advance(STALL_SECONDS * 0.6)  # 1.2 stalls since the poll
    assert outbound.offer(item("b5")) == "overflow"
    assert texts(client.take(2)) == [f"b{i}" for i in range(QUEUE + 2)]


def test_a_client_that_stops_polling_after_a_burst_is_cut_by_the_clock(open_raw, clock):
    clock.max_sleep = 0.05  # LocalStore's reaper ticks fast (RedisStore's listener ticks every second)
    # The "drop" session first: each tick looks at it before the "close" one.
    dropped, drop_outbound, _ = open_raw(Limits(broadcast_queue=QUEUE, broadcast_overflow="drop"))
    cut, close_outbound, _ = open_raw(Limits(broadcast_queue=QUEUE, broadcast_overflow="close"))
    for outbound in (drop_outbound, close_outbound):
        assert [outbound.offer(item(f"m{i}")) for i in range(QUEUE + 2)] == ["queued"] * (QUEUE + 2)
    clock.advance(STALL_SECONDS * 1.2)  # no broadcast after the burst tells: the clock does
    assert cut.wait_for("closes", 1) == [OVERFLOW_CLOSE]
    assert dropped.closes == []


# -- the view's own sends wait for room ------------------------------------------------------


def send_in_thread(view: View, message: str) -> tuple[threading.Thread, list[bool]]:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(view.conn.send(message)), daemon=True)
    thread.start()
    return thread, result


def test_a_views_send_waits_for_room_and_a_poll_releases_it(open_view):
    view = open_view(Limits(broadcast_queue=QUEUE))
    fill(view, "v")
    thread, result = send_in_thread(view, f"v{QUEUE}")
    thread.join(0.3)
    assert thread.is_alive() and result == []  # the queue is full: it waits
    first = texts(view.client.take(2))
    thread.join(5)
    assert result == [True]
    rest = texts(view.client.take(2)) if len(first) == QUEUE else []
    assert first[:QUEUE] == [f"v{i}" for i in range(QUEUE)]
    assert first + rest == [f"v{i}" for i in range(QUEUE + 1)]
    assert view.conn.connected  # a view's own sends never count as a slow client


def test_a_waiting_send_gives_up_when_the_view_closes(open_view):
    view = open_view(Limits(broadcast_queue=QUEUE))
    fill(view, "v")
    thread, result = send_in_thread(view, "never")
    thread.join(0.2)
    assert thread.is_alive()
    view.conn.close(4000, "bye")
    thread.join(5)
    assert result == [False]
    batch = view.client.take(2)
    assert texts(batch) == [f"v{i}" for i in range(QUEUE)]
    assert batch["close"] == {"code": 4000, "reason": "bye"}
    assert (view.conn.close_code, view.conn.close_reason) == (4000, "bye")


def test_an_async_send_waits_for_room_without_blocking_the_loop(open_view):
    view = open_view(Limits(broadcast_queue=QUEUE))

    async def main():
        for i in range(QUEUE):
            assert await view.transport.asend(f"a{i}")
        waiting = asyncio.ensure_future(view.transport.asend(f"a{QUEUE}"))
        await asyncio.sleep(0.2)  # the loop runs meanwhile
        assert not waiting.done()
        first = await view.client.atake(2)
        assert await asyncio.wait_for(waiting, 5) is True
        rest = await view.client.atake(2) if len(first["messages"]) == QUEUE else wire.batch([], None)
        return texts(first) + texts(rest)

    assert within(10, asyncio.run, main()) == [f"a{i}" for i in range(QUEUE + 1)]


def test_a_closed_outbound_takes_nothing_more(open_raw):
    _view, outbound, client = open_raw(Limits(broadcast_queue=QUEUE))
    assert outbound.put(item("before"))
    outbound.close(4000, "done")
    outbound.close(4001, "again")  # idempotent: the first close stands
    assert outbound.put(item("after")) is False
    assert outbound.offer(item("after")) == "dropped"
    assert client.take(2) == {"messages": [item("before")], "close": {"code": 4000, "reason": "done"}}


# -- the client's sends and closes -----------------------------------------------------------


def test_the_clients_sends_reach_the_view_in_order(open_view):
    view = open_view(Limits())
    sent = ["a", b"\x00\xff\xc3(", "", "d"]
    view.client.send(sent)
    view.client.send(["e"])
    assert [view.conn.wait(5) for _ in range(5)] == [*sent, "e"]


def test_a_send_never_waits_for_a_view_whose_queue_is_full(open_view):
    # A request thread is not the view's to hold: a send the view's queue has no
    # room for is refused at once (the client gets 429 and sends it again).
    view = open_view(Limits(max_queue=2))
    sent = [f"c{i}" for i in range(4)]
    accepted = [within(2, lambda m=m: view.client.send([m])) for m in sent]
    refused = [m for m, ok in zip(sent, accepted) if not ok]
    got = [view.conn.wait(5), view.conn.wait(5)]
    for message in refused:  # sent again, once the view has read
        assert view.client.send([message])
    got += [view.conn.wait(5) for _ in sent[2:]]
    assert got == sent


def test_an_empty_queue_takes_a_batch_larger_than_itself(open_view):
    view = open_view(Limits(max_queue=2))
    sent = [f"c{i}" for i in range(5)]
    assert within(2, lambda: view.client.send(sent))
    assert [view.conn.wait(5) for _ in sent] == sent


def test_the_clients_sends_keep_their_order_when_the_view_is_briefly_full(open_raw):
    view, _outbound, client = open_raw(Limits())
    view.full_at, view.refusals = 2, 1  # takes two, refuses the third once, then takes the rest
    sent = [f"c{i}" for i in range(5)]
    while not client.send(sent):  # refused whole: sent again, as dwebsocket.js does on 429
        pass
    assert view.wait_for("received", len(sent)) == sent


def test_the_client_closes_after_its_last_messages(open_view):
    view = open_view(Limits())
    view.client.send(["last words"])
    view.client.close(4001, "done", polled=False)
    assert view.conn.wait(5) == "last words"
    assert view.conn.wait(5) is None
    assert (view.conn.close_code, view.conn.close_reason) == (4001, "done")
    assert view.conn.send("too late") is False


def test_a_close_the_client_polls_for_reaches_its_next_poll(open_view, store):
    view = open_view(Limits())
    view.client.close(1009, "message too big", polled=True)  # what http does with a message too big
    wait_until(lambda: view.conn.closed, what="the view to see the close")
    assert view.conn.close_code == 1009
    client = store.find(view.session.sid)
    assert client is not None  # still findable: the client polls for the close
    assert client.take(2) == {"messages": [], "close": {"code": 1009, "reason": "message too big"}}


def test_the_store_hands_the_clients_messages_and_close_to_the_view(open_raw):
    view, _outbound, client = open_raw(Limits())
    client.send(["x", b"\x01"])
    client.close(4002, "bye", polled=False)
    assert view.wait_for("received", 2) == ["x", b"\x01"]
    assert view.wait_for("closes", 1) == [(4002, "bye")]


# -- finding a session ---------------------------------------------------------------------------


def test_an_unknown_sid_is_not_found(store):
    assert store.find(secrets.token_urlsafe(24)) is None
    assert store.find("") is None

    async def main():
        return await store.afind(secrets.token_urlsafe(24)), await store.afind("")

    assert asyncio.run(main()) == (None, None)


@pytest.mark.parametrize("binding", ["cookie-a", None])
def test_a_session_is_found_with_the_binding_of_its_open(open_raw, store, binding):
    # http answers 404 to a request whose session cookie is not this binding.
    view, _outbound, client = open_raw(Limits(), binding=binding)
    assert client.binding == binding
    assert store.find(view.sid).binding == binding
    other, _, _ = open_raw(Limits(), binding="cookie-b")
    assert store.find(other.sid).binding == "cookie-b"
    assert store.find(view.sid).binding == binding  # each session keeps its own

    async def main():
        found = await store.afind(view.sid)
        return found.binding

    assert asyncio.run(main()) == binding


def test_an_empty_cookie_is_a_binding_too(request, open_raw, store):
    # A request with "sessionid=" (empty) is bound to "", which http compares with != :
    # under Redis the "" came back as None, and every poll of that client got a 404.
    _view, _outbound, client = open_raw(Limits(), binding="")
    assert client.binding == ""


def test_a_session_opened_from_a_coroutine_is_found(store):
    view = RecordingView("cookie-c")

    async def main():
        outbound = await store.aopen(view, Limits(broadcast_queue=QUEUE))
        assert await outbound.aput(item("hello"))
        found = await store.afind(view.sid)
        batch = await found.atake(2)
        await outbound.aclose(1000, "")
        return found.binding, batch

    binding, batch = within(10, asyncio.run, main())
    assert binding == "cookie-c"
    assert batch == {"messages": [item("hello")], "close": None}


# -- a session's lifetime in Redis ----------------------------------------------------------


def test_a_live_redis_session_is_kept_past_its_keys_first_expiry():
    # The session's hash used to get a one-hour TTL at open, never refreshed:
    # a healthy session was cut at exactly one hour. Here it is 4 s from that
    # end; the owner's heartbeat (every 3 s) must keep it. (A store of its own,
    # on the real clock: the shared one's listener has seen other tests' clocks.)
    with start_redis() as server:
        store = RedisStore(server.url)
        view = RecordingView()
        outbound = store.open(view, Limits())
        raw = redis.Redis.from_url(server.url)
        base = f"dwebsocket:poll:{view.sid}"
        raw.expire(base, 4)
        _time.sleep(6)
        assert store.find(view.sid) is not None
        assert raw.ttl(base) > 4
        outbound.close(1000, "")


def test_the_polling_listener_logs_one_line_per_redis_outage(clock):
    # Only this store's listener counts: listeners of other tests' stores may
    # still be retrying a port that this test's redis-server now reuses.
    records: list[logging.LogRecord] = []
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("dwebsocket")
    logger.addHandler(handler)

    class Lines(list):
        def __iter__(self):
            ident = store._listener.ident if store._listener is not None else None
            return iter([r.getMessage() for r in records if r.thread == ident])

    lines = Lines()
    try:
        with start_redis() as server:
            store = RedisStore(server.url)
            view = RecordingView()
            store.open(view, Limits())  # starts the listener
            server.stop()
            _time.sleep(3.5)  # it retries every second
            assert sum("polling sessions lost Redis" in line for line in lines) == 1
            server.start()
            wait_until(lambda: any("polling sessions: Redis is back" in line for line in lines), timeout=10,
                       what="the listener to log that Redis is back")
            _time.sleep(1.5)
            assert sum("polling sessions lost Redis" in line for line in lines) == 1
            assert sum("Redis is back" in line for line in lines) == 1
    finally:
        logger.removeHandler(handler)
