"""The chat example, served by runserver as the README's first command starts it."""

from __future__ import annotations

import contextlib

import pytest

from .client import ws_connect
from .servers import SERVERS, start_server


@pytest.mark.parametrize("kind", list(SERVERS))
def test_chat_page_and_broadcast_on_one_url(kind):
    with start_server(kind, project="chat") as chat:
        status, page = chat.get("/ws/chat/")
        assert status == 200
        assert "<h1>Simple Chat</h1>" in page and "new WebSocket(ws_path)" in page
        with contextlib.ExitStack() as stack:
            alice, bob, carol = (stack.enter_context(ws_connect(chat, "/ws/chat/")) for _ in range(3))
            for sender, receivers in ((alice, (bob, carol)), (bob, (alice, carol))):
                text = f"hello from {id(sender)}"
                # A client may still be joining: retry until the first receiver sees it.
                for _ in range(50):
                    sender.send(text)
                    try:
                        assert receivers[0].recv(timeout=0.2) == text
                        break
                    except TimeoutError:
                        continue
                for receiver in receivers[1:]:
                    while (got := receiver.recv(timeout=5)) != text:
                        pass
                with pytest.raises(TimeoutError):
                    while True:
                        assert sender.recv(timeout=0.3) != text  # never its own message
        assert "Traceback" not in chat.log_text()
