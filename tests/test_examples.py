"""The examples run, and the example config is what `meshnode init` writes."""

import subprocess
import sys
from pathlib import Path

from meshnode.config import default_config_text, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_two_nodes_example_runs():
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "two_nodes_loopback.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "bob got: b'hello, bob'" in res.stdout


def test_example_config_matches_defaults(tmp_path):
    text = (ROOT / "examples" / "meshnode.example.toml").read_text()
    assert text == default_config_text()
    assert load_config(tmp_path, path=ROOT / "examples" / "meshnode.example.toml").link
