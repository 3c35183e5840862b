"""The ``dwebsocket.v1`` session protocol: what a ``dwebsocket.js`` connection carries besides messages.

A client that offers the subprotocol (``dwebsocket.js`` does) gets every
message with a *header*: a broadcast says which group it belongs to and its
position in that group's history, so that the client can tell the server, when
it reconnects, what it already has (the *resume*), and the server can send
what it missed (docs/delivery.md, which also writes the protocol down). Views
never see any of it: the session strips headers from what the client sends and
adds them to what the view sends.

A :class:`Session` is the per-connection state of the protocol. It sits
between a connection and its transport: the connection's :class:`~dwebsocket.
connection.Link` hands it every broadcast (:meth:`Session.offer`) and every
received message (:meth:`Session.inbound`); the groups layer drives the
recovery of a group the view joins (:meth:`Session.hold`, :meth:`Session.recovered`).

Concurrency: ``_lock`` owns ``_last`` and ``_held``. It is held while a frame
is handed to the transport (``Transport.offer`` never waits), so that the
frames of a group reach the transport in the order their positions say, and a
replay and the live broadcasts never interleave. Lock order: a session's lock
may be taken with nothing held, never while holding the registry's lock.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import metrics as _metrics
from .messages import Frame, Message, Place

__all__ = ["PROTOCOL", "RESUME_PARAMETER", "Resume", "Session", "answer", "split_offer", "take_resume"]

logger = logging.getLogger("dwebsocket")

#: The subprotocol ``dwebsocket.js`` offers (alone, or as ``dwebsocket.v1+<page's own>``).
PROTOCOL = "dwebsocket.v1"
#: The query parameter that carries the client's resume.
RESUME_PARAMETER = "dwebsocket.v1"

_PREFIX = PROTOCOL + "+"
_MAX_IDS = 16  # earlier connection ids a resume may name (dwebsocket.js sends 5)
_MAX_RESUME = 64 * 1024  # bytes of resume parameter read at most
# A client id is the page's secret (whoever knows it could move its read
# marks): at least 64 random bits, as dwebsocket.js makes them.
_MIN_CLIENT, _MAX_CLIENT = 16, 64
_MAX_POSITIONS = 200  # groups a resume may name (a page is in WEBSOCKET_MAX_GROUPS, 100 by default)
_MAX_GROUP = 200  # characters of a group name, as join() allows


class _Transport(Protocol):
    def offer(self, frame: Frame) -> bool: ...


def split_offer(offered: Iterable[str]) -> tuple[bool, list[str]]:
    """Whether the client speaks ``dwebsocket.v1``, and the page's own subprotocols, in order."""
    speaks = False
    own: list[str] = []
    for token in offered:
        if token == PROTOCOL:
            speaks = True
        elif token.startswith(_PREFIX):
            speaks = True
            if token[len(_PREFIX):] not in own:
                own.append(token[len(_PREFIX):])
        elif token not in own:
            own.append(token)
    return speaks, own


def answer(chosen: str | None) -> str:
    """The subprotocol to answer a ``dwebsocket.v1`` client with, the view having chosen *chosen*."""
    return PROTOCOL if chosen is None else _PREFIX + chosen


@dataclass
class Resume:
    """What a reconnecting client says it has: positions by group, and its earlier connection ids."""

    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    client: str | None = None  # the page's id, the same on every connection it makes


def parse_position(text: object) -> tuple[str, int] | None:
    """``"epoch:seq"`` as a pair; ``None`` if it is not one."""
    if not isinstance(text, str):
        return None
    epoch, colon, seq = text.rpartition(":")
    if not colon or not epoch or not seq.isdigit() or len(seq) > 19:
        return None
    return epoch, int(seq)


def parse_resume(text: str) -> Resume:
    """The resume in *text* (the parameter's JSON); what is malformed in it is ignored.

    A client that sends garbage loses recovery, nothing else: the connection
    goes on as a fresh one.
    """
    resume = Resume()
    try:
        data = json.loads(text[:_MAX_RESUME])
    except ValueError:
        return resume
    if not isinstance(data, dict):
        return resume
    positions = data.get("p")
    if isinstance(positions, dict):
        for group, position in positions.items():
            parsed = parse_position(position)
            if isinstance(group, str) and 0 < len(group) <= _MAX_GROUP and parsed is not None:
                resume.positions[group] = parsed
                if len(resume.positions) == _MAX_POSITIONS:
                    break
    ids = data.get("x")
    if isinstance(ids, list):
        resume.ids = [i for i in ids if isinstance(i, str)][:_MAX_IDS]
    client = data.get("c")
    if isinstance(client, str) and _MIN_CLIENT <= len(client) <= _MAX_CLIENT:
        resume.client = client
    return resume


def take_resume(query_string: str) -> tuple[Resume | None, str]:
    """The resume in *query_string*, and the query string without it (what the view sees)."""
    if RESUME_PARAMETER + "=" not in query_string:
        return None, query_string
    kept: list[str] = []
    resume: Resume | None = None
    for part in query_string.split("&"):
        name, _, value = part.partition("=")
        if urllib.parse.unquote_plus(name) == RESUME_PARAMETER:
            if resume is None:
                resume = parse_resume(urllib.parse.unquote_plus(value))
        else:
            kept.append(part)
    return resume, "&".join(kept)


def _header(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _with_header(header: str, message: Message) -> Message:
    if isinstance(message, str):
        return header + "\n" + message
    return header.encode("utf-8") + b"\n" + message


def plain(message: Message) -> Message:
    """*message* as the view sent it, with the empty header."""
    return "\n" + message if isinstance(message, str) else b"\n" + message


def control(kind: str, **fields: Any) -> Frame:
    """A control message (``welcome``, ``joined``, ``left``) as a frame for one connection."""
    return Frame(_header({"t": kind, **fields}) + "\n")


class Session:
    """The ``dwebsocket.v1`` state of one connection (see the module docstring)."""

    def __init__(self, connection_id: str, resume: Resume | None) -> None:
        resume = resume or Resume()
        #: The connection's id.
        self.id = connection_id
        #: The connections whose excluded broadcasts this client must not get back.
        self.ids = frozenset([connection_id, *resume.ids])
        self._lock = threading.Lock()
        # Group -> the position of the last broadcast the client has (from its
        # resume, then from each broadcast sent). Guarded by _lock.
        self._last: dict[str, tuple[str, int]] = dict(resume.positions)
        # Groups being recovered -> their live broadcasts, held back until the
        # replay is sent. Guarded by _lock.
        self._held: dict[str, list[Frame]] = {}
        self._warned = False
        #: The page's id, if it numbers its messages (acknowledged sends).
        self.client = resume.client
        # Guarded by the connection's lock (Connection._cond), not _lock: the
        # number of the last numbered message queued for the view (a message
        # numbered this or lower is a copy the client sent again), and the
        # number of each queued message (None for an unnumbered one), in queue order.
        self.accepted = 0
        self.numbers: deque[int | None] = deque()
        # A newer connection of the same page took over (see WebSocket._take_over):
        # this one takes no more numbered messages. Guarded by Connection._cond too.
        self.superseded = False

    # -- from the client ------------------------------------------------------

    def inbound(self, message: Message, transport: _Transport | None) -> tuple[Message, int | None] | None:
        """A received message for the view: its payload and its number (acknowledged sends), if it has one.

        ``None`` for a message that is not for the view. A ``ping`` is
        answered with a ``pong`` on *transport* at once: the client's
        heartbeat, by which it notices a connection that went silent.
        """
        newline = message.find("\n" if isinstance(message, str) else b"\n")  # type: ignore[arg-type]
        if newline == 0:
            return message[1:], None
        if newline < 0:
            if not self._warned:
                self._warned = True
                logger.warning("dwebsocket: a dwebsocket.v1 client sent a message without a header; passed on whole")
            return message, None
        header = message[:newline]
        if header in _PINGS:
            if transport is not None:
                _offer_one(transport, control("pong"))
            return None
        try:
            fields = json.loads(header)
        except ValueError:  # UnicodeDecodeError included
            return None
        number = fields.get("n") if isinstance(fields, dict) else None
        if isinstance(number, int) and not isinstance(number, bool) and number > 0 and self.client is not None:
            return message[newline + 1:], number
        return None  # nothing else the client sends with a header is for the view

    def acknowledge(self, number: int, transport: _Transport | None) -> None:
        """The view has read the client's message *number*: tell the client, which stops keeping it."""
        if transport is not None:
            _offer_one(transport, control("ack", n=number))

    # -- broadcasts -----------------------------------------------------------

    def offer(self, frame: Frame, transport: _Transport) -> bool:
        """Hand a broadcast to *transport*, with its header, unless the client has it already."""
        group = frame.group
        if group is None:
            return transport.offer(frame.variant(_PLAIN, plain))
        with self._lock:
            held = self._held.get(group)
            if held is not None:
                held.append(frame)
                return True
            if not self._advance(group, frame.position):
                return True  # sent already (a replay, or a broadcast both replayed and live)
            return transport.offer(_enveloped(frame))

    def _advance(self, group: str, position: Place | None) -> bool:
        """Whether a broadcast at *position* is new to the client; records it. Hold ``_lock``."""
        if position is None:
            return True  # no history: nothing to compare with
        last = self._last.get(group)
        if last is not None and last[0] == position.epoch and position.seq <= last[1]:
            return False
        self._last[group] = (position.epoch, position.seq)
        return True

    # -- recovery of a group the view joins ----------------------------------

    def hold(self, group: str) -> tuple[str, int] | None:
        """Hold back *group*'s live broadcasts until :meth:`recovered`; the client's position in it, if any."""
        with self._lock:
            self._held.setdefault(group, [])
            return self._last.get(group)

    def recovered(
        self,
        group: str,
        transport: _Transport,
        asked: tuple[str, int] | None,
        entries: list[tuple[Place, Message, str | None]],
        current: Place | None,
        complete: bool | None,
    ) -> None:
        """Send the replay of *group*, then ``joined``, then the broadcasts held back meanwhile.

        *entries* are the history after *asked* (position, message, exclude);
        *current* the group's position when it was read (``None``: no history);
        *complete* whether *entries* hold everything after *asked*.
        """
        _metrics.recovery(asked, complete)
        with self._lock:
            held = self._held.pop(group, [])
            for position, message, exclude in entries:
                if self._advance(group, position) and exclude not in self.ids:
                    _offer_one(transport, _envelope(Frame(message, group, position)))
            if current is not None:
                last = self._last.get(group)
                if last is None or last[0] != current.epoch or last[1] < current.seq:
                    self._last[group] = (current.epoch, current.seq)
            at = self._last.get(group) if current is not None else None
            fields: dict[str, Any] = {"g": group, "r": None if asked is None else bool(complete)}
            if at is not None:
                fields["p"] = f"{at[0]}:{at[1]}"
            _offer_one(transport, control("joined", **fields))
            for frame in held:
                if self._advance(group, frame.position):
                    _offer_one(transport, _envelope(frame))

    def unhold(self, group: str) -> None:
        """The join of *group* failed: stop holding its broadcasts (there are none for this connection)."""
        with self._lock:
            self._held.pop(group, None)

    def welcome(self, transport: _Transport, read: int | None = None) -> None:
        """Send the first message of the connection: its id, which ``exclude=`` names it by.

        With *read* (the client numbers its messages), also the number of the
        last of them the views have read: the client sends the later ones again.
        """
        if read is None:
            _offer_one(transport, control("welcome", id=self.id))
        else:
            _offer_one(transport, control("welcome", id=self.id, n=read))

    def left(self, group: str, transport: _Transport | None) -> None:
        """The view left *group*: the client forgets its position."""
        with self._lock:
            self._last.pop(group, None)
            self._held.pop(group, None)
            if transport is not None:
                _offer_one(transport, control("left", g=group))


_PLAIN = "dwebsocket.v1 plain"
_PINGS = ('{"t":"ping"}', b'{"t":"ping"}')
_BROADCAST = "dwebsocket.v1 broadcast"


def _broadcast_header(frame: Frame) -> str:
    header: dict[str, Any] = {"g": frame.group}
    if frame.position is not None:
        header["p"] = f"{frame.position.epoch}:{frame.position.seq}"
    return _header(header)


def _enveloped(frame: Frame) -> Frame:
    """*frame* with its broadcast header, built once per broadcast for every session member."""
    return frame.variant(_BROADCAST, lambda message: _with_header(_broadcast_header(frame), message))


def _envelope(frame: Frame) -> Frame:
    """*frame* with its broadcast header, as a frame of its own (for one connection)."""
    return Frame(_with_header(_broadcast_header(frame), frame.message), frame.group, frame.position)


def _offer_one(transport: _Transport, frame: Frame) -> None:
    """Offer a frame made for one connection, and tell it that is all (a transport may wait for that)."""
    try:
        transport.offer(frame)
    finally:
        frame.offered()
