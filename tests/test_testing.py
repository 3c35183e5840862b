"""dwebsocket.testing: users' own tests of their views, without a server.

These run the tests project's views in this process; test_user_tests.py runs a
user's TestCase with Django's test runner (database, login).
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import pytest
from django.test import override_settings
from django.test.utils import setup_test_environment, teardown_test_environment

from dwebsocket.testing import HandshakeRefused, WebSocketClient

from .project import views


@pytest.fixture(scope="module", autouse=True)
def test_environment():
    # What Django's test runner (and pytest-django) set up: "testserver" allowed.
    setup_test_environment()
    yield
    teardown_test_environment()


@pytest.fixture
def client():
    return WebSocketClient()


def test_the_seed_echo_view(client):
    with client.connect("/seed/echo/") as ws:
        assert ws.send("hello")
        assert ws.receive() == "You said: hello"
        ws.send("héllo ✓")
        assert ws.receive() == "You said: héllo ✓"


def test_the_seed_broadcast_view_between_two_test_clients(client):
    with client.connect("/seed/broadcast/") as alice, WebSocketClient().connect("/seed/broadcast/") as bob:
        alice.send("hi all")
        assert bob.receive() == "hi all"
        with pytest.raises(TimeoutError):
            alice.receive(timeout=0.2)  # the sender gets nothing back


def test_text_and_binary_and_iteration(client):
    with client.connect("/send-types/") as ws:
        assert ws.receive() == "text"
        assert ws.receive() == b"\x00\x01binary"


def test_a_plain_request_to_a_websocket_only_view_is_refused_with_400(client):
    response = client.http.get("/seed/echo/")
    assert response.status_code == 400


def test_a_view_that_answers_with_a_response_refuses_the_handshake(client):
    with pytest.raises(HandshakeRefused) as refused:
        client.connect("/refuses/")
    assert refused.value.status_code == 403
    assert refused.value.response.content == b"no entry\n"


def test_a_url_without_a_view_is_refused_with_404(client):
    with pytest.raises(HandshakeRefused) as refused:
        client.connect("/no-such-view/")
    assert refused.value.status_code == 404


def test_an_undecorated_view_is_refused_and_accept_all_opens_it(client):
    with pytest.raises(HandshakeRefused) as refused:
        client.connect("/plain/")
    assert refused.value.status_code == 400
    with override_settings(WEBSOCKET_ACCEPT_ALL=True):
        with WebSocketClient().connect("/undecorated-echo/") as ws:
            ws.send("x")
            assert ws.receive() == "x"


def test_a_foreign_origin_is_refused_as_under_a_server(client):
    with pytest.raises(HandshakeRefused) as refused:
        client.connect("/seed/echo/", headers={"Origin": "https://evil.example"})
    assert refused.value.status_code == 403


def test_the_origin_rule_is_djangos_as_under_a_server(client):
    # ALLOWED_HOSTS names this site, not the sites that may script it.
    with pytest.raises(HandshakeRefused) as refused:
        client.connect("/seed/echo/", headers={"Origin": "http://localhost"})
    assert refused.value.status_code == 403
    with client.connect("/seed/echo/", headers={"Origin": "https://trusted.example"}) as ws:
        ws.send("ok")
        assert ws.receive()


def test_subprotocol_negotiation(client):
    with client.connect("/subprotocol/", subprotocols=["nope", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.receive() == "subprotocol=chat.v2 protocol=chat.v2"


def test_the_view_closes_with_a_code(client):
    key = uuid.uuid4().hex
    ws = client.connect("/server-close/", {"code": "4001", "id": key})
    ws.send("now")
    assert ws.receive() is None
    assert (ws.closed, ws.close_code, ws.close_reason) == (True, 4001, "bye now")
    assert ws.send("late") is False
    assert ws.receive() is None  # and stays closed
    assert views._results[key]["close_code"] == 4001


def test_the_client_closes_with_a_code_and_the_view_has_returned(client):
    key = uuid.uuid4().hex
    ws = client.connect("/echo/", {"id": key})
    ws.close(4002, "done")
    # close() waits for the view: what it did on the close is visible now.
    outcome = views._results[key]
    assert (outcome["close_code"], outcome["close_reason"], outcome["finished"]) == (4002, "done", True)


def test_an_exception_in_the_view_is_raised_in_the_test(client):
    ws = client.connect("/raises/")
    assert ws.receive() == "about to fail"
    with pytest.raises(RuntimeError, match="fails on purpose"):
        ws.receive()
    assert ws.close_code == 1011


def test_an_exception_is_only_reported_when_asked_not_to_raise():
    client = WebSocketClient(raise_view_exception=False)
    with client.connect("/raises/") as ws:
        assert ws.receive() == "about to fail"
        assert ws.receive() is None
        assert ws.close_code == 1011


def test_a_view_that_never_answers_times_out(client):
    with client.connect("/wait-timeout/") as ws:
        with pytest.raises(TimeoutError):
            ws.receive(timeout=0.05)  # the view waits 0.3 s before it sends
        assert ws.receive().startswith("timeout message=None connected=True")


def test_an_async_view(client):
    key = uuid.uuid4().hex
    with client.connect("/async-echo/", {"id": key}) as ws:
        ws.send("async")
        assert ws.receive() == "async"
    assert views._results[key]["kind"] == "AsyncWebSocket"


def test_groups_and_broadcast_reach_test_connections(client):
    from dwebsocket import broadcast, group_size

    with client.connect("/group/testing/") as a, client.connect("/group/testing/") as b:
        assert a.receive().startswith("joined ") and b.receive().startswith("joined ")
        assert group_size("testing") == 2
        broadcast("testing", "to everyone")
        assert a.receive() == "to everyone" and b.receive() == "to everyone"
    assert group_size("testing") == 0


def test_a_test_can_check_that_its_view_recovers_what_a_page_missed(client):
    from dwebsocket import broadcast

    with client.connect("/group/recovering/", recovery=True) as first:
        assert first.receive().startswith("joined ")
        assert first.recovered == {"recovering": None}  # nothing to recover on a first visit
        broadcast("recovering", "seen")
        assert first.receive() == "seen" and first.groups[-1] == "recovering"
        first.send("from the page")  # the view sees it plain (and excludes the sender)
    for n in range(3):
        broadcast("recovering", f"missed {n}")
    with client.connect("/group/recovering/", resume=first) as again:
        assert [again.receive() for _ in range(3)] == ["missed 0", "missed 1", "missed 2"]
        assert again.receive().startswith("joined ")
        assert again.recovered == {"recovering": True} and again.id != first.id
    with override_settings(WEBSOCKET_HISTORY_SIZE=2):  # a new, smaller history: another epoch
        broadcast("recovering", "lost")
        with client.connect("/group/recovering/", resume=again) as late:
            assert late.receive().startswith("joined ")
            assert late.recovered == {"recovering": False}


def test_many_connections_at_once(client):
    def talk(index):
        with client.connect("/seed/echo/") as ws:
            for n in range(20):
                ws.send(f"{index}-{n}")
                assert ws.receive() == f"You said: {index}-{n}"

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(talk, range(20), timeout=60))  # re-raises a failed assertion


@override_settings(WEBSOCKET_MAX_QUEUE=2)
def test_send_waits_while_the_views_queue_is_full(client):
    with client.connect("/sleepy-echo/") as ws:  # takes a message, sleeps 0.5 s, echoes
        assert ws.send("1") and ws.send("2") and ws.send("3")  # "1" taken, 2 queued
        started = time.monotonic()
        assert ws.send("4")  # waits for room: the view takes "2" after its sleep
        assert time.monotonic() - started > 0.2
        with pytest.raises(TimeoutError):
            ws.send("5", timeout=0.05)  # full again until the next sleep ends
        assert [ws.receive() for _ in range(4)] == ["1", "2", "3", "4"]


@override_settings(WEBSOCKET_MAX_MESSAGE_SIZE=10)
def test_a_message_over_the_size_limit_closes_with_1009_as_on_a_server(client):
    key = uuid.uuid4().hex
    with client.connect("/echo/", {"id": key}) as ws:
        assert ws.send("x" * 10)
        assert ws.receive() == "x" * 10
        ws.send("é" * 6)  # 12 bytes of UTF-8
        assert ws.receive() is None
        assert (ws.close_code, ws.close_reason) == (1009, "message too big")
    assert views._results[key]["close_code"] == 1009


@override_settings(WEBSOCKET_BROADCAST_QUEUE=5)
def test_a_test_connection_that_stops_reading_broadcasts_is_cut_as_on_a_server(client):
    from dwebsocket import broadcast
    from dwebsocket.transports.policy import STALL_SECONDS

    with client.connect("/group/testing-slow/") as reader, client.connect("/group/testing-slow/") as stalled:
        assert reader.receive().startswith("joined ") and stalled.receive().startswith("joined ")
        for n in range(20):  # a burst: more than the queue, and nobody is cut for it
            broadcast("testing-slow", f"burst {n}")
        assert [reader.receive() for _ in range(20)] == [f"burst {n}" for n in range(20)]
        time.sleep(STALL_SECONDS + 0.1)  # "stalled" has read nothing all along
        broadcast("testing-slow", "one more")
        assert reader.receive() == "one more"
        received = []
        while (message := stalled.receive()) is not None:
            received.append(message)
        assert received == [f"burst {n}" for n in range(20)]  # what was queued before the cut
        assert stalled.close_code == 1013
