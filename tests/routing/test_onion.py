"""routing/onion.py: circuits of 1, 3 and 5 hops simulated in memory, no sockets.

The client wraps for every hop and the relays pass cells along in order; each hop
originates backward cells the client attributes to it; every tampered byte, replay and
stray seq is dropped with a stable reason; nothing repeats across links; per-circuit
relay state stays small (circuits.md §7, ≤ 2 KiB).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from routing.cells import BODY_BYTES, MAX_SEQ, MESSAGE_HEADER_BYTES, Command
from routing.cells import decode_message as decode
from routing.cells import encode_message as encode
from routing.keys import HopKeys, derive_hop_keys
from routing.onion import (
    BACKWARD_CAPACITY,
    FORWARD_MESSAGE_BYTES,
    LAYER_BYTES,
    MAX_BACKWARD_STREAMS,
    MAX_HOPS,
    REASONS,
    REPLAY_WINDOW,
    STREAM_RADIUS,
    BackwardOrigin,
    BackwardRelay,
    ClientCircuitCrypto,
    ForwardLayer,
    OnionError,
    ReplayWindow,
    capacity,
)

RandomBytes = Callable[[int], bytes]  # the `random_bytes` fixture (tests/conftest.py)
U64 = 2**64

seqs = st.integers(0, MAX_SEQ)
# Mostly whole bodies (they reach the AEAD), some of any other size.
bodies = st.one_of(
    st.binary(min_size=BODY_BYTES, max_size=BODY_BYTES), st.binary(max_size=BODY_BYTES + 16)
)

# Module-level keys for hypothesis tests (function-scoped fixtures do not mix with @given).
FIXED_HOPS = [
    derive_hop_keys(bytes([i]) * 32, bytes([i + 1]) * 32, bytes([i + 2]) * 32) for i in range(3)
]


def make_hops(random_bytes: RandomBytes, n: int) -> list[HopKeys]:
    return [derive_hop_keys(random_bytes(32), random_bytes(32), random_bytes(32)) for _ in range(n)]


@dataclasses.dataclass
class Relay:
    """One hop's per-circuit state, as a relay (or the exit) holds it."""

    forward: ForwardLayer
    backward: BackwardRelay
    origin: BackwardOrigin

    @classmethod
    def of(cls, keys: HopKeys) -> Relay:
        return cls(ForwardLayer(keys), BackwardRelay(keys), BackwardOrigin(keys))


class Circuit:
    """A client and its n relays in one process; every link's (seq, body) is recorded."""

    def __init__(self, hops: list[HopKeys]) -> None:
        self.hops = hops
        self.client = ClientCircuitCrypto(hops)
        self.relays = [Relay.of(k) for k in hops]

    def forward(self, seq: int, body: bytes) -> tuple[int, bytes, list[tuple[int, bytes]]]:
        """Push a cell from link 1 on: (hop that delivered, message, [(seq, body) per link])."""
        links = [(seq, body)]
        for index, relay in enumerate(self.relays, start=1):
            result = relay.forward.process(seq, body)
            if result[0] == "deliver":
                return index, result[1], links
            _, seq, body = result
            links.append((seq, body))
        raise AssertionError("the exit forwarded a cell")

    def send(self, hop: int, cmd: Command, data: bytes) -> tuple[int, bytes]:
        delivered_at, message, _ = self.forward(
            *self.client.wrap_forward(hop, encode(cmd, data, capacity(hop)))
        )
        return delivered_at, message

    def backward(self, origin: int, message: bytes) -> list[tuple[int, bytes]]:
        """Hop ``origin`` seals; hops origin-1 .. 1 relay: [(seq, body)] on links origin .. 1."""
        seq, body = self.relays[origin - 1].origin.seal(message)
        links = [(seq, body)]
        for relay in reversed(self.relays[: origin - 1]):
            seq, body = relay.backward.relay(seq, body)
            links.append((seq, body))
        return links


def circuit(random_bytes: RandomBytes, n: int) -> Circuit:
    return Circuit(make_hops(random_bytes, n))


def reason(call: Callable[..., object], *args: Any) -> str:
    """The drop reason ``call(*args)`` raises."""
    with pytest.raises(OnionError) as err:
        call(*args)
    assert err.value.reason in REASONS
    return err.value.reason


def flip(body: bytes, position: int, mask: int = 0x01) -> bytes:
    return body[:position] + bytes([body[position] ^ mask]) + body[position + 1 :]


def blocks(body: bytes) -> set[bytes]:
    return {body[k : k + 16] for k in range(0, len(body) - 15, 16)}


# --- Sizes -----------------------------------------------------------------------------


def test_capacity_per_hop() -> None:
    # circuits.md §4: S - 16 - 16 - 16(t-1), minus the 3-byte message header.
    assert [capacity(t) for t in range(1, MAX_HOPS + 1)] == [1374, 1358, 1342, 1326, 1310]
    assert capacity(5) >= 1280  # an IPv6 minimum-MTU packet fits at the exit of 5 hops
    assert LAYER_BYTES == BODY_BYTES - 16 == 1393
    assert FORWARD_MESSAGE_BYTES == 1377
    assert BACKWARD_CAPACITY == 1390
    for bad in (0, MAX_HOPS + 1):
        with pytest.raises(LocalProtocolError):
            capacity(bad)


# --- Forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 5])
def test_forward_delivers_at_each_hop(random_bytes: RandomBytes, n: int) -> None:
    net = circuit(random_bytes, n)
    for t in range(1, n + 1):
        for data in (b"", b"to hop %d" % t, random_bytes(capacity(t))):
            delivered_at, message = net.send(t, Command.DATA, data)
            assert delivered_at == t
            assert len(message) == FORWARD_MESSAGE_BYTES
            assert decode(message) == (Command.DATA, data)


def test_full_capacity_at_hop_five(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    data = random_bytes(1280)
    delivered_at, message = net.send(5, Command.DATA, data)
    assert (delivered_at, decode(message)) == (5, (Command.DATA, data))
    with pytest.raises(LocalProtocolError):
        net.client.wrap_forward(5, bytes(capacity(5) + MESSAGE_HEADER_BYTES + 1))


def test_the_body_hop_t_receives_ends_in_the_fillers(random_bytes: RandomBytes) -> None:
    # §4: hop i forwards pt_i || keyed-BLAKE2b(kf_fill_i, seq_i); the body stays S bytes.
    net = circuit(random_bytes, 5)
    seq, body = net.client.wrap_forward(5, encode(Command.PADDING, b"", capacity(5)))
    _, _, links = net.forward(seq, body)
    assert len(links) == 5
    for i, ((seq_i, _), (_, next_body)) in enumerate(itertools.pairwise(links)):
        assert len(next_body) == BODY_BYTES
        assert next_body[-16:] == crypto.mac(net.hops[i].kf_fill, seq_i.to_bytes(8, "big"))


def spec_nonce(seq: int) -> bytes:
    return bytes(4) + seq.to_bytes(8, "big")  # circuits.md §2: 0x00000000 || seq


def test_layers_match_the_spec_byte_for_byte(random_bytes: RandomBytes) -> None:
    # Checked against `cryptography` directly, not through meshnode.crypto.
    net = circuit(random_bytes, 3)
    seq, body = net.client.wrap_forward(3, encode(Command.DATA, b"spec", capacity(3)))
    _, _, links = net.forward(seq, body)
    for i, (seq_i, body_i) in enumerate(links):
        aead = ChaCha20Poly1305(net.hops[i].kf)
        pt = aead.decrypt(spec_nonce(seq_i), body_i[16:] + body_i[:16], None)  # tag first
        assert len(pt) == BODY_BYTES - 16
        assert (pt[:16] == bytes(16)) is (i == 2)  # only the target sees the zero marker
    seq, body = net.relays[2].origin.seal(b"back")
    aead = ChaCha20Poly1305(net.hops[2].kb_seal)
    assert aead.decrypt(spec_nonce(seq), body[16:] + body[:16], None) == b"back".ljust(1393, b"\0")
    seq_out, out = net.relays[1].backward.relay(seq, body)
    keystream = Cipher(
        algorithms.ChaCha20(net.hops[1].kb_relay, bytes(4) + spec_nonce(seq)), mode=None
    ).encryptor()
    assert out == keystream.update(body)  # counter 0, nonce from seq_in
    assert seq_out == (seq + net.hops[1].off_b) % U64


def test_forward_seq_follows_the_offsets(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    for expected_seq_1 in (1, 2, 3):
        seq, body = net.client.wrap_forward(5, b"")
        assert seq == expected_seq_1  # the client numbers forward cells 1, 2, 3 ...
        _, _, links = net.forward(seq, body)
        for i in range(4):
            assert links[i + 1][0] == (links[i][0] - net.hops[i].off_f) % U64


def test_nothing_repeats_across_forward_links(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    seq, body = net.client.wrap_forward(5, encode(Command.DATA, bytes(capacity(5)), capacity(5)))
    _, _, links = net.forward(seq, body)
    assert len({s for s, _ in links}) == 5
    for i in range(5):
        for k in range(i + 1, 5):
            assert not blocks(links[i][1]) & blocks(links[k][1]), (i + 1, k + 1)


@pytest.mark.parametrize(("n", "t"), [(1, 1), (3, 3), (3, 1)])
def test_every_tampered_forward_byte_is_dropped_by_the_first_hop(
    random_bytes: RandomBytes, n: int, t: int
) -> None:
    net = circuit(random_bytes, n)
    seq, body = net.client.wrap_forward(t, encode(Command.DATA, b"payload", capacity(t)))
    first = net.relays[0].forward
    for position in range(BODY_BYTES):
        assert reason(first.process, seq, flip(body, position)) == "bad_tag"
    assert reason(first.process, seq ^ 1, body) == "bad_tag"  # the seq is bound too
    # Forged cells did not move the window: the genuine cell still goes through.
    delivered_at, message, _ = net.forward(seq, body)
    assert (delivered_at, decode(message)) == (t, (Command.DATA, b"payload"))


def test_tamper_on_a_later_link_is_dropped_by_that_hop(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    rng = random.Random(5)
    for link in (2, 3, 5):
        seq, body = net.client.wrap_forward(5, b"")
        for relay in net.relays[: link - 1]:
            result = relay.forward.process(seq, body)
            assert result[0] == "forward"
            _, seq, body = result
        hop = net.relays[link - 1].forward
        for position in rng.sample(range(BODY_BYTES), 64):
            assert reason(hop.process, seq, flip(body, position, 0x80)) == "bad_tag"


def test_forward_replay_is_dropped_at_the_first_hop(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 3)
    seq, body = net.client.wrap_forward(3, encode(Command.DATA, b"once", capacity(3)))
    assert net.forward(seq, body)[0] == 3
    assert reason(net.relays[0].forward.process, seq, body) == "replay"


def test_forward_replay_is_dropped_at_a_middle_hop(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 3)
    seq, body = net.client.wrap_forward(3, b"")
    _, seq_2, body_2 = net.relays[0].forward.process(seq, body)  # type: ignore[misc]
    net.relays[1].forward.process(seq_2, body_2)
    assert reason(net.relays[1].forward.process, seq_2, body_2) == "replay"


def test_forward_reordering_within_the_window(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 3)
    cells = [
        net.client.wrap_forward(3, encode(Command.DATA, b"%d" % k, capacity(3)))
        for k in range(REPLAY_WINDOW)
    ]
    order = list(range(REPLAY_WINDOW))
    random.Random(3).shuffle(order)
    order.remove(REPLAY_WINDOW - 1)
    order.insert(0, REPLAY_WINDOW - 1)  # the newest first: every other is up to 255 behind
    for k in order:
        delivered_at, message, _ = net.forward(*cells[k])
        assert (delivered_at, decode(message)) == (3, (Command.DATA, b"%d" % k))


def test_forward_cell_far_outside_the_window_is_dropped(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 1)
    cells = [net.client.wrap_forward(1, b"") for _ in range(REPLAY_WINDOW + 2)]
    net.forward(*cells[-1])  # newest first; cells[1] is exactly REPLAY_WINDOW behind it
    assert reason(net.forward, *cells[1]) == "replay"
    assert reason(net.forward, *cells[0]) == "replay"
    assert net.forward(*cells[2])[0] == 1  # REPLAY_WINDOW - 1 behind: still inside


def test_forward_seq_wraps_mod_2_64(random_bytes: RandomBytes) -> None:
    # off_f_1 = 3: hop 2 sees seq_1 - 3 = 2^64 - 2, 2^64 - 1, 0, 1, 2 ...
    keys = make_hops(random_bytes, 2)
    keys[0] = dataclasses.replace(keys[0], off_f=3)
    net = Circuit(keys)
    cells = [
        net.client.wrap_forward(2, encode(Command.DATA, b"%d" % k, capacity(2))) for k in range(6)
    ]
    seen = []
    for k in (1, 0, 3, 2, 5, 4):
        delivered_at, message, links = net.forward(*cells[k])
        assert (delivered_at, decode(message)) == (2, (Command.DATA, b"%d" % k))
        seen.append(links[1][0])
    assert sorted(seen) == [0, 1, 2, 3, U64 - 2, U64 - 1]
    for k in range(6):
        assert reason(net.forward, *cells[k]) == "replay"


def test_a_cell_of_another_circuit_is_a_bad_tag(random_bytes: RandomBytes) -> None:
    ours, theirs = circuit(random_bytes, 2), circuit(random_bytes, 2)
    seq, body = theirs.client.wrap_forward(1, b"")
    assert reason(ours.forward, seq, body) == "bad_tag"


def test_wrap_forward_refuses_misuse(random_bytes: RandomBytes) -> None:
    client = ClientCircuitCrypto(make_hops(random_bytes, 3))
    for hop in (0, 4):
        with pytest.raises(LocalProtocolError):
            client.wrap_forward(hop, b"")
    with pytest.raises(LocalProtocolError):
        client.wrap_forward(3, bytes(capacity(3) + MESSAGE_HEADER_BYTES + 1))
    for hops in ([], make_hops(random_bytes, MAX_HOPS + 1)):
        with pytest.raises(LocalProtocolError):
            ClientCircuitCrypto(hops)
    assert client.hop_count == 3


@given(st.lists(st.tuples(seqs, bodies), max_size=8))
def test_random_forward_cells_are_only_dropped(cells: list[tuple[int, bytes]]) -> None:
    layer = ForwardLayer(FIXED_HOPS[0])
    for seq, body in cells:
        with pytest.raises(OnionError) as err:
            layer.process(seq, body)
        assert err.value.reason in ("wrong_size", "bad_tag")
    # Garbage never moved the window: the client's first cell still goes through.
    seq, body = ClientCircuitCrypto(FIXED_HOPS[:1]).wrap_forward(1, b"\x04\x00\x00")
    assert layer.process(seq, body)[0] == "deliver"


# --- Backward --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 5])
def test_backward_from_each_hop_is_attributed_to_it(random_bytes: RandomBytes, n: int) -> None:
    net = circuit(random_bytes, n)
    for _ in range(3):  # several rounds: several backward streams per relay, interleaved
        for j in range(1, n + 1):
            data = random_bytes(BACKWARD_CAPACITY if j == n else 20)
            links = net.backward(j, encode(Command.DATA, data, BACKWARD_CAPACITY))
            assert len(links) == j
            origin, message = net.client.unwrap_backward(*links[-1])
            assert origin == j
            assert len(message) == LAYER_BYTES
            assert decode(message) == (Command.DATA, data)


def test_probe_round_trip_to_each_hop(random_bytes: RandomBytes) -> None:
    # Hop-addressed control: a probe only hop j reads, a reply only the client reads.
    net = circuit(random_bytes, 5)
    for j in range(1, 6):
        probe = random_bytes(16)
        delivered_at, message = net.send(j, Command.PROBE, probe)
        assert (delivered_at, decode(message)) == (j, (Command.PROBE, probe))
        links = net.backward(j, encode(Command.PROBE_REPLY, probe, BACKWARD_CAPACITY))
        origin, reply = net.client.unwrap_backward(*links[-1])
        assert (origin, decode(reply)) == (j, (Command.PROBE_REPLY, probe))


def test_backward_seq_follows_the_offsets(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    links = net.backward(5, b"")
    assert links[0][0] == 1  # the origin's own counter
    for step, hop in enumerate(range(4, 0, -1)):
        assert links[step + 1][0] == (links[step][0] + net.hops[hop - 1].off_b) % U64


def test_nothing_repeats_across_backward_links(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    links = net.backward(5, encode(Command.DATA, bytes(100), BACKWARD_CAPACITY))
    assert len({s for s, _ in links}) == 5
    for i in range(5):
        for k in range(i + 1, 5):
            assert not blocks(links[i][1]) & blocks(links[k][1])


@pytest.mark.parametrize("n", [1, 3])
def test_every_tampered_backward_byte_is_dropped_by_the_client(
    random_bytes: RandomBytes, n: int
) -> None:
    net = circuit(random_bytes, n)
    seq, body = net.backward(n, encode(Command.DATA, b"reply", BACKWARD_CAPACITY))[-1]
    for position in range(BODY_BYTES):
        assert reason(net.client.unwrap_backward, seq, flip(body, position)) == "bad_tag"
    assert reason(net.client.unwrap_backward, seq ^ 1, body) == "bad_tag"
    assert net.client.unwrap_backward(seq, body)[0] == n  # forgeries did not move a window


def test_backward_tampered_between_relays_is_dropped(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 5)
    seq, body = net.relays[4].origin.seal(b"")
    body = flip(body, 700, 0x40)
    for relay in reversed(net.relays[:4]):
        seq, body = relay.backward.relay(seq, body)  # relays cannot tell
    assert reason(net.client.unwrap_backward, seq, body) == "bad_tag"


def test_backward_replay_dropped_by_the_relay_and_the_client(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 3)
    links = net.backward(3, encode(Command.DATA, b"x", BACKWARD_CAPACITY))
    net.client.unwrap_backward(*links[-1])
    assert reason(net.relays[1].backward.relay, *links[0]) == "replay"
    assert reason(net.relays[0].backward.relay, *links[1]) == "replay"
    assert reason(net.client.unwrap_backward, *links[-1]) == "replay"


def test_backward_reordering_within_the_window(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 3)
    cells = [net.backward(3, b"%d" % k)[-1] for k in range(40)]
    for k in reversed(range(40)):
        origin, message = net.client.unwrap_backward(*cells[k])
        assert (origin, message[:3].rstrip(b"\0")) == (3, b"%d" % k)


def test_backward_relay_keeps_one_window_per_stream(random_bytes: RandomBytes) -> None:
    relay = BackwardRelay(make_hops(random_bytes, 1)[0])
    body = bytes(BODY_BYTES)
    starts = [5, 5 + 2**62, 5 + 2**63, 5 + 3 * 2**62]
    for start in starts:  # MAX_BACKWARD_STREAMS streams, interleaved, each in order
        relay.relay(start, body)
    for k in range(1, 300):
        for start in starts:
            relay.relay((start + k) % U64, body)
    assert len(starts) == MAX_BACKWARD_STREAMS
    assert reason(relay.relay, starts[2] + 3, body) == "replay"
    assert reason(relay.relay, starts[3], body) == "replay"  # 299 behind its highest
    assert reason(relay.relay, starts[0] + STREAM_RADIUS, body) == "stream_limit"
    assert reason(relay.relay, 1 + 2**61, body) == "stream_limit"
    relay.relay((starts[1] + STREAM_RADIUS - 1) % U64, body)  # still the second stream


def test_backward_seq_wraps_mod_2_64(random_bytes: RandomBytes) -> None:
    keys = make_hops(random_bytes, 2)
    keys[0] = dataclasses.replace(keys[0], off_b=U64 - 2)  # seq_out = seq_in - 2
    net = Circuit(keys)
    cells = [net.backward(2, b"%d" % k)[-1] for k in range(5)]
    assert [seq for seq, _ in cells] == [U64 - 1, 0, 1, 2, 3]
    for k in (1, 0, 4, 2, 3):
        assert net.client.unwrap_backward(*cells[k]) == (2, (b"%d" % k).ljust(LAYER_BYTES, b"\0"))
    for k in range(5):
        assert reason(net.client.unwrap_backward, *cells[k]) == "replay"


def test_backward_from_another_circuit_is_a_bad_tag(random_bytes: RandomBytes) -> None:
    ours, theirs = circuit(random_bytes, 3), circuit(random_bytes, 3)
    assert reason(ours.client.unwrap_backward, *theirs.backward(3, b"")[-1]) == "bad_tag"


def test_backward_misuse(random_bytes: RandomBytes) -> None:
    keys = make_hops(random_bytes, 1)[0]
    with pytest.raises(LocalProtocolError):
        BackwardOrigin(keys).seal(bytes(LAYER_BYTES + 1))
    assert reason(BackwardRelay(keys).relay, 1, bytes(BODY_BYTES - 1)) == "wrong_size"
    with pytest.raises(LocalProtocolError):
        BackwardRelay(keys).relay(U64, bytes(BODY_BYTES))
    with pytest.raises(LocalProtocolError):
        ForwardLayer(keys).process(-1, bytes(BODY_BYTES))


@given(seqs, bodies)
def test_random_backward_cells_are_only_dropped(seq: int, body: bytes) -> None:
    with pytest.raises(OnionError) as err:
        ClientCircuitCrypto(FIXED_HOPS).unwrap_backward(seq, body)
    assert err.value.reason in ("wrong_size", "bad_tag")


@given(st.lists(st.tuples(seqs, bodies), max_size=20))
def test_random_cells_into_a_backward_relay_raise_only_onion_errors(
    cells: list[tuple[int, bytes]],
) -> None:
    relay = BackwardRelay(FIXED_HOPS[0])
    for seq, body in cells:
        try:
            seq_out, out = relay.relay(seq, body)
        except OnionError as err:
            assert err.reason in ("wrong_size", "replay", "stream_limit")
        else:
            assert seq_out == (seq + FIXED_HOPS[0].off_b) % U64
            assert len(out) == BODY_BYTES


# --- The replay window (circuits.md §3) ------------------------------------------------

W = REPLAY_WINDOW


def test_window_table() -> None:
    window = ReplayWindow()
    base = 2**64 - 10
    table = [
        (base, True),  # the first value: position 0
        (base, False),
        (base - 5, True),  # before the first, within the window
        (base - W + 1, True),  # the oldest position still inside
        (base - W, False),
        (base + 12, True),  # across 2^64: position 12
        (5, True),  # position 15
        (5, False),
        (base + 15 - (W - 1), True),  # W - 1 behind the highest
        (base + 15 - W, False),
        ((base + 2**63) % U64, False),  # 2^63 ahead reads as -2^63: before the window
        ((base + 2**63 - 1) % U64, True),  # the farthest ahead a value can be
        (base + 12, False),  # now far behind
    ]
    for number, (value, expected) in enumerate(table, start=1):
        seq = value % U64
        assert window.check(seq) is expected, number
        assert window.update(seq) is expected, number
        assert window.check(seq) is False, number
    assert window.first == base


def test_window_offset_is_signed() -> None:
    window = ReplayWindow()
    assert window.first is None
    assert window.offset(123) == 0
    window.update(U64 - 1)
    assert window.offset(0) == 1
    assert window.offset(U64 - 2) == -1
    assert window.offset(2**63 - 2) == 2**63 - 1
    assert window.offset(2**63 - 1) == -(2**63)


class ModelWindow:
    """The window as a set: positions seen and the highest; slow, obviously right."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.seen: set[int] = set()

    def update(self, seq: int) -> bool:
        if self.first is None:
            self.first = seq
        position = (seq - self.first + 2**63) % U64 - 2**63
        highest = max(self.seen, default=0)
        if position in self.seen or position <= highest - W:
            return False
        self.seen.add(position)
        return True


@given(st.integers(0, MAX_SEQ), st.lists(st.integers(-400, 400), max_size=200))
def test_window_matches_a_model(first: int, steps: list[int]) -> None:
    window, model = ReplayWindow(), ModelWindow()
    seq = first
    for step in [0, *steps]:
        seq = (seq + step) % U64
        expected = model.update(seq)
        assert window.check(seq) is expected
        assert window.update(seq) is expected


# --- Memory ----------------------------------------------------------------------------


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """sys.getsizeof over an object and everything its slots and tuples reach, once each."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, tuple):
        size += sum(deep_size(item, seen) for item in obj)
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                size += deep_size(getattr(obj, name), seen)
    return size


def relay_objects(relay: Relay) -> Iterator[object]:
    yield relay.forward
    yield relay.backward
    yield relay.origin


def test_relay_state_per_circuit_is_small(random_bytes: RandomBytes) -> None:
    net = circuit(random_bytes, 3)
    for k in range(600):  # windows filled and slid; two backward streams at hop 1
        net.send(3, Command.DATA, b"%d" % k)
        net.client.unwrap_backward(*net.backward(3, b"")[-1])
        net.client.unwrap_backward(*net.backward(2, b"")[-1])
    hop_1 = net.relays[0]
    objects = list(relay_objects(hop_1))
    for obj in objects:
        assert not hasattr(obj, "__dict__")
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                # A cached ChaCha20Poly1305 holds ~2.2 KB of OpenSSL memory getsizeof misses.
                assert not isinstance(getattr(obj, name), crypto.Aead)
    typical = deep_size(tuple(objects)) - sys.getsizeof(())
    # Worst case: every backward stream window in use.
    streams = 2  # the exit's and hop 2's
    for extra in range(MAX_BACKWARD_STREAMS - streams):
        hop_1.backward.relay((7 + extra * 2**62 + 2**61) % U64, bytes(BODY_BYTES))
    assert reason(hop_1.backward.relay, 2**60, bytes(BODY_BYTES)) == "stream_limit"
    worst = deep_size(tuple(objects)) - sys.getsizeof(())
    print(f"relay per-circuit state: {typical} bytes typical, {worst} with all streams")
    assert typical <= 1280
    assert worst <= 2048


def test_onion_error_is_a_decode_error() -> None:
    assert issubclass(OnionError, DecodeError)
    assert str(OnionError("bad_tag")) == "bad_tag"
    assert set(REASONS) == {"wrong_size", "bad_tag", "replay", "stream_limit"}
