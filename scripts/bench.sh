#!/usr/bin/env bash
# Runs a benchmark under bench/ side by side with the alternatives, in a virtualenv
# of its own (.venvs/bench); needs redis-server (installed as for the tests).
#
#   scripts/bench.sh fanout                     # python -m bench.fanout: broadcast to 1000 members in one
#                                               # process, vs flask-sock, a bare ASGI app and Channels
#   scripts/bench.sh fanout --members 50 --messages 5 --duration 3 --rounds 1 --burst 200   # a smoke run
#   scripts/bench.sh fanout --configs gthread,flask-gthread    # some configurations (--help lists them)
#   scripts/bench.sh fanout --configs redis,channels-redis     # 2 processes sharing a redis-server
#   scripts/bench.sh echo                       # python -m bench.echo: round trips, vs flask-sock and Channels
#   scripts/bench.sh echo --clients 50 --duration 5
#   scripts/bench.sh echo --metrics             # Prometheus metrics on vs off (every other run: off)
#   scripts/bench.sh fanout --configs metrics   # the same for the fan-out: gthread, gevent, uvicorn-async
#   scripts/bench.sh idle --members 10000          # python -m bench.idle: 10,000 idle connections in one process:
#                                               # KiB each, idle CPU, and whether all still answer a broadcast
#   scripts/bench.sh storm                      # python -m bench.storm: 1000 dwebsocket.v1 members cut at once
#                                               # while broadcasts go on; all reconnect with their resume: time
#                                               # until the last is whole again, lost and duplicated (0 and 0)
#   scripts/bench.sh storm --configs all        # adds gunicorn gthread and the history-off contrasts
#   scripts/bench.sh storm --members 50 --steady 1 --after 1 --drain 1   # a smoke run
#   scripts/bench.sh shards                     # python -m bench.shards: broadcast throughput across 2 processes
#                                               # on a 1-shard vs a 3-shard Redis Cluster (needs redis-cli), each
#                                               # redis-server in a CPU cgroup capped at --shard-cpu 0.05 of a core
#                                               # (needs root; --shard-cpu 0: no quota)
#   scripts/bench.sh shards --groups 10 --messages 20 --rounds 1   # a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
name=${1:?which benchmark: fanout, echo, idle, soak, storm or shards}
shift
if ! command -v redis-server >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null
fi
venv=.venvs/bench
if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python 3.11); "${py:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -e . -r requirements/bench.txt
exec "$venv/bin/python" -m "bench.$name" "$@"
