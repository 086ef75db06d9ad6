# Sourced by scripts/test and scripts/demo: make (or reuse) the project's virtual environment and
# install the project into it from its own files. Sets $PY to the environment's python.
# METRIX_VENV chooses where it lives (default: .venv in the project); PYTHON, the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${METRIX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "metrix-s2s needs Python 3.11 or newer; '$PYTHON' is $("$PYTHON" -V 2>&1)." >&2
  echo "Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating a virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Reinstall only when the project's metadata changed since the last install.
STAMP="$VENV/.metrix-s2s-installed"
WANT="$(cksum < "$ROOT/pyproject.toml") ${METRIX_EXTRAS:-dev}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing metrix-s2s[${METRIX_EXTRAS:-dev}] into $VENV" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[${METRIX_EXTRAS:-dev}]"
  echo "$WANT" > "$STAMP"
fi
