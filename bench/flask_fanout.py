"""flask-sock's fan-out, for bench/fanout.py: the "plain loop" baseline.

A member appends its socket to a list and blocks reading; a broadcast loops
over the list and calls ``send()`` on each, in the request's thread. Served as
flask-sock documents it, by gunicorn with threads (or gevent):

    gunicorn -k gthread --threads 1016 --worker-connections 1100 -b 127.0.0.1:8000 bench.flask_fanout:app
"""

import time

from flask import Flask, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from websockets.frames import Frame, Opcode

app = Flask(__name__)
sock = Sock(app)
clients = []


@app.get("/health/")
def health() -> str:
    return "ok"


@sock.route("/member")
def member(ws) -> None:
    """Listen until the client closes (flask-sock ends the route then)."""
    clients.append(ws)
    try:
        ws.send("joined")
        while True:
            ws.receive()
    finally:
        clients.remove(ws)


@app.get("/fanout")
def fanout() -> str:
    """Broadcast ``?n=`` messages numbered from ``?start=``, each "<number> <time sent>"."""
    start = int(request.args.get("start", "0"))
    for number in range(start, start + int(request.args.get("n", "1"))):
        message = f"{number} {time.time()!r}"
        for ws in list(clients):
            try:
                ws.send(message)
            except ConnectionClosed:
                pass
    return "ok"


@app.get("/fanout-raw")
def fanout_raw() -> str:
    """The floor of any Python fan-out: each message framed once, then one ``socket.send()``
    per member, with no lock, no check and no queue (the members are flask-sock's, above).
    Not a way to serve: a partial write would corrupt the stream; loopback members read fast."""
    start = int(request.args.get("start", "0"))
    for number in range(start, start + int(request.args.get("n", "1"))):
        frame = Frame(Opcode.TEXT, f"{number} {time.time()!r}".encode()).serialize(mask=False)
        for ws in list(clients):
            try:
                ws.sock.send(frame)
            except OSError:
                pass
    return "ok"
