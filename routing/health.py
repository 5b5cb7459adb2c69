"""Locally measured relay health and the learned circuit build timeout (sans-IO).

Two small stores the circuit manager feeds and path selection reads:

* :class:`HealthBook`: per relay (:class:`RelayHealth`), build attempts and successes,
  probes sent and lost, and a smoothed probe round-trip time. :meth:`HealthBook.
  weight_factor` turns them into a factor in ``(0, 1]`` that multiplies a relay's
  bandwidth weight (routing/path.py). A relay we know nothing about gets the neutral
  factor 1: health only ever *lowers* a weight, so a newcomer is not starved and a
  relay cannot buy weight by looking good to us. The factor never reaches 0
  (:data:`MIN_WEIGHT_FACTOR`), so a failing relay is still tried now and then and can
  recover; its old record also fades (counts halve every :data:`HEALTH_HALF_LIFE_S`, and
  are scaled down past :data:`MAX_BUILD_COUNT` / :data:`MAX_PROBE_COUNT`, as Tor's path
  bias code scales its counts), so yesterday's outage does not outweigh today's
  successes. The book is bounded (:data:`DEFAULT_MAX_RELAYS`, least recently seen
  evicted).
* :class:`BuildTimeout`: how long to wait for a BUILD_REPLY, learned from observed build
  times (Tor's circuit-build-timeout idea, path-spec §2.4, simplified; see the class).

Who is to blame is the caller's decision: the manager records a refused build against
the hop that refused (``BuildError.hop``), and a build that timed out without naming a
hop against every hop of the path (each takes a share of the blame, as Tor's path bias
does for guards). A probe's RTT is recorded against the hop it was sent to.

Both stores persist as JSON (``to_json`` / ``from_json``). Loading re-validates every
entry and skips bad ones (counted in ``skipped``); text that is not such a snapshot at
all raises :class:`DecodeError`, and the caller starts afresh.

Time is ``now`` in Unix seconds, passed in; nothing here reads a clock or a socket. Not
here: choosing relays (routing/path.py), sending probes or timing builds (the manager).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TypeGuard

from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.identity import NODE_ID_BYTES, NodeId, b32decode, b32encode

__all__ = [
    "BUILD_TIMEOUT_FORMAT",
    "DEFAULT_BUILD_TIMEOUT_S",
    "DEFAULT_MAX_RELAYS",
    "HEALTH_FORMAT",
    "HEALTH_HALF_LIFE_S",
    "MAX_BUILD_COUNT",
    "MAX_BUILD_TIMEOUT_S",
    "MAX_PROBE_COUNT",
    "MIN_BUILD_TIMEOUT_S",
    "MIN_WEIGHT_FACTOR",
    "NEUTRAL_WEIGHT_FACTOR",
    "BuildTimeout",
    "HealthBook",
    "RelayHealth",
]

HEALTH_FORMAT = "meshnode/relay-health/v1"
BUILD_TIMEOUT_FORMAT = "meshnode/build-timeout/v1"

DEFAULT_MAX_RELAYS = 10_000
"""Relays a :class:`HealthBook` remembers; the least recently seen goes first."""

NEUTRAL_WEIGHT_FACTOR = 1.0
"""The factor of a relay with no record: health lowers weights, never raises them."""
MIN_WEIGHT_FACTOR = 0.01
"""The floor: a relay that always fails keeps 1% of its weight, so it is retried."""

HEALTH_HALF_LIFE_S = 24 * 3600.0
"""Counts halve every day without news: old outages fade, a quiet relay drifts back
towards neutral."""
MAX_BUILD_COUNT = 100.0
"""Build counts are scaled down (ratio kept) past this many attempts, so recent builds
still move the rate of a busy relay (Tor's path bias scales its counts the same way)."""
MAX_PROBE_COUNT = 200.0
"""The same for probes sent."""

# Priors: a relay starts as if it had 3 successful builds and 5 answered probes, so one
# failure costs a quarter of its weight (3/4), not all of it; ten in a row leave ~23%.
_BUILD_PRIOR = 3.0
_PROBE_PRIOR = 5.0
# Probe RTT: smoothed like TCP's SRTT (RFC 6298 §2: alpha = 1/8). Under RTT_GOOD_S no
# penalty; above it the factor falls as 1/rtt, but never below 1/4: a slow relay is a
# worse choice, not a broken one (loss and failed builds are what say broken).
_RTT_ALPHA = 0.125
_RTT_GOOD_S = 1.0
_RTT_MIN_FACTOR = 0.25
_MAX_RTT_S = 60.0  # a sample above this is recorded as this (a lost probe is None)

# --- Build timeout (path-spec §2.4, simplified) -------------------------------------------

DEFAULT_BUILD_TIMEOUT_S = 10.0
"""The timeout until :data:`_MIN_TIMEOUT_SAMPLES` builds have been observed."""
MIN_BUILD_TIMEOUT_S = 1.5
MAX_BUILD_TIMEOUT_S = 60.0
_MAX_TIMEOUT_SAMPLES = 100  # Tor keeps 1,000; builds are rarer for a VPN client
_MIN_TIMEOUT_SAMPLES = 10
_TIMEOUT_QUANTILE = 0.8  # Tor's CBT_DEFAULT_QUANTILE_CUTOFF
_TIMEOUT_MARGIN = 1.5
_RECENT_BUILDS = 20  # Tor's CBT_DEFAULT_RECENT_CIRCUITS
_RECENT_TIMEOUTS_FOR_RESET = 18  # Tor's CBT_DEFAULT_MAX_RECENT_TIMEOUT_COUNT (18 of 20)


def _check_now(now: float) -> None:
    if not _is_number(now):
        raise LocalProtocolError("now must be a finite number of Unix seconds")


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_node_id(node_id: object) -> None:
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
        raise LocalProtocolError(f"a node id is {NODE_ID_BYTES} bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayHealth:
    """What we measured of one relay. Counts are floats because they fade and scale.

    Invariants (checked on construction): every count is finite and >= 0,
    ``build_successes <= build_attempts``, ``probes_lost <= probes_sent``, ``rtt_s`` is
    None (never answered a probe) or in ``[0, 60]``.
    """

    build_attempts: float = 0.0
    build_successes: float = 0.0
    consecutive_build_failures: int = 0
    """Builds failed in a row (not faded): for the manager's logs and decisions."""
    probes_sent: float = 0.0
    probes_lost: float = 0.0
    rtt_s: float | None = None
    """Smoothed probe round-trip time (EWMA, alpha 1/8), None before the first answer."""
    last_seen: float = 0.0
    """When a build or probe was last recorded (Unix seconds): counts fade from here."""

    def __post_init__(self) -> None:
        for name in ("build_attempts", "build_successes", "probes_sent", "probes_lost"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise LocalProtocolError(f"{name} must be a finite number >= 0")
        if self.build_successes > self.build_attempts:
            raise LocalProtocolError("build_successes must not exceed build_attempts")
        if self.probes_lost > self.probes_sent:
            raise LocalProtocolError("probes_lost must not exceed probes_sent")
        failures = self.consecutive_build_failures
        if type(failures) is not int or failures < 0:
            raise LocalProtocolError("consecutive_build_failures must be an integer >= 0")
        if self.rtt_s is not None and not (
            _is_number(self.rtt_s) and 0 <= self.rtt_s <= _MAX_RTT_S
        ):
            raise LocalProtocolError(f"rtt_s must be None or a number in [0, {_MAX_RTT_S}]")
        if not _is_number(self.last_seen):
            raise LocalProtocolError("last_seen must be a finite number of Unix seconds")

    def faded(self, now: float) -> RelayHealth:
        """This record with its counts decayed from :attr:`last_seen` to ``now``.

        Counts halve every :data:`HEALTH_HALF_LIFE_S`; a ``now`` before ``last_seen``
        (the clock stepped back) fades nothing. The RTT is kept as it is.
        """
        _check_now(now)
        elapsed = now - self.last_seen
        if elapsed <= 0:
            return self
        keep = 0.5 ** (elapsed / HEALTH_HALF_LIFE_S)
        return replace(
            self,
            build_attempts=self.build_attempts * keep,
            build_successes=self.build_successes * keep,
            probes_sent=self.probes_sent * keep,
            probes_lost=self.probes_lost * keep,
        )

    def weight_factor(self) -> float:
        """The product of three factors, floored at :data:`MIN_WEIGHT_FACTOR`:

        * builds: ``(successes + 3) / (attempts + 3)``, a success rate with a prior of
          three successes (1 with no builds);
        * loss: ``1 - lost / (sent + 5)`` (1 with no probes);
        * RTT: 1 up to 1 s, then ``1 / rtt``, never below 1/4.
        """
        builds = (self.build_successes + _BUILD_PRIOR) / (self.build_attempts + _BUILD_PRIOR)
        loss = 1.0 - self.probes_lost / (self.probes_sent + _PROBE_PRIOR)
        rtt = 1.0
        if self.rtt_s is not None and self.rtt_s > _RTT_GOOD_S:
            rtt = max(_RTT_MIN_FACTOR, _RTT_GOOD_S / self.rtt_s)
        return min(1.0, max(MIN_WEIGHT_FACTOR, builds * loss * rtt))


def _scaled(count: float, other: float, limit: float) -> tuple[float, float]:
    """Scale ``count`` (and ``other`` in proportion) down to ``limit`` if it is above."""
    if count <= limit:
        return count, other
    ratio = limit / count
    return limit, other * ratio


class HealthBook:
    """Per-relay health, bounded: past ``max_relays`` the least recently seen is evicted.

    Feed it with :meth:`record_build` and :meth:`record_probe`; read it with
    :meth:`weight_factor` (and :meth:`get`). Persist with :meth:`to_json` /
    :meth:`from_json`.
    """

    __slots__ = ("_max_relays", "_relays", "skipped")

    def __init__(self, *, max_relays: int = DEFAULT_MAX_RELAYS) -> None:
        if type(max_relays) is not int or max_relays < 1:
            raise LocalProtocolError("max_relays must be an integer >= 1")
        self._max_relays = max_relays
        # Least recently seen first: a record moves to the end when it is updated.
        self._relays: OrderedDict[NodeId, RelayHealth] = OrderedDict()
        self.skipped = 0
        """Entries :meth:`from_json` skipped as malformed (0 for a new book)."""

    def __len__(self) -> int:
        return len(self._relays)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._relays

    def __iter__(self) -> Iterator[NodeId]:
        """Node ids, least recently seen first."""
        return iter(self._relays)

    @property
    def max_relays(self) -> int:
        return self._max_relays

    def get(self, node_id: NodeId) -> RelayHealth | None:
        """The stored record of ``node_id`` (not faded), or None."""
        return self._relays.get(node_id)

    def forget(self, node_id: NodeId) -> None:
        """Drop the record of ``node_id``, if any."""
        self._relays.pop(node_id, None)

    def weight_factor(self, node_id: NodeId, *, now: float | None = None) -> float:
        """The relay's factor in ``(0, 1]`` (:meth:`RelayHealth.weight_factor`).

        :data:`NEUTRAL_WEIGHT_FACTOR` for a relay with no record. With ``now``, counts
        are faded to ``now`` first, so a relay not heard of for days drifts back towards
        neutral even if nobody picks it.
        """
        record = self._relays.get(node_id)
        if record is None:
            return NEUTRAL_WEIGHT_FACTOR
        if now is not None:
            record = record.faded(now)
        return record.weight_factor()

    def record_build(self, node_id: NodeId, *, ok: bool, now: float) -> RelayHealth:
        """Count one build through ``node_id`` that succeeded (``ok``) or failed."""
        if not isinstance(ok, bool):
            raise LocalProtocolError("ok must be a bool")
        record = self._current(node_id, now)
        attempts = record.build_attempts + 1
        successes = record.build_successes + (1 if ok else 0)
        attempts, successes = _scaled(attempts, successes, MAX_BUILD_COUNT)
        failures = 0 if ok else record.consecutive_build_failures + 1
        return self._store(
            node_id,
            replace(
                record,
                build_attempts=attempts,
                build_successes=min(successes, attempts),
                consecutive_build_failures=failures,
            ),
        )

    def record_probe(self, node_id: NodeId, *, rtt_s: float | None, now: float) -> RelayHealth:
        """Count one probe to ``node_id``: answered after ``rtt_s`` seconds, or lost (None).

        RTTs above 60 s count as 60 s; a negative or non-finite RTT is a caller bug.
        """
        if rtt_s is not None and not (_is_number(rtt_s) and rtt_s >= 0):
            raise LocalProtocolError("rtt_s must be None (lost) or a finite number >= 0")
        record = self._current(node_id, now)
        sent = record.probes_sent + 1
        lost = record.probes_lost + (1 if rtt_s is None else 0)
        sent, lost = _scaled(sent, lost, MAX_PROBE_COUNT)
        rtt = record.rtt_s
        if rtt_s is not None:
            sample = min(float(rtt_s), _MAX_RTT_S)
            rtt = sample if rtt is None else rtt + _RTT_ALPHA * (sample - rtt)
        return self._store(
            node_id, replace(record, probes_sent=sent, probes_lost=min(lost, sent), rtt_s=rtt)
        )

    def _current(self, node_id: NodeId, now: float) -> RelayHealth:
        _check_node_id(node_id)
        _check_now(now)
        record = self._relays.get(node_id)
        if record is None:
            return RelayHealth(last_seen=float(now))
        # Faded to now; last_seen never moves backwards (a clock step back fades nothing).
        return replace(record.faded(now), last_seen=max(record.last_seen, float(now)))

    def _store(self, node_id: NodeId, record: RelayHealth) -> RelayHealth:
        self._relays[node_id] = record
        self._relays.move_to_end(node_id)
        while len(self._relays) > self._max_relays:
            self._relays.popitem(last=False)
        return record

    # --- Persistence --------------------------------------------------------------------

    def to_json(self) -> str:
        """Every record, least recently seen first, node ids in base32."""
        relays = [
            {
                "id": b32encode(node_id),
                "build_attempts": r.build_attempts,
                "build_successes": r.build_successes,
                "consecutive_build_failures": r.consecutive_build_failures,
                "probes_sent": r.probes_sent,
                "probes_lost": r.probes_lost,
                "rtt_s": r.rtt_s,
                "last_seen": r.last_seen,
            }
            for node_id, r in self._relays.items()
        ]
        return json.dumps({"format": HEALTH_FORMAT, "relays": relays}, indent=1)

    @classmethod
    def from_json(cls, text: str, *, max_relays: int = DEFAULT_MAX_RELAYS) -> HealthBook:
        """Load a :meth:`to_json` text.

        Malformed entries (bad id, a missing, extra or out-of-range field, a repeated id)
        are skipped and counted in :attr:`skipped`; past ``max_relays`` the last entries
        (the most recently seen) are kept. Raises :class:`DecodeError` for text that is
        not such a snapshot.
        """
        _, relays = _load(text, HEALTH_FORMAT, "relays", "relay health")
        book = cls(max_relays=max_relays)
        parsed: dict[NodeId, RelayHealth] = {}
        for entry in relays:
            item = _parse_relay(entry)
            if item is None or item[0] in parsed:
                book.skipped += 1
                continue
            parsed[item[0]] = item[1]
        for node_id, record in parsed.items():  # file order: least recently seen first
            book._store(node_id, record)
        return book


_RELAY_KEYS = frozenset(
    {
        "id",
        "build_attempts",
        "build_successes",
        "consecutive_build_failures",
        "probes_sent",
        "probes_lost",
        "rtt_s",
        "last_seen",
    }
)


def _load(text: str, format_: str, key: str, what: str) -> tuple[dict[str, object], list[object]]:
    """The snapshot object and its list under ``key``; DecodeError for anything else."""
    if not isinstance(text, str):
        raise DecodeError(f"{what}: expected JSON text")
    try:
        data: object = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{what}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != format_:
        raise DecodeError(f"{what}: not a {format_!r} object")
    items = data.get(key)
    if not isinstance(items, list):
        raise DecodeError(f"{what}: {key!r} must be a list")
    return data, items


def _parse_node_id(value: object) -> NodeId | None:
    if not isinstance(value, str):
        return None
    try:
        return NodeId(b32decode(value, length=NODE_ID_BYTES, what="node id"))
    except DecodeError:
        return None


def _parse_relay(entry: object) -> tuple[NodeId, RelayHealth] | None:
    if not isinstance(entry, dict) or set(entry) != _RELAY_KEYS:
        return None
    node_id = _parse_node_id(entry["id"])
    if node_id is None:
        return None
    numbers = ("build_attempts", "build_successes", "probes_sent", "probes_lost", "last_seen")
    if not all(_is_number(entry[name]) for name in numbers):
        return None
    rtt = entry["rtt_s"]
    if rtt is not None and not _is_number(rtt):
        return None
    try:
        record = RelayHealth(
            build_attempts=float(entry["build_attempts"]),
            build_successes=float(entry["build_successes"]),
            consecutive_build_failures=entry["consecutive_build_failures"],
            probes_sent=float(entry["probes_sent"]),
            probes_lost=float(entry["probes_lost"]),
            rtt_s=None if rtt is None else float(rtt),
            last_seen=float(entry["last_seen"]),
        )
    except LocalProtocolError:
        return None
    if record.build_attempts > MAX_BUILD_COUNT or record.probes_sent > MAX_PROBE_COUNT:
        return None
    return node_id, record


class BuildTimeout:
    """How long to wait for a circuit build, learned from how long builds take.

    Tor (path-spec §2.4) fits a Pareto distribution to the last 1,000 build times and
    waits until the 80th percentile of the fit. With our ~100 samples the mode estimate
    that fit rests on is noisy, so this keeps the idea and drops the fit:

    * keep the last 100 outcomes: a completed build's duration, or a timed-out build's
      waiting time (a lower bound of its duration, as Tor counts timeouts at the
      largest time waited);
    * timeout = 1.5 x the 80th percentile (nearest rank) of those times, clamped to
      [1.5 s, 60 s]; :data:`DEFAULT_BUILD_TIMEOUT_S` (10 s) until 10 are known;
    * because timeouts count at their waiting time, a timeout that is too short grows
      by itself: once more than 20% of builds time out, the 80th percentile *is* the
      timeout, and the next one is 1.5 times longer;
    * if 18 of the last 20 builds timed out, the network has probably changed (Tor's
      "network change" check): forget every sample and wait the larger of the default
      and twice the longest of those waits, until 10 new samples are in.

    Builds that failed otherwise (a hop refused, a link failed) say nothing about time
    and are not recorded.
    """

    __slots__ = ("_fallback_s", "_samples", "skipped")

    def __init__(self) -> None:
        # (seconds, timed_out)
        self._samples: deque[tuple[float, bool]] = deque(maxlen=_MAX_TIMEOUT_SAMPLES)
        self._fallback_s = DEFAULT_BUILD_TIMEOUT_S
        self.skipped = 0
        """Samples :meth:`from_json` skipped as malformed (0 for a new estimator)."""

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def timeout_s(self) -> float:
        """Seconds to wait for a build started now."""
        if len(self._samples) < _MIN_TIMEOUT_SAMPLES:
            return self._fallback_s
        times = sorted(seconds for seconds, _ in self._samples)
        rank = math.ceil(_TIMEOUT_QUANTILE * len(times)) - 1
        return _clamp_timeout(times[rank] * _TIMEOUT_MARGIN)

    def record_success(self, duration_s: float) -> None:
        """A build completed after ``duration_s`` seconds."""
        self._add(duration_s, timed_out=False)

    def record_timeout(self, waited_s: float) -> None:
        """A build was abandoned after waiting ``waited_s`` seconds (its timeout)."""
        self._add(waited_s, timed_out=True)
        recent = list(self._samples)[-_RECENT_BUILDS:]
        if len(recent) == _RECENT_BUILDS and (
            sum(1 for _, timed_out in recent if timed_out) >= _RECENT_TIMEOUTS_FOR_RESET
        ):
            waited = max(seconds for seconds, timed_out in recent if timed_out)
            self._samples.clear()
            self._fallback_s = _clamp_timeout(max(DEFAULT_BUILD_TIMEOUT_S, 2 * waited))

    def _add(self, seconds: float, *, timed_out: bool) -> None:
        if not _is_number(seconds) or seconds < 0:
            raise LocalProtocolError("a build time must be a finite number of seconds >= 0")
        self._samples.append((min(float(seconds), MAX_BUILD_TIMEOUT_S), timed_out))

    # --- Persistence --------------------------------------------------------------------

    def to_json(self) -> str:
        """The samples (oldest first) and the fallback timeout."""
        samples = [[seconds, timed_out] for seconds, timed_out in self._samples]
        return json.dumps(
            {"format": BUILD_TIMEOUT_FORMAT, "fallback_s": self._fallback_s, "samples": samples}
        )

    @classmethod
    def from_json(cls, text: str) -> BuildTimeout:
        """Load a :meth:`to_json` text; malformed samples are skipped (counted in
        :attr:`skipped`), a bad fallback becomes the default. Raises
        :class:`DecodeError` for text that is not such a snapshot."""
        data, samples = _load(text, BUILD_TIMEOUT_FORMAT, "samples", "build timeout")
        estimator = cls()
        fallback = data.get("fallback_s")
        if _is_number(fallback) and MIN_BUILD_TIMEOUT_S <= fallback <= MAX_BUILD_TIMEOUT_S:
            estimator._fallback_s = float(fallback)
        for item in samples[-_MAX_TIMEOUT_SAMPLES:]:
            if (
                isinstance(item, list)
                and len(item) == 2
                and _is_number(item[0])
                and 0 <= item[0] <= MAX_BUILD_TIMEOUT_S
                and isinstance(item[1], bool)
            ):
                estimator._samples.append((float(item[0]), item[1]))
            else:
                estimator.skipped += 1
        return estimator


def _clamp_timeout(seconds: float) -> float:
    return min(MAX_BUILD_TIMEOUT_S, max(MIN_BUILD_TIMEOUT_S, seconds))
