"""Exit 0 if llama-cpp-python loads the bundled model and decodes; crash or exit 1 if not.

Run as its own process: a wheel built for another CPU dies here with SIGILL or SIGSEGV.
"""

from __future__ import annotations

import sys

from wire.settings import Settings
from workers.model_files import resolve_model_path


def main() -> int:
    from llama_cpp import Llama

    llm = Llama(model_path=str(resolve_model_path("smollm2", Settings())), verbose=False)
    out = llm.create_completion("Hello", max_tokens=2)
    return 0 if out["choices"] else 1


if __name__ == "__main__":
    sys.exit(main())
