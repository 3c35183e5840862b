"""The long-polling wire format: the Python twin of ``static/dwebsocket/dwebsocket.js``.

Everything JSON that crosses the network (a request body, an answer) or sits
in a session's queue in Redis is built and read here, and nowhere else, so the
server and the browser client cannot drift apart one module at a time. What
``dwebsocket.js`` sends and expects::

    POST ?dwebsocket=open      {"protocols": [P, ...]}     -> {"sid": S, "subprotocol": P or null, "timeout": T}
    GET  ?dwebsocket=poll&sid=S                            -> {"messages": [M, ...], "close": null or C}
    POST ?dwebsocket=send&sid=S  {"messages": [M, ...]}    -> 204, or 429: the view is behind,
                                                              none was taken; send them again later
    POST ?dwebsocket=close&sid=S {"code": N, "reason": R}  -> 204
    an error                                               -> {"error": "..."} with a 4xx or 5xx status
                                                              (503 to an open: the process is full)

    M (a message) = {"text": "..."} | {"binary": "<base64>"}
    C (a close)   = {"code": N, "reason": "..."}

A queued item (in Redis) is an ``M``, or ``{"close": C}`` for the last one.

A leaf of the polling package: it imports only :mod:`dwebsocket.messages`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import TypedDict, Union

from ...messages import Message, check_message, unencodable

__all__ = [
    "ACTIONS",
    "Batch",
    "BinaryItem",
    "Close",
    "CloseInfo",
    "MessageItem",
    "OpenAnswer",
    "TextItem",
    "WireError",
    "batch",
    "decode",
    "dump_item",
    "encode",
    "error",
    "load_item",
    "open_answer",
    "parse_close",
    "parse_open",
    "parse_send",
]

#: The values of the ``dwebsocket`` query parameter, as ``dwebsocket.js`` sends them.
ACTIONS = ("open", "poll", "send", "close")


class WireError(ValueError):
    """A request body or a queued item that is not in the wire format; the message says why."""


class TextItem(TypedDict):
    """A text message on the wire."""

    text: str


class BinaryItem(TypedDict):
    """A binary message on the wire, base64-encoded."""

    binary: str


#: One message on the wire (``M`` above).
MessageItem = Union[TextItem, BinaryItem]


class CloseInfo(TypedDict):
    """A close on the wire (``C`` above)."""

    code: int
    reason: str


class Batch(TypedDict):
    """The answer to a poll: every waiting message, then the close if the session ended."""

    messages: list[MessageItem]
    close: CloseInfo | None


class OpenAnswer(TypedDict):
    """The answer to an ``open`` the view accepted."""

    sid: str
    subprotocol: str | None
    timeout: float  # WEBSOCKET_POLL_TIMEOUT: how long a poll may be held


@dataclass(frozen=True)
class Close:
    """The end of a session, with the code and reason the other side sees."""

    code: int
    reason: str

    def info(self) -> CloseInfo:
        """As it goes on the wire."""
        return {"code": self.code, "reason": self.reason}


# -- messages ------------------------------------------------------------------


def encode(message: Message) -> MessageItem:
    """*message* as it goes on the wire: text as it is, bytes in base64."""
    if isinstance(message, str):
        return {"text": message}
    return {"binary": base64.b64encode(message).decode("ascii")}


def decode(item: object) -> Message:
    """The message a wire item carries; :class:`WireError` if it is not one."""
    if isinstance(item, dict):
        text = item.get("text")
        if isinstance(text, str):
            # JSON's "\\ud800" escapes decode to lone surrogates, which are not
            # Unicode text: a WebSocket client's invalid UTF-8 closes with 1007.
            try:
                return check_message(text)
            except ValueError as exc:
                raise WireError(str(exc)) from None
        data = item.get("binary")
        if isinstance(data, str):
            try:
                return base64.b64decode(data, validate=True)
            except binascii.Error as exc:
                raise WireError(f"bad base64 in a binary message: {exc}") from None
    raise WireError('a message is {"text": str} or {"binary": base64}')


# -- request bodies --------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, object]:
    """The JSON object a request *body* holds (an empty body is ``{}``)."""
    try:
        data: object = json.loads(body or b"{}")
    except ValueError as exc:  # also bad UTF-8
        raise WireError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("the body is not a JSON object")
    return data


def parse_open(body: bytes) -> list[str]:
    """The subprotocols an ``open`` body offers, in order; none if it offers nothing readable."""
    try:
        protocols = _json_object(body).get("protocols", [])
    except WireError:
        return []
    if isinstance(protocols, str):  # new WebSocket(url, "chat") offers one, as a string
        return [protocols]
    return [str(p) for p in protocols] if isinstance(protocols, list) else []


def parse_send(body: bytes) -> list[Message]:
    """The messages of a ``send`` body, in order; :class:`WireError` (a 400) if malformed."""
    try:
        items = _json_object(body).get("messages")
        if not isinstance(items, list):
            raise WireError('a send body is {"messages": [...]}')
        return [decode(item) for item in items]
    except WireError as exc:
        raise WireError(f"malformed send request: {exc}") from None


def parse_close(body: bytes) -> Close:
    """The code and reason of a ``close`` body (1000 and "" if left out); :class:`WireError` if malformed."""
    try:
        data = _json_object(body)
        code, reason = data.get("code", 1000), data.get("reason", "")
        reason = str(reason)
        try:
            reason.encode("utf-8")  # Unicode text, as in a close frame
        except UnicodeEncodeError as exc:
            raise WireError(unencodable(reason, exc, "The reason")) from None
        if isinstance(code, (int, float, str)):
            try:
                return Close(int(code), reason)
            except (ValueError, OverflowError):
                pass
        raise WireError(f"the code is not an integer: {code!r:.50}")
    except WireError as exc:
        raise WireError(f"malformed close request: {exc}") from None


# -- answers ---------------------------------------------------------------------


def open_answer(sid: str, subprotocol: str | None, timeout: float) -> OpenAnswer:
    """The answer to an ``open``: the session id, the subprotocol, the poll timeout."""
    return {"sid": sid, "subprotocol": subprotocol, "timeout": timeout}


def batch(items: list[MessageItem], close: Close | None) -> Batch:
    """The answer to a poll."""
    return {"messages": items, "close": None if close is None else close.info()}


def error(message: str) -> dict[str, str]:
    """The body of an error answer."""
    return {"error": message}


# -- queued items (a session's queues in Redis) ----------------------------------


def dump_item(item: MessageItem | Close) -> str:
    """A message item, or the closing item, as a queue holds it."""
    if isinstance(item, Close):
        return json.dumps({"close": item.info()})
    return json.dumps(item)


def load_item(raw: bytes | str) -> MessageItem | Close:
    """A queued item, as :func:`dump_item` wrote it; :class:`WireError` if it is none."""
    try:
        data: object = json.loads(raw)
    except ValueError as exc:
        raise WireError(f"a queued item is not JSON: {exc}") from None
    if isinstance(data, dict):
        close = data.get("close")
        if isinstance(close, dict):
            code, reason = close.get("code"), close.get("reason", "")
            if isinstance(code, int) and isinstance(reason, str):
                return Close(code, reason)
        text, binary = data.get("text"), data.get("binary")
        if isinstance(text, str):
            return {"text": text}
        if isinstance(binary, str):
            return {"binary": binary}
    raise WireError(f"not a queued item: {raw!r:.100}")
