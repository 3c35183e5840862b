"""dwebsocket: WebSockets for plain Django views.

Decorate a view with :func:`require_websocket` or :func:`accept_websocket`
and talk to the client through ``request.websocket`` (a :class:`WebSocket`).
"""

from .decorators import accept_websocket, require_websocket
from .websocket import WebSocket

__all__ = ["WebSocket", "accept_websocket", "require_websocket"]
__version__ = "1.0.0.dev0"
