"""The typed API holds for a type checker: ``extract(Person, q)`` is a ``Person``,
``extract_async(list[str], q)`` a ``Job[list[str]]``, and so on (tests/typing/typed_api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "tests" / "typing" / "typed_api.py"


def test_mypy_sees_the_types_a_caller_asked_for() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(SNIPPET)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails_the_check(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from typing import assert_type\nfrom producer import Models\n"
        'assert_type(Models.create("fake").extract(int, "n"), str)\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(wrong)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "[assert-type]" in result.stdout, result.stdout
