"""``python -m serving.edge``: the ``terrahash-edge`` command."""
import sys

from .cli import main

sys.exit(main())
