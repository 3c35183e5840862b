"""The chat page in headless Chromium (Debian's chromium, driven by Playwright).

Screenshots of each test go to artifacts/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from .servers import ROOT, free_port, start_server

SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NO_WEBSOCKET = "delete window.WebSocket;"


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Chromium is missing: scripts/test.sh installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def open_page(browser, url, init_script=None):
    """A page at *url* in a browser context of its own (its own cookies)."""
    context = browser.new_context()
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    page.goto(url)
    try:
        yield page
    finally:
        context.close()


def chat_page(browser, server, name, without_websocket=False):
    """The chat example's page, as *name*; *without_websocket*: in a browser that has none."""
    return open_page(browser, f"{server.http}/ws/chat/?name={name}", NO_WEBSOCKET if without_websocket else None)


def say(page, text):
    page.fill("#input-box", text)
    page.press("#input-box", "Enter")


def shot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def messages(page):
    return page.locator("#messages")


def expect_members(page, text, timeout):
    """Like expect(...).to_have_text on the member count, with the page's log on failure."""
    try:
        expect(page.locator("#members")).to_have_text(text, timeout=timeout)
    except AssertionError as error:
        log = messages(page).inner_text()
        raise AssertionError(f"{error}\nThe page's messages:\n{log}") from None


@pytest.mark.parametrize("kind", ["runserver", "uvicorn"])
def test_two_pages_chat_over_websocket(browser, kind):
    with start_server(kind, project="chat") as server:
        with chat_page(browser, server, "alice") as alice, chat_page(browser, server, "bob") as bob:
            expect(alice.locator("#members")).to_have_text("2 in the room.", timeout=10_000)
            assert alice.evaluate("chatSocket.transport") == "websocket"
            say(alice, "hello bob")
            expect(messages(bob)).to_contain_text("alice: hello bob", timeout=10_000)
            say(bob, "hi alice ✓")
            expect(messages(alice)).to_contain_text("bob: hi alice ✓", timeout=10_000)
            shot(alice, f"websocket-{kind}-alice")
            shot(bob, f"websocket-{kind}-bob")
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("kind", ["runserver", "gthread", "uvicorn"])
def test_the_seeds_own_chat_page_with_its_broadcast_view(browser, kind):
    """The guide's chat.html and broadcasting view, both verbatim, plain browser WebSocket."""
    with start_server(kind) as server:
        pages = []
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                page = stack.enter_context(open_page(browser, f"{server.http}/seed/page/"))
                expect(messages(page)).to_contain_text("Connected to the chat server.", timeout=10_000)
                pages.append(page)
            first, second, third = pages
            say(first, "hello everyone")
            for other in (second, third):
                expect(messages(other)).to_contain_text("hello everyone", timeout=10_000)
            say(third, "hi ✓")
            for other in (first, second):
                expect(messages(other)).to_contain_text("hi ✓", timeout=10_000)
            shot(second, f"seed-chat-{kind}")
            # The sender gets nothing back: only the greeting, its own text never.
            expect(first.locator("#messages p")).to_have_count(2)  # connected, "hi ✓"
            expect(third.locator("#messages p")).to_have_count(2)  # connected, "hello everyone"
        assert "Traceback" not in server.log_text()
        assert "Broadcasting message: hello everyone" in server.log_text()


@pytest.mark.parametrize("kind", ["runserver", "gthread", "uvicorn"])
def test_a_page_without_websocket_chats_over_long_polling(browser, kind):
    with start_server(kind, project="chat") as server:
        with chat_page(browser, server, "carol", without_websocket=True) as carol, \
                chat_page(browser, server, "dave") as dave:
            expect(carol.locator("#members")).to_have_text("2 in the room.", timeout=15_000)
            assert carol.evaluate("typeof window.WebSocket") == "undefined"
            assert carol.evaluate("chatSocket.transport") == "polling"
            assert dave.evaluate("chatSocket.transport") == "websocket"
            say(carol, "sent over polling")
            expect(messages(dave)).to_contain_text("carol: sent over polling", timeout=10_000)
            say(dave, "received over polling")
            expect(messages(carol)).to_contain_text("dave: received over polling", timeout=10_000)
            shot(carol, f"polling-{kind}-carol")
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("without_websocket", [False, True], ids=["websocket", "polling"])
def test_pages_reconnect_after_a_server_restart(browser, without_websocket):
    port = free_port()
    server_cm = start_server("runserver", project="chat", port=port)
    server = server_cm.__enter__()
    try:
        with chat_page(browser, server, "erin", without_websocket=without_websocket) as erin, \
                chat_page(browser, server, "frank") as frank:
            expect(erin.locator("#members")).to_have_text("2 in the room.", timeout=15_000)
            server_cm.__exit__(None, None, None)  # the server goes away
            expect(erin.locator("#members")).to_have_text("Reconnecting…", timeout=15_000)
            expect(frank.locator("#members")).to_have_text("Reconnecting…", timeout=15_000)
            say(erin, "typed during the outage")
            shot(erin, f"outage-{'polling' if without_websocket else 'websocket'}")
            server_cm = start_server("runserver", project="chat", port=port)
            server = server_cm.__enter__()
            # Both pages come back by themselves...
            expect_members(erin, "2 in the room.", timeout=30_000)
            expect_members(frank, "2 in the room.", timeout=30_000)
            # ...the message typed meanwhile reached the server once erin was back...
            deadline_text = "erin: typed during the outage"
            for _ in range(100):
                if deadline_text in server.log_text():
                    break
                erin.wait_for_timeout(100)
            assert deadline_text in server.log_text()
            # ...and the chat goes on both ways.
            say(frank, "welcome back")
            expect(messages(erin)).to_contain_text("frank: welcome back", timeout=10_000)
            say(erin, "thanks")
            expect(messages(frank)).to_contain_text("erin: thanks", timeout=10_000)
            shot(erin, f"reconnected-{'polling' if without_websocket else 'websocket'}")
    finally:
        server_cm.__exit__(None, None, None)


# -- the client's timeouts, on a blank page of the test project ------------------


def client_page(browser, server):
    return open_page(browser, f"{server.http}/client/")


OPEN_SOCKET = """([url, options]) => new Promise((resolve) => {
    window.events = [];
    const socket = window.socket = new DWebSocket(url, options);
    socket.onopen = () => { events.push("open " + socket.transport); resolve(); };
    socket.onclose = (event) => events.push("close " + event.code);
    socket.onmessage = (event) => events.push("message " + event.data);
})"""


def test_a_stalled_websocket_handshake_falls_back_to_polling(browser):
    """A proxy that holds the handshake: the client gives up on it and long-polls."""
    with start_server("runserver") as server:
        with client_page(browser, server) as page:
            page.evaluate(OPEN_SOCKET, ["/stalled-handshake/?stall=8", {"connectTimeout": 1500}])
            assert page.evaluate("events") == ["open polling"]
            page.evaluate("socket.send('hi')")
            page.wait_for_function("events.includes('message polling:hi')", timeout=10_000)
            page.evaluate("socket.close()")
        assert "Traceback" not in server.log_text()  # before the server stops


def test_a_poll_to_a_server_gone_silent_is_given_up_and_the_client_reconnects(browser):
    """A server (or network) that stops answering without closing anything."""
    with start_server("runserver", env={"DWS_TEST_POLL_TIMEOUT": "2"}) as server, \
            client_page(browser, server) as page:
        options = {"transports": ["polling"], "connectTimeout": 2000,
                   "reconnect": {"initialDelay": 200, "maxDelay": 1000}}
        page.evaluate(OPEN_SOCKET, ["/echo/", options])
        os.killpg(server.process.pid, signal.SIGSTOP)  # the server freezes, its sockets stay open
        try:
            # The poll in flight is given up 2 s (connectTimeout) after the
            # server's 2 s poll timeout: the page learns the connection is lost.
            page.wait_for_function("events.includes('close 1006')", timeout=15_000)
            assert page.evaluate("socket.readyState") == 0  # CONNECTING: it keeps trying
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
        page.wait_for_function("events.filter((e) => e === 'open polling').length === 2", timeout=20_000)
        page.evaluate("socket.send('back')")
        page.wait_for_function("events.includes('message back')", timeout=10_000)
        page.evaluate("socket.close()")


# -- a deploy: the server closes with 1012 (service restart) ------------------------

OPEN_MANY = """([url, count]) => Promise.all(Array.from({length: count}, () => new Promise((resolve) => {
    const socket = new DWebSocket(url, {transports: ["websocket"]});
    (window.sockets = window.sockets || []).push(socket);
    socket.opened = 0;
    // When it tries again after the close: the delay dwebsocket.js chose.
    socket._connect = function (index) {
        if (this.closedAt !== undefined && this.retriedAt === undefined) this.retriedAt = performance.now();
        return DWebSocket.prototype._connect.call(this, index);
    };
    socket.onopen = () => { socket.opened += 1; resolve(); };
    socket.onclose = (event) => { socket.closeCode = event.code; socket.closedAt = performance.now(); };
    socket.onmessage = (event) => { socket.last = event.data; };
})))"""


def test_after_a_1012_pages_reconnect_at_once_each_after_a_random_delay(browser):
    """gunicorn gets SIGTERM (a deploy) and closes every connection with 1012: each
    DWebSocket tries again within initialDelay (500 ms), at a random moment of it,
    so that a thousand clients do not come back in the same millisecond, and they
    all reconnect to the server that takes over the port."""
    port = free_port()
    count = 12
    with start_server("gthread", port=port, args=("--graceful-timeout", "30")) as old, \
            client_page(browser, old) as page:
        page.evaluate(OPEN_MANY, ["/deploy-echo/", count])
        os.kill(old.main_pid, signal.SIGTERM)
        old.process.wait(5)
        page.wait_for_function(f"sockets.filter((s) => s.retriedAt !== undefined).length === {count}", timeout=5_000)
        codes = page.evaluate("sockets.map((s) => s.closeCode)")
        delays = page.evaluate("sockets.map((s) => s.retriedAt - s.closedAt)")
        assert codes == [1012] * count
        assert all(0 <= delay < 500 + 50 for delay in delays), delays  # within initialDelay
        # Spread over [0, 500 ms), not bunched: (the older rule waited 250 to 500 ms.)
        assert min(delays) < 250, delays
        with start_server("gthread", port=port) as new:
            page.wait_for_function("sockets.every((s) => s.opened === 2)", timeout=30_000)
            page.evaluate("sockets.forEach((s, i) => s.send('back ' + i))")
            page.wait_for_function("sockets.every((s, i) => s.last === 'back ' + i)", timeout=10_000)
            page.evaluate("sockets.forEach((s) => s.close())")
            assert "Traceback" not in new.log_text()
