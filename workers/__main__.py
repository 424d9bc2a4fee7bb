"""``python -m workers MODEL [-c N] [-P POOL] [-Q QUEUE]``: run a worker (``sibylq worker``)."""

import sys

from .cli import main

sys.exit(main())
