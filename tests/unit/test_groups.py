"""Group membership in one process, and the Redis broker's wire format."""

from __future__ import annotations

from dwebsocket import group_size
from dwebsocket.connection import Connection
from dwebsocket.groups import join, wait_join
from dwebsocket.groups.history import Position


def test_a_closed_connection_joins_no_group():
    connection = Connection()
    link = connection._link
    link.opened(object())  # type: ignore[arg-type]
    wait_join(join(link, "units-closed"))
    assert group_size("units-closed") == 1
    link.closed_with(1006)
    assert group_size("units-closed") == 0
    wait_join(join(link, "units-closed"))  # e.g. a view that joins after its client vanished
    wait_join(join(link, "units-other"))
    assert group_size("units-closed") == 0 and group_size("units-other") == 0


def test_redis_wire_format_round_trips():
    from dwebsocket.groups.brokers.redis import decode, encode

    for message, exclude in (("héllo", None), (b"\x00\n\xff", "abc123"), ("", "x"), ("a", "x\n1:y")):
        assert decode(encode(message, exclude)) == (message, exclude, "", False, 0, None)
        assert decode(encode(message, exclude, "origin\n", True, 7)) == (message, exclude, "origin\n", True, 7, None)
        position = Position("3f2a9c", 42)
        assert decode(encode(message, exclude, "o", False, 7, position)) == (message, exclude, "o", False, 7, position)
    assert encode("x", None, position=Position("ab", 3)).startswith(b"T-0:1:00:2:ab1:3x")
    assert encode(b"x", None, position=Position("ab", 3)).startswith(b"B-")


def test_a_broadcast_with_a_malformed_position_is_refused():
    import pytest

    from dwebsocket.groups.brokers.redis import decode

    for data in (b"T-0:1:00:2:AB1:3x", b"T-0:1:00:2:ab1:-x", b"T-0:1:00:0:1:3x", b"B-0:1:00:2:ab", b"T-0:1:00:"):
        with pytest.raises(ValueError):
            decode(data)



def test_a_message_that_is_no_message_never_reaches_the_members(caplog):
    # broadcast() refuses it at the call; one that comes another way (a
    # broker's listener thread) is skipped with a warning, never raised there.
    from dwebsocket.groups import registry

    connection = Connection()
    offered = []
    connection._link.opened(type("T", (), {"offer": lambda self, frame: offered.append(frame) or True})())
    wait_join(join(connection._link, "units-bad-text"))
    with caplog.at_level("WARNING", logger="dwebsocket"):
        assert registry.deliver("units-bad-text", "\ud800", None) == 0
    assert "skipped a broadcast to group 'units-bad-text'" in caplog.text and "lone surrogate" in caplog.text
    assert registry.deliver("units-bad-text", "fine", None) == 1
    assert [frame.message for frame in offered] == ["fine"]
    connection._link.closed_with(1006)
