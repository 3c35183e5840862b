"""The test settings with WEBSOCKET_ACCEPT_ALL on."""

from .settings import *  # noqa: F403

# WEBSOCKET_ACCEPT_ALL: undecorated views accept WebSocket handshakes too.
WEBSOCKET_ACCEPT_ALL = True
