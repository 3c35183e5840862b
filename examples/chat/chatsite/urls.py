from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import path
from django.views.generic import RedirectView

from chat import views as chat_views

urlpatterns = [
    # query_string=True keeps ?name=alice: the page reads its name from it.
    path("", RedirectView.as_view(url="/ws/chat/", query_string=True)),
    # The page and its WebSocket share this URL (@accept_websocket).
    path("ws/chat/", chat_views.chat_view, name="chat-view"),
]

# dwebsocket.js under every server while DEBUG is on (runserver serves it anyway).
urlpatterns += staticfiles_urlpatterns()
