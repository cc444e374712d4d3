"""``python -m UniversalSegLib`` runs the ``universalseg`` command line."""

import sys

from .cli import main

sys.exit(main())
