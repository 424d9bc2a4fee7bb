"""A job's token budget: the context it gets on this worker and the ``max_tokens`` it resolves to.

Sibila's semantics: ``max_tokens`` 0 is all of the context the prompt leaves, ``-1`` to
``-100`` that percentage of the context, and any value is cut to what the prompt leaves and to
the model's ``max_tokens_limit``. Only the worker can resolve them: it alone knows the context
it really has (llama.cpp: ``n_ctx``; an OpenAI-compatible server: a known model's context, or
the job's own ``ctx_len``) and the prompt's real length (its chat template, the schema
instruction). When the context is unknown, 0 and negative values resolve to "no limit sent".
"""

from __future__ import annotations

from dataclasses import replace

from wire.contract import JobSpec
from wire.errors import BackendError, ContextUnavailableError, PromptTooLongError

from .backends.base import Backend, CompletionRequest, Measuring, ModelContext

#: The resolved ``max_tokens`` that means "send none": the server's own limit applies.
UNLIMITED = 0


def needs_budget(spec: JobSpec) -> bool:
    """Whether the job's ``max_tokens`` depends on the worker's context: a plain positive
    ``max_tokens`` with no ``ctx_len`` or limit goes to the backend as it is."""
    return (
        spec.genconf.max_tokens <= 0
        or spec.ctx_len is not None
        or (spec.max_tokens_limit is not None)
    )


def measuring(backend: Backend) -> Measuring:
    if not isinstance(backend, Measuring):
        raise BackendError(
            f"the {type(backend).__name__} backend cannot tell its model's context or count "
            "tokens: give a positive max_tokens and no ctx_len"
        )
    return backend


def job_context(spec: JobSpec, backend: Backend, model: str) -> ModelContext:
    """The context ``spec`` gets here: the model's, narrowed by what the job asks for.
    Raises ``ContextUnavailableError`` when the job needs more context than the model has."""
    served = measuring(backend).context(model)
    wanted = spec.ctx_len
    if wanted is not None and served.ctx_len is not None and wanted > served.ctx_len:
        raise ContextUnavailableError(
            f"the job asks for a context of {wanted} tokens (ctx_len) but {model!r} has "
            f"{served.ctx_len} on this worker: start the worker with a larger context "
            "(SIBYLQ_LLAMA_N_CTX for llama.cpp) or create the model with a smaller ctx_len"
        )
    ctx_len = wanted if wanted is not None else served.ctx_len
    # As Sibila: the output limit is at most the context (a known context is a limit too).
    limits = [n for n in (served.max_tokens_limit, spec.max_tokens_limit, ctx_len) if n]
    return ModelContext(ctx_len=ctx_len, max_tokens_limit=min(limits) if limits else None)


def resolve_max_tokens(max_tokens: int, context: ModelContext, prompt_tokens: int) -> int:
    """The output budget of a request whose prompt takes ``prompt_tokens``; ``UNLIMITED``
    when the context is unknown and nothing else bounds it. Raises ``PromptTooLongError``
    when the prompt leaves no room for output."""
    ctx_len, limit = context.ctx_len, context.max_tokens_limit
    if ctx_len is None:
        resolved = max_tokens if max_tokens > 0 else (limit or UNLIMITED)
    else:
        room = ctx_len - prompt_tokens
        if room <= 0:
            raise PromptTooLongError(
                f"the prompt takes {prompt_tokens} tokens of a context of {ctx_len}: no room "
                "is left for output; shorten the prompt or use a larger context"
            )
        if max_tokens == 0:
            resolved = ctx_len
        elif max_tokens < 0:
            resolved = max(1, int(min(-max_tokens, 100) / 100 * ctx_len))
        else:
            resolved = max_tokens
        resolved = min(resolved, room)
    return min(resolved, limit) if limit and resolved != UNLIMITED else resolved


def budgeted(
    request: CompletionRequest, backend: Backend, context: ModelContext
) -> CompletionRequest:
    """``request`` with its ``max_tokens`` resolved (``UNLIMITED``: send none)."""
    prompt = measuring(backend).count_tokens(request).tokens if context.ctx_len else 0
    max_tokens = resolve_max_tokens(request.genconf.max_tokens, context, prompt)
    genconf = request.genconf.model_copy(update={"max_tokens": max_tokens})
    return replace(request, genconf=genconf)
