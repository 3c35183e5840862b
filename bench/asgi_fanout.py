"""A bare ASGI fan-out, for bench/fanout.py: the ceiling for any ASGI stack under uvicorn.

A member is accepted and its ``send`` kept in a list; GET /fanout?n=K&start=S
loops ``await send(...)`` over the list K times, messages "<number> <time sent>".

    uvicorn --ws wsproto --host 127.0.0.1 --port 8000 --no-access-log bench.asgi_fanout:app
"""

import time
from urllib.parse import parse_qs

sends = []


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        sends.append(send)
        try:
            await send({"type": "websocket.send", "text": "joined"})
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            sends.remove(send)
    elif scope["type"] == "http":
        if scope["path"] == "/fanout":
            query = parse_qs(scope["query_string"].decode())
            start = int(query.get("start", ["0"])[0])
            for number in range(start, start + int(query.get("n", ["1"])[0])):
                event = {"type": "websocket.send", "text": f"{number} {time.time()!r}"}
                for member_send in list(sends):
                    try:
                        await member_send(event)
                    except OSError:  # uvicorn's ClientDisconnected: a member leaving
                        pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    elif scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
