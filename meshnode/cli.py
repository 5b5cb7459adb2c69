"""The ``meshnode`` command line (click): parse flags, build the config, call the packages.

Commands: ``init`` (create an identity and config.toml), ``id`` (show node id and contact
string). Node commands (``run``, ``ping``, ``demo``) are added at the end of this file;
``peers``, ``lookup``, ``circuit build`` / ``circuit close`` and ``route`` ask a running
node through its control API (meshnode/control.py).

Exit codes (also in ``meshnode --help``):

- 0   success
- 1   operational failure (e.g. a peer is unreachable)
- 2   usage or configuration error (bad flag, config key, contact string or identity file)
- 130 interrupted (Ctrl-C)

Any :class:`~meshnode.errors.MeshError` escaping a command is printed as one line,
``meshnode: error: <message>``, never a traceback; :class:`MeshGroup` does this once for
every command.

Not here: protocol logic or validation rules (config.py validates; node.py runs the node).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from meshnode import __version__
from meshnode.config import (
    CONFIG_FILE,
    NodeConfig,
    Role,
    default_config_text,
    load_config,
    normalize_country,
    normalize_region,
)
from meshnode.contact import Contact, format_hostport
from meshnode.control import (
    ControlError,
    ControlNotRunningError,
    control_get,
    control_request,
    parse_node_id,
)
from meshnode.demo import run_demo
from meshnode.errors import ConfigError, ContactError, DecodeError, IdentityError, MeshError
from meshnode.identity import (
    Identity,
    b32encode,
    default_home,
    load_identity,
    save_identity,
)
from meshnode.link.udp import LinkService
from meshnode.log import configure_logging
from meshnode.node import Node

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors that mean "fix your command line, config or key files" rather than "it failed".
USAGE_ERRORS: tuple[type[MeshError], ...] = (ConfigError, ContactError, IdentityError)

_F = TypeVar("_F", bound=Callable[..., Any])


def _one_line(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def error_exit_code(exc: MeshError) -> int:
    """2 for usage/configuration errors (:data:`USAGE_ERRORS`), 1 for everything else."""
    return EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILURE


class MeshGroup(click.Group):
    """A click group that turns MeshError into one stderr line and an exit code.

    Wraps the invocation of every subcommand, so commands added later get it for free.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshError as exc:
            click.echo(f"meshnode: error: {_one_line(exc)}", err=True)
            ctx.exit(error_exit_code(exc))
        except KeyboardInterrupt:
            ctx.exit(EXIT_INTERRUPTED)


@dataclass(slots=True)
class CliState:
    """Group-level options, handed to every subcommand as ``ctx.obj``.

    ``None`` means "not given on the command line": config.toml (or the default) decides.
    """

    log_format: str | None = None
    log_level: str | None = None

    def overrides(self) -> dict[str, object]:
        """The group options as config overrides (see :func:`meshnode.config.load_config`)."""
        return {"log.format": self.log_format, "log.level": self.log_level}


pass_state = click.make_pass_decorator(CliState, ensure=True)


def home_option(f: _F) -> _F:
    """``--home DIR`` (envvar MESHNODE_HOME): the node's directory, passed as ``home: Path``."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, dir_okay=True, path_type=Path),
        default=default_home,
        envvar="MESHNODE_HOME",
        show_default="$MESHNODE_HOME or ~/.config/meshnode",
        help="Node directory: identity.key and config.toml live here.",
    )(f)


def load_node_config(
    state: CliState,
    home: Path,
    *,
    config: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> NodeConfig:
    """Load the config with the group options and ``overrides`` (dotted keys, e.g.
    ``{"node.listen": "127.0.0.1:7000"}``; None values ignored) applied, then configure
    logging from it. What every node command starts with."""
    merged = state.overrides()
    merged.update(overrides or {})
    node_config = load_config(home, path=config, overrides=merged)
    configure_logging(level=node_config.log.level, fmt=node_config.log.format)
    return node_config


def contact_for(identity: Identity, node_config: NodeConfig) -> tuple[Contact, str | None]:
    """Our contact string, and a note for the operator when it is only a loopback guess."""
    address, guessed = node_config.contact_address()
    note = None
    if guessed:
        note = (
            f"node.listen is the wildcard {format_hostport(*node_config.listen)}, so this "
            f"contact uses {address[0]} and works only on this machine; set node.advertise in "
            f"{node_config.home / CONFIG_FILE} to the address other nodes reach you at"
        )
    return Contact(host=address[0], port=address[1], static_key=identity.link_public), note


def _note(text: str | None) -> None:
    if text:
        click.echo(f"meshnode: note: {text}", err=True)


@click.group(
    cls=MeshGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="meshnode")
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default=None,
    envvar="MESHNODE_LOG_FORMAT",
    help="Log output: readable console lines or JSON lines. [default: from config, console]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    envvar="MESHNODE_LOG_LEVEL",
    help="Least severe log level written. [default: from config, info]",
)
@click.pass_context
def main(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """meshnode: a decentralized, onion-routed mesh VPN node.

    Start with `meshnode init`, share the contact string it prints, and put other
    nodes' contact strings in node.bootstrap of config.toml.

    \b
    Example:
      meshnode init --listen 0.0.0.0:7520 --advertise 203.0.113.7:7520
      meshnode id

    \b
    Exit codes:
      0    success
      1    operational failure (e.g. a peer is unreachable)
      2    usage or configuration error
      130  interrupted (Ctrl-C)
    """
    ctx.obj = CliState(log_format=log_format, log_level=log_level)


@main.command()
@home_option
@click.option("--force", is_flag=True, help="Replace an existing identity (its node id is lost).")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default=None,
    help="UDP address to listen on, written to a new config.toml. [default: 0.0.0.0:7520]",
)
@click.option(
    "--advertise",
    metavar="HOST:PORT",
    default=None,
    help="Address other nodes reach this node at, written to a new config.toml.",
)
@pass_state
def init(
    state: CliState, home: Path, force: bool, listen: str | None, advertise: str | None
) -> None:
    """Create a node: a new identity (identity.key, mode 0600) and a commented config.toml.

    An existing config.toml is left as it is (--listen/--advertise then do nothing);
    an existing identity is kept unless --force is given.

    \b
    Example:
      meshnode init --home ~/.config/meshnode --advertise 203.0.113.7:7520
    """
    config_path = home / CONFIG_FILE
    config_exists = config_path.exists()
    # Validate everything before writing anything: the flags (as overrides) when we write
    # a fresh config.toml, the existing file otherwise.
    flags = {"node.listen": listen, "node.advertise": advertise}
    node_config = load_node_config(state, home, overrides=None if config_exists else flags)

    identity = Identity.generate()
    key_path = save_identity(home, identity, force=force)
    if config_exists:
        config_note = "exists, left unchanged"
        if listen is not None or advertise is not None:
            config_note += "; --listen/--advertise not applied, edit the file instead"
    else:
        text = default_config_text(listen=node_config.listen, advertise=node_config.advertise)
        _write_private(config_path, text)
        config_note = "written"
        node_config = load_node_config(state, home)  # what `meshnode id` will read

    contact, note = contact_for(identity, node_config)
    click.echo(f"node id:   {b32encode(identity.node_id)}")
    click.echo(f"contact:   {contact}")
    click.echo(f"identity:  {key_path} (written, mode 0600; keep it secret)")
    click.echo(f"config:    {config_path} ({config_note})")
    _note(note)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None


@main.command(name="id")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@pass_state
def id_command(state: CliState, home: Path, as_json: bool) -> None:
    """Show this node's id and the contact string other nodes bootstrap from.

    The contact is HOST:PORT#KEY: node.advertise (else node.listen) and the link key.
    Give it to another operator for their node.bootstrap list.

    \b
    Example:
      meshnode id
      meshnode id --json | jq -r .contact
    """
    identity = load_identity(home)
    node_config = load_node_config(state, home)
    contact, note = contact_for(identity, node_config)
    if as_json:
        record = {
            "node_id": b32encode(identity.node_id),
            "contact": str(contact),
            "identity_key": b32encode(identity.identity_public),
            "link_key": b32encode(identity.link_public),
        }
        click.echo(json.dumps(record))
    else:
        click.echo(f"node id:  {b32encode(identity.node_id)}")
        click.echo(f"contact:  {contact}")
    _note(note)


# --- Node commands ------------------------------------------------------------------------
# `run`, `ping` and `demo` go here. Pattern: @main.command() + @home_option + @pass_state,
# then `node_config = load_node_config(state, home, overrides={"node.listen": ...})` and
# `asyncio.run(...)`. Raise MeshError subclasses for failures: MeshGroup prints them as
# one line and exits 1 (2 for USAGE_ERRORS); Ctrl-C exits 130.


@main.command()
@home_option
@click.option(
    "--listen", metavar="HOST:PORT", help="UDP address to listen on ([::]:PORT for IPv4+IPv6)."
)
@click.option("--advertise", metavar="HOST:PORT", help="Address other nodes reach us at.")
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), help="What this node offers the mesh."
)
@click.option(
    "--bootstrap",
    "bootstraps",
    multiple=True,
    metavar="CONTACT",
    help="A node to connect to at start (HOST:PORT#KEY); repeatable, adds to node.bootstrap.",
)
@click.option(
    "--region",
    metavar="REGION",
    help='Region published in our descriptor, e.g. "EU" (overrides node.region).',
)
@click.option(
    "--country",
    metavar="CC",
    help='ISO 3166-1 alpha-2 country published in our descriptor, e.g. "DE" (node.country).',
)
@click.option(
    "--operator",
    metavar="NAME",
    help="Who runs this node, published in our descriptor (overrides node.operator).",
)
@click.option(
    "--operator-contact",
    metavar="CONTACT",
    help="How to reach the operator, e.g. an e-mail address (node.operator_contact).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: HOME/config.toml).",
)
@pass_state
def run(
    state: CliState,
    home: Path,
    listen: str | None,
    advertise: str | None,
    role: str | None,
    bootstraps: tuple[str, ...],
    region: str | None,
    country: str | None,
    operator: str | None,
    operator_contact: str | None,
    config_path: Path | None,
) -> None:
    """Run a node until Ctrl-C or SIGTERM.

    Brings the link layer up on one UDP socket, answers Noise handshakes and link pings,
    and connects to every bootstrap contact. When it is ready it prints one line on
    stdout, for scripts:

    \b
      READY node_id=<id> contact=<HOST:PORT#KEY> listen=<HOST:PORT>

    On exit it logs its link counters (node.stopped): traffic, handshakes, and every
    dropped datagram by reason.

    While it runs, `meshnode peers` and `meshnode lookup` (same --home) ask it
    questions through its local control API ([control] in config.toml).

    \b
    Examples:
      meshnode run --listen 127.10.0.1:7520
      meshnode run --listen [::]:7520 --role relay --bootstrap 203.0.113.5:7520#KEY
      meshnode run --role exit --region EU --country DE \\
          --operator "Example Networks" --operator-contact noc@example.org
      meshnode --log-format json run
    """
    identity = load_identity(home)
    overrides: dict[str, object] = {
        "node.listen": listen,
        "node.advertise": advertise,
        "node.role": role,
        "node.region": region,
        "node.country": country,
        "node.operator": operator,
        "node.operator_contact": operator_contact,
    }
    node_config = load_node_config(state, home, config=config_path, overrides=overrides)
    if bootstraps:
        extra = load_config(
            home, path=config_path, overrides={"node.bootstrap": list(bootstraps)}
        ).bootstrap
        node_config = dataclasses.replace(node_config, bootstrap=node_config.bootstrap + extra)

    def ready(node: Node) -> None:
        click.echo(
            f"READY node_id={b32encode(identity.node_id)} contact={node.contact} "
            f"listen={format_hostport(*node.link_addr())}"
        )
        sys.stdout.flush()

    asyncio.run(Node(node_config, identity).run(on_ready=ready))


@main.command()
@click.argument("contact")
@click.option("-c", "--count", default=4, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "-i",
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0, 3600.0),
    help="Seconds between pings.",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 600.0),
    help="Seconds to wait for the handshake, and for each pong.",
)
@pass_state
def ping(state: CliState, contact: str, count: int, interval: float, timeout: float) -> None:
    """Handshake with a node and measure link round-trip times.

    CONTACT is HOST:PORT#KEY, as printed by `meshnode id` on the other node. A throwaway
    identity is used, so no `init` is needed. Prints the handshake time, then one line per
    pong. Exits 0 if any pong came back, 1 if none did or the handshake failed (node
    down, wrong key, or traffic filtered: a node never answers a handshake made for
    another key).

    \b
    Examples:
      meshnode ping 127.10.0.1:7520#u2ffv6sq5hxygd6u4tp6wsxwktk4n4q5zgxkjm3tyrxqohhuqabq
      meshnode ping -c 10 -i 0.2 [::1]:7520#KEY
    """
    parsed = Contact.parse(contact)
    configure_logging(level=state.log_level or "warning", fmt=state.log_format or "console")
    received = asyncio.run(_ping(parsed, count=count, interval=interval, timeout=timeout))
    if received == 0:
        sys.exit(EXIT_FAILURE)


async def _ping(contact: Contact, *, count: int, interval: float, timeout: float) -> int:
    family_any = "::" if ":" in contact.host else "0.0.0.0"  # noqa: S104 - ephemeral port
    service = await LinkService.open(Identity.generate(), (family_any, 0))
    target = format_hostport(contact.host, contact.port)
    try:
        addr = await service.resolve(contact.host, contact.port)
        click.echo(f"PING {target} (link key {b32encode(contact.static_key)[:16]}...)")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        est = await service.connect(contact.static_key, addr, timeout=timeout)
        hs_ms = (loop.time() - t0) * 1000
        node = b32encode(est.node_id) if est is not None else "?"
        click.echo(f"handshake with {target} done in {hs_ms:.2f} ms: node id {node}")
        rtts: list[float] = []
        for seq in range(1, count + 1):
            try:
                rtt = await service.ping(contact.static_key, timeout=timeout) * 1000
            except TimeoutError:
                click.echo(f"seq={seq}: no pong within {timeout:g}s")
            else:
                rtts.append(rtt)
                click.echo(f"pong from {node[:12]}: seq={seq} time={rtt:.3f} ms")
            if seq < count:
                await asyncio.sleep(interval)
        loss = 100.0 * (count - len(rtts)) / count
        click.echo(f"--- {target} ping statistics ---")
        summary = f"{count} sent, {len(rtts)} received, {loss:.0f}% loss"
        if rtts:
            summary += (
                f"; handshake {hs_ms:.2f} ms; rtt min/avg/max = "
                f"{min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/{max(rtts):.3f} ms"
            )
        click.echo(summary)
        return len(rtts)
    finally:
        service.close()


@main.command()
def demo() -> None:
    """Two nodes on loopback handshake and exchange encrypted frames, step by step.

    Uses fresh throwaway identities and loopback addresses 127.10.0.1 / 127.11.0.1;
    starts nothing that outlives it. Exits 1 if any step fails.
    """
    configure_logging(level="warning")
    if not asyncio.run(run_demo()):
        sys.exit(EXIT_FAILURE)


# --- Control API commands -----------------------------------------------------------------
# `peers` and `lookup` ask the node running with the same --home, through the control API
# (HOME/control.json + HOME/control.token). Formatting for people lives here; the API
# (meshnode/control.py) speaks JSON only.


def _ask_node(
    home: Path, path: str, params: Mapping[str, str] | None = None, *, timeout: float = 10.0
) -> object:
    try:
        return asyncio.run(control_get(home, path, params, timeout=timeout))
    except ControlNotRunningError as exc:
        raise _not_running(home, exc) from None


def _ask_node_to(
    home: Path, method: str, path: str, *, body: object = None, timeout: float = 10.0
) -> object:
    """As :func:`_ask_node`, with another method and a JSON body."""
    try:
        return asyncio.run(control_request(home, method, path, body=body, timeout=timeout))
    except ControlNotRunningError as exc:
        raise _not_running(home, exc) from None


def _not_running(home: Path, exc: ControlNotRunningError) -> ControlNotRunningError:
    # Perhaps a node runs there with the control API turned off: say so too.
    enabled = True
    with contextlib.suppress(MeshError):
        enabled = load_config(home).control.enabled
    if enabled:
        return exc
    return ControlNotRunningError(
        f"{exc}; note that {home / CONFIG_FILE} turns the control API off "
        "([control] enabled = false), so commands that ask the node cannot reach it"
    )


def _user_text(normalize: Callable[[str], str]) -> Callable[..., str | None]:
    """A click callback: ``normalize`` the value (None passes), errors as usage errors."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def format_age(seconds: float) -> str:
    """A short age for tables: ``"42s"``, ``"5m"``, ``"2h"``, ``"3d"`` (negative: ``"0s"``)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_bps(bps: int) -> str:
    """``100000000`` -> ``"100 Mbit/s"``; 0 -> ``"unknown"``."""
    if bps <= 0:
        return "unknown"
    value = float(bps)
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if value < 1000:
            return f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} Tbit/s"


def _place(peer: Mapping[str, Any]) -> str:
    region, country = peer.get("region") or "", peer.get("country") or ""
    if not region and not country:
        return "-"
    return f"{region or '-'}/{country or '-'}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_peers_table(peers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines `meshnode peers` prints: an aligned table (no count line)."""
    header = ("NODE ID", "ROLES", "REGION/CC", "OPERATOR", "ADDRESSES", "AGE")
    rows = [header]
    for peer in peers:
        operator = peer.get("operator") or {}
        rows.append(
            (
                str(peer.get("node_id", "?"))[:16],
                ",".join(peer.get("roles") or []) or "-",
                _place(peer),
                _short(str(operator.get("name") or "-"), 24),
                ",".join(peer.get("addresses") or []) or "-",
                format_age(float(peer.get("age_s", 0))),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _filters_text(params: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={value or '(none)'}" for name, value in params.items())


@main.command()
@home_option
@click.option(
    "--role",
    type=click.Choice(["relay", "exit"], case_sensitive=False),
    help="Only nodes offering this role.",
)
@click.option(
    "--region",
    metavar="REGION",
    callback=_user_text(normalize_region),
    help='Only nodes in this region, e.g. "EU" (any case).',
)
@click.option(
    "--country",
    metavar="CC",
    callback=_user_text(normalize_country),
    help='Only nodes in this country (ISO 3166-1 alpha-2, e.g. "DE"; any case).',
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON list of peers instead.")
def peers(
    home: Path, role: str | None, region: str | None, country: str | None, as_json: bool
) -> None:
    """List the nodes the running node knows (its directory of verified descriptors).

    Asks the node started with `meshnode run` and the same --home, through its local
    control API. Filters combine (all must match). AGE is the time since the node
    published its descriptor; the node id is shortened to 16 characters (--json, or
    `meshnode lookup`, shows all of it).

    \b
    Examples:
      meshnode peers
      meshnode peers --role exit --country de
      meshnode peers --region EU --json | jq -r '.[].node_id'
    """
    params = {
        name: value
        for name, value in (("role", role), ("region", region), ("country", country))
        if value is not None
    }
    found = _ask_node(home, "/v1/peers", params)
    if not isinstance(found, list):
        raise ControlError("the node's answer is not a list of peers (is it another version?)")
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo(f"no peers match {_filters_text(params)}" if params else "no peers known yet")
        return
    for line in format_peers_table(found):
        click.echo(line)
    count = f"{len(found)} peer{'s' if len(found) != 1 else ''}"
    click.echo(f"{count} ({_filters_text(params)})" if params else count)


def _utc(timestamp: object) -> str:
    if not isinstance(timestamp, int):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def format_descriptor(record: Mapping[str, Any]) -> list[str]:
    """The lines `meshnode lookup` prints for one descriptor (``/v1/lookup`` JSON)."""
    operator = record.get("operator") or {}
    policy = record.get("exit_policy") or []
    ranges = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in policy]
    fields = [
        ("node id", record.get("node_id")),
        ("roles", ", ".join(record.get("roles") or []) or "none (a client)"),
        ("region", record.get("region") or "-"),
        ("country", record.get("country") or "-"),
        ("operator", operator.get("name") or "-"),
        ("operator contact", operator.get("contact") or "-"),
        ("operator key", operator.get("operator_key") or "-"),
        ("addresses", ", ".join(record.get("addresses") or [])),
        ("exit policy", ", ".join(ranges) or "-"),
        ("bandwidth", format_bps(int(record.get("bandwidth_bps") or 0))),
        ("software", record.get("software") or "-"),
        ("stake ref", record.get("stake_ref") or "-"),
        ("identity key", record.get("identity_key")),
        ("link key", record.get("link_key")),
        ("onion key", record.get("onion_key")),
        ("next onion key", record.get("next_onion_key") or "-"),
        ("version", record.get("version")),
        (
            "published",
            f"{_utc(record.get('published_at'))} ({format_age(float(record.get('age_s', 0)))} ago)",
        ),
        (
            "expires",
            f"{_utc(record.get('expires_at'))} "
            f"(in {format_age(float(record.get('expires_in_s', 0)))})",
        ),
        ("signature", "verified by the node (Ed25519, identity key)"),
    ]
    width = max(len(name) for name, _ in fields) + 1
    return [f"{name + ':':<{width}} {value}" for name, value in fields]


@main.command()
@click.argument("node_id", metavar="NODE_ID")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object instead.")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1, 600.0),
    help="Seconds to wait for the node's answer (a DHT lookup crosses the network).",
)
def lookup(home: Path, node_id: str, as_json: bool, timeout: float) -> None:
    """Fetch a node's descriptor from the DHT; the running node verifies it.

    NODE_ID is a node id as `meshnode id` or `meshnode peers --json` prints it (32
    base32 characters), or 40 hex digits. Prints every field of the descriptor. Exits 1
    when the DHT holds no descriptor for the node (or none that verifies).

    \b
    Examples:
      meshnode lookup 5bfqqnzyhdvvmrrwn7dyvsvanmwaiopl
      meshnode lookup 5bfqqnzyhdvvmrrwn7dyvsvanmwaiopl --json | jq .addresses
    """
    try:
        parse_node_id(node_id)
    except DecodeError as exc:
        raise click.BadParameter(str(exc), param_hint="NODE_ID") from None
    record = _ask_node(home, f"/v1/lookup/{node_id.strip()}", timeout=timeout)
    if not isinstance(record, dict):
        raise ControlError("the node's answer is not a descriptor (is it another version?)")
    if as_json:
        click.echo(json.dumps(record))
        return
    for line in format_descriptor(record):
        click.echo(line)


# --- Circuits -----------------------------------------------------------------------------
# `circuit build`, `circuit close` and `route` ask the running node to build, close and list
# its circuits (POST / DELETE / GET /v1/circuits).


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    every = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in every
    ]


def format_ms(value: object) -> str:
    """A duration in milliseconds for tables: ``"0.412 ms"``, ``"12.3 ms"``; ``"-"`` if unknown."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.3g} ms" if value < 100 else f"{value:.0f} ms"


def _position(index: int, count: int) -> str:
    if count == 1:
        return "exit"
    return "entry" if index == 1 else "exit" if index == count else "middle"


def format_hops(hops: Sequence[Mapping[str, Any]], indent: str = "") -> list[str]:
    """One row per hop: index, node id (16 characters), operator, region/country,
    address, median probe RTT, probes lost/sent, health factor and position."""
    header = ("HOP", "NODE ID", "OPERATOR", "REGION/CC", "ADDRESS", "RTT", "LOST", "HEALTH", "AS")
    rows = []
    for hop in hops:
        index = int(hop.get("hop", 0))
        health = hop.get("health")
        rows.append(
            (
                str(index),
                str(hop.get("node_id", "?"))[:16],
                _short(str(hop.get("operator") or "-"), 24),
                _place(hop),
                str(hop.get("address") or "-"),
                format_ms(hop.get("rtt_ms")),
                f"{hop.get('probes_lost', 0)}/{hop.get('probes_sent', 0)}",
                f"{health:.2f}" if isinstance(health, int | float) else "-",
                _position(index, len(hops)),
            )
        )
    return _table(header, rows, indent)


def format_circuit(record: Mapping[str, Any]) -> list[str]:
    """The lines `meshnode circuit build` prints for one circuit (``/v1/circuits`` JSON)."""
    hops = record.get("hops") or []
    attempts = int(record.get("attempts") or 1)
    first = (
        f"circuit {record.get('id')}: {record.get('state')}, {len(hops)} "
        f"hop{'s' if len(hops) != 1 else ''}, built in {format_ms(record.get('build_ms'))}"
    )
    if attempts > 1:
        first += f" (attempt {attempts})"
    if record.get("port") is not None:
        first += f", exit accepts port {record['port']}"
    lines = [first, *format_hops(hops)]
    lines.append("path: " + " > ".join(str(h.get("node_id", "?"))[:16] for h in hops))
    lines.extend(f"retried: {text}" for text in record.get("failed_attempts") or [])
    if record.get("reason"):
        lines.append(f"reason: {record['reason']}")
    return lines


def format_route(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines `meshnode route` prints: each circuit, its hops and health, and a count."""
    lines: list[str] = []
    for record in records:
        hops = record.get("hops") or []
        head = (
            f"circuit {record.get('id')}  {record.get('state')}  {len(hops)} hops  "
            f"built in {format_ms(record.get('build_ms'))}  "
            f"age {format_age(float(record.get('age_s') or 0))}"
        )
        if record.get("reason"):
            head += f"  ({record['reason']})"
        lines.append(head)
        lines.extend(format_hops(hops, indent="  "))
    open_count = sum(1 for r in records if r.get("state") == "open")
    lines.append(f"{len(records)} circuit{'s' if len(records) != 1 else ''} ({open_count} open)")
    return lines


@main.group(cls=MeshGroup)
def circuit() -> None:
    """Build and close circuits on the running node (see also `meshnode route`).

    \b
    Examples:
      meshnode circuit build
      meshnode circuit build --hops 2 --port 443 --json
      meshnode circuit close 3
    """


@circuit.command(name="build")
@home_option
@click.option(
    "--hops",
    type=click.IntRange(1, 5),
    default=None,
    help="Hops of the circuit, entry to exit. [default: [circuits] hops, 3]",
)
@click.option(
    "--exit",
    "exit_id",
    metavar="NODE_ID",
    default=None,
    help="End at this exit (a node id as `meshnode peers --role exit --json` prints it).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Only exits whose exit policy allows this port (e.g. 443).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the circuit's JSON object instead.")
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(0.1, 600.0),
    help="Seconds to wait for the node (a build may retry through other relays).",
)
def circuit_build(
    home: Path,
    hops: int | None,
    exit_id: str | None,
    port: int | None,
    as_json: bool,
    timeout: float,
) -> None:
    """Build a circuit through relays the node found in the DHT, and show its path.

    The running node (same --home) picks an entry guard, middle relays and an exit
    (distinct nodes, operators and subnets), builds the circuit in one round trip,
    retries through other relays if a hop fails, then probes every hop three times.
    Prints each hop's index, node id, operator, region/country, address, round-trip
    time from the probes (median), and the build time. Exits 1 when no circuit can be
    built (the message says why: no such exit, too few relays, a hop timed out ...).

    \b
    Examples:
      meshnode circuit build
      meshnode circuit build --hops 2 --port 443
      meshnode circuit build --exit 5bfqqnzyhdvvmrrwn7dyvsvanmwaiopl --json | jq .hops
    """
    body: dict[str, object] = {}
    if hops is not None:
        body["hops"] = hops
    if exit_id is not None:
        try:
            parse_node_id(exit_id)
        except DecodeError as exc:
            raise click.BadParameter(str(exc), param_hint="--exit") from None
        body["exit"] = exit_id.strip()
    if port is not None:
        body["port"] = port
    record = _ask_node_to(home, "POST", "/v1/circuits", body=body, timeout=timeout)
    if not isinstance(record, dict):
        raise ControlError("the node's answer is not a circuit (is it another version?)")
    if as_json:
        click.echo(json.dumps(record))
        return
    for line in format_circuit(record):
        click.echo(line)


@circuit.command(name="close")
@click.argument("circuit_id", type=click.IntRange(1, 10**12), metavar="ID")
@home_option
def circuit_close(circuit_id: int, home: Path) -> None:
    """Close circuit ID (as `meshnode route` lists it): its hops release it at once.

    \b
    Example:
      meshnode circuit close 3
    """
    answer = _ask_node_to(home, "DELETE", f"/v1/circuits/{circuit_id}")
    closed = isinstance(answer, dict) and answer.get("closed") is True
    click.echo(f"circuit {circuit_id} closed" if closed else f"circuit {circuit_id} had ended")


@main.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON list of circuits instead.")
def route(home: Path, as_json: bool) -> None:
    """Show the running node's circuits: state, hops and their health.

    Lists circuits being built and open ones, then the last ones that ended (failed:
    the node found a hop silent or its link lost; destroyed: a hop tore it down; closed:
    closed here). Per hop: median probe RTT, probes lost/sent, and the relay's health
    factor (1.00 = nothing against it; failed builds and lost probes lower it).

    \b
    Examples:
      meshnode route
      meshnode route --json | jq '.[] | select(.state == "open") | .id'
    """
    found = _ask_node(home, "/v1/circuits")
    if not isinstance(found, list):
        raise ControlError("the node's answer is not a list of circuits (is it another version?)")
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no circuits yet (build one with `meshnode circuit build`)")
        return
    for line in format_route(found):
        click.echo(line)
