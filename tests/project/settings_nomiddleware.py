"""The test settings without dwebsocket's middleware: decorators must work alone."""

from .settings import *  # noqa: F403
from .settings import MIDDLEWARE

MIDDLEWARE = [m for m in MIDDLEWARE if not m.startswith("dwebsocket.")]
SILENCED_SYSTEM_CHECKS = ["dwebsocket.W001"]
