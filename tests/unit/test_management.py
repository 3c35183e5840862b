"""manage.py websocket_broadcast: it says "Sent" only when the servers can get it."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from ..servers import free_port


@override_settings(WEBSOCKET_BROKER="memory")
def test_the_command_refuses_the_memory_broker():
    # The memory broker lives in this command's own process: no server can get it.
    out = io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command("websocket_broadcast", "news", "hello", stdout=out)
    assert "WEBSOCKET_BROKER" in str(refused.value) and "redis://" in str(refused.value)
    assert "Sent" not in out.getvalue()


def test_the_command_fails_when_redis_does_not_take_the_broadcast():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    out = io.StringIO()
    with override_settings(WEBSOCKET_BROKER=url), pytest.raises(CommandError) as failed:
        call_command("websocket_broadcast", "news", "hello", stdout=out)
    assert url in str(failed.value)
    assert "Sent" not in out.getvalue()
