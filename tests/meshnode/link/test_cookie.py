"""mac1 / mac2 and cookie replies: the checker (responder) and generator (initiator) sides."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode import crypto
from meshnode.errors import LocalProtocolError
from meshnode.link import constants
from meshnode.link.cookie import (
    MACS_BYTES,
    CookieChecker,
    CookieGenerator,
    addr_bytes,
    parse_cookie_reply_index,
)

ADDR = ("192.0.2.7", 51820)
OTHER_ADDR = ("192.0.2.8", 51820)
SECRET_LIFE = constants.COOKIE_SECRET_LIFETIME_S


def counting_random() -> tuple[list[int], Callable[[int], bytes]]:
    """A deterministic `random_bytes` that records the sizes asked for."""
    calls: list[int] = []
    counter = itertools.count(1)

    def random_bytes(n: int) -> bytes:
        calls.append(n)
        return bytes([next(counter) % 256]) * n

    return calls, random_bytes


@pytest.fixture
def responder_public() -> bytes:
    return crypto.x25519_public_from_private(crypto.x25519_generate_private())


@pytest.fixture
def checker(responder_public: bytes) -> CookieChecker:
    return CookieChecker(responder_public, crypto.random_bytes)


@pytest.fixture
def generator(responder_public: bytes) -> CookieGenerator:
    return CookieGenerator(responder_public)


BODY = bytes([constants.MSG_INITIATION]) + bytes(range(200))


def cookie_round_trip(
    checker: CookieChecker, generator: CookieGenerator, now: float, addr: tuple[str, int] = ADDR
) -> None:
    msg = generator.add_macs(BODY, now)
    reply = checker.create_reply(msg, 0x01020304, addr, now)
    assert generator.consume_reply(reply, now)


# --- mac1 ------------------------------------------------------------------------------


def test_mac1_valid(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    assert len(msg) == len(BODY) + MACS_BYTES
    assert msg[: len(BODY)] == BODY
    assert checker.check_mac1(msg)


def test_mac1_matches_the_documented_construction(
    responder_public: bytes, generator: CookieGenerator
) -> None:
    msg = generator.add_macs(BODY, 0.0)
    key = crypto.hash_bytes(constants.LABEL_MAC1 + responder_public, size=32)
    assert msg[-32:-16] == crypto.mac(key, BODY, size=16)


@pytest.mark.parametrize("position", [0, 5, len(BODY) - 1, len(BODY), len(BODY) + 15])
def test_mac1_invalid_when_any_covered_byte_changes(
    checker: CookieChecker, generator: CookieGenerator, position: int
) -> None:
    msg = bytearray(generator.add_macs(BODY, 0.0))
    msg[position] ^= 0x01
    assert not checker.check_mac1(bytes(msg))


def test_mac1_ignores_mac2(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = bytearray(generator.add_macs(BODY, 0.0))
    msg[-1] ^= 0xFF
    assert checker.check_mac1(bytes(msg))


def test_mac1_wrong_key(checker: CookieChecker) -> None:
    stranger = crypto.x25519_public_from_private(crypto.x25519_generate_private())
    msg = CookieGenerator(stranger).add_macs(BODY, 0.0)
    assert not checker.check_mac1(msg)


def test_short_messages_are_refused(checker: CookieChecker) -> None:
    for length in (0, 1, MACS_BYTES - 1):
        assert not checker.check_mac1(bytes(length))
        assert not checker.check_mac2(bytes(length), ADDR, 0.0)


# --- mac2 and cookie replies -----------------------------------------------------------


def test_mac2_zero_without_cookie(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    assert msg[-16:] == bytes(16)
    assert not generator.has_cookie(0.0)
    assert not checker.check_mac2(msg, ADDR, 0.0)


def test_reply_layout(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    reply = checker.create_reply(msg, 0xDEADBEEF, ADDR, 0.0)
    assert len(reply) == constants.COOKIE_REPLY_BYTES == 61
    assert reply[0] == constants.MSG_COOKIE_REPLY
    assert reply[1:5] == bytes.fromhex("deadbeef")
    assert parse_cookie_reply_index(reply) == 0xDEADBEEF


def test_reply_uses_injected_randomness(responder_public: bytes) -> None:
    calls, random_bytes = counting_random()
    checker = CookieChecker(responder_public, random_bytes)
    msg = CookieGenerator(responder_public).add_macs(BODY, 0.0)
    reply = checker.create_reply(msg, 1, ADDR, 0.0)
    assert calls == [32, 24]  # the secret, then the nonce
    assert reply[5:29] == bytes([2]) * 24
    checker.create_reply(msg, 1, ADDR, 1.0)
    assert calls == [32, 24, 24]  # the secret is reused within its lifetime


def test_round_trip(checker: CookieChecker, generator: CookieGenerator) -> None:
    first = generator.add_macs(BODY, 10.0)
    reply = checker.create_reply(first, 7, ADDR, 10.0)
    assert generator.consume_reply(reply, 10.0)
    assert generator.has_cookie(11.0)

    second = generator.add_macs(BODY, 11.0)
    assert second[-16:] != bytes(16)
    assert checker.check_mac1(second)
    assert checker.check_mac2(second, ADDR, 11.0)
    assert not checker.check_mac2(second, OTHER_ADDR, 11.0)
    assert not checker.check_mac2(second, (ADDR[0], ADDR[1] + 1), 11.0)


def test_mac2_covers_mac1(checker: CookieChecker, generator: CookieGenerator) -> None:
    cookie_round_trip(checker, generator, 0.0)
    msg = bytearray(generator.add_macs(BODY, 1.0))
    msg[-17] ^= 0x01  # last byte of mac1
    assert not checker.check_mac2(bytes(msg), ADDR, 1.0)


def test_generator_cookie_expires(checker: CookieChecker, generator: CookieGenerator) -> None:
    cookie_round_trip(checker, generator, 0.0)
    just_before = constants.COOKIE_LIFETIME_S - 0.001
    assert generator.has_cookie(just_before)
    assert generator.add_macs(BODY, just_before)[-16:] != bytes(16)
    assert not generator.has_cookie(constants.COOKIE_LIFETIME_S)
    assert generator.add_macs(BODY, constants.COOKIE_LIFETIME_S)[-16:] == bytes(16)


def test_checker_accepts_for_a_secret_lifetime_after_issue(
    checker: CookieChecker, generator: CookieGenerator
) -> None:
    # Secret drawn at 0; cookie issued late in the secret's issuing life.
    other = CookieGenerator(b"\0" * 32)
    checker.create_reply(other.add_macs(BODY, 0.0), 1, OTHER_ADDR, 0.0)
    issued = SECRET_LIFE - 1.0
    cookie_round_trip(checker, generator, issued)
    # The generator uses it for COOKIE_LIFETIME_S; the checker must accept all along.
    last_use = issued + constants.COOKIE_LIFETIME_S - 0.001
    assert checker.check_mac2(generator.add_macs(BODY, last_use), ADDR, last_use)


def test_checker_rejects_after_two_secret_rotations(
    checker: CookieChecker, generator: CookieGenerator
) -> None:
    cookie_round_trip(checker, generator, 0.0)
    msg = generator.add_macs(BODY, 1.0)  # carries mac2 under the first secret
    assert checker.check_mac2(msg, ADDR, 1.0)

    other = CookieGenerator(b"\0" * 32)
    # Rotation 1: the first secret is now the previous one and still accepted.
    checker.create_reply(other.add_macs(BODY, 0.0), 1, OTHER_ADDR, SECRET_LIFE + 1.0)
    assert checker.check_mac2(msg, ADDR, SECRET_LIFE + 1.0)
    # Rotation 2: the first secret is gone.
    checker.create_reply(other.add_macs(BODY, 0.0), 1, OTHER_ADDR, 2 * SECRET_LIFE + 2.0)
    assert not checker.check_mac2(msg, ADDR, 2 * SECRET_LIFE + 2.0)


def test_checker_rejects_an_old_secret_without_rotation(
    checker: CookieChecker, generator: CookieGenerator
) -> None:
    cookie_round_trip(checker, generator, 0.0)
    msg = generator.add_macs(BODY, 1.0)
    assert checker.check_mac2(msg, ADDR, 2 * SECRET_LIFE - 0.001)
    assert not checker.check_mac2(msg, ADDR, 2 * SECRET_LIFE)


def test_tampered_reply_refused(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    reply = checker.create_reply(msg, 1, ADDR, 0.0)
    for position in range(5, len(reply)):  # nonce and sealed cookie
        tampered = bytearray(reply)
        tampered[position] ^= 0x80
        assert not generator.consume_reply(bytes(tampered), 0.0), position
    assert not generator.has_cookie(0.0)
    assert generator.consume_reply(reply, 0.0)


def test_wrong_type_or_length_refused(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    reply = checker.create_reply(msg, 1, ADDR, 0.0)
    wrong_type = bytes([constants.MSG_TRANSPORT]) + reply[1:]
    assert parse_cookie_reply_index(wrong_type) is None
    assert not generator.consume_reply(wrong_type, 0.0)
    assert parse_cookie_reply_index(reply[:-1]) is None
    assert not generator.consume_reply(reply[:-1], 0.0)
    assert not generator.consume_reply(reply + b"\0", 0.0)
    assert generator.consume_reply(reply, 0.0)


def test_reply_for_a_different_mac1_refused(
    checker: CookieChecker, generator: CookieGenerator
) -> None:
    first = generator.add_macs(BODY, 0.0)
    reply_to_first = checker.create_reply(first, 1, ADDR, 0.0)
    generator.add_macs(BODY + b"x", 0.0)  # a newer message: a different mac1
    assert not generator.consume_reply(reply_to_first, 0.0)
    assert not generator.has_cookie(0.0)


def test_reply_before_sending_anything_refused(
    checker: CookieChecker, generator: CookieGenerator, responder_public: bytes
) -> None:
    msg = CookieGenerator(responder_public).add_macs(BODY, 0.0)
    reply = checker.create_reply(msg, 1, ADDR, 0.0)
    assert not generator.consume_reply(reply, 0.0)


def test_reply_from_another_responder_refused(generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    stranger = crypto.x25519_public_from_private(crypto.x25519_generate_private())
    reply = CookieChecker(stranger, crypto.random_bytes).create_reply(msg, 1, ADDR, 0.0)
    assert not generator.consume_reply(reply, 0.0)


def test_reply_is_consumed_once(checker: CookieChecker, generator: CookieGenerator) -> None:
    msg = generator.add_macs(BODY, 0.0)
    reply = checker.create_reply(msg, 1, ADDR, 0.0)
    assert generator.consume_reply(reply, 0.0)
    assert not generator.consume_reply(reply, 100.0)  # a replay cannot refresh the cookie
    assert not generator.has_cookie(constants.COOKIE_LIFETIME_S)


def test_create_reply_rejects_misuse(checker: CookieChecker) -> None:
    with pytest.raises(LocalProtocolError):
        checker.create_reply(bytes(MACS_BYTES - 1), 1, ADDR, 0.0)
    with pytest.raises(LocalProtocolError):
        checker.create_reply(bytes(64), 2**32, ADDR, 0.0)
    with pytest.raises(LocalProtocolError):
        checker.create_reply(bytes(64), -1, ADDR, 0.0)


def test_repr_hides_keys(checker: CookieChecker, generator: CookieGenerator) -> None:
    assert "redacted" in repr(checker)
    assert "redacted" in repr(generator)


# --- addr_bytes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (("192.0.2.1", 443), bytes([192, 0, 2, 1, 0x01, 0xBB])),
        (("::1", 1), bytes(15) + b"\x01" + b"\x00\x01"),
        (("fe80::1%eth0", 2), bytes.fromhex("fe80" + "00" * 13 + "01") + b"\x00\x02"),
        (("example.test", 65535), b"example.test\xff\xff"),
        (("0.0.0.0", 0), bytes(6)),
    ],
)
def test_addr_bytes(addr: tuple[str, int], expected: bytes) -> None:
    assert addr_bytes(addr) == expected


@pytest.mark.parametrize("port", [-1, 65536])
def test_addr_bytes_rejects_bad_port(port: int) -> None:
    with pytest.raises(LocalProtocolError):
        addr_bytes(("192.0.2.1", port))


# --- robustness against arbitrary input -----------------------------------------------

RESPONDER = crypto.x25519_public_from_private(bytes(range(32)))


@given(reply=st.one_of(st.binary(max_size=128), st.binary(min_size=61, max_size=61)))
def test_consume_reply_never_raises(reply: bytes) -> None:
    generator = CookieGenerator(RESPONDER)
    generator.add_macs(BODY, 0.0)
    assert not generator.consume_reply(reply, 0.0)
    assert parse_cookie_reply_index(reply) in (
        None,
        int.from_bytes(reply[1:5], "big"),
    )


@given(
    reply_tail=st.binary(min_size=60, max_size=60),
)
def test_consume_reply_with_right_type_byte_never_raises(reply_tail: bytes) -> None:
    generator = CookieGenerator(RESPONDER)
    generator.add_macs(BODY, 0.0)
    assert not generator.consume_reply(bytes([constants.MSG_COOKIE_REPLY]) + reply_tail, 0.0)


@given(msg=st.binary(max_size=300), now=st.floats(allow_nan=False, allow_infinity=False))
def test_checks_never_raise(msg: bytes, now: float) -> None:
    checker = CookieChecker(RESPONDER, crypto.random_bytes)
    assert not checker.check_mac1(msg)
    assert not checker.check_mac2(msg, ADDR, now)
    # With a secret drawn too, mac2 of random bytes still does not verify.
    checker.create_reply(bytes(64), 1, ADDR, 0.0)
    assert not checker.check_mac2(msg, ADDR, now)
