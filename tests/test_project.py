"""Promises the project makes about itself: lint and types are clean, the producer stays
light, and the docs' configuration table lists every setting."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from wire.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=" ".join,
)
def test_code_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_layers_hold() -> None:
    """pyproject's ``[tool.importlinter]`` contracts: sibylq > producer | workers > embedded >
    wire, workers without the facade, and no model SDK on the caller's side."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = config["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout, result.stdout
    for contract in contracts:
        assert f"{contract['name']} KEPT" in result.stdout


def test_the_producer_never_imports_llama_cpp_or_openai() -> None:
    code = (
        "import sys, producer, sibylq.cli, producer.job, producer.listener; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'openai')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_the_configuration_page_documents_every_setting() -> None:
    readme = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`(SIBYLQ_[A-Z0-9_]+)`", readme))
    assert {f"SIBYLQ_{name.upper()}" for name in Settings.model_fields} <= documented
