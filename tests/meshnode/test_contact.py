"""meshnode.contact: ``HOST:PORT#KEY`` parsing, formatting and its error messages."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meshnode.contact import Contact, format_hostport, parse_hostport
from meshnode.crypto import x25519_public_is_usable
from meshnode.errors import ContactError, DecodeError
from meshnode.identity import b32encode

KEY = bytes(range(32))
KEY_TEXT = b32encode(KEY)


# --- Round trips -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        (f"127.10.0.1:7000#{KEY_TEXT}", "127.10.0.1", 7000),
        (f"0.0.0.0:1#{KEY_TEXT}", "0.0.0.0", 1),
        (f"[::1]:7000#{KEY_TEXT}", "::1", 7000),
        (f"[2001:db8::1]:65535#{KEY_TEXT}", "2001:db8::1", 65535),
        (f"[::ffff:192.0.2.1]:443#{KEY_TEXT}", "::ffff:192.0.2.1", 443),
        (f"localhost:7000#{KEY_TEXT}", "localhost", 7000),
        (f"node-1.example.org:8443#{KEY_TEXT}", "node-1.example.org", 8443),
        (f"node.example.org.:8443#{KEY_TEXT}", "node.example.org.", 8443),
        (f"1e100.net:80#{KEY_TEXT}", "1e100.net", 80),
    ],
)
def test_parse_format_round_trip(text: str, host: str, port: int) -> None:
    contact = Contact.parse(text)
    assert contact == Contact(host=host, port=port, static_key=KEY)
    assert str(contact) == text
    assert Contact.parse(str(contact)) == contact


def test_parse_strips_surrounding_whitespace() -> None:
    assert Contact.parse(f"  127.0.0.1:7000#{KEY_TEXT}\n") == Contact(
        host="127.0.0.1", port=7000, static_key=KEY
    )


def test_format_hostport_brackets_ipv6_only() -> None:
    assert format_hostport("::1", 7) == "[::1]:7"
    assert format_hostport("10.0.0.1", 7) == "10.0.0.1:7"
    assert format_hostport("example.org", 7) == "example.org:7"


def test_parse_hostport_default_port() -> None:
    assert parse_hostport("example.org", default_port=7000) == ("example.org", 7000)
    assert parse_hostport("[::1]", default_port=7000) == ("::1", 7000)
    assert parse_hostport("example.org:1", default_port=7000) == ("example.org", 1)
    with pytest.raises(ContactError, match="missing ':PORT'"):
        parse_hostport("example.org")


# --- Errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"expected HOST:PORT#KEY \(the key is missing\)"),
        ("   ", r"expected HOST:PORT#KEY"),
        ("127.0.0.1:7000", r"expected HOST:PORT#KEY \(the key is missing\)"),
        (f"#{KEY_TEXT}", "empty address"),
        ("127.0.0.1:7000#", "contact key is not base32"),
        ("127.0.0.1:7000#not-a-key!", "contact key is not base32"),
        ("127.0.0.1:7000#" + "0" * 52, "contact key is not base32"),
        ("127.0.0.1:7000#" + b32encode(KEY[:31]), "contact key must be 32 bytes, got 31"),
        ("127.0.0.1:7000#" + b32encode(KEY + b"\0"), "contact key must be 32 bytes, got 33"),
        (f"127.0.0.1:0#{KEY_TEXT}", "port must be a number from 1 to 65535"),
        (f"127.0.0.1:65536#{KEY_TEXT}", "port must be a number from 1 to 65535"),
        (f"127.0.0.1:x#{KEY_TEXT}", "port must be a number from 1 to 65535"),
        (f"127.0.0.1:-1#{KEY_TEXT}", "port must be a number from 1 to 65535"),
        (f"127.0.0.1:#{KEY_TEXT}", "port must be a number from 1 to 65535"),
        (f"127.0.0.1:99999999999999999999#{KEY_TEXT}", "port must be a number"),
        (f"127.0.0.1#{KEY_TEXT}", "missing ':PORT'"),
        (f"::1:7000#{KEY_TEXT}", r"write IPv6 addresses in brackets, e\.g\. \[::1\]:7000"),
        (f"2001:db8::1#{KEY_TEXT}", "write IPv6 addresses in brackets"),
        (f"[::1:7000#{KEY_TEXT}", "missing ']' after IPv6 address"),
        (f"[127.0.0.1]:7000#{KEY_TEXT}", "'127.0.0.1' is not an IPv6 address"),
        (f"[::1]7000#{KEY_TEXT}", r"expected ':PORT' after '\]'"),
        (f"[::1]#{KEY_TEXT}", "missing ':PORT'"),
        (f"exa mple.org:7000#{KEY_TEXT}", "'exa mple.org' is not an IP address or host name"),
        (f"-bad.org:7000#{KEY_TEXT}", "is not an IP address or host name"),
        (f"a..b:7000#{KEY_TEXT}", "is not an IP address or host name"),
        (f"{'a' * 64}.org:7000#{KEY_TEXT}", "is not an IP address or host name"),
        (f"256.1.1.1:7000#{KEY_TEXT}", "is not an IP address or host name"),
        (f"1.2.3:7000#{KEY_TEXT}", "is not an IP address or host name"),
        (f"12345:7000#{KEY_TEXT}", "is not an IP address or host name"),
        (f":7000#{KEY_TEXT}", "is not an IP address or host name"),
    ],
)
def test_parse_errors_are_helpful(text: str, match: str) -> None:
    with pytest.raises(ContactError, match=match):
        Contact.parse(text)


def test_errors_quote_the_input() -> None:
    text = f"127.0.0.1:0#{KEY_TEXT}"
    with pytest.raises(ContactError) as info:
        Contact.parse(text)
    assert "127.0.0.1:0" in str(info.value)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(ContactError, match="must be text"):
        Contact.parse(b"127.0.0.1:7000#abc")  # type: ignore[arg-type]


def test_contact_error_is_a_decode_error() -> None:
    # Drivers catch DecodeError for everything that came from outside.
    assert issubclass(ContactError, DecodeError)


# --- Regressions: non-ASCII digits in ports, whitespace/zone ids in hosts ---------------


@pytest.mark.parametrize("port", ["\u00b2", "\u00b9\u00b2", "\u0668\u0660", "\uff18\uff10"])
def test_port_must_be_ascii_digits(port: str) -> None:
    with pytest.raises(ContactError, match="port must be a number"):
        Contact.parse(f"127.0.0.1:{port}#{KEY_TEXT}")


@pytest.mark.parametrize("host", ["example.org\n", "[::1%eth0\n]", "[::1%a b]", "[::1%\x00]"])
def test_host_rejects_whitespace_and_control_characters(host: str) -> None:
    with pytest.raises(ContactError):
        Contact.parse(f"{host}:7000#{KEY_TEXT}")


# --- Properties ------------------------------------------------------------------------

_LABEL = r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
hostnames = st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,3}}\.?", fullmatch=True).filter(
    lambda h: not h.replace(".", "").isdigit()
)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    hostnames,
    hostnames.map(str.upper),
)
contacts = st.builds(
    Contact,
    host=hosts,
    port=st.integers(min_value=1, max_value=65535),
    static_key=st.binary(min_size=32, max_size=32).filter(x25519_public_is_usable),
)


@given(contacts)
def test_parse_str_round_trip(contact: Contact) -> None:
    text = str(contact)
    assert Contact.parse(text) == contact
    assert str(Contact.parse(text)) == text
    if ":" in contact.host:
        assert ipaddress.IPv6Address(contact.host)
        assert text.startswith(f"[{contact.host}]:")


def parse_or_error(text: str) -> Contact | None:
    """The property: a Contact or a ContactError, never another exception."""
    try:
        contact = Contact.parse(text)
    except ContactError as exc:
        assert str(exc)  # every error says something
        return None
    assert 1 <= contact.port <= 65535
    assert len(contact.static_key) == 32
    return contact


# A contact-shaped alphabet reaches the deeper branches far more often than st.text().
_CONTACT_CHARS = st.sampled_from([*"0123456789abcdefz.:[]#%- \n", "\u00b2", "\u0668"])
contact_like = st.builds(
    lambda host, port, key: f"{host}:{port}#{key}",
    st.one_of(hosts, st.text(_CONTACT_CHARS, max_size=12), st.text(max_size=12)),
    st.one_of(st.integers(-1, 70000).map(str), st.text(_CONTACT_CHARS, max_size=6)),
    st.one_of(
        st.binary(min_size=30, max_size=34).map(b32encode),
        st.text(_CONTACT_CHARS, max_size=60),
    ),
)


@given(st.text())
def test_parse_arbitrary_text_returns_contact_or_contact_error(text: str) -> None:
    parse_or_error(text)


@given(st.one_of(contact_like, st.text(_CONTACT_CHARS, max_size=80)))
@example(f"[::1]:7000#{KEY_TEXT}")
@example(f"#{KEY_TEXT}")
@example("###")
@example(f"127.0.0.1:\u00b2#{KEY_TEXT}")
def test_parse_contact_like_text_returns_contact_or_contact_error(text: str) -> None:
    contact = parse_or_error(text)
    if contact is not None:
        assert Contact.parse(str(contact)) == contact


@pytest.mark.parametrize(
    "key",
    [
        bytes(32),  # the identity point: every DH with it is all zeros
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_low_order_contact_key_refused(key: bytes) -> None:
    with pytest.raises(ContactError, match="not a usable X25519 public key"):
        Contact.parse(f"127.0.0.1:7000#{b32encode(key)}")
