"""Run the Autobahn TestSuite's fuzzing client against dwebsocket on real servers.

    python -m conformance.run [--cases "1.*,2.*"] [--servers runserver,gthread,gevent]

Starts each server (runserver, gunicorn gthread and gevent, uvicorn, daphne,
hypercorn) on a free 127.0.0.1 port serving the echo view of the test project, runs ``wstest -m fuzzingclient`` (Autobahn TestSuite, Python 2.7)
against it, and prints OK / NON-STRICT / INFORMATIONAL / UNIMPLEMENTED / FAILED
counts per server. Exits 1 if any case FAILED, except the cases a server fails
by itself (SERVER_FAILURES). Reports go to
``conformance/reports/<server>/index.html``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import SERVERS, start_server  # noqa: E402

# Cases a server fails by itself, whatever the application does: daphne never
# sends an empty message (it drops "websocket.send" events whose text or bytes
# is empty), which these cases echo.
SERVER_FAILURES = {"daphne": {"1.1.1", "1.2.1", "6.1.1", "6.1.2"}}

QUICK = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "10.*"]
FULL = QUICK[:-1] + ["9.*", "10.*", "12.*", "13.*"]


def wstest_path() -> str:
    found = os.environ.get("WSTEST") or shutil.which("wstest")
    if not found:
        sys.exit("wstest not found: run scripts/conformance, which installs the Autobahn TestSuite.")
    return found


def run_cases(server: str, cases: list[str], out: Path, timeout: float) -> Counter:
    env = {"DJANGO_SETTINGS_MODULE": "conformance.settings"}
    # The server must outlive the whole run (a full run takes 20-40 minutes).
    with start_server(server, env=env, max_seconds=int(timeout) + 60) as running:
        spec = {
            "outdir": str(out),
            "servers": [{"agent": f"dwebsocket-{server}", "url": f"ws://127.0.0.1:{running.port}/echo/"}],
            "cases": cases,
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        out.mkdir(parents=True, exist_ok=True)
        spec_file = out / "fuzzingclient.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        subprocess.run(
            [wstest_path(), "-m", "fuzzingclient", "-s", str(spec_file)],
            cwd=out, check=True, timeout=timeout,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        tracebacks = running.log_text().count("Traceback")
    index = json.loads((out / "index.json").read_text())
    results = next(iter(index.values()))
    counts = Counter(result["behavior"] for result in results.values())
    failed = sorted(case for case, result in results.items() if result["behavior"] == "FAILED")
    known = SERVER_FAILURES.get(server, set())
    if failed:
        print(f"  {server}: FAILED cases: {', '.join(failed)}")
    if known & set(failed):
        print(f"  {server}: of which the server's own: {', '.join(sorted(known & set(failed)))}")
        counts["SERVER_FAILED"] = len(known & set(failed))
    if tracebacks:
        print(f"  {server}: the server logged {tracebacks} traceback(s)")
        counts["TRACEBACKS"] = tracebacks
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="quick", help='"quick" (1-8, 10), "full" (1-10, 12, 13) or a comma list like "1.*,7.1.5"')
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {', '.join(SERVERS)}")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per server")
    args = parser.parse_args()
    cases = {"quick": QUICK, "full": FULL}.get(args.cases) or args.cases.split(",")
    bad = 0
    print(f"Autobahn TestSuite fuzzingclient, cases {', '.join(cases)}")
    for server in args.servers.split(","):
        started = time.monotonic()
        counts = run_cases(server, cases, ROOT / "conformance" / "reports" / server, args.timeout)
        took = time.monotonic() - started
        summary = " ".join(f"{key}={counts.get(key, 0)}" for key in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"))
        total = sum(counts[k] for k in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"))
        print(f"{server:12} {summary} total={total} ({took:.0f}s)")
        bad += counts.get("FAILED", 0) - counts.get("SERVER_FAILED", 0) + counts.get("TRACEBACKS", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
