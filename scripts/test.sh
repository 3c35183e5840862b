#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Python packages in virtualenvs under .venvs/, the Autobahn TestSuite), then runs
# pytest once per supported Django (4.2 LTS on Python 3.10, 5.2 LTS on 3.11, 6.0 on 3.13).
# The Django 4.2 run uses the oldest releases dwebsocket supports of redis-py and
# wsproto; the others the newest (defaults change: redis-py 8's socket timeout).
#
#   scripts/test.sh                 # the whole matrix
#   scripts/test.sh -k seed         # extra arguments go to pytest
#   DWS_MATRIX="5.2:3.11" scripts/test.sh
#   DWS_SERVERS=gthread,uvicorn scripts/test.sh   # server tests on these kinds only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh

MATRIX=${DWS_MATRIX:-"4.2:3.10 5.2:3.11 6.0:3.13"}
only_servers=${DWS_SERVERS:-}

# Debian packages the tests start: redis-server (the Redis broker's tests; 7.0
# or later for the Redis Cluster tests' sharded pub/sub), redis-cli (from
# redis-tools: it creates the test cluster) and
# chromium (the browser tests, driven by Playwright; its own browser download
# is not used); gcc builds uWSGI, which PyPI has only as source (about a minute
# a virtualenv).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  else
    echo "The tests need: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

scripts/conformance.sh --setup-only   # the Autobahn TestSuite, for tests/test_conformance.py
export WSTEST="$PWD/.venvs/autobahn/bin/wstest"

status=0
for entry in $MATRIX; do
  django=${entry%%:*}
  pyver=${entry##*:}
  python=$(find_python "$pyver")
  if [ -z "$python" ]; then
    echo "Python $pyver is needed for Django $django; install it (pyenv install $pyver)." >&2
    exit 1
  fi
  venv=".venvs/django-$django-py$pyver"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  pins=()
  if [ "$django" = "4.2" ]; then pins=("redis==5.0.*" "wsproto==1.2.*" "websockets==14.*"); fi  # the oldest supported
  "$venv/bin/python" -m pip install -q -e . -r requirements/test.txt "Django~=$django.0" ${pins[@]+"${pins[@]}"}
  echo "=== Django $("$venv/bin/python" -m django --version) on Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')," \
    "redis-py $("$venv/bin/python" -c 'import redis; print(redis.__version__)')," \
    "wsproto $("$venv/bin/python" -c 'import wsproto; print(wsproto.__version__)')," \
    "websockets $("$venv/bin/python" -c 'import websockets; print(websockets.__version__)')"
  # The Autobahn cases test the protocol, which does not change with Django:
  # they run once, with the LTS in the middle of the matrix.
  # So do the tests of each server kind: the versions at the ends of the matrix
  # run the server tests on one server of each family (the development server,
  # gunicorn's threads, its gevent, and uvicorn for ASGI); the middle one runs
  # them on all eight (uWSGI's two modes, daphne and hypercorn too).
  marker=()
  servers=$only_servers
  if [ "$django" != "5.2" ] && [ -z "${DWS_MATRIX:-}" ]; then
    marker=(-m "not conformance")
    servers=${only_servers:-runserver,gthread,gevent,uvicorn}
  fi
  DWS_SERVERS="$servers" "$venv/bin/python" -m pytest --durations=25 "${marker[@]}" "$@" || status=$?
  if [ "$django" = "5.2" ]; then
    echo "=== mypy (the public API is typed; py.typed ships) and ruff (unused names, syntax)"
    "$venv/bin/python" -m pip install -q "mypy>=1.10" "django-stubs>=5" "ruff>=0.6"
    "$venv/bin/python" -m mypy --ignore-missing-imports src/dwebsocket || status=$?
    "$venv/bin/python" -m ruff check --select F,E9 src tests bench conformance examples || status=$?
  fi
done
exit $status
