"""The tests' OpenAI-compatible stub (``tests/openai_stub.py``) as a server process for benchmarks.

The model name picks the latency: ``stub-slow-250`` answers after 250 ms. The only change from
``python -m tests.openai_stub`` is a listen backlog deep enough for 256 clients connecting at
once (``socketserver``'s default of 5 would make them retry their SYNs, a second each).
"""

from __future__ import annotations

from tests import openai_stub

BACKLOG = 1024


def main() -> None:
    openai_stub._Server.request_queue_size = BACKLOG
    openai_stub.main()


if __name__ == "__main__":
    main()
