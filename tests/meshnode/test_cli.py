"""meshnode.cli: init / id through click's CliRunner; exit codes and one-line errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import click
import pytest
from click.testing import CliRunner, Result

from meshnode import __version__
from meshnode import cli as cli_module
from meshnode.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, main
from meshnode.config import CONFIG_FILE, NodeConfig, default_config_text, load_config
from meshnode.contact import Contact
from meshnode.errors import MeshError
from meshnode.identity import IDENTITY_FILE, b32encode, load_identity
from meshnode.log import configure_logging


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    configure_logging()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "node"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(main, list(args))


def fields(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def assert_one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshnode: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_documents_exit_codes() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for code in ("0", "1", "2", "130"):
        assert f"  {code} " in result.output
    assert "init" in result.output and "id" in result.output


def test_init_creates_private_files(home: Path) -> None:
    result = run("init", "--home", str(home))
    assert result.exit_code == 0, result.output
    identity = load_identity(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / IDENTITY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((home / CONFIG_FILE).stat().st_mode) == 0o600
    assert (home / CONFIG_FILE).read_text() == default_config_text()
    shown = fields(result.stdout)
    assert shown["node id"] == b32encode(identity.node_id)
    assert Contact.parse(shown["contact"]).static_key == identity.link_public
    assert str(home / IDENTITY_FILE) in result.stdout
    assert str(home / CONFIG_FILE) in result.stdout


def test_init_twice_without_force_exits_2(home: Path) -> None:
    assert run("init", "--home", str(home)).exit_code == 0
    before = (home / IDENTITY_FILE).read_text()
    line = assert_one_line_error(run("init", "--home", str(home)), EXIT_USAGE)
    assert "--force" in line
    assert (home / IDENTITY_FILE).read_text() == before


def test_init_force_replaces_identity_and_keeps_config(home: Path) -> None:
    assert run("init", "--home", str(home), "--listen", "127.0.0.1:7001").exit_code == 0
    old = load_identity(home)
    config_before = (home / CONFIG_FILE).read_text()
    result = run("init", "--home", str(home), "--force", "--listen", "127.0.0.1:9999")
    assert result.exit_code == 0, result.output
    new = load_identity(home)
    assert new.node_id != old.node_id
    assert (home / CONFIG_FILE).read_text() == config_before
    assert "left unchanged" in result.stdout
    assert "not applied" in result.stdout
    assert fields(result.stdout)["node id"] == b32encode(new.node_id)


def test_init_with_listen_and_advertise(home: Path) -> None:
    result = run(
        "init", "--home", str(home), "--listen", "[::]:7002", "--advertise", "203.0.113.7:7003"
    )
    assert result.exit_code == 0, result.output
    config = load_config(home)
    assert config.listen == ("::", 7002)
    assert config.advertise == ("203.0.113.7", 7003)
    contact = Contact.parse(fields(result.stdout)["contact"])
    assert (contact.host, contact.port) == ("203.0.113.7", 7003)
    assert result.stderr == ""  # advertise set: no note


def test_init_bad_listen_writes_nothing(home: Path) -> None:
    line = assert_one_line_error(
        run("init", "--home", str(home), "--listen", "nowhere"), EXIT_USAGE
    )
    assert "node.listen" in line and "command line" in line
    assert not (home / IDENTITY_FILE).exists()
    assert not (home / CONFIG_FILE).exists()


def test_id_matches_saved_identity(home: Path) -> None:
    run("init", "--home", str(home), "--listen", "127.0.0.1:7004")
    identity = load_identity(home)
    result = run("id", "--home", str(home))
    assert result.exit_code == 0, result.output
    shown = fields(result.stdout)
    assert shown["node id"] == b32encode(identity.node_id)
    contact = Contact.parse(shown["contact"])
    assert contact == Contact(host="127.0.0.1", port=7004, static_key=identity.link_public)
    assert result.stderr == ""


def test_id_json(home: Path) -> None:
    run("init", "--home", str(home), "--advertise", "198.51.100.1:7005")
    identity = load_identity(home)
    result = run("id", "--home", str(home), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record == {
        "node_id": b32encode(identity.node_id),
        "contact": f"198.51.100.1:7005#{b32encode(identity.link_public)}",
        "identity_key": b32encode(identity.identity_public),
        "link_key": b32encode(identity.link_public),
    }
    assert Contact.parse(record["contact"]).static_key == identity.link_public


def test_id_wildcard_listen_notes_advertise(home: Path) -> None:
    run("init", "--home", str(home))  # default listen 0.0.0.0:7520
    result = run("id", "--home", str(home))
    assert result.exit_code == 0, result.output
    contact = Contact.parse(fields(result.stdout)["contact"])
    assert (contact.host, contact.port) == ("127.0.0.1", 7520)
    assert "node.advertise" in result.stderr
    assert "meshnode: note:" in result.stderr


def test_id_without_init_exits_2(home: Path) -> None:
    line = assert_one_line_error(run("id", "--home", str(home)), EXIT_USAGE)
    assert "meshnode init" in line


def test_id_bad_config_exits_2_naming_key_and_file(home: Path) -> None:
    run("init", "--home", str(home))
    (home / CONFIG_FILE).write_text("[link]\nmax_peers = 0\n")
    line = assert_one_line_error(run("id", "--home", str(home)), EXIT_USAGE)
    assert f"{home / CONFIG_FILE}: link.max_peers: " in line


def test_home_from_environment(home: Path) -> None:
    result = run("init", env={"MESHNODE_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert (home / IDENTITY_FILE).exists()
    assert run("id", env={"MESHNODE_HOME": str(home)}).exit_code == 0


def test_log_options_reach_subcommands(home: Path) -> None:
    run("init", "--home", str(home))
    result = run("--log-level", "debug", "--log-format", "json", "id", "--home", str(home))
    assert result.exit_code == 0
    bad = run("--log-format", "xml", "id", "--home", str(home))
    assert bad.exit_code == EXIT_USAGE


# Commands added later get the same error handling: register throwaway ones on a copy.


def _group_with(command: click.Command) -> click.Group:
    group = type(main)(name="meshnode", callback=main.callback, params=main.params)
    group.add_command(command)
    return group


@pytest.mark.parametrize(
    ("exc", "code"), [(MeshError("peer unreachable"), EXIT_FAILURE), (KeyboardInterrupt(), 130)]
)
def test_errors_of_later_commands(exc: BaseException, code: int) -> None:
    @click.command()
    def boom() -> None:
        raise exc

    result = CliRunner().invoke(_group_with(boom), ["boom"])
    assert result.exit_code == code
    assert "Traceback" not in result.output
    if code == EXIT_INTERRUPTED:
        assert result.output == ""
    else:
        assert result.stderr == "meshnode: error: peer unreachable\n"


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert __version__ in proc.stdout


# `run` flags reach NodeConfig: a stand-in Node records the config instead of running.


class RecordingNode:
    configs: ClassVar[list[NodeConfig]] = []

    def __init__(self, config: NodeConfig, identity: object) -> None:
        RecordingNode.configs.append(config)

    async def run(self, *, on_ready: object = None) -> None:
        return None


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[NodeConfig]:
    RecordingNode.configs = []
    monkeypatch.setattr(cli_module, "Node", RecordingNode)
    return RecordingNode.configs


def test_run_place_and_operator_flags(home: Path, recorded: list[NodeConfig]) -> None:
    run("init", "--home", str(home))
    (home / CONFIG_FILE).write_text('[node]\nregion = "NA"\ncountry = "US"\noperator = "file"\n')
    result = run(
        "run",
        "--home",
        str(home),
        "--region",
        "eu",
        "--country",
        "de",
        "--operator",
        "Example Networks",
        "--operator-contact",
        "noc@example.org",
    )
    assert result.exit_code == 0, result.output
    (config,) = recorded
    assert (config.region, config.country) == ("EU", "DE")
    assert config.operator == "Example Networks"
    assert config.operator_contact == "noc@example.org"


def test_run_without_flags_keeps_the_file(home: Path, recorded: list[NodeConfig]) -> None:
    run("init", "--home", str(home))
    (home / CONFIG_FILE).write_text('[node]\nregion = "apac"\noperator_contact = "x@y.z"\n')
    assert run("run", "--home", str(home)).exit_code == 0
    (config,) = recorded
    assert (config.region, config.country, config.operator) == ("APAC", "", "")
    assert config.operator_contact == "x@y.z"


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--region", "Europe!", "node.region"),
        ("--country", "DEU", "node.country"),
        ("--operator", "x" * 65, "node.operator"),
        ("--operator-contact", "a\tb", "node.operator_contact"),
    ],
)
def test_run_bad_flag_exits_2(
    home: Path, recorded: list[NodeConfig], flag: str, value: str, key: str
) -> None:
    run("init", "--home", str(home))
    line = assert_one_line_error(run("run", "--home", str(home), flag, value), EXIT_USAGE)
    assert f"command line: {key}: " in line
    assert recorded == []


def test_help_lists_control_commands() -> None:
    result = run("--help")
    assert "peers" in result.output and "lookup" in result.output
    for command in ("peers", "lookup"):
        help_text = run(command, "--help").output
        assert "Examples:" in help_text and f"meshnode {command}" in help_text
    assert "--operator-contact" in run("run", "--help").output


def test_help_lists_circuit_commands() -> None:
    result = run("--help")
    assert "circuit" in result.output and "route" in result.output
    for command in (["circuit", "build"], ["route"], ["circuit", "close"]):
        help_text = run(*command, "--help").output
        assert "Example" in help_text and f"meshnode {' '.join(command)}" in help_text
    build_help = run("circuit", "build", "--help").output
    for flag in ("--hops", "--exit", "--port", "--json", "--home"):
        assert flag in build_help
    assert "--json" in run("route", "--help").output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hops", "0"], "--hops"),
        (["--hops", "6"], "--hops"),
        (["--port", "65536"], "--port"),
        (["--exit", "not-a-node-id"], "--exit"),
    ],
)
def test_circuit_build_bad_flags_are_usage_errors(home: Path, args: list[str], words: str) -> None:
    # Checked before any node is asked: there is none at this home.
    result = run("circuit", "build", "--home", str(home), *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert words in result.stderr
    assert "no node is running" not in result.stderr


def test_circuit_commands_without_a_node_exit_1(home: Path) -> None:
    for args in (["circuit", "build"], ["route"], ["circuit", "close", "3"]):
        line = assert_one_line_error(run(*args, "--home", str(home)), EXIT_FAILURE)
        assert "no node is running with home" in line


def test_run_reads_the_circuits_table(home: Path, recorded: list[NodeConfig]) -> None:
    run("init", "--home", str(home))
    with (home / CONFIG_FILE).open("a") as f:
        f.write("\n[circuits]\nallow_same_subnet = true\nhops = 2\nprobe_interval_s = 0\n")
    assert run("run", "--home", str(home)).exit_code == 0
    (config,) = recorded
    assert config.circuits.allow_same_subnet is True
    assert (config.circuits.hops, config.circuits.probe_interval_s) == (2, 0.0)
    assert load_config(home.parent / "fresh").circuits.allow_same_subnet is False


def test_circuits_table_errors_name_the_key(home: Path) -> None:
    run("init", "--home", str(home))
    with (home / CONFIG_FILE).open("a") as f:
        f.write("\n[circuits]\nhops = 9\n")
    line = assert_one_line_error(run("id", "--home", str(home)), EXIT_USAGE)
    assert "circuits.hops" in line and "hops must be an integer from 1 to 5" in line
