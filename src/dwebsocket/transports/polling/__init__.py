"""Long-polling: the same view and ``request.websocket`` for clients without WebSocket.

The browser client (``static/dwebsocket/dwebsocket.js``) falls back to this
when a WebSocket cannot be opened. It speaks JSON over HTTP on the view's own
URL, the action chosen by the ``dwebsocket`` query parameter::

    POST ?dwebsocket=open              {"protocols": [...]}     -> {"sid": S, "subprotocol": P, "timeout": T}
    GET  ?dwebsocket=poll&sid=S                                 -> {"messages": [...], "close": null}
    POST ?dwebsocket=send&sid=S        {"messages": [...]}      -> 204
    POST ?dwebsocket=close&sid=S       {"code": C, "reason": R} -> 204

A message is ``{"text": "..."}`` or ``{"binary": "<base64>"}``. ``open`` runs
through the whole middleware stack, then the view runs for the life of the
session, exactly as for a WebSocket. The session id is unguessable and bound
to the client's session cookie; it is the only thing that lets a request
reach a session, so ``send`` and ``close`` are safe from CSRF without a
token. A session whose client stops polling expires, and the view sees the
connection close (1006).

The modules, each importing only those below it:

``http``         the requests: ``open`` (runs the view), ``poll``, ``send``, ``close``;
                 picks the session store from ``WEBSOCKET_BROKER``
``session``      the view's end of a session: ``PollingSession``, its opener and transport
``redis_store``  the session store in Redis: any process serves any request
``store``        the session-store interface, and the store of this process
``wire``         the JSON wire format, the Python twin of ``dwebsocket.js``

This ``__init__`` imports nothing: ``WebSocketMiddleware`` imports ``http``.
"""

__all__: list[str] = []
