"""``manage.py websocket_broadcast GROUP MESSAGE``: send a message to a group."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from dwebsocket.groups import broadcast, get_broker, group_size


class Command(BaseCommand):
    help = "Send MESSAGE to every WebSocket connection in GROUP, in every process."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group")
        parser.add_argument("message")
        parser.add_argument("--binary", action="store_true", help="send MESSAGE as a binary frame")

    def handle(self, *args: Any, group: str, message: str, binary: bool, **options: Any) -> None:
        get_broker()
        members = group_size(group)
        broadcast(group, message.encode() if binary else message)
        time.sleep(0.1)  # let an in-process broker deliver before the command exits
        self.stdout.write(f"Sent to group {group!r} ({members} member(s) present).")
