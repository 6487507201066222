"""``python -m gpureg``: the same as the ``gpureg`` command."""

import sys

from .cli import main

sys.exit(main())
