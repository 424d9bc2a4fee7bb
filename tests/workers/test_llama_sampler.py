"""Grammar-constrained sampling in the batching engine (``llama_sequence.Sampler``): where the
model's own pick breaks the grammar, the grammar is tried on the likeliest tokens first, and
on the whole vocabulary only if too few of those are allowed. The pick must be the one that
masking the whole vocabulary gives, greedy or sampled, whatever the logits.

The logits are made up (no decoding): the bundled model's vocabulary and llama.cpp's own
grammar and samplers, inside a JSON string, where most tokens are allowed and some are not.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator

import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp import Llama

from wire.contract import GenConf
from wire.settings import Settings
from workers.backends.llama_sequence import SHORTLIST, TOKEN_DATA, Sampler, grammar_for
from workers.model_files import resolve_model_path

#: A string: after its opening quote almost any token goes on, but not one that closes the
#: string and carries on (``",``), nor a raw newline.
STRING = json.dumps({"type": "string"})
GREEDY = GenConf(temperature=0)
SAMPLED = GenConf(temperature=0.8, top_p=0.9, seed=11)


@pytest.fixture(scope="module")
def llm() -> Iterator[Llama]:
    model = Llama(str(resolve_model_path("smollm2", Settings())), vocab_only=True, verbose=False)
    yield model
    model.close()


def inside_string(llm: Llama, genconf: GenConf) -> Sampler:
    """A fresh sampler whose grammar has taken the string's opening quote."""
    sampler = Sampler(llm, genconf, grammar_for(STRING))
    (quote,) = llm.tokenize(b'"', add_bos=False, special=False)
    llama_cpp.llama_sampler_accept(sampler._grammar, quote)
    return sampler


@pytest.fixture(scope="module")
def refused(llm: Llama) -> npt.NDArray[np.intp]:
    """The tokens the grammar refuses inside the string."""
    sampler = inside_string(llm, GREEDY)
    data = _token_data(np.zeros(llm.n_vocab(), dtype=np.float32), np.arange(llm.n_vocab()))
    _apply(sampler._grammar, data)
    sampler.free()
    return np.flatnonzero(~np.isfinite(data["logit"]))


def whole_vocabulary_pick(
    llm: Llama, genconf: GenConf, logits: npt.NDArray[np.float32], *, quoted: bool = True
) -> int:
    """What the grammar then the chain pick with every token a candidate (the old way),
    inside the string or (``quoted`` False) before it."""
    sampler = inside_string(llm, genconf) if quoted else Sampler(llm, genconf, grammar_for(STRING))
    data = _token_data(logits, np.arange(llm.n_vocab()))  # kept alive: ``candidates`` points in
    candidates = _apply(sampler._constrained, data)
    token = int(candidates.data[candidates.selected].id)
    sampler.free()
    return token


def _token_data(logits: npt.NDArray[np.float32], ids: npt.NDArray[np.intp]) -> npt.NDArray[np.void]:
    data = np.zeros(len(ids), dtype=TOKEN_DATA)
    data["id"], data["logit"] = ids, logits[ids]
    return data


def _apply(sampler: object, data: npt.NDArray[np.void]) -> llama_cpp.llama_token_data_array:
    pointer = data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
    candidates = llama_cpp.llama_token_data_array(pointer, len(data), -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
    return candidates


def made_up_logits(
    n_vocab: int, seed: int, refused: npt.NDArray[np.intp], pushed: int
) -> npt.NDArray[np.float32]:
    """Random logits with ``pushed`` refused tokens made the likeliest of all."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, n_vocab).astype(np.float32)
    chosen = rng.choice(refused, size=min(pushed, len(refused)), replace=False)
    logits[chosen] = logits.max() + rng.uniform(0.1, 5.0, len(chosen)).astype(np.float32)
    return logits


@pytest.mark.parametrize("genconf", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), pushed=st.integers(0, SHORTLIST + 40))
def test_the_shortlist_picks_what_the_whole_vocabulary_would(
    llm: Llama, refused: npt.NDArray[np.intp], genconf: GenConf, seed: int, pushed: int
) -> None:
    logits = made_up_logits(llm.n_vocab(), seed, refused, pushed)
    sampler = inside_string(llm, genconf)
    picked = sampler.sample_shortlist(logits)
    sampler.free()
    if picked is not None:  # None: too few allowed among the likeliest, the old way runs
        assert picked == whole_vocabulary_pick(llm, genconf, logits)


@pytest.mark.parametrize("genconf", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), likely=st.integers(0, 45))
def test_with_few_tokens_allowed_the_shortlist_holds_back_unless_it_has_enough(
    llm: Llama, genconf: GenConf, seed: int, likely: int
) -> None:
    """Before the opening quote only ~45 tokens are allowed; ``likely`` of them are among
    the likeliest. A sampled pick draws from the 40 likeliest allowed: with fewer in the
    shortlist it must leave the pick to the whole vocabulary."""
    start = Sampler(llm, genconf, grammar_for(STRING))
    data = _token_data(np.zeros(llm.n_vocab(), dtype=np.float32), np.arange(llm.n_vocab()))
    _apply(start._grammar, data)
    allowed = np.flatnonzero(np.isfinite(data["logit"]))
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, llm.n_vocab()).astype(np.float32)
    edge = np.sort(logits)[-SHORTLIST]  # allowed tokens just outside it count as much
    logits[allowed] = edge - rng.uniform(0.01, 0.5, len(allowed)).astype(np.float32)
    chosen = rng.choice(allowed, size=min(likely, len(allowed)), replace=False)
    logits[chosen] = edge + rng.uniform(0.01, 0.5, len(chosen)).astype(np.float32)
    picked = start.sample_shortlist(logits)
    start.free()
    assert picked is None or picked == whole_vocabulary_pick(llm, genconf, logits, quoted=False)


def test_a_refused_favourite_is_answered_from_the_shortlist(
    llm: Llama, refused: npt.NDArray[np.intp]
) -> None:
    """The case it is for: the few likeliest tokens refused, the next allowed one chosen."""
    logits = made_up_logits(llm.n_vocab(), 1, refused, pushed=5)
    for genconf in (GREEDY, SAMPLED):
        sampler = inside_string(llm, genconf)
        assert sampler.sample_shortlist(logits) == whole_vocabulary_pick(llm, genconf, logits)
        sampler.free()


def test_too_few_allowed_in_the_shortlist_leaves_it_to_the_whole_vocabulary(
    llm: Llama,
) -> None:
    """Before the opening quote only tokens that start with one are allowed: with none of
    them among the likeliest, the shortlist says so and accepts nothing, so the grammar is
    where it was for the whole-vocabulary pick that follows (here: the quote, once likely)."""
    sampler = Sampler(llm, GREEDY, grammar_for(STRING))
    data = _token_data(np.zeros(llm.n_vocab(), dtype=np.float32), np.arange(llm.n_vocab()))
    _apply(sampler._grammar, data)
    allowed = np.flatnonzero(np.isfinite(data["logit"]))
    logits = np.random.default_rng(3).normal(0.0, 3.0, llm.n_vocab()).astype(np.float32)
    logits[allowed] = logits.min()
    assert sampler.sample_shortlist(logits) is None
    (quote,) = llm.tokenize(b'"', add_bos=False, special=False)
    logits[quote] = logits.max() + 1
    assert sampler.sample_shortlist(logits) == quote
    sampler.free()
