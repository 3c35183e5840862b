"""Start real servers serving the test project, on 127.0.0.1 and a free port.

Every server runs under ``timeout`` so that it stops by itself even if a test
run is killed, in a process group of its own so that stopping it also stops
runserver's autoreloader child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_SECONDS = 900  # no server outlives this, whatever happens to the test run

@dataclass(frozen=True)
class Project:
    """A Django project the servers can serve."""

    manage: str  # path of manage.py, relative to its directory
    wsgi: str  # dotted path of the WSGI module
    directory: Path  # goes on PYTHONPATH and is the working directory
    settings: str


PROJECTS = {
    "tests": Project("tests/project/manage.py", "tests.project.wsgi", ROOT, "tests.project.settings"),
    "chat": Project("manage.py", "chatsite.wsgi", ROOT / "examples" / "chat", "chatsite.settings"),
}

SERVERS = {
    # Django's development server, autoreloader on, as `manage.py runserver` starts it.
    "runserver": lambda port, p: [sys.executable, p.manage, "runserver", f"127.0.0.1:{port}"],
    "gthread": lambda port, p: [
        sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "64",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", p.wsgi,
    ],
    "gevent": lambda port, p: [
        sys.executable, "-m", "gunicorn", "-k", "gevent", "--worker-connections", "2000",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", p.wsgi,
    ],
}

# Servers dwebsocket refuses with a clear error; started by the tests of that error.
UNSUPPORTED = {
    "gunicorn-sync": lambda port, p: [
        sys.executable, "-m", "gunicorn", "-k", "sync", "-b", f"127.0.0.1:{port}", p.wsgi,
    ],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    kind: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **headers: str) -> tuple[int, str]:
        request = urllib.request.Request(self.http + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextmanager
def start_server(
    kind: str, env: dict[str, str] | None = None, project: str = "tests"
) -> Iterator[RunningServer]:
    """Start a server of *kind* (see SERVERS) serving *project*; stop it on exit."""
    port = free_port()
    proj = PROJECTS[project]
    log = tempfile.NamedTemporaryFile(prefix=f"dws-{kind}-", suffix=".log", delete=False)
    full_env = {
        **os.environ,
        "PYTHONPATH": str(proj.directory),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": proj.settings,
        "DWS_TEST_DB": str(Path(tempfile.gettempdir()) / f"dws-{port}.sqlite3"),
        **(env or {}),
    }
    process = subprocess.Popen(
        ["timeout", "-k", "5", str(MAX_SECONDS), *{**SERVERS, **UNSUPPORTED}[kind](port, proj)],
        cwd=proj.directory, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    server = RunningServer(kind, port, process, Path(log.name))
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{kind} exited at start:\n{server.log_text()}")
            try:
                if server.get("/health/")[0] < 500:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not answer within 30 s:\n{server.log_text()}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
        log.close()
