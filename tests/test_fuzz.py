"""Generated handshakes and long-polling requests against real servers.

Hypothesis throws handshake headers (Origin, Sec-WebSocket-Key, -Version,
-Extensions, -Protocol) and polling requests (method, action, sid, Origin,
body) at gunicorn gthread, gunicorn gevent and uvicorn, one server of each per
module. Whatever comes in: no answer is a 5xx, the server logs no traceback,
and once the connections are gone the worker has as many threads and file
descriptors as before. Each test prints one line per server: how many cases it
tried and the statuses they got (``pytest -s`` shows them; on a failure,
Hypothesis prints the smallest input that fails).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from .client import ws_connect
from .servers import RunningServer, limited, start_server
from .test_polling import PollClient

FUZZ_SERVERS = ("gthread", "gevent", "uvicorn")
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow],
)
SETTLE_SECONDS = 20.0  # polling sessions expire after 2 s and a poll waits 0.5 s


# -- the worker process, seen from /proc ------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return found


def worker_pid(server: RunningServer) -> int:
    """The process that serves the requests: the leaf under ``timeout`` (and gunicorn's master)."""
    pid = server.process.pid
    while True:
        children = _children(pid)
        if not children:
            return pid
        assert len(children) == 1, f"{server.kind}: one worker expected, found {children}"
        pid = children[0]


def usage(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of process *pid*."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def settled(pid: int, baseline: tuple[int, int]) -> tuple[int, int]:
    """Wait until *pid* is back to *baseline* (or SETTLE_SECONDS pass); its usage then."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        now = usage(pid)
        if (now[0] <= baseline[0] and now[1] <= baseline[1]) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


# -- one server of each kind per module -------------------------------------------------


class Target:
    """A running server, its worker, a polling session of its own and the counts."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.pid = worker_pid(server)
        self.session = PollClient(server, "/echo/")
        self.statuses: collections.Counter[str] = collections.Counter()

    @property
    def own_origin(self) -> str:
        return self.server.http

    def warm_up(self) -> None:
        """Start what a server starts once (the I/O thread, thread pools) before measuring."""
        def one() -> None:
            with ws_connect(self.server, "/echo/") as ws:
                ws.send("warm")
                ws.recv(timeout=10)
                time.sleep(0.3)  # held together, so that a pool grows as far as the fuzzing takes it
            client = PollClient(self.server, "/echo/")
            if client.open()[0] == 200:
                client.send("warm")
                client.receive(1)
                client.close()

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert self.session.open()[0] == 200

    @property
    def cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.session.jar)


@pytest.fixture(scope="module", params=FUZZ_SERVERS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    env = {"DWS_TEST_POLL_TIMEOUT": "0.5", "DWS_TEST_POLL_EXPIRY": "2"}
    with start_server(request.param, env=env) as server:
        target = Target(server)
        target.warm_up()
        yield target


def exchange(target: Target, request: bytes) -> int:
    """Send one raw request; the status of the answer (0: closed without one)."""
    with socket.create_connection(("127.0.0.1", target.server.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        if received.startswith(b"HTTP/1.1 101"):
            # A close frame (masked, code 1000), as a client leaves.
            sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
            with contextlib.suppress(OSError):
                sock.recv(65536)
    if not received:
        return 0
    assert received.startswith(b"HTTP/1."), received[:200]
    return int(received.split(b" ", 2)[1])


def check_after(target: Target, what: str, baseline: tuple[int, int], log_start: int) -> None:
    text = target.server.log_text()[log_start:]
    summary = ", ".join(f"{status}: {count}" for status, count in sorted(target.statuses.items()))
    print(f"\n{target.server.kind} {what}: {sum(target.statuses.values())} cases; statuses {summary}")
    now = settled(target.pid, baseline)
    print(f"{target.server.kind} {what}: threads, fds before {baseline}, after {now}")
    assert "Traceback" not in text, text[-5000:]
    assert now[0] <= baseline[0] and now[1] <= baseline[1], (
        f"{target.server.kind}: threads and fds {baseline} before, {now} {SETTLE_SECONDS} s after"
    )


# -- what to send ---------------------------------------------------------------------------

# Header values as a server may receive them: printable Latin-1, no CR or LF.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
)
token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12)




def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, tenths: int = 8) -> st.SearchStrategy:
    """*good* in about *tenths* of the cases, else *bad*: most cases then get past
    the first check and reach the view and the extensions."""
    return st.integers(0, 9).flatmap(lambda n: good if n < tenths else bad)


def origins(target_origin: str) -> st.SearchStrategy[str | None]:
    return mostly(
        st.sampled_from([None, target_origin, "https://trusted.example"]),
        st.one_of(
            st.sampled_from(["https://evil.example", "null", target_origin.replace("http:", "https:"),
                             "http://localhost", "http://[::1"]),
            header_text,
        ),
    )


keys = mostly(
    st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode()),
    st.one_of(st.none(), st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode()), header_text),
    tenths=9,
)
versions = mostly(st.just("13"), st.one_of(st.none(), st.sampled_from(["8", "", "13, 8", "0013"]), header_text), 9)
deflate_parameter = st.one_of(
    st.sampled_from(["client_no_context_takeover", "server_no_context_takeover",
                     "client_max_window_bits", "server_max_window_bits"]),
    st.builds(
        "{}={}".format,
        st.sampled_from(["client_max_window_bits", "server_max_window_bits", "x"]),
        st.one_of(st.integers(-3, 20).map(str), token, st.just(""), st.just('"10"')),
    ),
    token,
)
ascii_header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def extensions_for(kind: str) -> st.SearchStrategy[str | None]:
    """Extension offers, or any header text."""
    return st.one_of(offers, text_for(kind))


def text_for(kind: str) -> st.SearchStrategy[str]:
    """Any header text, or ASCII only where the server's own parser fails on the rest."""
    return ascii_header_text if limited(kind, "fails_on_non_ascii_token_headers") else header_text


offers = st.one_of(
    st.none(),
    st.lists(
        st.builds(lambda name, params: "; ".join([name, *params]),
                  st.sampled_from(["permessage-deflate", "x-webkit-deflate-frame", "foo"]),
                  st.lists(deflate_parameter, max_size=4)),
        min_size=1, max_size=3,
    ).map(", ".join),
)
protocols = st.one_of(
    st.none(), st.lists(st.one_of(st.sampled_from(["chat.v1", "chat.v2"]), token), min_size=1, max_size=4).map(", ".join)
)


def header_lines(**headers: str | None) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items() if value is not None)


# -- the tests ------------------------------------------------------------------------------


def test_generated_handshakes_get_no_5xx_and_leave_nothing_behind(target: Target) -> None:
    baseline, log_start = usage(target.pid), len(target.server.log_text())
    target.statuses.clear()

    @FUZZ
    @given(
        path=st.sampled_from(["/echo/", "/subprotocol/"]),
        origin=origins(target.own_origin), key=keys, version=versions,
        extension=extensions_for(target.server.kind),
        protocol=st.one_of(protocols, text_for(target.server.kind)),
    )
    def handshake(path, origin, key, version, extension, protocol):
        headers = header_lines(**{
            "Origin": origin, "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": version,
            "Sec-WebSocket-Extensions": extension, "Sec-WebSocket-Protocol": protocol,
        })
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{target.server.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\n{headers}\r\n"
        ).encode("latin-1")
        note(repr(request))
        status = exchange(target, request)
        target.statuses[str(status)] += 1
        assert status < 500, request

    handshake()
    check_after(target, "handshakes", baseline, log_start)


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
send_bodies = st.lists(
    st.one_of(
        st.fixed_dictionaries({"text": st.one_of(st.text(max_size=30), st.just("\ud800"), st.just("a\udfffb"))}),
        st.fixed_dictionaries({"binary": st.one_of(st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
                                                   st.text(max_size=10))}),
        json_value,
    ),
    max_size=4,
).map(lambda items: {"messages": items})
close_bodies = st.fixed_dictionaries({
    "code": st.one_of(st.integers(-1, 70000), st.text(max_size=6), st.none(), st.floats(allow_nan=False)),
    "reason": st.one_of(st.text(max_size=30), st.just("\ud800"), json_value),
})
bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.one_of(send_bodies, close_bodies, json_value, st.fixed_dictionaries({"protocols": json_value}))
    .map(lambda data: json.dumps(data).encode()),
)


def test_generated_polling_requests_get_no_5xx_and_leave_nothing_behind(target: Target) -> None:
    baseline, log_start = usage(target.pid), len(target.server.log_text())
    target.statuses.clear()

    @FUZZ
    @given(
        method=st.sampled_from(["GET", "POST", "PUT"]),
        action=mostly(st.sampled_from(["open", "poll", "send", "close"]), token, 9),
        sid=mostly(st.just("session"), st.one_of(st.none(), token), 6),
        cookie=mostly(st.just(True), st.just(False)),
        origin=origins(target.own_origin),
        body=bodies,
        length=mostly(st.none(), st.sampled_from(["-1", "abc", " 1"]), 9),
    )
    def poll(method, action, sid, cookie, origin, body, length):
        query = {"dwebsocket": action}
        if sid is not None:
            query["sid"] = target.session.sid if sid == "session" else sid
        content_length = str(len(body or b"")) if length is None or body is None else length
        headers = header_lines(**{
            "Origin": origin, "Cookie": target.cookie if cookie else None,
            "Content-Type": "application/json", "Content-Length": content_length,
        })
        request = (
            f"{method} /echo/?{urllib.parse.urlencode(query)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{target.server.port}\r\nConnection: close\r\n{headers}\r\n"
        ).encode("latin-1") + (body or b"")
        note(repr(request))
        status = exchange(target, request)
        target.statuses[str(status)] += 1
        assert status < 500, request

    poll()
    check_after(target, "polling requests", baseline, log_start)
