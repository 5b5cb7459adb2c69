"""meshnode.log: structlog configuration, JSON lines, level filtering, redaction."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime

import pytest

from meshnode.errors import ConfigError
from meshnode.log import REDACTED, configure_logging, get_logger, redact


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    configure_logging()  # back to the default (current stderr) for other tests


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_output_is_one_object_per_line() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    log = get_logger("tests.log", peer="p1")
    log.info("test.first", count=3)
    log.warning("test.second")
    first, second = json_lines(out)
    assert first["event"] == "test.first"
    assert first["level"] == "info"
    assert first["count"] == 3
    assert first["peer"] == "p1"
    assert first["logger"] == "tests.log"
    assert isinstance(first["timestamp"], str)
    assert datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    assert second["level"] == "warning"


def test_level_filtering() -> None:
    out = io.StringIO()
    configure_logging(level="warning", fmt="json", stream=out)
    log = get_logger("tests.log")
    log.debug("test.debug")
    log.info("test.info")
    log.error("test.error")
    assert [line["event"] for line in json_lines(out)] == ["test.error"]


def test_reconfigure_applies_to_existing_loggers() -> None:
    log = get_logger("tests.log")  # module-level style: created before configuration
    first, second = io.StringIO(), io.StringIO()
    configure_logging(fmt="json", stream=first)
    log.info("test.one")
    configure_logging(level="debug", fmt="json", stream=second)
    log.debug("test.two")
    assert [line["event"] for line in json_lines(first)] == ["test.one"]
    assert [line["event"] for line in json_lines(second)] == ["test.two"]


def test_redaction_of_secret_keys_and_bytes() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    get_logger("tests.log").info(
        "test.redact",
        identity_seed="s33d",
        link_private="k3y",
        Cookie="c",
        payload="p",
        plaintext_len=5,
        api_token="t",
        password="pw",
        secret="x",
        frame=b"\x00" * 7,
        buffer=bytearray(3),
        node_id="abc",
    )
    (line,) = json_lines(out)
    for key in (
        "identity_seed",
        "link_private",
        "Cookie",
        "payload",
        "plaintext_len",
        "api_token",
        "password",
        "secret",
    ):
        assert line[key] == REDACTED, key
    assert line["frame"] == "<7 bytes>"
    assert line["buffer"] == "<3 bytes>"
    assert line["node_id"] == "abc"
    text = out.getvalue()
    for leaked in ("s33d", "k3y", "pw"):
        assert leaked not in text


def test_redaction_in_console_output() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    get_logger("tests.log").info("test.console", seed="s33d", data=b"abcd")
    text = out.getvalue()
    assert "test.console" in text
    assert "s33d" not in text
    assert REDACTED in text
    assert "<4 bytes>" in text
    assert "\x1b[" not in text  # no colour: a StringIO is not a TTY


def test_redact_processor_directly() -> None:
    event = {"event": "x", "secret_key": "a", "blob": memoryview(b"12"), "n": 1}
    assert redact(None, "info", event) == {
        "event": "x",
        "secret_key": REDACTED,
        "blob": "<2 bytes>",
        "n": 1,
    }


def test_json_exception_has_no_locals() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    secret_local = "do-not-log-me"  # noqa: F841 - must not appear in the traceback
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("tests.log").exception("test.failed")
    (line,) = json_lines(out)
    assert line["event"] == "test.failed"
    assert "do-not-log-me" not in out.getvalue()


def test_default_stream_is_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    get_logger("tests.log").info("test.stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "test.stderr"


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_bad_level_or_format(level: str, fmt: str) -> None:
    with pytest.raises(ConfigError):
        configure_logging(level=level, fmt=fmt)
