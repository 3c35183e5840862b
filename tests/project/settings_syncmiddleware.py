"""The test settings plus a middleware that cannot run asynchronously."""

from .settings import *  # noqa: F403
from .settings import MIDDLEWARE

MIDDLEWARE = [*MIDDLEWARE, "tests.project.middleware.SyncOnlyMiddleware"]
