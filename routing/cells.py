"""Fixed-size circuit cells and the messages inside onion layers (sans-IO).

A cell is the payload of one link frame of kind :data:`KIND_CELL`, always
:data:`CELL_BYTES` long (the link's largest frame payload), so its size tells an
observer nothing (docs/circuits.md §1)::

    offset size field
    0      4    circ_id   chosen per link by the sender of the BUILD; nonzero
    4      1    type      BUILD, BUILD_REPLY, FORWARD, BACKWARD, DESTROY
    5      8    seq       per-link sequence value (circuits.md §3), uint64
    13     1409 body      BODY_BYTES

Inside the innermost layer a message is ``cmd (1) || len (2) || data || padding``
(circuits.md §6). :func:`decode_message` checks the command and that ``len`` fits what
the layer holds; it does not check the padding: a forward message for hop t ends in
the filler tail the hops before it will append (circuits.md §4), which hop t cannot
tell from its position.

Every refusal of outside bytes is a :class:`CellError` with a stable ``reason`` the
driver counts as ``drop.<reason>``. Not here: the layers (routing/onion.py), the
build records (routing/build.py), which circuit a cell belongs to (the relay table).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Literal, get_args

from meshnode.errors import DecodeError, LocalProtocolError
from meshnode.link.constants import KIND_CELL, MAX_PAYLOAD_BYTES

__all__ = [
    "BODY_BYTES",
    "CELL_BYTES",
    "CIRC_ID_BYTES",
    "HEADER_BYTES",
    "KIND_CELL",
    "MAX_CIRC_ID",
    "MAX_SEQ",
    "MESSAGE_HEADER_BYTES",
    "PROBE_BYTES",
    "REASONS",
    "SEQ_BYTES",
    "Cell",
    "CellError",
    "CellType",
    "Command",
    "Reason",
    "decode_message",
    "encode_message",
    "pack_header",
    "unpack_header",
]

CELL_BYTES = MAX_PAYLOAD_BYTES  # 1422: every cell, so the UDP datagram is always 1,452
CIRC_ID_BYTES = 4
SEQ_BYTES = 8
_HEADER = struct.Struct("!IBQ")
HEADER_BYTES = _HEADER.size  # 13
BODY_BYTES = CELL_BYTES - HEADER_BYTES  # 1409: S in circuits.md
MAX_CIRC_ID = 2**32 - 1
MAX_SEQ = 2**64 - 1

_MESSAGE_HEADER = struct.Struct("!BH")
MESSAGE_HEADER_BYTES = _MESSAGE_HEADER.size  # 3
PROBE_BYTES = 16  # PROBE / PROBE_REPLY data: 8-byte nonce || 8-byte client timestamp


class CellType(enum.IntEnum):
    """The cell's type byte (circuits.md §1). The direction is in the type."""

    BUILD = 0x01
    BUILD_REPLY = 0x02
    FORWARD = 0x03
    BACKWARD = 0x04
    DESTROY = 0x05


class Command(enum.IntEnum):
    """The first byte of a message inside the innermost layer (circuits.md §6)."""

    DATA = 0x01
    PROBE = 0x02
    PROBE_REPLY = 0x03
    PADDING = 0x04


_CELL_TYPES: dict[int, CellType] = {t.value: t for t in CellType}
_COMMANDS: dict[int, Command] = {c.value: c for c in Command}

Reason = Literal[
    "wrong_size",  # a cell frame that is not exactly CELL_BYTES long
    "bad_type",  # a type byte that is none of CellType
    "zero_circ_id",  # circ_id 0 is never chosen
    "unknown_command",  # a message command that is none of Command
    "bad_length",  # a message length past what its layer holds (or a probe not 16 bytes)
]
REASONS: tuple[Reason, ...] = get_args(Reason)


class CellError(DecodeError):
    """A cell or message was refused; ``reason`` is a stable token (one of :data:`REASONS`)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell as it travels on one link; constructing a malformed one is our bug."""

    circ_id: int  # 1 .. 2^32-1, chosen by the sender of the BUILD on this link
    type: CellType
    seq: int  # uint64, per link (circuits.md §3)
    body: bytes  # exactly BODY_BYTES

    def __post_init__(self) -> None:
        if not 0 < self.circ_id <= MAX_CIRC_ID:
            raise LocalProtocolError(f"cell circ_id out of range: {self.circ_id}")
        if not 0 <= self.seq <= MAX_SEQ:
            raise LocalProtocolError(f"cell seq out of range: {self.seq}")
        if len(self.body) != BODY_BYTES:
            raise LocalProtocolError(f"cell body must be {BODY_BYTES} bytes, not {len(self.body)}")

    def encode(self) -> bytes:
        """The CELL_BYTES of this cell, ready for a link frame of kind KIND_CELL."""
        return _HEADER.pack(self.circ_id, self.type, self.seq) + self.body

    @classmethod
    def decode(cls, frame: bytes) -> Cell:
        """Parse one link frame's payload; :class:`CellError` unless it is a whole valid cell."""
        if len(frame) != CELL_BYTES:
            raise CellError("wrong_size", f"{len(frame)} bytes")
        circ_id, type_byte, seq = _HEADER.unpack_from(frame)
        cell_type = _CELL_TYPES.get(type_byte)
        if cell_type is None:
            raise CellError("bad_type", f"0x{type_byte:02x}")
        if circ_id == 0:
            raise CellError("zero_circ_id")
        return cls(circ_id, cell_type, seq, bytes(frame[HEADER_BYTES:]))


pack_header = _HEADER.pack
"""``pack_header(circ_id, type, seq)``: a cell's HEADER_BYTES, for callers that build
the CELL_BYTES themselves (``header || body``, the body BODY_BYTES) without a
:class:`Cell`; they check the ranges :class:`Cell` would (struct refuses values that
do not fit their fields)."""
unpack_header = _HEADER.unpack_from
"""``unpack_header(frame)``: ``(circ_id, type_byte, seq)`` of a frame's first
HEADER_BYTES, unchecked: :meth:`Cell.decode` is the checked form."""


def encode_message(cmd: Command, data: bytes, capacity: int) -> bytes:
    """``cmd || len || data || zero padding``: ``MESSAGE_HEADER_BYTES + capacity`` bytes.

    ``capacity`` is how many data bytes the layer holds (``routing.onion.capacity(t)``
    forward, ``routing.onion.BACKWARD_CAPACITY`` backward); data past it is our bug.
    """
    if cmd not in _COMMANDS:
        raise LocalProtocolError(f"unknown message command: {cmd!r}")
    if not 0 <= len(data) <= capacity <= 0xFFFF:
        raise LocalProtocolError(f"message of {len(data)} bytes does not fit {capacity}")
    if cmd in (Command.PROBE, Command.PROBE_REPLY) and len(data) != PROBE_BYTES:
        raise LocalProtocolError(f"a probe carries {PROBE_BYTES} bytes, not {len(data)}")
    return _MESSAGE_HEADER.pack(cmd, len(data)) + data + bytes(capacity - len(data))


def decode_message(pt: bytes) -> tuple[Command, bytes]:
    """The ``(cmd, data)`` of a layer's plaintext message; :class:`CellError` if malformed.

    The padding after ``data`` is not checked (see the module docstring).
    """
    if len(pt) < MESSAGE_HEADER_BYTES:
        raise CellError("bad_length", f"{len(pt)}-byte message")
    cmd_byte, length = _MESSAGE_HEADER.unpack_from(pt)
    cmd = _COMMANDS.get(cmd_byte)
    if cmd is None:
        raise CellError("unknown_command", f"0x{cmd_byte:02x}")
    end = MESSAGE_HEADER_BYTES + length
    if end > len(pt):
        raise CellError("bad_length", f"{length} bytes in a {len(pt)}-byte message")
    if cmd in (Command.PROBE, Command.PROBE_REPLY) and length != PROBE_BYTES:
        raise CellError("bad_length", f"{length}-byte probe")
    return cmd, bytes(pt[MESSAGE_HEADER_BYTES:end])
