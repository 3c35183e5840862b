"""dwebsocket: WebSockets for plain Django views.

Decorate a view with :func:`require_websocket` or :func:`accept_websocket`
and talk to the client through ``request.websocket`` (a :class:`WebSocket`,
or an :class:`AsyncWebSocket` in an ``async def`` view). :func:`broadcast`
sends to a group of connections in every process.
"""

from .decorators import accept_websocket, require_websocket
from .groups import Member, TooManyGroups, broadcast, group_members, group_size
from .websocket import AsyncWebSocket, WebSocket

__all__ = [
    "AsyncWebSocket",
    "Member",
    "TooManyGroups",
    "WebSocket",
    "accept_websocket",
    "broadcast",
    "group_members",
    "group_size",
    "require_websocket",
]
__version__ = "1.0.0.dev0"
