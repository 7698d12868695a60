"""``python -m compress.export``: see :mod:`compress.export.cli`."""

import sys

from compress.export.cli import main

sys.exit(main())
