"""Prompt prefixes kept in host memory between jobs, for the llama batching engine.

A free sequence keeps its last job's prompt in its KV cells, and the next job in it decodes
only what its own prompt adds (``LlamaEngine._slot_for``). When a job with another schema
takes that sequence, the cells of the first schema's system instruction were lost: a worker
serving two schemas in turn decoded each one's instruction again, in every sequence, at
every switch. Now the part of its cells that its last two jobs shared (the instruction and
schema, not a job's own text, which no later job would use) is saved first
(``llama_state_seq_get_data``, ~2 MiB for a 100-token prefix of the bundled model), and a
later job whose prompt starts the same gets it back (``llama_state_seq_set_data``, under a
millisecond) instead: what ``llama-server``'s ``--cache-ram`` does.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import Any

import llama_cpp

#: Host memory for saved prefixes, per engine (``llama-server`` allows 8 GiB by default).
LIMIT_BYTES = 256 * 2**20
#: At most this many saved prefixes (each lookup compares the new prompt with every one).
LIMIT_ENTRIES = 64
#: Tokens a restore must spare decoding to be worth it (a restore costs about as much as
#: decoding a token or two on a CPU).
MIN_GAIN = 16


class PromptCache:
    """Saved sequence states by the tokens their cells held, least recently used first."""

    def __init__(self, ctx: Any, memory: Any) -> None:
        self._ctx = ctx
        self._memory = memory
        self._saved: OrderedDict[tuple[int, ...], ctypes.Array[ctypes.c_uint8]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._saved)

    def save(self, seq_id: int, tokens: tuple[int, ...]) -> None:
        """Keep a copy of ``seq_id``'s cells, which hold ``tokens`` and nothing else."""
        if len(tokens) < MIN_GAIN:
            return
        if tokens in self._saved:
            self._saved.move_to_end(tokens)
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        if size == 0 or size > LIMIT_BYTES:
            return
        state = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, state, size, seq_id) != size:
            return
        self._saved[tokens] = state
        self._bytes += size
        while self._bytes > LIMIT_BYTES or len(self._saved) > LIMIT_ENTRIES:
            _, dropped = self._saved.popitem(last=False)
            self._bytes -= len(dropped)

    def restore(self, seq_id: int, tokens: tuple[int, ...], held: int) -> int:
        """Load into ``seq_id``, whose cells hold the first ``held`` of ``tokens``, the saved
        state sharing the longest prefix with ``tokens``, if that spares decoding at least
        ``MIN_GAIN`` more; returns how many of ``tokens`` the cells now start with (they
        may hold more after it: the caller cuts them)."""
        best, shared = None, held
        for saved in self._saved:
            common = common_prefix(saved, tokens)
            if common >= max(shared + 1, held + MIN_GAIN):
                best, shared = saved, common
        if best is None:
            return held
        state = self._saved[best]
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, 0, -1)
        if llama_cpp.llama_state_seq_set_data(self._ctx, state, len(state), seq_id) == 0:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, 0, -1)  # whatever it left
            return 0
        self._saved.move_to_end(best)
        return shared


def common_prefix(first: tuple[int, ...], second: tuple[int, ...]) -> int:
    """How many tokens ``first`` and ``second`` start with alike."""
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return index
    return min(len(first), len(second))
