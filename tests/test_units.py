"""In-process tests of the parts that need no server: checks, origins, the queue."""

from __future__ import annotations

import struct
import threading
import time
import zlib

import pytest
from django.core.checks import run_checks
from django.test import RequestFactory, override_settings
from wsproto.events import BytesMessage, CloseConnection

from dwebsocket.connection import CLOSED, Connection, check_close_code
from dwebsocket.handshake import Handshake, HandshakeError, is_websocket_request, origin_allowed


def dwebsocket_messages():
    return sorted((m.id, m.msg) for m in run_checks() if m.id and m.id.startswith("dwebsocket."))


# -- system checks ------------------------------------------------------------


def test_default_settings_pass_the_checks():
    assert dwebsocket_messages() == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("WEBSOCKET_MAX_MESSAGE_SIZE", -1),
        ("WEBSOCKET_MAX_MESSAGE_SIZE", "1MB"),
        ("WEBSOCKET_MAX_QUEUE", None),
        ("WEBSOCKET_MAX_QUEUE", 1.5),
        ("WEBSOCKET_PING_INTERVAL", 0),
        ("WEBSOCKET_PING_TIMEOUT", "20"),
        ("WEBSOCKET_CLOSE_TIMEOUT", None),
        ("WEBSOCKET_BROADCAST_QUEUE", 0),
    ],
)
def test_wrong_setting_values_are_reported(setting, value):
    with override_settings(**{setting: value}):
        messages = dwebsocket_messages()
    assert len(messages) == 1
    check_id, text = messages[0]
    assert check_id == "dwebsocket.E001"
    assert text.startswith(f"{setting} must be a positive")


@pytest.mark.parametrize("setting", ["WEBSOCKET_MAX_MESSAGE_SIZE", "WEBSOCKET_PING_INTERVAL", "WEBSOCKET_PING_TIMEOUT"])
def test_none_turns_a_limit_off(setting):
    with override_settings(**{setting: None}):
        assert dwebsocket_messages() == []


def test_allowed_origins_must_be_a_list_of_strings():
    with override_settings(WEBSOCKET_ALLOWED_ORIGINS="https://example.com"):
        assert [m[0] for m in dwebsocket_messages()] == ["dwebsocket.E002"]


def test_missing_middleware_is_a_warning():
    from django.conf import settings

    middleware = [m for m in settings.MIDDLEWARE if "dwebsocket" not in m]
    with override_settings(MIDDLEWARE=middleware):
        assert [m[0] for m in dwebsocket_messages()] == ["dwebsocket.W001"]


# -- origins ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://127.0.0.1:8000", True),  # ALLOWED_HOSTS, any port and scheme
        ("https://localhost", True),
        ("https://trusted.example", True),  # CSRF_TRUSTED_ORIGINS
        ("http://trusted.example", False),  # ... scheme included
        ("https://evil.example", False),
        ("https://127.0.0.1.evil.example", False),
        ("null", False),
        ("file://", False),
    ],
)
def test_default_origin_rules_follow_allowed_hosts_and_csrf_trusted_origins(origin, allowed):
    assert origin_allowed(origin) is allowed


@override_settings(ALLOWED_HOSTS=[], DEBUG=True)
def test_debug_with_empty_allowed_hosts_allows_localhost_like_django():
    assert origin_allowed("http://localhost:3000")
    assert origin_allowed("http://127.0.0.1:8000")
    assert not origin_allowed("http://example.com")


@override_settings(WEBSOCKET_ALLOWED_ORIGINS=["https://*.example.com", "app.example.org"])
def test_explicit_origins_replace_the_default_rules():
    assert origin_allowed("https://chat.example.com")
    assert origin_allowed("https://example.com")
    assert not origin_allowed("http://chat.example.com")
    assert origin_allowed("http://app.example.org:8080")
    assert not origin_allowed("http://127.0.0.1:8000")  # ALLOWED_HOSTS no longer counts


@override_settings(WEBSOCKET_ALLOWED_ORIGINS=["*"])
def test_star_allows_every_origin():
    assert origin_allowed("https://anything.example")
    assert origin_allowed("null")


# -- the handshake ------------------------------------------------------------


def handshake_request(**headers):
    defaults = {
        "HTTP_HOST": "127.0.0.1",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
    }
    defaults.update(headers)
    return RequestFactory().get("/chat/?room=1", **{k: v for k, v in defaults.items() if v is not None})


def test_is_websocket_request():
    assert is_websocket_request(handshake_request())
    assert is_websocket_request(handshake_request(HTTP_UPGRADE="WebSocket"))
    assert not is_websocket_request(RequestFactory().get("/"))
    assert not is_websocket_request(RequestFactory().post("/", HTTP_UPGRADE="websocket"))


def test_handshake_accepts_and_negotiates():
    handshake = Handshake(handshake_request(
        HTTP_SEC_WEBSOCKET_PROTOCOL="b, a",
        HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate; client_max_window_bits",
    ))
    assert handshake.offered_subprotocols == ["b", "a"]
    assert handshake.select_subprotocol(["a", "b"]) == "b"  # the client's preference
    assert handshake.select_subprotocol(["c"]) is None
    answer = handshake.accept("b", compression=True)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer
    assert b"Sec-WebSocket-Protocol: b" in answer
    assert b"permessage-deflate" in answer
    assert b"permessage-deflate" not in Handshake(handshake_request(
        HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate")).accept(None, compression=False)


@pytest.mark.parametrize(
    ("headers", "status", "text"),
    [
        ({"HTTP_SEC_WEBSOCKET_KEY": None}, 400, "Sec-WebSocket-Key"),
        ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, 426, "Sec-WebSocket-Version"),
        ({"HTTP_CONNECTION": "keep-alive"}, 400, "Connection: Upgrade"),
        ({"HTTP_ORIGIN": "https://evil.example"}, 403, "WEBSOCKET_ALLOWED_ORIGINS"),
    ],
)
def test_bad_handshakes_are_refused_with_a_reason(headers, status, text):
    with pytest.raises(HandshakeError) as refused:
        Handshake(handshake_request(**headers))
    response = refused.value.response()
    assert response.status_code == status
    assert text in response.content.decode()


# -- the connection's queue and close codes -----------------------------------------


class RecordingTransport:
    def __init__(self):
        self.sent = []
        self.closes = []

    def send(self, message):
        self.sent.append(message)
        return True

    def close(self, code, reason):
        self.closes.append((code, reason))


def open_connection(max_queue=64):
    connection = Connection(max_queue=max_queue)
    transport = RecordingTransport()
    connection._opened(transport)
    return connection, transport


def test_queue_order_and_counts():
    connection, _ = open_connection()
    assert connection.read() is None and not connection.has_messages()
    connection._deliver("a")
    connection._deliver(b"b")
    assert connection.count_messages() == 2 and connection.has_messages()
    assert connection.wait() == "a"
    assert connection.read() == b"b"
    assert connection.count_messages() == 0


def test_messages_received_before_the_close_are_still_read():
    connection, _ = open_connection()
    connection._deliver("last words")
    connection._closed(1000, "bye")
    assert not connection.connected and connection.closed and connection.is_closed()
    assert list(connection) == ["last words"]
    assert connection.wait() is None
    assert (connection.close_code, connection.close_reason) == (1000, "bye")


def test_wait_timeout_returns_none_while_connected():
    connection, _ = open_connection()
    started = time.monotonic()
    assert connection.wait(timeout=0.1) is None
    assert time.monotonic() - started >= 0.1
    assert connection.connected


def test_full_queue_blocks_the_producer_until_the_view_reads():
    connection, _ = open_connection(max_queue=2)
    connection._deliver("1")
    connection._deliver("2")
    producer = threading.Thread(target=connection._deliver, args=("3",))
    producer.start()
    producer.join(0.2)
    assert producer.is_alive()  # backpressure
    assert connection.wait() == "1"
    producer.join(2)
    assert not producer.is_alive()
    assert [connection.read(), connection.read()] == ["2", "3"]


def test_close_releases_a_blocked_producer_and_is_idempotent():
    connection, transport = open_connection(max_queue=1)
    connection._deliver("1")
    producer = threading.Thread(target=connection._deliver, args=("dropped",))
    producer.start()
    connection.close(4000, "done")
    connection.close(4001, "ignored")
    producer.join(2)
    assert not producer.is_alive()
    assert transport.closes == [(4000, "done")]
    assert connection.send("late") is False and transport.sent == []
    assert connection.read() == "1" and connection.read() is None


def test_send_types():
    connection, transport = open_connection()
    assert connection.send("text") and connection.send(b"bin") and connection.send(bytearray(b"ba"))
    assert transport.sent == ["text", b"bin", b"ba"]
    with pytest.raises(TypeError, match="json.dumps"):
        connection.send({"not": "serialized"})


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2000, 5000])
def test_close_codes_a_server_may_not_send_are_refused(code):
    with pytest.raises(ValueError, match="close code"):
        check_close_code(code, "")


def test_close_reason_must_fit_in_a_frame():
    check_close_code(1000, "x" * 123)
    with pytest.raises(ValueError, match="123 bytes"):
        check_close_code(1000, "é" * 62)


def test_a_closed_connection_joins_no_group():
    from dwebsocket import group_size

    connection, _ = open_connection()
    connection.join("units-closed")
    assert group_size("units-closed") == 1
    connection._closed(1006)
    assert group_size("units-closed") == 0
    connection.join("units-closed")  # e.g. a view that joins after its client vanished
    connection.join("units-other")
    assert group_size("units-closed") == 0 and group_size("units-other") == 0


def test_djangos_own_get_asgi_application_serves_websockets_once_the_app_is_installed():
    from django.core.asgi import get_asgi_application

    from dwebsocket.asgi import WebSocketASGIHandler, install

    assert type(get_asgi_application()) is WebSocketASGIHandler  # AppConfig.ready() installed it
    install()  # idempotent
    assert type(get_asgi_application()) is WebSocketASGIHandler  # and an ASGIHandler, for HTTP


def test_closed_connection_state():
    connection, _ = open_connection()
    connection._closed(1006)
    assert connection.wait() is None and connection.read() is None
    assert connection._state == CLOSED and connection.close_code == 1006


@pytest.mark.parametrize(
    ("setting", "value", "check_id"),
    [
        ("WEBSOCKET_BROADCAST_OVERFLOW", "block", "dwebsocket.E003"),
        ("WEBSOCKET_BROKER", "redis", "dwebsocket.E004"),
        ("WEBSOCKET_BROKER", None, "dwebsocket.E004"),
    ],
)
def test_wrong_broker_settings_are_reported(setting, value, check_id):
    with override_settings(**{setting: value}):
        assert [m[0] for m in dwebsocket_messages()] == [check_id]


def test_deploy_check_reports_an_unreachable_redis():
    from tests.servers import free_port

    with override_settings(WEBSOCKET_BROKER=f"redis://127.0.0.1:{free_port()}/0"):
        assert dwebsocket_messages() == []  # the normal checks do not connect
        deploy = [m for m in run_checks(include_deployment_checks=True) if m.id == "dwebsocket.E005"]
    assert len(deploy) == 1 and "cannot be reached" in deploy[0].msg


def test_redis_wire_format_round_trips():
    from dwebsocket.brokers.redis import decode, encode

    for message, exclude in (("héllo", None), (b"\x00\n\xff", "abc123"), ("", "x")):
        assert decode(encode(message, exclude)) == (message, exclude)


def test_broadcast_frame_is_built_once_and_matches_wsproto():
    from dwebsocket.groups import Encoded

    encoded = Encoded("hi")
    assert encoded.frame == b"\x81\x02hi"
    assert encoded.frame is encoded.frame
    assert Encoded(b"\x00" * 200).frame[:4] == b"\x82\x7e\x00\xc8"


def compressed_frame(payload: bytes) -> bytes:
    """One binary client frame, permessage-deflate compressed, with a zero mask."""
    compressor = zlib.compressobj(wbits=-15)
    body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    body = body[:-4]
    if len(body) < 126:
        length = struct.pack("!B", 0x80 | len(body))
    elif len(body) < 65536:
        length = struct.pack("!BH", 0x80 | 126, len(body))
    else:
        length = struct.pack("!BQ", 0x80 | 127, len(body))
    return b"\xc2" + length + b"\x00\x00\x00\x00" + body


def inflate_through(limit, frame):
    """Feed *frame* in 64 KiB reads to an accepted server connection; (bytes seen, close code)."""
    handshake = Handshake(handshake_request(HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate"))
    handshake.accept(None, compression=True, max_message_size=limit)
    seen, code = 0, None
    for start in range(0, len(frame), 65536):
        handshake.connection.receive_data(frame[start:start + 65536])
        for event in handshake.connection.events():
            if isinstance(event, BytesMessage):
                seen += len(event.data)
            elif isinstance(event, CloseConnection):
                code = event.code
        if code is not None:
            break
    return seen, code


def test_a_deflate_bomb_is_not_inflated_past_the_message_size_limit():
    limit = 1024 * 1024
    bomb = compressed_frame(bytes(256 * limit))  # 256 MiB of zeros in about 256 KiB
    assert len(bomb) < limit
    seen, code = inflate_through(limit, bomb)
    assert code == 1009
    assert seen <= limit + 1


def test_a_compressed_message_at_the_limit_inflates_whole():
    limit = 1024 * 1024
    seen, code = inflate_through(limit, compressed_frame(b"x" * limit))
    assert (seen, code) == (limit, None)
    seen, code = inflate_through(None, compressed_frame(b"x" * 4 * limit))
    assert (seen, code) == (4 * limit, None)


def test_the_middleware_process_view_is_a_coroutine_in_an_async_stack():
    # Django awaits a coroutine process_view on the event loop; a sync one would
    # send every request through a thread first.
    from asgiref.sync import iscoroutinefunction

    from dwebsocket.middleware import WebSocketMiddleware

    async def get_response(request):
        return None

    assert iscoroutinefunction(WebSocketMiddleware(get_response).process_view)
    assert not iscoroutinefunction(WebSocketMiddleware(lambda request: None).process_view)
