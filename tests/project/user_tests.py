"""A user's own TestCase, run by Django's test runner (tests/test_user_tests.py runs it).

The view runs in a thread of its own and still sees the test's data: it uses
the test's database connection, inside the TestCase's transaction.
"""

from django.contrib.auth.models import User
from django.test import TestCase

from dwebsocket.testing import HandshakeRefused, WebSocketClient


class LoggedInUserTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.user = User.objects.create_user("erin", password="s3cret-pass")

    def test_force_login(self):
        client = WebSocketClient()
        client.force_login(self.user)
        with client.connect("/whoami/") as ws:
            self.assertEqual(ws.receive(), "erin")

    def test_login_with_credentials(self):
        client = WebSocketClient()
        self.assertTrue(client.login(username="erin", password="s3cret-pass"))
        with client.connect("/whoami/") as ws:
            self.assertEqual(ws.receive(), "erin")

    def test_an_anonymous_handshake_is_redirected_to_the_login_page(self):
        with self.assertRaises(HandshakeRefused) as refused:
            WebSocketClient().connect("/whoami/")
        self.assertEqual(refused.exception.status_code, 302)
        self.assertIn("/accounts/login/", refused.exception.response["Location"])


class DatabaseTests(TestCase):
    def test_what_the_view_saved_is_visible_once_closed(self):
        with WebSocketClient().connect("/signup/") as ws:
            ws.send("frank")
            ws.send("grace")
            self.assertEqual(ws.receive(), "2 signed up")
        self.assertEqual(sorted(User.objects.values_list("username", flat=True)), ["frank", "grace"])

    def test_each_test_starts_from_a_clean_database(self):
        self.assertEqual(User.objects.count(), 0)
