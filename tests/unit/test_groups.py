"""Group membership in one process, and the Redis broker's wire format."""

from __future__ import annotations

from dwebsocket import group_size
from dwebsocket.connection import Connection
from dwebsocket.groups import join, wait_join


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
        assert decode(encode(message, exclude)) == (message, exclude, "", False, 0)
        assert decode(encode(message, exclude, "origin\n", True, 7)) == (message, exclude, "origin\n", True, 7)



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
