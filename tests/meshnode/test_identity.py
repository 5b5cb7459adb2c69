"""meshnode.identity: node ids, link-key binding, base32 text, key files and their modes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnode import crypto
from meshnode.errors import DecodeError, IdentityError, IdentityExistsError
from meshnode.identity import (
    IDENTITY_FILE,
    LINK_CERT_CONTEXT,
    NODE_ID_BYTES,
    Identity,
    b32decode,
    b32encode,
    default_home,
    identity_path,
    link_cert_message,
    load_identity,
    node_id_for,
    save_identity,
    verify_link_binding,
)

Identities = tuple[Identity, ...]  # the `identities` fixture (tests/conftest.py)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- Node ids and keys -----------------------------------------------------------------


def test_node_id_is_personalised_blake2b_160(identities: Identities) -> None:
    for ident in identities:
        assert len(ident.node_id) == NODE_ID_BYTES == 20
        expected = hashlib.blake2b(
            ident.identity_public, digest_size=20, person=b"meshnode-nodeid"
        ).digest()
        assert ident.node_id == expected
        assert node_id_for(ident.identity_public) == expected
        # Personalised: not the plain BLAKE2b-160 of the key.
        assert ident.node_id != hashlib.blake2b(ident.identity_public, digest_size=20).digest()


def test_identities_are_distinct_and_deterministic(identities: Identities) -> None:
    assert len({i.node_id for i in identities}) == len(identities)
    assert len({i.link_public for i in identities}) == len(identities)
    again = Identity(
        identity_seed=identities[0].identity_seed, link_private=identities[0].link_private
    )
    assert again == identities[0]


def test_public_keys_derive_from_private(identities: Identities) -> None:
    ident = identities[0]
    assert ident.identity_public == crypto.ed25519_public_from_seed(ident.identity_seed)
    assert ident.link_public == crypto.x25519_public_from_private(ident.link_private)
    # The link key is a key pair of its own, never the identity key converted.
    assert ident.link_public != ident.identity_public


def test_generate() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a.node_id != b.node_id
    assert verify_link_binding(a.identity_public, a.link_public, a.link_signature)


@pytest.mark.parametrize(("seed_len", "link_len"), [(31, 32), (33, 32), (32, 0), (32, 64)])
def test_wrong_key_lengths_are_identity_errors(seed_len: int, link_len: int) -> None:
    with pytest.raises(IdentityError, match="32 bytes"):
        Identity(identity_seed=b"s" * seed_len, link_private=b"l" * link_len)


def test_sign_verifies_under_identity_key(identities: Identities) -> None:
    ident = identities[1]
    signature = ident.sign(b"descriptor")
    assert crypto.ed25519_verify(ident.identity_public, b"descriptor", signature)
    assert not crypto.ed25519_verify(identities[2].identity_public, b"descriptor", signature)


# --- Link-key binding ------------------------------------------------------------------


def test_link_binding_verifies(identities: Identities) -> None:
    for ident in identities:
        assert verify_link_binding(ident.identity_public, ident.link_public, ident.link_signature)


def test_link_binding_fails_for_another_link_key(identities: Identities) -> None:
    a, b = identities[0], identities[1]
    assert not verify_link_binding(a.identity_public, b.link_public, a.link_signature)


def test_link_binding_fails_for_another_identity(identities: Identities) -> None:
    a, b = identities[0], identities[1]
    assert not verify_link_binding(b.identity_public, a.link_public, a.link_signature)
    assert not verify_link_binding(b.identity_public, a.link_public, b.link_signature)


def test_link_binding_is_domain_separated(identities: Identities) -> None:
    """A signature over the bare link key (or another context) is not a binding."""
    ident = identities[0]
    assert link_cert_message(ident.link_public) == LINK_CERT_CONTEXT + ident.link_public
    bare = ident.sign(ident.link_public)
    assert not verify_link_binding(ident.identity_public, ident.link_public, bare)


def test_link_binding_never_raises_on_garbage(identities: Identities) -> None:
    ident = identities[0]
    assert not verify_link_binding(b"", ident.link_public, ident.link_signature)
    assert not verify_link_binding(ident.identity_public, ident.link_public, b"")
    assert not verify_link_binding(ident.identity_public, ident.link_public, b"\0" * 64)


# --- repr ------------------------------------------------------------------------------


def test_repr_hides_secrets(identities: Identities) -> None:
    ident = identities[0]
    for text in (repr(ident), str(ident), f"{ident}", f"{[ident]}"):
        assert b32encode(ident.node_id) in text
        for secret in (ident.identity_seed, ident.link_private):
            assert b32encode(secret) not in text
            assert secret.hex() not in text
            assert repr(secret) not in text
            assert b32encode(secret)[:16] not in text


# --- base32 ----------------------------------------------------------------------------


def test_b32_lengths_and_alphabet(identities: Identities) -> None:
    ident = identities[0]
    key_text = b32encode(ident.link_public)
    id_text = b32encode(ident.node_id)
    assert len(key_text) == 52
    assert len(id_text) == 32
    for text in (key_text, id_text):
        assert "=" not in text
        assert set(text) <= set("abcdefghijklmnopqrstuvwxyz234567")


@given(st.binary(max_size=64))
def test_b32_round_trip(data: bytes) -> None:
    text = b32encode(data)
    assert text == text.lower()
    assert "=" not in text
    if data:
        assert b32decode(text, length=len(data)) == data


def test_b32decode_tolerates_surrounding_whitespace() -> None:
    text = b32encode(b"k" * 32)
    assert b32decode(f"  {text}\n", length=32) == b"k" * 32


@pytest.mark.parametrize("length", [31, 33, 20])
def test_b32decode_wrong_length(length: int) -> None:
    with pytest.raises(DecodeError, match=rf"link key must be {length} bytes, got 32"):
        b32decode(b32encode(b"k" * 32), length=length, what="link key")


@pytest.mark.parametrize(
    "text",
    [
        "0" * 52,  # 0, 1, 8, 9 are not in RFC 4648 base32
        "1" + "a" * 51,
        "8" * 52,
        "a" * 51 + "!",
        "a" * 26 + " " + "a" * 25,
        "a" * 52 + "====",  # we never write padding
        "é" * 52,
    ],
)
def test_b32decode_not_base32(text: str) -> None:
    with pytest.raises(DecodeError, match="contact key is not base32"):
        b32decode(text, length=32, what="contact key")


@pytest.mark.parametrize("text", ["a", "abc", "abcdef"])
def test_b32decode_impossible_length_is_decode_error(text: str) -> None:
    with pytest.raises(DecodeError):
        b32decode(text, length=32)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_b32decode_empty(text: str) -> None:
    with pytest.raises(DecodeError, match="not base32"):
        b32decode(text, length=32)


# --- Key files -------------------------------------------------------------------------


def test_save_identity_modes(tmp_path: Path, identities: Identities) -> None:
    home = tmp_path / "nested" / "home"
    path = save_identity(home, identities[0])
    assert path == identity_path(home) == home / IDENTITY_FILE
    assert mode_of(home) == 0o700
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in home.iterdir()) == [IDENTITY_FILE]  # no temp file left
    text = path.read_text(encoding="ascii")
    assert text.startswith("# meshnode identity v1: SECRET")
    assert f"node-id: {b32encode(identities[0].node_id)}\n" in text


def test_save_identity_modes_ignore_a_permissive_umask(
    tmp_path: Path, identities: Identities
) -> None:
    old = os.umask(0)
    try:
        path = save_identity(tmp_path / "home", identities[0])
    finally:
        os.umask(old)
    assert mode_of(path.parent) == 0o700
    assert mode_of(path) == 0o600


def test_save_identity_refuses_overwrite(tmp_path: Path, identities: Identities) -> None:
    path = save_identity(tmp_path, identities[0])
    before = path.read_bytes()
    with pytest.raises(IdentityExistsError, match="--force"):
        save_identity(tmp_path, identities[1])
    assert path.read_bytes() == before
    assert load_identity(tmp_path) == identities[0]


def test_save_identity_force_replaces(tmp_path: Path, identities: Identities) -> None:
    save_identity(tmp_path, identities[0])
    path = save_identity(tmp_path, identities[1], force=True)
    assert mode_of(path) == 0o600
    assert load_identity(tmp_path) == identities[1]


def test_identity_exists_error_is_an_identity_error() -> None:
    assert issubclass(IdentityExistsError, IdentityError)


def test_load_identity_round_trip(tmp_path: Path, identities: Identities) -> None:
    for i, ident in enumerate(identities):
        home = tmp_path / str(i)
        save_identity(home, ident)
        loaded = load_identity(home)
        assert loaded == ident
        assert loaded.node_id == ident.node_id
        assert loaded.link_signature == ident.link_signature


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610])
def test_load_identity_refuses_loose_mode(
    tmp_path: Path, identities: Identities, mode: int
) -> None:
    path = save_identity(tmp_path, identities[0])
    path.chmod(mode)
    with pytest.raises(IdentityError, match=r"chmod 600") as info:
        load_identity(tmp_path)
    assert str(path) in str(info.value)
    assert f"{mode:o}" in str(info.value)


def test_load_identity_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="meshnode init") as info:
        load_identity(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def write_key_file(home: Path, text: str | bytes) -> None:
    home.mkdir(mode=0o700, exist_ok=True)
    path = identity_path(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode("utf-8") if isinstance(text, str) else text)


SEED_LINE = "identity-seed: " + b32encode(b"s" * 32)
LINK_LINE = "link-private: " + b32encode(b"l" * 32)


def test_load_identity_reads_hand_written_file(tmp_path: Path) -> None:
    write_key_file(tmp_path, f"# comment\n\n  {SEED_LINE}  \n{LINK_LINE}\n")
    assert load_identity(tmp_path) == Identity(identity_seed=b"s" * 32, link_private=b"l" * 32)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "missing field 'identity-seed'"),
        (f"{LINK_LINE}\n", "missing field 'identity-seed'"),
        (f"{SEED_LINE}\n", "missing field 'link-private'"),
        (f"{SEED_LINE}\n{LINK_LINE}\njunk without a colon\n", "malformed line"),
        (f"identity-seed: not*base32\n{LINK_LINE}\n", "identity-seed is not base32"),
        (
            f"identity-seed: {b32encode(b's' * 31)}\n{LINK_LINE}\n",
            "identity-seed must be 32 bytes",
        ),
        (f"{SEED_LINE}\nlink-private:\n", "link-private is not base32"),
        ("identity-seed: é\n".encode("latin-1"), "cannot read"),
    ],
)
def test_load_identity_malformed(tmp_path: Path, text: str | bytes, match: str) -> None:
    write_key_file(tmp_path, text)
    with pytest.raises(IdentityError, match=match):
        load_identity(tmp_path)


def test_load_identity_secrets_not_in_errors(tmp_path: Path) -> None:
    """A malformed file's error names the problem, not the (possibly valid) secret lines."""
    write_key_file(tmp_path, f"{SEED_LINE}\nlink-private: {b32encode(b'l' * 31)}\n")
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert b32encode(b"s" * 32) not in str(info.value)


# --- Home directory --------------------------------------------------------------------


def test_default_home_meshnode_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHNODE_HOME", str(tmp_path / "mh"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "mh"


def test_default_home_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MESHNODE_HOME", "~/node")
    assert default_home() == tmp_path / "node"


def test_default_home_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESHNODE_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "meshnode"


@pytest.mark.parametrize("empty", [None, ""])
def test_default_home_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty: str | None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MESHNODE_HOME", "XDG_CONFIG_HOME"):
        if empty is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, empty)
    assert default_home() == tmp_path / ".config" / "meshnode"
