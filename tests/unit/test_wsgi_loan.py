"""The end of a connection under uWSGI, on a real socket pair: what uWSGI writes
after the view returned must not reach the client, and must not fail."""

from __future__ import annotations

import os
import socket

from dwebsocket.transports.wsgi.loan import ReleasedResponse, _UwsgiRelease


def test_after_release_the_servers_descriptor_writes_to_nowhere_and_the_client_sees_the_end():
    server_side, client = socket.socketpair()
    fd = server_side.detach()  # the server's descriptor, which the server closes itself
    ours = socket.socket(fileno=os.dup(fd))
    ours.sendall(b"frames")
    release = _UwsgiRelease(fd, ours)
    response = ReleasedResponse(release, ends_empty=True)
    assert list(response) == []  # iterating releases; the server gets no body
    assert ours.fileno() == -1  # dwebsocket's duplicate is closed
    assert os.write(fd, b"HTTP/1.1 101 Switching Protocols\r\n\r\n") > 0  # uWSGI's last write: no error
    os.close(fd)  # as uWSGI does, once
    client.settimeout(5)
    received = b""
    while chunk := client.recv(100):
        received += chunk
    assert received == b"frames"  # and then the end: nothing uWSGI wrote
    client.close()
