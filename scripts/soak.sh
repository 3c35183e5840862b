#!/usr/bin/env bash
# A soak, not a CI test: a chat of 1000 members on 2 uvicorn processes sharing a redis-server for 60 s,
# then the same with Redis restarted mid-run and with one worker killed (python -m bench.soak; --help).
#
#   scripts/soak.sh                                   # the three scenarios, 1000 members, 60 s each
#   scripts/soak.sh --members 100 --duration 10       # a smoke run
exec "$(dirname "$0")/bench.sh" soak "$@"
