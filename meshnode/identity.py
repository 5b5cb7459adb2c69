"""Node identity: an Ed25519 identity key, the X25519 link key it vouches for, the node id.

- node id = BLAKE2b-160 of the identity public key (personalised ``meshnode-nodeid``):
  160 bits, the Kademlia id space; a peer cannot pick its id without picking its key.
- link key: an X25519 key pair of its own (never the identity key converted), bound to
  the identity by ``link_signature = Ed25519(identity, LINK_CERT_CONTEXT || link_public)``.
  The signature travels inside the Noise handshake, so each side learns the other's
  identity and node id, authenticated by the link.
- Encoding everywhere: lowercase RFC 4648 base32 without padding (keys: 52 characters,
  node ids: 32).

Key files live in the node's home with mode 0600 (the home itself 0700). Not here:
config parsing (config.py), contact strings (contact.py).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NewType

from meshnode import crypto
from meshnode.errors import DecodeError, IdentityError, IdentityExistsError

NodeId = NewType("NodeId", bytes)

NODE_ID_BYTES = 20
NODE_ID_PERSON = b"meshnode-nodeid"
LINK_CERT_CONTEXT = b"meshnode/link-key/v1\0"
IDENTITY_FILE = "identity.key"
IDENTITY_FILE_HEADER = "# meshnode identity v1: SECRET. Anyone with this file can be this node."


def b32encode(data: bytes) -> str:
    """Lowercase base32 without padding: the one text encoding for keys and ids."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str, *, length: int, what: str = "key") -> bytes:
    """Decode :func:`b32encode` text that must yield exactly ``length`` bytes."""
    clean = text.strip()
    if not clean or any(c not in "abcdefghijklmnopqrstuvwxyz234567" for c in clean.lower()):
        raise DecodeError(f"{what} is not base32 text")
    padded = clean.upper() + "=" * (-len(clean) % 8)
    try:
        raw = base64.b32decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"{what} is not valid base32") from exc
    if len(raw) != length:
        raise DecodeError(f"{what} must be {length} bytes, got {len(raw)}")
    if b32encode(raw) != clean.lower():
        # One key, one spelling: refuse text whose unused trailing bits are not zero.
        raise DecodeError(f"{what} is not canonical base32")
    return raw


def node_id_for(identity_public: bytes) -> NodeId:
    """The node id of an identity public key."""
    return NodeId(crypto.hash_bytes(identity_public, size=NODE_ID_BYTES, person=NODE_ID_PERSON))


def link_cert_message(link_public: bytes) -> bytes:
    """What the identity key signs to vouch for a link key."""
    return LINK_CERT_CONTEXT + link_public


def verify_link_binding(identity_public: bytes, link_public: bytes, signature: bytes) -> bool:
    """True when ``signature`` binds ``link_public`` to ``identity_public``."""
    return crypto.ed25519_verify(identity_public, link_cert_message(link_public), signature)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Identity:
    """A node's long-term keys. ``repr`` never shows private material."""

    identity_seed: bytes
    link_private: bytes
    identity_public: bytes = field(init=False)
    link_public: bytes = field(init=False)
    link_signature: bytes = field(init=False)
    node_id: NodeId = field(init=False)

    def __post_init__(self) -> None:
        if len(self.identity_seed) != crypto.ED25519_SEED_BYTES:
            raise IdentityError("identity seed must be 32 bytes")
        if len(self.link_private) != crypto.X25519_KEY_BYTES:
            raise IdentityError("link private key must be 32 bytes")
        ipub = crypto.ed25519_public_from_seed(self.identity_seed)
        lpub = crypto.x25519_public_from_private(self.link_private)
        object.__setattr__(self, "identity_public", ipub)
        object.__setattr__(self, "link_public", lpub)
        object.__setattr__(
            self, "link_signature", crypto.ed25519_sign(self.identity_seed, link_cert_message(lpub))
        )
        object.__setattr__(self, "node_id", node_id_for(ipub))

    @classmethod
    def generate(cls) -> Identity:
        """Fresh keys from the OS CSPRNG."""
        return cls(
            identity_seed=crypto.ed25519_generate_seed(),
            link_private=crypto.x25519_generate_private(),
        )

    def sign(self, message: bytes) -> bytes:
        return crypto.ed25519_sign(self.identity_seed, message)

    def __repr__(self) -> str:
        return f"Identity(node_id={b32encode(self.node_id)})"


def default_home() -> Path:
    """``$MESHNODE_HOME``, else ``$XDG_CONFIG_HOME/meshnode``, else ``~/.config/meshnode``."""
    env = os.environ.get("MESHNODE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "meshnode"


def identity_path(home: Path) -> Path:
    return home / IDENTITY_FILE


def save_identity(home: Path, identity: Identity, *, force: bool = False) -> Path:
    """Write the identity file (0600) in ``home`` (made 0700); no overwrite without ``force``."""
    path = identity_path(home)
    if path.exists() and not force:
        raise IdentityExistsError(
            f"{path} already holds an identity; use --force to replace it (the old node id is lost)"
        )
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        text = (
            f"{IDENTITY_FILE_HEADER}\n"
            f"node-id: {b32encode(identity.node_id)}\n"
            f"identity-seed: {b32encode(identity.identity_seed)}\n"
            f"link-private: {b32encode(identity.link_private)}\n"
        )
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def load_identity(home: Path) -> Identity:
    """Read the identity file from ``home``; refuses files readable by group or others."""
    path = identity_path(home)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"no identity in {home} (run `meshnode init --home {home}` first)"
        ) from None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from exc
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise IdentityError(f"{path}: malformed line (expected 'name: value')")
        fields[name.strip()] = value.strip()
    try:
        seed = b32decode(fields["identity-seed"], length=32, what="identity-seed")
        link = b32decode(fields["link-private"], length=32, what="link-private")
    except KeyError as exc:
        raise IdentityError(f"{path}: missing field {exc.args[0]!r}") from None
    except DecodeError as exc:
        raise IdentityError(f"{path}: {exc}") from None
    identity = Identity(identity_seed=seed, link_private=link)
    recorded = fields.get("node-id")
    if recorded is not None and recorded != b32encode(identity.node_id):
        raise IdentityError(f"{path}: node-id does not match the keys (file edited or corrupted)")
    return identity
