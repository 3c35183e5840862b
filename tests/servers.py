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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def process_tree(root_pid: int) -> list[int]:
    """*root_pid* and every process below it, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def python_path(*directories: Path) -> str:
    """PYTHONPATH for a child process: this tree's ``src`` first, so tests run the code beside them."""
    return os.pathsep.join(str(d) for d in (SRC, *directories))
MAX_SECONDS = 900  # no server outlives this, whatever happens to the test run

@dataclass(frozen=True)
class Project:
    """A Django project the servers can serve."""

    manage: str  # path of manage.py, relative to its directory
    wsgi: str  # dotted path of the WSGI module (the ASGI one is its sibling "asgi")
    directory: Path  # goes on PYTHONPATH and is the working directory
    settings: str

    @property
    def asgi(self) -> str:
        return self.wsgi.rsplit(".", 1)[0] + ".asgi:application"


PROJECTS = {
    "tests": Project("tests/project/manage.py", "tests.project.wsgi", ROOT, "tests.project.settings"),
    "chat": Project("manage.py", "chatsite.wsgi", ROOT / "examples" / "chat", "chatsite.settings"),
    "bench": Project("bench/project/manage.py", "bench.project.wsgi", ROOT, "bench.project.settings"),
}

def no_control_socket() -> list[str]:
    """gunicorn 25.1+ binds a control socket at one path per user and unlinks it on
    exit, clobbering any other gunicorn's on the machine: these servers open none."""
    from importlib import metadata

    try:
        major, minor = (int(part) for part in metadata.version("gunicorn").split(".")[:2])
    except metadata.PackageNotFoundError:
        return []
    return ["--no-control-socket"] if (major, minor) >= (25, 1) else []


def uwsgi(port: int, p: Project, *mode: str, http: str = "--http-socket") -> list[str]:
    """uWSGI serving HTTP itself (``--http-socket``, or its router with ``--http``), in *mode*.

    ``--die-on-term``: SIGTERM stops uWSGI, as it stops every other server here
    (without it uWSGI 2.0 reloads on SIGTERM and stops on SIGINT or SIGQUIT).
    """
    return [
        str(Path(sys.executable).with_name("uwsgi")), http, f"127.0.0.1:{port}",
        "--master", "--die-on-term", "--need-app", "--home", sys.prefix, "--module", p.wsgi,
        *mode,
    ]


SERVERS = {
    # Django's development server, autoreloader on, as `manage.py runserver` starts it.
    "runserver": lambda port, p: [sys.executable, p.manage, "runserver", f"127.0.0.1:{port}"],
    "gthread": lambda port, p: [
        sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "64",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", *no_control_socket(), p.wsgi,
    ],
    "gevent": lambda port, p: [
        sys.executable, "-m", "gunicorn", "-k", "gevent", "--worker-connections", "2000",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", *no_control_socket(), p.wsgi,
    ],
    "uwsgi-threads": lambda port, p: uwsgi(port, p, "--threads", "64"),
    "uwsgi-gevent": lambda port, p: uwsgi(port, p, "--gevent", "1000", "--gevent-early-monkey-patch"),
    # ASGI servers, with the project's asgi.py (dwebsocket.asgi.get_asgi_application).
    "uvicorn": lambda port, p: [
        sys.executable, "-m", "uvicorn", "--ws", "wsproto", "--host", "127.0.0.1",
        "--port", str(port), "--no-access-log", p.asgi,
    ],
    "daphne": lambda port, p: [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), p.asgi],
    "hypercorn": lambda port, p: [sys.executable, "-m", "hypercorn", "-b", f"127.0.0.1:{port}", p.asgi],
}

WSGI_SERVERS = ("runserver", "gthread", "gevent", "uwsgi-threads", "uwsgi-gevent")
ASGI_SERVERS = ("uvicorn", "daphne", "hypercorn")

# What an ASGI server passes between the client and the application differs;
# these are the gaps, measured by the tests and listed in docs/servers.md.
# Every server not named in a set does the thing.
LIMITS = {
    # the close code the client sent does not reach the view (it sees 1000 or 1006)
    "no_client_close_code": {"hypercorn"},
    # the reason in the client's close frame does not reach the view
    "no_client_close_reason": {"daphne", "hypercorn"},
    # only close codes 1000 and 3000-4999 can be sent (others close with 1000),
    # and without a reason
    "close_codes_1000_and_3000_only": {"daphne"},
    # a refused handshake is answered 403, whatever response the view gave
    # (no "websocket.http.response" ASGI extension)
    "no_denial_response": {"daphne"},
    # empty text messages are not sent
    "no_empty_message": {"daphne"},
    # the server itself drops a connection whose message is over 1 MiB, without a close frame
    "drops_messages_over_1mib": {"daphne"},
    # a permessage-deflate offer with a parameter that is not a number: the server
    # hides it from the application and fails its own accept, closing the
    # connection without an answer
    "drops_malformed_deflate_offer": {"uvicorn"},
    # a non-ASCII Sec-WebSocket-Extensions or -Protocol header fails in the
    # server's own parser (wsproto's), before the application: a traceback in
    # its log, no answer
    "fails_on_non_ascii_token_headers": {"uvicorn"},
}


def limited(kind: str, limit: str) -> bool:
    return kind in LIMITS[limit]

# Servers dwebsocket refuses with a clear error; started by the tests of that error.
UNSUPPORTED = {
    "uwsgi-processes": lambda port, p: uwsgi(port, p, "--processes", "1"),
    # gevent patches the standard library after the app is loaded: dwebsocket's locks are real ones
    "uwsgi-late-gevent": lambda port, p: uwsgi(port, p, "--gevent", "100", "--gevent-monkey-patch"),
    "uwsgi-router-without-websockets": lambda port, p: uwsgi(port, p, "--threads", "8", http="--http"),
    "gunicorn-sync": lambda port, p: [
        sys.executable, "-m", "gunicorn", "-k", "sync", "-b", f"127.0.0.1:{port}", *no_control_socket(), p.wsgi,
    ],
}


# Other ways to run a supported server, started by the tests of that way.
VARIANTS = {
    # uWSGI's HTTP router process in front of the workers, told to pass WebSockets on
    "uwsgi-router": lambda port, p: uwsgi(port, p, "--threads", "8", "--http-websockets", http="--http"),
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
        stop_process_group(self.process)

    @property
    def main_pid(self) -> int:
        """The server's own first process (gunicorn's master, manage.py's autoreloader, ...):
        :attr:`process` is the ``timeout`` that runs it."""
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
            return int(children.read().split()[0])


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop *process*, started with start_new_session=True, and every process of its group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def start_server(
    kind: str, env: dict[str, str] | None = None, project: str = "tests", migrate: bool = False,
    port: int | None = None, max_seconds: int = MAX_SECONDS, args: tuple[str, ...] = (),
) -> Iterator[RunningServer]:
    """Start a server of *kind* (see SERVERS) serving *project*; stop it on exit.

    With *migrate*, the project's database (a fresh SQLite file) is migrated first.
    *args* go at the end of the server's command line (a later option wins).
    """
    port = port or free_port()
    proj = PROJECTS[project]
    log = tempfile.NamedTemporaryFile(prefix=f"dws-{kind}-", suffix=".log", delete=False)
    full_env = {
        **os.environ,
        "PYTHONPATH": python_path(proj.directory),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": proj.settings,
        "DWS_TEST_DB": str(Path(tempfile.gettempdir()) / f"dws-{port}.sqlite3"),
        **(env or {}),
    }
    if migrate:
        subprocess.run(
            [sys.executable, proj.manage, "migrate", "--noinput", "-v", "0"],
            cwd=proj.directory, env=full_env, check=True, timeout=120,
        )
    process = subprocess.Popen(
        ["timeout", "-k", "5", str(max_seconds), *{**SERVERS, **VARIANTS, **UNSUPPORTED}[kind](port, proj), *args],
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


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server (again, on the same port), and wait until it answers."""
        self.process = subprocess.Popen(
            ["timeout", "-k", "5", str(MAX_SECONDS), "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start (is the Debian package installed?)")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill redis-server at once (SIGKILL): an outage; :meth:`start` brings it back empty."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused one too
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def pause(self) -> None:
        """Freeze redis-server (SIGSTOP): a hung Redis, which accepts connections and never answers."""
        assert self.process is not None and self.process.poll() is None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused redis-server go on (SIGCONT), with its data and connections."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)


@contextmanager
def start_redis() -> Iterator[RedisServer]:
    """A redis-server of its own on a free 127.0.0.1 port, stopped on exit."""
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _redis_process(args: list[str], cwd: Path) -> subprocess.Popen:
    """One redis-server (or sentinel) under ``timeout``, in a process group of its own."""
    return subprocess.Popen(
        ["timeout", "-k", "5", str(MAX_SECONDS), "redis-server", *args],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _until(ready: Callable[[], bool], deadline: float, failure: str, pause: float = 0.1) -> None:
    """Wait until *ready()* holds; :class:`RuntimeError` with *failure* once ``time.monotonic()`` passes *deadline*."""
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(pause)


def _redis_cli(port: int, *args: str, timeout: float = 10) -> str:
    """What ``redis-cli -p PORT ARGS`` printed ("" if it failed)."""
    try:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGCONT)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class RedisCluster:
    """A Redis Cluster of ``len(ports) // (replicas + 1)`` masters, each with *replicas* replicas, on loopback."""

    ports: list[int]
    processes: list[subprocess.Popen]
    directory: Path

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL that names it (two nodes: either finds the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def kill(self, port: int) -> None:
        """SIGKILL the node on *port*, by its PID: its replica takes over after the node timeout (2 s)."""
        _kill(self.processes[self.ports.index(port)])

    def stop(self) -> None:
        for process in self.processes:
            _kill(process)


@contextmanager
def start_redis_cluster(masters: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    """Start a cluster with ``redis-cli --cluster create``; wait for ``cluster_state:ok`` everywhere; stop it on exit.

    One master alone (the shard-scaling benchmark's baseline) takes every
    slot with ``CLUSTER ADDSLOTSRANGE``.

    Each node has its own directory (nodes.conf) and an explicit cluster bus
    port (``--cluster-port``), both free loopback ports.
    """
    directory = Path(tempfile.mkdtemp(prefix="dws-cluster-"))
    count = masters * (replicas + 1)
    ports = [free_port() for _ in range(count)]
    cluster = RedisCluster(ports, [], directory)
    try:
        for port in ports:
            node = directory / str(port)
            node.mkdir()
            cluster.processes.append(_redis_process([
                "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-port", str(free_port()), "--cluster-config-file", str(node / "nodes.conf"),
                "--cluster-node-timeout", "2000", "--cluster-replica-validity-factor", "0",
                "--save", "", "--appendonly", "no",
            ], node))
        deadline = time.monotonic() + 20
        for port in ports:
            while "PONG" not in _redis_cli(port, "PING", timeout=2):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start in cluster mode (is the Debian package installed?)")
                time.sleep(0.05)
        if masters >= 3:
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
        elif masters == 1 and replicas == 0:  # --cluster create wants 3 masters: one node takes every slot
            if "OK" not in _redis_cli(ports[0], "CLUSTER", "ADDSLOTSRANGE", "0", "16383"):
                raise RuntimeError("CLUSTER ADDSLOTSRANGE failed on the one node")
        else:
            raise ValueError("a cluster of 3 masters or more, or of 1 master without replicas")
        deadline = time.monotonic() + 30
        _until(
            lambda: all("cluster_state:ok" in _redis_cli(p, "CLUSTER", "INFO", timeout=2) for p in ports),
            deadline, "the cluster did not reach cluster_state:ok within 30 s",
        )
        # Each replica synced with its master (else it could not take over from it).
        _until(lambda: all(
            "role:master" in (info := _redis_cli(p, "INFO", "replication", timeout=2))
            or "master_link_status:up" in info
            for p in ports
        ), deadline, "the cluster's replicas did not sync within 30 s")
        yield cluster
    finally:
        cluster.stop()


@dataclass
class RedisSentinels:
    """One master, its replica and three sentinels watching it as service ``svc``, on loopback."""

    master_port: int
    replica_port: int
    sentinel_ports: list[int]
    servers: dict[int, subprocess.Popen]  # port -> its redis-server
    sentinels: list[subprocess.Popen]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + "/svc"

    def master(self) -> int:
        """The port of the master the sentinels name now."""
        for port in self.sentinel_ports:
            answer = _redis_cli(port, "SENTINEL", "get-master-addr-by-name", "svc", timeout=2).split()
            if len(answer) == 2:
                return int(answer[1])
        raise RuntimeError("no sentinel names a master")

    def kill(self, port: int) -> None:
        """SIGKILL the redis-server on *port*, by its PID (a crash: no goodbye to anyone)."""
        _kill(self.servers[port])

    def stop(self) -> None:
        for process in [*self.servers.values(), *self.sentinels]:
            _kill(process)


@contextmanager
def start_redis_sentinels() -> Iterator[RedisSentinels]:
    """Start the master, the replica and 3 sentinels (quorum 2, down after 1 s); stop all on exit."""
    directory = Path(tempfile.mkdtemp(prefix="dws-sentinel-"))
    master, replica = free_port(), free_port()
    sentinel_ports = [free_port() for _ in range(3)]
    found = RedisSentinels(master, replica, sentinel_ports, {}, [])
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    try:
        found.servers[master] = _redis_process(["--port", str(master), *base], directory)
        found.servers[replica] = _redis_process(
            ["--port", str(replica), "--replicaof", "127.0.0.1", str(master), *base], directory
        )
        _until(
            lambda: "master_link_status:up" in _redis_cli(replica, "INFO", "replication", timeout=2),
            time.monotonic() + 20, "the replica did not sync with the master within 20 s",
        )
        for port in sentinel_ports:
            conf = directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor svc 127.0.0.1 {master} 2\n"
                "sentinel down-after-milliseconds svc 1000\n"
                "sentinel failover-timeout svc 5000\n"
                "sentinel parallel-syncs svc 1\n"
            )
            found.sentinels.append(_redis_process([str(conf), "--sentinel"], directory))
        # Ready once every sentinel knows the replica and the other two sentinels.
        _until(lambda: all(
            "num-other-sentinels" in (info := _redis_cli(p, "SENTINEL", "master", "svc", timeout=2))
            and info.split("num-other-sentinels\n", 1)[1].split("\n", 1)[0].strip() == "2"
            and info.split("num-slaves\n", 1)[1].split("\n", 1)[0].strip() == "1"
            for p in sentinel_ports
        ), time.monotonic() + 20, "the sentinels did not find each other and the replica within 20 s", pause=0.2)
        yield found
    finally:
        found.stop()
