"""The ASGI application and the middleware, as Django loads them."""

from __future__ import annotations


def test_djangos_own_get_asgi_application_serves_websockets_once_the_app_is_installed():
    from django.core.asgi import get_asgi_application

    from dwebsocket.asgi import WebSocketASGIHandler, install

    assert type(get_asgi_application()) is WebSocketASGIHandler  # AppConfig.ready() installed it
    install()  # idempotent
    assert type(get_asgi_application()) is WebSocketASGIHandler  # and an ASGIHandler, for HTTP


def test_the_middleware_process_view_is_a_coroutine_in_an_async_stack():
    # Django awaits a coroutine process_view on the event loop; a sync one would
    # send every request through a thread first.
    from asgiref.sync import iscoroutinefunction

    from dwebsocket.middleware import WebSocketMiddleware

    async def get_response(request):
        return None

    assert iscoroutinefunction(WebSocketMiddleware(get_response).process_view)
    assert not iscoroutinefunction(WebSocketMiddleware(lambda request: None).process_view)

