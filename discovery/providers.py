"""The DHT's provider-record store: who offers a role (in a place), as signed descriptors.

A *topic* is a role plus at most one place: ``relay``, ``exit``, ``exit/region/EU``,
``exit/country/DE`` (:class:`Topic`). Its DHT key is :func:`topic_key`, BLAKE2b-160 of
``TOPIC_KEY_DOMAIN || name``. Under that key the DHT keeps a *provider set*, and an
entry of the set is nothing but a node's own signed descriptor (its wire bytes): the
descriptor's Ed25519 signature is the entry's signature and its ``expires_at`` the
entry's expiry, so nobody can add a node to a set without that node's signature, and a
node belongs only to the topics its descriptor names (:func:`topics_for`).

:meth:`ProviderStore.add` is what the DHT's ``add_provider`` handler calls. In order: a
per-origin rate limit (before any parsing, so a flood burns no signature checks; local
adds, ``origin=None``, are not limited), the size, the descriptor (decoded and verified,
unless the very same bytes are already held), its topics (the key must be one of them),
then the merge: one entry per node id per topic, a higher version replaces a lower one,
the same bytes again are accepted as a duplicate. Every refusal is counted.

Bounds hold under any input: at most ``max_per_topic`` entries per topic, ``max_topics``
topics and ``max_bytes`` of descriptor bytes (counted per entry). When a topic is full
its soonest-expiring entry makes way for a newcomer that expires later; otherwise the
newcomer is refused (``topic_full``). When the byte cap is reached, the soonest-expiring
entries anywhere make way the same way (else ``store_full``). When ``max_topics`` topics
are held, a new topic may only displace a topic with a single entry that expires
sooner; popular topics are never pushed out by a flood of one-off topics.

:meth:`ProviderStore.get` answers with a uniformly random subset (rejection sampling,
no modulo bias, as in directory.py), in random order, optionally cut to a byte budget
so the answer fits one DHT message; different askers see different, fair samples.

Sans-IO: ``now`` (Unix seconds, the clock descriptors are stamped with) and
``random_bytes(n)`` are passed in. Persistence is plain JSON (never pickle)::

    {"format": "meshnode/provider-store/v1",
     "records": [{"topic": "exit/country/DE", "value": "<base64 descriptor>"}, ...]}

and every record is re-validated on load.

Counters in :attr:`ProviderStore.stats`: ``providers.added`` (new entry),
``providers.replaced`` (a higher version replaced a lower one), ``providers.duplicate``
(the same bytes again: accepted, nothing changes), ``providers.evicted`` (dropped to make
room), ``providers.expired`` (dropped at expiry), and ``providers.drop.<reason>`` for
each refusal, ``reason`` one of :data:`DROP_REASONS`: every
:data:`discovery.descriptor.REASONS` token, plus ``rate_limited``, ``topic_mismatch``,
``stale_version``, ``topic_full``, ``store_full`` and (loading only) ``bad_record``.

Not here: the DHT messages that carry these records and where they are sent (rpc.py,
dht.py), publishing our own descriptor (publisher.py), the single-descriptor store
(store.py), the directory built from what lookups return (directory.py).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

from discovery.constants import MAX_DESCRIPTOR_BYTES, MAX_REGION_CHARS
from discovery.descriptor import (
    REASONS,
    DescriptorError,
    DescriptorRole,
    NodeDescriptor,
    SignedDescriptor,
    supersedes,
)
from discovery.directory import RandomBytes
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import NodeId
from meshnode.link.ratelimit import KeyedRateLimiter

__all__ = [
    "DEFAULT_ADD_BURST",
    "DEFAULT_ADD_RATE_PER_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ORIGINS",
    "DEFAULT_MAX_PER_TOPIC",
    "DEFAULT_MAX_TOPICS",
    "DROP_REASONS",
    "PROVIDERS_FORMAT",
    "TOPIC_KEY_BYTES",
    "TOPIC_KEY_DOMAIN",
    "ProviderStore",
    "ProviderStoreError",
    "Topic",
    "TopicError",
    "topic_key",
    "topics_for",
]

# Topic key = BLAKE2b-160 (a kademlia id) of TOPIC_KEY_DOMAIN || canonical name. A
# prefixed domain rather than BLAKE2b's personalisation: that holds 16 bytes and the
# name "meshnode/topic/v1" has 17 (descriptor_key in store.py does the same).
TOPIC_KEY_DOMAIN = b"meshnode/topic/v1\0"
TOPIC_KEY_BYTES = 20

# A popular topic ("relay") may have thousands of providers network-wide; a sample of
# 256 is plenty to choose paths from, and far more than one DHT answer carries.
DEFAULT_MAX_PER_TOPIC = 256
# Two roles x (bare + regions + ~250 countries) is about 500 real topics.
DEFAULT_MAX_TOPICS = 1024
# Wire bytes; each entry also keeps its decoded descriptor (~1.7 KB more, measured), so
# the worst case in memory is about 8x this: ~35 MB.
DEFAULT_MAX_BYTES = 4 * 1024 * 1024

# Per-origin ADD limit. A peer that first meets us may hand over whole provider sets it
# thinks we should hold (kademlia's welcome_if_new), up to max_per_topic entries at once;
# after that, republishing is a few adds per node per hour.
DEFAULT_ADD_RATE_PER_S = 4.0
DEFAULT_ADD_BURST = 256.0
DEFAULT_MAX_ORIGINS = 4096

PROVIDERS_FORMAT = "meshnode/provider-store/v1"

DROP_REASONS: tuple[str, ...] = (
    *REASONS,
    "rate_limited",
    "topic_mismatch",
    "stale_version",
    "topic_full",
    "store_full",
    "bad_record",
)

_REGION = re.compile(rf"[A-Z0-9-]{{1,{MAX_REGION_CHARS}}}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_MAX_TOPIC_NAME_CHARS = 64  # "relay/region/" + 16 characters is 29
_ROLES = {role.value: role for role in DescriptorRole}


class TopicError(DecodeError):
    """A topic name or field is malformed (bad role, lowercase place, both places set)."""


class ProviderStoreError(DecodeError):
    """A saved provider store is not a :data:`PROVIDERS_FORMAT` JSON object at all."""


# --- Topics -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topic:
    """A role and at most one place: what a provider-set lookup asks for.

    ``region`` and ``country`` follow descriptor validation exactly (uppercase region of
    ``A-Z0-9-``, uppercase ISO 3166-1 alpha-2 country) so a topic that no descriptor
    can belong to cannot be built; ``""`` means "not set". Raises :class:`TopicError`.
    """

    role: DescriptorRole
    region: str = ""
    country: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.role, DescriptorRole):
            raise TopicError("a topic's role must be a DescriptorRole")
        if not isinstance(self.region, str) or not isinstance(self.country, str):
            raise TopicError("a topic's region and country must be text")
        if self.region and self.country:
            raise TopicError("a topic names a region or a country, not both")
        if self.region and not _REGION.fullmatch(self.region):
            raise TopicError(f"a topic region must be 1 to {MAX_REGION_CHARS} of A-Z, 0-9, '-'")
        if self.country and not _COUNTRY.fullmatch(self.country):
            raise TopicError("a topic country must be two uppercase letters (ISO 3166-1)")

    @property
    def name(self) -> str:
        """The canonical name: ``exit``, ``exit/region/EU``, ``exit/country/DE``."""
        if self.region:
            return f"{self.role.value}/region/{self.region}"
        if self.country:
            return f"{self.role.value}/country/{self.country}"
        return self.role.value

    @property
    def key(self) -> bytes:
        """The DHT key of this topic's provider set (:func:`topic_key`)."""
        return topic_key(self)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> Topic:
        """The topic whose canonical :attr:`name` is ``name``, exactly; else :class:`TopicError`.

        Strict: no case folding, no whitespace, no aliases. Callers taking user input
        (the CLI) normalise it first.
        """
        if not isinstance(name, str) or len(name) > _MAX_TOPIC_NAME_CHARS:
            raise TopicError("a topic name is text of at most 64 characters")
        parts = name.split("/")
        role = _ROLES.get(parts[0])
        if role is None:
            raise TopicError(f"unknown role in topic {name!r} (expected one of {sorted(_ROLES)})")
        if len(parts) == 1:
            return cls(role)
        if len(parts) == 3 and parts[1] == "region" and parts[2]:
            return cls(role, region=parts[2])
        if len(parts) == 3 and parts[1] == "country" and parts[2]:
            return cls(role, country=parts[2])
        raise TopicError(f"topic {name!r} is not ROLE, ROLE/region/R or ROLE/country/C")


def topic_key(topic: Topic) -> bytes:
    """The 20-byte DHT key of ``topic``: BLAKE2b-160 of ``TOPIC_KEY_DOMAIN || name``."""
    if not isinstance(topic, Topic):
        raise LocalProtocolError("topic_key takes a Topic")
    return crypto.hash_bytes(TOPIC_KEY_DOMAIN + topic.name.encode("ascii"), size=TOPIC_KEY_BYTES)


def topics_for(descriptor: SignedDescriptor | NodeDescriptor) -> list[Topic]:
    """Every topic a descriptor belongs to, roles in name order.

    Per role: the bare role, then ``role/region/R`` if it names a region, then
    ``role/country/C`` if it names a country. A descriptor with no role has no topics.
    """
    body = descriptor.body if isinstance(descriptor, SignedDescriptor) else descriptor
    topics: list[Topic] = []
    for role in sorted(body.roles, key=lambda r: r.value):
        topics.append(Topic(role))
        if body.region:
            topics.append(Topic(role, region=body.region))
        if body.country:
            topics.append(Topic(role, country=body.country))
    return topics


# --- The store --------------------------------------------------------------------------


def _check_now(now: float) -> None:
    if not isinstance(now, int | float) or not math.isfinite(now):
        raise LocalProtocolError("now must be a finite number of Unix seconds")


@dataclass(slots=True)
class _Entry:
    value: bytes
    descriptor: SignedDescriptor
    seq: int  # matches the entry's live item in the expiry heap

    @property
    def expires_at(self) -> int:
        return self.descriptor.body.expires_at


@dataclass(slots=True)
class _TopicSet:
    topic: Topic
    entries: dict[NodeId, _Entry]


@dataclass(slots=True)
class _Shared:
    """One verified descriptor, shared by every topic holding its exact bytes."""

    descriptor: SignedDescriptor
    refs: int


_Slot = tuple[bytes, NodeId]  # (topic key, node id): one entry


class ProviderStore:
    """Provider sets by topic key: validated descriptors, capped per topic, in topics, in bytes.

    ``len(store)`` counts entries held (one per node per topic), which may include
    expired ones not yet culled; ``add`` and every reading method cull first and never
    return an expired entry.

    ``max_bytes`` counts wire bytes. Beside them each entry keeps its decoded descriptor
    (shared by the topics holding the same bytes), about 1.7 KB more in CPython, so the
    caps hold memory to about eight times ``max_bytes`` at worst (smallest descriptors).
    """

    __slots__ = (
        "_count",
        "_heap",
        "_limiter",
        "_max_bytes",
        "_max_per_topic",
        "_max_topics",
        "_seq",
        "_shared",
        "_stats",
        "_topics",
        "_total_bytes",
    )

    def __init__(
        self,
        *,
        max_per_topic: int = DEFAULT_MAX_PER_TOPIC,
        max_topics: int = DEFAULT_MAX_TOPICS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        add_rate_per_s: float = DEFAULT_ADD_RATE_PER_S,
        add_burst: float = DEFAULT_ADD_BURST,
        max_origins: int = DEFAULT_MAX_ORIGINS,
    ) -> None:
        if max_per_topic < 1:
            raise ValueError("max_per_topic must be at least 1")
        if max_topics < 1:
            raise ValueError("max_topics must be at least 1")
        if max_bytes < MAX_DESCRIPTOR_BYTES:
            raise ValueError(f"max_bytes must be at least {MAX_DESCRIPTOR_BYTES}")
        self._max_per_topic = max_per_topic
        self._max_topics = max_topics
        self._max_bytes = max_bytes
        self._limiter = KeyedRateLimiter(
            rate_per_s=add_rate_per_s, burst=add_burst, max_entries=max_origins
        )
        self._topics: dict[bytes, _TopicSet] = {}
        self._shared: dict[bytes, _Shared] = {}  # wire bytes -> verified descriptor
        self._heap: list[tuple[int, int, bytes, NodeId]] = []  # (expires_at, seq, slot), lazy
        self._seq = 0
        self._count = 0  # entries held, over all topics
        self._total_bytes = 0
        self._stats: Counter[str] = Counter()

    # --- Properties -------------------------------------------------------------------

    @property
    def stats(self) -> Counter[str]:
        """Live counters (see the module docstring for the names)."""
        return self._stats

    @property
    def max_per_topic(self) -> int:
        return self._max_per_topic

    @property
    def max_topics(self) -> int:
        return self._max_topics

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def total_bytes(self) -> int:
        """Descriptor bytes held, counted once per entry (keys and bookkeeping not included)."""
        return self._total_bytes

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"ProviderStore(topics={len(self._topics)}/{self._max_topics}, "
            f"entries={len(self)}, bytes={self._total_bytes}/{self._max_bytes})"
        )

    def topics(self) -> list[Topic]:
        """The topics with at least one entry held, by name (may include expired entries)."""
        return sorted((t.topic for t in self._topics.values()), key=lambda t: t.name)

    # --- Writing ----------------------------------------------------------------------

    def add(
        self, topic_key: bytes, value: bytes, *, now: float, origin: bytes | None = None
    ) -> bool:
        """Validate ``value`` (descriptor wire bytes) and keep it in the set under ``topic_key``.

        Returns True when the entry is held afterwards (added, replaced or a duplicate),
        False (counted, nothing added) on refusal. ``origin`` is the node id the
        sender's link authenticated, or None for our own adds (not rate-limited). Never
        raises for remote input; a non-finite ``now`` is a local bug
        (:class:`LocalProtocolError`).
        """
        _check_now(now)
        if origin is not None and not self._limiter.allow(origin, now):
            return self._drop("rate_limited")
        if not isinstance(topic_key, bytes) or len(topic_key) != TOPIC_KEY_BYTES:
            return self._drop("topic_mismatch")
        raw: object = value  # remote input: the annotation is a hope, not a fact
        if not isinstance(raw, bytes):
            return self._drop("bad_cbor")  # as SignedDescriptor.decode would say
        if len(raw) > MAX_DESCRIPTOR_BYTES:
            return self._drop("too_large")
        self.cull(now)
        try:
            descriptor = self._verified(value, now)
        except DescriptorError as exc:
            return self._drop(exc.reason)
        topic = next((t for t in topics_for(descriptor) if t.key == topic_key), None)
        if topic is None:
            return self._drop("topic_mismatch")
        node_id = descriptor.node_id
        held = self._topics.get(topic_key)
        old = held.entries.get(node_id) if held is not None else None
        if old is not None:
            if old.value == value:
                self._stats["providers.duplicate"] += 1
                return True
            try:
                newer = supersedes(descriptor, old.descriptor)
            except DescriptorError as exc:  # version_conflict
                return self._drop(exc.reason)
            if not newer:
                return self._drop("stale_version")
        victims = self._make_room(topic_key, node_id, len(value), descriptor, old)
        if isinstance(victims, str):
            return self._drop(victims)
        for slot in victims:
            self._remove(*slot)
            self._stats["providers.evicted"] += 1
        if old is not None:
            self._remove(topic_key, node_id)
            self._stats["providers.replaced"] += 1
        else:
            self._stats["providers.added"] += 1
        self._insert(topic, topic_key, value, descriptor)
        return True

    def cull(self, now: float) -> int:
        """Drop every entry expired at ``now``; returns how many were dropped."""
        _check_now(now)
        dropped = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key, node_id = heapq.heappop(heap)
            if self._live(seq, key, node_id):
                self._remove(key, node_id)
                dropped += 1
        self._stats["providers.expired"] += dropped
        return dropped

    # --- Reading ----------------------------------------------------------------------

    def get(
        self,
        topic_key: bytes,
        *,
        now: float,
        limit: int,
        random_bytes: RandomBytes,
        max_bytes: int | None = None,
        entry_overhead: int = 0,
    ) -> list[bytes]:
        """Up to ``limit`` current entries (wire bytes), a uniform sample in random order.

        Every subset of the set's entries of the returned size is equally likely, and
        so is every order (a partial Fisher-Yates shuffle, each index drawn by rejection
        from ``random_bytes``). With ``max_bytes``, entries are taken in that random
        order until the next one would bring ``sum(len(entry) + entry_overhead)`` past
        ``max_bytes`` (the caller's framing per entry goes in ``entry_overhead``). The
        walk stops there rather than skipping to a smaller entry, so a small descriptor
        is no likelier to be sent than a large one.

        An unknown key gives ``[]``. Raises :class:`LocalProtocolError` for a negative
        ``limit``, ``max_bytes`` or ``entry_overhead``, or ``random_bytes`` returning
        the wrong length.
        """
        _check_count(limit, "limit")
        _check_count(entry_overhead, "entry_overhead")
        if max_bytes is not None:
            _check_count(max_bytes, "max_bytes")
        self.cull(now)
        held = self._topics.get(topic_key) if isinstance(topic_key, bytes) else None
        if held is None or limit == 0:
            return []
        pool = [held.entries[node_id].value for node_id in sorted(held.entries)]
        budget = math.inf if max_bytes is None else max_bytes
        out: list[bytes] = []
        used = 0
        n = len(pool)
        for i in range(min(limit, n)):
            j = i + _below(random_bytes, n - i)
            pool[i], pool[j] = pool[j], pool[i]
            cost = len(pool[i]) + entry_overhead
            if used + cost > budget:
                break
            out.append(pool[i])
            used += cost
        return out

    def descriptors(self, now: float) -> list[SignedDescriptor]:
        """Every current descriptor, one per node id (the highest version), by node id."""
        self.cull(now)
        by_id: dict[NodeId, SignedDescriptor] = {}
        for key in sorted(self._topics):
            for node_id, entry in self._topics[key].entries.items():
                held = by_id.get(node_id)
                if held is None or entry.descriptor.body.version > held.body.version:
                    by_id[node_id] = entry.descriptor
        return [by_id[node_id] for node_id in sorted(by_id)]

    # --- Persistence ------------------------------------------------------------------

    def to_json(self) -> str:
        """Plain-data snapshot: ``{"format": ..., "records": [{"topic": name, "value": b64}]}``.

        Records are sorted by topic name, then node id, so equal stores serialise equally.
        """
        records = [
            {"topic": held.topic.name, "value": base64.b64encode(entry.value).decode("ascii")}
            for held in sorted(self._topics.values(), key=lambda t: t.topic.name)
            for _, entry in sorted(held.entries.items())
        ]
        return json.dumps({"format": PROVIDERS_FORMAT, "records": records}, indent=1)

    @classmethod
    def from_json(
        cls,
        text: str,
        *,
        now: float,
        max_per_topic: int = DEFAULT_MAX_PER_TOPIC,
        max_topics: int = DEFAULT_MAX_TOPICS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> ProviderStore:
        """Load a :meth:`to_json` snapshot, re-validating every record at ``now``.

        Each record goes through :meth:`add` as a local add, so invalid, expired or
        misfiled records are dropped and counted in the new store's ``stats`` (a record
        that is not ``{"topic": name, "value": base64}`` as ``providers.drop.bad_record``).
        A text that is not such a snapshot at all raises :class:`ProviderStoreError`.
        """
        _check_now(now)
        if not isinstance(text, str):
            raise ProviderStoreError("provider store: expected JSON text")
        try:
            data: object = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ProviderStoreError(
                f"provider store: not valid JSON ({type(exc).__name__})"
            ) from None
        if not isinstance(data, dict) or data.get("format") != PROVIDERS_FORMAT:
            raise ProviderStoreError(f"provider store: not a {PROVIDERS_FORMAT!r} object")
        records = data.get("records")
        if not isinstance(records, list):
            raise ProviderStoreError("provider store: 'records' must be a list")
        store = cls(max_per_topic=max_per_topic, max_topics=max_topics, max_bytes=max_bytes)
        for record in records:
            parsed = _parse_record(record)
            if parsed is None:
                store._drop("bad_record")
                continue
            store.add(parsed[0].key, parsed[1], now=now)
        return store

    # --- Internals --------------------------------------------------------------------

    def _drop(self, reason: str) -> bool:
        self._stats[f"providers.drop.{reason}"] += 1
        return False

    def _verified(self, value: bytes, now: float) -> SignedDescriptor:
        """The descriptor ``value`` encodes, current at ``now``; raises DescriptorError.

        Bytes already held were verified when first added: only time is checked again,
        so republishing (or a flood of copies) costs no signature check.
        """
        shared = self._shared.get(value)
        if shared is None:
            return SignedDescriptor.decode(value, now=now)
        shared.descriptor.check_current(now)
        return shared.descriptor

    def _live(self, seq: int, key: bytes, node_id: NodeId) -> bool:
        held = self._topics.get(key)
        entry = held.entries.get(node_id) if held is not None else None
        return entry is not None and entry.seq == seq

    def _make_room(
        self,
        key: bytes,
        node_id: NodeId,
        size: int,
        descriptor: SignedDescriptor,
        old: _Entry | None,
    ) -> list[_Slot] | str:
        """The entries to evict so the newcomer fits, or the refusal reason.

        Evicts nothing itself. Expired entries are already culled. A victim always
        expires strictly sooner than the newcomer, so the newcomer would never be the
        next to go; the entry being replaced is never a victim.
        """
        expires_at = descriptor.body.expires_at
        victims: list[_Slot] = []
        freed = len(old.value) if old is not None else 0
        held = self._topics.get(key)
        if held is None and len(self._topics) >= self._max_topics:
            # Only a single-entry topic may give way, so popular sets survive a flood of
            # one-off topics; of those, the one whose entry expires soonest.
            singles = [
                (entry.expires_at, entry.seq, k, entry)
                for k, t in self._topics.items()
                if len(t.entries) == 1
                for entry in t.entries.values()
            ]
            if not singles:
                return "store_full"
            victim_expiry, _, victim_key, victim = min(singles, key=lambda s: (s[0], s[1]))
            if victim_expiry >= expires_at:
                return "store_full"
            victims.append((victim_key, victim.descriptor.node_id))
            freed += len(victim.value)
        elif held is not None and old is None and len(held.entries) >= self._max_per_topic:
            victim = min(held.entries.values(), key=lambda e: (e.expires_at, e.seq))
            if victim.expires_at >= expires_at:
                return "topic_full"
            victims.append((key, victim.descriptor.node_id))
            freed += len(victim.value)
        excess = self._total_bytes - freed + size - self._max_bytes
        if excess <= 0:
            return victims
        # Over the byte cap: walk the expiry heap, soonest first, and put it back after.
        chosen = set(victims)
        popped: list[tuple[int, int, bytes, NodeId]] = []
        heap = self._heap
        outcome: list[_Slot] | str = "store_full"
        while heap:
            item = heapq.heappop(heap)
            victim_expiry, seq, victim_key, victim_id = item
            if not self._live(seq, victim_key, victim_id):
                continue  # stale heap item: drop it for good
            popped.append(item)
            slot = (victim_key, victim_id)
            if slot in chosen or (victim_key == key and victim_id == node_id):
                continue
            if victim_expiry >= expires_at:
                break
            victims.append(slot)
            excess -= len(self._topics[victim_key].entries[victim_id].value)
            if excess <= 0:
                outcome = victims
                break
        for item in popped:
            heapq.heappush(heap, item)
        return outcome

    def _insert(self, topic: Topic, key: bytes, value: bytes, descriptor: SignedDescriptor) -> None:
        held = self._topics.get(key)
        if held is None:
            held = self._topics[key] = _TopicSet(topic=topic, entries={})
        shared = self._shared.get(value)
        if shared is None:
            self._shared[value] = _Shared(descriptor=descriptor, refs=1)
        else:
            shared.refs += 1
            descriptor = shared.descriptor
        self._seq += 1
        entry = _Entry(value=value, descriptor=descriptor, seq=self._seq)
        node_id = descriptor.node_id
        held.entries[node_id] = entry
        self._count += 1
        self._total_bytes += len(value)
        heapq.heappush(self._heap, (entry.expires_at, entry.seq, key, node_id))
        if len(self._heap) > 2 * self._count + 64:
            self._heap = [
                (e.expires_at, e.seq, k, i)
                for k, t in self._topics.items()
                for i, e in t.entries.items()
            ]
            heapq.heapify(self._heap)

    def _remove(self, key: bytes, node_id: NodeId) -> None:
        held = self._topics[key]
        entry = held.entries.pop(node_id)
        if not held.entries:
            del self._topics[key]
        self._count -= 1
        self._total_bytes -= len(entry.value)
        shared = self._shared[entry.value]
        shared.refs -= 1
        if shared.refs == 0:
            del self._shared[entry.value]


# --- Helpers ----------------------------------------------------------------------------


def _check_count(value: object, name: str) -> None:
    if type(value) is not int or value < 0:
        raise LocalProtocolError(f"{name} must be an integer >= 0")


def _below(random_bytes: RandomBytes, n: int) -> int:
    """A uniform integer in ``[0, n)``: masked draws, rejected until below ``n``.

    The same rejection sampling as directory.py's: a plain ``% n`` would favour small
    values whenever ``n`` is not a power of two.
    """
    if n == 1:
        return 0
    bits = (n - 1).bit_length()
    mask = (1 << bits) - 1
    size = (bits + 7) // 8
    while True:  # each draw is accepted with probability > 1/2
        data = random_bytes(size)
        if not isinstance(data, bytes) or len(data) != size:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        value = int.from_bytes(data, "big") & mask
        if value < n:
            return value


def _parse_record(record: object) -> tuple[Topic, bytes] | None:
    if not isinstance(record, dict):
        return None
    name, value_b64 = record.get("topic"), record.get("value")
    if not isinstance(name, str) or not isinstance(value_b64, str):
        return None
    try:
        topic = Topic.parse(name)
        value = base64.b64decode(value_b64, validate=True)
    except (TopicError, ValueError, binascii.Error):
        return None
    return topic, value
