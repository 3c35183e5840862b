#!/usr/bin/env bash
# Protocol conformance: the Autobahn TestSuite's fuzzing client against dwebsocket's
# echo view on each WSGI server, with OK / NON-STRICT / FAILED counts per server.
#
#   scripts/conformance.sh                    # quick: cases 1-8 and 10 (seconds)
#   scripts/conformance.sh --cases full       # 1-10, 12, 13: all 517 cases (20-40 min a server)
#   scripts/conformance.sh --servers gevent --cases 7.1.5,9.1.1
#
# The TestSuite is Python 2 code: it is installed into .venvs/autobahn from pyenv's 2.7.18.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh

AB=.venvs/autobahn
if [ ! -x "$AB/bin/wstest" ]; then
  py27=$(find_python 2.7)
  if [ -z "$py27" ]; then
    echo "The Autobahn TestSuite needs Python 2.7 (pyenv install 2.7.18)." >&2
    exit 1
  fi
  py3=$(find_python 3.11); py3=${py3:-python3}
  "$py3" -m venv .venvs/virtualenv
  .venvs/virtualenv/bin/pip install -q virtualenv==20.21.1
  .venvs/virtualenv/bin/virtualenv -q -p "$py27" "$AB"
  "$AB/bin/pip" install -q autobahntestsuite autobahn==0.10.9 Twisted==19.10.0 2>&1 | grep -v "^WARNING\|DEPRECATION" || true
  "$AB/bin/wstest" --help >/dev/null
fi
# wsaccel does the TestSuite's masking and UTF-8 checks in C: the full run's
# large compressed cases (12.*, 13.*) go about 3x faster. Optional (it needs a
# C compiler); without it the run is only slower.
if ! "$AB/bin/python" -c "import wsaccel" 2>/dev/null; then
  "$AB/bin/pip" install -q wsaccel >/dev/null 2>&1 || echo "wsaccel could not be built; the Autobahn run will be slower." >&2
fi
[ "${1:-}" = "--setup-only" ] && exit 0

venv=.venvs/conformance
if [ ! -x "$venv/bin/python" ]; then
  py3=$(find_python 3.11); py3=${py3:-python3}
  "$py3" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -e . -r requirements/test.txt
WSTEST="$PWD/$AB/bin/wstest" exec "$venv/bin/python" -m conformance.run "$@"
