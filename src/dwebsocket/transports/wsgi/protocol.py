"""The WebSocket protocol past the handshake, under WSGI: websockets' sans-I/O :class:`Protocol`.

websockets parses and frames (unmasking with its C speedups), answers pings,
echoes the client's close frame, fails the connection on a protocol error,
refuses a message over ``WEBSOCKET_MAX_MESSAGE_SIZE`` from its frame headers
on, and inflates permessage-deflate with the same bound (a deflate bomb
stops at the limit). It does no I/O: ``transport.py`` feeds it what the
socket read and writes what it framed. A message is assembled from its
frames, and a text message's UTF-8 checked, in ``transport.py`` (websockets
leaves both to its I/O layers).

The opening handshake stays with :mod:`dwebsocket.handshake`; what it
negotiated for permessage-deflate configures websockets' extension here.
"""

from __future__ import annotations

import logging

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State
from wsproto.extensions import PerMessageDeflate as Negotiated

__all__ = ["ServerProtocol", "server_protocol"]

#: websockets logs "connection closed" (INFO) when a connection ends, and
#: "parser failed" (ERROR, with the traceback) for a bug in a parser.
_logger = logging.getLogger("dwebsocket.protocol")


class ServerProtocol(Protocol):
    """websockets' protocol, where a close frame may come between two frames of a message.

    RFC 6455 section 5.4 lets control frames come in the middle of a
    fragmented message; websockets fails the connection with 1002 when that
    control frame is a close (to report the message cut short). A server
    answers it as any close, and the unfinished message is dropped
    (Autobahn case 7.1.5).

    :attr:`is_open` mirrors ``state is State.OPEN`` as a plain attribute: a
    broadcast asks it of every member, and a property costs a call each time.
    """

    is_open: bool

    @property  # type: ignore[override]
    def state(self) -> State:
        return Protocol.state.fget(self)  # type: ignore[attr-defined]

    @state.setter
    def state(self, state: State) -> None:
        Protocol.state.fset(self, state)  # type: ignore[attr-defined]
        self.is_open = state is State.OPEN

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            self.current_size = None  # the message being received ends unfinished
        super().recv_frame(frame)


def server_protocol(deflate: Negotiated | None, max_message_size: int | None) -> ServerProtocol:
    """The server side of an open connection, with the permessage-deflate *deflate* negotiated
    (``None``: none), refusing a message over *max_message_size* bytes (``None``: any size)."""
    protocol = ServerProtocol(Side.SERVER, state=State.OPEN, max_size=max_message_size, logger=_logger)
    if deflate is not None:
        protocol.extensions = [PerMessageDeflate(
            remote_no_context_takeover=deflate.client_no_context_takeover,
            local_no_context_takeover=deflate.server_no_context_takeover,
            remote_max_window_bits=deflate.client_max_window_bits,
            local_max_window_bits=deflate.server_max_window_bits,
        )]
    return protocol
