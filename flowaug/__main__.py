"""``python -m flowaug`` is the ``flowaug`` command."""

import sys

from .cli import main

sys.exit(main())
