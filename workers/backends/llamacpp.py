"""The llama.cpp backend: a GGUF model loaded once per worker process, output constrained by a
grammar built from the job's JSON schema.

``Llama`` is not thread-safe. With ``SIBYLQ_LLAMA_BATCH`` = 1 a worker runs one job at a time
per process (prefork) through ``create_chat_completion``. Above 1, a threads pool hands its
jobs to one batching engine per model (``llama_engine``), whose thread alone uses the model.
The schema also goes into the system instruction (as Sibila does for local models): small
models follow a grammar far better when they are told what it is for.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from llama_cpp import Llama, LogitsProcessorList

from wire.contract import Usage
from wire.errors import BackendError, ConfigurationError, PromptTooLongError
from wire.modelref import model_stem, parse_model_ref
from wire.settings import Settings

from ..label_probs import ChoiceProbe, choice_labels
from ..model_files import resolve_model_path
from .base import (
    Completion,
    CompletionRequest,
    ModelContext,
    TokenCount,
)
from .llama_engine import LlamaEngine
from .llama_prompt import chat_messages, chat_prompt
from .llama_sequence import ChoiceObserver, grammar_for

#: The one-job path's context when the model serves a batching engine: ``Llama``'s own context
#: then only backs tokenizing and the chat template.
SPARE_N_CTX = 512

log = logging.getLogger(__name__)


class LlamaCppBackend:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._models: dict[Path, Llama] = {}
        self._engines: dict[Path, LlamaEngine] = {}
        self._lock = threading.Lock()

    def context(self, model: str) -> ModelContext:
        """A job's context: ``SIBYLQ_LLAMA_N_CTX`` (each of a batching engine's sequences has
        that much); no output limit but that context."""
        llm = self.load(resolve_model_path(self._served_name(model), self._settings))
        batching = self._settings.llama_batch > 1
        return ModelContext(ctx_len=self._settings.llama_n_ctx if batching else llm.n_ctx())

    def count_tokens(self, request: CompletionRequest) -> TokenCount:
        """The prompt's tokens as ``complete`` evaluates them: the schema instruction added,
        the model's chat handler applied (``llama_prompt``), tokenized by the model."""
        llm = self.load(resolve_model_path(self._served_name(request.model), self._settings))
        chat = chat_messages(request.messages, request.json_schema)
        with self._lock:
            prompt = chat_prompt(llm, chat, request.genconf.stop)
        return TokenCount(len(prompt.tokens), exact=True)

    def complete(self, request: CompletionRequest) -> Completion:
        path = resolve_model_path(self._served_name(request.model), self._settings)
        if self._settings.llama_batch > 1:
            return self.engine(path).complete(request)
        llm = self.load(path)
        schema = request.json_schema
        genconf = request.genconf
        labels = choice_labels(schema)
        observer = None if labels is None else ChoiceObserver(llm, ChoiceProbe(labels))
        try:
            with self._lock:
                response: Any = llm.create_chat_completion(
                    messages=chat_messages(request.messages, schema),
                    grammar=None if schema is None else grammar_for(json.dumps(schema)),
                    max_tokens=genconf.max_tokens,
                    temperature=genconf.temperature,
                    top_p=genconf.top_p,
                    stop=list(genconf.stop) or None,
                    seed=genconf.seed,
                    logits_processor=None if observer is None else LogitsProcessorList([observer]),
                )
        except ValueError as exc:
            if "context window" in str(exc):
                raise PromptTooLongError(
                    f"{exc}; shorten the prompt or raise SIBYLQ_LLAMA_N_CTX"
                ) from exc
            raise BackendError(f"llama.cpp failed: {exc}") from exc
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        text = choice["message"].get("content") or ""
        return Completion(
            text=text,
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
            ),
            model=str(request.model),
            label_probs=None if observer is None else observer.probe.result(text),
        )

    def close(self) -> None:
        """Stop the batching engines (their running jobs fail); the models stay loaded."""
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()

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

    def engine(self, path: Path) -> LlamaEngine:
        """The batching engine of the model at ``path``, started on first use."""
        llm = self.load(path)
        with self._lock:
            if path not in self._engines:
                batch, n_ctx = self._settings.llama_batch, self._settings.llama_n_ctx
                self._engines[path] = LlamaEngine(llm, batch, n_ctx)
            return self._engines[path]

    def load(self, path: Path) -> Llama:
        """The model at ``path``, loaded on first use and kept for the process's life."""
        batching = self._settings.llama_batch > 1
        with self._lock:
            if path not in self._models:
                try:
                    self._models[path] = Llama(
                        model_path=str(path),
                        n_ctx=SPARE_N_CTX if batching else self._settings.llama_n_ctx,
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
