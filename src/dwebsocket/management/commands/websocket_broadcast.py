"""``manage.py websocket_broadcast GROUP MESSAGE``: send a message to a group.

The command runs in a process of its own, so it needs a broker that reaches
the servers' processes: a Redis ``WEBSOCKET_BROKER``. With the memory broker
(the default) it refuses, rather than say "Sent" for a message nobody can
get; it fails too when Redis does not take the broadcast.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dwebsocket import conf
from dwebsocket.groups import get_broker, group_size
from dwebsocket.messages import check_message


class Command(BaseCommand):
    help = "Send MESSAGE to every WebSocket connection in GROUP, in every process (needs a Redis WEBSOCKET_BROKER)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group")
        parser.add_argument("message")
        parser.add_argument("--binary", action="store_true", help="send MESSAGE as a binary frame")

    def handle(self, *args: Any, group: str, message: str, binary: bool, **options: Any) -> None:
        url = conf.get("WEBSOCKET_BROKER")
        if not conf.is_redis_url(url):
            raise CommandError(
                f"WEBSOCKET_BROKER is {url!r}: groups live in each server process's memory, and a "
                "broadcast from this command would reach none of them. Set WEBSOCKET_BROKER to the "
                'Redis URL the servers use, for example "redis://127.0.0.1:6379/0".'
            )
        members = group_size(group)
        if not get_broker().publish(group, check_message(message.encode() if binary else message), None):
            raise CommandError(
                f"Redis at WEBSOCKET_BROKER = {url!r} did not take the broadcast (see the log above); "
                "nothing was sent. Start Redis or fix the setting."
            )
        self.stdout.write(f"Sent to group {group!r} ({members} member(s) present).")
