"""The seed guide's chat, with the page and the socket on one URL."""

import threading

from django.shortcuts import render

from dwebsocket import accept_websocket

# Every open chat connection. The view threads of all clients add, remove and
# broadcast, so _clients_lock guards the list.
connected_clients = []
_clients_lock = threading.Lock()


def broadcast(message, exclude=None):
    with _clients_lock:
        clients = list(connected_clients)
    for client in clients:
        if client is not exclude:
            client.send(message)  # thread-safe; returns False for a closed client


@accept_websocket
def chat_view(request):
    if not request.is_websocket():
        return render(request, "chat/chat.html")
    ws = request.websocket
    with _clients_lock:
        connected_clients.append(ws)
    try:
        for message in ws:  # ends when the client closes
            broadcast(message, exclude=ws)
    finally:
        with _clients_lock:
            connected_clients.remove(ws)
