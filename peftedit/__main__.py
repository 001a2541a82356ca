"""``python -m peftedit``: the same as the ``peftedit`` command."""

import sys

from .cli import main

sys.exit(main())
