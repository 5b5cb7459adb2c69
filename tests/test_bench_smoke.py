"""Smoke test of the link benchmark: it runs and reports positive rates (nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.system
def test_bench_link_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_link", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["baseline"]["rx_per_s"] > 0
    assert result["baseline_batched"]["rx_per_s"] > 0
    assert result["encrypted"]["rx_per_s"] > 0
    assert result["ratio"] > 0
    assert result["ratio_asyncio"] > 0
    assert result["ratio_batched"] > 0
    assert result["handshakes"]["responder_per_s"] > 0
    assert result["handshakes"]["initiator_per_s"] > 0
    assert result["cookie_path"]["cookie_replies_per_s"] > 0
