"""Group history recovery in headless Chromium: dwebsocket.js speaking
``dwebsocket.v1`` (docs/delivery.md) to real servers.

Each page scripts a DWebSocket on the test project's blank page (/client/) and
connects to /recover-chat/?group=..., which joins the group, broadcasts what the
page sends to the other members and answers the sender "sent <message>".
Page B's connection is dropped by the page itself (its transport closes with
4000) and its reconnection is held (the page's ``_connect`` waits for
``release()``) until page A's broadcasts are all made: they reach B only
through the group's history.
"""

from __future__ import annotations

import json

import pytest

from .servers import start_server
from .test_browser import browser, open_page  # noqa: F401 (browser is a fixture)

KINDS = ["gthread", "uvicorn"]

# A DWebSocket on /recover-chat/; its page keeps every payload, close and recover event.
OPEN = """([group, options]) => {
    window.got = []; window.recovers = []; window.listened = []; window.closes = []; window.opens = 0;
    window.hold = false; window.release = null;
    const socket = window.socket = new DWebSocket("/recover-chat/?group=" + group, Object.assign({
        transports: ["websocket"], reconnect: {initialDelay: 100, maxDelay: 500},
    }, options || {}));
    socket.binaryType = "arraybuffer";
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


def open_socket(page, group, **options):
    page.evaluate(OPEN, [group, options])
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
    missed = [f"m{i}" for i in range(20)]
    missed[10] = BINARY
    with start_server(kind) as server:
        first, second = pages(browser, server)
        with first as a, second as b:
            open_socket(a, "lobby")
            open_socket(b, "lobby")
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
