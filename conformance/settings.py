"""Settings for the conformance echo server: the Autobahn cases send up to 16 MiB."""

from tests.project.settings import *  # noqa: F403

WEBSOCKET_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
WEBSOCKET_MAX_QUEUE = 1024
WEBSOCKET_CLOSE_TIMEOUT = 2.0
LOGGING = {"version": 1, "disable_existing_loggers": False}
