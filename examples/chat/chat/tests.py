"""The chat's own tests: `python manage.py test chat`, no server needed."""

import json

from django.test import TestCase

from dwebsocket.testing import WebSocketClient


def next_of_type(ws, kind):
    while True:
        data = json.loads(ws.receive())
        if data["type"] == kind:
            return data


class ChatTests(TestCase):
    def test_the_page_is_served_on_the_same_url(self):
        response = self.client.get("/ws/chat/")
        self.assertContains(response, "<h1>Simple Chat</h1>")

    def test_the_root_redirects_to_the_chat_keeping_the_name(self):
        self.assertRedirects(self.client.get("/?name=alice"), "/ws/chat/?name=alice", fetch_redirect_response=False)
        self.assertRedirects(self.client.get("/"), "/ws/chat/", fetch_redirect_response=False)

    def test_two_people_chat(self):
        with WebSocketClient().connect("/ws/chat/", {"name": "alice"}) as alice:
            self.assertEqual(next_of_type(alice, "presence")["members"], 1)
            with WebSocketClient().connect("/ws/chat/", {"name": "bob"}) as bob:
                self.assertEqual(next_of_type(bob, "presence")["text"], "bob joined")
                self.assertEqual(next_of_type(alice, "presence")["members"], 2)
                alice.send("hi bob")
                self.assertEqual(next_of_type(bob, "message"), {"type": "message", "user": "alice", "text": "hi bob"})
            # bob's view has returned when his connection's `with` ends.
            self.assertEqual(next_of_type(alice, "presence"), {"type": "presence", "text": "bob left", "members": 1})
