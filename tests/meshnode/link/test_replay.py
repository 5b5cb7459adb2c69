"""ReplayWindow: a numbered table in the style of wireguard-go's replay_test.go, bulk runs at
the window edges, and a hypothesis comparison with a plain reference model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.link import constants
from meshnode.link.replay import ReplayWindow

W = constants.REPLAY_WINDOW
LIMIT = constants.REJECT_AFTER_MESSAGES
T_LIM = W + 1  # one past the oldest counter the window still accepts after `highest`

# (counter, expected) applied in order to one window; the position is the test number.
TABLE: list[tuple[int, bool]] = [
    (0, True),  # 1: first counter
    (1, True),  # 2: in order
    (1, False),  # 3: duplicate
    (9, True),  # 4: jump ahead within the window
    (8, True),  # 5: out of order, behind the highest
    (7, True),  # 6
    (7, False),  # 7: duplicate of an out-of-order counter
    (T_LIM, True),  # 8: highest moves so that 0 is now exactly outside
    (T_LIM - 1, True),  # 9
    (T_LIM - 1, False),  # 10
    (T_LIM - 2, True),  # 11
    (2, True),  # 12: 2 is T_LIM - 2 behind: inside the window, never seen
    (2, False),  # 13
    (T_LIM + 16, True),  # 14: the window slides by 16
    (3, False),  # 15: now too old
    (T_LIM + 16, False),  # 16
    (T_LIM * 4, True),  # 17: big jump forward clears the whole window
    (T_LIM * 4 - (T_LIM - 1), True),  # 18: exactly W behind: the window's edge, accepted
    (10, False),  # 19: far too old
    (T_LIM * 4 - T_LIM, False),  # 20: W + 1 behind: just outside
    (T_LIM * 4 - (T_LIM + 1), False),  # 21
    (T_LIM * 4 - (T_LIM - 2), True),  # 22: W - 1 behind, fresh after the jump
    (T_LIM * 4 + 1 - T_LIM, False),  # 23: duplicate of 18
    (0, False),  # 24
    (LIMIT, False),  # 25: REJECT_AFTER_MESSAGES itself is never valid
    (LIMIT - 1, True),  # 26: the last valid counter
    (LIMIT, False),  # 27
    (LIMIT - 1, False),  # 28: duplicate
    (LIMIT - 2, True),  # 29
    (LIMIT + 1, False),  # 30
    (LIMIT + 2, False),  # 31
    (LIMIT - 2, False),  # 32
    (LIMIT - 3, True),  # 33
    (0, False),  # 34
    (2**64, False),  # 35: does not fit the 8-byte wire field
    (-1, False),  # 36: never produced by the wire decoder, refused all the same
]


def test_table() -> None:
    window = ReplayWindow()
    for number, (counter, expected) in enumerate(TABLE, start=1):
        assert window.check(counter) is expected, f"check, test {number}: {counter}"
        assert window.update(counter) is expected, f"update, test {number}: {counter}"


def test_check_does_not_change_state() -> None:
    window = ReplayWindow()
    assert window.check(5)
    assert window.check(5)
    assert window.highest == -1
    assert window.update(5)
    assert not window.check(5)
    assert window.check(4)
    assert window.check(6)
    assert window.highest == 5


def test_negative_counter_on_fresh_window() -> None:
    window = ReplayWindow()
    assert not window.check(-1)
    assert not window.update(-1)
    assert window.update(0)


def test_bulk_ascending_then_zero_at_edge() -> None:
    window = ReplayWindow()
    for i in range(1, W + 1):
        assert window.update(i)
    assert window.update(0)  # exactly W behind
    assert not window.update(0)


def test_bulk_ascending_from_two() -> None:
    window = ReplayWindow()
    for i in range(2, W + 2):
        assert window.update(i)
    assert window.update(1)  # W behind
    assert not window.update(0)  # W + 1 behind


def test_bulk_descending() -> None:
    window = ReplayWindow()
    for i in range(W + 1, 0, -1):
        assert window.update(i)
    window.reset()
    for i in range(W + 2, 1, -1):
        assert window.update(i)
    assert not window.update(0)


def test_bulk_descending_then_forward_by_one() -> None:
    window = ReplayWindow()
    for i in range(W, 0, -1):
        assert window.update(i)
    assert window.update(W + 1)
    assert not window.update(0)

    window.reset()
    for i in range(W, 0, -1):
        assert window.update(i)
    assert window.update(0)
    assert window.update(W + 1)


def test_reset_forgets_everything() -> None:
    window = ReplayWindow()
    for i in range(100):
        assert window.update(i)
    window.reset()
    assert window.highest == -1
    for i in range(100):
        assert window.update(i)


def test_small_window() -> None:
    window = ReplayWindow(size=3)
    assert window.update(10)
    assert window.update(7)  # 3 behind
    assert not window.update(6)  # 4 behind
    assert window.update(12)
    assert not window.update(8)  # 4 behind 12
    assert window.update(9)
    assert not window.update(10)


@pytest.mark.parametrize("size", [0, -1])
def test_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReplayWindow(size=size)


class ReferenceWindow:
    """The specification, written plainly: a set of seen counters and the highest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def update(self, counter: int) -> bool:
        if counter < 0 or counter >= LIMIT or counter in self.seen:
            return False
        if counter <= self.highest and self.highest - counter > self.size:
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


def _counters(size: int) -> st.SearchStrategy[list[int]]:
    # Mostly small values and small steps (so the window edge is hit often), some huge ones.
    near = st.integers(min_value=0, max_value=3 * size)
    edge = st.integers(min_value=LIMIT - 3 * size, max_value=LIMIT + 2)
    return st.lists(st.one_of(near, near, near, edge), max_size=300)


@settings(max_examples=300)
@given(size=st.sampled_from([1, 3, 63, 64, 65, 128, 200]), data=st.data())
def test_matches_reference_model(size: int, data: st.DataObject) -> None:
    counters = data.draw(_counters(size))
    window = ReplayWindow(size=size)
    model = ReferenceWindow(size)
    for counter in counters:
        predicted = window.check(counter)
        accepted = window.update(counter)
        assert accepted == model.update(counter), counter
        assert predicted == accepted, counter
        assert window.highest == model.highest


@settings(max_examples=100)
@given(
    steps=st.lists(
        st.tuples(st.integers(min_value=-64, max_value=3 * W), st.booleans()), max_size=200
    )
)
def test_matches_reference_model_default_size(steps: list[tuple[int, bool]]) -> None:
    """Relative steps around the highest counter, with the default 2048-counter window."""
    window = ReplayWindow()
    model = ReferenceWindow(W)
    for delta, backwards in steps:
        counter = max(0, model.highest - delta) if backwards else model.highest + delta
        assert window.update(counter) == model.update(counter), counter
