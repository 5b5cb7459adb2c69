"""meshnode.config: TOML + overrides -> NodeConfig, and every way it says no."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from discovery.dht import DhtConfig
from meshnode.config import (
    COMMAND_LINE,
    CONFIG_FILE,
    ControlConfig,
    LogConfig,
    NodeConfig,
    Role,
    default_config_text,
    load_config,
    normalize_country,
    normalize_region,
)
from meshnode.contact import Contact
from meshnode.errors import ConfigError
from meshnode.link.config import LinkConfig

KEY = "u2ffv6sq5hxygd6u4tp6wsxwktk4n4q5zgxkjm3tyrxqohhuqabq"
CONTACT = f"127.10.0.1:7000#{KEY}"


def write(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / CONFIG_FILE
    path.write_text(text)
    return path


def load_error(home: Path, text: str, **kwargs: object) -> ConfigError:
    write(home, text)
    with pytest.raises(ConfigError) as info:
        load_config(home, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_missing_default_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    assert config == NodeConfig(home=tmp_path)
    assert config.listen == ("0.0.0.0", 7520)
    assert config.advertise is None
    assert config.role is Role.CLIENT
    assert config.bootstrap == ()
    assert config.log == LogConfig(level="info", format="console")
    assert config.link == LinkConfig()
    assert (config.region, config.country) == ("", "")
    assert (config.operator, config.operator_contact) == ("", "")
    assert config.bandwidth_bps == 0
    assert config.state_dir == tmp_path / "state"
    assert config.control == ControlConfig(enabled=True, listen=("127.0.0.1", 0))


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, path=path)
    assert str(path) in str(info.value)


def test_default_config_text_loads_as_defaults(tmp_path: Path) -> None:
    write(tmp_path, default_config_text())
    assert load_config(tmp_path) == NodeConfig(home=tmp_path)


def test_default_config_text_lists_every_key_with_a_comment() -> None:
    text = default_config_text()
    lines = text.splitlines()
    keys = ["listen", "advertise", "role", "bootstrap", "level", "format", "enabled"]
    keys += ["region", "country", "operator", "operator_contact", "bandwidth_bps", "state_dir"]
    for key in keys:
        assert any(re.match(rf"#? ?{key} = ", line) for line in lines), key
    for f in dataclasses.fields(LinkConfig):
        index = next(i for i, line in enumerate(lines) if line.startswith(f"# {f.name} = "))
        assert lines[index - 1].startswith("# ") and " = " not in lines[index - 1][:40], f.name


def test_default_config_text_link_values_are_the_defaults(tmp_path: Path) -> None:
    # Uncommenting every shown link default must still give exactly LinkConfig().
    names = {f.name for f in dataclasses.fields(LinkConfig)}
    lines = []
    for line in default_config_text().splitlines():
        name = line[2:].partition(" = ")[0]
        lines.append(line[2:] if line.startswith("# ") and name in names else line)
    write(tmp_path, "\n".join(lines))
    assert load_config(tmp_path).link == LinkConfig()


def test_default_config_text_with_listen_and_advertise(tmp_path: Path) -> None:
    write(tmp_path, default_config_text(listen=("::", 7000), advertise=("203.0.113.7", 7001)))
    config = load_config(tmp_path)
    assert config.listen == ("::", 7000)
    assert config.advertise == ("203.0.113.7", 7001)


def test_full_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        f"""
[node]
listen = "127.0.0.1:7000"
advertise = "[2001:db8::1]:7000"
role = "relay"
bootstrap = ["{CONTACT}"]

[log]
level = "debug"
format = "json"

[link]
max_peers = 10
handshake_timeout_s = 3
keepalive_s = 2.5
""",
    )
    config = load_config(tmp_path)
    assert config.listen == ("127.0.0.1", 7000)
    assert config.advertise == ("2001:db8::1", 7000)
    assert config.role is Role.RELAY
    assert config.bootstrap == (Contact.parse(CONTACT),)
    assert config.log == LogConfig(level="debug", format="json")
    assert config.link.max_peers == 10
    assert config.link.handshake_timeout_s == 3.0
    assert isinstance(config.link.handshake_timeout_s, float)
    assert config.link.keepalive_s == 2.5


def test_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[node]\nrole = "exit"\n')
    assert load_config(tmp_path / "home", path=path).role is Role.EXIT


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[nodes]\nlisten = '1.2.3.4:5'\n", "nodes"),
        ("[node]\nlisen = '1.2.3.4:5'\n", "node.lisen"),
        ("[log]\ncolour = true\n", "log.colour"),
        ("[link]\nmax_peer = 5\n", "link.max_peer"),
        ("top = 1\n", "top"),
    ],
)
def test_unknown_table_or_key(tmp_path: Path, text: str, key: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert error.source == str(tmp_path / CONFIG_FILE)
    assert str(error).startswith(f"{tmp_path / CONFIG_FILE}: {key}: unknown")


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[link]\nmax_peers = "10"\n', "link.max_peers", "integer"),
        ("[link]\nmax_peers = true\n", "link.max_peers", "integer"),
        ("[link]\nmax_peers = 1.5\n", "link.max_peers", "integer"),
        ("[link]\nkeepalive_s = true\n", "link.keepalive_s", "number"),
        ('[link]\nkeepalive_s = "10"\n', "link.keepalive_s", "number"),
        ("[link]\nkeepalive_s = inf\n", "link.keepalive_s", "finite"),
        ("[node]\nlisten = 7520\n", "node.listen", "string"),
        ('[node]\nlisten = "0.0.0.0"\n', "node.listen", "PORT"),
        ('[node]\nlisten = "0.0.0.0:99999"\n', "node.listen", "port"),
        ('[node]\nadvertise = "0.0.0.0:7520"\n', "node.advertise", "wildcard"),
        ('[node]\nrole = "server"\n', "node.role", "client"),
        ('[node]\nbootstrap = "x"\n', "node.bootstrap", "array"),
        ('[log]\nlevel = "loud"\n', "log.level", "debug"),
        ('[log]\nformat = "xml"\n', "log.format", "json"),
        ("node = 1\n", "node", "table"),
    ],
)
def test_wrong_type_or_value(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert str(error).startswith(f"{tmp_path / CONFIG_FILE}: {key}: ")
    assert words in str(error)


def test_link_config_value_error_names_key_and_file(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[link]\nmax_peers = 0\n")
    assert error.key == "link.max_peers"
    assert error.source == str(tmp_path / CONFIG_FILE)
    assert str(error) == f"{tmp_path / CONFIG_FILE}: link.max_peers: max_peers must be at least 1"


def test_link_cross_field_error_blames_the_key_that_was_set(tmp_path: Path) -> None:
    # reject_after_s (default 180) must exceed rekey_after_s: the user set only rekey_after_s.
    error = load_error(tmp_path, "[link]\nrekey_after_s = 500\n")
    assert error.key == "link.rekey_after_s"
    assert "reject_after_s must be greater than rekey_after_s" in str(error)


def test_invalid_toml(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[node\nlisten = \n")
    assert error.source == str(tmp_path / CONFIG_FILE)
    assert str(error).startswith(f"{tmp_path / CONFIG_FILE}: not valid TOML")


def test_bad_bootstrap_contact_names_the_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, f'[node]\nbootstrap = ["{CONTACT}", "1.2.3.4:5#nokey"]\n')
    assert error.key == "node.bootstrap[1]"
    assert f"{tmp_path / CONFIG_FILE}: node.bootstrap[1]: " in str(error)


def test_overrides_win_over_file(tmp_path: Path) -> None:
    write(tmp_path, '[node]\nlisten = "127.0.0.1:7000"\nrole = "exit"\n[log]\nlevel = "error"\n')
    config = load_config(
        tmp_path,
        overrides={
            "node.listen": "127.0.0.2:7001",
            "node.role": "relay",
            "node.bootstrap": [CONTACT],
            "log.format": "json",
            "log.level": "debug",
            "node.advertise": None,  # a flag that was not given
        },
    )
    assert config.listen == ("127.0.0.2", 7001)
    assert config.role is Role.RELAY
    assert config.bootstrap == (Contact.parse(CONTACT),)
    assert config.log == LogConfig(level="debug", format="json")
    assert config.advertise is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"node.listen": "nonsense:port"}, "node.listen"),
        ({"node.bootstrap": ["bad"]}, "node.bootstrap[0]"),
        ({"node.colour": "x"}, "node.colour"),
        ({"verbose": True}, "verbose"),
        ({"link.max_peers": 0}, "link.max_peers"),
        ({"node.listen": "1.2.3.4:\u00b2"}, "node.listen"),  # a digit int() refuses
        ({"node.bootstrap": [f"1.2.3.4:\u00b2#{KEY}"]}, "node.bootstrap[0]"),
    ],
)
def test_bad_override_names_command_line(
    tmp_path: Path, overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, overrides=overrides)
    assert info.value.key == key
    assert info.value.source == COMMAND_LINE
    assert str(info.value).startswith(f"command line: {key}: ")


def test_public_address(tmp_path: Path) -> None:
    assert NodeConfig(home=tmp_path).public_address() is None
    assert NodeConfig(home=tmp_path, listen=("::", 1)).public_address() is None
    local = NodeConfig(home=tmp_path, listen=("127.0.0.5", 1))
    assert local.public_address() == ("127.0.0.5", 1)
    advertised = NodeConfig(home=tmp_path, advertise=("203.0.113.7", 2))
    assert advertised.public_address() == ("203.0.113.7", 2)


def test_contact_address(tmp_path: Path) -> None:
    assert NodeConfig(home=tmp_path).contact_address() == (("127.0.0.1", 7520), True)
    assert NodeConfig(home=tmp_path, listen=("::", 9)).contact_address() == (("::1", 9), True)
    local = NodeConfig(home=tmp_path, listen=("127.0.0.5", 0))
    assert local.contact_address(bound=("127.0.0.5", 4242)) == (("127.0.0.5", 4242), False)
    advertised = NodeConfig(home=tmp_path, advertise=("203.0.113.7", 2))
    assert advertised.contact_address(bound=("0.0.0.0", 5)) == (("203.0.113.7", 2), False)


# --- [node] place, operator, bandwidth, state; [control] -------------------------------


def test_new_node_keys_and_control_table(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
[node]
region = "eu"
country = "de"
operator = "  Example Networks e.V. "
operator_contact = "noc@example.org"
bandwidth_bps = 100_000_000
state_dir = "/var/lib/meshnode"

[control]
enabled = false
listen = "127.0.0.1:7600"
""",
    )
    config = load_config(tmp_path)
    assert config.region == "EU"
    assert config.country == "DE"
    assert config.operator == "Example Networks e.V."
    assert config.operator_contact == "noc@example.org"
    assert config.bandwidth_bps == 100_000_000
    assert config.state_dir == Path("/var/lib/meshnode")
    assert config.control == ControlConfig(enabled=False, listen=("127.0.0.1", 7600))


E_ACUTE = "\u00e9"  # two bytes of UTF-8


def test_limits_are_the_descriptors(tmp_path: Path) -> None:
    write(
        tmp_path,
        f"""
[node]
region = "{"A" * 16}"
operator = "{"é" * 32}"
operator_contact = "{"x" * 128}"
bandwidth_bps = {10**13}
""",
    )
    config = load_config(tmp_path)
    assert config.region == "A" * 16
    assert len(config.operator.encode()) == 64
    assert config.bandwidth_bps == 10**13


@pytest.mark.parametrize(
    ("value", "expected"),
    [("state", "HOME/state"), ("data/mesh", "HOME/data/mesh"), ("/srv/m", "/srv/m")],
)
def test_state_dir_relative_to_home(tmp_path: Path, value: str, expected: str) -> None:
    write(tmp_path, f'[node]\nstate_dir = "{value}"\n')
    assert load_config(tmp_path).state_dir == Path(expected.replace("HOME", str(tmp_path)))


def test_state_dir_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    write(tmp_path, '[node]\nstate_dir = "~/meshstate"\n')
    assert load_config(tmp_path).state_dir == tmp_path / "user" / "meshstate"


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:0", ("::1", 0)), ("127.5.6.7:9", ("127.5.6.7", 9))],
)
def test_control_listen(tmp_path: Path, listen: str, expected: tuple[str, int]) -> None:
    write(tmp_path, f'[control]\nlisten = "{listen}"\n')
    assert load_config(tmp_path).control.listen == expected


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[node]\nregion = "EU!"\n', "node.region", "is not a region"),
        (f'[node]\nregion = "{"A" * 17}"\n', "node.region", "up to 16"),
        ('[node]\nregion = "\u0131t"\n', "node.region", "is not a region"),  # dotless i
        ("[node]\nregion = 5\n", "node.region", "string"),
        ('[node]\ncountry = "DEU"\n', "node.country", "ISO 3166-1 alpha-2"),
        ('[node]\ncountry = "D1"\n', "node.country", "two letters"),
        ('[node]\noperator = "' + "\u00e9" * 33 + '"\n', "node.operator", "at most 64 bytes"),
        ('[node]\noperator = "bell\\u0007"\n', "node.operator", "control"),
        ('[node]\noperator = "a\\u202eb"\n', "node.operator", "format"),  # bidi override
        ("[node]\noperator = true\n", "node.operator", "string"),
        (
            f'[node]\noperator_contact = "{"x" * 129}"\n',
            "node.operator_contact",
            "at most 128 bytes",
        ),
        ('[node]\noperator_contact = "a\\nb"\n', "node.operator_contact", "control"),
        ("[node]\nbandwidth_bps = -1\n", "node.bandwidth_bps", "from 0 to"),
        (f"[node]\nbandwidth_bps = {10**13 + 1}\n", "node.bandwidth_bps", "from 0 to"),
        ("[node]\nbandwidth_bps = true\n", "node.bandwidth_bps", "integer"),
        ("[node]\nbandwidth_bps = 1.5\n", "node.bandwidth_bps", "integer"),
        ('[node]\nbandwidth_bps = "100M"\n', "node.bandwidth_bps", "integer"),
        ('[node]\nstate_dir = ""\n', "node.state_dir", "empty"),
        ("[node]\nstate_dir = 7\n", "node.state_dir", "string"),
        ('[control]\nenabled = "yes"\n', "control.enabled", "true or false"),
        ('[control]\nlisten = "0.0.0.0:0"\n', "control.listen", "not a loopback address"),
        ('[control]\nlisten = "[::]:7600"\n', "control.listen", "not a loopback address"),
        ('[control]\nlisten = "192.0.2.1:7600"\n', "control.listen", "loopback"),
        ('[control]\nlisten = "localhost:7600"\n', "control.listen", "loopback"),
        ('[control]\nlisten = "127.0.0.1"\n', "control.listen", "PORT"),
        ('[control]\nlisten = "1.2.3:0"\n', "control.listen", "not an IP address"),
        ('[control]\nlisten = "127.0.0.1:70000"\n', "control.listen", "port"),
        ("[control]\nport = 1\n", "control.port", "unknown key"),
        ("control = 1\n", "control", "table"),
    ],
)
def test_new_keys_wrong_type_or_value(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert str(error).startswith(f"{tmp_path / CONFIG_FILE}: {key}: "), str(error)
    assert words in str(error)


def test_new_keys_overridden_by_flags(tmp_path: Path) -> None:
    write(
        tmp_path,
        '[node]\nregion = "EU"\ncountry = "DE"\noperator = "a"\noperator_contact = "b"\n',
    )
    config = load_config(
        tmp_path,
        overrides={
            "node.region": "na",
            "node.country": "us",
            "node.operator": "Flag Operator",
            "node.operator_contact": "flag@example.org",
            "node.bandwidth_bps": None,  # not given
        },
    )
    assert (config.region, config.country) == ("NA", "US")
    assert (config.operator, config.operator_contact) == ("Flag Operator", "flag@example.org")
    assert config.bandwidth_bps == 0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"node.region": "Europe!"}, "node.region"),
        ({"node.country": "Germany"}, "node.country"),
        ({"node.operator": "x" * 65}, "node.operator"),
        ({"node.operator_contact": "tab\there"}, "node.operator_contact"),
        ({"control.listen": "0.0.0.0:1"}, "control.listen"),
    ],
)
def test_new_keys_bad_override_names_command_line(
    tmp_path: Path, overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, overrides=overrides)
    assert info.value.key == key
    assert str(info.value).startswith(f"command line: {key}: ")


def test_normalizers() -> None:
    assert normalize_region(" apac ") == "APAC"
    assert normalize_region("us-east-1") == "US-EAST-1"
    assert normalize_region("") == ""
    assert normalize_country("de") == "DE"
    assert normalize_country("") == ""
    for bad in ("\u0131t", "\uff24\uff25", "d e"):  # dotless i, fullwidth DE, a space
        with pytest.raises(ValueError):
            normalize_country(bad)
    with pytest.raises(ValueError):
        normalize_region("e\u0131")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"region": "eu"},
        {"country": "DEU"},
        {"operator": "x" * 65},
        {"operator_contact": "\x00"},
        {"bandwidth_bps": -1},
        {"bandwidth_bps": True},
    ],
)
def test_node_config_refuses_what_a_descriptor_would(
    tmp_path: Path, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        NodeConfig(home=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_node_config_state_dir_default_follows_home(tmp_path: Path) -> None:
    assert NodeConfig(home=tmp_path).state_dir == tmp_path / "state"
    assert NodeConfig(home=tmp_path, state_dir=Path("/abs")).state_dir == Path("/abs")
    config = NodeConfig(home=tmp_path)
    assert dataclasses.replace(config, role=Role.RELAY).state_dir == tmp_path / "state"


@pytest.mark.parametrize("listen", [("0.0.0.0", 0), ("192.0.2.1", 1), ("localhost", 1)])
def test_control_config_loopback_only(listen: tuple[str, int]) -> None:
    with pytest.raises(ValueError, match="loopback"):
        ControlConfig(listen=listen)


# --- [dht]: every field of discovery.dht.DhtConfig, like [link] -------------------------


def test_dht_table(tmp_path: Path) -> None:
    write(tmp_path, "[dht]\nrefresh_interval_s = 2\nrpc_timeout_s = 1.0\nksize = 8\n")
    config = load_config(tmp_path).dht
    assert config == DhtConfig(refresh_interval_s=2.0, rpc_timeout_s=1.0, ksize=8)
    assert isinstance(config.refresh_interval_s, float)
    assert load_config(tmp_path / "empty").dht == DhtConfig()


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[dht]\nksize = "20"\n', "dht.ksize", "integer"),
        ("[dht]\nrpc_timeout_s = nan\n", "dht.rpc_timeout_s", "finite"),
        ("[dht]\nksize = 0\n", "dht.ksize", "ksize must be"),
        ("[dht]\nk = 20\n", "dht.k", "unknown key"),
    ],
)
def test_dht_bad_values(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert str(error).startswith(f"{tmp_path / CONFIG_FILE}: {key}: ")
    assert words in str(error)


def test_dht_cross_field_error_blames_the_key_that_was_set(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[dht]\nalpha = 30\n")  # alpha must be <= ksize (20)
    assert error.key == "dht.alpha"


def test_default_config_text_dht_values_are_the_defaults(tmp_path: Path) -> None:
    names = {f.name for f in dataclasses.fields(DhtConfig)}
    lines = []
    in_dht = False
    for line in default_config_text().splitlines():
        if line == "# [dht]":  # commented out, so that scripts may append their own [dht]
            in_dht = True
            lines.append("[dht]")
            continue
        name = line[2:].partition(" = ")[0]
        lines.append(line[2:] if in_dht and line.startswith("# ") and name in names else line)
    assert sum(1 for line in lines if line.partition(" = ")[0] in names) == len(names)
    write(tmp_path, "\n".join(lines))
    assert load_config(tmp_path).dht == DhtConfig()


def test_default_config_text_takes_an_appended_dht_table(tmp_path: Path) -> None:
    write(tmp_path, default_config_text() + "\n[dht]\nrefresh_interval_s = 2.0\n")
    assert load_config(tmp_path).dht.refresh_interval_s == 2.0
