"""flask-sock's echo, for bench/echo.py: the sync-style alternative to a dwebsocket view.

Served as flask-sock documents it, by gunicorn with threads:

    gunicorn -k gthread --threads 116 -b 127.0.0.1:8000 bench.flask_echo:app
"""

from flask import Flask
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)


@app.get("/health/")
def health() -> str:
    return "ok"


@sock.route("/echo")
def echo(ws) -> None:
    """Send every message back (flask-sock ends the loop when the client closes)."""
    while True:
        ws.send(ws.receive())
