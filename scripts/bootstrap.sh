# Sourced by ./run-demo and ./run-tests: creates .venv with nothing but Python 3.11+
# and installs meshnode with its dev tools. Re-installs only when the packaging
# files change (a stamp holds their hash), so a second run starts at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "meshnode needs Python 3.11 or newer as '$PY' (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
VENV=${MESHNODE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.meshnode-installed"
want=$(cat setup.cfg pyproject.toml | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing meshnode and its dev tools into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]' >&2
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
