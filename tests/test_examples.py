"""The README's quick start runs as written: ``examples/quickstart.py`` on the bundled model."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import Worker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_quickstart_prints_typed_values_from_the_bundled_model(
    worker_env: dict[str, str], llama_worker: Worker
) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(" -> ", 1) for line in result.stdout.splitlines())
    assert ast.literal_eval(printed["classify"]) in ("spam", "not spam")
    assert printed["extract(Person)"] == "Person(name='John Smith', age=42, city='Paris')"
    names = ast.literal_eval(printed["await extract_async(ThreeNames)"])
    assert len(names) == 3 and all(isinstance(name, str) and name for name in names)
    labels = ast.literal_eval(printed["await gather"])
    assert len(labels) == 3 and set(labels) <= {"positive", "negative"}
