"""Continuous batching over one llama.cpp context: up to ``N`` jobs decoded together.

One engine thread per worker process owns the model's batching context (``Llama`` is still
used by one thread only). Callers (the threads of a Celery threads pool) hand it a
``CompletionRequest`` and block on a future. Between decode steps the engine admits waiting
requests into free sequence ids and ends sequences that finished, ran past their deadline,
or were cancelled (revoked), freeing their KV cells at once (but for their prompt's, which
the next job in that sequence reuses as far as its prompt starts the same); each step decodes
one ``llama_batch`` holding a chunk of every new prompt and the last token of every running
sequence, then samples each sequence with its own sampler (its grammar included).

The KV cache is not unified: each sequence has ``n_ctx`` cells of its own
(``SIBYLQ_LLAMA_N_CTX``), the context ``N * n_ctx``; a prompt that does not fit its own cells
fails alone with ``PromptTooLongError``, as it does on the one-job path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp import Llama
from llama_cpp import _internals as internals

from wire.errors import BackendError, JobCancelledError, PromptTooLongError, SibylqError

from ..label_probs import ChoiceProbe, choice_labels
from .base import Completion, CompletionRequest
from .llama_prompt import ChatPrompt, chat_messages, chat_prompt
from .llama_prompt_cache import PromptCache, common_prefix
from .llama_sequence import Sampler, Sequence, grammar_for

log = logging.getLogger(__name__)

#: Tokens per decode step (prompt chunks plus one token per running sequence).
N_BATCH = 512
#: How long an idle engine sleeps before it looks at its waiting jobs' deadlines again.
IDLE_POLL_S = 0.05


@dataclass
class _Job:
    request: CompletionRequest
    future: Future[Completion]

    def ended(self) -> SibylqError | None:
        """Why the job must end now, if it must: its deadline passed, or it was revoked."""
        deadline, cancelled = self.request.deadline, self.request.cancelled
        if deadline is not None and deadline.remaining_s() <= 0:
            return deadline.error()
        if cancelled is not None and cancelled():
            return JobCancelledError(self.request.job_id or "(unknown)")
        return None


class LlamaEngine:
    """The batching engine of one model. ``complete`` is safe from any thread."""

    def __init__(self, llm: Llama, n_seq: int, n_ctx_seq: int) -> None:
        self._llm = llm
        self._n_seq = n_seq
        self._n_ctx_seq = n_ctx_seq
        self._ctx = _batching_context(llm, n_seq, n_ctx_seq)
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._prompts = PromptCache(self._ctx.ctx, self._memory)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._waiting: list[_Job] = []
        self._active: dict[int, tuple[_Job, Sequence]] = {}
        self._kept: dict[int, tuple[int, ...]] = {}  # tokens left in a free sequence's cells
        self._shared: dict[int, int] = {}  # of those, how many two jobs in a row shared
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()
        log.info(
            "llama batching engine: %d sequences x n_ctx %d = %d KV cells, %.0f MiB (f16)",
            n_seq,
            n_ctx_seq,
            n_seq * n_ctx_seq,
            kv_cache_bytes(llm, n_seq * n_ctx_seq) / 2**20,
        )

    def complete(self, request: CompletionRequest) -> Completion:
        """Run ``request`` in the next free sequence; blocks until it ends."""
        if not self._thread.is_alive():
            raise BackendError("the llama batching engine has stopped; restart the worker")
        job = _Job(request, Future())
        self._inbox.put(job)
        return job.future.result()

    def active(self) -> int:
        """Sequences being decoded now (each holds a sequence id and its KV cells)."""
        return len(self._active)

    def close(self) -> None:
        """Stop the engine thread (jobs still running fail) and free the context."""
        self._inbox.put(None)
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()

    # -- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take(block=not self._active):
                self._end_finished()
                self._admit()
                if self._active:
                    self._step()
        except BaseException as exc:  # a bug: fail every job instead of hanging its caller
            log.exception("llama batching engine stopped")
            self._fail_all(BackendError(f"the llama batching engine stopped: {exc}"))
            raise
        self._fail_all(BackendError("the worker is stopping"))

    def _take(self, *, block: bool) -> bool:
        """Move new requests to the waiting list; False once asked to stop."""
        try:
            job = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
            while True:
                if job is None:
                    return False
                self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _end_finished(self) -> None:
        for job in list(self._waiting):
            error = job.ended()
            if error is not None:
                self._waiting.remove(job)
                job.future.set_exception(error)
        for seq_id, (job, sequence) in list(self._active.items()):
            if sequence.finish_reason is not None:
                self._release(seq_id)
                job.future.set_result(sequence.completion())
            elif (error := job.ended()) is not None:
                self._release(seq_id)
                job.future.set_exception(error)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self._n_seq:
            job = self._waiting.pop(0)
            try:
                prompt, max_tokens, sampler = self._prepare(job.request)
            except SibylqError as exc:
                job.future.set_exception(exc)
                continue
            seq_id, reused = self._slot_for(prompt.tokens)
            model = str(job.request.model)
            labels = choice_labels(job.request.json_schema)
            probe = None if labels is None else ChoiceProbe(labels)
            sequence = Sequence(seq_id, prompt, max_tokens, sampler, model, fed=reused, probe=probe)
            self._active[seq_id] = (job, sequence)

    def _prepare(self, request: CompletionRequest) -> tuple[ChatPrompt, int, Sampler]:
        schema = request.json_schema
        messages = chat_messages(request.messages, schema)
        prompt = chat_prompt(self._llm, messages, request.genconf.stop)
        if len(prompt.tokens) >= self._n_ctx_seq:
            raise PromptTooLongError(
                f"Requested tokens ({len(prompt.tokens)}) exceed context window of "
                f"{self._n_ctx_seq}; shorten the prompt or raise SIBYLQ_LLAMA_N_CTX"
            )
        max_tokens = min(request.genconf.max_tokens, self._n_ctx_seq - len(prompt.tokens))
        grammar = None if schema is None else grammar_for(json.dumps(schema))
        return prompt, max_tokens, Sampler(self._llm, request.genconf, grammar)

    def _slot_for(self, tokens: tuple[int, ...]) -> tuple[int, int]:
        """The free sequence id whose cells still hold the longest prefix of ``tokens`` (its
        last job's prompt: the same system instruction and schema, say), and that prefix's
        length. Only the rest is decoded, always including the last token, whose logits are
        sampled: what ``Llama`` does between two calls, and llama-server per slot.

        Schemas taking turns keep their prefixes (``PromptCache``): the part of the cells
        that its last two jobs shared (a system instruction and schema, not one job's own
        text) is saved before it is dropped, and a saved prefix that starts ``tokens`` is
        loaded back."""
        free = [seq_id for seq_id in range(self._n_seq) if seq_id not in self._active]
        best = max(free, key=lambda seq_id: common_prefix(self._kept.get(seq_id, ()), tokens))
        held = self._kept.get(best, ())
        reused = common_prefix(held, tokens)
        shared = min(self._shared.get(best, 0), len(held))
        if shared > reused:
            llama_cpp.llama_memory_seq_rm(self._memory, best, shared, -1)
            self._prompts.save(best, held[:shared])
        reused = min(self._prompts.restore(best, tokens, reused), len(tokens) - 1)
        llama_cpp.llama_memory_seq_rm(self._memory, best, reused, -1)
        self._kept[best] = tokens[:reused]
        self._shared[best] = reused
        return best, reused

    def _release(self, seq_id: int, *, keep_prompt: bool = True) -> None:
        """End ``seq_id``'s sequence; its prompt's cells stay for the next job to reuse
        (``_slot_for``), unless ``keep_prompt`` is False (a failed decode: cells unknown)."""
        _, sequence = self._active.pop(seq_id)
        sequence.sampler.free()
        kept = min(sequence.fed, len(sequence.prompt.tokens)) if keep_prompt else 0
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, kept, -1)
        self._kept[seq_id] = sequence.prompt.tokens[:kept]

    def _step(self) -> None:
        """One ``llama_decode`` over every active sequence, then one sample for each sequence
        whose prompt is all in."""
        sampled = self._fill_batch()
        code = llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        if code != 0:  # the batch's sequences fail; the engine serves the next ones
            for seq_id, (job, _) in list(self._active.items()):
                self._release(seq_id, keep_prompt=False)
                job.future.set_exception(BackendError(f"llama_decode failed with code {code}"))
            return
        for seq_id, index in sampled:
            sequence = self._active[seq_id][1]
            sequence.observe(self._llm, self._ctx.ctx, index)
            token = sequence.sampler.sample(self._ctx.ctx, index)
            sequence.accept(self._llm, token)

    def _fill_batch(self) -> list[tuple[int, int]]:
        """Put each sequence's pending tokens in the batch (running sequences first, one token
        each, then prompt chunks while room is left); the (sequence, batch index) pairs whose
        logits are to be sampled.

        The tokens go in in sequence-id order: llama.cpp splits a batch over per-sequence KV
        streams into ubatches of sequences whose ids follow each other in batch order
        (``split_equal``, sequential), and each ubatch is one more pass over the weights. In
        admission order, one token of each of 8 sequences took up to 8 passes instead of one."""
        room, planned = N_BATCH, {}
        for _, sequence in sorted(self._active.values(), key=lambda entry: entry[1].prefilling):
            tokens = sequence.pending_tokens()[:room]
            planned[sequence.seq_id] = (sequence, tokens)
            room -= len(tokens)
        batch, count, sampled = self._batch, 0, []
        for seq_id in sorted(planned):
            sequence, tokens = planned[seq_id]
            for offset, token in enumerate(tokens):
                batch.token[count] = token
                batch.pos[count] = sequence.fed + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = seq_id
                batch.logits[count] = False
                count += 1
            sequence.fed += len(tokens)
            if tokens and not sequence.prefilling:
                batch.logits[count - 1] = True
                sampled.append((seq_id, count - 1))
        batch.n_tokens = count
        return sampled

    def _fail_all(self, error: SibylqError) -> None:
        for job in self._waiting:
            job.future.set_exception(error)
        for seq_id, (job, _) in list(self._active.items()):
            self._release(seq_id)
            job.future.set_exception(error)
        self._waiting.clear()
        with contextlib.suppress(queue.Empty):
            while (job_or_none := self._inbox.get_nowait()) is not None:
                job_or_none.future.set_exception(error)


def kv_cache_bytes(llm: Llama, cells: int) -> int:
    """The size of an f16 KV cache of ``cells`` cells for ``llm``'s model (keys and values,
    every layer)."""
    model = llm.model
    n_head = max(1, llama_cpp.llama_model_n_head(model))
    head_dim = llama_cpp.llama_model_n_embd(model) // n_head
    per_cell = 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model)
    return int(per_cell * head_dim * 2 * cells)


def _batching_context(llm: Llama, n_seq: int, n_ctx_seq: int) -> Any:
    """A second context on ``llm``'s model (no second copy of the weights): ``n_seq``
    sequences of ``n_ctx_seq`` cells each."""
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx = n_seq * n_ctx_seq
    params.n_batch = params.n_ubatch = N_BATCH
    params.n_seq_max = n_seq
    params.kv_unified = False
    try:
        return internals.LlamaContext(model=llm._model, params=params, verbose=False)
    except ValueError as exc:
        raise BackendError(
            f"cannot create a llama.cpp context for {n_seq} sequences: {exc}"
        ) from exc
