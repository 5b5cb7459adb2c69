"""Circuits end to end: 7 `meshnode run` processes on loopback (4 relays, 2 exits, 1 client).

The client finds the relays through the DHT, `meshnode circuit build --hops 3 --json`
builds a circuit through three distinct nodes with per-hop RTTs from probes, and
`meshnode route --json` lists it. Then the middle relay's process is killed (SIGKILL):
the client's probes notice, the old circuit is reported failed (or destroyed), and a new
build avoids the dead relay. Every process started here is stopped by its PID; traffic
goes only to 127.0.0.0/8 (the nodes share 127.63.0.0/16, so the config relaxes the
subnet rule with ``[circuits] allow_same_subnet``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnode import crypto
from meshnode.config import ControlConfig, NodeConfig, Role
from meshnode.identity import Identity, b32encode
from meshnode.node import Node
from routing.onionkeys import KEYRING_FORMAT, OnionKeyring
from tests.support.procs import MESHNODE, api, cli, wait_for

pytestmark = pytest.mark.system

RELAYS = (0, 1, 2, 3)
EXITS = (4, 5)
CLIENT = 6
HOST = "127.63.0.{}"
PORT = 7700
CONVERGE_S = 40.0
EXTRA_CONFIG = """
[dht]
refresh_interval_s = 2.0
rpc_timeout_s = 1.0

[circuits]
allow_same_subnet = true
build_timeout_s = 3.0
probe_interval_s = 1.0
probe_timeout_s = 1.5
probe_failures = 2
"""


@dataclass
class Proc:
    index: int
    home: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    ready: dict[str, str] | None = None

    @property
    def node_id(self) -> str:
        assert self.ready is not None
        return self.ready["node_id"]

    @property
    def role(self) -> str:
        return "exit" if self.index in EXITS else "client" if self.index == CLIENT else "relay"


@pytest.fixture
def mesh(tmp_path: Path):
    nodes = [Proc(i, tmp_path / f"n{i}", tmp_path / f"n{i}.log") for i in range(CLIENT + 1)]
    for node in nodes:
        res = cli(
            "init", "--home", str(node.home), "--listen", f"{HOST.format(node.index + 1)}:{PORT}"
        )
        assert res.returncode == 0, res.stderr
        with (node.home / "config.toml").open("a") as f:
            f.write(EXTRA_CONFIG)

    def start(node: Proc, bootstrap: str | None) -> None:
        extra = ["--role", node.role, "--operator", f"op{node.index}"]
        if node.index in EXITS:
            extra += ["--region", "eu", "--country", "de"]
        if bootstrap:
            extra += ["--bootstrap", bootstrap]
        with node.log.open("a") as log:
            node.proc = subprocess.Popen(
                [*MESHNODE, "--log-format", "json", "run", "--home", str(node.home), *extra],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        line = node.proc.stdout.readline() if node.proc.stdout else ""
        assert line.startswith("READY "), f"no READY line: {line!r} {node.log.read_text()}"
        node.ready = dict(part.split("=", 1) for part in line.split()[1:])

    try:
        yield nodes, start
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(node.proc.pid, signal.SIGKILL)
                    node.proc.wait(timeout=10)


def build(client: Proc, *args: str) -> dict[str, Any]:
    res = cli("circuit", "build", "--home", str(client.home), "--json", *args, timeout=90)
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert isinstance(record, dict)
    return record


def test_client_builds_through_dht_relays_and_survives_a_dead_middle(mesh) -> None:
    nodes, start = mesh
    start(nodes[0], None)
    boot = nodes[0].ready["contact"]
    for node in nodes[1:]:
        start(node, boot)
    client = nodes[CLIENT]
    relays = {n.node_id: n for n in nodes if n.index != CLIENT}
    exits = {nodes[i].node_id for i in EXITS}

    def client_knows_every_relay() -> bool | str:
        res = cli("peers", "--home", str(client.home), "--json", timeout=20)
        if res.returncode != 0:
            return res.stderr
        seen = {p["node_id"] for p in json.loads(res.stdout)}
        return True if seen >= set(relays) else f"{len(seen & set(relays))}/{len(relays)} known"

    wait_for(
        "the client to list every relay and exit", client_knows_every_relay, timeout=CONVERGE_S
    )

    first = build(client, "--hops", "3")
    hops = first["hops"]
    ids = [h["node_id"] for h in hops]
    assert first["state"] == "open", first
    assert len(ids) == 3 and len(set(ids)) == 3
    assert set(ids) <= set(relays)
    assert ids[-1] in exits
    assert all(h["rtt_ms"] is not None and h["rtt_ms"] > 0 for h in hops), hops
    assert all(h["probes_answered"] >= 3 for h in hops), hops
    assert [h["operator"] for h in hops] == [f"op{relays[i].index}" for i in ids]
    assert [h["address"] for h in hops] == [relays[i].ready["listen"] for i in ids]
    assert first["build_ms"] is not None and first["build_ms"] < 3000

    # The text form names every hop.
    res = cli("route", "--home", str(client.home))
    assert res.returncode == 0, res.stderr
    assert all(i[:16] in res.stdout for i in ids)
    listed = json.loads(cli("route", "--home", str(client.home), "--json").stdout)
    assert [(c["id"], c["state"]) for c in listed] == [(first["id"], "open")]
    assert [h["node_id"] for h in listed[0]["hops"]] == ids

    # Each hop sealed its record with the onion key its descriptor advertises, which
    # it keeps in state/onion-keys.json (owner only).
    entry = relays[ids[0]]
    saved = entry.home / "state" / "onion-keys.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    keyring = OnionKeyring.from_json(saved.read_text())
    published = api(client, f"/v1/lookup/{entry.node_id}")
    assert published["onion_key"] == b32encode(keyring.publics()[0])
    assert published["next_onion_key"] == b32encode(keyring.publics()[1])

    # Relays and the exit counted the circuit.
    built = sum(api(relays[i], "/v1/status")["counters"].get("relay.built", 0) for i in ids)
    assert built == 3

    # The middle relay dies without a word.
    middle = relays[ids[1]]
    assert middle.proc is not None
    os.kill(middle.proc.pid, signal.SIGKILL)
    middle.proc.wait(timeout=10)

    def old_circuit_ended() -> bool | str:
        states = {c["id"]: c for c in api(client, "/v1/circuits")}
        old = states[first["id"]]
        return True if old["state"] in ("failed", "destroyed") else old["state"]

    wait_for("the client to see the old circuit fail", old_circuit_ended, timeout=20)
    old = next(c for c in api(client, "/v1/circuits") if c["id"] == first["id"])
    assert middle.node_id[:16] in (old["reason"] or ""), old

    second = build(client, "--hops", "3")
    new_ids = [h["node_id"] for h in second["hops"]]
    assert second["state"] == "open", second
    assert middle.node_id not in new_ids
    assert len(set(new_ids)) == 3 and set(new_ids) <= set(relays)
    assert all(h["rtt_ms"] is not None for h in second["hops"]), second
    states = {c["id"]: c["state"] for c in api(client, "/v1/circuits")}
    assert states[second["id"]] == "open"
    assert states[first["id"]] in ("failed", "destroyed")
    print(
        f"\nbuild times: first {first['build_ms']} ms, after the kill {second['build_ms']} ms "
        f"(attempts {second['attempts']})"
    )


async def test_node_keeps_migrates_and_rotates_onion_keys(tmp_path: Path) -> None:
    """In one process: a relay takes over a pre-rotation onion-keys.json, keeps the keys
    across restarts, rotates them on the keyring's timer, saves them and republishes."""
    old_current, old_next = crypto.x25519_generate_private(), crypto.x25519_generate_private()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "onion-keys.json").write_text(
        json.dumps({"current": old_current.hex(), "next": old_next.hex()})
    )
    config = NodeConfig(
        home=tmp_path,
        listen=(HOST.format(200), 0),
        role=Role.RELAY,
        control=ControlConfig(enabled=False),
    )
    node = Node(config, Identity.generate())
    await node.start()
    try:
        keyring = node.keyring
        assert keyring is not None
        assert keyring.publics() == (
            crypto.x25519_public_from_private(old_current),
            crypto.x25519_public_from_private(old_next),
        )
        saved = state / "onion-keys.json"
        assert json.loads(saved.read_text())["format"] == KEYRING_FORMAT
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert node.circuits is not None and node.circuits.relay is not None
        descriptor = node._make_descriptor(time.time())
        assert descriptor is not None
        assert descriptor.body.onion_key == keyring.publics()[0]

        # A keyring due for rotation in a moment; the node's timer task does the rest.
        fast = OnionKeyring.from_json(keyring.to_json(), rotate_every_s=0.3)
        node.keyring = fast
        published: list[bytes] = []

        async def publish() -> None:
            made = node._make_descriptor(time.time())
            assert made is not None
            published.append(made.body.onion_key)

        node._publish = publish  # type: ignore[method-assign]
        dht = node.dht
        assert dht is not None
        dht.contacts = lambda: [object()]  # type: ignore[method-assign]  # "joined"
        task = asyncio.create_task(node._rotate_onion_keys())
        try:
            deadline = time.monotonic() + 5
            while not published and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            del dht.contacts
        assert published and published[0] == crypto.x25519_public_from_private(old_next)
        assert fast.publics()[0] == published[0]
        reloaded = OnionKeyring.from_json(saved.read_text())
        assert reloaded.publics() == fast.publics()
        # The retired key still opens builds for its overlap.
        candidates = [public for _, public in fast.candidates(time.time())]
        assert crypto.x25519_public_from_private(old_current) in candidates
    finally:
        await node.aclose()

    # A restart keeps the rotated keys.
    again = Node(dataclasses.replace(config), Identity.generate())
    await again.start()
    try:
        assert again.keyring is not None
        assert again.keyring.publics() == reloaded.publics()
    finally:
        await again.aclose()


async def test_client_node_has_no_relay_and_no_onion_keys(tmp_path: Path) -> None:
    config = NodeConfig(
        home=tmp_path,
        listen=(HOST.format(201), 0),
        role=Role.CLIENT,
        control=ControlConfig(enabled=False),
    )
    node = Node(config, Identity.generate())
    await node.start()
    try:
        assert node.keyring is None
        assert node.circuits is not None and node.circuits.relay is None
        assert node.control_circuits() == []
        assert "routing.build.ok" not in node.stats()
    finally:
        await node.aclose()
    assert not (tmp_path / "state" / "onion-keys.json").exists()
