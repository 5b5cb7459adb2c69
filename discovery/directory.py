"""The local directory: an immutable snapshot of validated, current node descriptors.

A :class:`Directory` is built from :class:`SignedDescriptor` values (already
signature-checked by construction) and a clock reading ``now``. It keeps only the
descriptors current at ``now`` (:meth:`SignedDescriptor.is_current`) and one descriptor
per node id (the one that :func:`supersedes` the others). Readers get lookup by id,
deterministic filtered listings and random samples ("3 exits in DE, not these two");
:meth:`Directory.refreshed` makes the next snapshot (expired entries dropped, new ones
merged) and leaves this one untouched, so a snapshot can be shared freely.

Filters compare exactly: descriptor validation only admits uppercase regions
(``A-Z0-9-``) and uppercase ISO 3166-1 alpha-2 countries, so a filter that could never
match (``"de"``) is a caller bug and raises :class:`LocalProtocolError` instead of
quietly returning nothing. Callers taking user input (the CLI) uppercase it first.

Sampling draws from an injected ``random_bytes(n) -> bytes`` (``meshnode.crypto.
random_bytes`` in production, a seeded stream in tests): uniform choices by rejection
(no modulo bias), weighted choices by exponential keys (Efraimidis-Spirakis), which is
the same as drawing one at a time in proportion to weight, without replacement.

Sans-IO: no network, no persistence, no clock of its own. Not here: decoding and
validating wire bytes (descriptor.py), the bounded descriptor cache (store.py), the DHT
(dht.py).
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import NoReturn

from discovery.constants import MAX_REGION_CHARS
from discovery.descriptor import DescriptorError, DescriptorRole, SignedDescriptor, supersedes
from meshnode.errors import LocalProtocolError
from meshnode.identity import NodeId

__all__ = ["Directory", "RandomBytes", "Weight"]

RandomBytes = Callable[[int], bytes]
"""``random_bytes(n)`` returns ``n`` uniformly random bytes."""

Weight = Callable[[SignedDescriptor], float]
"""A sampling weight: finite and >= 0; an entry of weight 0 is never chosen."""

_REGION = re.compile(rf"[A-Z0-9-]{{0,{MAX_REGION_CHARS}}}")
_COUNTRY = re.compile(r"([A-Z]{2})?")
_FLOAT_BITS = 53  # a double's mantissa: uniform floats are multiples of 2**-53


class Directory:
    """An immutable snapshot of current descriptors, one per node id.

    ``Directory(descriptors, now=now)`` keeps each descriptor current at ``now`` (not
    expired, not from the future); of several for one node id it keeps the one that
    supersedes the others (highest version). Two different descriptors with one version
    (``version_conflict``) keep the one seen first and are counted in
    :attr:`version_conflicts`; descriptors left out for not being current are counted in
    :attr:`not_current`. Both counters describe the build of this snapshot only.
    """

    __slots__ = ("_by_id", "_ordered", "not_current", "now", "version_conflicts")

    now: float
    not_current: int
    version_conflicts: int
    _by_id: dict[NodeId, SignedDescriptor]
    _ordered: tuple[SignedDescriptor, ...]

    def __init__(self, descriptors: Iterable[SignedDescriptor] = (), *, now: float) -> None:
        if not isinstance(now, int | float) or not math.isfinite(now):
            raise LocalProtocolError("now must be a finite number of Unix seconds")
        by_id: dict[NodeId, SignedDescriptor] = {}
        not_current = 0
        conflicts = 0
        for descriptor in descriptors:
            if not isinstance(descriptor, SignedDescriptor):
                raise LocalProtocolError("a directory holds SignedDescriptor values only")
            if not descriptor.is_current(now):
                not_current += 1
                continue
            node_id = descriptor.node_id
            held = by_id.get(node_id)
            if held is None:
                by_id[node_id] = descriptor
                continue
            try:
                if supersedes(descriptor, held):
                    by_id[node_id] = descriptor
            except DescriptorError as exc:
                if exc.reason != "version_conflict":  # pragma: no cover - no other reason
                    raise
                conflicts += 1
        set_ = object.__setattr__
        set_(self, "now", now)
        set_(self, "not_current", not_current)
        set_(self, "version_conflicts", conflicts)
        set_(self, "_by_id", by_id)
        set_(self, "_ordered", tuple(by_id[i] for i in sorted(by_id)))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Directory is immutable (cannot set {name})")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Directory is immutable (cannot delete {name})")

    def __repr__(self) -> str:
        return f"Directory({len(self._ordered)} nodes, now={self.now})"

    # --- Lookup -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ordered)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __iter__(self) -> Iterator[SignedDescriptor]:
        """Every descriptor, in node id order."""
        return iter(self._ordered)

    def get(self, node_id: NodeId) -> SignedDescriptor | None:
        """The descriptor of ``node_id``, or None when this snapshot has none."""
        return self._by_id.get(node_id)

    def nodes(
        self,
        role: DescriptorRole | None = None,
        region: str | None = None,
        country: str | None = None,
    ) -> tuple[SignedDescriptor, ...]:
        """Descriptors offering ``role`` in ``region`` and ``country``, by node id.

        ``None`` means no filter; ``""`` matches descriptors that name no region (or
        country). Raises :class:`LocalProtocolError` for a filter value no valid
        descriptor can carry (e.g. lowercase).
        """
        _check_filters(role, region, country)
        return tuple(d for d in self._ordered if _matches(d, role, region, country))

    # --- Sampling -----------------------------------------------------------------------

    def sample(
        self,
        *,
        k: int,
        random_bytes: RandomBytes,
        role: DescriptorRole | None = None,
        region: str | None = None,
        country: str | None = None,
        exclude: Collection[NodeId] = (),
        weight: Weight | None = None,
    ) -> tuple[SignedDescriptor, ...]:
        """Up to ``k`` distinct matching descriptors not in ``exclude``, in random order.

        Without ``weight`` every matching descriptor is equally likely (a partial
        Fisher-Yates shuffle); with it, entries are drawn one after another in proportion
        to their weight, without replacement, and weight-0 entries are never returned.
        Fewer than ``k`` come back when fewer match. The result depends only on the
        snapshot, the arguments and the bytes ``random_bytes`` returns.

        Raises :class:`LocalProtocolError` for ``k < 0``, a bad filter, a weight that is
        negative or not finite, or ``random_bytes`` returning the wrong length.
        """
        if type(k) is not int or k < 0:
            raise LocalProtocolError("k must be an integer >= 0")
        _check_filters(role, region, country)
        excluded = frozenset(exclude)
        pool = [
            d
            for d in self._ordered
            if _matches(d, role, region, country) and d.node_id not in excluded
        ]
        if k == 0 or not pool:
            return ()
        if weight is None:
            return _uniform_sample(pool, k, random_bytes)
        return _weighted_sample(pool, k, random_bytes, weight)

    # --- Next snapshot ------------------------------------------------------------------

    def refreshed(self, now: float, added: Iterable[SignedDescriptor] = ()) -> Directory:
        """A new snapshot at ``now``: this one's still-current entries plus ``added``.

        An added descriptor replaces a held one only if it supersedes it; on a version
        conflict the held one stays (and is counted in the new snapshot's
        :attr:`version_conflicts`). Descriptors not current at ``now`` are dropped before
        merging, so an expired newer version never hides a current older one.
        """
        return Directory((*self._ordered, *added), now=now)


# --- Helpers ----------------------------------------------------------------------------


def _check_filters(role: DescriptorRole | None, region: str | None, country: str | None) -> None:
    if role is not None and not isinstance(role, DescriptorRole):
        raise LocalProtocolError("role must be a DescriptorRole or None")
    if region is not None and not (isinstance(region, str) and _REGION.fullmatch(region)):
        raise LocalProtocolError(
            f"region filter must be at most {MAX_REGION_CHARS} of A-Z, 0-9, '-' (exact match)"
        )
    if country is not None and not (isinstance(country, str) and _COUNTRY.fullmatch(country)):
        raise LocalProtocolError("country filter must be two uppercase letters or empty")


def _matches(
    descriptor: SignedDescriptor,
    role: DescriptorRole | None,
    region: str | None,
    country: str | None,
) -> bool:
    body = descriptor.body
    return (
        (role is None or role in body.roles)
        and (region is None or body.region == region)
        and (country is None or body.country == country)
    )


def _draw(random_bytes: RandomBytes, n: int) -> bytes:
    data = random_bytes(n)
    if not isinstance(data, bytes) or len(data) != n:
        raise LocalProtocolError("random_bytes returned the wrong number of bytes")
    return data


def _below(random_bytes: RandomBytes, n: int) -> int:
    """A uniform integer in ``[0, n)``: masked draws, rejected until below ``n``."""
    if n == 1:
        return 0
    bits = (n - 1).bit_length()
    mask = (1 << bits) - 1
    size = (bits + 7) // 8
    while True:  # each draw is accepted with probability > 1/2
        value = int.from_bytes(_draw(random_bytes, size), "big") & mask
        if value < n:
            return value


def _unit(random_bytes: RandomBytes) -> float:
    """A uniform float in ``(0, 1]`` (never 0, so its logarithm is finite)."""
    value = int.from_bytes(_draw(random_bytes, 7), "big") >> (56 - _FLOAT_BITS)
    return (value + 1) / (1 << _FLOAT_BITS)


def _uniform_sample(
    pool: list[SignedDescriptor], k: int, random_bytes: RandomBytes
) -> tuple[SignedDescriptor, ...]:
    n = len(pool)
    for i in range(min(k, n)):
        j = i + _below(random_bytes, n - i)
        pool[i], pool[j] = pool[j], pool[i]
    return tuple(pool[: min(k, n)])


def _weighted_sample(
    pool: list[SignedDescriptor], k: int, random_bytes: RandomBytes, weight: Weight
) -> tuple[SignedDescriptor, ...]:
    # Efraimidis-Spirakis with exponential keys: entry i gets -ln(u_i) / w_i, an
    # exponential variable of rate w_i; the k smallest keys are a weighted sample without
    # replacement, in draw order. Weights are all read (and checked) before any draw.
    weights = [weight(d) for d in pool]
    for w in weights:
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
            raise LocalProtocolError("a sampling weight must be a finite number")
        if w < 0:
            raise LocalProtocolError("a sampling weight must not be negative")
    keyed = [
        (-math.log(_unit(random_bytes)) / w, index) for index, w in enumerate(weights) if w > 0
    ]
    return tuple(pool[index] for _, index in heapq.nsmallest(k, keyed))
