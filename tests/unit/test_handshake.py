"""The opening handshake: origins, validation, permessage-deflate bounds."""

from __future__ import annotations

import struct
import zlib

import pytest
from django.test import RequestFactory, override_settings
from wsproto.events import BytesMessage, CloseConnection

from dwebsocket.handshake import Handshake, HandshakeError, is_websocket_request, origin_allowed


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

