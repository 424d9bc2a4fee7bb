"""sibylq's version, as installed (pyproject.toml holds it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def sibylq_version() -> str:
    try:
        return version("sibylq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
