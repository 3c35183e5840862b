"""CPU cost of one echo round trip in dwebsocket's WSGI path, in one process: for instruction counts.

A real SocketTransport on a socket pair, driven the way a sync view drives it
(``wait()`` reads the socket, ``send()`` writes the echo); the client side
writes pre-framed masked messages and reads the replies. Wall-clock figures
move with the machine's load; run it under valgrind's callgrind, whose
instruction counts do not, with two sizes, and subtract:

    for n in 200 3200; do
      DWS_TEST_METRICS=0 ONCE=$n valgrind --tool=callgrind --callgrind-out-file=/tmp/cg-$n.out \
        .venvs/django-5.2-py3.11/bin/python bench/echo_instructions.py
    done    # (collected(3200) - collected(200)) / 3000 = instructions per round trip

``DWS_TEST_METRICS`` (tests/project/settings.py) turns Prometheus metrics on (1) or off (0).
Without ``ONCE`` it prints the best of 5 timed runs of ``N`` round trips (CPU time).
"""
import cProfile
import os
import pstats
import socket
import sys
import time
from pathlib import Path

tree = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1])
sys.path.insert(0, tree + "/src"); sys.path.insert(0, tree)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
import django  # noqa: E402

django.setup()
from django.test import RequestFactory
from dwebsocket.connection import Connection
from dwebsocket.handshake import Handshake
from dwebsocket.transports.policy import Limits
from dwebsocket.transports.wsgi.protocol import server_protocol
from dwebsocket.transports.wsgi.transport import SocketTransport
from wsproto.frame_protocol import FrameProtocol
server, client = socket.socketpair()
request = RequestFactory().get("/", HTTP_UPGRADE="websocket", HTTP_CONNECTION="Upgrade", HTTP_HOST="testserver",
    HTTP_SEC_WEBSOCKET_KEY="dGhlIHNhbXBsZSBub25jZQ==", HTTP_SEC_WEBSOCKET_VERSION="13")
hs = Handshake(request); hs.accept(None, compression=False)
conn = Connection(Limits(ping_interval=None))
t = SocketTransport(server, server_protocol(hs.deflate, None), conn._link)
conn._link.opened(t, t.pump); t.start()
msg = "echo 00001 ".ljust(32, ".")
frame = bytes(FrameProtocol(client=True, extensions=[]).send_data(msg, True))
reply = bytes(FrameProtocol(client=False, extensions=[]).send_data(msg, True))
def run(n):
    for _ in range(n):
        client.sendall(frame)
        m = conn.wait()
        conn.send(m)
        got = client.recv(100)
        assert got == reply, got
if os.environ.get("ONCE") is not None:
    run(int(os.environ["ONCE"])); sys.exit(0)
run(2000)
N = int(os.environ.get("N", "30000"))
best = 1e9
for r in range(5):
    c0 = time.process_time(); run(N); best = min(best, (time.process_time() - c0) / N * 1e6)
print(f"{tree}: {best:.2f} us CPU per round trip (best of 5)")
if os.environ.get("PROFILE"):
    pr = cProfile.Profile(); pr.enable(); run(N); pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
