"""``{% load dwebsocket %}``: template tags for pages that open WebSockets.

``{% websocket_position "lobby" %}`` renders group ``lobby``'s current history
position, for a page to pin in ``dwebsocket.js``'s ``positions`` option: the
broadcasts made between the render and the socket's open then reach it too
(docs/delivery.md).
"""

from __future__ import annotations

from django import template

from ..groups import position

__all__ = ["register", "websocket_position"]

register = template.Library()


@register.simple_tag
def websocket_position(group: str) -> str:
    """*group*'s current position, ``"<epoch>:<seq>"``; ``""`` when history is off or unavailable."""
    return position(group) or ""
