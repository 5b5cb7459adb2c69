"""Helpers for system tests that run `meshnode` processes: the CLI, the control API, polling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import pytest

MESHNODE = [sys.executable, "-m", "meshnode"]


class HasHome(Protocol):
    home: Path


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `meshnode ARGS...` and capture its output (never raises on a non-zero exit)."""
    return subprocess.run(
        [*MESHNODE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def api(node: HasHome, path: str) -> Any:
    """GET ``path`` from the control API of the node whose home is ``node.home``."""
    endpoint = json.loads((node.home / "control.json").read_text())
    token = (node.home / "control.token").read_text().strip()
    req = urllib.request.Request(
        endpoint["url"] + path, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_for(what: str, check: Any, *, timeout: float, interval: float = 0.3) -> None:
    """Poll ``check()`` until it returns True; fail with its last answer after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last is True:
                return
        except OSError as exc:  # control API not up yet
            last = exc
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}: {last!r}")
