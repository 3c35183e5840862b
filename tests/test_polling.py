"""The long-polling transport, spoken from Python: the protocol dwebsocket.js uses."""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from .client import result
from .servers import ASGI_SERVERS, start_redis, start_server


class PollClient:
    """A polling session, as dwebsocket.js opens it (with its own cookie jar)."""

    def __init__(self, server, path, origin=None):
        self.server = server
        self.path = path
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.origin = origin if origin is not None else server.http
        self.sid = None

    def call(self, method, action, body=None, sid=None, raw=None):
        sep = "&" if "?" in self.path else "?"
        url = f"{self.server.http}{self.path}{sep}dwebsocket={action}"
        if sid or self.sid:
            url += f"&sid={sid or self.sid}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        if self.origin:
            headers["Origin"] = self.origin
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=60) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text.decode(errors="replace")

    def open(self, protocols=()):
        status, body = self.call("POST", "open", {"protocols": list(protocols)})
        if status == 200:
            self.sid = body["sid"]
        return status, body

    def send(self, *messages):
        items = [{"text": m} if isinstance(m, str) else {"binary": base64.b64encode(m).decode()} for m in messages]
        return self.call("POST", "send", {"messages": items})[0]

    def poll(self):
        status, body = self.call("GET", "poll")
        assert status == 200, body
        messages = [m["text"] if "text" in m else base64.b64decode(m["binary"]) for m in body["messages"]]
        return messages, body["close"]

    def receive(self, count):
        got, close = [], None
        while len(got) < count and close is None:
            messages, close = self.poll()
            got += messages
        return got

    def close(self, code=1000, reason=""):
        return self.call("POST", "close", {"code": code, "reason": reason})[0]


@pytest.fixture(
    scope="module",
    params=["gthread", "uvicorn", "runserver", "uwsgi-threads", "gthread+redis", "uvicorn+redis", "uwsgi-gevent+redis"],
)
def polling_server(request):
    """A server; "+redis": with the Redis broker, so sessions live in Redis."""
    kind, _, redis = request.param.partition("+")
    # Short timers keep the expiry test quick; the expiry leaves room for a
    # loaded 2-core machine between a session's open and its first poll.
    env = {"DWS_TEST_POLL_TIMEOUT": "2", "DWS_TEST_POLL_EXPIRY": "6"}
    with contextlib.ExitStack() as stack:
        if redis:
            env["DWS_TEST_BROKER"] = stack.enter_context(start_redis()).url
        yield stack.enter_context(start_server(kind, env=env, migrate=True))


def test_echo_in_order_text_and_binary(polling_server):
    client = PollClient(polling_server, "/echo/")
    assert client.open()[0] == 200
    assert client.send("one", "two", "thrée ✓") == 204
    assert client.send(b"\x00\xff binary") == 204
    assert client.receive(4) == ["one", "two", "thrée ✓", b"\x00\xff binary"]
    assert client.close() == 204


def test_messages_are_batched(polling_server):
    client = PollClient(polling_server, "/concurrent-send/?threads=2&count=50")
    assert client.open()[0] == 200
    batches = []
    got = []
    while "done" not in got:
        messages, _ = client.poll()
        batches.append(len(messages))
        got += messages
    assert len(got) == 101
    assert max(batches) > 1  # more than one message per poll response
    client.close()


def test_the_same_view_code_sees_a_connection(polling_server):
    client = PollClient(polling_server, "/page-or-socket/")
    assert client.open()[0] == 200
    client.send("x")
    assert client.receive(1) == ["ws:x"]
    client.close()


# Async views do not run under gevent (over WebSocket: 501, tests/test_asgi.py).
@pytest.mark.servers("gthread", "uvicorn", "runserver", "uwsgi-threads")
def test_async_view_over_polling(polling_server):
    key = uuid.uuid4().hex
    client = PollClient(polling_server, f"/async-echo/?id={key}")
    assert client.open()[0] == 200
    client.send("async over polling")
    assert client.receive(1) == ["async over polling"]
    client.close(4001, "bye")
    outcome = result(polling_server, key)
    assert outcome["close_code"] == 4001
    if polling_server.kind in ASGI_SERVERS:  # on the event loop: no thread held
        assert outcome["thread"] == "MainThread"


def test_server_close_reaches_the_client(polling_server):
    client = PollClient(polling_server, "/server-close/?code=4002")
    assert client.open()[0] == 200
    client.send("now")
    messages, close = client.poll()
    while close is None:
        messages, close = client.poll()
    assert close == {"code": 4002, "reason": "bye now"}


def test_subprotocol(polling_server):
    client = PollClient(polling_server, "/subprotocol/")
    status, body = client.open(["chat.v1"])
    assert status == 200 and body["subprotocol"] == "chat.v1"
    assert client.receive(1) == ["subprotocol=chat.v1 protocol=chat.v1"]
    client.close()


def test_session_expires_when_polls_stop(polling_server):
    key = uuid.uuid4().hex
    client = PollClient(polling_server, f"/echo/?id={key}")
    assert client.open()[0] == 200
    client.send("then silence")
    seen = result(polling_server, key)  # waits until the view has finished
    assert seen["close_code"] == 1006 and seen["closed"] is True
    status, body = client.call("GET", "poll")
    # Gone (in one process), or, with Redis, still there long enough to say why.
    assert status == 404 or (status == 200 and body["close"]["code"] == 1006), (status, body)


def test_a_view_that_accepts_after_the_open_gave_up_finds_the_connection_closed(polling_server):
    key = uuid.uuid4().hex
    client = PollClient(polling_server, f"/late-accept/?id={key}&delay=3")  # WEBSOCKET_POLL_TIMEOUT is 2
    status, body = client.open()
    assert status == 503 and "WEBSOCKET_POLL_TIMEOUT" in body["error"], (status, body)
    seen = result(polling_server, key)  # the view is not left waiting for a client that left
    assert (seen["message"], seen["connected"], seen["close_code"]) == (None, False, 1006)
    status, text = polling_server.get("/presence/late-accept/")
    assert status == 200 and json.loads(text)["size"] == 0  # and it left no member behind


def test_wrong_or_unknown_session_and_malformed_requests(polling_server):
    client = PollClient(polling_server, "/echo/")
    assert client.open()[0] == 200
    other = PollClient(polling_server, "/echo/")
    assert other.call("GET", "poll", sid="not-a-session")[0] == 404
    assert client.call("POST", "send", raw=b"{not json")[0] == 400
    assert client.call("POST", "send", {"messages": [{"nope": 1}]})[0] == 400
    assert client.call("POST", "send", {"messages": [{"binary": "***"}]})[0] == 400
    assert client.call("GET", "send")[0] == 405
    assert client.call("GET", "teleport")[0] == 400
    assert client.call("GET", "open")[0] == 400  # open is a POST
    client.close()


def test_session_is_bound_to_the_client_session_cookie(polling_server):
    client = PollClient(polling_server, "/echo/")
    client.opener.open(f"{polling_server.http}/login-as/alice/").read()  # a Django session cookie
    assert any(cookie.name == "sessionid" for cookie in client.jar)
    assert client.open()[0] == 200
    thief = PollClient(polling_server, "/echo/")  # knows the sid, not the cookie
    thief.sid = client.sid
    assert thief.call("GET", "poll")[0] == 404
    assert thief.send("stolen") == 404
    client.send("mine")
    assert client.receive(1) == ["mine"]
    client.close()


def test_cross_site_requests_are_refused(polling_server):
    evil = PollClient(polling_server, "/echo/", origin="https://evil.example")
    assert evil.open()[0] == 403
    client = PollClient(polling_server, "/echo/")
    assert client.open()[0] == 200
    forged = PollClient(polling_server, "/echo/", origin="https://evil.example")
    forged.sid = client.sid
    assert forged.send("forged") == 403
    client.close()


def test_an_origin_is_allowed_only_by_djangos_csrf_rule_not_by_allowed_hosts(polling_server):
    # localhost is in ALLOWED_HOSTS, but a page there is another origin than
    # http://127.0.0.1:port: a cross-site request, refused like a handshake.
    other = f"http://localhost:{polling_server.port}"
    assert PollClient(polling_server, "/echo/", origin=other).open()[0] == 403
    assert PollClient(polling_server, "/echo/", origin="https://trusted.example").open()[0] == 200
    client = PollClient(polling_server, "/echo/")
    assert client.open()[0] == 200
    forged = PollClient(polling_server, "/echo/", origin=other)
    forged.sid = client.sid
    assert forged.send("forged") == 403
    client.close()


def test_oversized_post_is_refused_with_413(polling_server):
    client = PollClient(polling_server, "/echo/")
    assert client.open()[0] == 200
    assert client.send("x" * (1024 * 1024 + 1)) == 413
    _, close = client.poll()
    assert close == {"code": 1009, "reason": "message too big"}


def test_refusals_pass_through(polling_server):
    assert PollClient(polling_server, "/refuses/").open()[0] == 403
    assert PollClient(polling_server, "/plain/").open()[0] == 400


def test_a_hundred_concurrent_sessions(polling_server):
    errors = []

    def one(index):
        try:
            client = PollClient(polling_server, "/echo/")
            assert client.open()[0] == 200
            client.send(f"hello {index}")
            assert client.receive(1) == [f"hello {index}"]
            client.close()
        except Exception as exc:  # collected and reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
        if polling_server.kind == "runserver":
            time.sleep(0.02)  # Django's development server listens with a backlog of 10
    for thread in threads:
        thread.join(120)
    assert errors == []


def test_polls_alternate_between_two_processes_through_redis():
    """With Redis, any process serves any session: no sticky sessions needed."""
    with start_redis() as redis_server:
        env = {"DWS_TEST_BROKER": redis_server.url, "DWS_TEST_POLL_TIMEOUT": "1"}
        with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second:
            # Two ports stand for one site behind a load balancer: the page's
            # origin is one of CSRF_TRUSTED_ORIGINS (127.0.0.1:first would be
            # a foreign origin to the second port).
            site = "https://trusted.example"
            key = uuid.uuid4().hex
            client = PollClient(first, f"/echo/?id={key}", origin=site)
            assert client.open()[0] == 200  # the view runs in the first process
            for n in range(6):
                client.server = (first, second)[n % 2]  # alternate every request
                assert client.send(f"message {n}") == 204
                client.server = (second, first)[n % 2]
                assert client.receive(1) == [f"message {n}"]
            client.server = second
            assert client.close(4007, "done") == 204
            assert result(first, key)["close_code"] == 4007
            # A chat across the two: a polling client on the second process and a
            # WebSocket client on the first, in one group.
            from .client import ws_connect

            with ws_connect(first, "/group/mixed/") as ws:
                assert ws.recv(timeout=5).startswith("joined ")
                poller = PollClient(second, "/group/mixed/", origin=site)
                assert poller.open()[0] == 200
                assert poller.receive(1)[0].startswith("joined ")
                poller.server = first
                poller.send("from polling")
                assert ws.recv(timeout=10) == "from polling"
                ws.send("from websocket")
                poller.server = second
                assert poller.receive(1) == ["from websocket"]
                poller.close()


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_an_idle_poll_through_redis_outlasts_the_clients_default_socket_timeout(kind):
    # redis-py 8 gives a connection a 5 s socket timeout unless told otherwise; a
    # poll's BLPOP waits WEBSOCKET_POLL_TIMEOUT, here 7 s, and must answer empty.
    with start_redis() as redis_server:
        env = {"DWS_TEST_BROKER": redis_server.url, "DWS_TEST_POLL_TIMEOUT": "7"}
        with start_server(kind, env=env) as running:
            client = PollClient(running, f"/echo/?id={uuid.uuid4().hex}")
            assert client.open()[0] == 200
            started = time.monotonic()
            assert client.poll() == ([], None)
            assert time.monotonic() - started >= 6.5
            assert client.send("still there") == 204
            assert client.receive(1) == ["still there"]
            client.close()
            assert "Traceback" not in running.log_text()


def test_a_session_whose_owner_died_answers_404_within_seconds():
    """The owner (the process running the view) is killed: its sessions end for the clients too."""
    import os
    import signal

    with start_redis() as redis_server:
        env = {"DWS_TEST_BROKER": redis_server.url, "DWS_TEST_POLL_TIMEOUT": "1"}
        with start_server("gthread", env=env) as owner, start_server("uvicorn", env=env) as other:
            # One site behind a balancer: the page's origin is trusted by both ports.
            client = PollClient(owner, f"/echo/?id={uuid.uuid4().hex}", origin="https://trusted.example")
            assert client.open()[0] == 200
            client.server = other  # any process serves the session
            assert client.send("hello") == 204
            assert client.receive(1) == ["hello"]
            os.killpg(owner.process.pid, signal.SIGKILL)
            owner.process.wait()
            killed = time.monotonic()
            statuses = []
            while time.monotonic() - killed < 20:
                status = client.call("POST", "send", {"messages": [{"text": "lost?"}]})[0]
                statuses.append(status)
                if status == 404:
                    break
                assert status == 204
                poll = client.call("GET", "poll")[0]
                if poll == 404:
                    break
                assert poll == 200
            took = time.monotonic() - killed
            # It used to poll a dead session for an hour, its sends answered 204 and lost.
            assert took < 15, f"still served {took:.0f} s after its owner died: {statuses}"
            assert client.call("GET", "poll")[0] == 404
            assert client.send("after") == 404


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_polling_while_redis_is_down_answers_503_not_500(kind):
    """An operator's fault is no client's error, and no traceback: 503, Retry-After, one log line."""
    with start_redis() as redis_server:
        env = {"DWS_TEST_BROKER": redis_server.url, "DWS_TEST_POLL_TIMEOUT": "1"}
        with start_server(kind, env=env) as server:
            client = PollClient(server, f"/echo/?id={uuid.uuid4().hex}")
            assert client.open()[0] == 200
            redis_server.stop()
            try:
                statuses = {client.call("GET", "poll")[0], client.send("while down")}
            finally:
                redis_server.start()
            assert statuses == {503}
            assert "Traceback" not in server.log_text()
            assert "Redis" in server.log_text()
