"""``python -m relprop ...``: the same as the ``relprop`` command."""
import sys

from .cli import main

sys.exit(main())
