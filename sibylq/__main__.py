"""``python -m sibylq``: the ``sibylq`` command."""

import sys

from .cli import main

sys.exit(main())
