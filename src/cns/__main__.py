"""``python -m cns ...``: the same as the ``cns`` command."""

import sys

from .cli import main

sys.exit(main())
