"""Run the fake Metrix server from a checkout; the server is :mod:`metrix_s2s.testing.fake_metrix`.

    python scripts/fake_metrix.py --port 8080 --app my-app=dev-key
    METRIX_APPS='{"my-app": "dev-key"}' python scripts/fake_metrix.py --host 0.0.0.0

Tests and scripts that put ``scripts/`` on ``sys.path`` may ``from fake_metrix import FakeMetrix``.
"""

from __future__ import annotations

import sys

from metrix_s2s.testing.fake_metrix import (
    FakeMetrix,
    Received,
    _parser,
    load_apps_json,
    run_command_line,
    server_objection,
)

__all__ = [
    "FakeMetrix",
    "Received",
    "_parser",
    "load_apps_json",
    "run_command_line",
    "server_objection",
]

if __name__ == "__main__":
    sys.exit(run_command_line())
