"""meshnode.control: a real aiohttp server on 127.0.0.1 (port 0) over a fake node.

The fake backend serves a Directory of descriptors signed like tests/discovery/
test_directory.py does, and the server's clock is pinned, so ages are exact. The CLI
tests run `meshnode peers` / `lookup` through CliRunner in a worker thread (the CLI calls
asyncio.run) while this test's loop serves the API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from discovery.descriptor import DescriptorRole, NodeDescriptor, Operator, SignedDescriptor, sign
from discovery.directory import Directory
from meshnode import crypto
from meshnode.cli import EXIT_FAILURE, EXIT_USAGE, format_age, format_bps, main
from meshnode.config import CONFIG_FILE
from meshnode.control import (
    CONTROL_FILE,
    TOKEN_FILE,
    ControlError,
    ControlNotRunningError,
    ControlServer,
    control_get,
    descriptor_json,
    parse_node_id,
    peer_json,
)
from meshnode.errors import DecodeError, MeshError
from meshnode.identity import Identity, NodeId, b32encode
from routing.manager import CircuitError, CircuitInfo, HopInfo

T0 = 1_700_000_000
NOW = T0 + 300  # five minutes after publication
LIFETIME = 3600
ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
RELAY = DescriptorRole.RELAY
EXIT = DescriptorRole.EXIT


@cache
def ident(i: int) -> Identity:
    seed = hashlib.sha256(b"control-test-identity" + i.to_bytes(4, "big")).digest()
    link = hashlib.sha256(b"control-test-link" + i.to_bytes(4, "big")).digest()
    return Identity(identity_seed=seed, link_private=link)


def desc(
    i: int,
    *,
    roles: frozenset[DescriptorRole] = frozenset({RELAY}),
    region: str = "EU",
    country: str = "DE",
    **overrides: Any,
) -> SignedDescriptor:
    identity = ident(i)
    body = NodeDescriptor(
        version=T0,
        identity_key=identity.identity_public,
        link_key=identity.link_public,
        onion_key=ONION,
        addresses=((f"192.0.2.{i + 1}", 7520), ("2001:db8::1", 7000 + i)),
        roles=roles,
        exit_policy=((443, 443), (8000, 8100)) if EXIT in roles else (),
        region=region,
        country=country,
        operator=Operator(name=f"op{i}", contact=f"noc{i}@example.org"),
        bandwidth_bps=100_000_000,
        software="meshnode/0.1.0",
        published_at=T0,
        expires_at=T0 + LIFETIME,
        **overrides,
    )
    return sign(body, identity)


# 0-2 relays in EU/DE, 3 an exit in EU/NL, 4 exit+relay in NA/US, 5 a relay naming no place.
NETWORK = (
    *(desc(i) for i in range(3)),
    desc(3, roles=frozenset({EXIT}), country="NL"),
    desc(4, roles=frozenset({EXIT, RELAY}), region="NA", country="US"),
    desc(5, region="", country=""),
)
OUTSIDER = desc(9, roles=frozenset({EXIT}), region="APAC", country="JP")  # in the DHT only


def b32(d: SignedDescriptor) -> str:
    return b32encode(d.node_id)


class FakeNode:
    """A ControlBackend: a fixed directory, and a DHT that knows NETWORK + OUTSIDER."""

    def __init__(self, descriptors: tuple[SignedDescriptor, ...] = NETWORK) -> None:
        self.builds = []
        self.circuits = []
        self.directory = Directory(descriptors, now=NOW)
        self.dht = {d.node_id: d for d in (*descriptors, OUTSIDER)}
        self.lookups: list[bytes] = []
        self.lookup_error: BaseException | None = None
        self.lookup_delay = 0.0

    def control_status(self) -> dict[str, object]:
        return {"node_id": b32encode(ident(0).node_id), "peers": len(self.directory)}

    def control_directory(self) -> Directory:
        return self.directory

    async def control_lookup(self, node_id: bytes) -> SignedDescriptor | None:
        self.lookups.append(node_id)
        if self.lookup_delay:
            await asyncio.sleep(self.lookup_delay)
        if self.lookup_error is not None:
            raise self.lookup_error
        return self.dht.get(NodeId(node_id))

    # Circuits: a build makes a circuit through NETWORK[0], [1] and [4] (the exit).
    builds: list[tuple[int | None, bytes | None, int | None]]
    build_error: CircuitError | None = None
    circuits: list[CircuitInfo]

    async def control_build(
        self, hops: int | None, exit_id: bytes | None, port: int | None
    ) -> dict[str, object]:
        self.builds.append((hops, exit_id, port))
        if self.build_error is not None:
            raise self.build_error
        info = circuit_info(len(self.circuits) + 1, port=port)
        self.circuits.append(info)
        return info.to_json(NOW)

    def control_circuits(self) -> list[dict[str, object]]:
        return [c.to_json(NOW) for c in self.circuits]

    def control_destroy(self, circuit_id: int) -> bool:
        for i, info in enumerate(self.circuits):
            if info.id == circuit_id:
                if info.state != "open":
                    return False
                self.circuits[i] = dataclasses.replace(info, state="closed", reason="closed")
                return True
        raise CircuitError("unknown_circuit", f"no circuit {circuit_id}")


def circuit_info(
    circuit_id: int, *, state: str = "open", port: int | None = None, reason: str | None = None
) -> CircuitInfo:
    path = (NETWORK[0], NETWORK[1], NETWORK[4])
    hops = tuple(
        HopInfo(
            index=i,
            node_id=d.node_id,
            operator=d.body.operator.name,
            region=d.body.region,
            country=d.body.country,
            address=d.body.addresses[0],
            roles=tuple(sorted(r.value for r in d.body.roles)),
            rtt_s=0.0004 * i,
            probes_sent=3,
            probes_answered=3 if state == "open" else 1,
            probes_lost=0 if state == "open" else 2,
            weight_factor=1.0,
        )
        for i, d in enumerate(path, start=1)
    )
    return CircuitInfo(
        id=circuit_id,
        state=state,
        reason=reason,
        hops=hops,
        port=port,
        build_time_s=0.0123,
        attempts=1,
        failed_attempts=(),
        created_at=NOW - 120,
        opened_at=NOW - 120,
        ended_at=None,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
async def server(node: FakeNode, home: Path) -> AsyncIterator[ControlServer]:
    server = await ControlServer.start(node, home, clock=lambda: NOW)
    yield server
    await server.close()


def token_of(home: Path) -> str:
    return (home / TOKEN_FILE).read_text().strip()


async def http(
    server: ControlServer,
    path: str,
    *,
    token: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One raw request; the server's token unless ``token`` (``""``: no header at all)."""
    sent = dict(headers or {})
    token = token_of(server.home) if token is None else token
    if token:
        sent["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + path, headers=sent, **kwargs) as response,
    ):
        body = await response.read()
        return response.status, json.loads(body), response


# --- Files ------------------------------------------------------------------------------


async def test_start_writes_private_token_and_endpoint(server: ControlServer, home: Path) -> None:
    token_path, control_path = home / TOKEN_FILE, home / CONTROL_FILE
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(control_path.stat().st_mode) == 0o600
    token = token_of(home)
    assert len(token) == 64 and bytes.fromhex(token)
    info = json.loads(control_path.read_text())
    assert info == {"url": server.url, "pid": os.getpid()}
    assert server.url.startswith("http://127.0.0.1:")
    assert int(server.url.rsplit(":", 1)[1]) > 0
    assert [p.name for p in home.iterdir() if p.name.endswith(".tmp")] == []


async def test_close_removes_files_and_stops_listening(node: FakeNode, home: Path) -> None:
    server = await ControlServer.start(node, home)
    url = server.url
    await server.close()
    assert not (home / TOKEN_FILE).exists()
    assert not (home / CONTROL_FILE).exists()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/status"):
            pass
    await server.close()  # twice is fine


async def test_close_leaves_files_another_server_wrote(node: FakeNode, home: Path) -> None:
    first = await ControlServer.start(node, home)
    second = await ControlServer.start(node, home)  # same home: its files replace ours
    await first.close()
    assert token_of(home) == second._token
    assert json.loads((home / CONTROL_FILE).read_text())["url"] == second.url
    await second.close()
    assert not (home / TOKEN_FILE).exists()


async def test_tokens_differ_per_start(node: FakeNode, tmp_path: Path) -> None:
    a = await ControlServer.start(node, tmp_path / "a")
    b = await ControlServer.start(node, tmp_path / "b")
    try:
        assert token_of(tmp_path / "a") != token_of(tmp_path / "b")
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "localhost", "example.org"])
async def test_non_loopback_host_refused(node: FakeNode, home: Path, host: str) -> None:
    with pytest.raises(ControlError, match="loopback only"):
        await ControlServer.start(node, home, host=host)
    assert not home.exists()


async def test_ipv6_loopback(node: FakeNode, home: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await ControlServer.start(node, home, host="::1")
    except ControlError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert server.url.startswith("http://[::1]:")
        assert await control_get(home, "/v1/status") == node.control_status() | {
            "control": {"url": server.url, "unauthorized": 0}
        }
    finally:
        await server.close()


async def test_port_in_use_is_a_control_error(
    node: FakeNode, server: ControlServer, tmp_path: Path
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(ControlError, match=f"cannot listen on 127.0.0.1:{port}"):
        await ControlServer.start(node, tmp_path / "other", port=port)
    assert not (tmp_path / "other" / TOKEN_FILE).exists()


# --- Authentication ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer " + "0" * 64},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer \u00e9t\u00e9"},
    ],
)
async def test_401_without_the_token(server: ControlServer, headers: dict[str, str]) -> None:
    status, body, response = await http(server, "/v1/status", token="", headers=headers)
    assert status == 401
    assert "bearer token" in body["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert server.unauthorized == 1


async def test_401_counted_and_scheme_must_be_bearer(server: ControlServer) -> None:
    token = token_of(server.home)
    for path in ("/v1/status", "/v1/peers", "/v1/lookup/x", "/nothing-here"):
        status, _, _ = await http(server, path, token="", headers={"Authorization": token})
        assert status == 401  # the token without "Bearer", on any path (real or not)
    assert server.unauthorized == 4
    status, body, _ = await http(
        server, "/v1/status", token="", headers={"Authorization": f"bearer {token}"}
    )
    assert status == 200  # the scheme is case-insensitive (RFC 9110 §11.1)
    assert body["control"]["unauthorized"] == 4


async def test_errors_are_json(server: ControlServer) -> None:
    status, body, _ = await http(server, "/v2/status")
    assert (status, body) == (404, {"error": "not found"})
    status, body, _ = await http(server, "/v1/status", method="POST")
    assert (status, body) == (405, {"error": "method not allowed"})


async def test_body_over_1_kib_refused(server: ControlServer) -> None:
    status, body, _ = await http(server, "/v1/status", data=b"x" * 1025)
    assert status == 413 and "1024 bytes" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 512

    status, body, _ = await http(server, "/v1/status", data=chunks())
    assert status == 413 and "error" in body
    status, _, _ = await http(server, "/v1/status", data=b"x" * 1024)
    assert status == 200


# --- Endpoints --------------------------------------------------------------------------


async def test_status(server: ControlServer, node: FakeNode) -> None:
    status, body, _ = await http(server, "/v1/status")
    assert status == 200
    assert body == {
        "node_id": b32encode(ident(0).node_id),
        "peers": 6,
        "control": {"url": server.url, "unauthorized": 0},
    }


async def test_peers_all_and_json_shape(server: ControlServer) -> None:
    status, body, _ = await http(server, "/v1/peers")
    assert status == 200
    assert isinstance(body, list)
    assert [p["node_id"] for p in body] == sorted(b32(d) for d in NETWORK)
    exit_relay = next(p for p in body if p["node_id"] == b32(NETWORK[4]))
    assert exit_relay == {
        "node_id": b32(NETWORK[4]),
        "roles": ["exit", "relay"],
        "region": "NA",
        "country": "US",
        "operator": {"name": "op4", "contact": "noc4@example.org"},
        "addresses": ["192.0.2.5:7520", "[2001:db8::1]:7004"],
        "link_key": b32encode(ident(4).link_public),
        "version": T0,
        "bandwidth_bps": 100_000_000,
        "software": "meshnode/0.1.0",
        "published_at": T0,
        "expires_at": T0 + LIFETIME,
        "age_s": 300,
        "expires_in_s": LIFETIME - 300,
    }


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"role": "exit"}, [3, 4]),
        ({"role": "EXIT"}, [3, 4]),
        ({"role": "relay"}, [0, 1, 2, 4, 5]),
        ({"region": "eu"}, [0, 1, 2, 3]),
        ({"region": "NA"}, [4]),
        ({"country": "nl"}, [3]),
        ({"country": "DE", "role": "relay"}, [0, 1, 2]),
        ({"region": "EU", "country": "DE", "role": "exit"}, []),
        ({"region": ""}, [5]),  # "" is "names no region"
        ({"country": "JP"}, []),
    ],
)
async def test_peers_filters(
    server: ControlServer, params: dict[str, str], expected: list[int]
) -> None:
    status, body, _ = await http(server, "/v1/peers", params=params)
    assert status == 200, body
    assert sorted(p["node_id"] for p in body) == sorted(b32(NETWORK[i]) for i in expected)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("role=guard", "role must be one of exit, relay"),
        ("region=EU!", "region filter"),
        ("region=" + "A" * 17, "region filter"),
        ("region=%C4%B1t", "region filter"),  # dotless i: str.upper() would make "IT"
        ("country=DEU", "country filter"),
        ("country=D1", "country filter"),
        ("colour=red", "unknown parameter 'colour'"),
        ("role=exit&role=relay", "give role at most once"),
    ],
)
async def test_peers_bad_filters_400(server: ControlServer, query: str, words: str) -> None:
    status, body, _ = await http(server, "/v1/peers?" + query)
    assert status == 400
    assert words in body["error"]


async def test_lookup_b32_and_hex(server: ControlServer, node: FakeNode) -> None:
    for text in (b32(OUTSIDER), OUTSIDER.node_id.hex(), OUTSIDER.node_id.hex().upper()):
        status, body, _ = await http(server, f"/v1/lookup/{text}")
        assert status == 200, body
        assert body == descriptor_json(OUTSIDER, NOW)
    assert node.lookups == [OUTSIDER.node_id] * 3
    assert body["identity_key"] == b32encode(ident(9).identity_public)
    assert body["exit_policy"] == [[443, 443], [8000, 8100]]
    assert body["next_onion_key"] is None
    assert body["operator"] == {
        "name": "op9",
        "contact": "noc9@example.org",
        "operator_key": None,
    }
    assert body["age_s"] == 300


async def test_lookup_not_found_404(server: ControlServer) -> None:
    unknown = b32encode(bytes(20))
    status, body, _ = await http(server, f"/v1/lookup/{unknown}")
    assert status == 404
    assert body == {"error": f"node {unknown} not found in the DHT"}


@pytest.mark.parametrize(
    "text", ["nothex", "a" * 31, "0" * 39, "0" * 41, "g" * 40, "A" * 33, "1" * 32]
)
async def test_lookup_bad_id_400(server: ControlServer, node: FakeNode, text: str) -> None:
    status, body, _ = await http(server, f"/v1/lookup/{text}")
    assert status == 400
    assert "node id" in body["error"]
    assert node.lookups == []


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (TimeoutError(), 504, "timed out"),
        (MeshError("no peers to ask"), 502, "no peers to ask"),
        (RuntimeError("bug"), 500, "internal error"),
    ],
)
async def test_lookup_failures(
    server: ControlServer, node: FakeNode, error: BaseException, status: int, words: str
) -> None:
    node.lookup_error = error
    got, body, _ = await http(server, f"/v1/lookup/{b32(OUTSIDER)}")
    assert got == status
    assert words in body["error"]
    assert "bug" not in body["error"]  # internals stay in the log


def test_parse_node_id() -> None:
    raw = bytes(range(20))
    assert parse_node_id(b32encode(raw)) == raw
    assert parse_node_id(f"  {raw.hex()} ") == raw
    assert parse_node_id(raw.hex().upper()) == raw
    with pytest.raises(DecodeError, match="40 hex digits"):
        parse_node_id("zz")


def test_peer_json_ages_can_go_negative() -> None:
    record = peer_json(NETWORK[0], T0 + LIFETIME + 10)
    assert record["age_s"] == LIFETIME + 10
    assert record["expires_in_s"] == -10


# --- Client -----------------------------------------------------------------------------


async def test_control_get(server: ControlServer) -> None:
    assert await control_get(server.home, "/v1/status") == {
        "node_id": b32encode(ident(0).node_id),
        "peers": 6,
        "control": {"url": server.url, "unauthorized": 0},
    }
    peers = await control_get(server.home, "/v1/peers", {"role": "exit"})
    assert isinstance(peers, list)
    assert {p["node_id"] for p in peers} == {b32(NETWORK[3]), b32(NETWORK[4])}


async def test_control_get_http_error_is_the_servers_text(server: ControlServer) -> None:
    with pytest.raises(ControlError) as info:
        await control_get(server.home, "/v1/peers", {"country": "Germany"})
    assert info.value.status == 400
    assert str(info.value) == "country filter must be two uppercase letters or empty"


async def test_control_get_wrong_token(server: ControlServer) -> None:
    (server.home / TOKEN_FILE).write_text("00" * 32)
    with pytest.raises(ControlError) as info:
        await control_get(server.home, "/v1/status")
    assert info.value.status == 401
    assert "bearer token" in str(info.value)


async def test_control_get_no_node(home: Path) -> None:
    with pytest.raises(ControlNotRunningError) as info:
        await control_get(home, "/v1/status")
    assert str(info.value) == (
        f"no node is running with home {home} (control.json not found) "
        "— start one with `meshnode run`"
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def fake_endpoint(home: Path, url: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / CONTROL_FILE).write_text(json.dumps({"url": url, "pid": 1}))
    (home / TOKEN_FILE).write_text("ab" * 32)


async def test_control_get_connection_refused(home: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    fake_endpoint(home, url)
    with pytest.raises(ControlError) as info:
        await control_get(home, "/v1/status")
    assert str(info.value) == (
        f"the node at {url} did not answer (connection refused): is it still running?"
    )
    assert info.value.status is None


async def test_control_get_timeout(server: ControlServer, node: FakeNode) -> None:
    node.lookup_delay = 5.0
    with pytest.raises(ControlError, match=r"did not answer within 0\.2 s"):
        await control_get(server.home, f"/v1/lookup/{b32(OUTSIDER)}", timeout=0.2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
async def test_control_get_unreadable_token(server: ControlServer) -> None:
    token_path = server.home / TOKEN_FILE
    token_path.chmod(0)
    try:
        with pytest.raises(ControlError) as info:
            await control_get(server.home, "/v1/status")
    finally:
        token_path.chmod(0o600)
    assert str(info.value) == (
        f"cannot read the control token ({token_path}): permission denied — run as the node's owner"
    )


async def test_control_get_token_permission_denied_message(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same message when running as root (which the test above cannot make fail).
    token_path = server.home / TOKEN_FILE
    read_text = Path.read_text

    def deny(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == token_path:
            raise PermissionError(13, "Permission denied")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(ControlError) as info:
        await control_get(server.home, "/v1/status")
    assert "permission denied — run as the node's owner" in str(info.value)
    assert str(token_path) in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"url": 5}', '{"url": "ftp://x"}'])
async def test_control_get_bad_control_json(home: Path, text: str) -> None:
    home.mkdir()
    (home / CONTROL_FILE).write_text(text)
    with pytest.raises(ControlError, match=str(home / CONTROL_FILE)):
        await control_get(home, "/v1/status")


# --- CLI against the running server -----------------------------------------------------


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshnode: error: "), result.stderr
    return lines[0]


async def test_cli_peers_table(server: ControlServer) -> None:
    result = await cli("peers", "--home", str(server.home))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "ID", "ROLES", "REGION/CC", "OPERATOR", "ADDRESSES", "AGE"]
    assert lines[-1] == "6 peers"
    rows = lines[1:-1]
    assert len(rows) == 6
    row = next(r for r in rows if r.startswith(b32(NETWORK[4])[:16]))
    assert row.split() == [
        b32(NETWORK[4])[:16],
        "exit,relay",
        "NA/US",
        "op4",
        "192.0.2.5:7520,[2001:db8::1]:7004",
        "5m",
    ]
    assert next(r for r in rows if r.startswith(b32(NETWORK[5])[:16])).split()[2] == "-"
    # Aligned: every column starts where its header does, on every row.
    starts = [lines[0].index(h) for h in ("ROLES", "REGION/CC", "OPERATOR", "ADDRESSES", "AGE")]
    for r in rows:
        assert all(r[p - 2 : p] == "  " and r[p] != " " for p in starts), r


async def test_cli_peers_filters_and_json(server: ControlServer) -> None:
    home = str(server.home)
    result = await cli("peers", "--home", home, "--role", "exit", "--country", "nl")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "1 peer (role=exit, country=NL)"
    result = await cli("peers", "--home", home, "--region", "eu", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [p["node_id"] for p in listed] == sorted(b32(d) for d in NETWORK[:4])
    assert listed[0] == peer_json(next(d for d in NETWORK if b32(d) == listed[0]["node_id"]), NOW)
    result = await cli("peers", "--home", home, "--country", "JP")
    assert result.exit_code == 0
    assert result.stdout == "no peers match country=JP\n"


async def test_cli_peers_empty(node: FakeNode, server: ControlServer) -> None:
    node.directory = Directory((), now=NOW)
    result = await cli("peers", "--home", str(server.home))
    assert result.exit_code == 0, result.output
    assert result.stdout == "no peers known yet\n"
    result = await cli("peers", "--home", str(server.home), "--json")
    assert result.stdout == "[]\n"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--role", "guard"], "--role"),
        (["--region", "E U"], "--region"),
        (["--country", "Germany"], "--country"),
    ],
)
async def test_cli_peers_bad_filter_is_usage_error(
    server: ControlServer, args: list[str], words: str
) -> None:
    result = await cli("peers", "--home", str(server.home), *args)
    assert result.exit_code == EXIT_USAGE
    assert words in result.stderr
    assert server.unauthorized == 0


async def test_cli_lookup(server: ControlServer) -> None:
    result = await cli("lookup", b32(OUTSIDER), "--home", str(server.home))
    assert result.exit_code == 0, result.output
    shown = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(":")
        shown[name] = value.strip()
    assert shown["node id"] == b32(OUTSIDER)
    assert shown["roles"] == "exit"
    assert shown["region"] == "APAC"
    assert shown["country"] == "JP"
    assert shown["operator"] == "op9"
    assert shown["operator contact"] == "noc9@example.org"
    assert shown["addresses"] == "192.0.2.10:7520, [2001:db8::1]:7009"
    assert shown["exit policy"] == "443, 8000-8100"
    assert shown["bandwidth"] == "100 Mbit/s"
    assert shown["link key"] == b32encode(ident(9).link_public)
    assert shown["published"] == "2023-11-14 22:13:20 UTC (5m ago)"
    assert shown["expires"] == "2023-11-14 23:13:20 UTC (in 55m)"
    assert shown["signature"].startswith("verified")
    result = await cli("lookup", OUTSIDER.node_id.hex(), "--home", str(server.home), "--json")
    assert json.loads(result.stdout) == descriptor_json(OUTSIDER, NOW)


async def test_cli_lookup_not_found_exits_1(server: ControlServer) -> None:
    unknown = b32encode(bytes(20))
    result = await cli("lookup", unknown, "--home", str(server.home))
    line = one_line_error(result, EXIT_FAILURE)
    assert line == f"meshnode: error: node {unknown} not found in the DHT"


async def test_cli_lookup_bad_id_exits_2(server: ControlServer, node: FakeNode) -> None:
    result = await cli("lookup", "not-an-id", "--home", str(server.home))
    assert result.exit_code == EXIT_USAGE
    assert "NODE_ID" in result.stderr and "40 hex digits" in result.stderr
    assert node.lookups == []


async def test_cli_without_a_node_exits_1(home: Path) -> None:
    line = one_line_error(await cli("peers", "--home", str(home)), EXIT_FAILURE)
    assert "no node is running with home" in line and "meshnode run" in line
    line = one_line_error(await cli("lookup", "a" * 32, "--home", str(home)), EXIT_FAILURE)
    assert "control.json not found" in line


async def test_cli_without_a_node_notes_disabled_control_api(home: Path) -> None:
    home.mkdir()
    (home / CONFIG_FILE).write_text("[control]\nenabled = false\n")
    line = one_line_error(await cli("peers", "--home", str(home)), EXIT_FAILURE)
    assert "enabled = false" in line


async def test_cli_node_gone(home: Path) -> None:
    fake_endpoint(home, f"http://127.0.0.1:{closed_port()}")
    line = one_line_error(await cli("peers", "--home", str(home)), EXIT_FAILURE)
    assert "(connection refused): is it still running?" in line


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "0s"),
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (3599, "59m"),
        (7200, "2h"),
        (86400 * 3, "3d"),
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (0, "unknown"),
        (999, "999 bit/s"),
        (1500, "1.5 kbit/s"),
        (10**8, "100 Mbit/s"),
        (10**13, "10 Tbit/s"),
    ],
)
def test_format_bps(bps: int, text: str) -> None:
    assert format_bps(bps) == text


# --- Circuits ---------------------------------------------------------------------------


async def test_build_circuit(server: ControlServer, node: FakeNode) -> None:
    exit_b32 = b32(NETWORK[4])
    status, body, _ = await http(
        server, "/v1/circuits", method="POST", json={"hops": 3, "exit": exit_b32, "port": 443}
    )
    assert status == 201, body
    assert node.builds == [(3, NETWORK[4].node_id, 443)]
    assert body == circuit_info(1, port=443).to_json(NOW)
    assert [h["node_id"] for h in body["hops"]] == [b32(NETWORK[i]) for i in (0, 1, 4)]
    hop = body["hops"][2]
    assert hop["operator"] == "op4" and (hop["region"], hop["country"]) == ("NA", "US")
    assert hop["address"] == "192.0.2.5:7520"
    assert hop["rtt_ms"] == 1.2 and hop["probes_lost"] == 0
    assert body["exit"] == exit_b32 and body["build_ms"] == 12.3
    # No body (or an empty one): every default.
    status, _, _ = await http(server, "/v1/circuits", method="POST")
    assert status == 201
    status, _, _ = await http(server, "/v1/circuits", method="POST", data=b"{}")
    assert status == 201
    status, _, _ = await http(server, "/v1/circuits", method="POST", json={"exit": "ab" * 20})
    assert status == 201
    assert node.builds[1:] == [(None, None, None), (None, None, None), (None, b"\xab" * 20, None)]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"{nope", "not JSON"),
        (b"[3]", "JSON object"),
        (b'{"hops": 6}', "hops must be an integer from 1 to 5"),
        (b'{"hops": true}', "hops must be"),
        (b'{"hops": "3"}', "hops must be"),
        (b'{"port": 0}', "port must be"),
        (b'{"port": 443.0}', "port must be"),
        (b'{"exit": 5}', "exit must be a node id"),
        (b'{"exit": "nope"}', "node id"),
        (b'{"hop": 3}', "unknown field 'hop'"),
    ],
)
async def test_build_circuit_bad_body_400(
    server: ControlServer, node: FakeNode, data: bytes, words: str
) -> None:
    status, body, _ = await http(server, "/v1/circuits", method="POST", data=data)
    assert status == 400
    assert words in body["error"]
    assert node.builds == []


async def test_build_circuit_body_limit(server: ControlServer, node: FakeNode) -> None:
    padded = b'{"hops": 3' + b" " * 1100 + b"}"
    status, body, _ = await http(server, "/v1/circuits", method="POST", data=padded)
    assert status == 413 and "1024 bytes" in body["error"]
    status, body, _ = await http(server, "/v1/circuits?hops=3", method="POST")
    assert status == 400 and "no query parameters" in body["error"]
    assert node.builds == []


@pytest.mark.parametrize(
    ("kind", "message", "code"),
    [
        ("no_path", "no exit accepts port 25", 503),
        ("no_path", "only 2 relays usable for a 3-hop path", 503),
        ("unknown_exit", "exit x is not in this node's directory", 404),
        ("timeout", "build timed out at hop 2 (abcd)", 504),
        ("failed", "build refused at hop 1 (abcd): overloaded", 502),
        ("bad_request", "hops must be an integer from 1 to 5", 400),
    ],
)
async def test_build_circuit_errors(
    server: ControlServer, node: FakeNode, kind: Any, message: str, code: int
) -> None:
    node.build_error = CircuitError(kind, message)
    status, body, _ = await http(server, "/v1/circuits", method="POST", json={"port": 25})
    assert (status, body) == (code, {"error": message})


async def test_list_and_close_circuits(server: ControlServer, node: FakeNode) -> None:
    status, body, _ = await http(server, "/v1/circuits")
    assert (status, body) == (200, [])
    node.circuits = [
        circuit_info(1, state="failed", reason="hop 2 (x) stopped answering probes"),
        circuit_info(2),
    ]
    status, body, _ = await http(server, "/v1/circuits")
    assert status == 200
    assert [(c["id"], c["state"]) for c in body] == [(1, "failed"), (2, "open")]
    assert body[0]["reason"] == "hop 2 (x) stopped answering probes"
    assert all(len(c["hops"]) == 3 for c in body)
    status, body, _ = await http(server, "/v1/circuits?state=open")
    assert status == 400
    status, body, _ = await http(server, "/v1/circuits/2", method="DELETE")
    assert (status, body) == (200, {"id": 2, "closed": True})
    status, body, _ = await http(server, "/v1/circuits/2", method="DELETE")
    assert (status, body) == (200, {"id": 2, "closed": False})
    status, body, _ = await http(server, "/v1/circuits/9", method="DELETE")
    assert (status, body) == (404, {"error": "no circuit 9"})
    status, body, _ = await http(server, "/v1/circuits/x1", method="DELETE")
    assert status == 400 and "not a circuit id" in body["error"]


async def test_circuits_need_the_token(server: ControlServer, node: FakeNode) -> None:
    status, _, _ = await http(server, "/v1/circuits", method="POST", token="0" * 64, json={})
    assert status == 401
    assert node.builds == []


async def test_cli_circuit_build(server: ControlServer, node: FakeNode) -> None:
    home = str(server.home)
    result = await cli("circuit", "build", "--home", home, "--hops", "3", "--port", "443")
    assert result.exit_code == 0, result.output
    assert node.builds == [(3, None, 443)]
    lines = result.stdout.splitlines()
    assert lines[0] == "circuit 1: open, 3 hops, built in 12.3 ms, exit accepts port 443"
    assert lines[1].split() == [
        "HOP", "NODE", "ID", "OPERATOR", "REGION/CC", "ADDRESS", "RTT", "LOST", "HEALTH", "AS",
    ]  # fmt: skip
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[1] for r in rows] == [b32(NETWORK[i])[:16] for i in (0, 1, 4)]
    assert rows[2][2:5] == ["op4", "NA/US", "192.0.2.5:7520"]
    assert rows[2][5:8] == ["1.2", "ms", "0/3"]
    assert [r[-1] for r in rows] == ["entry", "middle", "exit"]
    assert lines[5] == "path: " + " > ".join(b32(NETWORK[i])[:16] for i in (0, 1, 4))
    result = await cli("circuit", "build", "--home", home, "--exit", b32(NETWORK[4]), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == circuit_info(2).to_json(NOW)
    assert node.builds[1] == (None, NETWORK[4].node_id, None)


async def test_cli_circuit_build_failure_exits_1(server: ControlServer, node: FakeNode) -> None:
    node.build_error = CircuitError("no_path", "no exit accepts port 25")
    result = await cli("circuit", "build", "--home", str(server.home), "--port", "25")
    assert one_line_error(result, EXIT_FAILURE) == "meshnode: error: no exit accepts port 25"


async def test_cli_circuit_build_bad_flags_exit_2(server: ControlServer, node: FakeNode) -> None:
    home = str(server.home)
    for args in (["--hops", "6"], ["--exit", "nope"], ["--port", "0"]):
        result = await cli("circuit", "build", "--home", home, *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert args[0] in result.stderr
    assert node.builds == []


async def test_cli_route(server: ControlServer, node: FakeNode) -> None:
    home = str(server.home)
    result = await cli("route", "--home", home)
    assert result.exit_code == 0, result.output
    assert result.stdout == "no circuits yet (build one with `meshnode circuit build`)\n"
    node.circuits = [
        circuit_info(2),
        circuit_info(1, state="failed", reason="hop 2 (x) stopped answering probes"),
    ]
    result = await cli("route", "--home", home)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "circuit 2  open  3 hops  built in 12.3 ms  age 2m"
    assert lines[1].split()[:3] == ["HOP", "NODE", "ID"]
    assert lines[2].split()[:2] == ["1", b32(NETWORK[0])[:16]]
    assert lines[5] == (
        "circuit 1  failed  3 hops  built in 12.3 ms  age 2m  (hop 2 (x) stopped answering probes)"
    )
    assert lines[8].split()[7] == "2/3"  # hop 2 of the failed circuit: 2 of 3 probes lost
    assert lines[-1] == "2 circuits (1 open)"
    result = await cli("route", "--home", home, "--json")
    assert json.loads(result.stdout) == node.control_circuits()


async def test_cli_circuit_close(server: ControlServer, node: FakeNode) -> None:
    node.circuits = [circuit_info(1)]
    result = await cli("circuit", "close", "1", "--home", str(server.home))
    assert (result.exit_code, result.stdout) == (0, "circuit 1 closed\n")
    result = await cli("circuit", "close", "1", "--home", str(server.home))
    assert (result.exit_code, result.stdout) == (0, "circuit 1 had ended\n")
    result = await cli("circuit", "close", "7", "--home", str(server.home))
    assert one_line_error(result, EXIT_FAILURE) == "meshnode: error: no circuit 7"


async def test_cli_circuits_without_a_node_exit_1(home: Path) -> None:
    line = one_line_error(await cli("circuit", "build", "--home", str(home)), EXIT_FAILURE)
    assert "no node is running with home" in line
    line = one_line_error(await cli("route", "--home", str(home)), EXIT_FAILURE)
    assert "no node is running with home" in line
