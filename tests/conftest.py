"""Shared fixtures: deterministic bytes, a fake clock, fixed identities.

Nothing here touches the OS RNG or the wall clock, so a failing test fails the same way
on every run. Sans-IO cores take ``now`` and an injected RNG; these fixtures feed them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from meshnode.identity import Identity

RandomBytes = Callable[[int], bytes]


class DeterministicBytes:
    """SHA-256 in counter mode: ``sha256(seed || counter_be64)`` blocks, concatenated.

    Successive calls continue the stream, so two calls never return overlapping bytes.
    """

    __slots__ = ("_buffer", "_counter", "_seed")

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("n must be >= 0")
        while len(self._buffer) < n:
            block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._buffer += block
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


@pytest.fixture
def random_bytes(request: pytest.FixtureRequest) -> RandomBytes:
    """A deterministic ``Callable[[int], bytes]`` seeded by the test's node id."""
    return DeterministicBytes(b"meshnode-tests/" + request.node.nodeid.encode("utf-8"))


class FakeClock:
    """A monotonic clock the test moves by hand. ``clock()`` returns ``clock.now``."""

    __slots__ = ("now",)

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def advance(self, dt: float) -> float:
        """Move time forward by ``dt`` seconds (never backwards) and return the new ``now``."""
        if dt < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self.now += dt
        return self.now

    def __call__(self) -> float:
        return self.now

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"


@pytest.fixture
def clock() -> FakeClock:
    """A :class:`FakeClock` at t=1000.0 (not zero, so "0 means unset" bugs show up)."""
    return FakeClock()


IDENTITY_COUNT = 4


def fixed_identity(index: int) -> Identity:
    """The ``index``-th test identity: the same keys on every run and in every test."""
    tag = f"meshnode-tests/identity/{index}".encode()
    return Identity(
        identity_seed=hashlib.sha256(tag + b"/identity-seed").digest(),
        link_private=hashlib.sha256(tag + b"/link-private").digest(),
    )


@pytest.fixture(scope="session")
def identities() -> tuple[Identity, ...]:
    """A few deterministic identities (distinct keys and node ids), from fixed seeds."""
    return tuple(fixed_identity(i) for i in range(IDENTITY_COUNT))
