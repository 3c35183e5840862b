"""The seed guide's chat, done with groups: the page and the socket on one URL."""

import json
import threading

from django.shortcuts import render

from dwebsocket import accept_websocket, broadcast, group_size

ROOM = "lobby"

# Announcements go out one at a time, each with the count taken inside the
# lock: otherwise a count taken just before another member joined could reach
# the pages after that member's newer one, and every page would keep showing
# the stale count. (With several processes over Redis, counts from different
# processes can still cross; the next announcement corrects them.)
_announcing = threading.Lock()


def _announce(text):
    with _announcing:
        broadcast(ROOM, json.dumps({"type": "presence", "text": text, "members": group_size(ROOM)}))


@accept_websocket
def chat_view(request):
    if not request.is_websocket():
        return render(request, "chat/chat.html")
    ws = request.websocket
    name = (request.GET.get("name") or "").strip()[:40] or f"guest-{ws.id[:4]}"
    ws.join(ROOM)  # every process's members, once WEBSOCKET_BROKER points at Redis
    _announce(f"{name} joined")
    try:
        for text in ws:  # ends when the client closes
            if isinstance(text, str) and text.strip():
                print(f"{name}: {text}")  # the seed's views print what they receive too
                broadcast(ROOM, json.dumps({"type": "message", "user": name, "text": text}), exclude=ws)
    finally:
        ws.leave(ROOM)
        _announce(f"{name} left")
