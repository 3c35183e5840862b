"""Users' own tests with dwebsocket.testing, run the way users run them: Django's test runner."""

from __future__ import annotations

import os
import subprocess
import sys

from .servers import ROOT, python_path


def run_django_tests(args, cwd, settings):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "PYTHONPATH": python_path(ROOT)}
    return subprocess.run(
        [sys.executable, *args, "-v", "2"], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=300,
    )


def test_a_testcase_with_the_database_and_logged_in_users():
    done = run_django_tests(["-m", "django", "test", "tests.project.user_tests"], ROOT, "tests.project.settings")
    assert done.returncode == 0, done.stderr
    assert "Ran 5 tests" in done.stderr and "\nOK" in done.stderr


def test_the_chat_examples_own_tests():
    done = run_django_tests(["manage.py", "test", "chat"], ROOT / "examples" / "chat", "chatsite.settings")
    assert done.returncode == 0, done.stderr
    assert "Ran 3 tests" in done.stderr and "\nOK" in done.stderr
