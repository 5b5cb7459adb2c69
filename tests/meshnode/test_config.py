"""meshnode.config: TOML + overrides -> NodeConfig, and every way it says no."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from meshnode.config import (
    COMMAND_LINE,
    CONFIG_FILE,
    LogConfig,
    NodeConfig,
    Role,
    default_config_text,
    load_config,
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
    for key in ("listen", "advertise", "role", "bootstrap", "level", "format"):
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
