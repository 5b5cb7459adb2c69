"""Contact strings: how one node tells another where it is and which link key it has.

Format: ``HOST:PORT#KEY`` where HOST is an IPv4 literal, a bracketed IPv6 literal
(``[::1]``) or a DNS name, PORT is 1-65535 and KEY is the node's X25519 link public key
in lowercase base32 without padding (52 characters). Example::

    127.10.0.1:7000#u2ffv6sq5hxygd6u4tp6wsxwktk4n4q5zgxkjm3tyrxqohhuqabq

Not here: resolving names (the CLI/driver does that), sockets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from meshnode.crypto import x25519_public_is_usable
from meshnode.errors import ContactError, DecodeError
from meshnode.identity import b32decode, b32encode

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


_PORT = re.compile(r"[0-9]{1,5}")


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[V6]:PORT`` into (host, port); validates both."""
    text = text.strip()
    if not text:
        raise ContactError("empty address (expected HOST:PORT)")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ContactError(f"{text!r}: missing ']' after IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            if "%" in host:  # zone ids are only meaningful on one machine: refuse them
                raise ValueError(host)
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ContactError(f"{text!r}: {host!r} is not an IPv6 address") from None
        if rest.startswith(":"):
            port_text: str | None = rest[1:]
        elif rest == "":
            port_text = None
        else:
            raise ContactError(f"{text!r}: expected ':PORT' after ']'")
    else:
        if text.count(":") > 1:
            raise ContactError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:7000")
        host, sep, port_text_raw = text.partition(":")
        port_text = port_text_raw if sep else None
        if not _is_host(host):
            raise ContactError(f"{text!r}: {host!r} is not an IP address or host name")
    if port_text is None:
        if default_port is None:
            raise ContactError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ContactError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def _is_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host)) and not host.replace(".", "").isdigit()
    return True


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Contact:
    """Where a node listens and the link key it answers handshakes with."""

    host: str
    port: int
    static_key: bytes

    @classmethod
    def parse(cls, text: str) -> Contact:
        """Parse ``HOST:PORT#KEY``; raises :class:`ContactError` naming what is wrong."""
        if not isinstance(text, str):
            raise ContactError("contact must be text")
        addr, sep, key = text.strip().rpartition("#")
        if not sep:
            raise ContactError(f"{text!r}: expected HOST:PORT#KEY (the key is missing)")
        host, port = parse_hostport(addr)
        try:
            static_key = b32decode(key, length=32, what="contact key")
        except DecodeError as exc:
            raise ContactError(f"{text!r}: {exc}") from None
        if not x25519_public_is_usable(static_key):
            raise ContactError(f"{text!r}: contact key is not a usable X25519 public key")
        return cls(host=host, port=port, static_key=static_key)

    def __str__(self) -> str:
        return f"{format_hostport(self.host, self.port)}#{b32encode(self.static_key)}"
