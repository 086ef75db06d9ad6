"""``python -m metrix_s2s.cli``: the ``metrix-s2s`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
