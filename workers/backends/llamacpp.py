"""The llama.cpp backend: a GGUF model loaded once per worker process, output constrained by a
grammar built from the job's JSON schema.

``Llama`` is not thread-safe: llama workers run one job at a time per process and scale by
processes. The schema also goes into the system instruction (as Sibila does for local
models): small models follow a grammar far better when they are told what it is for.
"""

from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from wire.contract import Message, Usage
from wire.errors import BackendError, ConfigurationError, PromptTooLongError
from wire.modelref import model_stem, parse_model_ref
from wire.settings import Settings

from ..model_files import resolve_model_path
from .base import (
    Completion,
    CompletionRequest,
    ModelContext,
    TokenCount,
    with_schema_instruction,
)

log = logging.getLogger(__name__)


class LlamaCppBackend:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._models: dict[Path, Llama] = {}
        self._lock = threading.Lock()
        self._formatters: dict[Path, Jinja2ChatFormatter | None] = {}

    def context(self, model: str) -> ModelContext:
        """The context the model was loaded with (``SIBYLQ_LLAMA_N_CTX``); no output limit
        but that context."""
        llm = self.load(resolve_model_path(self._served_name(model), self._settings))
        return ModelContext(ctx_len=llm.n_ctx())

    def count_tokens(self, request: CompletionRequest) -> TokenCount:
        """The prompt's tokens as ``complete`` sends it: the schema instruction added, the
        model's chat template applied, tokenized by the model's tokenizer. A model without a
        chat template in its GGUF is counted without one, as an estimate."""
        path = resolve_model_path(self._served_name(request.model), self._settings)
        llm = self.load(path)
        chat = _chat_messages(request.messages, request.json_schema)
        with self._lock:
            formatter = self._formatter(path, llm)
            if formatter is None:
                text = "\n".join(str(message["content"]) for message in chat)
                return TokenCount(len(llm.tokenize(text.encode(), add_bos=True)), exact=False)
            prompt = formatter(messages=chat)
            tokens = llm.tokenize(
                prompt.prompt.encode(), add_bos=not prompt.added_special, special=True
            )
        return TokenCount(len(tokens), exact=True)

    def _formatter(self, path: Path, llm: Llama) -> Jinja2ChatFormatter | None:
        """The GGUF's chat template, as llama-cpp-python applies it (None: it has none)."""
        if path not in self._formatters:
            template = llm.metadata.get("tokenizer.chat_template")
            self._formatters[path] = (
                None
                if template is None
                else Jinja2ChatFormatter(
                    template=template,
                    eos_token=_token_text(llm, llm.token_eos()),
                    bos_token=_token_text(llm, llm.token_bos()),
                )
            )
        return self._formatters[path]

    def complete(self, request: CompletionRequest) -> Completion:
        llm = self.load(resolve_model_path(self._served_name(request.model), self._settings))
        schema = request.json_schema
        genconf = request.genconf
        try:
            with self._lock:
                response: Any = llm.create_chat_completion(
                    messages=_chat_messages(request.messages, schema),
                    grammar=None if schema is None else _grammar(json.dumps(schema)),
                    max_tokens=genconf.max_tokens,
                    temperature=genconf.temperature,
                    top_p=genconf.top_p,
                    stop=list(genconf.stop) or None,
                    seed=genconf.seed,
                )
        except ValueError as exc:
            if "context window" in str(exc):
                raise PromptTooLongError(
                    f"{exc}; shorten the prompt or raise SIBYLQ_LLAMA_N_CTX"
                ) from exc
            raise BackendError(f"llama.cpp failed: {exc}") from exc
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
            ),
            model=str(request.model),
        )

    def _served_name(self, requested: str) -> str:
        """The worker's own model file when it was started for one (``sibylq worker``)."""
        if self._settings.worker_model is None:
            return requested
        served = parse_model_ref(self._settings.worker_model)
        if model_stem(served.name) != model_stem(requested):
            raise ConfigurationError(
                f"this worker serves {served}, not llamacpp:{requested}: check the queue routing"
            )
        return served.name

    def load(self, path: Path) -> Llama:
        """The model at ``path``, loaded on first use and kept for the process's life."""
        with self._lock:
            if path not in self._models:
                try:
                    self._models[path] = Llama(
                        model_path=str(path),
                        n_ctx=self._settings.llama_n_ctx,
                        n_gpu_layers=self._settings.llama_n_gpu_layers,
                        n_threads=self._settings.llama_n_threads,
                        verbose=False,
                    )
                except (ValueError, RuntimeError) as exc:
                    raise BackendError(f"cannot load model {path}: {exc}") from exc
                llm = self._models[path]
                log.info(
                    "loaded %s: n_ctx=%d, n_threads=%d, n_gpu_layers=%d",
                    path.name,
                    llm.n_ctx(),
                    llm.n_threads,
                    self._settings.llama_n_gpu_layers,
                )
            return self._models[path]


def _token_text(llm: Llama, token: int) -> str:
    return "" if token == -1 else llm.detokenize([token], special=True).decode(errors="replace")


@lru_cache(maxsize=64)
def _grammar(schema_json: str) -> LlamaGrammar:
    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


def _chat_messages(messages: tuple[Message, ...], schema: dict[str, Any] | None) -> list[Any]:
    """The chat as llama.cpp's text chat formats take it: string contents. Producers refuse
    images for llama.cpp models before enqueueing; a job with images from elsewhere fails."""
    if any(message.images for message in messages):
        raise BackendError(
            "this llama.cpp worker takes no images (sibylq loads no multimodal projector yet); "
            "send image jobs to an openai: model"
        )
    chat: list[dict[str, Any]] = [
        {"role": message.role, "content": message.text} for message in messages
    ]
    return chat if schema is None else with_schema_instruction(chat, schema)
