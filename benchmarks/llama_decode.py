"""What batching can gain on this machine at most: ``llama_decode``'s cost per token when it
decodes one token of each of ``n`` sequences in one step, against one sequence alone, and its
cost per token when it evaluates a prompt.

A batching engine cannot beat these: a job's prompt tokens cost what they cost in a batch or
alone, and its generated tokens cost what one step of ``n`` costs, divided by ``n``. On a GPU
a step of 8 costs about what a step of 1 does; on a few CPU cores it costs several times more,
and that bounds the gain.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

#: Tokens of the prompt each sequence holds before the timed steps.
PROMPT_TOKENS = 40
STEPS = 8


@dataclass(frozen=True)
class DecodeCosts:
    """Milliseconds per token: a prompt evaluated in one batch, and a generation step of
    ``n`` sequences (one token each) for each ``n`` measured."""

    prompt_ms: float
    step_ms: dict[int, float]


def decode_costs(llm: Any, sizes: tuple[int, ...]) -> DecodeCosts:
    """Measured on ``llm``'s model with its threads, in a context of ``max(sizes)``
    sequences (the batching engine's kind: one KV stream each)."""
    import llama_cpp
    from llama_cpp import _internals as internals

    text = b"Is this SMS spam? Free entry in 2 a wkly comp to win FA Cup final tkts 21st May"
    tokens = (llm.tokenize(text, add_bos=False) * 4)[:PROMPT_TOKENS]
    n_seq = max(sizes)
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx, params.n_batch, params.n_ubatch = n_seq * 256, 512, 512
    params.n_seq_max, params.kv_unified = n_seq, False
    ctx: Any = internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(max(512, n_seq), 0, 1)
    try:
        memory = llama_cpp.llama_get_memory(ctx.ctx)

        def decode(entries: list[tuple[int, int, int]], *, every_logit: bool = True) -> float:
            for index, (token, pos, seq_id) in enumerate(entries):
                batch.token[index], batch.pos[index] = token, pos
                batch.n_seq_id[index], batch.seq_id[index][0] = 1, seq_id
                batch.logits[index] = every_logit or index == len(entries) - 1
            batch.n_tokens = len(entries)
            started = time.perf_counter()
            if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            llama_cpp.llama_synchronize(ctx.ctx)  # a GPU's work ends here, not at the call's
            return time.perf_counter() - started

        prompt = [
            decode([(t, p, s) for p, t in enumerate(tokens)], every_logit=False)
            for s in range(n_seq)
        ]
        step_ms = {}
        for size in sizes:
            llama_cpp.llama_memory_seq_rm(memory, -1, PROMPT_TOKENS, -1)
            steps = [
                decode([(tokens[k], PROMPT_TOKENS + k, s) for s in range(size)])
                for k in range(STEPS)
            ]
            step_ms[size] = 1000 * statistics.median(steps) / size
        return DecodeCosts(1000 * statistics.median(prompt) / len(tokens), step_ms)
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()
