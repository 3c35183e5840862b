"""Group history recovery in headless Chromium: dwebsocket.js speaking
``dwebsocket.v1`` (docs/delivery.md) to real servers.

Each page scripts a DWebSocket on the test project's blank page (/client/) and
connects to /recover-chat/?group=..., which joins the group, broadcasts what the
page sends to the other members and answers the sender "sent <message>".
Page B's connection is dropped by the page itself (its transport closes with
4000) and its reconnection is held (the page's ``_connect`` waits for
``release()``) until page A's broadcasts are all made: they reach B only
through the group's history.

Also here: the page's acknowledged sends (its messages reach the view once
across drops), recovery over long-polling, across a killed process through
Redis, and the heartbeat noticing a connection that went silent (a proxy that
stops forwarding without closing anything).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time

import pytest

from .servers import free_port, start_redis, start_server
from .test_browser import browser, open_page  # noqa: F401 (browser is a fixture)

KINDS = ["gthread", "uvicorn"]

# A DWebSocket on /recover-chat/; its page keeps every payload, close and recover event.
OPEN = """([group, options, query]) => {
    window.got = []; window.recovers = []; window.listened = []; window.closes = []; window.opens = 0;
    window.hold = false; window.release = null;
    const socket = window.socket = new DWebSocket("/recover-chat/?group=" + group + (query || ""), Object.assign({
        transports: ["websocket"], reconnect: {initialDelay: 100, maxDelay: 500},
    }, options || {}));
    socket.binaryType = "arraybuffer";
    // window.resent: messages sent again after a welcome (acknowledged sends).
    window.resent = 0;
    socket._ready = function (transport, acks) {
        if (acks) window.resent += this._unacked.length;
        return DWebSocket.prototype._ready.call(this, transport, acks);
    };
    // While window.hold, a reconnection waits for window.release().
    socket._connect = function (index) {
        if (window.hold) {
            window.release = () => { window.hold = false; DWebSocket.prototype._connect.call(this, index); };
            return;
        }
        return DWebSocket.prototype._connect.call(this, index);
    };
    socket.onopen = () => { opens += 1; };
    socket.onclose = (event) => closes.push(event.code);
    socket.onmessage = (event) => got.push(typeof event.data === "string"
        ? event.data : "binary " + Array.from(new Uint8Array(event.data)).join(","));
    socket.onrecover = (event) => recovers.push({recovered: event.recovered, groups: event.groups});
    socket.addEventListener("recover", (event) => listened.push(event.recovered));
}"""

DROP = """() => { window.hold = true; socket._active.close(4000, "dropped by the test"); }"""

BINARY = [1, 2, 10, 3]  # a 0x0A byte in the payload: only the first one ends the header


def open_socket(page, group, query="", **options):
    page.evaluate(OPEN, [group, options, query])
    wait(page, "opens === 1")


def wait(page, condition, arg=None, timeout=10_000):
    try:
        page.wait_for_function(condition, arg=arg, timeout=timeout)
    except Exception as error:
        state = page.evaluate("({got, recovers, closes, opens})")
        raise AssertionError(f"{error}\nThe page's state: {json.dumps(state)}") from None


def send_all(page, messages):
    """Send *messages* (a list for a binary one) from *page*, and wait until each is broadcast."""
    page.evaluate("""(messages) => messages.forEach((m) =>
        socket.send(typeof m === "string" ? m : new Uint8Array(m)))""", messages)
    acks = ["sent " + (m if isinstance(m, str) else bytes(m).hex()) for m in messages]
    wait(page, "(acks) => acks.every((a) => got.includes(a))", acks)


def reached_b(a, b, word, attempts=20):
    """Broadcast "*word* N" from *a* until one reaches *b* (whose view may not have joined yet)."""
    for attempt in range(attempts):
        send_all(a, [f"{word} {attempt}"])
        try:
            wait(b, "(w) => got.some((m) => m.startsWith(w))", f"{word} ", timeout=500)
            return
        except AssertionError:
            continue
    wait(b, "(w) => got.some((m) => m.startsWith(w))", f"{word} ")  # fails, with the page's state


def payloads(messages):
    return [m if isinstance(m, str) else "binary " + ",".join(map(str, m)) for m in messages]


def warm_up(a, b):
    """Both pages are in the group: a broadcast of A's reached B."""
    send_all(a, ["hello"])
    wait(b, "got.includes('hello')")


def pages(browser, server):  # noqa: F811
    return open_page(browser, f"{server.http}/client/"), open_page(browser, f"{server.http}/client/")


@pytest.mark.parametrize("kind", KINDS)
def test_a_page_that_reconnects_gets_every_broadcast_it_missed_once_in_order(browser, kind):  # noqa: F811
    _recovers_what_it_missed(browser, kind, "websocket")


@pytest.mark.parametrize("kind", KINDS)
def test_a_page_that_reconnects_over_long_polling_gets_every_broadcast_it_missed(browser, kind):  # noqa: F811
    _recovers_what_it_missed(browser, kind, "polling")


def _recovers_what_it_missed(browser, kind, transport):  # noqa: F811
    missed = [f"m{i}" for i in range(20)]
    missed[10] = BINARY
    with start_server(kind) as server:
        first, second = pages(browser, server)
        with first as a, second as b:
            open_socket(a, "lobby", transports=[transport])
            open_socket(b, "lobby", transports=[transport])
            assert b.evaluate("socket.transport") == transport
            assert b.evaluate("socket.protocol") == ""  # dwebsocket.v1 is not the page's
            warm_up(a, b)
            send_all(b, ["from b"])  # excluded B: never replayed to B's next connection
            wait(a, "got.includes('from b')")
            b.evaluate(DROP)
            wait(b, "closes.length === 1 && window.release !== null")
            send_all(a, missed)  # all broadcast while B is away
            b.evaluate("release()")
            wait(b, "recovers.length === 1")
            assert b.evaluate("opens") == 2
            recover = b.evaluate("recovers[0]")
            assert recover["recovered"] is True, recover
            assert list(recover["groups"]) == ["lobby"]
            assert recover["groups"]["lobby"]["recovered"] is True
            position = recover["groups"]["lobby"]["position"]
            epoch, seq = position.split(":")
            assert int(seq) == 22  # hello, from b, 20 missed
            assert b.evaluate("listened") == [True]  # addEventListener("recover") too
            # Live broadcasts go on after the recovered ones.
            send_all(a, ["live 1", "live 2"])
            wait(b, "got.includes('live 2')")
            assert b.evaluate("got") == ["hello", "sent from b", *payloads(missed), "live 1", "live 2"]
            assert b.evaluate("recovers.length") == 1
            assert a.evaluate("recovers.length") == 0  # A never reconnected
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("kind", KINDS)
def test_more_broadcasts_than_the_history_keeps_are_not_recovered(browser, kind):  # noqa: F811
    with start_server(kind, env={"DWS_TEST_HISTORY_SIZE": "5"}) as server:
        first, second = pages(browser, server)
        with first as a, second as b:
            open_socket(a, "small")
            open_socket(b, "small")
            warm_up(a, b)
            b.evaluate(DROP)
            wait(b, "closes.length === 1 && window.release !== null")
            send_all(a, [f"m{i}" for i in range(12)])
            b.evaluate("release()")
            wait(b, "recovers.length === 1")
            recover = b.evaluate("recovers[0]")
            assert recover["recovered"] is False, recover
            assert recover["groups"]["small"]["recovered"] is False
            assert recover["groups"]["small"]["position"].endswith(":13")  # it is at the last one now
            assert b.evaluate("listened") == [False]
            # What it got of the missed ones (the history's last few, or none) is
            # in order, each once; the live ones follow.
            send_all(a, ["live"])
            wait(b, "got.includes('live')")
            got = b.evaluate("got")
            assert got[0] == "hello" and got[-1] == "live", got
            numbers = [int(m[1:]) for m in got[1:-1]]
            assert numbers == sorted(set(numbers)) and set(numbers) <= set(range(12)), got
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_websocket_in_the_group_gets_plain_messages(browser, kind):  # noqa: F811
    """The same view, a page with the browser's own WebSocket: no headers, no prefix."""
    plain_open = """(url) => new Promise((resolve) => {
        window.plain = []; const ws = window.ws = new WebSocket(url);
        ws.binaryType = "arraybuffer";
        ws.onopen = resolve;
        ws.onmessage = (event) => plain.push(typeof event.data === "string"
            ? event.data : "binary " + Array.from(new Uint8Array(event.data)).join(","));
    })"""
    with start_server(kind) as server:
        first, second = pages(browser, server)
        with first as a, second as p:
            open_socket(a, "mixed")
            p.evaluate(plain_open, f"{server.ws}/recover-chat/?group=mixed")
            assert p.evaluate("ws.protocol") == ""
            # The plain page's messages reach the DWebSocket page as they were sent...
            p.evaluate("ws.send('from plain')")
            wait(a, "got.includes('from plain')")
            wait(p, "plain.includes('sent from plain')")
            # ...and the DWebSocket page's, broadcast, reach the plain one as sent.
            send_all(a, ["to plain", BINARY, "", "{\"g\": \"not a header\"}\nstill text"])
            wait(p, "plain.length === 5")
            assert p.evaluate("plain") == [
                "sent from plain", "to plain", "binary 1,2,10,3", "", "{\"g\": \"not a header\"}\nstill text",
            ]
            assert a.evaluate("got") == ["from plain", "sent to plain", "sent 01020a03", "sent ",
                                         "sent {\"g\": \"not a header\"}\nstill text"]
        assert "Traceback" not in server.log_text()


def test_pinned_positions_recover_what_was_broadcast_before_the_first_open(browser):  # noqa: F811
    """A page rendered at some position ({% websocket_position %} in the positions
    option) gets the broadcasts made since, on its first connection, and a recover event."""
    with start_server("gthread") as server:
        with open_page(browser, f"{server.http}/client/") as a:
            open_socket(a, "pinned")
            send_all(a, ["before"])
            with open_page(browser, f"{server.http}/recover-page/?group=pinned") as b:
                position = b.evaluate("positions.pinned")
                epoch, seq = position.split(":")
                assert seq == "1", position
                send_all(a, ["after 1", "after 2"])  # between the render and the open
                open_socket(b, "pinned", positions={"pinned": position, "ignored": ""}, recoverTimeout=5000)
                wait(b, "recovers.length === 1")
                assert b.evaluate("recovers[0]") == {
                    "recovered": True, "groups": {"pinned": {"recovered": True, "position": f"{epoch}:3"}},
                }
                assert b.evaluate("got") == ["after 1", "after 2"]
        assert "Traceback" not in server.log_text()


def test_a_group_the_view_does_not_join_again_counts_as_not_recovered(browser):  # noqa: F811
    """A pinned position for a group the view never joins: recover fires after recoverTimeout."""
    with start_server("uvicorn") as server, open_page(browser, f"{server.http}/client/") as page:
        open_socket(page, "joined", positions={"joined": "0:0", "elsewhere": "0:0"}, recoverTimeout=1000)
        wait(page, "recovers.length === 1")
        recover = page.evaluate("recovers[0]")
        assert recover["recovered"] is False
        assert recover["groups"]["elsewhere"] == {"recovered": False, "position": None}
        assert recover["groups"]["joined"]["recovered"] is False  # epoch "0" is not the group's
        assert recover["groups"]["joined"]["position"] is not None
        assert "Traceback" not in server.log_text()


# While window.refuseV1, a WebSocket that offers dwebsocket.v1 goes to a closed port (refused), as
# to a server still restarting: the client's plain retry then reaches the server, which is up again.
REFUSE_V1 = """(() => {
    const Real = window.WebSocket;
    window.WebSocket = function (url, protocols) {
        const v1 = [].concat(protocols || []).some((p) => p.startsWith("dwebsocket.v1"));
        return new Real(window.refuseV1 && v1 ? "ws://127.0.0.1:9/" : url, protocols);
    };
    window.WebSocket.prototype = Real.prototype;
})();"""


def test_a_plain_reconnection_tells_the_page_its_missed_broadcasts_are_lost(browser):  # noqa: F811
    """A reconnection that ends up plain (the handshake offering dwebsocket.v1
    failed, the plain retry did not) recovers nothing: recover fires with
    recovered false, and the positions are forgotten."""
    with start_server("uvicorn") as server:
        with open_page(browser, f"{server.http}/client/") as a, \
                open_page(browser, f"{server.http}/client/", REFUSE_V1) as b:
            open_socket(a, "plain-again")
            open_socket(b, "plain-again")
            warm_up(a, b)
            b.evaluate("window.refuseV1 = true")
            b.evaluate(DROP)
            wait(b, "closes.length === 1 && window.release !== null")
            send_all(a, ["missed"])
            b.evaluate("release()")
            wait(b, "recovers.length === 1")
            assert b.evaluate("recovers[0]") == {
                "recovered": False, "groups": {"plain-again": {"recovered": False, "position": None}},
            }
            assert b.evaluate("socket._positions") == {}
            # The plain connection is in the group once its view has joined it, which
            # may be after the page's recover event: broadcast until one reaches it.
            reached_b(a, b, "live")
            got = b.evaluate("got")
            assert got[0] == "hello" and all(m.startswith("live ") for m in got[1:]), got  # "missed" is lost
        assert "Traceback" not in server.log_text()


def test_dwebsocket_v1_keeps_the_page_s_own_subprotocol(browser):  # noqa: F811
    with start_server("uvicorn") as server, open_page(browser, f"{server.http}/client/") as page:
        page.evaluate("""() => {
            window.socket = new DWebSocket("/subprotocol/", {protocols: ["chat.v1"], transports: ["websocket"]});
            socket.onmessage = (event) => { window.said = event.data; };
        }""")
        page.wait_for_function("window.said !== undefined", timeout=10_000)
        assert page.evaluate("socket.protocol") == "chat.v1"
        assert page.evaluate("said") == "subprotocol=chat.v1 protocol=chat.v1"
        assert "Traceback" not in server.log_text()


# -- acknowledged sends --------------------------------------------------------------

# Sends each message, then drops the connection in the same tick: no ack can have come.
SEND_AND_DROP = """(messages) => {
    messages.forEach((m) => socket.send(typeof m === "string" ? m : new Uint8Array(m)));
    window.hold = true; window.release = null;
    socket._active.close(4000, "dropped by the test");
}"""

SEND = """(messages) => messages.forEach((m) => socket.send(typeof m === "string" ? m : new Uint8Array(m)))"""


def broadcasts(page):
    """What *page* got from the others (not the view's "sent ..." answers to its own)."""
    return [m for m in page.evaluate("got") if not m.startswith("sent ")]


@pytest.mark.parametrize("transport", ["websocket", "polling"])
@pytest.mark.parametrize("kind", KINDS)
def test_messages_sent_right_before_a_drop_reach_the_view_once_in_order(browser, kind, transport):  # noqa: F811
    """Page B sends, its connection drops in the same tick, it sends more while
    away; after each reconnection every message reached the view (which
    broadcasts it to page A) exactly once, in order. (Whether the server read
    the messages sent before the drop, so that none is sent again, depends on
    timing; the heartbeat test below loses some for sure.)"""
    with start_server(kind) as server:
        first, second = pages(browser, server)
        with first as a, second as b:
            open_socket(a, "acks", transports=[transport])
            open_socket(b, "acks", transports=[transport])
            warm_up(a, b)
            expected = []
            for round_ in range(3):
                before = [f"r{round_} before {i}" for i in range(3)]
                if round_ == 1:
                    before[1] = BINARY  # its header {"n": k} goes as UTF-8 bytes
                b.evaluate(SEND_AND_DROP, before)
                wait(b, f"closes.length === {round_ + 1} && window.release !== null")
                away = [f"r{round_} away {i}" for i in range(2)]
                b.evaluate(SEND, away)  # buffered, numbered once a connection takes them
                b.evaluate("release()")
                wait(b, f"opens === {round_ + 2}")
                expected += payloads(before) + away
            send_all(b, ["last"])
            wait(a, "got.includes('last')")
            wait(b, "socket._unacked.length === 0 && socket._buffer.length === 0")
            assert broadcasts(a) == expected + ["last"]
            assert b.evaluate("socket._numbered") == len(expected) + 1  # each numbered once
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("kind", KINDS)
def test_a_message_a_slow_view_had_not_read_when_the_connection_dropped_is_read_once(browser, kind):  # noqa: F811
    """The view sleeps 1 s after each message (?pause=1): when B's connection
    drops, "two" and "three" wait in its queue, unread and unacknowledged."""
    with start_server(kind) as server:
        first, second = pages(browser, server)
        with first as a, second as b:
            open_socket(a, "slow")
            open_socket(b, "slow", query="&pause=1")
            for page in (a, b):
                wait(page, "socket._positions.slow !== undefined")
            b.evaluate(SEND_AND_DROP, ["one", "two", "three"])
            wait(b, "closes.length === 1 && window.release !== null")
            b.evaluate("release()")
            wait(b, "opens === 2")
            wait(b, "socket._unacked.length === 0")
            time.sleep(3)  # the old view wakes and reads what was in its queue
            assert broadcasts(a) == ["one", "two", "three"]


def test_unacknowledged_messages_count_against_max_buffer(browser):  # noqa: F811
    """Messages kept for their ack and messages waiting for a connection share maxBuffer."""
    with start_server("gthread") as server, open_page(browser, f"{server.http}/client/") as page:
        open_socket(page, "bounded", reconnect={"initialDelay": 100, "maxDelay": 500, "maxBuffer": 3})
        page.evaluate(SEND_AND_DROP, ["one", "two"])  # kept until acknowledged
        wait(page, "closes.length === 1 && window.release !== null")
        page.evaluate("socket.send('three')")
        error = page.evaluate("() => { try { socket.send('four'); return null; } catch (e) { return e.message; } }")
        assert error and "too many messages" in error
        page.evaluate("release()")
        wait(page, "socket._unacked.length === 0 && got.includes('sent three')")
        got = page.evaluate("got")
        assert all(got.count(f"sent {m}") <= 1 for m in ("one", "two", "three")), got
        page.evaluate("socket.send('four')")  # room again
        wait(page, "got.includes('sent four')")
        assert "Traceback" not in server.log_text()


def test_a_joined_without_a_position_keeps_the_old_one(browser):  # noqa: F811
    """The server omits "p" when it cannot read the group's history (Redis down):
    the page keeps the position it had, to recover from on a later connection."""
    with start_server("uvicorn") as server, open_page(browser, f"{server.http}/client/") as page:
        open_socket(page, "kept")
        send_all(page, ["one"])
        position = page.evaluate("socket._positions.kept")  # the joined one: its broadcast excluded it
        assert position
        page.evaluate("""() => socket._receivedMessage(socket._active, {t: "joined", g: "kept", r: false}, "")""")
        assert page.evaluate("socket._positions.kept") == position
        page.evaluate("""() => socket._receivedMessage(socket._active, {t: "left", g: "kept"}, "")""")
        assert page.evaluate("socket._positions.kept === undefined")  # a left still forgets it


# -- across processes, through Redis ---------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_a_page_whose_process_was_killed_recovers_on_its_restart_through_redis(browser, transport):  # noqa: F811
    """Page B on process 1 (gthread), page A on process 2 (uvicorn), one Redis.
    Process 1 is killed (SIGKILL) while A broadcasts; it is started again on
    the same port (B's page and its socket's URL are on that origin), B
    reconnects to it and recovers from the group's history in Redis. Over
    long-polling B learns of the death when its session's owner stops
    answering for it (404 within seconds, docs/reliability.md)."""
    missed = [f"m{i}" for i in range(15)]
    with start_redis() as redis, contextlib.ExitStack() as stack:
        env = {"DWS_TEST_BROKER": redis.url}
        port = free_port()
        second = stack.enter_context(start_server("uvicorn", env=env))
        first = stack.enter_context(start_server("gthread", env=env, port=port))
        with open_page(browser, f"{second.http}/client/") as a, open_page(browser, f"{first.http}/client/") as b:
            open_socket(a, "killed")
            open_socket(b, "killed", transports=[transport])
            for page in (a, b):  # the views joined (through Redis): a broadcast reaches both
                wait(page, "socket._positions.killed !== undefined")
            warm_up(a, b)
            os.killpg(first.process.pid, signal.SIGKILL)  # the group of the process this test started
            first.process.wait()
            wait(b, "closes.length === 1", timeout=30_000)
            send_all(a, missed[:10])
            b.evaluate(SEND, ["from b while away"])  # buffered until B is back
            restarted = stack.enter_context(start_server("gthread", env=env, port=port))
            send_all(a, missed[10:])
            wait(b, "recovers.length === 1", timeout=20_000)
            recover = b.evaluate("recovers[0]")
            assert recover["recovered"] is True, recover
            send_all(a, ["live"])
            wait(b, "got.includes('live')")
            assert broadcasts(b) == ["hello", *missed, "live"], json.dumps(b.evaluate("got"))
            assert b.evaluate("got").count("sent from b while away") == 1  # the view's answer
            wait(a, "got.includes('from b while away')")
            assert broadcasts(a).count("from b while away") == 1
        assert "Traceback" not in second.log_text() + restarted.log_text()


# -- the heartbeat -----------------------------------------------------------------------


class SilentProxy:
    """A TCP proxy from 127.0.0.1:<port> to *target*, on an event loop of its own.

    :meth:`silence` makes every connection it carries so far silent: nothing is
    forwarded either way any more, and nothing is closed (no FIN, no RST), as
    when a NAT forgets a connection. Connections made later are forwarded.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.links: list[dict] = []
        self.port = 0

    def __enter__(self) -> "SilentProxy":
        self.thread.start()
        self.server = self._run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            for link in self.links:
                for writer in link["writers"]:
                    writer.transport.abort()

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def silence(self) -> int:
        """Stop forwarding on every connection so far; how many there were."""
        async def mark() -> int:
            for link in self.links:
                link["silent"] = True
            return len(self.links)

        return self._run(mark())

    async def _serve(self, reader, writer) -> None:
        link = {"silent": False, "writers": [writer]}
        self.links.append(link)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        link["writers"].append(upstream_writer)
        await asyncio.gather(self._pump(reader, upstream_writer, link), self._pump(upstream_reader, writer, link))

    @staticmethod
    async def _pump(reader, writer, link) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not link["silent"]:
                    writer.write(data)
                    await writer.drain()
            if not link["silent"]:
                writer.close()


@pytest.mark.parametrize("kind", KINDS)
def test_the_heartbeat_notices_a_connection_gone_silent_and_recovers(browser, kind):  # noqa: F811
    """Page B reaches the server through a proxy that goes silent without
    closing anything: with heartbeat 2000 ms the page counts the connection
    lost within 4 s of the last thing it heard (the server's own pings would
    take 40 s), reconnects (the proxy forwards
    new connections) and recovers what was broadcast meanwhile."""
    missed = [f"m{i}" for i in range(10)]
    with start_server(kind) as server, SilentProxy(server.port) as proxy:
        with open_page(browser, f"{server.http}/client/") as a, \
                open_page(browser, f"http://127.0.0.1:{proxy.port}/client/") as b:
            open_socket(a, "silent")
            open_socket(b, "silent", heartbeat=2000)
            warm_up(a, b)
            time.sleep(5)  # quiet, but pings are answered: still the same connection
            assert b.evaluate("({closes, opens})") == {"closes": [], "opens": 1}
            assert proxy.silence() >= 1
            silenced = time.monotonic()
            b.evaluate(SEND, ["lost 1", "lost 2"])  # into the void: never acknowledged
            send_all(a, missed)  # B's old connection carries them no more
            wait(b, "closes.length === 1", timeout=15_000)
            noticed = time.monotonic() - silenced
            assert noticed < 10, noticed  # 2 x heartbeat after the last thing heard, and a check's delay
            assert b.evaluate("closes") == [1006]
            wait(b, "recovers.length === 1")
            recover = b.evaluate("recovers[0]")
            assert recover["recovered"] is True, recover
            send_all(a, ["live"])
            wait(b, "got.includes('live')")
            assert broadcasts(b) == ["hello", *missed, "live"]
            assert b.evaluate("opens") == 2
            # B's messages lost with the silent connection were sent again, and reached the view once.
            wait(a, "got.includes('lost 2')")
            assert b.evaluate("resent") == 2
            assert broadcasts(a) == ["lost 1", "lost 2"]
            wait(b, "socket._unacked.length === 0")
        assert "Traceback" not in server.log_text()


def test_the_heartbeat_keeps_an_idle_long_polling_session(browser):  # noqa: F811
    """Over long-polling the heartbeat's ping is answered through the waiting
    poll: an idle session is not counted lost."""
    with start_server("gthread") as server, open_page(browser, f"{server.http}/client/") as page:
        open_socket(page, "idle", transports=["polling"], heartbeat=500)
        time.sleep(2.5)
        assert page.evaluate("({closes, opens})") == {"closes": [], "opens": 1}
        send_all(page, ["still here"])
        assert "Traceback" not in server.log_text()
