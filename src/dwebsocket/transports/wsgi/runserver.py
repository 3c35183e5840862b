"""Let Django's development server (``manage.py runserver``) lend its socket.

Django's request handler does not put the client socket in the WSGI environ.
When the app is ready, dwebsocket installs a subclass of
``django.core.servers.basehttp.WSGIRequestHandler`` that adds it. The
``runserver`` command looks the handler class up each time it starts a
server, so this works whichever app's ``runserver`` command is in use (the
``staticfiles`` one included) and with the autoreloader.

Stopping. With the autoreloader, ``runserver`` is two processes: one watches
the files, its child serves. On SIGTERM Django's watching process exits and
kills the child with SIGKILL, so open connections drop without a close frame.
dwebsocket replaces ``autoreload.restart_with_reloader`` (the watcher's loop)
with :func:`_restart_with_reloader`, which passes SIGTERM on to the child and
waits for it: the child ends with ``sys.exit()`` (Django's own SIGTERM
handler there), and on its way out closes its connections with 1012
(``transports/restart.py``), as it does when the autoreloader restarts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType
from typing import Any

from django.core.servers import basehttp
from django.utils import autoreload

from ... import conf
from ... import metrics as _metrics

__all__ = ["WebSocketRequestHandler", "install"]

_django_restart_with_reloader = autoreload.restart_with_reloader


class WebSocketRequestHandler(basehttp.WSGIRequestHandler):
    """Django's request handler, plus the client socket in ``environ``."""

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = dict(super().get_environ())
        environ["dwebsocket.socket"] = self.request
        _metrics.serving("runserver")
        environ["dwebsocket.release"] = self._release_websocket
        return environ

    def _release_websocket(self) -> None:
        # The socket carried a WebSocket: no further HTTP request follows on it.
        self.close_connection = True
        self.log_request(101)


def install() -> None:
    """Make ``runserver`` use :class:`WebSocketRequestHandler`; idempotent."""
    current = basehttp.WSGIRequestHandler
    if issubclass(current, WebSocketRequestHandler):
        return
    if current is not WebSocketRequestHandler.__mro__[1]:
        # Another app replaced the handler too: keep its behaviour and add ours.
        handler: type = type("WebSocketRequestHandler", (WebSocketRequestHandler, current), {})
    else:
        handler = WebSocketRequestHandler
    basehttp.WSGIRequestHandler = handler  # type: ignore[misc,assignment]
    if autoreload.restart_with_reloader is _django_restart_with_reloader:
        autoreload.restart_with_reloader = _restart_with_reloader


def _restart_with_reloader() -> int:
    """Django's ``autoreload.restart_with_reloader()``, except that a stop reaches the server.

    Runs in the watching process, in its main thread. Starts the serving
    process again each time it exits with 3 (a file changed), as Django's
    does. A SIGTERM is passed on to the serving process, which closes its
    connections (1012) and exits; this process then exits with it. On Ctrl-C
    (which reaches both processes) it waits for the serving process as long;
    only a process that does not end in that time is killed.
    """
    environ = {**os.environ, autoreload.DJANGO_AUTORELOAD_ENV: "true"}
    args = autoreload.get_child_arguments()
    while True:
        child = subprocess.Popen(args, env=environ, close_fds=False)

        def forward(signum: int, frame: FrameType | None, child: subprocess.Popen[bytes] = child) -> None:
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        try:
            code = child.wait()
        except BaseException:
            try:
                child.wait(conf.get("WEBSOCKET_CLOSE_TIMEOUT") + 1)
            except BaseException:
                child.kill()
                child.wait()
            raise
        if code != 3:
            return code
