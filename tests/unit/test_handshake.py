"""The opening handshake: origins, validation, permessage-deflate bounds."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from django.test import RequestFactory, override_settings
from wsproto.events import BytesMessage, CloseConnection

from dwebsocket.handshake import Handshake, HandshakeError, is_websocket_request, origin_allowed
from dwebsocket.transports.asgi.transport import AsgiOpener


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



# -- what RFC 6455 asks of the request, and offers wsproto cannot read ---------------


@pytest.mark.parametrize("key", ["", "YWJj", "dGhlIHNhbXBsZSBub25jZQ", "!!!!!!!!!!!!!!!!!!!!!!==", "dGhlIHNhbXBsZSBub25jZSE="])
def test_a_key_that_is_not_base64_of_16_bytes_is_refused_with_400(key):
    with pytest.raises(HandshakeError) as refused:
        Handshake(handshake_request(HTTP_SEC_WEBSOCKET_KEY=key))
    assert refused.value.status == 400 and "Sec-WebSocket-Key must be 16" in refused.value.message


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/0.9", "garbage"])
def test_a_handshake_before_http_1_1_is_refused_with_400(version):
    with pytest.raises(HandshakeError) as refused:
        Handshake(handshake_request(SERVER_PROTOCOL=version))
    assert refused.value.status == 400 and "HTTP/1.1 or later" in refused.value.message


def test_http_1_1_and_later_pass():
    for version in ("HTTP/1.1", "HTTP/2", "HTTP/2.0"):
        Handshake(handshake_request(SERVER_PROTOCOL=version))


@pytest.mark.parametrize("header", ["HTTP_SEC_WEBSOCKET_PROTOCOL", "HTTP_SEC_WEBSOCKET_EXTENSIONS", "HTTP_UPGRADE"])
def test_a_token_header_that_is_not_ascii_is_refused_with_400_not_a_500(header):
    # wsproto decoded them as ASCII: UnicodeDecodeError, a 500.
    value = {"HTTP_UPGRADE": "websocket\xe9"}.get(header, "chat\xe9")
    with pytest.raises(HandshakeError) as refused:
        Handshake(handshake_request(**{header: value}))
    assert refused.value.status == 400 and "is not ASCII" in refused.value.message


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; server_max_window_bits=",
        "permessage-deflate; client_max_window_bits=99",
    ],
)
def test_a_deflate_offer_wsproto_cannot_read_is_declined(offer):
    # RFC 7692 section 5; wsproto raised ValueError for the first two, from
    # inside the view's first use of request.websocket (a 500).
    answer = Handshake(handshake_request(HTTP_SEC_WEBSOCKET_EXTENSIONS=offer)).accept(None, compression=True)
    assert answer.startswith(b"HTTP/1.1 101") and b"permessage-deflate" not in answer


def test_a_bad_deflate_offer_leaves_nothing_behind_for_a_good_one_after_it():
    offers = "permessage-deflate; server_no_context_takeover; client_max_window_bits=x, permessage-deflate"
    answer = Handshake(handshake_request(HTTP_SEC_WEBSOCKET_EXTENSIONS=offers)).accept(None, compression=True)
    assert b"Sec-WebSocket-Extensions: permessage-deflate\r\n" in answer


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize(
    ("http_version", "headers", "text"),
    [
        ("1.0", {}, "HTTP/1.1 or later"),
        ("1.1", {"HTTP_SEC_WEBSOCKET_KEY": ""}, "Sec-WebSocket-Key must be 16"),
        ("1.1", {"HTTP_SEC_WEBSOCKET_KEY": None}, "Sec-WebSocket-Key"),
        ("1.1", {"HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate; client_max_window_bits=abc"}, "permessage-deflate"),
        ("1.1", {"HTTP_ORIGIN": "https://evil.example"}, "WEBSOCKET_ALLOWED_ORIGINS"),
    ],
)
def test_under_asgi_dwebsocket_checks_what_the_server_may_let_through(loop, http_version, headers, text):
    # The ASGI server validates and answers the handshake and negotiates the
    # extensions; dwebsocket still refuses, before the view runs, what some
    # servers pass on (uvicorn's wsproto front end: an empty key; a deflate
    # offer the server's own accept would fail on).
    opener = AsgiOpener({"type": "websocket", "http_version": http_version}, None, None, loop)
    with pytest.raises(HandshakeError) as refused:
        opener.prepare(handshake_request(**headers))
    assert refused.value.status in (400, 403) and text in refused.value.message


def test_under_asgi_http_2_needs_no_key(loop):
    AsgiOpener({"type": "websocket", "http_version": "2"}, None, None, loop).prepare(
        handshake_request(HTTP_SEC_WEBSOCKET_KEY=None)  # RFC 8441: no key over HTTP/2
    )
