"""``python -m medsynth``: the same entry point as the ``medsynth`` console script."""

import sys

from medsynth.cli import main

sys.exit(main())
