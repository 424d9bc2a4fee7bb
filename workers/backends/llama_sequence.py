"""One job's sequence inside the batching engine: its prompt, its sampler chain (grammar
included) and its output, finished the way ``Llama.create_completion`` finishes one.

The sampler chain is the one ``Llama`` builds for the same settings: the grammar first, then
greedy at temperature 0, else top-k 40, top-p, min-p 0.05, temperature and a seeded draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from wire.contract import GenConf, Usage

from .base import Completion
from .llama_prompt import ChatPrompt

#: ``Llama``'s defaults for the samplers sibylq's GenConf does not name.
TOP_K = 40
MIN_P = 0.05


@lru_cache(maxsize=64)
def grammar_for(schema_json: str) -> LlamaGrammar:
    """The GBNF grammar of a JSON schema, built once per schema and process."""
    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


def sampler_chain(llm: Llama, genconf: GenConf, grammar: LlamaGrammar | None) -> Any:
    """A new llama.cpp sampler chain; the caller frees it (``llama_sampler_free``)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if grammar is not None:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        add(
            chain,
            llama_cpp.llama_sampler_init_grammar(
                vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
            ),
        )
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
    sampler: Any
    model: str
    fed: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: bytes = b""

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt.tokens)

    def pending_tokens(self) -> list[int]:
        """Tokens not in the KV cache yet: the rest of the prompt, or the last sampled one."""
        if self.prefilling:
            return list(self.prompt.tokens[self.fed :])
        return [self.output[-1]] if self.output else []

    def accept(self, llm: Llama, token: int) -> None:
        """Take a sampled token; sets ``finish_reason`` when the sequence is done."""
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            self.text = llm.detokenize(self.output, prev_tokens=list(self.prompt.tokens))
            self.finish_reason = "stop"
            return
        self.output.append(token)
        text = llm.detokenize(self.output, prev_tokens=list(self.prompt.tokens))
        stops = [stop.encode("utf-8") for stop in self.prompt.stop if stop.encode() in text]
        if stops:
            self.text = text[: text.index(stops[0])]
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_tokens:
            self.text = text
            self.finish_reason = "length"

    def completion(self) -> Completion:
        return Completion(
            text=self.text.decode("utf-8", errors="ignore"),
            finish_reason=self.finish_reason or "length",
            usage=Usage(prompt_tokens=len(self.prompt.tokens), completion_tokens=len(self.output)),
            model=self.model,
        )
