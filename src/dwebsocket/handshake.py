"""The opening handshake: is this request a WebSocket one, may it connect, and the answer.

The HTTP request has already been parsed by the server into a WSGI environ (or
an ASGI scope); wsproto validates it as a WebSocket handshake and writes the
``101 Switching Protocols`` answer, so nothing here parses or formats frames.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import wsproto
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.http.request import validate_host
from django.utils.http import is_same_domain
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import RemoteProtocolError

from . import conf

logger = logging.getLogger("dwebsocket")

__all__ = [
    "Handshake",
    "HandshakeError",
    "check_origin",
    "check_server_handshake",
    "is_websocket_request",
    "origin_allowed",
]


class HandshakeError(Exception):
    """A handshake dwebsocket refuses, with the HTTP status to answer it with."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)

    def response(self) -> HttpResponse:
        """The plain HTTP response that refuses the handshake."""
        response = HttpResponse(
            self.message + "\n", status=self.status, content_type="text/plain; charset=utf-8"
        )
        for name, value in self.headers:
            response[name] = value
        return response


def is_websocket_request(request: HttpRequest) -> bool:
    """Whether *request* asks to switch to the WebSocket protocol."""
    return request.method == "GET" and "websocket" in request.META.get("HTTP_UPGRADE", "").lower()


def _request_bytes(request: HttpRequest) -> bytes:
    """Rebuild the request head the server parsed, for wsproto to validate."""
    lines = [f"GET {request.get_full_path()} HTTP/1.1"]
    for key, value in request.META.items():
        if key.startswith("HTTP_"):
            lines.append(f"{key[5:].replace('_', '-')}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


class Handshake:
    """A validated opening handshake, ready to be accepted.

    Raises :class:`HandshakeError` when the request is not a valid WebSocket
    handshake or comes from an origin the project does not allow.
    """

    def __init__(self, request: HttpRequest) -> None:
        check_origin(request)
        _check_version(request.META.get("SERVER_PROTOCOL"))
        _check_ascii(request)
        _check_key(request)
        self.connection = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            self.connection.receive_data(_request_bytes(request))
            events = list(self.connection.events())
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in getattr(hint, "headers", [])
            ]
            raise HandshakeError(status, f"Invalid WebSocket handshake: {exc}", headers) from None
        requests = [event for event in events if isinstance(event, Request)]
        if not requests:  # pragma: no cover - wsproto yields one Request or raises
            raise HandshakeError(400, "Invalid WebSocket handshake.")
        self._request = requests[0]
        #: The permessage-deflate parameters agreed on, once accepted (``None``: no compression).
        self.deflate: PerMessageDeflate | None = None

    @property
    def offered_subprotocols(self) -> list[str]:
        """The subprotocols the client offered, in its order of preference."""
        return list(self._request.subprotocols)

    def accept(self, subprotocol: str | None, *, compression: bool) -> bytes:
        """Return the bytes of the ``101 Switching Protocols`` response.

        Afterwards :attr:`deflate` is the permessage-deflate it agreed to
        (with *compression* and an offer it could accept), or ``None``.
        """
        offered = _Deflate() if compression else None
        extensions: list[Extension] = [offered] if offered is not None else []
        answer = self.connection.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
        self.deflate = offered if offered is not None and offered.enabled() else None
        return answer


_HTTP_VERSION = re.compile(r"(?:HTTP/)?(\d+)(?:\.(\d+))?", re.IGNORECASE)


def _check_version(version: str | None) -> None:
    """400 unless *version* ("HTTP/1.1", or an ASGI scope's "1.1") is HTTP/1.1 or later.

    RFC 6455 section 4.1: the handshake is an HTTP/1.1 request (or, RFC 8441,
    one over HTTP/2). An HTTP/1.0 client cannot keep the connection for the
    protocol switch. ``None`` (a server that does not say) is let through.
    """
    if version is None:
        return
    match = _HTTP_VERSION.fullmatch(version.strip())
    if match is None or (int(match.group(1)), int(match.group(2) or 0)) < (1, 1):
        raise HandshakeError(
            400, f"Invalid WebSocket handshake: it needs HTTP/1.1 or later; this request is {version!r}."
        )


_TOKEN_HEADERS = ("HTTP_UPGRADE", "HTTP_CONNECTION", "HTTP_SEC_WEBSOCKET_PROTOCOL", "HTTP_SEC_WEBSOCKET_EXTENSIONS")


def _check_ascii(request: HttpRequest) -> None:
    """400 for a handshake header wsproto reads as tokens that is not ASCII.

    wsproto decodes them as ASCII and would raise ``UnicodeDecodeError`` (a 500).
    """
    for key in _TOKEN_HEADERS:
        value = request.META.get(key)
        if value is not None and not value.isascii():
            name = "-".join(part.capitalize() for part in key[5:].split("_")).replace("Websocket", "WebSocket")
            raise HandshakeError(400, f"Invalid WebSocket handshake: {name} is not ASCII.")


def _check_key(request: HttpRequest) -> None:
    """400 unless ``Sec-WebSocket-Key`` is base64 of 16 bytes (RFC 6455 section 4.2.1).

    wsproto only checks that the header is there; an empty or short key would
    get a ``101`` a conforming client rejects anyway.
    """
    key = request.META.get("HTTP_SEC_WEBSOCKET_KEY")
    if key is None:
        return  # wsproto refuses a missing key, naming the header
    try:
        valid = len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise HandshakeError(
            400,
            f"Invalid WebSocket handshake: Sec-WebSocket-Key must be 16 random bytes in base64 "
            f"(24 characters); it is {key[:40]!r}.",
        )


def _read_deflate_offer(offer: str) -> PerMessageDeflate | None:
    """A ``permessage-deflate`` *offer* as wsproto reads it; ``None`` if it cannot (a number is not one).

    RFC 7692 section 5: a server declines an offer with a parameter value it
    cannot accept; wsproto raises ``ValueError`` instead for one that is not
    an integer (``client_max_window_bits=abc``). Read on an extension of its
    own, so that a bad offer leaves nothing behind on the one in use.
    """
    probe = PerMessageDeflate()
    try:
        probe.accept(offer)
    except ValueError:
        return None
    return probe


def _deflate_offer_ok(offer: str) -> bool:
    """Whether wsproto can read a ``permessage-deflate`` *offer*."""
    return _read_deflate_offer(offer) is not None


def _bad_deflate_offers(request: HttpRequest) -> list[str]:
    header = request.META.get("HTTP_SEC_WEBSOCKET_EXTENSIONS", "")
    offers = [offer.strip() for offer in header.split(",")]  # as wsproto splits them
    return [
        offer for offer in offers
        if offer.split(";", 1)[0].strip() == PerMessageDeflate.name and not _deflate_offer_ok(offer)
    ]


def check_server_handshake(request: HttpRequest, http_version: str | None) -> None:
    """What dwebsocket checks of a handshake an ASGI server validated and answers itself.

    The origin; the HTTP version (*http_version*, as the ASGI scope says it);
    for HTTP/1.x, the ``Sec-WebSocket-Key`` (some servers only check that it is
    there); and the ``permessage-deflate`` offers, which the server negotiates
    itself: one it cannot read would fail inside the server's accept, so it is
    refused with 400 before the view runs.
    """
    check_origin(request)
    _check_version(http_version)
    if http_version is None or http_version.strip().startswith("1"):
        if request.META.get("HTTP_SEC_WEBSOCKET_KEY") is None:
            raise HandshakeError(400, "Invalid WebSocket handshake: missing header, 'Sec-WebSocket-Key'.")
        _check_key(request)
    bad = _bad_deflate_offers(request)
    if bad:
        raise HandshakeError(
            400, f"Invalid WebSocket handshake: malformed permessage-deflate offer {bad[0][:100]!r}."
        )


class _Deflate(PerMessageDeflate):
    """permessage-deflate as negotiated here; websockets' extension then deflates and inflates
    (``transports/wsgi/protocol.py``), bounding what a message inflates to by the size limit.

    An offer is declined (RFC 7692 section 5: the client may go on without
    compression, or with another offer) when its parameters cannot be read,
    or when it asks for ``server_max_window_bits=8``, which zlib cannot
    compress with (it would use 9, which such a client cannot inflate).
    """

    def accept(self, offer: str) -> bool | None | str:
        """Accept *offer*, or decline it (``None``)."""
        probe = _read_deflate_offer(offer)
        if probe is None or probe.server_max_window_bits < 9:
            return None
        return super().accept(offer)


def check_origin(request: HttpRequest) -> None:
    """Raise :class:`HandshakeError` (403) for a browser request from a foreign origin.

    Used for WebSocket handshakes on every server and for every long-polling
    request; see :func:`origin_allowed` for the rule. The refusal is logged
    once, naming the setting that would allow the origin.
    """
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None or origin_allowed(request):
        return
    logger.warning(
        "dwebsocket: refused a WebSocket request to %s from origin %r: not this site's own "
        "origin (%s), nor in CSRF_TRUSTED_ORIGINS or WEBSOCKET_ALLOWED_ORIGINS. If that page "
        "may connect, add its origin to WEBSOCKET_ALLOWED_ORIGINS; behind a proxy that "
        "terminates TLS, set SECURE_PROXY_SSL_HEADER (see docs/security.md).",
        request.path, origin[:200], _own_origin(request) or "its Host is not in ALLOWED_HOSTS",
    )
    raise HandshakeError(
        403,
        f"WebSocket connections from origin {origin[:200]!r} are not allowed. Add it to "
        "WEBSOCKET_ALLOWED_ORIGINS (or CSRF_TRUSTED_ORIGINS).",
    )


def _own_origin(request: HttpRequest) -> str | None:
    """``scheme://host`` of *request* itself, as Django's CSRF check builds it; None for a bad Host."""
    try:
        host = request.get_host()  # ALLOWED_HOSTS, USE_X_FORWARDED_HOST
    except DisallowedHost:
        return None
    return f"{'https' if request.is_secure() else 'http'}://{host}"  # SECURE_PROXY_SSL_HEADER


def _trusted(origin: str, trusted: Iterable[str]) -> bool:
    """Whether *origin* matches ``CSRF_TRUSTED_ORIGINS`` as Django's ``CsrfViewMiddleware`` matches it.

    Exact origins (``"https://app.example.com"``) must be equal; an origin with
    ``*`` (``"https://*.example.com"``) allows that scheme and the domain or any
    subdomain of it (``django.utils.http.is_same_domain``), any port only if written.
    """
    patterns = list(trusted)
    if origin in {pattern for pattern in patterns if "*" not in pattern}:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return any(
        is_same_domain(parts.netloc, wanted.netloc.lstrip("*"))
        for wanted in (urlsplit(pattern) for pattern in patterns if "*" in pattern)
        if wanted.scheme == parts.scheme
    )


def _allowed(origin: str, patterns: Iterable[str]) -> bool:
    """Whether *origin* matches ``WEBSOCKET_ALLOWED_ORIGINS``.

    Full origins match as in ``CSRF_TRUSTED_ORIGINS`` (``"https://*.example.com"``
    wildcards included); a pattern without a scheme is a host pattern as in
    ``ALLOWED_HOSTS`` (``"example.com"``, ``".example.com"``), for any scheme
    and port; ``"*"`` allows every origin.
    """
    patterns = list(patterns)
    if "*" in patterns:
        return True
    try:
        hostname = urlsplit(origin).hostname
    except ValueError:
        return False
    hosts = [pattern for pattern in patterns if "://" not in pattern]
    if hostname and hosts and validate_host(hostname, hosts):
        return True
    full = []
    for pattern in patterns:
        if "://" in pattern:
            try:
                parts = urlsplit(pattern)
            except ValueError:
                continue
            full.append(f"{parts.scheme}://{parts.netloc}")  # "https://a.example/" too
    return _trusted(origin, full)


def origin_allowed(request: HttpRequest) -> bool:
    """Whether the browser page that sent *request* may use this project's WebSockets.

    Django's CSRF origin rule (``CsrfViewMiddleware``), exactly: a request
    without ``Origin`` (not from a browser) is allowed; otherwise its
    ``Origin`` must be the request's own ``scheme://host`` (``request.is_secure()``
    honours ``SECURE_PROXY_SSL_HEADER``; ``request.get_host()``,
    ``ALLOWED_HOSTS``), or match ``CSRF_TRUSTED_ORIGINS`` or
    ``WEBSOCKET_ALLOWED_ORIGINS``. ``ALLOWED_HOSTS`` never widens it: it says
    which names this site answers to, not which sites may script it.
    """
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None:
        return True
    if origin == _own_origin(request):
        return True
    if _trusted(origin, getattr(settings, "CSRF_TRUSTED_ORIGINS", [])):
        return True
    return _allowed(origin, conf.get("WEBSOCKET_ALLOWED_ORIGINS") or [])
