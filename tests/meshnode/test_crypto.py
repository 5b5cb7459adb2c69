"""meshnode.crypto: known-answer tests from the RFCs, cross-checks, and "never raises" rules."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from meshnode import crypto

RandomBytes = Callable[[int], bytes]  # the `random_bytes` fixture (tests/conftest.py)

# --- Ed25519 ---------------------------------------------------------------------------

# RFC 8032 §7.1, TEST 1 (empty message).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_ed25519_rfc8032_test_1() -> None:
    assert crypto.ed25519_public_from_seed(RFC8032_SEED) == RFC8032_PUBLIC
    assert crypto.ed25519_sign(RFC8032_SEED, b"") == RFC8032_SIGNATURE
    assert crypto.ed25519_verify(RFC8032_PUBLIC, b"", RFC8032_SIGNATURE) is True


def test_ed25519_sign_verify(random_bytes: RandomBytes) -> None:
    seed = random_bytes(crypto.ED25519_SEED_BYTES)
    public = crypto.ed25519_public_from_seed(seed)
    message = b"descriptor v7"
    signature = crypto.ed25519_sign(seed, message)
    assert len(public) == crypto.ED25519_PUBLIC_BYTES
    assert len(signature) == crypto.ED25519_SIGNATURE_BYTES
    assert crypto.ed25519_verify(public, message, signature) is True
    # Ed25519 is deterministic: same seed and message, same signature.
    assert crypto.ed25519_sign(seed, message) == signature


def test_ed25519_verify_false_for_wrong_key(random_bytes: RandomBytes) -> None:
    seed, other = random_bytes(32), random_bytes(32)
    signature = crypto.ed25519_sign(seed, b"m")
    assert crypto.ed25519_verify(crypto.ed25519_public_from_seed(other), b"m", signature) is False


def test_ed25519_verify_false_for_tampered_message_or_signature(random_bytes: RandomBytes) -> None:
    seed = random_bytes(32)
    public = crypto.ed25519_public_from_seed(seed)
    signature = crypto.ed25519_sign(seed, b"pay 10")
    assert crypto.ed25519_verify(public, b"pay 11", signature) is False
    assert crypto.ed25519_verify(public, b"pay 10\0", signature) is False
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert crypto.ed25519_verify(public, b"pay 10", flipped) is False


@pytest.mark.parametrize(
    ("key_len", "sig_len"), [(0, 64), (31, 64), (33, 64), (32, 0), (32, 63), (32, 65)]
)
def test_ed25519_verify_false_for_bad_lengths(key_len: int, sig_len: int) -> None:
    public = RFC8032_PUBLIC.ljust(key_len, b"\0")[:key_len]
    signature = RFC8032_SIGNATURE.ljust(sig_len, b"\0")[:sig_len]
    assert crypto.ed25519_verify(public, b"", signature) is False


@pytest.mark.parametrize("public", [b"\0" * 32, b"\xff" * 32, bytes([1]) + b"\0" * 31])
def test_ed25519_verify_false_for_degenerate_keys(public: bytes) -> None:
    assert crypto.ed25519_verify(public, b"", RFC8032_SIGNATURE) is False


@given(st.binary(max_size=40), st.binary(max_size=80), st.binary(max_size=80))
def test_ed25519_verify_never_raises(public: bytes, message: bytes, signature: bytes) -> None:
    assert crypto.ed25519_verify(public, message, signature) is False


def test_ed25519_generate_seed_is_fresh() -> None:
    a, b = crypto.ed25519_generate_seed(), crypto.ed25519_generate_seed()
    assert len(a) == len(b) == crypto.ED25519_SEED_BYTES
    assert a != b


# --- X25519 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("private_hex", "public_hex"),
    [
        # RFC 7748 §6.1: Alice, then Bob.
        (
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        ),
        (
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        ),
    ],
)
def test_x25519_public_rfc7748(private_hex: str, public_hex: str) -> None:
    public = crypto.x25519_public_from_private(bytes.fromhex(private_hex))
    assert public == bytes.fromhex(public_hex)


def test_x25519_generate_private_is_fresh() -> None:
    a, b = crypto.x25519_generate_private(), crypto.x25519_generate_private()
    assert len(a) == len(b) == crypto.X25519_KEY_BYTES
    assert a != b
    assert len(crypto.x25519_public_from_private(a)) == crypto.X25519_KEY_BYTES


# --- Hashing and MACs ------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 20, 32, 64])
def test_hash_bytes_size(size: int) -> None:
    digest = crypto.hash_bytes(b"abc", size=size)
    assert len(digest) == size
    assert digest == hashlib.blake2b(b"abc", digest_size=size).digest()


def test_hash_bytes_default_is_blake2b_256() -> None:
    assert crypto.hash_bytes(b"") == hashlib.blake2b(b"", digest_size=32).digest()


def test_hash_bytes_sizes_are_not_truncations() -> None:
    # BLAKE2b's output length is a parameter of the hash, not a truncation.
    assert crypto.hash_bytes(b"x", size=20) != crypto.hash_bytes(b"x", size=32)[:20]


def test_hash_bytes_personalisation() -> None:
    plain = crypto.hash_bytes(b"data")
    a = crypto.hash_bytes(b"data", person=b"meshnode-a")
    b = crypto.hash_bytes(b"data", person=b"meshnode-b")
    assert len({plain, a, b}) == 3
    # Short personalisations are zero-padded to 16 bytes, as hashlib does.
    assert a == hashlib.blake2b(b"data", digest_size=32, person=b"meshnode-a").digest()
    full = b"0123456789abcdef"
    assert (
        crypto.hash_bytes(b"data", person=full)
        == hashlib.blake2b(b"data", digest_size=32, person=full).digest()
    )


def test_mac_is_keyed_blake2b(random_bytes: RandomBytes) -> None:
    key = random_bytes(32)
    tag = crypto.mac(key, b"mac1 input")
    assert len(tag) == crypto.MAC_BYTES
    assert tag == hashlib.blake2b(b"mac1 input", digest_size=16, key=key).digest()
    assert crypto.mac(key, b"mac1 input") == tag
    assert crypto.mac(random_bytes(32), b"mac1 input") != tag
    assert crypto.mac(key, b"mac1 inpuT") != tag
    assert crypto.mac(key, b"mac1 input") != crypto.hash_bytes(b"mac1 input", size=16)


def test_mac_size(random_bytes: RandomBytes) -> None:
    key = random_bytes(16)
    assert len(crypto.mac(key, b"x", size=32)) == 32


def test_constant_time_equal() -> None:
    assert crypto.constant_time_equal(b"abc", b"abc") is True
    assert crypto.constant_time_equal(b"abc", b"abd") is False
    assert crypto.constant_time_equal(b"abc", b"ab") is False
    assert crypto.constant_time_equal(b"", b"") is True


def test_random_bytes() -> None:
    assert len(crypto.random_bytes(0)) == 0
    assert len(crypto.random_bytes(33)) == 33
    assert crypto.random_bytes(16) != crypto.random_bytes(16)


# --- XChaCha20-Poly1305 ----------------------------------------------------------------


def test_xaead_round_trip(random_bytes: RandomBytes) -> None:
    key, nonce = random_bytes(32), random_bytes(crypto.XAEAD_NONCE_BYTES)
    sealed = crypto.xaead_seal(key, nonce, b"cookie", b"mac1")
    assert len(sealed) == len(b"cookie") + crypto.AEAD_TAG_BYTES
    assert b"cookie" not in sealed
    assert crypto.xaead_open(key, nonce, sealed, b"mac1") == b"cookie"
    assert crypto.xaead_open(key, nonce, crypto.xaead_seal(key, nonce, b"", b""), b"") == b""


def test_xaead_open_returns_none_on_tamper(random_bytes: RandomBytes) -> None:
    key, nonce = random_bytes(32), random_bytes(24)
    sealed = crypto.xaead_seal(key, nonce, b"cookie", b"mac1")
    for i in range(len(sealed)):
        tampered = sealed[:i] + bytes([sealed[i] ^ 0x80]) + sealed[i + 1 :]
        assert crypto.xaead_open(key, nonce, tampered, b"mac1") is None
    assert crypto.xaead_open(key, nonce, sealed, b"mac2") is None
    assert crypto.xaead_open(random_bytes(32), nonce, sealed, b"mac1") is None
    assert crypto.xaead_open(key, random_bytes(24), sealed, b"mac1") is None
    assert crypto.xaead_open(key, nonce, sealed[:-1], b"mac1") is None
    assert crypto.xaead_open(key, nonce, sealed + b"\0", b"mac1") is None


@pytest.mark.parametrize(
    ("key_len", "nonce_len", "ct_len"), [(32, 24, 0), (32, 24, 15), (31, 24, 20), (32, 12, 20)]
)
def test_xaead_open_never_raises_on_bad_lengths(key_len: int, nonce_len: int, ct_len: int) -> None:
    assert crypto.xaead_open(b"k" * key_len, b"n" * nonce_len, b"c" * ct_len, b"") is None


# --- TransportCipher (ChaCha20-Poly1305, Noise nonce layout) ---------------------------

# RFC 8439 §2.8.2 AEAD test vector. Its nonce is 07000000 || 4041424344454647, which
# TransportCipher's layout (4 zero bytes || LE64 counter) cannot express, so the vector
# checks the reference we cross-check against (`cryptography`'s ChaCha20Poly1305), and
# TransportCipher is then checked byte for byte against that reference.
RFC8439_KEY = bytes(range(0x80, 0xA0))
RFC8439_NONCE = bytes.fromhex("070000004041424344454647")
RFC8439_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC8439_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)
RFC8439_CIPHERTEXT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
RFC8439_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")


def test_reference_aead_matches_rfc8439() -> None:
    reference = ChaCha20Poly1305(RFC8439_KEY)
    sealed = reference.encrypt(RFC8439_NONCE, RFC8439_PLAINTEXT, RFC8439_AAD)
    assert sealed == RFC8439_CIPHERTEXT + RFC8439_TAG


@pytest.mark.parametrize("counter", [0, 1, 0x0102030405060708, 2**64 - 1])
def test_transport_cipher_matches_reference_with_noise_nonce(counter: int) -> None:
    nonce = b"\0" * 4 + counter.to_bytes(8, "little")
    expected = ChaCha20Poly1305(RFC8439_KEY).encrypt(nonce, RFC8439_PLAINTEXT, RFC8439_AAD)
    cipher = crypto.TransportCipher(RFC8439_KEY)
    assert cipher.seal(counter, RFC8439_PLAINTEXT, RFC8439_AAD) == expected
    assert cipher.open(counter, expected, RFC8439_AAD) == RFC8439_PLAINTEXT


def test_transport_cipher_round_trip(random_bytes: RandomBytes) -> None:
    cipher = crypto.TransportCipher(random_bytes(32))
    payload = random_bytes(1300)
    sealed = cipher.seal(7, payload, b"header")
    assert len(sealed) == len(payload) + crypto.AEAD_TAG_BYTES
    assert cipher.open(7, sealed, b"header") == payload
    # Explicit counters: datagrams may be opened out of order.
    later = cipher.seal(8, b"", b"")
    assert cipher.open(8, later, b"") == b""
    assert cipher.open(7, sealed, b"header") == payload


def test_transport_cipher_counter_is_in_the_nonce(random_bytes: RandomBytes) -> None:
    cipher = crypto.TransportCipher(random_bytes(32))
    assert cipher.seal(1, b"same", b"") != cipher.seal(2, b"same", b"")


def test_transport_cipher_open_returns_none(random_bytes: RandomBytes) -> None:
    key = random_bytes(32)
    cipher = crypto.TransportCipher(key)
    sealed = cipher.seal(42, b"cell", b"aad")
    assert cipher.open(41, sealed, b"aad") is None
    assert cipher.open(43, sealed, b"aad") is None
    assert cipher.open(42, sealed, b"aaD") is None
    assert cipher.open(42, sealed, b"") is None
    assert crypto.TransportCipher(random_bytes(32)).open(42, sealed, b"aad") is None
    for i in range(len(sealed)):
        tampered = sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :]
        assert cipher.open(42, tampered, b"aad") is None
    assert cipher.open(42, sealed[:-1], b"aad") is None
    assert cipher.open(42, b"", b"aad") is None
    assert cipher.open(42, b"x" * 15, b"aad") is None


def test_transport_cipher_directions_do_not_mix(random_bytes: RandomBytes) -> None:
    """Two keys (Noise's split): a datagram sealed for one direction never opens in the other."""
    send, recv = crypto.TransportCipher(random_bytes(32)), crypto.TransportCipher(random_bytes(32))
    assert recv.open(0, send.seal(0, b"x", b""), b"") is None


# --- Primitives for onion layers ---------------------------------------------------------


def test_chacha20_matches_rfc8439_section_2_4_2() -> None:
    key = bytes(range(32))
    nonce = bytes.fromhex("000000000000004a00000000")
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    expected = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )
    assert crypto.chacha20_xor(key, nonce, plaintext, counter=1) == expected
    stream = crypto.chacha20_stream(key, nonce, len(plaintext), counter=1)
    assert bytes(a ^ b for a, b in zip(plaintext, stream, strict=True)) == expected


def test_aead_ciphertext_is_the_counter_1_keystream_then_the_tag() -> None:
    key, nonce, plaintext = bytes([7]) * 32, bytes([9]) * 12, bytes(range(200))
    sealed = crypto.Aead(key).seal(nonce, plaintext, b"ad")
    assert len(sealed) == len(plaintext) + crypto.AEAD_TAG_BYTES
    assert sealed[:200] == crypto.chacha20_xor(key, nonce, plaintext, counter=1)
    assert crypto.Aead(key).open(nonce, sealed, b"ad") == plaintext
    assert crypto.Aead(key).open(nonce, sealed, b"other") is None
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    assert crypto.Aead(key).open(nonce, tampered, b"ad") is None
    assert crypto.Aead(key).open(nonce, b"short", b"ad") is None


def test_x25519_shared_agrees_and_refuses_unusable_keys() -> None:
    a, b = bytes([1]) * 32, bytes([2]) * 32
    pa, pb = crypto.x25519_public_from_private(a), crypto.x25519_public_from_private(b)
    assert crypto.x25519_shared(a, pb) == crypto.x25519_shared(b, pa) is not None
    assert crypto.x25519_shared(a, bytes(32)) is None  # low order: all-zero secret
    assert crypto.x25519_shared(a, b"short") is None


def test_kdf_labels_give_independent_keys_and_sizes_are_checked() -> None:
    secret = bytes(range(32))
    assert crypto.kdf(secret, b"a") != crypto.kdf(secret, b"b")
    assert len(crypto.kdf(secret, b"a", size=16)) == 16
    with pytest.raises(ValueError):
        crypto.kdf(b"short", b"a")
    with pytest.raises(ValueError):
        crypto.kdf(secret, b"a", size=65)
