"""Path selection and guards over small synthetic directories of signed descriptors.

Randomness is a seeded stream, so every statistical bound here is checked once against
a fixed seed and cannot flake; hypothesis explores networks and seeds for the rules
that must always hold (distinct nodes, families and subnets; guard entry; exit policy).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.descriptor import (
    DescriptorRole,
    NodeDescriptor,
    Operator,
    SignedDescriptor,
    sign,
)
from discovery.directory import Directory
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import Identity, NodeId, b32encode
from routing.health import HealthBook
from routing.path import (
    BANDWIDTH_CAP_BPS,
    BANDWIDTH_FLOOR_BPS,
    GUARD_FAILING_FOR_S,
    GUARD_LIFETIME_S,
    GUARD_MAX_FAILURES,
    GUARDS_FORMAT,
    AnyExitSelector,
    ExitSelector,
    Guard,
    GuardChange,
    GuardSet,
    PathConstraints,
    PathError,
    PortExitSelector,
    family_key,
    relay_weight,
    select_path,
    subnet_key,
)
from tests.conftest import DeterministicBytes

T0 = 1_700_000_000
NOW = T0 + 60
LIFETIME = 3 * 3600
ONION = crypto.x25519_public_from_private(bytes(range(0x80, 0xA0)))
RELAY = DescriptorRole.RELAY
EXIT = DescriptorRole.EXIT
R = frozenset({RELAY})
X = frozenset({EXIT})
RX = frozenset({RELAY, EXIT})
WEB = ((80, 80), (443, 443))


@cache
def ident(i: int) -> Identity:
    seed = hashlib.sha256(b"path-test-identity" + i.to_bytes(4, "big")).digest()
    link = hashlib.sha256(b"path-test-link" + i.to_bytes(4, "big")).digest()
    return Identity(identity_seed=seed, link_private=link)


@cache
def node(
    i: int,
    *,
    roles: frozenset[DescriptorRole] = R,
    policy: tuple[tuple[int, int], ...] | None = None,
    hosts: tuple[str, ...] | None = None,
    operator: str | None = None,
    operator_key: bytes | None = None,
    bandwidth: int = 0,
    published_at: int = T0,
) -> SignedDescriptor:
    """Node ``i``: by default a relay alone in 10.i.0.0/16, run by operator "op<i>"."""
    identity = ident(i)
    if policy is None:
        policy = WEB if EXIT in roles else ()
    if hosts is None:
        hosts = (f"10.{i}.0.1",)
    body = NodeDescriptor(
        version=published_at,
        identity_key=identity.identity_public,
        link_key=identity.link_public,
        onion_key=ONION,
        addresses=tuple((h, 7000 + i) for h in hosts),
        roles=roles,
        exit_policy=policy,
        operator=Operator(
            name=f"op{i}" if operator is None else operator, operator_key=operator_key
        ),
        bandwidth_bps=bandwidth,
        published_at=published_at,
        expires_at=published_at + LIFETIME,
    )
    return sign(body, identity)


def directory(*descriptors: SignedDescriptor, now: float = NOW) -> Directory:
    return Directory(descriptors, now=now)


def rng(seed: object = b"seed") -> DeterministicBytes:
    return DeterministicBytes(repr(seed).encode())


def pick(
    d: Directory,
    *,
    guards: GuardSet | None = None,
    health: HealthBook | None = None,
    selector: ExitSelector | None = None,
    seed: object = b"seed",
    own: NodeId | None = None,
    **constraints: object,
) -> list[SignedDescriptor]:
    return select_path(
        d,
        constraints=PathConstraints(**constraints),  # type: ignore[arg-type]
        exit_selector=selector or PortExitSelector(443),
        guards=GuardSet() if guards is None else guards,
        health=HealthBook() if health is None else health,
        random_bytes=rng(seed),
        own_node_id=own,
    )


def ids(path: list[SignedDescriptor]) -> list[NodeId]:
    return [d.node_id for d in path]


# A mixed network: relays 0-7 in their own /16 and family, exits 8-11 (11 is exit+relay).
NETWORK = (
    *(node(i) for i in range(8)),
    node(8, roles=X),
    node(9, roles=X, policy=((25, 25),)),
    node(10, roles=X, policy=((1, 65535),)),
    node(11, roles=RX),
)


# --- Families and subnets ---------------------------------------------------------------


def test_family_key_prefers_operator_key_then_name_then_node() -> None:
    key = bytes(range(32))
    keyed = node(1, operator="Same Ops", operator_key=key)
    named = node(2, operator="  same   OPS ")
    named_too = node(3, operator="Same Ops")
    anonymous = node(4, operator="")
    assert family_key(keyed) == "key:" + b32encode(key)
    assert family_key(named) == family_key(named_too) == "name:same ops"
    assert family_key(named.body) == family_key(named)  # a body works too
    assert family_key(anonymous) == "node:" + b32encode(anonymous.node_id)
    assert family_key(node(5, operator="   ")) == "node:" + b32encode(
        node(5, operator="   ").node_id
    )
    # NFKC: a full-width name is the same name.
    assert family_key(node(6, operator="\uff2f\uff50\uff53")) == family_key(node(7, operator="ops"))


def test_subnet_key() -> None:
    assert subnet_key("192.0.2.7") == "192.0.0.0/16"
    assert subnet_key(("192.0.2.7", 7000)) == "192.0.0.0/16"
    assert subnet_key("192.1.2.7") == "192.1.0.0/16"
    assert subnet_key("2001:db8:1234::1") == "2001:db8::/32"
    assert subnet_key("2001:db9::1") == "2001:db9::/32"
    assert subnet_key("127.0.0.1") == subnet_key("127.0.5.9") == "127.0.0.0/16"
    assert subnet_key("::1") == "::/32"
    for bad in ("example.org", "", "300.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4.5", 7, ("nope", 1)):
        with pytest.raises(LocalProtocolError):
            subnet_key(bad)  # type: ignore[arg-type]


def test_relay_weight_floor_cap_and_health() -> None:
    book = HealthBook()
    slow = node(1, bandwidth=0)
    fast = node(2, bandwidth=100_000_000)
    liar = node(3, bandwidth=10**13)
    assert relay_weight(slow, book) == BANDWIDTH_FLOOR_BPS
    assert relay_weight(fast, book) == 100_000_000
    assert relay_weight(liar, book) == BANDWIDTH_CAP_BPS
    book.record_build(fast.node_id, ok=False, now=NOW)
    assert relay_weight(fast, book) == pytest.approx(75_000_000)


# --- Constraints and selectors ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hops": 0},
        {"hops": 6},
        {"hops": 3.0},
        {"hops": True},
        {"allow_same_subnet": 1},
        {"allow_same_operator_family": "yes"},
    ],
)
def test_constraints_refuse_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        PathConstraints(**kwargs)


def test_constraints_defaults() -> None:
    c = PathConstraints()
    assert (c.hops, c.allow_same_subnet, c.allow_same_operator_family) == (3, False, False)


def test_port_exit_selector() -> None:
    web = node(8, roles=X)
    mail = node(9, roles=X, policy=((25, 25),))
    wide = node(10, roles=X, policy=((1, 65535),))
    ranged = node(12, roles=X, policy=((20, 30), (8000, 8999)))
    assert PortExitSelector(443).accepts(web)
    assert not PortExitSelector(444).accepts(web)
    assert PortExitSelector(25).accepts(mail) and not PortExitSelector(443).accepts(mail)
    assert all(PortExitSelector(p).accepts(wide) for p in (1, 25, 65535))
    assert [
        p for p in (19, 20, 30, 31, 7999, 8000, 8999, 9000) if PortExitSelector(p).accepts(ranged)
    ] == [20, 30, 8000, 8999]
    assert PortExitSelector(25).describe() == "accepts port 25"
    for bad in (0, 65536, "80", True):
        with pytest.raises(LocalProtocolError):
            PortExitSelector(bad)  # type: ignore[arg-type]
    assert AnyExitSelector().accepts(mail)
    selector: ExitSelector = PortExitSelector(1)  # structurally (checked by mypy)
    assert selector.accepts(wide)


# --- select_path: the rules -------------------------------------------------------------


def check_rules(path: list[SignedDescriptor], constraints: PathConstraints) -> None:
    assert len(path) == constraints.hops
    assert EXIT in path[-1].body.roles
    if constraints.hops > 1:
        assert all(RELAY in d.body.roles for d in path[:-1])
    for a, b in itertools.combinations(path, 2):
        assert a.node_id != b.node_id
        if not constraints.allow_same_operator_family:
            assert family_key(a) != family_key(b)
        if not constraints.allow_same_subnet:
            assert not {subnet_key(x) for x in a.body.addresses} & {
                subnet_key(x) for x in b.body.addresses
            }


def test_three_hop_path_in_a_mixed_network() -> None:
    d = directory(*NETWORK)
    guards = GuardSet()
    path = pick(d, guards=guards)
    check_rules(path, PathConstraints())
    assert path[0].node_id in guards.node_ids
    assert PortExitSelector(443).accepts(path[-1])
    assert len(guards) == 3


@pytest.mark.parametrize("hops", [1, 2, 3, 4, 5])
def test_every_length(hops: int) -> None:
    d = directory(*NETWORK)
    for seed in range(20):
        guards = GuardSet()
        path = pick(d, guards=guards, hops=hops, seed=seed)
        check_rules(path, PathConstraints(hops=hops))
        if hops == 1:
            assert len(guards) == 0  # one hop: the exit is all there is, no guard
        else:
            assert path[0].node_id in guards.node_ids


def test_exit_accepts_the_port() -> None:
    d = directory(*NETWORK)
    for port, allowed in ((443, {8, 10, 11}), (25, {9, 10}), (22, {10})):
        exits = {pick(d, selector=PortExitSelector(port), seed=s)[-1] for s in range(40)}
        assert {e.node_id for e in exits} == {NETWORK[i].node_id for i in allowed}
    any_exits = {pick(d, selector=AnyExitSelector(), seed=s)[-1].node_id for s in range(60)}
    assert any_exits == {NETWORK[i].node_id for i in (8, 9, 10, 11)}


def test_no_exit_for_the_port() -> None:
    d = directory(*NETWORK[:9])  # exit 8 allows 80 and 443 only
    with pytest.raises(PathError, match=r"^no exit accepts port 25$") as caught:
        pick(d, selector=PortExitSelector(25))
    assert (caught.value.role, caught.value.reason) == ("exit", "no_exit")
    with pytest.raises(PathError, match="no exit is listed"):
        pick(directory(*NETWORK[:8]), selector=AnyExitSelector())


def test_too_few_relays() -> None:
    d = directory(node(0), node(8, roles=X))
    with pytest.raises(PathError, match=r"^only 2 relays usable for a 3-hop path$") as caught:
        pick(d)
    assert caught.value.reason == "too_few_relays"
    # Three nodes, but two are exit-only: one relay cannot be both entry and middle.
    d = directory(node(0), node(8, roles=X), node(9, roles=X, policy=WEB))
    with pytest.raises(
        PathError, match="only 1 relay can be entry or middle hops; a 3-hop path needs 2"
    ) as caught:
        pick(d)
    assert caught.value.role == "middle"


def test_own_node_is_never_in_a_path_or_a_guard() -> None:
    d = directory(*NETWORK)
    own = NETWORK[3].node_id
    for seed in range(30):
        guards = GuardSet()
        path = pick(d, guards=guards, own=own, seed=seed, hops=4)
        assert own not in ids(path)
        assert own not in guards.node_ids
    # Our own node held as a guard (say, from an old file) is dropped.
    guards = guard_set(own, NETWORK[0].node_id)
    pick(d, guards=guards, own=own)
    assert own not in guards.node_ids


def test_excluded_relays_never_appear_and_guards_are_skipped_not_replaced() -> None:
    d = directory(*NETWORK)
    guards = GuardSet()
    pick(d, guards=guards)
    held = guards.node_ids
    first = held[0]
    for seed in range(30):
        exclude = {first, NETWORK[10].node_id}
        path = select_path(
            d,
            exit_selector=PortExitSelector(443),
            guards=guards,
            health=HealthBook(),
            random_bytes=rng(seed),
            exclude=exclude,
            own_node_id=None,
        )
        assert not exclude & set(ids(path))
        assert path[0].node_id in held[1:]
    assert guards.node_ids == held
    with pytest.raises(PathError, match="no usable entry guard") as caught:
        select_path(
            d,
            exit_selector=PortExitSelector(443),
            guards=guards,
            health=HealthBook(),
            random_bytes=rng(),
            exclude=set(held),
            own_node_id=None,
        )
    assert (caught.value.role, caught.value.reason) == ("entry", "no_guard")
    assert guards.node_ids == held


def test_same_family_and_subnet_are_kept_apart() -> None:
    key = bytes(range(1, 33))
    d = directory(
        node(0, operator_key=key),
        node(1, operator_key=key),  # same family as 0 (operator key)
        node(2, operator="Big Ops"),
        node(3, operator="big ops"),  # same family as 2 (name)
        node(4, hosts=("10.0.9.9",)),  # same /16 as 0
        node(5, hosts=("2001:db8:1::1", "10.50.0.1")),
        node(6, hosts=("2001:db8:2::1",)),  # same /32 as 5 (IPv6)
        node(8, roles=X),
        node(12, roles=X, hosts=("10.50.3.3",)),  # same /16 as 5 (its second address)
    )
    for seed in range(200):
        path = pick(d, seed=seed, hops=4)
        check_rules(path, PathConstraints(hops=4))


# --- Loopback testnets ------------------------------------------------------------------


def loopback_network() -> tuple[SignedDescriptor, ...]:
    return (
        *(node(i, hosts=("127.0.0.1",)) for i in range(4)),
        node(8, roles=X, hosts=("127.0.0.1",)),
    )


def test_loopback_testnet_needs_the_subnet_flag() -> None:
    d = directory(*loopback_network())
    with pytest.raises(PathError) as caught:
        pick(d)
    assert caught.value.reason == "no_path"
    message = str(caught.value)
    assert "127.0.0.0/16" in message and "allow_same_subnet" in message
    guards = GuardSet()
    for seed in range(20):
        path = pick(d, guards=guards, seed=seed, allow_same_subnet=True)
        check_rules(path, PathConstraints(allow_same_subnet=True))
    assert len(guards) == 3


def test_shared_operator_needs_the_family_flag() -> None:
    d = directory(*(node(i, operator="lab") for i in range(4)), node(8, roles=X, operator="lab"))
    with pytest.raises(PathError, match="1 operator family;"):
        pick(d)
    path = pick(d, allow_same_operator_family=True)
    check_rules(path, PathConstraints(allow_same_operator_family=True))


def test_no_path_message_names_the_rules() -> None:
    # Four distinct subnets, but entry and middle must both avoid exit 8's family.
    d = directory(node(0, operator="x"), node(1, operator="x"), node(8, roles=X, operator="x"))
    with pytest.raises(PathError) as caught:
        pick(d)
    assert str(caught.value).startswith(
        "no 3-hop path with distinct nodes, operator families, /16 (IPv4) or /32 (IPv6) "
        "subnets among 3 relays"
    )


# --- Hypothesis: the rules hold, and "no path" is true ----------------------------------


Spec = tuple[frozenset[DescriptorRole], int, int | None, int, tuple[tuple[int, int], ...]]
"""roles, subnet index, family index (None: no operator), bandwidth, exit policy"""

node_specs = st.lists(
    st.tuples(
        st.sampled_from([R, R, X, RX]),
        st.integers(min_value=0, max_value=3),  # subnet
        st.one_of(st.none(), st.integers(min_value=0, max_value=2)),  # family
        st.sampled_from([0, 5_000_000, 50_000_000, 5_000_000_000]),
        st.sampled_from([WEB, ((25, 25),), ((1, 65535),)]),
    ),
    min_size=1,
    max_size=8,
)


def build_network(specs: list[Spec]) -> list[SignedDescriptor]:
    return [
        node(
            i,
            roles=roles,
            policy=policy if EXIT in roles else (),
            hosts=(f"10.{subnet}.{i}.1",),
            operator=f"fam{family}" if family is not None else "",
            bandwidth=bandwidth,
        )
        for i, (roles, subnet, family, bandwidth, policy) in enumerate(specs)
    ]


def valid(path: tuple[SignedDescriptor, ...], c: PathConstraints) -> bool:
    try:
        check_rules(list(path), c)
    except AssertionError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(
    specs=node_specs,
    hops=st.integers(min_value=1, max_value=5),
    port=st.sampled_from([443, 25, 22]),
    seed=st.integers(min_value=0, max_value=2**32),
    same_subnet=st.booleans(),
    same_family=st.booleans(),
)
def test_paths_keep_the_rules_or_none_exists(
    specs: list[Spec],
    hops: int,
    port: int,
    seed: int,
    same_subnet: bool,
    same_family: bool,
) -> None:
    network = build_network(specs)
    d = directory(*network)
    c = PathConstraints(
        hops=hops, allow_same_subnet=same_subnet, allow_same_operator_family=same_family
    )
    guards = GuardSet()
    selector = PortExitSelector(port)
    try:
        path = select_path(
            d,
            constraints=c,
            exit_selector=selector,
            guards=guards,
            health=HealthBook(),
            random_bytes=rng(seed),
            own_node_id=None,
        )
    except PathError as exc:
        exits = [n for n in network if EXIT in n.body.roles and selector.accepts(n)]
        relays = [n for n in network if RELAY in n.body.roles]
        if exc.reason == "no_exit":
            assert not exits
        elif exc.reason == "too_few_relays":
            assert len({n.node_id for n in (*exits, *relays)}) < hops or len(relays) < hops - 1
        else:
            assert exc.reason == "no_path"
            # No path with a guard entry exists at all (brute force).
            entries = [n for n in relays if n.node_id in guards.node_ids]
            assert entries
            for entry, exit_ in itertools.product(entries, exits):
                for middles in itertools.permutations(relays, hops - 2):
                    assert not valid((entry, *middles, exit_), c)
        return
    check_rules(path, c)
    assert selector.accepts(path[-1])
    if hops > 1:
        assert path[0].node_id in guards.node_ids
    # Guards themselves keep the diversity rules among each other.
    held = [d.get(g) for g in guards.node_ids]
    for a, b in itertools.combinations(held, 2):
        assert a is not None and b is not None
        if not same_family:
            assert family_key(a) != family_key(b)
        if not same_subnet:
            assert subnet_key(a.body.addresses[0]) != subnet_key(b.body.addresses[0])


# --- Weighting --------------------------------------------------------------------------


def chi_square(counts: list[int], weights: list[float]) -> float:
    total = sum(counts)
    expected = [total * w / sum(weights) for w in weights]
    return sum((o - e) ** 2 / e for o, e in zip(counts, expected, strict=True))


def test_middles_are_drawn_in_proportion_to_bandwidth() -> None:
    bandwidths = [0, 20_000_000, 40_000_000, 80_000_000, 10**13]  # floor 10 M, cap 1 G
    weights = [10e6, 20e6, 40e6, 80e6, 1e9]
    middles = [node(i + 1, bandwidth=bw) for i, bw in enumerate(bandwidths)]
    d = directory(node(0), *middles, node(8, roles=X))
    guards = guard_set(node(0).node_id)
    stream = rng(b"weights")
    counts = dict.fromkeys((m.node_id for m in middles), 0)
    for _ in range(6000):
        path = select_path(
            d,
            exit_selector=PortExitSelector(443),
            guards=guards,
            health=HealthBook(),
            random_bytes=stream,
            own_node_id=None,
        )
        assert ids(path)[0] == node(0).node_id and ids(path)[2] == node(8).node_id
        counts[path[1].node_id] += 1
    observed = [counts[m.node_id] for m in middles]
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
    assert chi_square(observed, weights) < 18.47, observed


def test_health_lowers_a_relays_share() -> None:
    middles = [node(i + 1, bandwidth=50_000_000) for i in range(2)]
    d = directory(node(0), *middles, node(8, roles=X))
    health = HealthBook()
    for _ in range(6):  # factor (0 + 3) / (6 + 3) = 1/3
        health.record_build(middles[0].node_id, ok=False, now=NOW)
    assert health.weight_factor(middles[0].node_id) == pytest.approx(1 / 3)
    guards = guard_set(node(0).node_id)
    stream = rng(b"health")
    hits = 0
    for _ in range(4000):
        path = select_path(
            d,
            exit_selector=PortExitSelector(443),
            guards=guards,
            health=health,
            random_bytes=stream,
            own_node_id=None,
        )
        hits += path[1].node_id == middles[0].node_id
    assert chi_square([hits, 4000 - hits], [1 / 3, 1]) < 10.83  # 1 df, p = 0.001


def test_exits_are_drawn_in_proportion_to_bandwidth() -> None:
    exits = [node(8 + i, roles=X, bandwidth=bw) for i, bw in enumerate((10_000_000, 90_000_000))]
    d = directory(*exits)
    stream = rng(b"exits")
    hits = sum(pick_with(d, stream, hops=1)[0].node_id == exits[1].node_id for _ in range(3000))
    assert chi_square([3000 - hits, hits], [1, 9]) < 10.83


def pick_with(
    d: Directory, stream: DeterministicBytes, **constraints: object
) -> list[SignedDescriptor]:
    return select_path(
        d,
        constraints=PathConstraints(**constraints),  # type: ignore[arg-type]
        exit_selector=PortExitSelector(443),
        guards=GuardSet(),
        health=HealthBook(),
        random_bytes=stream,
        own_node_id=None,
    )


# --- Guards -----------------------------------------------------------------------------


def guard_set(*node_ids: NodeId, chosen_at: float = NOW, **settings_: object) -> GuardSet:
    entries = [
        {
            "id": b32encode(n),
            "chosen_at": chosen_at,
            "failures": 0,
            "first_failure_at": None,
            "last_failure_at": None,
        }
        for n in node_ids
    ]
    return GuardSet.from_json(json.dumps({"format": GUARDS_FORMAT, "guards": entries}), **settings_)  # type: ignore[arg-type]


def test_guards_are_sticky_across_calls() -> None:
    d = directory(*NETWORK)
    guards = GuardSet()
    entries = set()
    pick(d, guards=guards)
    held, revision = guards.node_ids, guards.revision
    assert len(held) == 3
    for seed in range(100):
        entries.add(pick(d, guards=guards, seed=seed)[0].node_id)
    assert guards.node_ids == held
    assert guards.revision == revision  # nothing to save
    assert entries == {held[0]}  # the first guard while it works


def test_guards_survive_a_json_round_trip() -> None:
    d = directory(*NETWORK)
    guards = GuardSet()
    pick(d, guards=guards)
    text = guards.to_json()
    loaded = GuardSet.from_json(text)
    assert loaded.guards == guards.guards
    assert loaded.to_json() == text
    assert loaded.skipped == 0
    for seed in range(20):
        assert pick(d, guards=loaded, seed=seed)[0].node_id == guards.node_ids[0]
    assert loaded.guards == guards.guards


def test_guards_are_not_replaced_by_better_relays() -> None:
    d = directory(*NETWORK)
    guards = GuardSet()
    pick(d, guards=guards)
    held = guards.node_ids
    rich = node(20, bandwidth=10**12)
    bigger = directory(*NETWORK, rich)
    assert guards.refresh(bigger, health=HealthBook(), random_bytes=rng(), now=NOW) == ()
    assert guards.node_ids == held


def test_a_guard_that_disappears_is_replaced() -> None:
    d = directory(*NETWORK)
    guards = GuardSet()
    pick(d, guards=guards)
    gone = guards.node_ids[0]
    rest = guards.node_ids[1:]
    smaller = directory(*(n for n in NETWORK if n.node_id != gone))
    changes = guards.refresh(smaller, health=HealthBook(), random_bytes=rng(), now=NOW)
    assert changes[0] == GuardChange(gone, "unlisted")
    assert [c.kind for c in changes] == ["unlisted", "added"]
    assert guards.node_ids[:2] == rest  # the others keep their places
    assert guards.node_ids[2] == changes[1].node_id != gone
    assert pick(smaller, guards=guards)[0].node_id == rest[0]


def test_a_guard_that_stops_relaying_is_replaced() -> None:
    guards = guard_set(NETWORK[0].node_id, NETWORK[1].node_id, NETWORK[2].node_id)
    exit_only = node(0, roles=X, published_at=T0 + 1)  # a newer descriptor, no relay role
    d = directory(*NETWORK, exit_only)
    changes = guards.refresh(d, health=HealthBook(), random_bytes=rng(), now=NOW)
    assert changes[0] == GuardChange(NETWORK[0].node_id, "unlisted")
    assert NETWORK[0].node_id not in guards.node_ids


def test_guards_expire_after_their_lifetime() -> None:
    guards = GuardSet()
    d = directory(*NETWORK)
    pick(d, guards=guards)
    chosen = [g.chosen_at for g in guards.guards]
    # Backdated by up to a tenth of the lifetime, so they do not all expire together.
    assert all(NOW - GUARD_LIFETIME_S / 10 <= t <= NOW for t in chosen)
    assert len(set(chosen)) == 3
    first_out = min(chosen) + GUARD_LIFETIME_S
    later = first_out + 1
    fresh = [node(i, published_at=int(later) - 60) for i in range(8)]
    d_later = directory(*fresh, now=later)
    changes = guards.refresh(d_later, health=HealthBook(), random_bytes=rng(), now=later)
    expired = [c for c in changes if c.kind == "expired"]
    assert len(expired) == 1 and len(guards) == 3
    # Within the lifetime nothing expires.
    held = guards.node_ids
    assert guards.refresh(d_later, health=HealthBook(), random_bytes=rng(), now=later) == ()
    assert guards.node_ids == held


def test_a_guard_chosen_far_in_the_future_counts_as_expired() -> None:
    guards = guard_set(NETWORK[0].node_id, chosen_at=NOW + GUARD_LIFETIME_S)
    changes = guards.refresh(directory(*NETWORK), health=HealthBook(), random_bytes=rng(), now=NOW)
    assert changes[0] == GuardChange(NETWORK[0].node_id, "expired")


def test_a_guard_is_replaced_only_after_failing_long_and_often() -> None:
    d = directory(*NETWORK)
    guards = guard_set(*(n.node_id for n in NETWORK[:3]))
    bad = NETWORK[0].node_id
    # Many quick failures: not enough (an adversary could cause those cheaply).
    for i in range(GUARD_MAX_FAILURES * 3):
        assert guards.record_failure(bad, now=NOW + i)
    assert guards.refresh(d, health=HealthBook(), random_bytes=rng(), now=NOW + 100) == ()
    # A success forgives everything.
    assert guards.record_success(bad)
    assert guards.guards[0].failures == 0
    # Failing for long, but too rarely: kept.
    for i in range(GUARD_MAX_FAILURES - 1):
        guards.record_failure(bad, now=NOW + i * 3600)
    later = NOW + GUARD_FAILING_FOR_S * 3
    assert guards.refresh(d, health=HealthBook(), random_bytes=rng(), now=later) == ()
    guards.record_failure(bad, now=later)
    changes = guards.refresh(d, health=HealthBook(), random_bytes=rng(), now=later)
    assert changes[0] == GuardChange(bad, "failed")
    assert changes[1].kind == "added" and changes[1].node_id != bad
    assert bad not in guards.node_ids
    assert not guards.record_failure(bad, now=later)  # no longer ours
    assert not guards.record_success(bad)


def test_failing_guards_back_off_behind_the_others() -> None:
    a, b, c = (n.node_id for n in NETWORK[:3])
    guards = guard_set(a, b, c)
    assert [g.node_id for g in guards.ordered(NOW)] == [a, b, c]
    guards.record_failure(a, now=NOW)
    assert guards.guards[0].retry_at() == NOW + 60
    assert [g.node_id for g in guards.ordered(NOW + 30)] == [b, c, a]
    assert [g.node_id for g in guards.ordered(NOW + 60)] == [a, b, c]
    guards.record_failure(a, now=NOW + 60)
    assert guards.guards[0].retry_at() == NOW + 60 + 120
    for i in range(20):
        guards.record_failure(a, now=NOW + 1000 + i)
    assert guards.guards[0].retry_at() == NOW + 1019 + 3600  # capped at an hour
    guards.record_failure(b, now=NOW)
    assert [g.node_id for g in guards.ordered(NOW + 30)] == [c, b, a]  # soonest retry first
    # select_path enters through the guard that is not backing off.
    d = directory(*NETWORK, now=NOW + 30)
    assert pick(d, guards=guards)[0].node_id == c


def test_guards_are_drawn_by_weight() -> None:
    rich = [node(i, bandwidth=BANDWIDTH_CAP_BPS) for i in range(2)]
    poor = [node(i) for i in range(2, 20)]
    d = directory(*rich, *poor)
    hits = 0
    for seed in range(300):
        guards = GuardSet(size=1)
        guards.refresh(d, health=HealthBook(), random_bytes=rng(seed), now=NOW)
        hits += guards.node_ids[0] in {r.node_id for r in rich}
    # Weight 2 x 1000 against 18 x 10: rich ones ~92% of the time.
    assert 0.85 * 300 < hits < 0.97 * 300


def test_guard_set_is_smaller_when_too_few_relays_fit() -> None:
    same_net = [node(i, hosts=(f"10.0.{i}.1",)) for i in range(5)]
    guards = GuardSet()
    changes = guards.refresh(directory(*same_net), health=HealthBook(), random_bytes=rng(), now=NOW)
    assert len(guards) == 1 and len(changes) == 1
    guards.refresh(
        directory(*same_net),
        health=HealthBook(),
        random_bytes=rng(),
        now=NOW,
        constraints=PathConstraints(allow_same_subnet=True),
    )
    assert len(guards) == 3


# --- Guard persistence and validation ---------------------------------------------------


def guard_entry(n: int = 0, **changes: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "id": b32encode(NETWORK[n].node_id),
        "chosen_at": NOW,
        "failures": 0,
        "first_failure_at": None,
        "last_failure_at": None,
    }
    entry.update(changes)
    return entry


BAD_GUARDS = [
    None,
    "guard",
    guard_entry(id="!!"),
    guard_entry(id=b32encode(b"short")),
    guard_entry(id=None),
    guard_entry(chosen_at="yesterday"),
    guard_entry(chosen_at=float("nan")),
    guard_entry(chosen_at=True),
    guard_entry(failures=-1),
    guard_entry(failures=1.0),
    guard_entry(failures=0, first_failure_at=NOW),
    guard_entry(failures=2, first_failure_at=None, last_failure_at=NOW),
    guard_entry(failures=2, first_failure_at=NOW + 5, last_failure_at=NOW),
    {"id": b32encode(NETWORK[0].node_id)},
    {**guard_entry(), "extra": 1},
]


def test_guard_load_skips_bad_and_repeated_entries_and_keeps_size() -> None:
    failing = guard_entry(1, failures=2, first_failure_at=NOW, last_failure_at=NOW + 9)
    entries = [guard_entry(0), *BAD_GUARDS, failing, guard_entry(0), guard_entry(2), guard_entry(3)]
    loaded = GuardSet.from_json(json.dumps({"format": GUARDS_FORMAT, "guards": entries}))
    assert loaded.node_ids == tuple(NETWORK[i].node_id for i in (0, 1, 2))
    assert loaded.skipped == len(BAD_GUARDS) + 1
    assert loaded.guards[1].failures == 2
    small = GuardSet.from_json(loaded.to_json(), size=1)
    assert small.node_ids == (NETWORK[0].node_id,)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[",
        "{}",
        "[]",
        json.dumps({"format": GUARDS_FORMAT}),
        json.dumps({"format": GUARDS_FORMAT, "guards": 3}),
        json.dumps({"format": "meshnode/guards/v0", "guards": []}),
    ],
)
def test_guard_load_refuses_what_is_not_a_snapshot(text: str) -> None:
    with pytest.raises(DecodeError):
        GuardSet.from_json(text)


def test_guard_load_refuses_non_text() -> None:
    with pytest.raises(DecodeError):
        GuardSet.from_json(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": 2.0},
        {"max_failures": 0},
        {"lifetime_s": 0},
        {"failing_for_s": float("inf")},
    ],
)
def test_guard_set_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        GuardSet(**kwargs)


def test_guard_refuses_bad_values() -> None:
    with pytest.raises(LocalProtocolError):
        Guard(node_id=NodeId(b"short"), chosen_at=NOW)
    with pytest.raises(LocalProtocolError):
        Guard(node_id=NETWORK[0].node_id, chosen_at=NOW, failures=1)
    guards = GuardSet()
    with pytest.raises(LocalProtocolError):
        guards.record_failure(NETWORK[0].node_id, now=float("nan"))
    with pytest.raises(LocalProtocolError):
        guards.refresh(directory(), health=HealthBook(), random_bytes=rng(), now=float("inf"))


def test_select_path_refuses_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        select_path(
            [],  # type: ignore[arg-type]
            exit_selector=AnyExitSelector(),
            guards=GuardSet(),
            health=HealthBook(),
            random_bytes=rng(),
            own_node_id=None,
        )
    with pytest.raises(LocalProtocolError):
        select_path(
            directory(*NETWORK),
            constraints={"hops": 3},  # type: ignore[arg-type]
            exit_selector=AnyExitSelector(),
            guards=GuardSet(),
            health=HealthBook(),
            random_bytes=rng(),
            own_node_id=None,
        )
    with pytest.raises(LocalProtocolError, match="wrong number of bytes"):
        select_path(
            directory(*NETWORK),
            exit_selector=AnyExitSelector(),
            guards=GuardSet(),
            health=HealthBook(),
            random_bytes=lambda n: b"",
            own_node_id=None,
        )
