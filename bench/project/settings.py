"""One Django project served two ways for the benchmarks: dwebsocket and Channels."""

import os

SECRET_KEY = "bench-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "channels", "dwebsocket"]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "dwebsocket.middleware.WebSocketMiddleware",
]
ROOT_URLCONF = "bench.project.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
ASGI_APPLICATION = "bench.project.asgi.application"

REDIS_URL = os.environ.get("BENCH_REDIS_URL")
# BENCH_DEFAULTS=1 (bench/fanout.py's burst check) keeps each library's default
# slow-member policy; otherwise the queues are sized to measure delivery, not the policy.
DEFAULTS = bool(os.environ.get("BENCH_DEFAULTS"))
CAPACITY = {} if DEFAULTS else {"capacity": 100_000}
# dwebsocket
WEBSOCKET_BROKER = REDIS_URL or "memory"
WEBSOCKET_MAX_CONNECTIONS = None  # the benchmarks measure capacity (bench/idle.py: 10,000 in one process)
WEBSOCKET_HISTORY_SIZE = int(os.environ.get("BENCH_HISTORY_SIZE", "100"))  # 0: the *-nohistory configurations
if not DEFAULTS:
    WEBSOCKET_BROADCAST_QUEUE = 100_000
# Prometheus metrics (docs/metrics.md) off unless BENCH_METRICS=1: the *-metrics
# configurations measure what they cost (the bench venv has prometheus_client).
WEBSOCKET_METRICS = os.environ.get("BENCH_METRICS") == "1"
# Channels
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], **CAPACITY},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": CAPACITY}}
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
