"""System checks: each mistake in the settings gets a message that names the fix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from . import conf, metrics
from .transports.policy import parse_rate

__all__ = ["check_broker_reachable", "check_settings"]

_MIDDLEWARE = "dwebsocket.middleware.WebSocketMiddleware"


def _number_or_none(name: str, *, allow_none: bool = True, integer: bool = False) -> list[Error]:
    value = conf.get(name)
    if value is None and allow_none:
        return []
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = "a positive integer" if integer else "a positive number of seconds"
        if allow_none:
            what += " or None"
        return [
            Error(
                f"{name} must be {what}; it is {value!r}.",
                hint=f"Set {name} = {conf.DEFAULTS[name]!r} (the default) or remove it.",
                id="dwebsocket.E001",
            )
        ]
    return []


def _count_or_zero(name: str, zero: str) -> list[Error]:
    """A count that may be 0 (*zero* says what 0 turns off), unlike the other limits:
    ``WEBSOCKET_HISTORY_SIZE``, ``WEBSOCKET_OUTAGE_BUFFER``."""
    value = conf.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return [
            Error(
                f"{name} must be a positive integer or 0 ({zero} off); it is {value!r}.",
                hint=f"Set {name} = {conf.DEFAULTS[name]!r} (the default), or 0 to turn {zero} off.",
                id="dwebsocket.E001",
            )
        ]
    return []


def _metrics_setting() -> list[Error | Warning]:
    """``WEBSOCKET_METRICS``: None, True or False; True needs prometheus_client; a multiprocess directory must exist."""
    value = conf.get("WEBSOCKET_METRICS")
    if not (value is None or value is True or value is False):  # not 1 or 0: they are no setting
        return [
            Error(
                f"WEBSOCKET_METRICS must be None, True or False; it is {value!r}.",
                hint="None (the default) records metrics when prometheus_client is installed; False turns them off.",
                id="dwebsocket.E007",
            )
        ]
    if value is True and not metrics.available():
        return [
            Error(
                "WEBSOCKET_METRICS is True, but prometheus_client is not installed.",
                hint='pip install "dwebsocket[metrics]", or set WEBSOCKET_METRICS = None or False.',
                id="dwebsocket.E008",
            )
        ]
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if value is not False and directory and not os.path.isdir(directory):
        return [
            Warning(
                f"PROMETHEUS_MULTIPROC_DIR is {directory!r}, which is not a directory: prometheus_client "
                "fails on the first metric it records.",
                hint="Create it (empty) before the server starts, e.g. mkdir -p in the start script. See docs/metrics.md.",
                id="dwebsocket.W003",
            )
        ]
    return []


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    """Check every dwebsocket setting and the middleware's place."""
    errors: list[Error | Warning] = []
    errors += _number_or_none("WEBSOCKET_MAX_MESSAGE_SIZE", integer=True)
    errors += _number_or_none("WEBSOCKET_MAX_QUEUE", allow_none=False, integer=True)
    errors += _number_or_none("WEBSOCKET_MAX_QUEUE_BYTES", integer=True)
    errors += _number_or_none("WEBSOCKET_MAX_CONNECTIONS", integer=True)
    errors += _number_or_none("WEBSOCKET_MAX_GROUPS", integer=True)
    errors += _number_or_none("WEBSOCKET_PING_INTERVAL")
    errors += _number_or_none("WEBSOCKET_PING_TIMEOUT")
    errors += _number_or_none("WEBSOCKET_CLOSE_TIMEOUT", allow_none=False)
    errors += _number_or_none("WEBSOCKET_BROADCAST_QUEUE", allow_none=False, integer=True)
    errors += _number_or_none("WEBSOCKET_POLL_TIMEOUT", allow_none=False)
    errors += _number_or_none("WEBSOCKET_POLL_EXPIRY", allow_none=False)
    errors += _count_or_zero("WEBSOCKET_HISTORY_SIZE", "history and recovery")
    errors += _count_or_zero("WEBSOCKET_OUTAGE_BUFFER", "the outage outbox")
    errors += _number_or_none("WEBSOCKET_HISTORY_TTL", allow_none=False)
    try:
        parse_rate(conf.get("WEBSOCKET_RATE_LIMIT"))
    except ValueError as exc:
        errors.append(
            Error(
                str(exc),
                hint='For example WEBSOCKET_RATE_LIMIT = "50/s", or None (the default) for no limit.',
                id="dwebsocket.E006",
            )
        )
    overflow = conf.get("WEBSOCKET_BROADCAST_OVERFLOW")
    if overflow not in ("close", "drop"):
        errors.append(
            Error(
                f'WEBSOCKET_BROADCAST_OVERFLOW must be "close" or "drop"; it is {overflow!r}.',
                id="dwebsocket.E003",
            )
        )
    broker = conf.get("WEBSOCKET_BROKER")
    if not (broker == "memory" or conf.is_redis_url(broker)):
        errors.append(
            Error(
                f"WEBSOCKET_BROKER must be \"memory\" or a Redis URL; it is {broker!r}.",
                hint='For example WEBSOCKET_BROKER = "redis://127.0.0.1:6379/0".',
                id="dwebsocket.E004",
            )
        )
    elif broker != "memory":
        errors.extend(_check_redis_url(broker))

    errors += _metrics_setting()

    origins = conf.get("WEBSOCKET_ALLOWED_ORIGINS")
    if origins is not None and (
        isinstance(origins, str)
        or not isinstance(origins, Sequence)
        or not all(isinstance(o, str) for o in origins)
    ):
        errors.append(
            Error(
                f"WEBSOCKET_ALLOWED_ORIGINS must be a list of strings; it is {origins!r}.",
                hint='For example WEBSOCKET_ALLOWED_ORIGINS = ["https://app.example.com"].',
                id="dwebsocket.E002",
            )
        )

    elif origins is not None and "*" in origins:
        errors.append(
            Warning(
                'WEBSOCKET_ALLOWED_ORIGINS contains "*": every web site can open WebSockets '
                "to this project with its visitors' cookies (cross-site WebSocket hijacking).",
                hint=(
                    "List the origins of the pages that may connect, e.g. "
                    'WEBSOCKET_ALLOWED_ORIGINS = ["https://app.example.com"]; a page of this '
                    "site itself needs no entry. See docs/security.md."
                ),
                id="dwebsocket.W002",
            )
        )

    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if _MIDDLEWARE not in middleware:
        errors.append(
            Warning(
                f"{_MIDDLEWARE} is not in MIDDLEWARE.",
                hint=(
                    "Decorated views still work, but request.is_websocket() and "
                    "request.websocket are only set on them, the long-polling "
                    "fallback of dwebsocket.js is not served, and "
                    "WEBSOCKET_ACCEPT_ALL has no effect. Add it right after "
                    "django.middleware.common.CommonMiddleware."
                ),
                id="dwebsocket.W001",
            )
        )
    return errors


def _check_redis_url(url: str) -> list[Error]:
    """A malformed cluster or sentinel URL (E009), or a cluster URL with a redis-py too old for it (E010)."""
    from . import _redis

    try:
        target = _redis.parse(url)
    except _redis.RedisURLError as exc:
        return [Error(
            f"WEBSOCKET_BROKER: {exc}",
            hint='See docs/deployment.md, e.g. "redis+cluster://10.0.0.1:7000,10.0.0.2:7000" or '
                 '"redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster".',
            id="dwebsocket.E009",
        )]
    if target.kind == "cluster" and not _redis.sharded_pubsub_supported():
        import redis

        return [Error(
            f"WEBSOCKET_BROKER names a Redis Cluster, and the installed redis-py {redis.__version__} "
            "has no sharded pub/sub (SSUBSCRIBE), which broadcasts on a cluster use.",
            hint="Install redis>=5.0 (pip install -U redis).",
            id="dwebsocket.E010",
        )]
    return []


@register(deploy=True)
def check_broker_reachable(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """``manage.py check --deploy``: the Redis broker answers."""
    url = conf.get("WEBSOCKET_BROKER")
    if not conf.is_redis_url(url):
        return []
    from . import _redis

    try:
        found = _redis._make(url, 2.0, 2.0)
        try:
            found.ping()
            if _redis.is_cluster(url):
                version = str(found.info("server", target_nodes=found.get_random_node())["redis_version"])
                if int(version.split(".")[0]) < 7:
                    raise RuntimeError(f"it runs Redis {version}; sharded pub/sub needs Redis 7 or later")
        finally:
            found.close()
    except Exception as exc:
        return [
            Error(
                f"WEBSOCKET_BROKER = {url!r} cannot be reached: {exc}.",
                hint="Start Redis, or fix the URL. Until it answers, broadcasts stay in one process.",
                id="dwebsocket.E005",
            )
        ]
    return []
