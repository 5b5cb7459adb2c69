"""Onion layers of a circuit: what each hop does to a cell body, and the client's side (sans-IO).

Forward (docs/circuits.md §4): hop i opens ``tag || ct`` with ChaCha20-Poly1305 under
``kf_i`` and the nonce ``0x00000000 || seq_i``; a plaintext starting with 16 zero bytes
is for hop i, anything else goes on as ``pt || filler_i`` with
``seq_{i+1} = seq_i - off_f_i``. Every hop opens exactly S-16 bytes, so no hop learns its
position, and layer i covers every byte hop i receives, so the first hop that opens a
tampered cell drops it. The filler is keyed BLAKE2b with a 16-byte digest
(:func:`meshnode.crypto.mac`) of seq_i as 8 bytes big-endian. The client picks hop t's
plaintext tail so that its ciphertext ends in the bytes the fillers of hops 1..t-1 will
append, then seals layers t, t-1, .., 1 (:meth:`ClientCircuitCrypto.wrap_forward`).

Backward: hop j seals what it originates under ``kb_seal_j`` with its own counter
(:class:`BackwardOrigin`); every hop i < j XORs a ChaCha20 keystream under
``kb_relay_i`` and shifts seq by ``off_b_i`` (:class:`BackwardRelay`); the client peels
the keystreams and tries each depth, the exit first: the key that verifies names the
origin (:meth:`ClientCircuitCrypto.unwrap_backward`).

Replays (§3): a :class:`ReplayWindow` of 256 values over the signed 64-bit difference
from the first seq seen. Forward, each hop checks before opening and updates once the
tag verified. Backward, one link carries one seq stream per hop downstream that
originates cells (hop j's own counter, hop j+1's relayed cells shifted by ``off_b_j``,
...), spread over the 64-bit space by the secret offsets; one window would take all but
one of them for replays, so a relay keeps one window per stream (at most
``MAX_HOPS - 1``, see :class:`BackwardRelay`). The client, which knows the origin only
once a tag verifies, opens first and keeps one window per origin hop.

Relay objects hold raw keys: a ``ChaCha20Poly1305`` object costs ~2.2 KB of OpenSSL
memory, more than the whole per-circuit budget. The forward layers of the most recently
active circuits (at most :data:`ACTIVE_LAYERS`, one module-wide LRU) keep their AEAD and
a keyed BLAKE2b state for the filler, so a busy circuit does not rebuild them per cell
(~1.5 µs) while an idle one holds only its keys; :meth:`ForwardLayer.discard` drops a
closed circuit's entry. Every refusal is an
:class:`OnionError` with a stable ``reason`` (``drop.<reason>`` in the caller's counters).

Not here: cell framing and messages (routing/cells.py), key derivation
(routing/keys.py), the build (routing/build.py), which circuit a cell belongs to.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, get_args

from meshnode import crypto
from meshnode.errors import DecodeError, LocalProtocolError
from routing.cells import BODY_BYTES, MAX_SEQ, MESSAGE_HEADER_BYTES
from routing.keys import HopKeys

__all__ = [
    "ACTIVE_LAYERS",
    "BACKWARD_CAPACITY",
    "FILLER_BYTES",
    "FORWARD_MESSAGE_BYTES",
    "LAYER_BYTES",
    "MARKER_BYTES",
    "MAX_BACKWARD_STREAMS",
    "MAX_HOPS",
    "REASONS",
    "REPLAY_WINDOW",
    "STREAM_RADIUS",
    "TAG_BYTES",
    "BackwardOrigin",
    "BackwardRelay",
    "ClientCircuitCrypto",
    "ForwardLayer",
    "ForwardResult",
    "OnionError",
    "Reason",
    "ReplayWindow",
    "capacity",
]

MAX_HOPS = 5
TAG_BYTES = crypto.AEAD_TAG_BYTES  # 16, first in the body: body = tag || ct
MARKER_BYTES = 16  # zero bytes that open a plaintext meant for this hop
FILLER_BYTES = 16  # what each forwarding hop appends
LAYER_BYTES = BODY_BYTES - TAG_BYTES  # 1393: what every hop opens, whatever its position
FORWARD_MESSAGE_BYTES = LAYER_BYTES - MARKER_BYTES  # 1377: what ForwardLayer delivers
BACKWARD_CAPACITY = LAYER_BYTES - MESSAGE_HEADER_BYTES  # 1390 data bytes in a backward cell
REPLAY_WINDOW = 256  # seq values a window remembers (circuits.md §3)
MAX_BACKWARD_STREAMS = MAX_HOPS - 1  # origins downstream of a relay: at most hops 2..5
# How far (signed) from a stream's first seq a backward seq still belongs to it. Streams
# start ~2^63 apart on average (secret 64-bit offsets); no circuit sends 2^32 cells.
STREAM_RADIUS = 2**32

ACTIVE_LAYERS = 512  # forward layers that keep their AEAD (~2.2 KB each): ~1.1 MB at most
_U64 = 2**64 - 1
_SIGN = 2**63
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
_MARKER = bytes(MARKER_BYTES)
_ZERO_LAYER = bytes(LAYER_BYTES)
_NONCE = struct.Struct("!4xQ")  # circuits.md §2: 0x00000000 || seq (big-endian)
_SEQ = struct.Struct("!Q")

Reason = Literal[
    "wrong_size",  # a body that is not BODY_BYTES long
    "bad_tag",  # the layer did not verify: tampered, wrong circuit or garbage
    "replay",  # seq already seen, or before the window
    "stream_limit",  # backward: a seq far from every stream, and all stream windows in use
]
REASONS: tuple[Reason, ...] = get_args(Reason)

ForwardResult = tuple[Literal["deliver"], bytes] | tuple[Literal["forward"], int, bytes]
"""``("deliver", message)``: for this hop, ``message`` the FORWARD_MESSAGE_BYTES to give
:func:`routing.cells.decode_message`; ``("forward", next_seq, next_body)``: send on."""


class OnionError(DecodeError):
    """A cell was dropped by a layer; ``reason`` is a stable token (one of :data:`REASONS`)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def capacity(hop: int) -> int:
    """Data bytes a forward message for hop ``hop`` (1-based) can carry: 1,310 at hop 5.

    ``S - 16 (tag) - 16 (marker) - 16 (hop - 1) (filler tail) - 3 (message header)``.
    """
    if not 1 <= hop <= MAX_HOPS:
        raise LocalProtocolError(f"hop index {hop} outside 1..{MAX_HOPS}")
    return LAYER_BYTES - MARKER_BYTES - FILLER_BYTES * (hop - 1) - MESSAGE_HEADER_BYTES


def _check_seq(seq: int) -> None:
    if not 0 <= seq <= MAX_SEQ:
        raise LocalProtocolError(f"seq out of uint64 range: {seq}")


def _filler(kf_fill: bytes, seq: int) -> bytes:
    """filler_i = keyed BLAKE2b(kf_fill_i, seq_i as 8 bytes big-endian), 16 bytes (§4)."""
    return crypto.mac(kf_fill, _SEQ.pack(seq), size=FILLER_BYTES)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _keystream_tail(aead: crypto.Aead, seq: int, size: int) -> bytes:
    """The last ``size`` bytes of the keystream ``aead`` XORs onto a LAYER_BYTES plaintext
    under ``nonce(seq)``: the ciphertext of zeros is that keystream.

    Faster than a bare ChaCha20 context at block counter 1 (~1.7 vs ~3 µs to set one up).
    The zeros' ciphertext and tag never leave this function, so the nonce still serves
    exactly one sent ciphertext (the cell's own seal).
    """
    return aead.seal(_NONCE.pack(seq), _ZERO_LAYER)[LAYER_BYTES - size : LAYER_BYTES]


def _seal(aead: crypto.Aead, seq: int, pt: bytes) -> bytes:
    """``tag || ct`` of ``pt`` (the body layout; crypto.Aead returns ``ct || tag``)."""
    sealed = aead.seal(_NONCE.pack(seq), pt)
    return sealed[-TAG_BYTES:] + sealed[:-TAG_BYTES]


def _open(aead: crypto.Aead, seq: int, body: bytes | memoryview) -> bytes | None:
    """Open ``tag || ct`` (``body``: bytes or a memoryview, copied once as ``ct || tag``)."""
    view = memoryview(body)
    return aead.open(_NONCE.pack(seq), b"".join((view[TAG_BYTES:], view[:TAG_BYTES])))


_LayerContext = tuple[crypto.Aead, "hashlib.blake2b"]
# The forward layers that were active last, least recent first, with their contexts.
_ACTIVE: OrderedDict[ForwardLayer, _LayerContext] = OrderedDict()


class ReplayWindow:
    """Which seq values of one stream were accepted (circuits.md §3).

    Positions are the signed 64-bit difference ``seq - first`` from the first value
    accepted, so the window works across the wrap at 2^64 and takes a few values from
    before the first (reordering at the start). Accepted: ahead of the highest position,
    or fewer than REPLAY_WINDOW behind it and not seen. Two ints and a 256-bit bitmap
    (bit k stands for ``highest - k``), as in meshnode/link/replay.py.
    """

    __slots__ = ("_bits", "_first", "_highest")

    def __init__(self) -> None:
        self._first = -1  # no value accepted yet
        self._highest = 0
        self._bits = 0

    @property
    def first(self) -> int | None:
        """The first seq accepted, the origin of positions; None before it."""
        return None if self._first < 0 else self._first

    def offset(self, seq: int) -> int:
        """``seq - first`` read as a signed 64-bit value (0 before the first value)."""
        if self._first < 0:
            return 0
        return ((seq - self._first + _SIGN) & _U64) - _SIGN

    def check(self, seq: int) -> bool:
        """True if :meth:`update` would accept ``seq``; changes nothing. Call before opening."""
        if self._first < 0:
            return True
        position = ((seq - self._first + _SIGN) & _U64) - _SIGN
        behind = self._highest - position
        if behind < 0:
            return True
        return behind < REPLAY_WINDOW and not (self._bits >> behind) & 1

    def update(self, seq: int) -> bool:
        """Mark ``seq`` seen; False (and nothing changes) for a replay or one too old.

        Call once the cell's tag verified, so forged cells cannot move the window.
        """
        if self._first < 0:
            self._first = seq
            self._highest = 0
            self._bits = 1
            return True
        position = ((seq - self._first + _SIGN) & _U64) - _SIGN
        behind = self._highest - position
        if behind < 0:
            shift = -behind
            self._bits = 1 if shift >= REPLAY_WINDOW else ((self._bits << shift) | 1) & _WINDOW_MASK
            self._highest = position
            return True
        if behind >= REPLAY_WINDOW:
            return False
        bit = 1 << behind
        if self._bits & bit:
            return False
        self._bits |= bit
        return True

    def __repr__(self) -> str:
        return f"ReplayWindow(first={self.first}, highest={self._highest})"


class ForwardLayer:
    """A relay's forward layer for one circuit: opens, delivers or forwards (§4).

    Keeps ``kf``, ``kf_fill``, ``off_f`` and a replay window, nothing else of the keys;
    while among the ACTIVE_LAYERS most recently used, the module's LRU also holds its
    AEAD and filler MAC state (see the module docstring).
    """

    __slots__ = ("_kf", "_kf_fill", "_off_f", "_window")

    def __init__(self, keys: HopKeys) -> None:
        self._kf = keys.kf
        self._kf_fill = keys.kf_fill
        self._off_f = keys.off_f
        self._window = ReplayWindow()

    def discard(self) -> None:
        """Forget this layer's cached AEAD and MAC state (its circuit is closed)."""
        _ACTIVE.pop(self, None)

    def open_layer(self, seq: int, body: bytes | memoryview) -> bytes | tuple[int, bytes, bytes]:
        """The work of :meth:`process` without building the next body: the message
        (bytes) to deliver, or ``(next_seq, pt, filler)``: send ``pt || filler`` on."""
        if not 0 <= seq <= MAX_SEQ:
            raise LocalProtocolError(f"seq out of uint64 range: {seq}")
        if len(body) != BODY_BYTES:
            raise OnionError("wrong_size", f"{len(body)}-byte body")
        window = self._window
        if not window.check(seq):
            raise OnionError("replay")
        active = _ACTIVE
        context = active.get(self)
        if context is None:
            context = active[self] = (
                crypto.Aead(self._kf),
                hashlib.blake2b(digest_size=FILLER_BYTES, key=self._kf_fill),
            )
            if len(active) > ACTIVE_LAYERS:
                active.popitem(last=False)
        else:
            active.move_to_end(self)
        aead, filler_mac = context
        packed = _SEQ.pack(seq)
        # ct || tag in one copy (none before it when body is a memoryview)
        pt = aead.open(b"\0\0\0\0" + packed, b"".join((body[TAG_BYTES:], body[:TAG_BYTES])))
        if pt is None:
            raise OnionError("bad_tag")
        window.update(seq)
        if pt.startswith(_MARKER):
            return pt[MARKER_BYTES:]
        mac = filler_mac.copy()
        mac.update(packed)
        return (seq - self._off_f) & _U64, pt, mac.digest()

    def process(self, seq: int, body: bytes) -> ForwardResult:
        """Open one FORWARD body that arrived with ``seq``; :class:`OnionError` to drop it."""
        result = self.open_layer(seq, body)
        if isinstance(result, bytes):
            return ("deliver", result)
        next_seq, pt, filler = result
        return ("forward", next_seq, pt + filler)


class BackwardRelay:
    """A relay's backward layer for one circuit: keystream under ``kb_relay``, seq + off_b.

    It cannot check a backward cell (only the client holds the origin's key); it refuses
    replays with one window per seq stream: a seq within STREAM_RADIUS of a stream's
    first value belongs to it, any other opens a new stream while fewer than
    MAX_BACKWARD_STREAMS exist. Only the successor can send on this circuit's link side,
    and it can drop every backward cell anyway, so filling the streams gains it nothing.
    """

    __slots__ = ("_kb_relay", "_off_b", "_windows")

    def __init__(self, keys: HopKeys) -> None:
        self._kb_relay = keys.kb_relay
        self._off_b = keys.off_b
        self._windows: tuple[ReplayWindow, ...] = ()

    def _window_for(self, seq: int) -> ReplayWindow:
        for window in self._windows:
            if -STREAM_RADIUS < window.offset(seq) < STREAM_RADIUS:
                return window
        if len(self._windows) >= MAX_BACKWARD_STREAMS:
            raise OnionError("stream_limit")
        window = ReplayWindow()
        self._windows = (*self._windows, window)
        return window

    def relay(self, seq: int, body: bytes) -> tuple[int, bytes]:
        """``(seq_out, body_out)`` for one BACKWARD cell; :class:`OnionError` to drop it."""
        _check_seq(seq)
        if len(body) != BODY_BYTES:
            raise OnionError("wrong_size", f"{len(body)}-byte body")
        if not self._window_for(seq).update(seq):
            raise OnionError("replay")
        out = crypto.chacha20_xor(self._kb_relay, _NONCE.pack(seq), body)
        return (seq + self._off_b) & _U64, out


class BackwardOrigin:
    """Cells one hop originates towards the client (exit data, probe replies, §4).

    Numbers them with its own counter from 1; the nonce under ``kb_seal`` is that seq.
    """

    __slots__ = ("_kb_seal", "_next_seq")

    def __init__(self, keys: HopKeys) -> None:
        self._kb_seal = keys.kb_seal
        self._next_seq = 1

    def seal(self, message: bytes) -> tuple[int, bytes]:
        """``(seq, body)`` of a BACKWARD cell carrying ``message`` (framed, at most
        LAYER_BYTES; zero padded): ``tag || ct`` under ``kb_seal`` and ``nonce(seq)``."""
        if len(message) > LAYER_BYTES:
            raise LocalProtocolError(f"backward message of {len(message)} > {LAYER_BYTES} bytes")
        seq = self._next_seq
        _check_seq(seq)  # 2^64 cells: never, but never a reused nonce either
        self._next_seq = seq + 1
        return seq, _seal(crypto.Aead(self._kb_seal), seq, message.ljust(LAYER_BYTES, b"\0"))


class ClientCircuitCrypto:
    """The client's layers of one circuit: wraps forward cells for any hop, unwraps
    backward cells from any hop. One forward counter (seq_1 = 1, 2, ...) for all hops."""

    __slots__ = ("_backward", "_forward", "_hops", "_next_seq", "_windows")

    def __init__(self, hops: Sequence[HopKeys]) -> None:
        if not 1 <= len(hops) <= MAX_HOPS:
            raise LocalProtocolError(f"a circuit has 1..{MAX_HOPS} hops, not {len(hops)}")
        self._hops = tuple(hops)
        self._forward = tuple(crypto.Aead(h.kf) for h in hops)
        self._backward = tuple(crypto.Aead(h.kb_seal) for h in hops)
        self._windows = tuple(ReplayWindow() for _ in hops)
        self._next_seq = 1

    @property
    def hop_count(self) -> int:
        """n, the number of hops."""
        return len(self._hops)

    def wrap_forward(self, hop: int, message: bytes) -> tuple[int, bytes]:
        """``(seq_1, body)`` of a FORWARD cell whose ``message`` (framed, at most
        ``capacity(hop) + MESSAGE_HEADER_BYTES`` bytes) hop ``hop`` (1-based) delivers."""
        hops = self._hops
        if not 1 <= hop <= len(hops):
            raise LocalProtocolError(f"hop index {hop} outside 1..{len(hops)}")
        room = capacity(hop) + MESSAGE_HEADER_BYTES
        if len(message) > room:
            raise LocalProtocolError(f"message of {len(message)} bytes for hop {hop} > {room}")
        seq_1 = self._next_seq
        _check_seq(seq_1)
        self._next_seq = seq_1 + 1
        forward = self._forward
        seqs = [seq_1]
        for keys in hops[: hop - 1]:
            seqs.append((seqs[-1] - keys.off_f) & _U64)
        # The bytes hop `hop` will receive after its marker, message and padding: each hop
        # i < hop shifts the body left by 16 (decrypting it) and appends filler_i.
        tail = b""
        for i in range(hop - 1):
            if tail:
                tail = _xor(tail, _keystream_tail(forward[i], seqs[i], len(tail)))
            tail += _filler(hops[i].kf_fill, seqs[i])
        target = hop - 1
        if tail:
            tail = _xor(tail, _keystream_tail(forward[target], seqs[target], len(tail)))
        pt = _MARKER + message.ljust(room, b"\0") + tail
        body = _seal(forward[target], seqs[target], pt)
        for i in range(target - 1, -1, -1):
            # Hop i+1 receives pt_i || filler_i; the filler is already body's tail.
            body = _seal(forward[i], seqs[i], body[:LAYER_BYTES])
        return seq_1, body

    def unwrap_backward(self, seq: int, body: bytes) -> tuple[int, bytes]:
        """``(origin_hop, message)`` of a BACKWARD cell that arrived on link 1 with ``seq``;
        ``message`` the LAYER_BYTES for :func:`routing.cells.decode_message`.

        :class:`OnionError` ``bad_tag`` if no hop's key opens it, ``replay`` if the origin
        hop's window already saw its seq (checked after the tag: the origin is unknown
        before it verifies).
        """
        _check_seq(seq)
        if len(body) != BODY_BYTES:
            raise OnionError("wrong_size", f"{len(body)}-byte body")
        hops = self._hops
        seqs = [seq]
        bodies = [body]
        for keys in hops[:-1]:
            seq_in = (seqs[-1] - keys.off_b) & _U64  # hop i's seq_in, the nonce it used
            bodies.append(crypto.chacha20_xor(keys.kb_relay, _NONCE.pack(seq_in), bodies[-1]))
            seqs.append(seq_in)
        last = len(hops) - 1
        for depth in (last, *range(last)):  # the exit's data is the common case
            pt = _open(self._backward[depth], seqs[depth], bodies[depth])
            if pt is not None:
                if not self._windows[depth].update(seqs[depth]):
                    raise OnionError("replay", f"from hop {depth + 1}")
                return depth + 1, pt
        raise OnionError("bad_tag")
