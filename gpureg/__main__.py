"""``python -m gpureg``: the same as the ``gpureg`` command."""

from .cli import main

main()
