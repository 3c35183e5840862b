"""Group history and recovery over the dwebsocket.v1 subprotocol (docs/delivery.md), against real servers.

A Python client that speaks the protocol stands in for dwebsocket.js here (the
browser tests drive dwebsocket.js itself): it offers the subprotocol, reads
the headers, and reconnects with a resume that names what it has.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from .client import ws_connect
from .servers import RedisServer, RunningServer, start_redis, start_server

PROTOCOL = "dwebsocket.v1"


class SessionClient:
    """A dwebsocket.v1 client: what dwebsocket.js does, in Python, for tests."""

    def __init__(self, server: RunningServer, path: str, positions: dict[str, str] | None = None,
                 ids: list[str] | None = None, protocols: list[str] | None = None,
                 client: str | None = None) -> None:
        self.positions: dict[str, str] = dict(positions or {})
        self.ids: list[str] = list(ids or [])
        self.server, self.path, self.protocols = server, path, protocols or []
        self.controls: list[dict[str, Any]] = []
        self.ws: Any = None
        self.client = client  # numbers its messages (acknowledged sends) when set
        self.welcome: dict[str, Any] = {}

    def connect(self) -> SessionClient:
        resume = {k: v for k, v in (("p", self.positions), ("x", self.ids[-5:]), ("c", self.client)) if v}
        path = self.path
        if resume:
            sep = "&" if "?" in path else "?"
            path += sep + urllib.parse.urlencode({PROTOCOL: json.dumps(resume)})
        offer = [f"{PROTOCOL}+{p}" for p in self.protocols] + [PROTOCOL]
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(ws_connect(self.server, path, subprotocols=offer))
        welcome = self._control(self.ws.recv(10))
        assert welcome["t"] == "welcome", welcome
        self.ids.append(welcome["id"])
        self.welcome = welcome
        return self

    @staticmethod
    def _split(raw: Any) -> tuple[dict[str, Any] | None, Any]:
        newline = raw.index("\n" if isinstance(raw, str) else b"\n")
        header = raw[:newline]
        if isinstance(header, bytes):
            header = header.decode()
        return (json.loads(header) if header else None), raw[newline + 1:]

    def _control(self, raw: Any) -> dict[str, Any]:
        header, payload = self._split(raw)
        assert header is not None and "t" in header and payload in ("", b""), raw
        return header

    def recv(self, timeout: float = 10) -> tuple[dict[str, Any] | None, Any]:
        """The next message that is not a control one: (header, payload); controls are kept in .controls."""
        while True:
            header, payload = self._split(self.ws.recv(timeout))
            if header and "t" in header:
                self.controls.append(header)
                if header["t"] == "joined" and header.get("p"):
                    self.positions[header["g"]] = header["p"]
                elif header["t"] == "left":
                    self.positions.pop(header["g"], None)
                continue
            if header and "p" in header:
                self.positions[header["g"]] = header["p"]
            return header, payload

    def until_joined(self, group: str, timeout: float = 10) -> tuple[list[Any], dict[str, Any]]:
        """Broadcasts received until the view's join of *group* is confirmed, and the confirmation."""
        got = []
        while True:
            header, payload = self._split(self.ws.recv(timeout))
            if header and header.get("t") == "joined" and header["g"] == group:
                if header.get("p"):
                    self.positions[group] = header["p"]
                return got, header
            if header and "p" in header:
                self.positions[header["g"]] = header["p"]
            got.append((header, payload))

    def send(self, payload: Any) -> None:
        self.ws.send(("\n" + payload) if isinstance(payload, str) else (b"\n" + payload))

    def send_numbered(self, number: int, payload: str) -> None:
        self.ws.send(json.dumps({"n": number}) + "\n" + payload)

    def acks(self, timeout: float = 0.5) -> list[int]:
        """The acknowledgements received so far, reading what arrives within *timeout*."""
        with contextlib.suppress(TimeoutError):
            while True:
                header, payload = self._split(self.ws.recv(timeout))
                if header and "t" in header:
                    self.controls.append(header)
        return [c["n"] for c in self.controls if c["t"] == "ack"]

    def close(self) -> None:
        self._stack.close()


def http_broadcast(server: RunningServer, group: str, n: int, m: str = "msg") -> None:
    with urllib.request.urlopen(f"{server.http}/broadcast/{group}/?n={n}&m={m}", timeout=30) as response:
        assert response.read() == f"sent {n}".encode()


@pytest.fixture(params=["gthread", "uvicorn"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with start_server(request.param) as running:
        yield running


def test_the_subprotocol_is_agreed_and_views_see_plain_messages(server: RunningServer) -> None:
    client = SessionClient(server, "/echo/").connect()
    assert client.ws.subprotocol == PROTOCOL
    assert len(client.ids[0]) == 32
    client.send("hello")
    assert client.recv() == (None, "hello")
    client.send(b"\x00\n\x01")  # a newline in the payload is the payload's
    assert client.recv() == (None, b"\x00\n\x01")
    client.send("")
    assert client.recv() == (None, "")
    client.close()


def test_a_pages_own_subprotocol_goes_alongside(server: RunningServer) -> None:
    client = SessionClient(server, "/subprotocol/", protocols=["chat.v1", "chat.v3"]).connect()
    assert client.ws.subprotocol == f"{PROTOCOL}+chat.v1"
    assert client.recv() == (None, "subprotocol=chat.v1 protocol=chat.v1")
    client.close()
    none = SessionClient(server, "/subprotocol/", protocols=["chat.v9"]).connect()
    assert none.ws.subprotocol == PROTOCOL
    assert none.recv() == (None, "subprotocol=None protocol=None")
    none.close()


def test_the_resume_is_taken_out_of_the_query_the_view_sees(server: RunningServer) -> None:
    client = SessionClient(server, "/query/?a=1&b=2", positions={"lobby": "abc:3"}, ids=["x" * 32]).connect()
    header, payload = client.recv()
    assert json.loads(payload) == {"query": "a=1&b=2", "GET": [["a", "1"], ["b", "2"]]}
    client.close()
    garbage = f"/query/?{PROTOCOL}=%7Bnot+json&c=3"
    client = SessionClient(server, garbage).connect()
    assert json.loads(client.recv()[1]) == {"query": "c=3", "GET": [["c", "3"]]}
    client.close()


def test_a_plain_client_gets_plain_messages_in_a_group_with_session_members(server: RunningServer) -> None:
    with ws_connect(server, "/group/mixed/") as plain:
        assert plain.recv(10).startswith("joined ")
        member = SessionClient(server, "/group/mixed/").connect()
        got, joined = member.until_joined("mixed")
        assert got == [] and joined["r"] is None and joined["p"].endswith(":0")
        assert member.recv()[1].startswith("joined ")
        http_broadcast(server, "mixed", 2)
        assert [plain.recv(10), plain.recv(10)] == ["msg 0", "msg 1"]
        epoch = joined["p"].split(":")[0]
        assert [member.recv(), member.recv()] == [
            ({"g": "mixed", "p": f"{epoch}:1"}, "msg 0"), ({"g": "mixed", "p": f"{epoch}:2"}, "msg 1"),
        ]
        member.close()


def test_a_reconnecting_client_gets_what_it_missed_in_order_then_live(server: RunningServer) -> None:
    member = SessionClient(server, "/group/room/").connect()
    member.until_joined("room")
    assert member.recv()[1].startswith("joined ")  # the view's own message
    http_broadcast(server, "room", 3, "before")
    assert [member.recv()[1] for _ in range(3)] == ["before 0", "before 1", "before 2"]
    member.close()
    http_broadcast(server, "room", 5, "away")
    member.connect()
    missed, joined = member.until_joined("room")
    assert [payload for _, payload in missed] == [f"away {i}" for i in range(5)]
    assert joined["r"] is True and joined["p"] == missed[-1][0]["p"]
    assert member.recv()[1].startswith("joined ")
    http_broadcast(server, "room", 2, "live")
    assert [member.recv()[1] for _ in range(2)] == ["live 0", "live 1"]
    member.close()


def test_nothing_missed_is_recovered_too(server: RunningServer) -> None:
    member = SessionClient(server, "/group/quiet/").connect()
    _, first = member.until_joined("quiet")
    member.close()
    member.connect()
    missed, joined = member.until_joined("quiet")
    assert missed == [] and joined["r"] is True and joined["p"] == first["p"]
    member.close()


def test_more_missed_than_the_history_keeps_is_told(server: RunningServer) -> None:
    with start_server(server.kind, env={"DWS_TEST_HISTORY_SIZE": "3"}) as small:
        member = SessionClient(small, "/group/busy/").connect()
        member.until_joined("busy")
        member.close()
        http_broadcast(small, "busy", 5, "away")
        member.connect()
        missed, joined = member.until_joined("busy")
        assert joined["r"] is False
        assert [payload for _, payload in missed] == ["away 2", "away 3", "away 4"]  # what is kept
        member.close()


def test_a_position_from_another_epoch_is_not_recovered(server: RunningServer) -> None:
    member = SessionClient(server, "/group/epochs/", positions={"epochs": "0123456789ab:7"}).connect()
    missed, joined = member.until_joined("epochs")
    assert missed == [] and joined["r"] is False and not joined["p"].startswith("0123456789ab:")
    member.close()


def test_a_broadcast_that_excluded_the_client_is_not_replayed(server: RunningServer) -> None:
    sender = SessionClient(server, "/group/excl/").connect()
    sender.until_joined("excl")
    assert sender.recv()[1].startswith("joined ")
    other = SessionClient(server, "/group/excl/").connect()
    other.until_joined("excl")
    other.recv()
    other.close()
    sender.send("mine")  # the view broadcasts it with exclude=sender
    http_broadcast(server, "excl", 1, "theirs")
    assert sender.recv()[1] == "theirs 0"
    sender.close()
    other_ids = list(other.ids)
    other.connect()
    missed, joined = other.until_joined("excl")
    # The view's broadcast of "mine" and the HTTP view's race: either may come first.
    assert sorted(p for _, p in missed) == ["mine", "theirs 0"] and joined["r"] is True
    other.close()
    sender.connect()  # its resume names the connection that sent "mine"
    missed, joined = sender.until_joined("excl")
    assert missed == [] and joined["r"] is True
    assert other_ids != sender.ids
    sender.close()


@pytest.mark.parametrize("kind", ["gthread", "gevent", "uvicorn", "runserver"])
def test_the_heartbeat_is_answered_also_while_the_view_is_busy(kind: str) -> None:
    with start_server(kind) as running:
        idle = SessionClient(running, "/echo/").connect()
        busy = SessionClient(running, "/busy-echo/?first=read&busy=5").connect()
        busy.send("one")
        assert busy.recv() == (None, "one")  # the view sleeps from now on
        for client in (idle, busy):
            client.ws.send('{"t":"ping"}\n')
            assert SessionClient._split(client.ws.recv(2)) == ({"t": "pong"}, "")
        idle.close()
        busy.close()


def _observed(observer: Any, timeout: float = 1.0) -> list[str]:
    """What a plain group member receives until *timeout* passes without a message."""
    got = []
    with contextlib.suppress(TimeoutError):
        while True:
            got.append(observer.recv(timeout))
    return got


def _acked_sends(first: RunningServer, second: RunningServer, group: str) -> None:
    """A page's numbered messages reach the view once, across a reconnect (to *second*)."""
    with ws_connect(first, f"/group/{group}/") as observer:
        assert observer.recv(10).startswith("joined ")
        sender = SessionClient(first, f"/group/{group}/", client=f"page-{group}-0123456789").connect()
        assert sender.welcome["n"] == 0
        sender.send_numbered(1, "a")
        sender.send_numbered(2, "b")
        sender.send_numbered(2, "b")  # a copy: dropped
        assert observer.recv(10) == "a" and observer.recv(10) == "b"
        assert sender.acks()[-1] == 2
        sender.close()
        sender.server = second
        sender.connect()
        assert sender.welcome["n"] == 2  # the page sends again only what came after
        sender.send_numbered(2, "b")  # sent again all the same: dropped
        sender.send_numbered(3, "c")
        assert _observed(observer) == ["c"]
        assert sender.acks()[-1] == 3
        sender.close()
        stranger = SessionClient(first, f"/group/{group}/", client="another-page-0123456").connect()
        assert stranger.welcome["n"] == 0
        stranger.close()
    plain = SessionClient(first, "/echo/").connect()
    assert "n" not in plain.welcome  # a client that does not number its messages
    plain.send_numbered(1, "ignored")  # a numbered message from it is not for the view
    plain.send("plain")
    assert plain.recv() == (None, "plain")
    plain.close()


def test_acknowledged_sends_reach_the_view_once(server: RunningServer) -> None:
    _acked_sends(server, server, f"acks-{server.kind}")


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_a_message_the_view_never_read_is_not_acknowledged_and_comes_again(kind: str) -> None:
    with start_server(kind) as running:
        sender = SessionClient(running, "/busy-echo/?first=read&busy=3", client="slow-page-0123456789").connect()
        sender.send_numbered(1, "one")
        assert sender.recv() == (None, "one")
        sender.send_numbered(2, "two")  # the view sleeps: nobody reads it
        assert sender.acks(0.5) == [1]
        sender.close()  # two is lost with the connection: not acknowledged, so the page keeps it
        sender.path = "/echo/"
        sender.connect()
        assert sender.welcome["n"] == 1
        sender.send_numbered(2, "two")
        assert sender.recv() == (None, "two")
        assert sender.acks()[-1] == 2
        sender.close()


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
@pytest.mark.parametrize("drop", ["closed", "silent"])
def test_what_the_old_view_had_not_read_is_read_once_after_a_reconnect(kind: str, drop: str) -> None:
    """The view sleeps 1 s after each message: when the page's connection drops, "two" and
    "three" wait in its queue, unread and unacknowledged, and the page sends them again.
    "closed": the server saw the drop; "silent": it did not (the old connection still looks
    open when the new one comes), and the new connection of the same page takes over."""
    with start_server(kind) as running, ws_connect(running, "/group/twice/") as observer:
        assert observer.recv(10).startswith("joined ")
        page = SessionClient(running, "/recover-chat/?group=twice&pause=1", client="0123456789abcdef").connect()
        page.until_joined("twice")
        for number, text in enumerate(["one", "two", "three"], 1):
            page.send_numbered(number, text)
        if drop == "closed":
            page.close()
        else:
            page._stack.pop_all()  # keep the old socket open: the server sees no drop
            old = page.ws
        page.connect()
        read = page.welcome["n"]
        assert read == 1  # the view had read "one" only
        for number, text in enumerate(["one", "two", "three"], 1):
            if number > read:
                page.send_numbered(number, text)
        assert _observed(observer, 4) == ["one", "two", "three"]
        page.close()
        if drop == "silent":
            old.close()


# -- across processes, through Redis ------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as running:
        yield running


@pytest.fixture(scope="module")
def two_processes(redis_server: RedisServer) -> Iterator[tuple[RunningServer, RunningServer]]:
    env = {"DWS_TEST_BROKER": redis_server.url}
    with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second:
        yield first, second


def test_a_client_recovers_on_another_process_than_the_one_it_lost(
    two_processes: tuple[RunningServer, RunningServer],
) -> None:
    recovers_on_another_process(*two_processes, "hosts")


def recovers_on_another_process(first: RunningServer, second: RunningServer, group: str, away: int = 10) -> None:
    """A dwebsocket.v1 member of *group* on *first* drops; *away* broadcasts from
    *second* and 2 from an HTTP view on *first* follow; it reconnects to *second*
    and recovers them all, then gets the live ones."""
    member = SessionClient(first, f"/group/{group}/").connect()
    member.until_joined(group)
    assert member.recv()[1].startswith("joined ")
    with ws_connect(second, f"/async-group/{group}/") as talker:
        assert talker.recv(10).startswith("joined ")
        talker.send("live on first")
        assert member.recv()[1] == "live on first"
        member.close()
        for index in range(away):
            talker.send(f"away {index}")
        http_broadcast(first, group, 2, "http")
        member.server = second
        member.connect()
        missed, joined = member.until_joined(group)
        got = [p for _, p in missed]  # two sources, each in its order
        assert [p for p in got if p.startswith("away")] == [f"away {i}" for i in range(away)]
        assert [p for p in got if p.startswith("http")] == ["http 0", "http 1"] and len(got) == away + 2
        assert [int(h["p"].split(":")[1]) for h, _ in missed] == list(range(2, away + 4))
        assert joined["r"] is True
        talker.send("live on second")
        assert member.recv()[1].startswith("joined ")
        assert member.recv()[1] == "live on second"
    member.close()


def test_acknowledged_sends_across_processes(two_processes: tuple[RunningServer, RunningServer]) -> None:
    _acked_sends(*two_processes, "acks-redis")


def test_redis_restarted_empty_is_not_recovered_and_live_traffic_resumes(
    redis_server: RedisServer, two_processes: tuple[RunningServer, RunningServer],
) -> None:
    first, second = two_processes
    member = SessionClient(first, "/group/restart/").connect()
    member.until_joined("restart")
    member.recv()
    http_broadcast(second, "restart", 1, "before")
    assert member.recv()[1] == "before 0"
    member.close()
    redis_server.stop()
    redis_server.start()  # empty: no persistence in the test fixture
    deadline = time.monotonic() + 15
    while True:  # the broker reconnects with backoff; until then broadcasts stay local
        member.connect()
        missed, joined = member.until_joined("restart")
        member.recv()
        if joined.get("p"):
            break
        member.close()
        assert time.monotonic() < deadline, "the broker did not come back"
        time.sleep(0.5)
    assert missed == [] and joined["r"] is False
    http_broadcast(second, "restart", 1, "after")
    header, payload = member.recv()
    assert payload == "after 0" and header["p"].split(":")[0] == joined["p"].split(":")[0]
    member.close()


# -- over long-polling ---------------------------------------------------------------


def _split(raw: Any) -> tuple[dict[str, Any] | None, Any]:
    return SessionClient._split(raw)


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_recovery_over_long_polling(kind: str) -> None:
    from .test_polling import PollClient

    with start_server(kind) as server:
        first = PollClient(server, "/group/polled/")
        status, body = first.open(["dwebsocket.v1"])
        assert status == 200 and body["subprotocol"] == "dwebsocket.v1"
        welcome, joined, view = (_split(m)[0] or _split(m)[1] for m in first.receive(3))
        assert welcome["t"] == "welcome" and joined["t"] == "joined" and view.startswith("joined ")
        assert first.send("\nhello from polling") == 204
        first.close()
        http_broadcast(server, "polled", 3, "away")
        resume = json.dumps({"p": {"polled": joined["p"]}, "x": [welcome["id"]]})
        again = PollClient(server, "/group/polled/?" + urllib.parse.urlencode({PROTOCOL: resume}))
        assert again.open(["dwebsocket.v1"])[0] == 200
        got = [_split(m) for m in again.receive(6)]
        assert got[0][0]["t"] == "welcome"
        assert [p for h, p in got[1:4]] == ["away 0", "away 1", "away 2"]  # not its own "hello"
        assert got[4][0]["t"] == "joined" and got[4][0]["r"] is True
        assert got[5] == (None, f"joined {got[0][0]['id']}")
        again.close()
