from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import path

from . import seed_broadcast, seed_echo, views

urlpatterns = [
    path("health/", views.health),
    path("result/<str:key>/", views.result),
    path("seed/echo/", seed_echo.chat_view),
    path("seed/broadcast/", seed_broadcast.chat_view),
    # The seed's chat page (its chat.html, verbatim) and the URL it connects to.
    path("seed/page/", seed_echo.chat_page),
    path("ws/chat/", seed_broadcast.chat_view),
    path("echo/", views.echo),
    path("page-or-socket/", views.page_or_socket),
    path("plain/", views.plain),
    path("wait-timeout/", views.wait_timeout),
    path("queue/", views.queue),
    path("server-close/", views.server_close),
    path("disconnect/", views.disconnect),
    path("subprotocol/", views.subprotocol),
    path("send-types/", views.send_types),
    path("raises/", views.raises),
    path("refuses/", views.refuses),
    path("noop/", views.noop),
    path("big/", views.big),
    path("whoami/", views.whoami),
    path("signup/", views.signup),
    path("flood/", views.flood),
    path("concurrent-send/", views.concurrent_send),
    path("undecorated-echo/", views.undecorated_echo),
    path("async-echo/", views.async_echo),
    path("async-broadcast/", views.async_broadcast),
    path("async-members/", views.async_members),
    path("middleware-raises/", views.middleware_raises),
    path("sleepy-echo/", views.sleepy_echo),
    path("late-accept/", views.late_accept),
    path("stalled-handshake/", views.stalled_handshake),
    path("client/", views.client_page),
    path("login-as/<str:username>/", views.login_as),
    path("group/<str:name>/", views.group_chat),
    path("async-group/<str:name>/", views.async_group_chat),
    path("presence/<str:name>/", views.presence),
    path("broadcast/<str:name>/", views.http_broadcast),
    path("bad-text/broadcast/<str:name>/", views.bad_text_broadcast),
    path("bad-text/send/", views.bad_text_send),
]
urlpatterns += staticfiles_urlpatterns()  # dwebsocket.js, for the browser tests
