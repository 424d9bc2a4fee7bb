"""Model references: ``"provider:name[,key=value...]"`` and the queue each one is served on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

from .constants import queue_name
from .errors import ConfigurationError, UnknownModelError
from .providers import API_PROVIDERS

#: Every provider a reference may name: the API ones (``wire.providers``), then the local ones.
PROVIDERS = (*API_PROVIDERS, "llamacpp", "fake")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference, e.g. ``openai:gpt-4o-mini``, ``groq:llama-3.1-8b-instant`` or
    ``fake:delay=0.2``."""

    provider: str
    name: str = ""
    options: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def queue(self) -> str:
        """The default queue: one per provider for APIs (``sibylq.groq``), one per model file
        for llama.cpp."""
        if self.provider == "llamacpp":
            return queue_name("llamacpp", model_stem(self.name))
        return queue_name(self.provider)

    def __str__(self) -> str:
        extras = [f"{key}={value}" for key, value in self.options.items()]
        rest = ",".join([self.name, *extras] if self.name else extras)
        return f"{self.provider}:{rest}" if rest else self.provider


def model_stem(name: str) -> str:
    """``/models/Qwen2.5-0.5B.Q4.gguf`` -> ``Qwen2.5-0.5B.Q4``; a bare name stays as it is."""
    path = PurePath(name)
    return path.stem if path.suffix == ".gguf" else path.name


def parse_model_ref(ref: str, *, any_api_model: bool = False) -> ModelRef:
    """Parse ``"provider:name[,key=value...]"``; raises UnknownModelError.

    ``any_api_model`` admits a bare API provider (``openai``, ``groq``...): a worker that
    serves every model of its API.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UnknownModelError(f"a model reference must be a non-empty string, not {ref!r}")
    provider, _, rest = ref.strip().partition(":")
    if provider not in PROVIDERS:
        raise UnknownModelError(
            f"unknown provider {provider!r} in {ref!r}; use one of: "
            + ", ".join(f"{name}:..." for name in PROVIDERS)
        )
    names, options = _split_options(rest, ref)
    if len(names) > 1:
        raise UnknownModelError(f"{ref!r} names more than one model: {names!r}")
    name = names[0] if names else ""
    optional = provider == "fake" or (any_api_model and provider in API_PROVIDERS)
    if not name and not optional:
        raise UnknownModelError(f"{ref!r} needs a model name, e.g. {provider}:<name>")
    return ModelRef(provider=provider, name=name, options=options)


def fake_delay_s(options: Mapping[str, str]) -> float:
    """The ``fake`` model's ``delay=<s>`` option, checked; raises ConfigurationError for an
    unknown option or a delay that is not a number of seconds >= 0."""
    unknown = set(options) - {"delay"}
    if unknown:
        raise ConfigurationError(f"unknown fake option(s) {sorted(unknown)}; fake takes delay=<s>")
    raw = options.get("delay", "0")
    try:
        delay = float(raw)
    except ValueError:
        delay = -1.0
    if not delay >= 0:  # also NaN
        raise ConfigurationError(f"fake:delay must be a number of seconds >= 0, not {raw!r}")
    return delay


def _split_options(rest: str, ref: str) -> tuple[list[str], dict[str, str]]:
    names: list[str] = []
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            names.append(item)
        elif not key or not value:
            raise UnknownModelError(f"bad option {item!r} in {ref!r}; write key=value")
        else:
            options[key] = value
    return names, options


def serves(worker_model: str, job_model: str) -> bool:
    """Whether a worker started for ``worker_model`` (``sibylq worker MODEL``) runs jobs for
    ``job_model``: the same provider, and for llama.cpp the same model file (by stem:
    ``llamacpp:/models/x.gguf`` serves ``llamacpp:x``). An API worker serves every model of its
    endpoint, as its queue carries them all (``openai:<any>``, ``groq:<any>``, ``fake:<any
    options>``)."""
    served, wanted = parse_model_ref(worker_model, any_api_model=True), parse_model_ref(job_model)
    if served.provider != wanted.provider:
        return False
    return served.provider != "llamacpp" or model_stem(served.name) == model_stem(wanted.name)
