"""Node configuration: config.toml plus command-line overrides -> one frozen NodeConfig.

The file has three tables::

    [node]   listen = "HOST:PORT", advertise = "HOST:PORT", role = "client", bootstrap = [...]
    [log]    level = "info", format = "console"
    [link]   every field of meshnode.link.config.LinkConfig, by name

Every problem (unknown table or key, wrong type, bad value, invalid TOML) is a
:class:`~meshnode.errors.ConfigError` whose ``key`` is the dotted path (``link.max_peers``)
and whose ``source`` is the file, or ``"command line"`` for an override. Layers own
their tunables and defaults (e.g. LinkConfig); this module only parses into them.

Not here: identities and key files (identity.py), or anything that opens a socket.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import ipaddress
import itertools
import json
import math
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meshnode.contact import Contact, format_hostport, parse_hostport
from meshnode.errors import ConfigError, ContactError
from meshnode.link import config as link_config_module
from meshnode.link.config import LinkConfig

CONFIG_FILE = "config.toml"
COMMAND_LINE = "command line"
DEFAULT_PORT = 7520
DEFAULT_LISTEN = ("0.0.0.0", DEFAULT_PORT)  # noqa: S104 - listening on all interfaces is the point
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")


class Role(enum.Enum):
    """What a node does for the mesh."""

    CLIENT = "client"
    """Builds circuits for local applications; carries no one else's traffic."""
    RELAY = "relay"
    """Also forwards other nodes' circuits (never to the internet)."""
    EXIT = "exit"
    """A relay that also lets circuits leave the mesh to the internet."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """How the node logs (see meshnode/log.py)."""

    level: str = "info"
    """Least severe level written: one of LOG_LEVELS."""

    format: str = "console"
    """``console`` (human-readable) or ``json`` (one object per line)."""

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}")
        if self.format not in LOG_FORMATS:
            raise ValueError(f"format must be one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything a node needs besides its identity. Build it with :func:`load_config`."""

    home: Path
    """Directory holding identity.key and config.toml."""

    listen: tuple[str, int] = DEFAULT_LISTEN
    """(host, port) the UDP socket binds to."""

    advertise: tuple[str, int] | None = None
    """(host, port) other nodes reach us at (our contact string); None: derive from listen."""

    role: Role = Role.CLIENT
    bootstrap: tuple[Contact, ...] = ()
    """Nodes contacted first to join the mesh."""

    log: LogConfig = field(default_factory=LogConfig)
    link: LinkConfig = field(default_factory=LinkConfig)

    def public_address(self) -> tuple[str, int] | None:
        """Where other nodes reach us: ``advertise``, else ``listen`` unless its host is a
        wildcard (0.0.0.0, ::). None when the config does not say."""
        if self.advertise is not None:
            return self.advertise
        if is_wildcard(self.listen[0]):
            return None
        return self.listen

    def contact_address(self, bound: tuple[str, int] | None = None) -> tuple[tuple[str, int], bool]:
        """The address to put in our contact string, and whether it is a loopback guess.

        ``advertise`` if set; else ``listen``, or ``bound`` (the socket's real address,
        which knows the port when listen asked for 0) when given. A wildcard host becomes
        loopback, which works only on this machine: the second value says so.
        """
        if self.advertise is not None:
            return self.advertise, False
        host, port = bound if bound is not None else self.listen
        if is_wildcard(host):
            return ("::1" if ":" in host else "127.0.0.1", port), True
        return (host, port), False


def is_wildcard(host: str) -> bool:
    """True for the unspecified addresses (``0.0.0.0``, ``::``), which bind everything."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# --- Parsing -----------------------------------------------------------------------------

_T = typing.TypeVar("_T")
_Settings = dict[str, tuple[object, str]]  # dotted key -> (raw value, source)
_Parser = Callable[[object, str, str], _T]  # (raw value, dotted key, source) -> parsed

_NODE_KEYS = ("listen", "advertise", "role", "bootstrap")
_LOG_KEYS = ("level", "format")


def _known_keys() -> dict[str, tuple[str, ...]]:
    return {
        "node": _NODE_KEYS,
        "log": _LOG_KEYS,
        "link": tuple(f.name for f in dataclasses.fields(LinkConfig)),
    }


def load_config(
    home: Path,
    *,
    path: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> NodeConfig:
    """Read ``path`` (default ``home/config.toml``), apply ``overrides``, validate.

    A missing default file means all defaults; a missing explicit ``path`` is an error.
    ``overrides`` are dotted keys (``"node.listen": "127.0.0.1:7000"``) from command-line
    flags; they win over the file, are checked the same way, and a ``None`` value means
    "flag not given". Raises :class:`ConfigError` naming the key and the source.
    """
    file = path if path is not None else home / CONFIG_FILE
    source = str(file)
    settings: _Settings = {}
    document = _read_toml(file, required=path is not None)
    if document is not None:
        _collect_file(document, source, settings)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _check_key(key, COMMAND_LINE)
        settings[key] = (value, COMMAND_LINE)
    return _build(home, settings, source)


def _read_toml(file: Path, *, required: bool) -> dict[str, object] | None:
    source = str(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError("file not found", source=source) from None
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=source) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None


def _collect_file(document: Mapping[str, object], source: str, settings: _Settings) -> None:
    known = _known_keys()
    for table, body in document.items():
        if table not in known:
            tables = ", ".join(f"[{t}]" for t in known)
            raise ConfigError(f"unknown table (known: {tables})", key=table, source=source)
        if not isinstance(body, dict):
            raise ConfigError(
                f"must be a table ([{table}]), got {_type_name(body)}", key=table, source=source
            )
        for name, value in body.items():
            key = f"{table}.{name}"
            _check_key(key, source)
            settings[key] = (value, source)


def _check_key(key: str, source: str) -> None:
    known = _known_keys()
    table, sep, name = key.partition(".")
    if not sep or table not in known:
        tables = ", ".join(known)
        raise ConfigError(f"unknown setting (tables: {tables})", key=key, source=source)
    if name not in known[table]:
        raise ConfigError(
            f"unknown key (known in [{table}]: {', '.join(known[table])})", key=key, source=source
        )


def _get(settings: _Settings, key: str, parse: _Parser[_T], default: _T) -> _T:
    if key not in settings:
        return default
    value, source = settings[key]
    return parse(value, key, source)


def _build(home: Path, settings: _Settings, file_source: str) -> NodeConfig:
    return NodeConfig(
        home=home,
        listen=_get(settings, "node.listen", _address, DEFAULT_LISTEN),
        advertise=_get(settings, "node.advertise", _advertise, None),
        role=_get(settings, "node.role", _role, Role.CLIENT),
        bootstrap=_get(settings, "node.bootstrap", _bootstrap, ()),
        log=LogConfig(
            level=_get(settings, "log.level", _choice(LOG_LEVELS), "info"),
            format=_get(settings, "log.format", _choice(LOG_FORMATS), "console"),
        ),
        link=_build_link(settings, file_source),
    )


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _string(value: object, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"must be a string, got {_type_name(value)}", key=key, source=source)
    return value


def _address(value: object, key: str, source: str) -> tuple[str, int]:
    text = _string(value, key, source)
    try:
        return parse_hostport(text)
    # ValueError: contact.py's port check lets non-ASCII digits reach int() (xfail in
    # tests/meshnode/test_contact.py); drop it from these two clauses once that is fixed.
    except (ContactError, ValueError) as exc:
        raise ConfigError(f'{exc} (expected "HOST:PORT")', key=key, source=source) from None


def _advertise(value: object, key: str, source: str) -> tuple[str, int]:
    host, port = _address(value, key, source)
    if is_wildcard(host):
        raise ConfigError(
            f"{host!r} is a wildcard; advertise the address other nodes reach this node at",
            key=key,
            source=source,
        )
    return host, port


def _choice(choices: tuple[str, ...]) -> _Parser[str]:
    def parse(value: object, key: str, source: str) -> str:
        text = _string(value, key, source)
        if text not in choices:
            raise ConfigError(
                f"{text!r} is not one of {', '.join(choices)}", key=key, source=source
            )
        return text

    return parse


def _role(value: object, key: str, source: str) -> Role:
    return Role(_choice(tuple(r.value for r in Role))(value, key, source))


def _bootstrap(value: object, key: str, source: str) -> tuple[Contact, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f'must be an array of "HOST:PORT#KEY" strings, got {_type_name(value)}',
            key=key,
            source=source,
        )
    contacts = []
    for i, item in enumerate(value):
        item_key = f"{key}[{i}]"
        text = _string(item, item_key, source)
        try:
            contacts.append(Contact.parse(text))
        except (ContactError, ValueError) as exc:
            raise ConfigError(str(exc), key=item_key, source=source) from None
    return tuple(contacts)


# --- [link]: built from the fields of LinkConfig, so a new field needs no change here ----


@functools.cache
def _link_field_types() -> dict[str, type]:
    hints = typing.get_type_hints(LinkConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(LinkConfig)}


def _link_value(value: object, kind: type, key: str, source: str) -> object:
    # bool is a subclass of int in Python; TOML's `true` is never a count or a duration.
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"must be an integer, got {_type_name(value)}", key=key, source=source
            )
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, got {_type_name(value)}", key=key, source=source)
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError("must be a finite number", key=key, source=source)
        return number
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"must be true or false, got {_type_name(value)}", key=key, source=source
            )
        return value
    if kind is str:
        return _string(value, key, source)
    # A LinkConfig field of another type needs a parser here: a bug, not bad input.
    raise TypeError(f"LinkConfig.{key.partition('.')[2]}: no TOML parser for {kind!r}")


def _build_link(settings: _Settings, file_source: str) -> LinkConfig:
    kinds = _link_field_types()
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, kind in kinds.items():
        key = f"link.{name}"
        if key in settings:
            raw, source = settings[key]
            values[name] = _link_value(raw, kind, key, source)
            sources[name] = source
    try:
        return LinkConfig(**values)  # type: ignore[arg-type]  # types checked per field above
    except ValueError as exc:
        # LinkConfig names the field(s) in its message; blame one the user set, if any.
        message = str(exc)
        found = ((re.search(rf"\b{name}\b", message), name) for name in kinds)
        names = [name for _, name in sorted((m.start(), name) for m, name in found if m)]
        blamed = next((n for n in names if n in sources), names[0] if names else None)
        key = f"link.{blamed}" if blamed else "link"
        source = sources.get(blamed, file_source) if blamed else file_source
        raise ConfigError(message, key=key, source=source) from None


# --- The file `meshnode init` writes -----------------------------------------------------


@functools.cache
def _link_field_docs() -> dict[str, str]:
    """First line of each LinkConfig field's docstring (read from the source; {} if absent)."""
    try:
        tree = ast.parse(inspect.getsource(link_config_module))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == LinkConfig.__name__:
            for stmt, after in itertools.pairwise(node.body):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"no TOML spelling for {value!r}")


def default_config_text(
    *, listen: tuple[str, int] | None = None, advertise: tuple[str, int] | None = None
) -> str:
    """The commented config.toml that ``meshnode init`` writes.

    Every key appears with its default and a comment; ``listen`` / ``advertise`` fill in
    those two keys. Loading the text with no arguments yields exactly the defaults.
    """
    listen_host, listen_port = listen or DEFAULT_LISTEN
    advertise_line = (
        f"advertise = {json.dumps(format_hostport(*advertise))}"
        if advertise is not None
        else f'# advertise = "203.0.113.7:{DEFAULT_PORT}"'
    )
    defaults = LogConfig()
    lines = [
        "# meshnode configuration (TOML), written by `meshnode init`.",
        "# Every key is listed; commented-out lines show the built-in default.",
        "# Command-line flags override this file.",
        "# Unknown keys are an error, so a typo never passes silently.",
        "",
        "[node]",
        '# UDP address the node listens on, "HOST:PORT" (IPv6: "[::]:7520").',
        f"listen = {json.dumps(format_hostport(listen_host, listen_port))}",
        "# Address other nodes reach this node at, shown in its contact string;"
        " set it when listen is a wildcard or behind NAT. Default: unset.",
        advertise_line,
        '# "client" uses circuits; "relay" also carries other nodes\' circuits;'
        ' "exit" is a relay that also lets traffic leave to the internet.',
        f"role = {json.dumps(Role.CLIENT.value)}",
        '# Nodes to contact first to join the mesh: "HOST:PORT#KEY" strings (see `meshnode id`).',
        "bootstrap = []",
        "",
        "[log]",
        f"# Least severe messages written: {', '.join(LOG_LEVELS)}.",
        f"level = {json.dumps(defaults.level)}",
        '# "console" (human-readable) or "json" (one JSON object per line, for collectors).',
        f"format = {json.dumps(defaults.format)}",
        "",
        "[link]",
        "# Link-layer tunables (Noise over UDP). The values shown are the built-in defaults;",
        "# uncomment a line to change it. Durations are in seconds.",
    ]
    docs = _link_field_docs()
    link_defaults = LinkConfig()
    for f in dataclasses.fields(LinkConfig):
        if f.name in docs:
            lines.append(f"# {docs[f.name]}")
        lines.append(f"# {f.name} = {_toml_value(getattr(link_defaults, f.name))}")
    return "\n".join(lines) + "\n"
