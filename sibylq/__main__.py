"""``python -m sibylq``: the ``sibylq`` command."""

import sys

try:  # Ctrl-C while the package itself is imported (``sibylq.cli`` guards its own imports)
    from .cli import main
except KeyboardInterrupt:
    print("sibylq: interrupted", file=sys.stderr)
    sys.exit(130)  # cli.EXIT_INTERRUPTED

sys.exit(main())
