"""Settings of the Django project the tests serve with real servers."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "dwebsocket-tests-not-secret"
DEBUG = os.environ.get("DWS_TEST_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
CSRF_TRUSTED_ORIGINS = ["https://trusted.example"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "dwebsocket",
    "tests.project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "dwebsocket.middleware.WebSocketMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "tests.project.middleware.ExplodingMiddleware",
]

ROOT_URLCONF = "tests.project.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DWS_TEST_DB", str(BASE_DIR / "test.sqlite3")),
    }
}
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.contrib.auth.context_processors.auth"]},
    }
]
STATIC_URL = "/static/"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

# Short timers, so that tests of keepalive and closing finish quickly.
WEBSOCKET_PING_INTERVAL = float(os.environ.get("DWS_TEST_PING_INTERVAL", "20"))
WEBSOCKET_PING_TIMEOUT = float(os.environ.get("DWS_TEST_PING_TIMEOUT", "20"))
WEBSOCKET_CLOSE_TIMEOUT = 2.0
WEBSOCKET_BROKER = os.environ.get("DWS_TEST_BROKER", "memory")
WEBSOCKET_POLL_TIMEOUT = float(os.environ.get("DWS_TEST_POLL_TIMEOUT", "25"))
WEBSOCKET_POLL_EXPIRY = float(os.environ.get("DWS_TEST_POLL_EXPIRY", "15"))
WEBSOCKET_BROADCAST_QUEUE = int(os.environ.get("DWS_TEST_BROADCAST_QUEUE", "256"))
WEBSOCKET_MAX_MESSAGE_SIZE = int(os.environ.get("DWS_TEST_MAX_MESSAGE_SIZE", str(1024 * 1024)))
WEBSOCKET_MAX_QUEUE = int(os.environ.get("DWS_TEST_MAX_QUEUE", "64"))
WEBSOCKET_MAX_QUEUE_BYTES = int(os.environ.get("DWS_TEST_MAX_QUEUE_BYTES", str(4 * 1024 * 1024)))
WEBSOCKET_MAX_CONNECTIONS = int(os.environ.get("DWS_TEST_MAX_CONNECTIONS", "1000"))
WEBSOCKET_RATE_LIMIT = os.environ.get("DWS_TEST_RATE_LIMIT") or None
WEBSOCKET_MAX_GROUPS = int(os.environ.get("DWS_TEST_MAX_GROUPS", "100"))
# "" (the default: on when prometheus_client is installed), "1" or "0".
WEBSOCKET_METRICS = {"": None, "1": True, "0": False}[os.environ.get("DWS_TEST_METRICS", "")]
WEBSOCKET_HISTORY_SIZE = int(os.environ.get("DWS_TEST_HISTORY_SIZE", "100"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "dwebsocket": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
