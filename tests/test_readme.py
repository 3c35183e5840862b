"""The README's first command, run as a user runs it: the chat example, from nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

from websockets.sync.client import connect

from .servers import ROOT, free_port, stop_process_group

START_SECONDS = 300  # a fresh machine builds .venvs/chat first


def readme_commands() -> list[str]:
    """The commands of the README's first code block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_starts_with_the_chat_and_the_tests():
    assert readme_commands() == ["scripts/run-chat.sh", "scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_the_readmes_first_command_serves_the_chat(tmp_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "CHAT_DB": str(tmp_path / "chat.sqlite3")}
    for name in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)  # as from a fresh shell, not from the test run's virtualenv
    log = tmp_path / "run-chat.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["timeout", "-k", "5", str(START_SECONDS + 60), readme_commands()[0]],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        page = None
        while page is None:
            assert process.poll() is None, f"run-chat.sh exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no chat page after {START_SECONDS} s:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert "<h1>Simple Chat</h1>" in page and "dwebsocket/dwebsocket.js" in page
        with connect(f"ws://127.0.0.1:{port}/ws/chat/?name=reader", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10)) == {"type": "presence", "text": "reader joined", "members": 1}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/dwebsocket/dwebsocket.js", timeout=5) as js:
            assert b"function DWebSocket" in js.read()
        assert "Traceback" not in log.read_text()  # read before the server stops
    finally:
        stop_process_group(process)
