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
# dwebsocket
WEBSOCKET_BROKER = REDIS_URL or "memory"
WEBSOCKET_BROADCAST_QUEUE = 100_000  # measure delivery, not the slow-client policy
# Channels
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 100_000},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 100_000}}}
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
