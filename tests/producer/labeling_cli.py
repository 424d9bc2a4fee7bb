"""Running ``sibylq label`` as a user does, in a child process, for the labeling tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PROMPT = "Is this SMS spam? {text}"
SPAM_HAM = ["--model", "fake", "--classify", "spam,ham", "--prompt", PROMPT]


def run_label(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sibylq", "label", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line, checked to be one line with no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
