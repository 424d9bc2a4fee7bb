"""One job's sequence inside the batching engine: its prompt, its sampler chain (grammar
included) and its output, finished the way ``Llama.create_completion`` finishes one.

The samplers are the ones ``Llama`` builds for the same settings (greedy at temperature 0,
else top-k 40, top-p, min-p 0.05, temperature and a seeded draw), with the job's grammar
applied as llama.cpp's server applies it (``Sampler``).
"""

from __future__ import annotations

import ctypes
import math
import random
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from wire.contract import GenConf, Usage

from ..label_probs import ChoiceProbe
from .base import Completion
from .llama_prompt import ChatPrompt

#: ``Llama``'s defaults for the samplers sibylq's GenConf does not name.
TOP_K = 40
MIN_P = 0.05
#: The likeliest tokens read at a choice point beside those that can spell a label.
CANDIDATES = 64
#: The likeliest tokens the grammar is tried on before the whole vocabulary (``Sampler``).
SHORTLIST = 256
#: llama.cpp's ``llama_token_data``, as a numpy record.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def choice_candidates(
    llm: Llama, logits: npt.NDArray[np.float32], probe: ChoiceProbe
) -> list[tuple[str, float]]:
    """The text and log-probability, from the raw logits of one position, of every token
    that could spell part of a label (so no label's share is lost however unlikely the
    model finds it) and of the ``CANDIDATES`` likeliest (``ChoiceProbe.observe``)."""
    top = np.argpartition(logits, -CANDIDATES)[-CANDIDATES:]
    ids = np.union1d(top, label_token_ids(llm, probe.spellings))
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))
    pieces = vocabulary_pieces(llm)
    return [(pieces[t], float(logits[t]) - log_total) for t in ids.tolist()]


@lru_cache(maxsize=4)
def vocabulary_pieces(llm: Llama) -> tuple[str, ...]:
    """Each token's text, by id (built once per model and process: ~0.3 s)."""
    return tuple(
        llm.detokenize([token]).decode("utf-8", errors="ignore") for token in range(llm.n_vocab())
    )


@lru_cache(maxsize=256)
def label_token_ids(llm: Llama, spellings: tuple[str, ...]) -> npt.NDArray[np.intp]:
    """The tokens whose text, but for whitespace, is part of a label's JSON text or of its
    end (``"}``), or is all whitespace: the only ones that can fit a label (tokens with no
    text, the special ones, spell nothing)."""
    ends = tuple(spelling + "}" for spelling in spellings)
    return np.array(
        [
            token
            for token, piece in enumerate(vocabulary_pieces(llm))
            if piece and any(piece.strip() in end for end in ends)
        ],
        dtype=np.intp,
    )


def logits_at(llm: Llama, ctx: Any, index: int) -> npt.NDArray[np.float32]:
    """The logits of position ``index`` of ``ctx``'s last batch (a view, valid until the
    next decode)."""
    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


class ChoiceObserver:
    """A ``Llama`` logits processor that shows a one-job completion's steps to a
    ``ChoiceProbe`` and leaves the logits as they are: the answer is the same with it."""

    def __init__(self, llm: Llama, probe: ChoiceProbe) -> None:
        self._llm = llm
        self.probe = probe
        self._read: int | None = None  # tokens of ``input_ids`` already in ``_output``
        self._output = b""  # the answer so far, grown by each new token's piece

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self._read is None:  # the first step: ``input_ids`` is the prompt
            self._read = len(input_ids)
        self._output += self._llm.detokenize([int(t) for t in input_ids[self._read :]])
        self._read = len(input_ids)
        text = self._output.decode("utf-8", errors="ignore")
        if self.probe.wants(text):
            self.probe.observe(text, choice_candidates(self._llm, scores, self.probe))
        return scores


@lru_cache(maxsize=64)
def grammar_for(schema_json: str) -> LlamaGrammar:
    """The GBNF grammar of a JSON schema, built once per schema and process."""
    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


class Sampler:
    """A sequence's sampling: ``Llama``'s chain for its settings, with the grammar applied
    the way llama.cpp's own server applies it, and cheaper. The unconstrained chain picks a
    token first; only when the grammar refuses that token is the grammar applied, first to
    the ``SHORTLIST`` likeliest tokens, and to the whole vocabulary only if too few of those
    are allowed. Checking one token is cheap, masking ~49k is not (~3 ms on a CPU, while the
    decoding threads wait): a small model refuses its own pick at about half the steps of
    an extraction. The answer is the same either way: the best allowed token (greedy), or the
    ``TOP_K`` likeliest allowed ones the chain draws from, are among the likeliest tokens
    whenever that many are allowed there. Call ``free`` when done."""

    def __init__(self, llm: Llama, genconf: GenConf, grammar: LlamaGrammar | None) -> None:
        self._llm = llm
        self._chain = _chain(genconf)
        self._grammar: Any = None
        self._constrained: Any = None  # grammar, then the chain's samplers: owns the grammar
        #: Allowed tokens the chain needs to pick as it would from the whole vocabulary.
        self._needed = 1 if genconf.temperature == 0 else TOP_K
        if grammar is not None:
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            self._grammar = llama_cpp.llama_sampler_init_grammar(
                vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
            )
            self._constrained = _chain(genconf, first=self._grammar)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits at ``index`` of ``ctx``'s last batch, accepted."""
        token: int = llama_cpp.llama_sampler_sample(self._chain, ctx, index)
        if self._grammar is None:
            return token
        if self._allows(token):
            llama_cpp.llama_sampler_accept(self._grammar, token)
            return token
        shortlisted = self.sample_shortlist(logits_at(self._llm, ctx, index))
        if shortlisted is not None:
            return shortlisted
        constrained: int = llama_cpp.llama_sampler_sample(self._constrained, ctx, index)
        return constrained

    def _allows(self, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        return bool(math.isfinite(data[0].logit))

    def sample_shortlist(self, logits: npt.NDArray[np.float32]) -> int | None:
        """The constrained chain's pick from the ``SHORTLIST`` likeliest of ``logits``,
        accepted, or None (nothing accepted) when fewer of them are allowed than it needs."""
        shortlist = np.argpartition(logits, -SHORTLIST)[-SHORTLIST:]
        data = np.zeros(SHORTLIST, dtype=TOKEN_DATA)
        data["id"], data["logit"] = shortlist, logits[shortlist]
        pointer = data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        candidates = llama_cpp.llama_token_data_array(pointer, SHORTLIST, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        if np.count_nonzero(np.isfinite(data["logit"])) < self._needed:
            return None
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(candidates))
        token = int(candidates.data[candidates.selected].id)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self._chain)
        if self._constrained is not None:
            llama_cpp.llama_sampler_free(self._constrained)  # and the grammar it owns


def _chain(genconf: GenConf, first: Any = None) -> Any:
    """A new llama.cpp sampler chain (``first``, if any, then ``Llama``'s samplers for
    ``genconf``); freed by ``Sampler.free``."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if first is not None:
        add(chain, first)
    if genconf.temperature == 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    seed = genconf.seed if genconf.seed is not None else random.randint(0, 2**31 - 1)
    add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
    add(chain, llama_cpp.llama_sampler_init_top_p(genconf.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(genconf.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


@dataclass
class Sequence:
    """A sequence id's state between decode steps. ``fed`` counts the tokens already in its
    KV cache; the prompt goes in chunks, then one sampled token per step."""

    seq_id: int
    prompt: ChatPrompt
    max_tokens: int
    sampler: Sampler
    model: str
    fed: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: bytes = b""
    #: Set for a classification: reads its label probabilities (``workers.label_probs``).
    probe: ChoiceProbe | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt.tokens)

    def pending_tokens(self) -> list[int]:
        """Tokens not in the KV cache yet: the rest of the prompt, or the last sampled one."""
        if self.prefilling:
            return list(self.prompt.tokens[self.fed :])
        return [self.output[-1]] if self.output else []

    def observe(self, llm: Llama, ctx: Any, index: int) -> None:
        """Show the step about to be sampled to the classification's probe, if it wants it."""
        if self.probe is None:
            return
        text = self.text.decode("utf-8", errors="ignore")
        if self.probe.wants(text):
            self.probe.observe(text, choice_candidates(llm, logits_at(llm, ctx, index), self.probe))

    def accept(self, llm: Llama, token: int) -> None:
        """Take a sampled token; sets ``finish_reason`` when the sequence is done. The text
        grows by the token's piece, and only its tail (where a stop string ending in the new
        piece would be) is searched: a step costs the same at the 1st token and the 1,000th."""
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            self.finish_reason = "stop"
            return
        self.output.append(token)
        searched_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += llm.detokenize([token])
        tail = self.text[searched_from:]
        stops = [stop for stop in self._stops if stop in tail]
        if stops:
            self.text = self.text[: searched_from + tail.index(stops[0])]
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_tokens:
            self.finish_reason = "length"

    @cached_property
    def _stops(self) -> list[bytes]:
        return [stop.encode("utf-8") for stop in self.prompt.stop]

    @cached_property
    def _longest_stop(self) -> int:
        return max((len(stop) for stop in self._stops), default=0)

    def completion(self) -> Completion:
        text = self.text.decode("utf-8", errors="ignore")
        return Completion(
            text=text,
            finish_reason=self.finish_reason or "length",
            usage=Usage(prompt_tokens=len(self.prompt.tokens), completion_tokens=len(self.output)),
            model=self.model,
            label_probs=None if self.probe is None else self.probe.result(text),
        )
