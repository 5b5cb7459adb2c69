"""Smoke tests of the benchmarks: they run and report sane results (nothing about speed)."""

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


@pytest.mark.system
def test_bench_dht_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_dht", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["params"]["nodes"] == 300
    assert result["setup"]["join_failures"] == 0
    assert result["setup"]["peak_rss_mib"] > 0
    assert [row["churn"] for row in result["lookups"]] == [0.0, 0.2]
    for row in result["lookups"]:
        assert row["lookups"] == 50
        assert row["success"] > 0
        assert row["hops_median"] >= 1
        assert row["latency_s_median"] > 0
    # Churn costs timeouts: the lookups at 20% churn run on the virtual clock through them.
    assert result["lookups"][1]["timeouts_median"] > 0
    for row in result["exits"]["rows"]:
        assert row["found_min"] >= 1
        assert row["wrong"] == 0
        assert row["total_s_median"] > 0
        assert row["rpcs_median"] > 0
    assert result["wall_s"] > 0


@pytest.mark.system
def test_bench_circuit_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_circuit", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    loopback, delayed = result["build"]
    for row in (loopback, delayed):
        assert row["builds"] == 10
        assert row["failed"] == 0
        assert 0 < row["build_s_median"] <= row["build_s_p95"]
        assert row["path_rtt_links_s"] > 0
        assert row["path_rtt_probe_s"] > 0
        assert isinstance(row["meets_target"], bool)
    # The delay hook works: 10 ms each way on three links is at least 60 ms of round trip.
    assert delayed["delay_s"] == 0.010
    assert delayed["path_rtt_links_s"] >= 0.060
    assert delayed["build_s_median"] >= 0.060
    forward = result["forward"]
    for key in ("link_forward", "relay_forward"):
        assert forward[key]["middle_per_s"] > 0
        assert forward[key]["middle_cpu_us"] > 0
        assert forward[key]["sink_per_s"] > 0
    assert forward["ratio"] > 0
    assert forward["bench_link"]["rx_per_s"] > 0
    assert forward["breakdown"]["manager_us"] > forward["breakdown"]["onion_us"] > 0
    memory = result["memory"]
    assert memory["circuits"] == 1000
    assert memory["built"]["opened"] == 1000
    assert memory["traffic"]["replies"] > 0
    entry = memory["relays"]["entry"]
    assert 0 < entry["traced_built"] < 100_000
    assert entry["replay_entries"] == 1000
    assert isinstance(memory["meets_target"], bool)
