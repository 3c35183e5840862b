"""``DWS_SERVERS``: the ends of CI's matrix run the server tests on fewer servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collect(servers: str, *paths: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DWS_SERVERS": servers}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_only_the_named_server_kinds_are_collected() -> None:
    result = _collect("gthread,uvicorn", "tests/test_reading.py", "tests/test_polling.py", "tests/test_groups.py")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    server_ids = [i for i in ids if "[" in i]
    assert any("gthread" in i for i in server_ids) and any("uvicorn" in i for i in server_ids)
    for other in ("runserver", "gevent", "uwsgi", "daphne", "hypercorn"):
        assert not [i for i in server_ids if other in i], other
    # a test parametrized with two kinds runs only when both are kept
    assert any("gthread+uvicorn" in i for i in ids)
    assert "deselected" in result.stdout


def test_an_unknown_server_kind_is_a_usage_error() -> None:
    result = _collect("gthread,tornado", "tests/test_reading.py")
    assert result.returncode != 0
    assert "DWS_SERVERS names unknown server kinds: tornado" in result.stdout + result.stderr
