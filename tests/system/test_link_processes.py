"""System tests: real `meshnode` processes on loopback, driven through the CLI.

Every process started here is stopped by its PID in a finalizer. Traffic goes only to
127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode.contact import Contact
from meshnode.identity import b32encode
from meshnode.link import constants as C

pytestmark = pytest.mark.system

MESHNODE = [sys.executable, "-m", "meshnode"]


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHNODE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class RunningNode:
    def __init__(self, proc: subprocess.Popen[str], ready: dict[str, str], log_path: Path):
        self.proc = proc
        self.ready = ready
        self.log_path = log_path

    @property
    def contact(self) -> str:
        return self.ready["contact"]

    def stop(self) -> list[dict]:
        """SIGTERM, wait, and return the JSON log lines."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.logs()

    def logs(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines


@pytest.fixture
def start_node(tmp_path):
    started: list[RunningNode] = []

    def start(name: str, host: str = "127.30.0.1", *extra: str) -> RunningNode:
        home = tmp_path / name
        port = free_port(host)
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        res = cli("init", "--home", str(home), "--listen", listen)
        assert res.returncode == 0, res.stderr
        log_path = tmp_path / f"{name}.log"
        log_file = log_path.open("w")
        proc = subprocess.Popen(
            [*MESHNODE, "--log-format", "json", "run", "--home", str(home), *extra],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        log_file.close()
        node = RunningNode(proc, {}, log_path)
        started.append(node)
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY "), f"no READY line: {line!r} {log_path.read_text()}"
        node.ready = dict(part.split("=", 1) for part in line.split()[1:])
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)


def test_ping_between_processes(start_node):
    node = start_node("a")
    res = cli("ping", "-c", "3", "-i", "0.05", node.contact)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "handshake with" in res.stdout
    assert "3 sent, 3 received, 0% loss" in res.stdout
    assert f"node id {node.ready['node_id']}" in res.stdout
    logs = node.stop()
    stopped = next(line for line in logs if line["event"] == "node.stopped")
    assert stopped["rx_ping"] == 3 and stopped["handshake_responded"] == 1
    connected = [line for line in logs if line["event"] == "link.peer_connected"]
    assert len(connected) == 1 and connected[0]["initiator"] is False


def test_ipv6_loopback(start_node):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        free_port("::1")
    except OSError:
        pytest.skip("::1 is not configured")
    node = start_node("v6", "::1")
    assert node.contact.startswith("[::1]:")
    res = cli("ping", "-c", "2", "-i", "0.05", node.contact)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 received" in res.stdout


def test_bootstrap_connects_two_nodes(start_node):
    a = start_node("a")
    b = start_node("b", "127.31.0.1", "--bootstrap", a.contact)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(line["event"] == "link.peer_connected" for line in a.logs()):
            break
        time.sleep(0.1)
    peers_a = [line for line in a.logs() if line["event"] == "link.peer_connected"]
    assert [p["node_id"] for p in peers_a] == [b.ready["node_id"]]
    b_logs = b.stop()
    peers_b = [line for line in b_logs if line["event"] == "link.peer_connected"]
    assert [p["node_id"] for p in peers_b] == [a.ready["node_id"]]
    assert peers_b[0]["initiator"] is True


def test_wrong_key_and_dead_port_fail_with_one_line(start_node):
    node = start_node("a")
    other_key = b32encode(bytes.fromhex("11" * 31 + "22"))
    host_port = node.contact.split("#")[0]
    res = cli("ping", "-c", "1", "--timeout", "2", f"{host_port}#{other_key}")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    [line] = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith("meshnode: error: no handshake response from")
    dead = f"127.30.0.1:{free_port('127.30.0.1')}#{node.contact.split('#')[1]}"
    res = cli("ping", "-c", "1", "--timeout", "2", dead)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    stopped = next(ln for ln in node.stop() if ln["event"] == "node.stopped")
    assert stopped["drop_bad_mac1"] >= 1  # the wrong-key initiations were dropped unanswered


def _garbage(rng: random.Random, i: int) -> bytes:
    kind = i % 6
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 1500))
    if kind == 1:
        return bytes([C.MSG_INITIATION]) + rng.randbytes(C.INITIATION_BYTES - 1)
    if kind == 2:
        return bytes([C.MSG_RESPONSE]) + rng.randbytes(C.RESPONSE_BYTES - 1)
    if kind == 3:
        return bytes([C.MSG_COOKIE_REPLY]) + rng.randbytes(C.COOKIE_REPLY_BYTES - 1)
    if kind == 4:
        return bytes([C.MSG_TRANSPORT]) + rng.randbytes(rng.randrange(0, 1400))
    return rng.randbytes(rng.randrange(1500, 2000))  # oversized


def test_garbage_flood_then_handshake_and_ping(start_node):
    node = start_node("a")
    contact = Contact.parse(node.contact)
    rng = random.Random(1234)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.40.0.1", 0))
        for i in range(6000):
            s.sendto(_garbage(rng, i), (contact.host, contact.port))
            sent += 1
            if i % 200 == 0:
                time.sleep(0.002)  # let the node drain; we test handling, not kernel drops
    res = cli("ping", "-c", "3", "-i", "0.05", node.contact)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 received" in res.stdout
    logs = node.stop()
    assert node.proc.returncode == 0
    stopped = next(ln for ln in logs if ln["event"] == "node.stopped")
    drops = {k: v for k, v in stopped.items() if k.startswith("drop_")}
    # Everything that reached the node was refused and counted; the kernel may drop a few.
    assert sum(drops.values()) >= sent * 0.9, drops
    assert stopped["rx_datagrams"] - sum(drops.values()) < 50
    for reason in ("drop_bad_length", "drop_bad_mac1", "drop_unknown_index"):
        assert drops.get(reason, 0) > 0, drops
    assert not any(ln.get("level") in ("error", "critical") for ln in logs)


def test_info_logs_carry_no_peer_addresses(start_node):
    node = start_node("a")
    res = cli("ping", "-c", "1", node.contact)
    assert res.returncode == 0, res.stdout + res.stderr
    logs = node.stop()
    assert any(line["event"] == "link.peer_connected" for line in logs)
    for line in logs:
        # control.started names our own control API URL (127.0.0.1 too), not a peer's.
        if line.get("level") != "debug" and line["event"] != "control.started":
            assert "127.0.0.1" not in json.dumps(line), line  # the pinger's address
