"""How connections reach Django and how their bytes move: one subpackage per kind.

``wsgi``     a WSGI server lends the client's socket (runserver, gunicorn gthread/gevent)
``asgi``     an ASGI server carries the frames (uvicorn, daphne, hypercorn)
``polling``  HTTP long-polling, for clients without WebSocket
``policy``   what every transport must agree on: limits, outbound queues, overflow
``opener``   the interface each kind implements, and the one place that picks it

This package's ``__init__`` imports nothing, so that importing
``dwebsocket.transports.policy`` from a lower layer pulls in no transport.
"""

__all__: list[str] = []
