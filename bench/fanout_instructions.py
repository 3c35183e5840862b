"""CPU cost of one broadcast delivery in dwebsocket's WSGI path, in one process: for instruction counts.

``M`` members (default 300), each a real SocketTransport on a socket pair,
joined to one group; ``broadcast()`` is called ``N`` times and every client
side reads what it got after each broadcast. ``RAW=1`` replaces the broadcast
with the floor of any Python fan-out: the frame built once and one bare
``sock.send()`` per member (no lock, check or queue). Wall-clock figures move
with the machine's load; run it under valgrind's callgrind, whose instruction
counts do not, with two values of ``N``, and subtract:

    for raw in "" 1; do for n in 10 40; do
      RAW=$raw N=$n DWS_TEST_METRICS=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg-$raw-$n.out \\
        .venvs/django-5.2-py3.11/bin/python bench/fanout_instructions.py
    done; done    # (collected(40) - collected(10)) / 30 / 300 = instructions per delivery

Both counts include the clients' reads (the same for both), so the
difference is what dwebsocket adds to a delivery. ``DWS_TEST_METRICS``
(tests/project/settings.py) turns Prometheus metrics on (1) or off (0).
"""
import os
import socket
import sys
from pathlib import Path

tree = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1])
sys.path.insert(0, tree + "/src"); sys.path.insert(0, tree)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
import django  # noqa: E402

django.setup()
from django.test import RequestFactory  # noqa: E402

from dwebsocket import groups  # noqa: E402
from dwebsocket.connection import Connection  # noqa: E402
from dwebsocket.handshake import Handshake  # noqa: E402
from dwebsocket.messages import Frame  # noqa: E402
from dwebsocket.transports.policy import Limits  # noqa: E402
from dwebsocket.transports.wsgi.protocol import server_protocol  # noqa: E402
from dwebsocket.transports.wsgi.transport import SocketTransport  # noqa: E402

MEMBERS = int(os.environ.get("M", "300"))
request = RequestFactory().get("/", HTTP_UPGRADE="websocket", HTTP_CONNECTION="Upgrade", HTTP_HOST="testserver",
    HTTP_SEC_WEBSOCKET_KEY="dGhlIHNhbXBsZSBub25jZQ==", HTTP_SEC_WEBSOCKET_VERSION="13")
pairs = []
for _ in range(MEMBERS):
    server, client = socket.socketpair()
    handshake = Handshake(request)
    handshake.accept(None, compression=False)
    connection = Connection(Limits(ping_interval=None))
    transport = SocketTransport(server, server_protocol(handshake.deflate, None), connection._link)
    connection._link.opened(transport, transport.pump)
    transport.start()
    groups.join(connection._link, "bench")
    pairs.append((server, client, connection))  # the connection kept alive
message = "00001 1733246400.123456"
data = Frame(message).data
servers = [server for server, _, _ in pairs]
raw = bool(os.environ.get("RAW"))
for _ in range(int(os.environ.get("N", "20"))):
    if raw:
        for server in servers:
            server.send(data)
    else:
        groups.broadcast("bench", message)
    for _, client, _ in pairs:
        assert client.recv(65536) == data
