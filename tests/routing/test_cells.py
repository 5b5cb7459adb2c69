"""routing/cells.py: the cell layout byte by byte, refusals with stable reasons, message
framing, and "outside bytes only ever raise CellError" (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode.errors import DecodeError, LocalProtocolError
from routing.cells import (
    BODY_BYTES,
    CELL_BYTES,
    HEADER_BYTES,
    KIND_CELL,
    MAX_CIRC_ID,
    MAX_SEQ,
    MESSAGE_HEADER_BYTES,
    PROBE_BYTES,
    REASONS,
    Cell,
    CellError,
    CellType,
    Command,
    decode_message,
    encode_message,
)

circ_ids = st.integers(1, MAX_CIRC_ID)
seqs = st.integers(0, MAX_SEQ)
bodies = st.binary(min_size=BODY_BYTES, max_size=BODY_BYTES)


def test_sizes_match_the_spec() -> None:
    # docs/circuits.md §1: the link's largest frame payload, a 13-byte header, S = 1,409.
    assert (CELL_BYTES, HEADER_BYTES, BODY_BYTES) == (1422, 13, 1409)
    assert KIND_CELL == 0x20
    assert [t.value for t in CellType] == [1, 2, 3, 4, 5]
    assert [c.value for c in Command] == [1, 2, 3, 4]
    assert MESSAGE_HEADER_BYTES == 3


def test_encode_layout() -> None:
    body = bytes(range(256)) * 5 + bytes(BODY_BYTES - 1280)
    cell = Cell(0x01020304, CellType.BACKWARD, 0x1122334455667788, body)
    frame = cell.encode()
    assert len(frame) == CELL_BYTES
    assert frame[:HEADER_BYTES] == bytes.fromhex("01020304041122334455667788")
    assert frame[HEADER_BYTES:] == body
    assert Cell.decode(frame) == cell


@given(circ_ids, st.sampled_from(CellType), seqs, bodies)
def test_roundtrip(circ_id: int, cell_type: CellType, seq: int, body: bytes) -> None:
    cell = Cell(circ_id, cell_type, seq, body)
    decoded = Cell.decode(cell.encode())
    assert decoded == cell
    assert decoded.type is cell_type


@pytest.mark.parametrize("size", [0, 1, HEADER_BYTES, CELL_BYTES - 1, CELL_BYTES + 1, 1452])
def test_wrong_size(size: int) -> None:
    with pytest.raises(CellError) as err:
        Cell.decode(b"\x01" * size)
    assert err.value.reason == "wrong_size"


@pytest.mark.parametrize("type_byte", [0x00, 0x06, 0x20, 0xFF])
def test_bad_type(type_byte: int) -> None:
    frame = bytes.fromhex("00000001") + bytes([type_byte]) + bytes(8 + BODY_BYTES)
    with pytest.raises(CellError) as err:
        Cell.decode(frame)
    assert err.value.reason == "bad_type"


def test_zero_circ_id() -> None:
    frame = bytes(4) + bytes([CellType.FORWARD]) + bytes(8 + BODY_BYTES)
    with pytest.raises(CellError) as err:
        Cell.decode(frame)
    assert err.value.reason == "zero_circ_id"


def test_cell_error_is_a_decode_error() -> None:
    error = CellError("bad_type", "0x07")
    assert isinstance(error, DecodeError)
    assert str(error) == "bad_type: 0x07"
    assert set(REASONS) == {
        "wrong_size",
        "bad_type",
        "zero_circ_id",
        "unknown_command",
        "bad_length",
    }


@pytest.mark.parametrize(
    ("circ_id", "seq", "body_len"),
    [
        (0, 1, BODY_BYTES),
        (2**32, 1, BODY_BYTES),
        (1, -1, BODY_BYTES),
        (1, 2**64, BODY_BYTES),
        (1, 1, BODY_BYTES - 1),
        (1, 1, BODY_BYTES + 1),
    ],
)
def test_malformed_cell_is_our_bug(circ_id: int, seq: int, body_len: int) -> None:
    with pytest.raises(LocalProtocolError):
        Cell(circ_id, CellType.FORWARD, seq, bytes(body_len))


def test_cell_is_slotted_and_frozen() -> None:
    cell = Cell(1, CellType.DESTROY, 0, bytes(BODY_BYTES))
    assert not hasattr(cell, "__dict__")
    with pytest.raises(AttributeError):
        cell.seq = 2  # type: ignore[misc]


@given(st.binary(max_size=CELL_BYTES + 2))
def test_decode_random_bytes_only_raises_cell_error(frame: bytes) -> None:
    try:
        cell = Cell.decode(frame)
    except CellError as err:
        assert err.reason in REASONS
    else:
        assert cell.encode() == frame


@given(
    st.integers(0, 0xFFFF),
    st.sampled_from([t.value for t in CellType]),
    seqs,
    bodies,
)
def test_decode_whole_cells_with_any_header(
    circ_id: int, type_byte: int, seq: int, body: bytes
) -> None:
    frame = circ_id.to_bytes(4, "big") + bytes([type_byte]) + seq.to_bytes(8, "big") + body
    if circ_id == 0:
        with pytest.raises(CellError):
            Cell.decode(frame)
    else:
        assert Cell.decode(frame) == Cell(circ_id, CellType(type_byte), seq, body)


# --- Messages (circuits.md §6) ---------------------------------------------------------


def test_message_layout() -> None:
    message = encode_message(Command.DATA, b"abc", 10)
    assert message == bytes.fromhex("010003") + b"abc" + bytes(7)
    assert decode_message(message) == (Command.DATA, b"abc")


@given(
    st.sampled_from([Command.DATA, Command.PADDING]),
    st.binary(max_size=1400),
    st.integers(0, 100),
)
def test_message_roundtrip(cmd: Command, data: bytes, slack: int) -> None:
    capacity = len(data) + slack
    message = encode_message(cmd, data, capacity)
    assert len(message) == MESSAGE_HEADER_BYTES + capacity
    assert message.endswith(bytes(slack))
    assert decode_message(message) == (cmd, data)


@pytest.mark.parametrize("cmd", [Command.PROBE, Command.PROBE_REPLY])
def test_probe_messages_carry_16_bytes(cmd: Command) -> None:
    payload = bytes(range(PROBE_BYTES))
    assert decode_message(encode_message(cmd, payload, 100)) == (cmd, payload)
    with pytest.raises(LocalProtocolError):
        encode_message(cmd, payload[:-1], 100)
    forged = bytes([cmd, 0, 15]) + bytes(100)
    with pytest.raises(CellError) as err:
        decode_message(forged)
    assert err.value.reason == "bad_length"


def test_padding_is_not_checked() -> None:
    # A forward message for hop t ends in the filler tail (circuits.md §4).
    message = encode_message(Command.DATA, b"x", 64)[:-16] + b"\xaa" * 16
    assert decode_message(message) == (Command.DATA, b"x")


@pytest.mark.parametrize("cmd_byte", [0x00, 0x05, 0xFF])
def test_unknown_command(cmd_byte: int) -> None:
    with pytest.raises(CellError) as err:
        decode_message(bytes([cmd_byte, 0, 0]) + bytes(20))
    assert err.value.reason == "unknown_command"


@pytest.mark.parametrize(
    "pt",
    [b"", b"\x01", b"\x01\x00", b"\x01\x00\x01", b"\x01\x00\x05abcd", b"\x01\xff\xff" + bytes(100)],
)
def test_bad_length(pt: bytes) -> None:
    with pytest.raises(CellError) as err:
        decode_message(pt)
    assert err.value.reason == "bad_length"


def test_length_exactly_filling_the_layer() -> None:
    assert decode_message(b"\x01\x00\x04abcd") == (Command.DATA, b"abcd")


def test_encode_message_refuses_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(Command.DATA, b"12345", 4)
    with pytest.raises(LocalProtocolError):
        encode_message(7, b"", 4)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_message(Command.DATA, b"", 0x10000)


@given(st.binary(max_size=1500))
def test_decode_message_random_bytes_only_raises_cell_error(pt: bytes) -> None:
    try:
        cmd, data = decode_message(pt)
    except CellError as err:
        assert err.reason in ("unknown_command", "bad_length")
    else:
        assert cmd in Command
        assert pt[MESSAGE_HEADER_BYTES : MESSAGE_HEADER_BYTES + len(data)] == data
