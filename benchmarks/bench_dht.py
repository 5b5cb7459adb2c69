"""DHT simulation benchmark: lookup hops and success at N nodes, with and without churn.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_dht               # 2,000 nodes, 200 lookups (~16 min)
    .venv/bin/python -m benchmarks.bench_dht --quick       # 300 nodes, 50 lookups (~35 s)
    .venv/bin/python -m benchmarks.bench_dht --json        # JSON on stdout, table on stderr

Options: ``--nodes N``, ``--lookups N``, ``--churn F``, ``--loss F``, ``--publish F``
(fraction of nodes that publish; publishing is most of the run time), ``--exit-trials
N``, ``--ksize K``, ``--alpha A`` (``DhtConfig``), ``--seed S``.

Everything runs in one process over :class:`discovery.transport.MemoryNetwork`, with the
real DHT code (:class:`discovery.dht.DhtNode`: its routing tables, crawlers, RPC codec,
stores and verification); nothing of the DHT is re-implemented here. What is simulated:

- **Time.** The asyncio loop's clock is virtual (:class:`VirtualTimeLoop`): when the loop
  has nothing ready to run it jumps to its next timer instead of sleeping, so RPC
  timeouts (``DhtConfig.rpc_timeout_s``, 3 s) and network latency cost no real time.
  Descriptors are stamped with ``EPOCH + loop.time()`` (a fixed Unix time plus the
  virtual clock), so they stay valid for the whole run.
- **The network.** A one-way delay per frame drawn uniformly from 10-50 ms (seeded), no
  loss unless ``--loss``; a node switched off with ``MemoryNetwork.down`` neither sends
  nor receives (churn).
- **The nodes.** N identities from a seeded RNG, each with its own ``MemoryTransport``
  and a distinct 127.x.y.z address. They join in growing concurrent batches (at most
  ``JOIN_BATCH`` at a time), each bootstrapping from ``JOIN_CONTACTS`` random nodes that
  joined before it. Then nodes publish their descriptors (``DhtNode.publish``): 10% of
  all nodes as exits (region EU or NA, a country in it), and relays (a region, no
  country) up to ``--publish`` of all nodes (default: every node publishes, as every
  relay and exit does in meshnode/node.py).

What is measured:

1. Lookups of existing node ids: ``find_node(target)`` from a random node, one after the
   other, first with every node up, then with a random 20% of the nodes switched off
   (never the lookup's source or target; their contacts stay in everyone's routing
   table, so lookups must route around them through timeouts). Reported: success (the
   target is among the nodes the lookup returns), the lookup's ``rounds`` (iterative
   rounds = hops, the number judged against the target), "path hops" (for the
   diagnosis: how many RPCs deep the target was first learned, 0 if the source already
   knew it), virtual latency, RPCs per lookup, and how many switched-off nodes the
   lookup returned among its k "nodes that answered". The same number of
   ``get_descriptor`` calls for random published nodes gives the "descriptor found" rate.
   Target: median hops <= log2(N)/2 and success >= 99% (judged on every row).
2. A fresh node finding exits in a separate 200-node network with 20 exits (10 EU,
   10 NA): it bootstraps from one random contact, then calls
   ``find_providers(Topic(EXIT), want=5)``, or with ``region="EU"``. Virtual seconds
   for the join and the find, and RPCs sent (``dht.rpc.sent.*``), over several trials.
   Each fresh node leaves after its trial (switched off and removed from every routing
   table), so every trial sees the same 200 nodes. The relays of that network publish
   as in the main one (``--publish``).

Also reported: real wall time of each phase and peak RSS (``resource.getrusage``) after
setup. Always exits 0 once it has results: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import random
import resource
import selectors
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kademlia.node import Node

from discovery.constants import DESCRIPTOR_LIFETIME_S
from discovery.descriptor import DescriptorRole, NodeDescriptor, sign
from discovery.dht import DhtConfig, DhtNode, LinkNode, RpcResult
from discovery.providers import Topic
from discovery.transport import LinkAddress, MemoryNetwork
from meshnode import crypto
from meshnode.identity import Identity

T = TypeVar("T")

EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z: Unix time at virtual time 0
PORT = 7000
LATENCY_S = (0.010, 0.050)  # one-way delay per frame, drawn uniformly
EXIT_FRACTION = 0.10
REGIONS: dict[str, tuple[str, ...]] = {"EU": ("DE", "FR", "NL", "SE"), "NA": ("US", "CA")}
JOIN_BATCH = 64  # nodes joining at once (the batch also never exceeds the nodes joined)
JOIN_CONTACTS = 2  # bootstrap contacts per joining node
PUBLISH_BATCH = 64  # nodes publishing at once
TARGET_SUCCESS = 0.99
EXIT_NET_NODES = 200
EXIT_NET_EXITS = 20
EXIT_WANT = 5


@dataclass(frozen=True, slots=True)
class Plan:
    nodes: int
    lookups: int
    churn: float
    exit_trials: int
    publish: float  # fraction of the nodes that publish (the exits always do)
    loss: float
    seed: int
    ksize: int = DhtConfig().ksize  # the shipped defaults
    alpha: int = DhtConfig().alpha


DEFAULT = Plan(nodes=2000, lookups=200, churn=0.20, exit_trials=20, publish=1.0, loss=0.0, seed=1)
QUICK = Plan(nodes=300, lookups=50, churn=0.20, exit_trials=5, publish=0.25, loss=0.0, seed=1)


def _progress(message: str) -> None:
    print(f"[bench_dht] {message}", file=sys.stderr, flush=True)


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# --- Virtual time ------------------------------------------------------------------------


class SimulationStalled(RuntimeError):
    """The loop would wait forever: nothing ready, no timer, and no I/O in a simulation."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector that never blocks: a wait for ``timeout`` advances the virtual clock.

    The real selector underneath only serves the loop's own self-pipe (nothing in the
    simulation does real I/O); it is polled without blocking.
    """

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._inner.select(0)
        if events:
            return events
        if timeout is None:
            raise SimulationStalled("the simulation would wait forever (nothing scheduled)")
        if timeout > 0:
            # The loop computed timeout = next timer - now: jump there instead of sleeping.
            self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is virtual and that never sleeps (see module doc)."""

    def __init__(self) -> None:
        self._vselector = _VirtualSelector()
        super().__init__(self._vselector)

    def time(self) -> float:
        return self._vselector.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# --- The simulated network -----------------------------------------------------------------


@dataclass(slots=True)
class SimNode:
    identity: Identity
    addr: tuple[str, int]
    dht: DhtNode

    @property
    def node_id(self) -> bytes:
        return self.identity.node_id

    @property
    def link_address(self) -> LinkAddress:
        return LinkAddress(self.addr[0], self.addr[1], self.identity.link_public)


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


async def _batched(factories: Sequence[Callable[[], Awaitable[T]]], batch: int) -> list[T]:
    results: list[T] = []
    for start in range(0, len(factories), batch):
        chunk = factories[start : start + batch]
        results.extend(await asyncio.gather(*(f() for f in chunk)))
    return results


def _rpcs_sent(stats: Counter[str]) -> int:
    return sum(v for k, v in stats.items() if k.startswith("dht.rpc.sent."))


class Sim:
    """N DhtNodes over one MemoryNetwork on the running (virtual-time) loop."""

    def __init__(self, rng: random.Random, *, config: DhtConfig, loss: float, subnet: int) -> None:
        self.rng = rng
        self.loop = asyncio.get_running_loop()
        latency_rng = random.Random(rng.getrandbits(64))
        self.net = MemoryNetwork(
            latency_s=lambda: latency_rng.uniform(*LATENCY_S),
            loss=loss,
            rng=random.Random(rng.getrandbits(64)),
        )
        self.config = config
        self.subnet = subnet
        self.nodes: list[SimNode] = []
        self._created = 0
        self._onion = crypto.x25519_public_from_private(rng.randbytes(32))
        self.join_failures = 0

    def clock(self) -> float:
        """Unix time: the fixed epoch plus the loop's virtual clock."""
        return EPOCH + self.loop.time()

    def new_node(self) -> SimNode:
        i = self._created
        self._created += 1
        identity = Identity(
            identity_seed=self.rng.randbytes(32), link_private=self.rng.randbytes(32)
        )
        addr = (f"127.{self.subnet + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}", PORT)
        transport = self.net.transport(identity.node_id, identity.link_public, addr)
        dht = DhtNode(
            identity.node_id,
            identity.link_public,
            transport,
            config=self.config,
            clock=self.clock,
            random_bytes=self.rng.randbytes,
        )
        return SimNode(identity, addr, dht)

    async def join_one(self, node: SimNode, contacts: Sequence[SimNode]) -> bool:
        result = await node.dht.bootstrap([c.link_address for c in contacts])
        if not result.nodes:
            self.join_failures += 1
            return False
        return True

    async def grow(self, count: int) -> None:
        """Create ``count`` nodes and join them in growing concurrent batches."""
        if not self.nodes:
            self.nodes.append(self.new_node())  # the first node has nobody to join
            count -= 1
        while count > 0:
            size = min(count, JOIN_BATCH, len(self.nodes))
            joined = list(self.nodes)
            batch = [self.new_node() for _ in range(size)]
            await asyncio.gather(
                *(
                    self.join_one(n, self.rng.sample(joined, min(JOIN_CONTACTS, len(joined))))
                    for n in batch
                )
            )
            self.nodes.extend(batch)
            count -= size

    async def publish(self, node: SimNode, *, exit_node: bool, region: str, country: str) -> int:
        now = int(self.clock())
        roles = {DescriptorRole.RELAY, DescriptorRole.EXIT} if exit_node else {DescriptorRole.RELAY}
        body = NodeDescriptor(
            version=now,
            identity_key=node.identity.identity_public,
            link_key=node.identity.link_public,
            onion_key=self._onion,
            addresses=(node.addr,),
            roles=frozenset(roles),
            exit_policy=((80, 80), (443, 443)) if exit_node else (),
            region=region,
            country=country,
            software="meshnode/bench",
            published_at=now,
            expires_at=now + DESCRIPTOR_LIFETIME_S,
        )
        return await node.dht.publish(sign(body, node.identity))

    def choose_publishers(self, exits: int, fraction: float) -> tuple[list[SimNode], list[SimNode]]:
        """``exits`` random exits, plus random relays up to ``fraction`` of all nodes."""
        exit_nodes = self.rng.sample(self.nodes, exits)
        exit_ids = {n.node_id for n in exit_nodes}
        others = [n for n in self.nodes if n.node_id not in exit_ids]
        relays = self.rng.sample(
            others, min(len(others), max(0, round(fraction * len(self.nodes)) - exits))
        )
        return exit_nodes, relays

    async def publish_all(
        self, exits: Sequence[SimNode], relays: Sequence[SimNode]
    ) -> dict[str, Any]:
        """Exits publish a region and a country; relays a region only."""
        exit_ids = {n.node_id for n in exits}
        publishers = [*exits, *relays]
        self.rng.shuffle(publishers)
        regions = sorted(REGIONS)
        plan: list[Callable[[], Awaitable[int]]] = []
        exit_regions: Counter[str] = Counter()
        for i, node in enumerate(publishers):
            is_exit = node.node_id in exit_ids
            if is_exit:  # exits alternate between the regions, so each gets its share
                region = regions[sum(exit_regions.values()) % len(regions)]
                exit_regions[region] += 1
            else:
                region = regions[i % len(regions)]
            country = self.rng.choice(REGIONS[region]) if is_exit else ""

            def job(
                n: SimNode = node, e: bool = is_exit, r: str = region, c: str = country
            ) -> Awaitable[int]:
                return self.publish(n, exit_node=e, region=r, country=c)

            plan.append(job)
        acks = await _batched(plan, PUBLISH_BATCH)
        return {
            "descriptors": len(plan),
            "exits": len(exits),
            "relays": len(relays),
            "exit_regions": dict(exit_regions),
            "acks_median": _median(acks),
        }

    def forget(self, node: SimNode) -> None:
        """``node`` leaves: switched off and dropped from every routing table."""
        self.net.down(node.identity.link_public)
        node.dht.close()
        for other in self.nodes:
            other.dht.router.remove_contact(node.dht.node)

    async def close(self) -> None:
        for node in self.nodes:
            node.dht.close()
        await asyncio.sleep(0)  # let the cancelled background tasks unwind


# --- Lookups ---------------------------------------------------------------------------------


class _HopTracer:
    """Wraps one node's ``call_find_node`` during one lookup: how deep the target was found.

    A contact from the source's own routing table is at depth 0; a contact first learned
    from the answer of a node at depth d is at depth d + 1. The target's depth when it
    first appears is the lookup's path length in hops.
    """

    def __init__(self, node: DhtNode, target: bytes) -> None:
        self.protocol = node.protocol
        self.original = node.protocol.call_find_node
        self.target = target
        self.depth: dict[bytes, int] = {}
        self.found_at: int | None = None
        if not node.router.is_new_node(Node(target)):
            self.found_at = 0

    async def __call__(self, node_to_ask: LinkNode, node_to_find: Node) -> RpcResult:
        result: RpcResult = await self.original(node_to_ask, node_to_find)
        ok, contacts = result
        if ok:
            depth = self.depth.get(node_to_ask.id, 0) + 1
            for contact in contacts:
                self.depth.setdefault(contact.node_id, depth)
                if contact.node_id == self.target and self.found_at is None:
                    self.found_at = depth
        return result

    def __enter__(self) -> _HopTracer:
        self.protocol.call_find_node = self  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.protocol.call_find_node


async def measure_lookups(
    sim: Sim, *, lookups: int, churn: float, published: set[bytes], rng: random.Random
) -> dict[str, Any]:
    down = rng.sample(sim.nodes, round(churn * len(sim.nodes)))
    down_ids = {n.node_id for n in down}
    for node in down:
        sim.net.down(node.identity.link_public)
    alive = [n for n in sim.nodes if n.node_id not in down_ids]
    rounds: list[int] = []
    path_hops: list[int] = []
    latency: list[float] = []
    rpcs: list[int] = []
    timeouts: list[int] = []
    dead_returned: list[int] = []  # switched-off nodes among the "k nearest that answered"
    ok = 0
    real0 = time.perf_counter()
    for _ in range(lookups):
        source, target = rng.sample(alive, 2)
        sent0 = _rpcs_sent(source.dht.stats)
        timeouts0 = source.dht.stats["dht.rpc.timeout.find_node"]
        start = sim.loop.time()
        with _HopTracer(source.dht, target.node_id) as tracer:
            result = await source.dht.find_node(target.node_id)
        latency.append(sim.loop.time() - start)
        rounds.append(result.rounds)
        rpcs.append(_rpcs_sent(source.dht.stats) - sent0)
        timeouts.append(source.dht.stats["dht.rpc.timeout.find_node"] - timeouts0)
        if any(n.id == target.node_id for n in result.nodes):
            ok += 1
        dead_returned.append(sum(1 for n in result.nodes if n.id in down_ids))
        if tracer.found_at is not None:
            path_hops.append(tracer.found_at)
    lookup_real_s = time.perf_counter() - real0

    # get_descriptor for random published, live nodes (their replicas may be down).
    candidates = [n for n in alive if n.node_id in published]
    found = 0
    desc_latency: list[float] = []
    real1 = time.perf_counter()
    for _ in range(lookups):
        source = rng.choice(alive)
        target = rng.choice([n for n in candidates if n is not source] or candidates)
        start = sim.loop.time()
        descriptor = await source.dht.get_descriptor(target.node_id)
        desc_latency.append(sim.loop.time() - start)
        if descriptor is not None and descriptor.node_id == target.node_id:
            found += 1
    descriptor_real_s = time.perf_counter() - real1

    for node in down:
        sim.net.up(node.identity.link_public)
    n = len(sim.nodes)
    success = ok / lookups if lookups else math.nan
    median_rounds = _median(rounds)
    return {
        "nodes": n,
        "log2_n": math.log2(n),
        "churn": churn,
        "nodes_down": len(down),
        "lookups": lookups,
        "success": success,
        "hops_median": median_rounds,
        "hops_p90": _percentile(rounds, 0.9),
        "hops_max": max(rounds) if rounds else math.nan,
        "path_hops_median": _median(path_hops),
        "path_hops_p90": _percentile(path_hops, 0.9),
        "latency_s_median": _median(latency),
        "latency_s_p90": _percentile(latency, 0.9),
        "rpcs_median": _median(rpcs),
        "timeouts_median": _median(timeouts),
        "dead_returned_mean": statistics.fmean(dead_returned) if dead_returned else math.nan,
        "lookups_returning_dead": sum(1 for d in dead_returned if d) / lookups,
        "descriptor_success": found / lookups if lookups else math.nan,
        "descriptor_latency_s_median": _median(desc_latency),
        "hops_target": math.log2(n) / 2,
        "meets_hops_target": median_rounds <= math.log2(n) / 2,
        "meets_success_target": success >= TARGET_SUCCESS,
        "real_s": lookup_real_s + descriptor_real_s,
    }


# --- Finding exits ---------------------------------------------------------------------------


async def measure_exits(plan: Plan, config: DhtConfig, rng: random.Random) -> dict[str, Any]:
    sim = Sim(random.Random(rng.getrandbits(64)), config=config, loss=plan.loss, subnet=200)
    real0 = time.perf_counter()
    await sim.grow(EXIT_NET_NODES)
    published = await sim.publish_all(*sim.choose_publishers(EXIT_NET_EXITS, plan.publish))
    setup_real_s = time.perf_counter() - real0
    members = list(sim.nodes)
    rows = []
    for label, topic in (
        ("exit", Topic(DescriptorRole.EXIT)),
        ("exit/region/EU", Topic(DescriptorRole.EXIT, region="EU")),
    ):
        joins, finds, totals, rpcs, counts, wrong = [], [], [], [], [], 0
        for _ in range(plan.exit_trials):
            fresh = sim.new_node()
            contact = sim.rng.choice(members)
            start = sim.loop.time()
            await sim.join_one(fresh, [contact])
            joined = sim.loop.time()
            found = await fresh.dht.find_providers(topic, want=EXIT_WANT)
            end = sim.loop.time()
            joins.append(joined - start)
            finds.append(end - joined)
            totals.append(end - start)
            rpcs.append(_rpcs_sent(fresh.dht.stats))
            counts.append(len(found))
            for d in found:
                if DescriptorRole.EXIT not in d.body.roles or (
                    topic.region and d.body.region != topic.region
                ):
                    wrong += 1
            sim.forget(fresh)
        rows.append(
            {
                "topic": label,
                "trials": plan.exit_trials,
                "want": EXIT_WANT,
                "found_min": min(counts),
                "found_median": _median(counts),
                "reached_want": sum(1 for c in counts if c >= EXIT_WANT) / len(counts),
                "wrong": wrong,
                "join_s_median": _median(joins),
                "find_s_median": _median(finds),
                "total_s_median": _median(totals),
                "total_s_p90": _percentile(totals, 0.9),
                "total_s_max": max(totals),
                "rpcs_median": _median(rpcs),
                "rpcs_max": max(rpcs),
            }
        )
    await sim.close()
    return {
        "nodes": EXIT_NET_NODES,
        "published": published,
        "setup_real_s": setup_real_s,
        "rows": rows,
        "real_s": time.perf_counter() - real0,
    }


# --- The run -----------------------------------------------------------------------------------


async def run_all(plan: Plan) -> dict[str, Any]:
    wall0 = time.perf_counter()
    rng = random.Random(plan.seed)
    cfg = DhtConfig(ksize=plan.ksize, alpha=plan.alpha)
    sim = Sim(random.Random(rng.getrandbits(64)), config=cfg, loss=plan.loss, subnet=40)

    _progress(
        f"joining {plan.nodes} nodes (batches of up to {JOIN_BATCH}, {JOIN_CONTACTS} contacts each)"
    )
    real0, virt0 = time.perf_counter(), sim.loop.time()
    await sim.grow(plan.nodes)
    join_real_s, join_virtual_s = time.perf_counter() - real0, sim.loop.time() - virt0
    rpcs_join = sum(_rpcs_sent(n.dht.stats) for n in sim.nodes)
    tables = sorted(len(n.dht.contacts()) for n in sim.nodes)
    _progress(
        f"  {join_real_s:.1f} s real, {join_virtual_s:.1f} s virtual; routing table sizes "
        f"min {tables[0]}, median {_median(tables):.0f}, max {tables[-1]}; "
        f"join failures {sim.join_failures}"
    )

    exits, relays = sim.choose_publishers(round(EXIT_FRACTION * plan.nodes), plan.publish)
    _progress(
        f"publishing {len(exits) + len(relays)} descriptors ({len(exits)} exits, "
        f"{len(relays)} relays, batches of {PUBLISH_BATCH})"
    )
    real1, virt1 = time.perf_counter(), sim.loop.time()
    published = await sim.publish_all(exits, relays)
    publish_real_s, publish_virtual_s = time.perf_counter() - real1, sim.loop.time() - virt1
    rpcs_publish = sum(_rpcs_sent(n.dht.stats) for n in sim.nodes) - rpcs_join
    rss_after_setup = _peak_rss_mib()
    tables_after = sorted(len(n.dht.contacts()) for n in sim.nodes)
    _progress(
        f"  {publish_real_s:.1f} s real, {publish_virtual_s:.1f} s virtual, {rpcs_publish} RPCs; "
        "median store acks "
        f"{published['acks_median']:.0f}; peak RSS {rss_after_setup:.0f} MiB"
    )
    published_ids = {n.node_id for n in (*exits, *relays)}

    lookups = []
    for churn in (0.0, plan.churn):
        _progress(
            f"{plan.lookups} lookups + {plan.lookups} descriptor fetches at {churn:.0%} churn"
        )
        row = await measure_lookups(
            sim,
            lookups=plan.lookups,
            churn=churn,
            published=published_ids,
            rng=random.Random(rng.getrandbits(64)),
        )
        _progress(
            f"  success {row['success']:.1%}, median hops {row['hops_median']:g}, "
            f"p90 {row['hops_p90']:g}, median latency {row['latency_s_median']:.2f} s "
            f"virtual ({row['real_s']:.1f} s real)"
        )
        lookups.append(row)
    main_virtual_s = sim.loop.time()
    if main_virtual_s > DESCRIPTOR_LIFETIME_S:
        _progress(
            f"warning: {main_virtual_s:.0f} s of virtual time passed, more than a descriptor's "
            f"lifetime ({DESCRIPTOR_LIFETIME_S} s, nothing republishes): late descriptor "
            "fetches may have found expired records"
        )
    await sim.close()

    _progress(
        f"fresh node finding {EXIT_WANT} exits in a {EXIT_NET_NODES}-node network "
        f"({EXIT_NET_EXITS} exits), {plan.exit_trials} trials per topic"
    )
    exit_result = await measure_exits(plan, cfg, random.Random(rng.getrandbits(64)))
    for row in exit_result["rows"]:
        _progress(
            f"  {row['topic']}: median {row['total_s_median']:.2f} s virtual, "
            f"{row['rpcs_median']:g} RPCs, found {row['found_median']:g}"
        )

    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
        },
        "params": {
            "nodes": plan.nodes,
            "lookups": plan.lookups,
            "churn": plan.churn,
            "loss": plan.loss,
            "seed": plan.seed,
            "ksize": cfg.ksize,
            "alpha": cfg.alpha,
            "rpc_timeout_s": cfg.rpc_timeout_s,
            "max_rounds": cfg.max_rounds,
            "latency_s": list(LATENCY_S),
            "join_batch": JOIN_BATCH,
            "join_contacts": JOIN_CONTACTS,
            "exit_fraction": EXIT_FRACTION,
            "publish_fraction": plan.publish,
            "exit_trials": plan.exit_trials,
        },
        "setup": {
            "join_real_s": join_real_s,
            "join_virtual_s": join_virtual_s,
            "join_failures": sim.join_failures,
            "join_rpcs": rpcs_join,
            "publish_rpcs": rpcs_publish,
            "table_size_min": tables[0],
            "table_size_median": _median(tables),
            "table_size_max": tables[-1],
            "table_size_median_after_publish": _median(tables_after),
            "publish_real_s": publish_real_s,
            "publish_virtual_s": publish_virtual_s,
            "published": published,
            "peak_rss_mib": rss_after_setup,
        },
        "lookups": lookups,
        "exits": exit_result,
        "virtual_s": main_virtual_s,
        "frames": sim.net.frames,
        "meets_target": all(r["meets_hops_target"] and r["meets_success_target"] for r in lookups),
        "peak_rss_mib": _peak_rss_mib(),
        "wall_s": time.perf_counter() - wall0,
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def format_table(res: dict[str, Any]) -> str:
    p, s, m = res["params"], res["setup"], res["machine"]
    lines = [
        f"meshnode DHT simulation: {p['nodes']} nodes, k={p['ksize']}, alpha={p['alpha']}, "
        f"rpc timeout {p['rpc_timeout_s']:g} s, one-way latency "
        f"{p['latency_s'][0] * 1000:.0f}-{p['latency_s'][1] * 1000:.0f} ms, loss {p['loss']:.0%}, "
        f"seed {p['seed']} (Python {m['python']})",
        f"setup: join {s['join_real_s']:.1f} s real ({s['join_virtual_s']:.0f} s virtual, "
        f"{s['join_failures']} failed), routing tables {s['table_size_min']}/"
        f"{s['table_size_median']:.0f}/{s['table_size_max']} (min/median/max), median "
        f"{s['table_size_median_after_publish']:.0f} after publishing "
        f"{s['published']['descriptors']} descriptors ({s['published']['exits']} exits) in "
        f"{s['publish_real_s']:.1f} s real; peak RSS after setup {s['peak_rss_mib']:.0f} MiB",
        "",
        f"{'N':>5} {'log2N':>6} {'churn':>6} {'lookups':>8} {'success':>8} {'med hops':>9} "
        f"{'p90 hops':>9} {'path hops':>10} {'med lat':>8} {'RPCs':>5} {'dead':>5} {'descr':>7} "
        f"{'hops<=log2N/2':>14} {'success>=99%':>13}",
    ]
    for r in res["lookups"]:
        lines.append(
            f"{r['nodes']:>5} {r['log2_n']:>6.2f} {r['churn']:>6.0%} {r['lookups']:>8} "
            f"{r['success']:>8.1%} {r['hops_median']:>9g} {r['hops_p90']:>9g} "
            f"{r['path_hops_median']:>10g} {r['latency_s_median']:>7.2f}s "
            f"{r['rpcs_median']:>5g} {r['dead_returned_mean']:>5.2f} "
            f"{r['descriptor_success']:>7.1%} "
            f"{_yes(r['meets_hops_target']):>14} {_yes(r['meets_success_target']):>13}"
        )
    e = res["exits"]
    lines += [
        "",
        f"fresh node, {e['nodes']}-node network with {e['published']['exits']} exits "
        f"({', '.join(f'{k} {v}' for k, v in sorted(e['published']['exit_regions'].items()))}): "
        f"bootstrap from 1 contact, then find_providers(want={EXIT_WANT})",
        f"{'topic':<16} {'trials':>6} {'found':>6} {'>=want':>7} {'join s':>7} {'find s':>7} "
        f"{'total s':>8} {'p90 s':>6} {'RPCs':>5} {'max RPCs':>9}",
    ]
    for r in e["rows"]:
        lines.append(
            f"{r['topic']:<16} {r['trials']:>6} {r['found_median']:>6g} {r['reached_want']:>7.0%} "
            f"{r['join_s_median']:>7.2f} {r['find_s_median']:>7.2f} {r['total_s_median']:>8.2f} "
            f"{r['total_s_p90']:>6.2f} {r['rpcs_median']:>5g} {r['rpcs_max']:>9}"
        )
    lines += [
        "",
        "(hops: the lookup's iterative rounds (median, p90); path hops: median RPCs deep the "
        "target was first learned; med lat: virtual seconds; RPCs: median sent per lookup; "
        "dead: mean switched-off nodes among the k returned; descr: get_descriptor success; "
        "exit columns: virtual seconds and RPCs, medians over the trials)",
        f"targets: median hops <= log2(N)/2 and success >= 99%: "
        f"{'MET' if res['meets_target'] else 'NOT MET'}; wall time {res['wall_s']:.1f} s, "
        f"{res['virtual_s']:.0f} s virtual, peak RSS {res['peak_rss_mib']:.0f} MiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dht", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="300 nodes, 50 lookups (smoke test)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout (table on stderr)")
    parser.add_argument("--nodes", type=int, help="network size (default 2000; quick 300)")
    parser.add_argument("--lookups", type=int, help="lookups per churn level")
    parser.add_argument("--churn", type=float, help="fraction of nodes down (default 0.2)")
    parser.add_argument("--loss", type=float, help="frame loss probability (default 0)")
    parser.add_argument("--exit-trials", type=int, help="fresh nodes per exit topic")
    parser.add_argument(
        "--publish", type=float, help="fraction of nodes that publish (default 1; quick 0.25)"
    )
    parser.add_argument("--ksize", type=int, help=f"DhtConfig.ksize (default {DhtConfig().ksize})")
    parser.add_argument("--alpha", type=int, help=f"DhtConfig.alpha (default {DhtConfig().alpha})")
    parser.add_argument("--seed", type=int, help="RNG seed (default 1)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    overrides = {
        "nodes": args.nodes,
        "lookups": args.lookups,
        "churn": args.churn,
        "loss": args.loss,
        "exit_trials": args.exit_trials,
        "publish": args.publish,
        "seed": args.seed,
        "ksize": args.ksize,
        "alpha": args.alpha,
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if not 3 <= plan.nodes <= 100_000 or not 1 <= plan.lookups <= 100_000:
        parser.error("--nodes must be in [3, 100000] and --lookups in [1, 100000]")
    if not 0 <= plan.churn <= 0.9 or not 0 <= plan.loss < 1 or not 1 <= plan.exit_trials <= 1000:
        parser.error("--churn must be in [0, 0.9], --loss in [0, 1), --exit-trials in [1, 1000]")
    if not 0 <= plan.publish <= 1:
        parser.error("--publish must be in [0, 1]")
    try:
        DhtConfig(ksize=plan.ksize, alpha=plan.alpha)
    except ValueError as exc:
        parser.error(f"--ksize/--alpha: {exc}")
    # kademlia logs a warning for every contact that times out: thousands at 20% churn.
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    try:
        result = run_virtual(run_all(plan))
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    table = format_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
