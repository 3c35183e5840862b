"""The opening handshake: origins, validation, permessage-deflate bounds."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from django.test import RequestFactory, override_settings

from hypothesis import given, settings
from hypothesis import strategies as st

from dwebsocket.handshake import Handshake, HandshakeError, check_origin, is_websocket_request, origin_allowed
from dwebsocket.transports.asgi.transport import AsgiOpener
from dwebsocket.transports.wsgi.protocol import server_protocol


def from_origin(origin, host="127.0.0.1:8000", secure=False, **meta):
    """A handshake to *host* from a page at *origin*."""
    return RequestFactory().get(
        "/chat/", HTTP_HOST=host, HTTP_ORIGIN=origin, secure=secure, **meta
    )


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://127.0.0.1:8000", True),  # the request's own scheme://host
        ("https://127.0.0.1:8000", False),  # ... scheme included
        ("http://127.0.0.1:8001", False),  # ... port included
        ("http://localhost:8000", False),  # in ALLOWED_HOSTS, but another origin
        ("http://127.0.0.1", False),
        ("https://trusted.example", True),  # CSRF_TRUSTED_ORIGINS
        ("http://trusted.example", False),  # ... scheme included
        ("https://evil.example", False),
        ("https://127.0.0.1.evil.example", False),
        ("null", False),
        ("file://", False),
        ("http://[::1", False),  # urlsplit raises
    ],
)
def test_the_origin_rule_is_djangos_csrf_rule(origin, allowed):
    assert origin_allowed(from_origin(origin)) is allowed


def test_no_origin_header_is_allowed():
    assert origin_allowed(RequestFactory().get("/chat/", HTTP_HOST="127.0.0.1:8000"))


@override_settings(ALLOWED_HOSTS=["*"])
def test_allowed_hosts_star_does_not_open_the_door_to_every_site():
    # Cross-site WebSocket hijacking: before, every origin's host passed ALLOWED_HOSTS.
    assert not origin_allowed(from_origin("https://evil.example", host="app.example.com"))
    assert origin_allowed(from_origin("http://app.example.com", host="app.example.com"))


@override_settings(ALLOWED_HOSTS=[".example.com"])
def test_a_sibling_subdomain_is_another_origin():
    assert not origin_allowed(from_origin("https://evil.example.com", host="app.example.com", secure=True))
    assert origin_allowed(from_origin("https://app.example.com", host="app.example.com", secure=True))


@override_settings(ALLOWED_HOSTS=["app.example.com"], SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_behind_a_tls_proxy_the_scheme_comes_from_secure_proxy_ssl_header():
    https = "https://app.example.com"
    assert origin_allowed(from_origin(https, host="app.example.com", HTTP_X_FORWARDED_PROTO="https"))
    assert not origin_allowed(from_origin(https, host="app.example.com"))  # the proxy says http


@override_settings(ALLOWED_HOSTS=[])
def test_a_host_django_refuses_has_no_own_origin():
    assert not origin_allowed(from_origin("http://app.example.com", host="app.example.com"))


@override_settings(DEBUG=True, ALLOWED_HOSTS=[])
def test_debug_with_empty_allowed_hosts_allows_localhost_pages_like_django():
    assert origin_allowed(from_origin("http://localhost:3000", host="localhost:3000"))
    assert not origin_allowed(from_origin("http://localhost:3000", host="localhost:8000"))


@override_settings(CSRF_TRUSTED_ORIGINS=["https://*.example.com", "http://exact.example.org"])
def test_csrf_trusted_origins_wildcards_as_django_reads_them():
    assert origin_allowed(from_origin("https://chat.example.com"))
    assert origin_allowed(from_origin("https://a.b.example.com"))
    assert origin_allowed(from_origin("https://example.com"))
    assert not origin_allowed(from_origin("http://chat.example.com"))
    assert not origin_allowed(from_origin("https://chat.example.com:8443"))  # a port must be written
    assert origin_allowed(from_origin("http://exact.example.org"))
    assert not origin_allowed(from_origin("http://sub.exact.example.org"))


@override_settings(WEBSOCKET_ALLOWED_ORIGINS=["https://*.example.com", "app.example.org", "https://b.example.net/"])
def test_websocket_allowed_origins_add_to_the_rule():
    assert origin_allowed(from_origin("https://chat.example.com"))
    assert origin_allowed(from_origin("https://example.com"))
    assert not origin_allowed(from_origin("http://chat.example.com"))
    assert origin_allowed(from_origin("http://app.example.org:8080"))  # a host pattern: any scheme, port
    assert origin_allowed(from_origin("https://b.example.net"))
    assert origin_allowed(from_origin("http://127.0.0.1:8000"))  # the site's own origin still counts
    assert origin_allowed(from_origin("https://trusted.example"))  # and CSRF_TRUSTED_ORIGINS
    assert not origin_allowed(from_origin("http://localhost:8000"))


@override_settings(WEBSOCKET_ALLOWED_ORIGINS=["*"])
def test_star_allows_every_origin():
    assert origin_allowed(from_origin("https://anything.example"))
    assert origin_allowed(from_origin("null"))


def test_a_refusal_is_logged_once_naming_the_setting(caplog):
    with caplog.at_level("WARNING", logger="dwebsocket"), pytest.raises(HandshakeError) as refused:
        check_origin(from_origin("https://evil.example"))
    assert refused.value.status == 403 and "ALLOWED_HOSTS" not in refused.value.message
    [record] = caplog.records
    assert "'https://evil.example'" in record.getMessage()
    assert "add its origin to WEBSOCKET_ALLOWED_ORIGINS" in record.getMessage()
    assert "http://127.0.0.1:8000" in record.getMessage()


origins = st.one_of(
    st.sampled_from(["http://127.0.0.1:8000", "https://127.0.0.1:8000", "https://trusted.example", "null", ""]),
    st.builds(
        "{}://{}{}{}".format,
        st.sampled_from(["http", "https", "ws", "HTTP"]),
        st.sampled_from(["", "a.", "b.a.", "x"]),
        st.sampled_from(["example.com", "EXAMPLE.com", "127.0.0.1", "[::1]", "example.com."]),
        st.sampled_from(["", ":8000", ":443", ":"]),
    ),
    st.text(max_size=30),
)
trusted_lists = st.lists(
    st.builds(
        "{}://{}{}".format,
        st.sampled_from(["http", "https"]),
        st.sampled_from(["", "*.", "*", "a."]),
        st.sampled_from(["example.com", "127.0.0.1:8000", "example.com:8000"]),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None, database=None)
@given(origin=origins, trusted=trusted_lists, secure=st.booleans(), host=st.sampled_from(["127.0.0.1:8000", "example.com", "a.example.com", "bad_host"]))
def test_the_rule_agrees_with_djangos_csrf_middleware(origin, trusted, secure, host):
    # Differential: Django's own CsrfViewMiddleware._origin_verified is the reference.
    from django.middleware.csrf import CsrfViewMiddleware

    with override_settings(CSRF_TRUSTED_ORIGINS=trusted, ALLOWED_HOSTS=["127.0.0.1", ".example.com"]):
        request = from_origin(origin, host=host, secure=secure)
        expected = CsrfViewMiddleware(lambda r: None)._origin_verified(request)
        assert origin_allowed(request) is expected


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
    """Feed *frame* in 64 KiB reads to the protocol of an accepted connection; (bytes seen, close code)."""
    handshake = Handshake(handshake_request(HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate"))
    handshake.accept(None, compression=True)
    protocol = server_protocol(handshake.deflate, limit)
    seen, code = 0, None
    for start in range(0, len(frame), 65536):
        protocol.receive_data(frame[start:start + 65536])
        for received in protocol.events_received():
            seen += len(received.data)
        if protocol.close_sent is not None:
            code = protocol.close_sent.code
            break
    return seen, code


def test_a_deflate_bomb_is_not_inflated_past_the_message_size_limit():
    limit = 1024 * 1024
    bomb = compressed_frame(bytes(256 * limit))  # 256 MiB of zeros in about 256 KiB
    assert len(bomb) < limit
    seen, code = inflate_through(limit, bomb)
    assert code == 1009
    assert seen <= limit + 1


def test_an_offer_of_server_max_window_bits_8_is_declined_for_the_next_one():
    """zlib cannot deflate with an 8-bit window (it uses 9, which such a client cannot inflate)."""
    offers = "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10"
    handshake = Handshake(handshake_request(HTTP_SEC_WEBSOCKET_EXTENSIONS=offers))
    answer = handshake.accept(None, compression=True)
    assert b"permessage-deflate; server_max_window_bits=10" in answer
    assert handshake.deflate is not None and handshake.deflate.server_max_window_bits == 10
    alone = Handshake(handshake_request(HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate; server_max_window_bits=8"))
    assert b"permessage-deflate" not in alone.accept(None, compression=True)
    assert alone.deflate is None


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
