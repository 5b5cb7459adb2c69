"""A hop's onion keys: current, next and recently retired, with a replay cache per key (sans-IO).

docs/circuits.md §5: a build record is sealed to one of the hop's onion keys. The hop
advertises two in its descriptor, ``onion_key`` (current) and ``next_onion_key`` (made
current at the next rotation), and keeps the private half of a retired key for
:data:`~discovery.constants.ONION_KEY_OVERLAP_S` after rotation, because a descriptor
naming it may be cached and used that long. A build is tried against the current key,
then the retired ones still inside their overlap (newest first), then the next key.

Each key has its own :class:`ReplayCache` of the ephemeral keys of the builds it opened.
An entry lives exactly as long as its build's timestamp would still pass the freshness
check (``timestamp + window``), so memory is bounded by build rate times window; the cache
also has a hard cap, and a full cache refuses new builds (``replay_cache_full``) rather
than forget an entry that could still be replayed. A cache is dropped with its key.

Rotation: :meth:`OnionKeyring.due` says when (every ``rotate_every_s``, one descriptor
lifetime by default); :meth:`OnionKeyring.handle_timer` rotates and drops expired keys,
:meth:`OnionKeyring.get_timer` gives the next deadline. After a rotation the caller
republishes its descriptor with :meth:`OnionKeyring.publics` and saves
:meth:`OnionKeyring.to_json` (mode 0600: it holds private keys).

Time is wall-clock Unix seconds (``now``), the clock build timestamps are compared with;
randomness is an injected ``random_bytes``. Not here: opening build records
(routing/build.py), writing the file (the node).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from discovery.constants import DESCRIPTOR_LIFETIME_S, ONION_KEY_OVERLAP_S
from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError

__all__ = [
    "BUILD_TIMESTAMP_WINDOW_S",
    "DEFAULT_MAX_REPLAY_ENTRIES",
    "KEYRING_FORMAT",
    "OnionKeyring",
    "RandomBytes",
    "ReplayCache",
    "ReplayRefusal",
]

RandomBytes = Callable[[int], bytes]

BUILD_TIMESTAMP_WINDOW_S = 10 * 60
"""A build record's timestamp may be at most this far from the hop's clock (circuits.md §5)."""

DEFAULT_MAX_REPLAY_ENTRIES = 100_000
"""Entries per onion key: ~170 builds/s sustained over a 10-minute window (~25 MB worst case)."""

KEYRING_FORMAT = "meshnode/onion-keys/v1"

ReplayRefusal = Literal["replay", "replay_cache_full"]

_KEY_BYTES = crypto.X25519_KEY_BYTES


def _check_now(now: float) -> None:
    if not isinstance(now, int | float) or not math.isfinite(now):
        raise LocalProtocolError("now must be a finite number of Unix seconds")


class ReplayCache:
    """The ephemeral keys of builds one onion key opened, each until its expiry time.

    ``check_and_add`` prunes expired entries first, so a cache never holds an entry
    whose build would fail the timestamp check anyway.
    """

    __slots__ = ("_heap", "_max_entries", "_seen")

    def __init__(self, max_entries: int = DEFAULT_MAX_REPLAY_ENTRIES) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise LocalProtocolError("max_entries must be a positive integer")
        self._max_entries = max_entries
        self._seen: set[bytes] = set()
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def prune(self, now: float) -> int:
        """Forget entries whose expiry is before ``now``; return how many went."""
        heap, seen = self._heap, self._seen
        removed = 0
        while heap and heap[0][0] < now:
            _, eph = heapq.heappop(heap)
            seen.discard(eph)
            removed += 1
        return removed

    def check_and_add(self, eph: bytes, *, expires_at: float, now: float) -> ReplayRefusal | None:
        """Remember ``eph`` until ``expires_at``; a refusal token if seen or full, else None."""
        self.prune(now)
        if eph in self._seen:
            return "replay"
        if len(self._seen) >= self._max_entries:
            return "replay_cache_full"
        self._seen.add(eph)
        heapq.heappush(self._heap, (expires_at, eph))
        return None


@dataclass(frozen=True, slots=True)
class _Key:
    private: bytes
    public: bytes
    since: float  # current/next: when it took that role; retired: when it was retired

    @classmethod
    def from_private(cls, private: bytes, since: float) -> _Key:
        return cls(private, crypto.x25519_public_from_private(private), since)

    @classmethod
    def generate(cls, random_bytes: RandomBytes, since: float) -> _Key:
        private = random_bytes(_KEY_BYTES)
        if not isinstance(private, bytes) or len(private) != _KEY_BYTES:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        return cls.from_private(private, since)


class OnionKeyring:
    """A hop's onion private keys and their replay caches.

    Build one with :meth:`generate` (first start) or :meth:`from_json` (later starts).
    ``rotate_every_s`` is the interval between rotations; ``overlap_s`` how long a retired
    key still opens builds; ``replay_window_s`` and ``max_replay_entries`` size the
    replay caches.

    Note on ``next_onion_key``: a key is advertised as next for one rotation interval
    before it becomes current. That is shorter than ``overlap_s`` at the defaults (3 h vs
    3 h 15 min); it matters only to a client that seals to ``next_onion_key``, which the
    hop accepts at any time anyway.
    """

    __slots__ = (
        "_caches",
        "_current",
        "_max_replay_entries",
        "_next",
        "_overlap_s",
        "_replay_window_s",
        "_retired",
        "_rotate_every_s",
    )

    def __init__(
        self,
        *,
        current: _Key,
        next_key: _Key,
        retired: list[_Key],
        rotate_every_s: float = DESCRIPTOR_LIFETIME_S,
        overlap_s: float = ONION_KEY_OVERLAP_S,
        replay_window_s: float = BUILD_TIMESTAMP_WINDOW_S,
        max_replay_entries: int = DEFAULT_MAX_REPLAY_ENTRIES,
    ) -> None:
        for name, value in (
            ("rotate_every_s", rotate_every_s),
            ("overlap_s", overlap_s),
            ("replay_window_s", replay_window_s),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise LocalProtocolError(f"{name} must be a positive number of seconds")
        if type(max_replay_entries) is not int or max_replay_entries < 1:
            raise LocalProtocolError("max_replay_entries must be a positive integer")
        publics = [current.public, next_key.public, *(k.public for k in retired)]
        if len(set(publics)) != len(publics):
            raise LocalProtocolError("onion keys must be distinct")
        self._current = current
        self._next = next_key
        self._retired = sorted(retired, key=lambda k: k.since, reverse=True)  # newest first
        self._rotate_every_s = rotate_every_s
        self._overlap_s = overlap_s
        self._replay_window_s = replay_window_s
        self._max_replay_entries = max_replay_entries
        self._caches: dict[bytes, ReplayCache] = {}

    @classmethod
    def generate(
        cls,
        *,
        now: float,
        random_bytes: RandomBytes,
        rotate_every_s: float = DESCRIPTOR_LIFETIME_S,
        overlap_s: float = ONION_KEY_OVERLAP_S,
        replay_window_s: float = BUILD_TIMESTAMP_WINDOW_S,
        max_replay_entries: int = DEFAULT_MAX_REPLAY_ENTRIES,
    ) -> OnionKeyring:
        """A fresh keyring: a current key (made current at ``now``) and a next key."""
        _check_now(now)
        current = _Key.generate(random_bytes, now)
        next_key = _Key.generate(random_bytes, now)
        return cls(
            current=current,
            next_key=next_key,
            retired=[],
            rotate_every_s=rotate_every_s,
            overlap_s=overlap_s,
            replay_window_s=replay_window_s,
            max_replay_entries=max_replay_entries,
        )

    def __repr__(self) -> str:  # never the private keys
        return (
            f"OnionKeyring(current={self._current.public.hex()[:16]}, "
            f"next={self._next.public.hex()[:16]}, retired={len(self._retired)})"
        )

    # --- Queries ----------------------------------------------------------------------

    @property
    def rotate_every_s(self) -> float:
        return self._rotate_every_s

    @property
    def overlap_s(self) -> float:
        return self._overlap_s

    @property
    def replay_window_s(self) -> float:
        return self._replay_window_s

    def publics(self) -> tuple[bytes, bytes]:
        """``(onion_key, next_onion_key)`` for the descriptor."""
        return self._current.public, self._next.public

    def candidates(self, now: float) -> list[tuple[bytes, bytes]]:
        """``(private, public)`` pairs to try on a build, in order: current, retired
        keys still within their overlap (newest first), next."""
        _check_now(now)
        pairs = [(self._current.private, self._current.public)]
        pairs.extend(
            (k.private, k.public) for k in self._retired if now < k.since + self._overlap_s
        )
        pairs.append((self._next.private, self._next.public))
        return pairs

    def due(self, now: float) -> bool:
        """True when the current key has served ``rotate_every_s`` and should be rotated."""
        _check_now(now)
        return now >= self._current.since + self._rotate_every_s

    def get_timer(self) -> float:
        """The next time :meth:`handle_timer` has work: a rotation or a key to drop."""
        deadline = self._current.since + self._rotate_every_s
        for key in self._retired:
            deadline = min(deadline, key.since + self._overlap_s)
        return deadline

    def replay_entries(self) -> int:
        """Entries held by every replay cache together (for metrics)."""
        return sum(len(cache) for cache in self._caches.values())

    # --- Changes ----------------------------------------------------------------------

    def rotate(self, now: float, random_bytes: RandomBytes) -> None:
        """Retire the current key, make the next one current, generate a new next key."""
        _check_now(now)
        new_next = _Key.generate(random_bytes, now)
        retired = _Key(self._current.private, self._current.public, now)
        self._current = _Key(self._next.private, self._next.public, now)
        self._next = new_next
        self._retired.insert(0, retired)
        self.expire(now)

    def expire(self, now: float) -> int:
        """Drop retired keys past their overlap (and their replay caches), prune the
        other caches; return how many keys went."""
        _check_now(now)
        keep = [k for k in self._retired if now < k.since + self._overlap_s]
        dropped = [k for k in self._retired if now >= k.since + self._overlap_s]
        self._retired = keep
        for key in dropped:
            self._caches.pop(key.public, None)
        for cache in self._caches.values():
            cache.prune(now)
        return len(dropped)

    def handle_timer(self, now: float, random_bytes: RandomBytes) -> bool:
        """Rotate if due and drop expired keys; True when the advertised keys changed
        (republish the descriptor and save the keyring)."""
        rotated = self.due(now)
        if rotated:
            self.rotate(now, random_bytes)
        else:
            self.expire(now)
        return rotated

    def check_replay(
        self, public: bytes, eph: bytes, *, timestamp: float, now: float
    ) -> ReplayRefusal | None:
        """Record the build ``eph`` opened by onion key ``public`` (timestamp already
        checked); a refusal token for a replay or a full cache, else None."""
        cache = self._caches.get(public)
        if cache is None:
            known = {self._current.public, self._next.public, *(k.public for k in self._retired)}
            if public not in known:
                raise LocalProtocolError("not one of this keyring's onion keys")
            cache = self._caches[public] = ReplayCache(self._max_replay_entries)
        return cache.check_and_add(eph, expires_at=timestamp + self._replay_window_s, now=now)

    # --- Persistence ------------------------------------------------------------------

    def to_json(self) -> str:
        """The keys as JSON (private keys in hex; write the file 0600). Replay caches and
        settings are not saved."""

        def entry(key: _Key, time_name: str) -> dict[str, object]:
            return {"private": key.private.hex(), "public": key.public.hex(), time_name: key.since}

        data = {
            "format": KEYRING_FORMAT,
            "current": entry(self._current, "since"),
            "next": entry(self._next, "since"),
            "retired": [entry(k, "retired_at") for k in self._retired],
        }
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(
        cls,
        text: str,
        *,
        rotate_every_s: float = DESCRIPTOR_LIFETIME_S,
        overlap_s: float = ONION_KEY_OVERLAP_S,
        replay_window_s: float = BUILD_TIMESTAMP_WINDOW_S,
        max_replay_entries: int = DEFAULT_MAX_REPLAY_ENTRIES,
    ) -> OnionKeyring:
        """Load a :meth:`to_json` text. Raises :class:`DecodeError` for anything else:
        bad JSON or shape, a private key not 32 bytes of hex, a public key that does not
        match its private key, repeated keys, a time that is not a finite number."""
        if not isinstance(text, str):
            raise DecodeError("onion keys: expected JSON text")
        try:
            data: object = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DecodeError(f"onion keys: not valid JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != KEYRING_FORMAT:
            raise DecodeError(f"onion keys: not a {KEYRING_FORMAT!r} object")
        if set(data) != {"format", "current", "next", "retired"}:
            raise DecodeError("onion keys: expected keys format, current, next, retired")
        retired = data["retired"]
        if not isinstance(retired, list):
            raise DecodeError("onion keys: 'retired' must be a list")
        current = _parse_key(data["current"], "since")
        next_key = _parse_key(data["next"], "since")
        old = [_parse_key(item, "retired_at") for item in retired]
        publics = [current.public, next_key.public, *(k.public for k in old)]
        if len(set(publics)) != len(publics):
            raise DecodeError("onion keys: a key appears twice")
        return cls(
            current=current,
            next_key=next_key,
            retired=old,
            rotate_every_s=rotate_every_s,
            overlap_s=overlap_s,
            replay_window_s=replay_window_s,
            max_replay_entries=max_replay_entries,
        )


def _parse_key(entry: object, time_name: str) -> _Key:
    if not isinstance(entry, dict) or set(entry) != {"private", "public", time_name}:
        raise DecodeError(f"onion keys: an entry must hold private, public and {time_name}")
    private_hex, public_hex, since = entry["private"], entry["public"], entry[time_name]
    if not isinstance(private_hex, str) or not isinstance(public_hex, str):
        raise DecodeError("onion keys: keys must be hex strings")
    try:
        private = bytes.fromhex(private_hex)
        public = bytes.fromhex(public_hex)
    except ValueError:
        raise DecodeError("onion keys: keys must be hex strings") from None
    if len(private) != _KEY_BYTES or len(public) != _KEY_BYTES:
        raise DecodeError(f"onion keys: keys must be {_KEY_BYTES} bytes")
    if type(since) not in (int, float) or not math.isfinite(since) or since < 0:
        raise DecodeError(f"onion keys: {time_name} must be a finite number of Unix seconds")
    key = _Key.from_private(private, float(since))
    if not crypto.constant_time_equal(key.public, public):
        raise DecodeError("onion keys: a public key does not match its private key")
    return key
