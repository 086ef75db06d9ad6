"""Run the fake Metrix server from a checkout; the server itself is :mod:`metrix_s2s.fakeserver`.

    python scripts/fake_metrix.py --port 8080 --app my-app=dev-key
    METRIX_APPS='{"my-app": "dev-key"}' python scripts/fake_metrix.py --host 0.0.0.0

Tests and scripts that put ``scripts/`` on ``sys.path`` may ``from fake_metrix import FakeMetrix``.
"""

from __future__ import annotations

import sys

from metrix_s2s.fakeserver import (
    FakeMetrix,
    Received,
    _parser,
    load_apps_json,
    main,
    validate_event,
)

__all__ = ["FakeMetrix", "Received", "_parser", "load_apps_json", "main", "validate_event"]

if __name__ == "__main__":
    sys.exit(main())
