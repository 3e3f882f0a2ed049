"""``python -m memfl``: the ``memfl`` command."""

import sys

from memfl.cli import main

sys.exit(main())
