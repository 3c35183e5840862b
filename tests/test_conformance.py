"""The Autobahn TestSuite's quick subset (cases 1-8 and 10) against each server.

The full run (cases 1-10, 12, 13; all 517) takes 10-15 minutes a server:
``scripts/conformance.sh --cases full``.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conformance.run import QUICK, SERVER_FAILURES, run_cases

from .servers import SERVERS


@pytest.mark.conformance
@pytest.mark.parametrize("kind", list(SERVERS))
def test_autobahn_quick_subset_has_no_failures(kind, tmp_path):
    assert os.environ.get("WSTEST") or shutil.which("wstest"), (
        "The Autobahn TestSuite is missing: run scripts/test.sh, which installs it."
    )
    counts = run_cases(kind, QUICK, tmp_path / kind, timeout=600)
    # Only the cases the server fails by itself (daphne: empty messages) may fail.
    assert counts.get("FAILED", 0) == len(SERVER_FAILURES.get(kind, ())), counts
    assert counts.get("SERVER_FAILED", 0) == counts.get("FAILED", 0), counts
    assert counts.get("TRACEBACKS", 0) == 0, counts
    total = sum(counts[k] for k in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"))
    assert total == 247, counts  # every case of the subset ran
    assert counts["OK"] >= 230, counts
