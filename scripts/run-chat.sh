#!/usr/bin/env bash
# Runs the chat example on a fresh machine: a virtualenv with dwebsocket installed
# from this checkout, SQLite, no Redis. Open http://127.0.0.1:8000/ in two windows.
#
#   scripts/run-chat.sh              # runserver on 127.0.0.1:8000
#   PORT=9000 scripts/run-chat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venvs/chat
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -e .
cd examples/chat
"../../$venv/bin/python" manage.py migrate --noinput -v 0
exec "../../$venv/bin/python" manage.py runserver "127.0.0.1:${PORT:-8000}"
