"""Middleware of the test project."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction


class ExplodingMiddleware:
    """Fails on purpose for one URL. Sync and async capable, like Django's own."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if request.path == "/middleware-raises/":
            raise RuntimeError("this middleware fails on purpose")
        if self.is_async:
            return self.get_response(request)  # a coroutine: awaited by the caller
        return self.get_response(request)


class SyncOnlyMiddleware:
    """A middleware that can only run synchronously (settings_syncmiddleware)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response["X-Sync-Only"] = "1"
        return response
