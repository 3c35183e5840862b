"""Read marks (acknowledged sends): they only move forward and expire after WEBSOCKET_HISTORY_TTL."""

from __future__ import annotations

from django.test import override_settings

from dwebsocket.groups.reads import MemoryReads


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@override_settings(WEBSOCKET_HISTORY_TTL=10)
def test_marks_move_forward_and_expire() -> None:
    clock = Clock()
    reads = MemoryReads(clock)
    assert reads.last("page") == 0
    reads.record("page", 3)
    reads.record("page", 2)  # a late, lower mark changes nothing
    assert reads.last("page") == 3
    clock.now = 9
    reads.record("other", 1)
    assert reads.last("page") == 3
    clock.now = 10.5
    assert reads.last("page") == 0 and reads.last("other") == 1
    reads.record("other", 2)  # moving refreshes the expiry
    clock.now = 19.5
    assert reads.last("other") == 2
    clock.now = 21
    assert reads.last("other") == 0
