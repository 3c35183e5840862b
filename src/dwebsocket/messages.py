"""What a WebSocket message is, and the checks every layer applies to one.

A leaf module: it imports nothing else from dwebsocket, so every layer (the
connection, the transports, the groups, the test client) can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, Union

from websockets.frames import Frame as _WireFrame
from websockets.frames import Opcode

from . import metrics as _metrics

__all__ = ["Frame", "Message", "Place", "check_close_code", "check_message", "message_size", "unencodable"]

#: What a WebSocket message is: ``str`` for a text frame, ``bytes`` for a binary one.
Message = Union[str, bytes]


class Place(Protocol):
    """A broadcast's place in its group's history (``dwebsocket.groups.history.Position``)."""

    @property
    def epoch(self) -> str: ...

    @property
    def seq(self) -> int: ...

# Close codes a server may send (RFC 6455 section 7.4 and the IANA registry).
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def check_close_code(code: int, reason: str) -> None:
    """Raise ``ValueError`` unless *code* and *reason* may go in a close frame."""
    if not (code in _SENDABLE_CODES or 3000 <= code <= 4999):
        raise ValueError(
            f"{code} is not a close code a server may send; use 1000 (normal), "
            "1001 (going away), 1008 (policy), 1011 (error) or an application code 3000-4999."
        )
    try:
        encoded = reason.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(unencodable(reason, exc, "A close reason")) from None
    if len(encoded) > 123:
        raise ValueError("A close reason must fit in 123 bytes of UTF-8.")


def check_message(message: object) -> Message:
    """Return *message* as ``str`` or ``bytes``, or raise an error naming the fix.

    ``TypeError`` for anything else than text or bytes; ``ValueError`` for a
    ``str`` that UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``,
    which ``surrogateescape`` decoding or JSON's ``"\\ud800"`` escapes make):
    a text frame is UTF-8 on the wire, so such a message could only fail later,
    in the thread that writes it, far from the call that made it.
    """
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        if not message.isascii():  # isascii() is O(1); encoding is the only full check
            try:
                message.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(unencodable(message, exc)) from None
        return message
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    raise TypeError(
        f"send() takes str (a text frame) or bytes (a binary frame), not "
        f"{type(message).__name__}; for JSON, send json.dumps(data)."
    )


def unencodable(text: str, exc: UnicodeEncodeError, what: str = "A text message") -> str:
    """Why *text* cannot be sent as *what* (UTF-8 failed with *exc*), and what to do instead."""
    bad = text[exc.start : exc.end]
    return (
        f"{what} must be valid Unicode: this str has {bad!r} at position {exc.start}, "
        "a lone surrogate that UTF-8 cannot encode. Fix the text (decode bytes with "
        "errors='replace'), or send bytes for a binary frame."
    )


def message_size(message: str | bytes | bytearray) -> int:
    """The size of *message* (or of a piece of one) on the wire, in bytes (UTF-8 for text)."""
    if not isinstance(message, str):
        return len(message)
    return len(message) if message.isascii() else len(message.encode("utf-8"))


class Frame:
    """A message to send to many clients, framed once for all of them.

    A group broadcast builds one :class:`Frame` and hands it to every member's
    transport: a socket transport writes :attr:`data` as it is (unless the
    connection compresses, which needs a frame of its own), the others send
    :attr:`message`.
    """

    __slots__ = ("message", "size", "group", "position", "_data", "_after", "_variants", "born", "written_at")

    def __init__(self, message: Message, group: str | None = None, position: Place | None = None) -> None:
        self.message = message
        self.size = message_size(message)
        #: The group it is broadcast to, if any.
        self.group = group
        #: Its place in the group's history (a ``dwebsocket.groups.history.Position``), if it has one.
        self.position = position
        self._data: bytes | None = None
        # Owned by the broadcasting thread: what to do once every member has it.
        self._after: list[Callable[[], object]] = []
        # Frames derived from this one for members that need another form (see
        # variant()); key -> frame. A race builds one twice, harmlessly.
        self._variants: dict[object, Frame] | None = None
        # For dwebsocket_broadcast_lag_seconds (dwebsocket.metrics): when it was
        # made (0.0 with metrics off) and last written to a member (0.0: never).
        self.born = _metrics.frame_made()
        self.written_at = 0.0

    def __del__(self) -> None:
        if self.written_at:  # metrics on, and some member got it: its lag, once
            try:
                _metrics.frame_freed(self.born, self.written_at)
            except Exception:  # at interpreter exit the module may be gone
                pass

    def variant(self, key: object, build: Callable[[Message], Message]) -> Frame:
        """The frame of ``build(message)``, built once per broadcast for every member that asks with *key*.

        Its :meth:`offered` runs with this frame's, so a transport may wait
        for either.
        """
        variants = self._variants
        if variants is None:
            variants = self._variants = {}
        frame = variants.get(key)
        if frame is None:
            frame = variants[key] = Frame(build(self.message), self.group, self.position)
        return frame

    def after_offered(self, callback: Callable[[], object]) -> None:
        """Call *callback* once the frame has been offered to every member.

        A transport that hands messages to another thread can wake it once
        per broadcast instead of once per member.
        """
        self._after.append(callback)

    def offered(self) -> None:
        """Every member has been offered the frame (called by the broadcaster)."""
        callbacks, self._after = self._after, []
        for callback in callbacks:
            callback()
        if self._variants:
            for frame in list(self._variants.values()):
                frame.offered()

    @property
    def data(self) -> bytes:
        """The unmasked, uncompressed server frame, built on first use."""
        if self._data is None:  # a race builds it twice, harmlessly
            message = self.message
            if isinstance(message, str):
                wire = _WireFrame(Opcode.TEXT, message.encode())
            else:
                wire = _WireFrame(Opcode.BINARY, message)
            self._data = wire.serialize(mask=False)
        return self._data
