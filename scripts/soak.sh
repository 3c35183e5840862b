#!/usr/bin/env bash
# A soak, not a CI test: a chat of 1000 members on 2 uvicorn processes sharing a redis-server for 60 s,
# then the same with Redis restarted mid-run and with one worker killed (python -m bench.soak; --help).
#
#   scripts/soak.sh                                   # the three scenarios, 1000 members, 60 s each
#   scripts/soak.sh --members 100 --duration 10       # a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
if ! command -v redis-server >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null
fi
venv=.venvs/bench
if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python 3.11); "${py:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -e . -r requirements/bench.txt
exec "$venv/bin/python" -m bench.soak "$@"
