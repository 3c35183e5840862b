import dwebsocket.metrics
from django.urls import path

from . import views

urlpatterns = [
    path("health/", views.health),
    path("member/", views.member),
    path("member/sync/", views.member_sync),
    path("fanout/dwebsocket/", views.dwebsocket_fanout),
    path("fanout/dwebsocket/async/", views.dwebsocket_fanout_async),
    path("fanout/raw-asgi/", views.raw_asgi_fanout),
    path("fanout/channels/", views.channels_fanout),
    path("echo/sync/", views.echo_sync),
    path("echo/async/", views.echo_async),
    path("debug/memory/", views.memory),
    path("metrics", dwebsocket.metrics.view),  # with BENCH_METRICS=1: shows what was counted
]
