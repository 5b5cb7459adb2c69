"""The DHT: kademlia's routing table and iterative lookups, over the links, made safe.

The ``kademlia`` package is the engine: its :class:`~kademlia.routing.RoutingTable`
(k-buckets, splitting, replacement caches, lonely-bucket refresh ids), its
:class:`~kademlia.node.NodeHeap` and :class:`~kademlia.crawling.SpiderCrawl` (the
iterative alpha-parallel lookup), and its :class:`~kademlia.protocol.KademliaProtocol`
(the RPC handlers' shape and ``welcome_if_new``). This module is its only importer and
replaces or wraps every part that is unsafe on a hostile network (docs/dht.md says why,
part by part):

- **Transport.** Messages go through a :class:`discovery.transport.Transport` (the link
  layer, encrypted, or an in-memory network), never rpcudp's clear-text socket. The
  codec is discovery/rpc.py: strict schema, fragments, bounded reassembly.
- **Authenticated ids.** The id a peer claims in a request must equal the node id its
  link authenticated (the hash of the identity key it proved in the Noise handshake),
  else the request is dropped, counted (``dht.drop.id_mismatch``) and the peer never
  enters a routing table. A response must come from the link key we sent to and, when
  we asked a contact by id, from that id.
- **Contacts carry link keys** (:class:`LinkNode`); a contact learned from someone's
  FIND_NODE answer is only a claim until its handshake proves the id, and enters the
  routing table only after it answered us (kademlia's ``handle_call_response``).
- **Bounded.** rpcudp keeps every pending RPC and spawns a task per datagram with no
  reference; here pending RPCs are capped (``max_pending``), requests are rate-limited
  per peer, handlers run synchronously (no task per request), and every background
  task (pings of bucket heads, replication to newcomers) is kept in a bounded set.
- **No pickle.** State is saved as JSON (:meth:`DhtNode.state_json`).
- **Validated values.** STORE writes into :class:`discovery.store.DescriptorStore` and
  ADD_PROVIDER into :class:`discovery.providers.ProviderStore`, which verify every
  record; values found by lookups are verified again before anyone uses them.

Counters (:attr:`DhtProtocol.stats`): ``dht.rpc.sent.<method>``, ``dht.rpc.ok.<method>``,
``dht.rpc.timeout.<method>``, ``dht.rpc.failed.<method>``, ``dht.request.<method>``, and
``dht.drop.<reason>`` for everything refused: the reasons of discovery/rpc.py plus
``id_mismatch``, ``unexpected_response``, ``rate_limited``, ``pending_full``,
``tasks_full``, ``bad_value``.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node, NodeHeap
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from discovery.descriptor import DescriptorError, SignedDescriptor
from discovery.providers import ProviderStore, Topic, topic_key, topics_for
from discovery.rpc import (
    MAX_CONTACTS,
    MSG_ID_BYTES,
    PROVIDER_BUDGET_BYTES,
    REQUEST,
    RESPONSE,
    DhtContact,
    FoundValue,
    Method,
    Providers,
    Reassembler,
    Request,
    RpcError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    fragment,
)
from discovery.store import DescriptorStore, descriptor_key
from discovery.transport import LinkAddress, Transport
from meshnode.errors import DecodeError
from meshnode.link.ratelimit import KeyedRateLimiter

__all__ = [
    "STATE_FORMAT",
    "DhtConfig",
    "DhtNode",
    "DhtProtocol",
    "LinkNode",
    "LookupResult",
]

STATE_FORMAT = "meshnode/dht-state/v1"

RandomBytes = Callable[[int], bytes]
RpcResult = tuple[bool, Any]


@dataclass(frozen=True, slots=True)
class DhtConfig:
    """DHT tunables: k 20, alpha 3 as in kademlia (measured: benchmarks/README.md), our bounds."""

    ksize: int = 20
    alpha: int = 3
    rpc_timeout_s: float = 3.0
    max_pending: int = 1024
    max_tasks: int = 256
    max_rounds: int = 24
    request_rate_per_s: float = 50.0
    request_burst: float = 200.0
    replicate_per_welcome: int = 32
    providers_per_answer: int = 32
    # The node's discovery loop (meshnode/node.py): a round of provider lookups and a
    # random walk every refresh_interval_s; our descriptor re-signed every republish_s.
    refresh_interval_s: float = 300.0
    republish_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.ksize <= MAX_CONTACTS:
            raise ValueError(f"ksize must be 1..{MAX_CONTACTS}")
        if not 1 <= self.alpha <= self.ksize:
            raise ValueError("alpha must be 1..ksize")


# --- Contacts --------------------------------------------------------------------------------


class LinkNode(Node):  # type: ignore[misc]
    """kademlia's Node plus the static link key a Noise IK handshake needs."""

    def __init__(self, node_id: bytes, ip: str | None, port: int | None, link_key: bytes) -> None:
        super().__init__(node_id, ip, port)
        self.link_key = link_key

    def __iter__(self) -> Any:
        return iter([self.id, self.ip, self.port, self.link_key])

    @property
    def address(self) -> LinkAddress:
        return LinkAddress(str(self.ip), int(self.port or 0), self.link_key)

    def contact(self) -> DhtContact:
        return DhtContact(
            node_id=self.id, host=str(self.ip), port=int(self.port or 0), link_key=self.link_key
        )

    @classmethod
    def from_contact(cls, contact: DhtContact) -> LinkNode:
        return cls(contact.node_id, contact.host, contact.port, contact.link_key)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What an iterative lookup found, and how many rounds (hops) it took."""

    nodes: list[LinkNode]
    rounds: int


# --- Crawlers ------------------------------------------------------------------------------


class _Crawl(SpiderCrawl):  # type: ignore[misc]
    """kademlia's SpiderCrawl with a round count, a round limit, and memory of failures.

    kademlia's own crawlers rebuild contacts with ``Node(*tuple)``, which would drop the
    link key, so the ``_nodes_found`` of each subclass below is ours. Two changes to its
    round loop (``_find``), both measured by benchmarks/bench_dht.py at 20% churn:

    - a contact that failed is remembered and never pushed back into the candidate heap
      by a later answer (kademlia removes it, the next answer naming it re-adds it as
      "contacted", and the lookup returns it: 3.7 dead nodes per result on average);
    - a round asks alpha contacts *plus one for each that failed in the previous round*,
      so timeouts do not slow the lookup down to fewer useful answers per round;
    - the "ask all remaining" step follows the paper (no node closer than the closest
      seen so far), not kademlia's stricter "the k list did not change", which churn
      defeats: every timeout changes the list.
    """

    protocol: DhtProtocol

    def __init__(
        self, protocol: DhtProtocol, node: Node, peers: list[LinkNode], ksize: int, alpha: int
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.rounds = 0
        self.last_ids_crawled: list[bytes] = []
        self.failed: set[bytes] = set()
        self._failed_last_round = 0
        self._closest: int | None = None

    async def _find(self, rpcmethod: Callable[..., Any]) -> Any:
        if self.rounds >= self.protocol.config.max_rounds:
            return await self._give_up()
        self.rounds += 1
        count = self.alpha + self._failed_last_round
        ids = self.nearest.get_ids()
        closest = self.nearest.node.long_id ^ int.from_bytes(ids[0], "big") if ids else None
        if ids == self.last_ids_crawled or (
            closest is not None and self._closest is not None and closest >= self._closest
        ):
            # The paper's rule (section 2.3): a round that found no node closer than the
            # closest already seen sends to all of the k closest not yet asked.
            count = len(self.nearest)
        self.last_ids_crawled = ids
        self._closest = closest
        calls = {}
        for peer in self.nearest.get_uncontacted()[:count]:
            calls[peer.id] = rpcmethod(peer, self.node)
            self.nearest.mark_contacted(peer)
        answers = await asyncio.gather(*calls.values())
        return await self._nodes_found(dict(zip(calls, answers, strict=True)))

    async def _give_up(self) -> Any:
        return [n for n in self.nearest if n.id in self.nearest.contacted]

    def _failures(self, failed: list[bytes]) -> None:
        self.failed.update(failed)
        self._failed_last_round = len(failed)
        self.nearest.remove(failed)

    def _push(self, contacts: Iterable[DhtContact]) -> None:
        me = self.protocol.source_node.id
        self.nearest.push(
            [
                LinkNode.from_contact(c)
                for c in contacts
                if c.node_id != me and c.node_id not in self.failed
            ]
        )


class NodeCrawl(_Crawl):
    """FIND_NODE until the k nearest have all answered (kademlia's NodeSpiderCrawl)."""

    async def find(self) -> list[LinkNode]:
        result: list[LinkNode] = await self._find(self.protocol.call_find_node)
        return result

    async def _nodes_found(self, responses: dict[bytes, RpcResult]) -> list[LinkNode]:
        failed = []
        for peer_id, (ok, contacts) in responses.items():
            if ok:
                self._push(contacts)
            else:
                failed.append(peer_id)
        self._failures(failed)
        if self.nearest.have_contacted_all():
            return list(self.nearest)
        return await self.find()


class ValueCrawl(_Crawl):
    """FIND_VALUE for a descriptor key; every value found is verified before it counts."""

    def __init__(self, *args: Any, node_id: bytes) -> None:
        super().__init__(*args)
        self.node_id = node_id
        self.nearest_without_value = NodeHeap(self.node, 1)

    async def find(self) -> SignedDescriptor | None:
        result: SignedDescriptor | None = await self._find(self.protocol.call_find_value)
        return result

    async def _give_up(self) -> None:
        return None

    async def _nodes_found(self, responses: dict[bytes, RpcResult]) -> SignedDescriptor | None:
        failed, found = [], []
        for peer_id, (ok, answer) in responses.items():
            if not ok:
                failed.append(peer_id)
            elif isinstance(answer, FoundValue):
                descriptor = self.protocol.verify_descriptor(answer.value, self.node_id)
                if descriptor is None:
                    failed.append(peer_id)  # a bad value: treat the holder as failed
                else:
                    found.append(descriptor)
            else:
                self.nearest_without_value.push(self.nearest.get_node(peer_id))
                self._push(answer)
        self._failures(failed)
        if found:
            best = max(found, key=lambda d: d.body.version)
            holder = self.nearest_without_value.popleft()
            if holder is not None:  # paper section 2.3: cache at the nearest node that lacked it
                self.protocol.spawn(self.protocol.call_store(holder, self.node.id, best.encode()))
            return best
        if self.nearest.have_contacted_all():
            return None
        return await self.find()


class ProviderCrawl(_Crawl):
    """GET_PROVIDERS toward a topic key, merging the verified entries of every answer."""

    def __init__(self, *args: Any, topic: Topic, want: int) -> None:
        super().__init__(*args)
        self.topic_key = topic_key(topic)
        self.want = want
        self.found: dict[bytes, SignedDescriptor] = {}

    async def find(self) -> list[SignedDescriptor]:
        await self._find(self.protocol.call_get_providers)
        return list(self.found.values())

    async def _nodes_found(self, responses: dict[bytes, RpcResult]) -> None:
        failed = []
        for peer_id, (ok, answer) in responses.items():
            if not ok:
                failed.append(peer_id)
                continue
            for value in answer.entries:
                descriptor = self.protocol.verify_provider(value, self.topic_key)
                if descriptor is None:
                    continue
                old = self.found.get(descriptor.node_id)
                if old is None or descriptor.body.version > old.body.version:
                    self.found[descriptor.node_id] = descriptor
            self._push(answer.nodes)
        self._failures(failed)
        if len(self.found) >= self.want or self.nearest.have_contacted_all():
            return
        await self.find()


# --- The protocol --------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[RpcResult]
    timer: asyncio.TimerHandle
    method: Method
    expected_id: bytes | None
    link_key: bytes


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol with its I/O, codec and unsafe parts replaced (module docstring)."""

    def __init__(
        self,
        source_node: LinkNode,
        storage: DescriptorStore,
        providers: ProviderStore,
        transport: Transport,
        *,
        config: DhtConfig,
        clock: Callable[[], float],
        random_bytes: RandomBytes,
        on_descriptor: Callable[[SignedDescriptor], None] | None = None,
    ) -> None:
        super().__init__(source_node, storage, config.ksize)
        self.storage: DescriptorStore = storage
        self.providers = providers
        self.config = config
        self.clock = clock
        self.random_bytes = random_bytes
        self.on_descriptor = on_descriptor
        self.stats: Counter[str] = Counter()
        self.transport = transport
        self._pending: dict[bytes, _Pending] = {}
        self._reassembler = Reassembler()
        self._limiter = KeyedRateLimiter(
            rate_per_s=config.request_rate_per_s, burst=config.request_burst
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        transport.set_receiver(self.frame_received)

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns every unknown attribute into a remote call; a typo must not.
        raise AttributeError(name)

    # --- tasks ------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        """Run ``coro`` in the background, keeping a reference; refused when too many run."""
        if self._closed or len(self._tasks) >= self.config.max_tasks:
            coro.close()
            self.stats["dht.drop.tasks_full"] += 1
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result((False, None))
            return done
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed background RPC is not an error to log

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for msg_id in list(self._pending):
            self._finish(msg_id, (False, None))

    # --- receiving --------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # rpcudp's clear-text entry point: nothing unauthenticated is accepted.
        self.stats["dht.drop.unauthenticated"] += 1

    def frame_received(
        self, node_id: bytes, link_key: bytes, addr: tuple[str, int], payload: bytes
    ) -> None:
        """A DHT frame from the peer the link authenticated as ``node_id``."""
        now = asyncio.get_running_loop().time()
        try:
            message = self._reassembler.feed(link_key, payload, now)
        except RpcError as exc:
            self._drop(exc.reason)
            return
        if message is None:
            return
        msg_type, msg_id, body = message
        if msg_type == REQUEST:
            self._request(node_id, link_key, addr, msg_id, body, now)
        elif msg_type == RESPONSE:
            self._response(node_id, link_key, msg_id, body)

    def _request(
        self,
        node_id: bytes,
        link_key: bytes,
        addr: tuple[str, int],
        msg_id: bytes,
        body: bytes,
        now: float,
    ) -> None:
        if not self._limiter.allow(node_id, now):
            self._drop("rate_limited")
            return
        try:
            request = decode_request(body)
        except RpcError as exc:
            self._drop(exc.reason)
            return
        if request.sender_id != node_id:
            self._drop("id_mismatch")
            return
        self.stats[f"dht.request.{request.method}"] += 1
        sender = LinkNode(node_id, addr[0], addr[1], link_key)
        result = self._answer(sender, request)
        self.welcome_if_new(sender)
        for frame in fragment(RESPONSE, msg_id, encode_response(request.method, result)):
            self.transport.sendto(frame, sender.address)

    def _answer(self, sender: LinkNode, request: Request) -> Any:
        method, key = request.method, request.key
        if method == "ping":
            return self.source_node.id
        if method == "store":
            return self.storage.put(key, request.value, now=self.clock(), origin=sender.id)
        if method == "add_provider":
            return self.providers.add(key, request.value, now=self.clock(), origin=sender.id)
        neighbours = self._neighbours(key, sender)
        if method == "find_value":
            value = self.storage.get(key, now=self.clock())
            return neighbours if value is None else FoundValue(value)
        if method == "get_providers":
            entries = self.providers.get(
                key,
                now=self.clock(),
                limit=self.config.providers_per_answer,
                random_bytes=self.random_bytes,
                max_bytes=PROVIDER_BUDGET_BYTES,
                entry_overhead=3,  # msgpack's bin 16 header
            )
            return Providers(entries=tuple(entries), nodes=tuple(neighbours))
        return neighbours  # find_node

    def _neighbours(self, key: bytes, sender: LinkNode) -> list[DhtContact]:
        found = self.closest(key, self.config.ksize, exclude=sender.id)
        return [n.contact() for n in found]

    def closest(self, key: bytes, k: int, *, exclude: bytes | None = None) -> list[LinkNode]:
        """The ``k`` contacts of the routing table nearest to ``key``.

        Unlike kademlia's ``find_neighbors``, a node whose id *is* ``key`` is included:
        ours are lookups of node ids (and of keys), and a FIND_NODE for a node must be
        able to name that node.
        """
        target = int.from_bytes(key, "big")
        nodes = (
            n
            for bucket in self.router.buckets
            for n in bucket.nodes.values()
            if isinstance(n, LinkNode) and n.id != exclude
        )
        return heapq.nsmallest(min(k, MAX_CONTACTS), nodes, key=lambda n: n.long_id ^ target)

    def _response(self, node_id: bytes, link_key: bytes, msg_id: bytes, body: bytes) -> None:
        pending = self._pending.get(msg_id)
        if pending is None or pending.link_key != link_key:
            self._drop("unexpected_response")
            return
        if pending.expected_id is not None and pending.expected_id != node_id:
            # The contact's id was a lie: the key it named belongs to another node.
            self._drop("id_mismatch")
            self._finish(msg_id, (False, None))
            return
        try:
            result = decode_response(pending.method, body)
        except RpcError as exc:
            self._drop(exc.reason)
            self._finish(msg_id, (False, None))
            return
        if pending.method == "ping" and result != node_id:
            # A ping answers with the responder's id: it must be the one its link proved.
            self._drop("id_mismatch")
            self._finish(msg_id, (False, None))
            return
        self.stats[f"dht.rpc.ok.{pending.method}"] += 1
        self._finish(msg_id, (True, result))

    def _drop(self, reason: str) -> None:
        self.stats[f"dht.drop.{reason}"] += 1

    # --- sending ----------------------------------------------------------------------

    async def _call(
        self,
        address: LinkAddress,
        expected_id: bytes | None,
        method: Method,
        key: bytes = b"",
        value: bytes = b"",
    ) -> RpcResult:
        if self._closed or len(self._pending) >= self.config.max_pending:
            self._drop("pending_full")
            return (False, None)
        loop = asyncio.get_running_loop()
        msg_id = self.random_bytes(MSG_ID_BYTES)
        while msg_id in self._pending:
            msg_id = self.random_bytes(MSG_ID_BYTES)
        body = encode_request(method, self.source_node.id, key=key, value=value)
        future: asyncio.Future[RpcResult] = loop.create_future()
        timer = loop.call_later(self.config.rpc_timeout_s, self._timeout, msg_id)
        self._pending[msg_id] = _Pending(future, timer, method, expected_id, address.link_key)
        self.stats[f"dht.rpc.sent.{method}"] += 1
        for frame in fragment(REQUEST, msg_id, body):
            self.transport.sendto(frame, address)
        try:
            return await future
        finally:
            if msg_id in self._pending and self._pending[msg_id].future is future:
                self._pending.pop(msg_id).timer.cancel()

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._pending.get(msg_id)
        if pending is not None:
            self.stats[f"dht.rpc.timeout.{pending.method}"] += 1
            self._finish(msg_id, (False, None))

    def _finish(self, msg_id: bytes, result: RpcResult) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            return
        pending.timer.cancel()
        if not result[0]:
            self.stats[f"dht.rpc.failed.{pending.method}"] += 1
        if not pending.future.done():
            pending.future.set_result(result)

    async def _call_node(
        self, node: LinkNode, method: Method, key: bytes = b"", value: bytes = b""
    ) -> RpcResult:
        result = await self._call(node.address, node.id, method, key, value)
        return self.handle_call_response(result, node)  # type: ignore[no-any-return]

    async def call_find_node(self, node_to_ask: LinkNode, node_to_find: Node) -> RpcResult:
        return await self._call_node(node_to_ask, "find_node", node_to_find.id)

    async def call_find_value(self, node_to_ask: LinkNode, node_to_find: Node) -> RpcResult:
        return await self._call_node(node_to_ask, "find_value", node_to_find.id)

    async def call_get_providers(self, node_to_ask: LinkNode, node_to_find: Node) -> RpcResult:
        return await self._call_node(node_to_ask, "get_providers", node_to_find.id)

    async def call_store(self, node_to_ask: LinkNode, key: bytes, value: bytes) -> RpcResult:
        return await self._call_node(node_to_ask, "store", key, value)

    async def call_add_provider(self, node_to_ask: LinkNode, key: bytes, value: bytes) -> RpcResult:
        return await self._call_node(node_to_ask, "add_provider", key, value)

    def call_ping(self, node_to_ask: LinkNode) -> asyncio.Future[Any]:
        # kademlia's RoutingTable does ensure_future(call_ping(head)) and drops the
        # reference; a kept, bounded task instead.
        return self.spawn(self._call_node(node_to_ask, "ping"))

    async def ping_address(self, address: LinkAddress) -> LinkNode | None:
        """Ping a node known only by address and key (a bootstrap contact); its id is
        whatever its link authenticates, and the answer must name that same id."""
        ok, answer = await self._call(address, None, "ping")
        if not ok:
            return None
        node = LinkNode(answer, address.host, address.port, address.link_key)
        self.welcome_if_new(node)
        return node

    def welcome_if_new(self, node: LinkNode) -> None:
        """kademlia's welcome_if_new, with bounded, referenced replication tasks."""
        if node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        budget = self.config.replicate_per_welcome
        for key, value in self.storage.items(self.clock()):
            if budget <= 0:
                break
            keynode = Node(key)
            neighbours = self.closest(key, self.config.ksize)
            if neighbours:
                last = neighbours[-1].distance_to(keynode)
                first = neighbours[0].distance_to(keynode)
                new_close = node.distance_to(keynode) < last
                we_closest = self.source_node.distance_to(keynode) < first
                if not (new_close and we_closest):
                    continue
            budget -= 1
            self.spawn(self.call_store(node, key, value))
        self.router.add_contact(node)

    # --- verification -------------------------------------------------------------------

    def verify_descriptor(self, value: bytes, node_id: bytes) -> SignedDescriptor | None:
        """The descriptor of ``node_id`` in ``value``, or None (counted ``bad_value``)."""
        try:
            descriptor = SignedDescriptor.decode(value, now=self.clock())
        except DescriptorError:
            self._drop("bad_value")
            return None
        if descriptor.node_id != node_id:
            self._drop("bad_value")
            return None
        self._learn(descriptor)
        return descriptor

    def verify_provider(self, value: bytes, key: bytes) -> SignedDescriptor | None:
        """A provider entry that really belongs under topic ``key``, or None (counted)."""
        try:
            descriptor = SignedDescriptor.decode(value, now=self.clock())
        except DescriptorError:
            self._drop("bad_value")
            return None
        if key not in {topic_key(t) for t in topics_for(descriptor)}:
            self._drop("bad_value")
            return None
        self._learn(descriptor)
        return descriptor

    def _learn(self, descriptor: SignedDescriptor) -> None:
        if self.on_descriptor is not None:
            self.on_descriptor(descriptor)


# --- The node's DHT ------------------------------------------------------------------------


class DhtNode:
    """One node's DHT: join, look up, publish, walk; kademlia's ``Server`` made safe.

    ``clock`` is Unix time (descriptors are stamped with it); timeouts use the asyncio
    loop's clock, so a simulation can run on virtual time.
    """

    def __init__(
        self,
        node_id: bytes,
        link_key: bytes,
        transport: Transport,
        *,
        config: DhtConfig | None = None,
        store: DescriptorStore | None = None,
        providers: ProviderStore | None = None,
        clock: Callable[[], float] = time.time,
        random_bytes: RandomBytes = os.urandom,
        on_descriptor: Callable[[SignedDescriptor], None] | None = None,
    ) -> None:
        self.config = config or DhtConfig()
        self.node = LinkNode(node_id, None, None, link_key)
        self.store = store if store is not None else DescriptorStore()
        self.providers = providers if providers is not None else ProviderStore()
        self.clock = clock
        self.random_bytes = random_bytes
        self.protocol = DhtProtocol(
            self.node,
            self.store,
            self.providers,
            transport,
            config=self.config,
            clock=clock,
            random_bytes=random_bytes,
            on_descriptor=on_descriptor,
        )

    @property
    def router(self) -> RoutingTable:
        return self.protocol.router

    @property
    def stats(self) -> Counter[str]:
        return self.protocol.stats

    def close(self) -> None:
        self.protocol.close()

    def contacts(self) -> list[LinkNode]:
        """Every node in the routing table."""
        return [n for b in self.router.buckets for n in b.get_nodes()]

    # --- joining ----------------------------------------------------------------------

    async def bootstrap(self, addresses: Sequence[LinkAddress]) -> LookupResult:
        """Ping every address, then look ourselves up through those that answered."""
        answered = await asyncio.gather(*(self.protocol.ping_address(a) for a in addresses))
        nodes = [n for n in answered if n is not None]
        return await self.find_node(self.node.id, start=nodes)

    async def rejoin(self, contacts: Sequence[DhtContact]) -> LookupResult:
        """Join from saved contacts: each must answer as the id it was saved with."""
        nodes = [LinkNode.from_contact(c) for c in contacts if c.node_id != self.node.id]
        answers = await asyncio.gather(*(self.protocol._call_node(n, "ping") for n in nodes))
        alive = [n for n, (ok, _) in zip(nodes, answers, strict=True) if ok]
        return await self.find_node(self.node.id, start=alive)

    # --- lookups ----------------------------------------------------------------------

    def _start(self, key: bytes, start: Sequence[LinkNode] | None) -> list[LinkNode]:
        if start is not None:
            return list(start)
        return self.protocol.closest(key, self.config.ksize)

    async def find_node(
        self, key: bytes, *, start: Sequence[LinkNode] | None = None
    ) -> LookupResult:
        """The k nodes nearest to ``key`` that answered, and the rounds it took."""
        peers = self._start(key, start)
        if not peers:
            return LookupResult([], 0)
        crawl = NodeCrawl(self.protocol, Node(key), peers, self.config.ksize, self.config.alpha)
        nodes = await crawl.find()
        return LookupResult(nodes, crawl.rounds)

    async def get_descriptor(self, node_id: bytes) -> SignedDescriptor | None:
        """The newest verified descriptor of ``node_id`` the DHT holds (None: not found)."""
        key = descriptor_key(node_id)
        local = self.store.get(key, now=self.clock())
        if local is not None:
            descriptor = self.protocol.verify_descriptor(local, node_id)
            if descriptor is not None:
                return descriptor
        peers = self._start(key, None)
        if not peers:
            return None
        crawl = ValueCrawl(
            self.protocol, Node(key), peers, self.config.ksize, self.config.alpha, node_id=node_id
        )
        return await crawl.find()

    async def find_providers(self, topic: Topic, *, want: int = 64) -> list[SignedDescriptor]:
        """Verified descriptors of nodes providing ``topic`` (at most a few crawl rounds)."""
        key = topic_key(topic)
        found: dict[bytes, SignedDescriptor] = {}
        now = self.clock()
        for value in self.providers.get(key, now=now, limit=want, random_bytes=self.random_bytes):
            descriptor = self.protocol.verify_provider(value, key)
            if descriptor is not None:
                found[descriptor.node_id] = descriptor
        peers = self._start(key, None)
        if peers and len(found) < want:
            crawl = ProviderCrawl(
                self.protocol,
                Node(key),
                peers,
                self.config.ksize,
                self.config.alpha,
                topic=topic,
                want=want,
            )
            for descriptor in await crawl.find():
                old = found.get(descriptor.node_id)
                if old is None or descriptor.body.version > old.body.version:
                    found[descriptor.node_id] = descriptor
        return list(found.values())

    async def random_walk(
        self, *, known: Callable[[bytes], bool] | None = None
    ) -> list[SignedDescriptor]:
        """Look up a random id, then ask each node found for its own descriptor.

        Ids are hashes, so the k nodes nearest a random id are a fair random sample of
        the whole network, not only of our neighbourhood. ``known(node_id)`` skips
        nodes whose descriptor we already have.
        """
        result = await self.find_node(self.random_bytes(20))
        todo = [n for n in result.nodes if known is None or not known(n.id)]

        async def ask(node: LinkNode) -> SignedDescriptor | None:
            ok, answer = await self.protocol.call_find_value(node, Node(descriptor_key(node.id)))
            if ok and isinstance(answer, FoundValue):
                return self.protocol.verify_descriptor(answer.value, node.id)
            return None

        found = await asyncio.gather(*(ask(n) for n in todo))
        return [d for d in found if d is not None]

    # --- publishing -------------------------------------------------------------------

    async def publish(self, descriptor: SignedDescriptor) -> int:
        """Store our descriptor at the k nodes nearest its key and announce it under every
        topic it belongs to. Returns how many remote stores were acknowledged."""
        value = descriptor.encode()
        now = self.clock()
        key = descriptor_key(descriptor.node_id)
        self.store.put(key, value, now=now)  # our own copy answers direct asks
        acks = await self._store_near(key, value, "store")
        for topic in topics_for(descriptor):
            tkey = topic_key(topic)
            acks += await self._store_near(tkey, value, "add_provider")
        return acks

    async def _store_near(self, key: bytes, value: bytes, method: Method) -> int:
        nodes = (await self.find_node(key)).nodes
        if method == "add_provider" and _we_are_close(self.node, nodes, key):
            self.providers.add(key, value, now=self.clock(), origin=None)
        call = self.protocol.call_store if method == "store" else self.protocol.call_add_provider
        results = await asyncio.gather(*(call(n, key, value) for n in nodes))
        return sum(1 for ok, answer in results if ok and answer is True)

    async def refresh(self) -> None:
        """kademlia's hourly upkeep: look up ids in buckets nobody touched for an hour,
        and re-store records we have held for an hour (bounded)."""
        await asyncio.gather(*(self.find_node(rid) for rid in self.protocol.get_refresh_ids()))
        now = self.clock()
        for key, value in self.store.items_older_than(3600, now)[: self.config.max_tasks // 4]:
            await self._store_near(key, value, "store")

    # --- persistence ------------------------------------------------------------------

    def state_json(self) -> str:
        """The routing table as plain JSON (never pickle)."""
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "node_id": self.node.id.hex(),
                "contacts": [[n.id.hex(), n.ip, n.port, n.link_key.hex()] for n in self.contacts()],
            },
            indent=1,
        )

    @staticmethod
    def contacts_from_json(text: str, *, max_contacts: int = 2048) -> list[DhtContact]:
        """Saved contacts, each re-validated; a malformed file raises :class:`DecodeError`."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DecodeError(f"DHT state is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise DecodeError(f"DHT state is not {STATE_FORMAT}")
        entries = data.get("contacts")
        if not isinstance(entries, list):
            raise DecodeError("DHT state has no contact list")
        contacts = []
        for entry in entries[:max_contacts]:
            try:
                node_id, host, port, link_key = entry
                contact = DhtContact.from_wire(
                    [bytes.fromhex(node_id), host, port, bytes.fromhex(link_key)]
                )
            except (ValueError, TypeError, RpcError):
                continue  # one bad entry does not spoil the rest
            contacts.append(contact)
        return contacts


def _we_are_close(me: LinkNode, nodes: Sequence[LinkNode], key: bytes) -> bool:
    if not nodes:
        return True
    target = Node(key)
    return bool(me.distance_to(target) < max(n.distance_to(target) for n in nodes))
