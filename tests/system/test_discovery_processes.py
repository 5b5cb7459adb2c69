"""Discovery end to end: 20 `meshnode run` processes on loopback, one bootstrap contact.

Every node learns every exit and can filter them by region; a hostile node that stores
forged descriptors everywhere never gets them listed by `peers`; a restarted node
rejoins from its saved state with no bootstrap contact. Every process started here is
stopped by its PID. Traffic goes only to 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from discovery.descriptor import DescriptorRole, NodeDescriptor, SignedDescriptor, sign
from discovery.dht import DhtConfig, DhtNode
from discovery.providers import Topic, topic_key
from discovery.store import descriptor_key
from discovery.transport import LinkAddress, LinkTransport
from meshnode import crypto
from meshnode.contact import Contact
from meshnode.identity import Identity, b32encode
from meshnode.link.udp import LinkService
from tests.support.procs import MESHNODE, api, cli, wait_for

pytestmark = pytest.mark.system

COUNT = 20
# index -> (region, country) of the exits; every other node but the clients relays.
EXITS = {1: ("EU", "DE"), 4: ("EU", "FR"), 7: ("NA", "US"), 10: ("EU", "DE"), 13: ("NA", "CA")}
CLIENTS = {18, 19}
HOST = "127.61.0.{}"
PORT = 7600
CONVERGE_S = 120.0
FORGED_REGION = "FORGED"


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


def role_of(i: int) -> str:
    return "exit" if i in EXITS else "client" if i in CLIENTS else "relay"


@pytest.fixture
def mesh(tmp_path: Path):
    nodes = [Proc(i, tmp_path / f"n{i}", tmp_path / f"n{i}.log") for i in range(COUNT)]
    for node in nodes:
        res = cli(
            "init", "--home", str(node.home), "--listen", f"{HOST.format(node.index + 1)}:{PORT}"
        )
        assert res.returncode == 0, res.stderr
        with (node.home / "config.toml").open("a") as f:
            f.write("\n[dht]\nrefresh_interval_s = 2.0\nrpc_timeout_s = 1.0\n")

    def start(node: Proc, bootstrap: str | None) -> None:
        extra = ["--role", role_of(node.index), "--operator", f"op{node.index % 7}"]
        if node.index in EXITS:
            region, country = EXITS[node.index]
            extra += ["--region", region.lower(), "--country", country.lower()]
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

    def stop(node: Proc) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)

    try:
        yield nodes, start, stop
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)


def forged_descriptors(hostile: Identity, victim: SignedDescriptor) -> list[tuple[bytes, bytes]]:
    """(DHT key, value) pairs no honest node may ever store or list: a tampered
    descriptor, an expired one, and an exit's descriptor re-labelled and re-signed by
    the hostile key (an impersonation), filed under the exit's own key."""
    now = int(time.time())
    base: dict[str, Any] = {
        "version": now,
        "identity_key": hostile.identity_public,
        "link_key": hostile.link_public,
        "onion_key": crypto.x25519_public_from_private(bytes(range(32))),
        "addresses": (("127.61.1.1", PORT),),
        "roles": frozenset({DescriptorRole.RELAY, DescriptorRole.EXIT}),
        "region": "EU",
        "country": "DE",
        "published_at": now,
        "expires_at": now + 3000,
    }
    own_key = descriptor_key(hostile.node_id)
    tampered = bytearray(sign(NodeDescriptor(**base), hostile).encode())
    tampered[-1] ^= 0x01
    expired = sign(
        NodeDescriptor(**{**base, "published_at": now - 4000, "expires_at": now - 1000}), hostile
    ).encode()
    relabelled = dataclasses.replace(
        victim.body, region=FORGED_REGION, version=victim.body.version + 1
    )
    impersonation = (
        b"\x82" + relabelled.to_cbor() + b"\x58\x40" + hostile.sign(relabelled.signing_message())
    )
    return [
        (own_key, bytes(tampered)),
        (own_key, expired),
        (descriptor_key(victim.node_id), impersonation),
    ]


async def hostile_node(bootstrap: Contact) -> tuple[bytes, dict[str, int]]:
    """Join the mesh as a DHT node and STORE / ADD_PROVIDER forged records everywhere."""
    hostile = Identity.generate()
    link = await LinkService.open(hostile, ("127.61.1.1", PORT))
    dht = DhtNode(
        hostile.node_id,
        hostile.link_public,
        LinkTransport(link),
        config=DhtConfig(rpc_timeout_s=1.0),
    )
    try:
        await dht.bootstrap([LinkAddress(bootstrap.host, bootstrap.port, bootstrap.static_key)])
        await dht.find_node(os.urandom(20))
        victims = await dht.find_providers(Topic(role=DescriptorRole.EXIT), want=1)
        assert victims, "the hostile node found no exit to impersonate"
        targets = dht.contacts()
        forged = forged_descriptors(hostile, victims[0])
        topics = [
            Topic(role=DescriptorRole.EXIT),
            Topic(role=DescriptorRole.RELAY),
            Topic(role=DescriptorRole.EXIT, region="EU"),
            Topic(role=DescriptorRole.EXIT, region=FORGED_REGION),
            Topic(role=DescriptorRole.EXIT, country="DE"),
        ]
        calls = []
        for node in targets:
            for key, value in forged:
                calls.append(dht.protocol.call_store(node, key, value))
                for topic in topics:
                    calls.append(dht.protocol.call_add_provider(node, topic_key(topic), value))
        answers = await asyncio.gather(*calls)
        return hostile.node_id, {
            "targets": len(targets),
            "accepted": sum(1 for ok, answer in answers if ok and answer is True),
            "refused": sum(1 for ok, answer in answers if ok and answer is False),
        }
    finally:
        dht.close()
        link.close()


def test_twenty_nodes_discover_exits_refuse_forgeries_and_rejoin(mesh) -> None:
    nodes, start, stop = mesh
    start(nodes[0], None)
    boot = nodes[0].ready["contact"]
    for node in nodes[1:]:
        start(node, boot)
    exits = {nodes[i].node_id: EXITS[i] for i in EXITS}

    def everyone_sees_every_exit() -> bool | str:
        for node in nodes:
            seen = {p["node_id"] for p in api(node, "/v1/peers?role=exit")}
            if seen != set(exits):
                return f"node {node.index} sees {len(seen & set(exits))}/{len(exits)} exits"
        return True

    wait_for(
        "every node to list every exit", everyone_sees_every_exit, timeout=CONVERGE_S, interval=0.5
    )

    # Region and country filters, through the control API and through the CLI.
    for node in nodes:
        eu = {p["node_id"] for p in api(node, "/v1/peers?role=exit&region=EU")}
        assert eu == {nid for nid, (region, _) in exits.items() if region == "EU"}
    res = cli("peers", "--home", str(nodes[19].home), "--role", "exit", "--country", "de", "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert {p["node_id"] for p in listed} == {
        nid for nid, (_, country) in exits.items() if country == "DE"
    }
    assert all(p["region"] == "EU" and "exit" in p["roles"] for p in listed)

    # `meshnode lookup` fetches and verifies one descriptor from the DHT.
    exit_id = nodes[7].node_id
    res = cli("lookup", exit_id, "--home", str(nodes[18].home), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["node_id"] == exit_id

    # A hostile node stores forged descriptors on every node it can reach.
    contact = Contact.parse(boot)
    hostile_id, report = asyncio.run(hostile_node(contact))
    assert report["targets"] >= 10
    assert report["accepted"] == 0, report
    assert report["refused"] > 0
    time.sleep(5)  # two discovery rounds
    hostile_b32 = b32encode(hostile_id)
    for node in nodes:
        listed = api(node, "/v1/peers")
        assert hostile_b32 not in {p["node_id"] for p in listed}
        assert FORGED_REGION not in {p["region"] for p in listed}
    counters: dict[str, int] = {}
    for node in nodes:
        for key, value in api(node, "/v1/status")["counters"].items():
            counters[key] = counters.get(key, 0) + value
    assert counters.get("store.drop.bad_signature", 0) > 0
    assert counters.get("store.drop.expired", 0) > 0
    assert counters.get("providers.drop.bad_signature", 0) > 0

    # A restarted relay rejoins from its saved state, with no bootstrap contact.
    restarted = nodes[5]
    before = api(restarted, "/v1/status")["published_version"]
    stop(restarted)
    saved = json.loads((restarted.home / "state" / "dht.json").read_text())
    assert len(saved["contacts"]) >= 5
    start(restarted, None)

    def rejoined() -> bool | str:
        status = api(restarted, "/v1/status")
        if not status["joined"] or status["routing_table"] < 5:
            return f"table {status['routing_table']}"
        if not status["published_version"] or status["published_version"] <= before:
            return "not republished yet"
        return True

    wait_for("the restarted node to rejoin", rejoined, timeout=60, interval=0.5)
    logs = [json.loads(line) for line in restarted.log.read_text().splitlines() if line[:1] == "{"]
    assert any(line["event"] == "dht.rejoined" for line in logs)
    # Its new descriptor reaches the others.
    wait_for(
        "the others to see the restarted relay's new version",
        lambda: all(
            any(
                p["node_id"] == restarted.node_id and p["version"] > before
                for p in api(n, "/v1/peers?role=relay")
            )
            for n in nodes[:3]
        ),
        timeout=60,
        interval=0.5,
    )
