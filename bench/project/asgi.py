"""BENCH_STACK=dwebsocket (default) or channels picks the application."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.project.settings")

if os.environ.get("BENCH_STACK") == "channels":
    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.core.asgi import get_asgi_application
    from django.urls import path

    django_app = get_asgi_application()
    from .views import Echo, Member

    application = ProtocolTypeRouter(
        {
            "http": django_app,
            "websocket": URLRouter([path("member/", Member.as_asgi()), path("echo/channels/", Echo.as_asgi())]),
        }
    )
else:
    from dwebsocket.asgi import get_asgi_application

    application = get_asgi_application()
