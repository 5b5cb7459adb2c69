"""Path selection: which relays a circuit goes through, and the sticky entry guards (sans-IO).

A path is 1 to 5 hops (default 3, :class:`PathConstraints`), entry first, exit last:

* **entry**: the first usable guard of a small, sticky :class:`GuardSet` (below);
* **exit**: an exit (role ``exit``) that the pluggable :class:`ExitSelector` accepts
  (:class:`PortExitSelector`: its policy summary allows the target port), drawn in
  proportion to its weight;
* **middles**: relays (role ``relay``) drawn in proportion to their weight.

Weight (:func:`relay_weight`) = advertised bandwidth, raised to a floor (so a relay that
advertises 0, "unknown", is still picked) and capped (bandwidth is a claim the relay
signs about itself, docs/threat-model.md: the cap bounds what one lie buys), times the
relay's locally measured health factor in ``(0, 1]`` (routing/health.py).

No two hops of a path are the same node, in the same operator family
(:func:`family_key`), or share an IPv4 /16 or IPv6 /32 (:func:`subnet_key`, over every
address a relay advertises), as Tor's path-spec §2.2 does; our own node and the
caller's ``exclude`` never appear. Only an explicit :class:`PathConstraints` flag
relaxes the family or subnet rule: a testnet on loopback (every node in 127.0.0.0/16)
needs ``allow_same_subnet=True``. Both rules trust what descriptors claim: an operator
who hides the family of its relays defeats the family rule (as with Tor's MyFamily);
the subnet rule is the one an adversary cannot talk its way around as cheaply.

Choice order: entry (the guard is fixed, so the exit is fitted to it, never the other
way round: an exit choice must not decide which guard we use), then the exit, then
middles. Each step draws from the candidates that fit the hops chosen so far; a draw
that leads to a dead end (no way to finish the path) is struck and redrawn, with a
bound on dead ends, so small networks find a path whenever one exists and large ones
pay one draw per hop. When no path exists, :class:`PathError` says why in words
("no exit accepts port 25", "only 2 relays usable for a 3-hop path").

Guards (simplified from Tor's guard-spec): :class:`GuardSet` keeps ``size`` (3) relays,
chosen in proportion to weight, of distinct families and subnets. A guard is replaced
only when it leaves the directory (or stops offering ``relay``), when its lifetime
(30 days, its ``chosen_at`` backdated by up to a tenth of that so guards chosen together
do not all expire together, as Tor does) is over, or when it has failed at least 10
times in a row over at least 4 hours. Never because another relay looks better: every
new guard is another chance for an adversary's relay to see us. A failing guard is
skipped (tried after the good ones) while it backs off (60 s doubling to 1 h). The
manager reports only failures *at* the guard (:meth:`GuardSet.record_failure`); it also
records them in the :class:`HealthBook`, whose lowered factor keeps a dropped guard
unlikely to be drawn again. Left out of Tor's design: the sampled / filtered / confirmed
guard lists, a grace period for a guard missing from the directory (ours is replaced at
once), and position-dependent bandwidth weights.

One-hop paths use no guard: the single hop is the exit, which sees both the client and
the destination, so a guard would protect nothing.

Randomness is an injected ``random_bytes``; the time is the directory's ``now``.
:func:`select_path` refreshes the guard set it is given (the one thing it changes):
save :meth:`GuardSet.to_json` when :attr:`GuardSet.revision` moves. Not here: building
circuits, timing them or deciding when to retry (routing/build.py, the manager).
"""

from __future__ import annotations

import ipaddress
import json
import math
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, get_args

from discovery.descriptor import DescriptorRole, NodeDescriptor, SignedDescriptor
from discovery.directory import Directory
from meshnode.errors import DecodeError, LocalProtocolError, MeshError
from meshnode.identity import NODE_ID_BYTES, NodeId, b32decode, b32encode
from routing.build import MAX_HOPS
from routing.health import HealthBook

__all__ = [
    "BANDWIDTH_CAP_BPS",
    "BANDWIDTH_FLOOR_BPS",
    "DEFAULT_GUARDS",
    "DEFAULT_HOPS",
    "GUARDS_FORMAT",
    "GUARD_FAILING_FOR_S",
    "GUARD_LIFETIME_S",
    "GUARD_MAX_FAILURES",
    "MAX_HOPS",
    "MIN_HOPS",
    "PATH_ERROR_REASONS",
    "AnyExitSelector",
    "ExitSelector",
    "Guard",
    "GuardChange",
    "GuardChangeKind",
    "GuardSet",
    "PathConstraints",
    "PathError",
    "PathErrorReason",
    "PathRole",
    "PortExitSelector",
    "RandomBytes",
    "family_key",
    "relay_weight",
    "select_path",
    "subnet_key",
]

RandomBytes = Callable[[int], bytes]

MIN_HOPS = 1
DEFAULT_HOPS = 3

BANDWIDTH_FLOOR_BPS = 10_000_000
"""A relay advertising less (0 = unknown) weighs as if it advertised 10 Mbit/s."""
BANDWIDTH_CAP_BPS = 1_000_000_000
"""A relay advertising more weighs as if it advertised 1 Gbit/s (bandwidth is unmeasured)."""

DEFAULT_GUARDS = 3
GUARD_LIFETIME_S = 30 * 86400.0
GUARD_MAX_FAILURES = 10
GUARD_FAILING_FOR_S = 4 * 3600.0
GUARDS_FORMAT = "meshnode/guards/v1"
_GUARD_BACKDATE = 0.1  # chosen_at = now - U(0, 1/10) * lifetime (Tor: GUARD_LIFETIME/10)
_GUARD_RETRY_BASE_S = 60.0
_GUARD_RETRY_MAX_S = 3600.0
_MAX_DEAD_ENDS = 256  # struck draws per select_path call before giving up
_FLOAT_BITS = 53

PathErrorReason = Literal[
    "no_exit",  # no exit (left after exclusions) is accepted by the exit selector
    "too_few_relays",  # fewer usable relays than hops
    "no_guard",  # no guard of the set is usable (all excluded, or the set is empty)
    "no_path",  # relays enough, but none of their combinations keeps the rules
]
PATH_ERROR_REASONS: tuple[PathErrorReason, ...] = get_args(PathErrorReason)
PathRole = Literal["entry", "middle", "exit", "path"]


class PathError(MeshError):
    """No path fits: ``role`` is the position that could not be filled (``entry``,
    ``middle``, ``exit``, or ``path`` for the whole), ``reason`` one of
    :data:`PATH_ERROR_REASONS`; the message says it for a human."""

    def __init__(
        self,
        role: PathRole,
        reason: PathErrorReason,
        message: str,
    ) -> None:
        self.role = role
        self.reason: PathErrorReason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class PathConstraints:
    """The shape of a path and which diversity rules apply."""

    hops: int = DEFAULT_HOPS
    """Hops, 1 to 5: entry (guard), middles, exit."""
    allow_same_subnet: bool = False
    """Testnets only: let hops share an IPv4 /16 or IPv6 /32 (needed on loopback)."""
    allow_same_operator_family: bool = False
    """Testnets only: let hops share an operator family."""

    def __post_init__(self) -> None:
        if type(self.hops) is not int or not MIN_HOPS <= self.hops <= MAX_HOPS:
            raise LocalProtocolError(f"hops must be an integer from {MIN_HOPS} to {MAX_HOPS}")
        if not isinstance(self.allow_same_subnet, bool) or not isinstance(
            self.allow_same_operator_family, bool
        ):
            raise LocalProtocolError("allow_same_subnet and allow_same_operator_family are bools")


_DEFAULT_CONSTRAINTS = PathConstraints()


# --- Families, subnets, weights ---------------------------------------------------------


def family_key(descriptor: SignedDescriptor | NodeDescriptor) -> str:
    """The operator family a relay claims, as a comparable string.

    ``key:<base32>`` when the descriptor names an operator key; else ``name:<name>`` when
    it names an operator, the name normalized (NFKC, case-folded, whitespace collapsed)
    so "Example Ops" and "example  ops" are one family; else ``node:<node id>``, a family
    of one. An operator should set the same key on all its relays: a key and a bare name
    never match each other.
    """
    body = descriptor.body if isinstance(descriptor, SignedDescriptor) else descriptor
    operator = body.operator
    if operator.operator_key is not None:
        return "key:" + b32encode(operator.operator_key)
    name = " ".join(unicodedata.normalize("NFKC", operator.name).casefold().split())
    if name:
        return "name:" + name
    return "node:" + b32encode(body.node_id)


def subnet_key(address: str | tuple[str, int]) -> str:
    """The network a host counts in: its IPv4 /16 or IPv6 /32, e.g. ``"192.0.0.0/16"``.

    Takes a host literal or a descriptor's ``(host, port)``. Loopback and private
    addresses get no exception: 127.0.0.1 is in ``127.0.0.0/16`` like any host, so a
    loopback testnet must say ``allow_same_subnet``. Raises :class:`LocalProtocolError`
    for text that is not an IP address.
    """
    return _subnet_text(_subnet(address[0] if isinstance(address, tuple) else address))


def _subnet(host: object) -> bytes:
    """The network prefix bytes of ``host`` (2 of IPv4, 4 of IPv6): a fast comparable key."""
    if not isinstance(host, str):
        raise LocalProtocolError(f"not an IP address: {host!r}")
    octets = host.split(".")
    if len(octets) == 4 and all(
        o.isascii() and o.isdigit() and len(o) <= 3 and (o == "0" or o[0] != "0") for o in octets
    ):
        # Fast path for dotted quads (ipaddress is ~10x slower); values checked below.
        values = [int(o) for o in octets]
        if all(v <= 255 for v in values):
            return bytes(values[:2])
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        raise LocalProtocolError(f"not an IP address: {host!r}") from None
    return packed[:2] if len(packed) == 4 else packed[:4]


def _subnet_text(prefix: bytes) -> str:
    if len(prefix) == 2:
        return str(ipaddress.IPv4Network((prefix + bytes(2), 16)))
    return str(ipaddress.IPv6Network((prefix + bytes(12), 32)))


def relay_weight(
    descriptor: SignedDescriptor, health: HealthBook, *, now: float | None = None
) -> float:
    """``clamp(bandwidth_bps, floor, cap) * health factor`` (always > 0)."""
    return _bandwidth(descriptor) * health.weight_factor(descriptor.node_id, now=now)


def _bandwidth(descriptor: SignedDescriptor) -> int:
    return min(max(descriptor.body.bandwidth_bps, BANDWIDTH_FLOOR_BPS), BANDWIDTH_CAP_BPS)


# --- Exit selectors ---------------------------------------------------------------------


class ExitSelector(Protocol):
    """Which exits may end a path. Path selection only asks it about nodes with the
    ``exit`` role, and weighs the accepted ones itself."""

    def accepts(self, descriptor: SignedDescriptor) -> bool:
        """True when ``descriptor`` may be this path's exit."""
        ...

    def describe(self) -> str:
        """What an accepted exit does, completing "no exit ...": ``accepts port 25``."""
        ...


@dataclass(frozen=True, slots=True)
class PortExitSelector:
    """Exits whose exit policy summary allows TCP/UDP port ``port``."""

    port: int

    def __post_init__(self) -> None:
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise LocalProtocolError("port must be an integer from 1 to 65535")

    def accepts(self, descriptor: SignedDescriptor) -> bool:
        return any(lo <= self.port <= hi for lo, hi in descriptor.body.exit_policy)

    def describe(self) -> str:
        return f"accepts port {self.port}"


@dataclass(frozen=True, slots=True)
class AnyExitSelector:
    """Every exit, whatever its policy (for traffic that ends at the exit itself)."""

    def accepts(self, descriptor: SignedDescriptor) -> bool:
        return True

    def describe(self) -> str:
        return "is listed"


# --- Candidates -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Candidate:
    descriptor: SignedDescriptor
    node_id: NodeId  # computed once: a descriptor hashes its key for every .node_id
    family: str
    subnets: frozenset[bytes]  # _subnet() of each address
    weight: float

    @classmethod
    def of(cls, descriptor: SignedDescriptor, health: HealthBook, now: float) -> _Candidate:
        node_id = descriptor.node_id
        return cls(
            descriptor,
            node_id,
            family_key(descriptor),
            frozenset(_subnet(host) for host, _ in descriptor.body.addresses),
            _bandwidth(descriptor) * health.weight_factor(node_id, now=now),
        )


def _conflict(a: _Candidate, b: _Candidate, constraints: PathConstraints) -> bool:
    return (
        a.node_id == b.node_id
        or (not constraints.allow_same_operator_family and a.family == b.family)
        or (not constraints.allow_same_subnet and not a.subnets.isdisjoint(b.subnets))
    )


def _fits(
    candidate: _Candidate, chosen: Iterable[_Candidate], constraints: PathConstraints
) -> bool:
    return not any(_conflict(candidate, c, constraints) for c in chosen)


def _unit(random_bytes: RandomBytes) -> float:
    """A uniform float in ``[0, 1)`` from 7 random bytes."""
    data = random_bytes(7)
    if not isinstance(data, bytes) or len(data) != 7:
        raise LocalProtocolError("random_bytes returned the wrong number of bytes")
    return (int.from_bytes(data, "big") >> (56 - _FLOAT_BITS)) / (1 << _FLOAT_BITS)


def _draw(pool: Sequence[_Candidate], random_bytes: RandomBytes) -> _Candidate:
    """One candidate, with probability proportional to its weight (all weights > 0)."""
    target = _unit(random_bytes) * math.fsum(c.weight for c in pool)
    running = 0.0
    for candidate in pool:
        running += candidate.weight
        if target < running:
            return candidate
    return pool[-1]  # rounding: target fell on the total


def _could_fill(pool: Sequence[_Candidate], k: int, constraints: PathConstraints) -> bool:
    """A cheap necessary condition for finding ``k`` mutually fitting hops in ``pool``:
    enough distinct families and subnets (each hop needs its own)."""
    if len(pool) < k:
        return False
    if not constraints.allow_same_operator_family and len({c.family for c in pool}) < k:
        return False
    return constraints.allow_same_subnet or len(set().union(*(c.subnets for c in pool))) >= k


class _Exhausted(Exception):
    pass


class _Search:
    """Draw hops in order, striking a draw that leads to a dead end (bounded)."""

    def __init__(self, constraints: PathConstraints, random_bytes: RandomBytes) -> None:
        self.constraints = constraints
        self.random_bytes = random_bytes
        self.dead_ends = 0

    def fill(
        self, chosen: list[_Candidate], steps: Sequence[Sequence[_Candidate]]
    ) -> list[_Candidate] | None:
        """Extend ``chosen`` by one candidate from each pool of ``steps``; None if impossible."""
        if not steps:
            return chosen
        pool = [c for c in steps[0] if _fits(c, chosen, self.constraints)]
        later = [c for c in steps[-1] if _fits(c, chosen, self.constraints)]
        if not _could_fill(later, len(steps) - 1, self.constraints):
            return None  # the middles (the last pool) cannot supply the remaining hops
        while pool:
            pick = _draw(pool, self.random_bytes)
            found = self.fill([*chosen, pick], steps[1:])
            if found is not None:
                return found
            pool.remove(pick)
            self.dead_ends += 1
            if self.dead_ends >= _MAX_DEAD_ENDS:
                raise _Exhausted
        return None


def select_path(
    directory: Directory,
    *,
    constraints: PathConstraints = _DEFAULT_CONSTRAINTS,
    exit_selector: ExitSelector,
    guards: GuardSet,
    health: HealthBook,
    random_bytes: RandomBytes,
    exclude: Collection[NodeId] = (),
    own_node_id: NodeId | None,
) -> list[SignedDescriptor]:
    """Choose a path of ``constraints.hops`` descriptors, entry first, exit last.

    Refreshes ``guards`` against ``directory`` first (:meth:`GuardSet.refresh`, at the
    directory's ``now``). Nodes in ``exclude`` (e.g. relays a failed build went through)
    and ``own_node_id`` never appear; an excluded guard is skipped, not replaced.

    Raises :class:`PathError` when no path fits, :class:`LocalProtocolError` for bad
    arguments.
    """
    if not isinstance(directory, Directory):
        raise LocalProtocolError("directory must be a Directory")
    if not isinstance(constraints, PathConstraints):
        raise LocalProtocolError("constraints must be PathConstraints")
    now = directory.now
    excluded = set(exclude)
    if own_node_id is not None:
        excluded.add(own_node_id)
    candidates = [_Candidate.of(d, health, now) for d in directory]
    candidates = [c for c in candidates if c.node_id not in excluded]
    relays = [c for c in candidates if DescriptorRole.RELAY in c.descriptor.body.roles]
    exits = [
        c
        for c in candidates
        if DescriptorRole.EXIT in c.descriptor.body.roles and exit_selector.accepts(c.descriptor)
    ]
    hops = constraints.hops
    if not exits:
        note = " (after exclusions)" if exclude else ""
        raise PathError("exit", "no_exit", f"no exit {exit_selector.describe()}{note}")
    search = _Search(constraints, random_bytes)
    if hops == 1:
        return [_draw(exits, random_bytes).descriptor]
    usable = len({c.node_id for c in relays} | {c.node_id for c in exits})
    if usable < hops:
        raise PathError(
            "path",
            "too_few_relays",
            f"only {_count(usable, 'relay', 'relays')} usable for a {hops}-hop path",
        )
    if len(relays) < hops - 1:
        raise PathError(
            "middle",
            "too_few_relays",
            f"only {_count(len(relays), 'relay', 'relays')} can be entry or middle hops; "
            f"a {hops}-hop path needs {hops - 1}",
        )

    guards.refresh(
        directory,
        health=health,
        random_bytes=random_bytes,
        now=now,
        constraints=constraints,
        own_node_id=own_node_id,
    )
    by_id = {c.node_id: c for c in relays}
    entries = [by_id[g.node_id] for g in guards.ordered(now) if g.node_id in by_id]
    if not entries:
        raise PathError(
            "entry",
            "no_guard",
            f"no usable entry guard ({len(guards)} guards, none usable after exclusions)",
        )
    steps = [exits, *([relays] * (hops - 2))]
    try:
        for entry in entries:
            found = search.fill([entry], steps)
            if found is not None:
                entry_, exit_, *middles = found
                return [entry_.descriptor, *(m.descriptor for m in middles), exit_.descriptor]
    except _Exhausted:
        pass
    raise PathError("path", "no_path", _no_path_message(hops, relays, exits, constraints))


def _no_path_message(
    hops: int, relays: list[_Candidate], exits: list[_Candidate], constraints: PathConstraints
) -> str:
    pool = list({c.node_id: c for c in (*relays, *exits)}.values())
    rules = ["nodes"]
    if not constraints.allow_same_operator_family:
        rules.append("operator families")
    if not constraints.allow_same_subnet:
        rules.append("/16 (IPv4) or /32 (IPv6) subnets")
    message = f"no {hops}-hop path with distinct {', '.join(rules)} among {len(pool)} relays"
    hints = []
    if not constraints.allow_same_subnet:
        shared = frozenset.intersection(*(c.subnets for c in pool))
        if shared:
            where = _subnet_text(min(shared))
            hints.append(f"all are in {where}: a local testnet must set allow_same_subnet")
        else:
            spanned = len(set().union(*(c.subnets for c in pool)))
            hints.append(f"they span {_count(spanned, 'subnet', 'subnets')}")
    if not constraints.allow_same_operator_family:
        families = len({c.family for c in pool})
        hints.append(_count(families, "operator family", "operator families"))
    hints.append("the entry must be one of the guards")
    return f"{message} ({'; '.join(hints)})"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


# --- Guards -----------------------------------------------------------------------------


GuardChangeKind = Literal["added", "unlisted", "expired", "failed"]


@dataclass(frozen=True, slots=True)
class GuardChange:
    """One change :meth:`GuardSet.refresh` made: a guard added or dropped, and why."""

    node_id: NodeId
    kind: GuardChangeKind


@dataclass(frozen=True, slots=True, kw_only=True)
class Guard:
    """One entry guard and its failure record."""

    node_id: NodeId
    chosen_at: float
    """When it was chosen (Unix seconds), backdated by up to a tenth of the lifetime."""
    failures: int = 0
    """Builds through it that failed at the guard, in a row."""
    first_failure_at: float | None = None
    last_failure_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != NODE_ID_BYTES:
            raise LocalProtocolError(f"a node id is {NODE_ID_BYTES} bytes")
        if not _finite(self.chosen_at):
            raise LocalProtocolError("chosen_at must be a finite number")
        if type(self.failures) is not int or self.failures < 0:
            raise LocalProtocolError("failures must be an integer >= 0")
        first, last = self.first_failure_at, self.last_failure_at
        if self.failures == 0:
            if first is not None or last is not None:
                raise LocalProtocolError("a guard with no failures has no failure times")
        elif first is None or last is None or not (_finite(first) and _finite(last)):
            raise LocalProtocolError("a failing guard has finite first and last failure times")
        elif first > last:
            raise LocalProtocolError("first_failure_at must not be after last_failure_at")

    def retry_at(self) -> float | None:
        """When a failing guard is worth trying again (None: it is not failing):
        60 s after the last failure, doubling per failure, at most 1 h."""
        if self.failures == 0 or self.last_failure_at is None:
            return None
        backoff = min(_GUARD_RETRY_BASE_S * 2.0 ** min(self.failures - 1, 30), _GUARD_RETRY_MAX_S)
        return self.last_failure_at + backoff


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class GuardSet:
    """A small sticky set of entry guards, in the order they are preferred.

    Call :meth:`refresh` with each new directory (:func:`select_path` does), report
    each build's fate at the guard with :meth:`record_success` / :meth:`record_failure`,
    and save :meth:`to_json` when :attr:`revision` changes.
    """

    size: int = DEFAULT_GUARDS
    lifetime_s: float = GUARD_LIFETIME_S
    max_failures: int = GUARD_MAX_FAILURES
    failing_for_s: float = GUARD_FAILING_FOR_S
    revision: int = 0
    """Bumped on every change worth saving."""
    skipped: int = 0
    """Entries :meth:`from_json` skipped as malformed or repeated."""
    _guards: list[Guard] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if type(self.size) is not int or self.size < 1:
            raise LocalProtocolError("size must be an integer >= 1")
        if type(self.max_failures) is not int or self.max_failures < 1:
            raise LocalProtocolError("max_failures must be an integer >= 1")
        for name in ("lifetime_s", "failing_for_s"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise LocalProtocolError(f"{name} must be a finite number > 0")

    def __len__(self) -> int:
        return len(self._guards)

    @property
    def guards(self) -> tuple[Guard, ...]:
        """The guards, in order of preference."""
        return tuple(self._guards)

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(g.node_id for g in self._guards)

    def ordered(self, now: float) -> list[Guard]:
        """The guards to try, in order: those not backing off after failures (in set
        order), then the backing-off ones, soonest retry first."""

        def retry_at(guard: Guard) -> float:
            at = guard.retry_at()
            return -math.inf if at is None else at

        ready = [g for g in self._guards if retry_at(g) <= now]
        waiting = sorted((g for g in self._guards if retry_at(g) > now), key=retry_at)
        return [*ready, *waiting]

    def record_success(self, node_id: NodeId) -> bool:
        """A build got through guard ``node_id``: its failures are forgiven. False if
        it is not one of ours."""
        return self._update(
            node_id, lambda g: replace(g, failures=0, first_failure_at=None, last_failure_at=None)
        )

    def record_failure(self, node_id: NodeId, *, now: float) -> bool:
        """A build failed *at* guard ``node_id`` (no link, or it refused). False if it
        is not one of ours. Failures further along the path are not the guard's."""
        if not _finite(now):
            raise LocalProtocolError("now must be a finite number of Unix seconds")
        return self._update(
            node_id,
            lambda g: replace(
                g,
                failures=g.failures + 1,
                first_failure_at=g.first_failure_at if g.failures else float(now),
                last_failure_at=float(now),
            ),
        )

    def _update(self, node_id: NodeId, change: Callable[[Guard], Guard]) -> bool:
        for index, guard in enumerate(self._guards):
            if guard.node_id == node_id:
                new = change(guard)
                if new != guard:
                    self._guards[index] = new
                    self.revision += 1
                return True
        return False

    def refresh(
        self,
        directory: Directory,
        *,
        health: HealthBook,
        random_bytes: RandomBytes,
        now: float,
        constraints: PathConstraints = _DEFAULT_CONSTRAINTS,
        own_node_id: NodeId | None = None,
    ) -> tuple[GuardChange, ...]:
        """Drop guards that left ``directory``, expired or kept failing; top the set up.

        New guards are drawn from relays of ``directory`` in proportion to
        :func:`relay_weight`, each of a family and subnet no other guard has (unless
        ``constraints`` relax that); fewer than ``size`` remain when no relay fits.
        Returns what changed, in order.
        """
        if not _finite(now):
            raise LocalProtocolError("now must be a finite number of Unix seconds")
        changes: list[GuardChange] = []
        kept: list[Guard] = []
        chosen: list[_Candidate] = []
        for guard in self._guards:
            descriptor = directory.get(guard.node_id)
            kind = self._drop_reason(guard, descriptor, now, own_node_id)
            if kind is None and descriptor is not None:
                kept.append(guard)
                chosen.append(_Candidate.of(descriptor, health, now))
            else:
                changes.append(GuardChange(guard.node_id, kind or "unlisted"))
        # A guard dropped now is not chosen again by this refresh.
        taken = {g.node_id for g in self._guards}
        if own_node_id is not None:
            taken.add(own_node_id)
        pool = []
        if len(kept) < self.size:
            everyone = directory.nodes(role=DescriptorRole.RELAY)
            pool = [_Candidate.of(d, health, now) for d in everyone]
            pool = [c for c in pool if c.node_id not in taken]
        while len(kept) < self.size:
            pool = [c for c in pool if _fits(c, chosen, constraints)]
            if not pool:
                break
            pick = _draw(pool, random_bytes)
            backdate = _unit(random_bytes) * _GUARD_BACKDATE * self.lifetime_s
            kept.append(Guard(node_id=pick.node_id, chosen_at=float(now) - backdate))
            chosen.append(pick)
            changes.append(GuardChange(pick.node_id, "added"))
        if changes:
            self._guards = kept
            self.revision += 1
        return tuple(changes)

    def _drop_reason(
        self,
        guard: Guard,
        descriptor: SignedDescriptor | None,
        now: float,
        own_node_id: NodeId | None,
    ) -> GuardChangeKind | None:
        if (
            descriptor is None
            or DescriptorRole.RELAY not in descriptor.body.roles
            or guard.node_id == own_node_id
        ):
            return "unlisted"
        age = now - guard.chosen_at
        if not -self.lifetime_s < age < self.lifetime_s:  # a far-future chosen_at too
            return "expired"
        if (
            guard.failures >= self.max_failures
            and guard.first_failure_at is not None
            and now - guard.first_failure_at >= self.failing_for_s
        ):
            return "failed"
        return None

    # --- Persistence --------------------------------------------------------------------

    def to_json(self) -> str:
        """The guards in order (settings are not saved; pass them to :meth:`from_json`)."""
        guards = [
            {
                "id": b32encode(g.node_id),
                "chosen_at": g.chosen_at,
                "failures": g.failures,
                "first_failure_at": g.first_failure_at,
                "last_failure_at": g.last_failure_at,
            }
            for g in self._guards
        ]
        return json.dumps({"format": GUARDS_FORMAT, "guards": guards}, indent=1)

    @classmethod
    def from_json(
        cls,
        text: str,
        *,
        size: int = DEFAULT_GUARDS,
        lifetime_s: float = GUARD_LIFETIME_S,
        max_failures: int = GUARD_MAX_FAILURES,
        failing_for_s: float = GUARD_FAILING_FOR_S,
    ) -> GuardSet:
        """Load a :meth:`to_json` text. Malformed or repeated entries are skipped (counted
        in :attr:`skipped`), and guards past ``size`` dropped; :meth:`refresh` then checks
        the rest against the directory. Raises :class:`DecodeError` for text that is not
        such a snapshot."""
        guard_set = cls(
            size=size, lifetime_s=lifetime_s, max_failures=max_failures, failing_for_s=failing_for_s
        )
        if not isinstance(text, str):
            raise DecodeError("guards: expected JSON text")
        try:
            data: object = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DecodeError(f"guards: not valid JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != GUARDS_FORMAT:
            raise DecodeError(f"guards: not a {GUARDS_FORMAT!r} object")
        entries = data.get("guards")
        if not isinstance(entries, list):
            raise DecodeError("guards: 'guards' must be a list")
        for entry in entries:
            guard = _parse_guard(entry)
            if guard is None or guard.node_id in guard_set.node_ids:
                guard_set.skipped += 1
            elif len(guard_set._guards) < size:
                guard_set._guards.append(guard)
        return guard_set


_GUARD_KEYS = frozenset({"id", "chosen_at", "failures", "first_failure_at", "last_failure_at"})


def _parse_guard(entry: object) -> Guard | None:
    if not isinstance(entry, dict) or set(entry) != _GUARD_KEYS:
        return None
    raw_id = entry["id"]
    if not isinstance(raw_id, str):
        return None
    try:
        node_id = NodeId(b32decode(raw_id, length=NODE_ID_BYTES, what="node id"))
        return Guard(
            node_id=node_id,
            chosen_at=entry["chosen_at"],
            failures=entry["failures"],
            first_failure_at=entry["first_failure_at"],
            last_failure_at=entry["last_failure_at"],
        )
    except (DecodeError, LocalProtocolError):
        return None
