"""3. Local llama.cpp: SMS spam classification through the facade against a direct loop.

sibylq: one ``sibylq worker llamacpp:smollm2`` (prefork, one process) and
``classify_async(["spam", "ham"], prompt)`` for a block of rows at once. Baseline: the same
model file in this process, ``Llama.create_chat_completion`` row after row with the same
messages (the backend's own schema instruction), the same grammar (from the same JSON schema)
and the same settings (``n_ctx``, threads, ``GenConf`` defaults). The rows are split into
blocks, each block run by both sides in turn (order alternating), so the machine's noise
falls on both; the figure is the median of the block rates. Prompt tokens summed on each side
show that both sent the same prompts.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from producer import Client, GenConf, Model, Models, Settings
from producer.messages import build_messages
from producer.targets import classify_target
from wire.constants import queue_name

from .env import REPO_ROOT, Context
from .report import Result, Row, Skipped, Target, median

NAME = "llama"
LABELS = ["spam", "ham"]
PROMPT = "Is this SMS spam? {text}"
MODEL = "llamacpp:smollm2"

#: The SMS Spam Collection (see its README); ``SIBYLQ_BENCH_DATA`` points elsewhere. Without
#: it, the 50-message sample shipped in ``examples/`` (rows repeat past 50, and the run says so).
FULL_DATA = REPO_ROOT.parent / "shared" / "data" / "sms_spam.jsonl"
SAMPLE = REPO_ROOT / "examples" / "sms_spam_sample.jsonl"
DATA = Path(os.environ.get("SIBYLQ_BENCH_DATA", FULL_DATA if FULL_DATA.is_file() else SAMPLE))


def load_sms(limit: int) -> list[dict[str, Any]]:
    """``limit`` rows of the SMS dataset, ``{"id", "text", "label"}``: its first ones, cycled
    when the dataset is shorter (the shipped sample)."""
    if not DATA.is_file():
        raise Skipped(f"no dataset at {DATA} (set SIBYLQ_BENCH_DATA)")
    rows = []
    with DATA.open() as lines:
        for line in lines:
            rows.append(json.loads(line))
            if len(rows) == limit:
                return rows
    if len(rows) < limit:
        print(f"llama: {DATA} has {len(rows)} rows: cycling them to {limit}", flush=True)
    return [rows[i % len(rows)] for i in range(limit)]


class DirectLoop:
    """llama-cpp-python in this process, as a hand-written script would call it."""

    def __init__(self, settings: Settings) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_grammar import LlamaGrammar

            from workers.backends.llamacpp import _chat_messages
            from workers.cli import llama_threads
            from workers.model_files import resolve_model_path
        except ImportError as exc:
            raise Skipped(f"llama-cpp-python is not installed: {exc}") from exc
        self._chat_messages = _chat_messages
        self.target = classify_target(LABELS)
        self.schema = self.target.json_schema
        self.genconf = GenConf()
        self.llm = Llama(
            model_path=str(resolve_model_path("smollm2", settings)),
            n_ctx=settings.llama_n_ctx,
            n_gpu_layers=settings.llama_n_gpu_layers,
            n_threads=settings.llama_n_threads or llama_threads(1),  # as the worker
            verbose=False,
        )
        self.grammar = LlamaGrammar.from_json_schema(json.dumps(self.schema), verbose=False)

    def classify(self, text: str) -> tuple[str, int]:
        """The label, and the prompt's token count."""
        messages = self._chat_messages(build_messages(PROMPT.format(text=text)), self.schema)
        response: Any = self.llm.create_chat_completion(
            messages=messages,
            grammar=self.grammar,
            max_tokens=self.genconf.max_tokens,
            temperature=self.genconf.temperature,
            top_p=self.genconf.top_p,
            stop=list(self.genconf.stop) or None,
            seed=self.genconf.seed,
        )
        content = response["choices"][0]["message"]["content"]
        label = self.target.parse(json.loads(content), raw_text=content)
        return str(label), int(response["usage"]["prompt_tokens"])


def facade_block(model: Model, rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    async def block() -> list[tuple[str, int]]:
        jobs = [model.classify_async(LABELS, PROMPT.format(text=row["text"])) for row in rows]
        envelopes = await asyncio.gather(*(job.envelope_async() for job in jobs))
        await model.client.aclose_listener()
        return [
            (str(job.value_of(envelope)), envelope.usage.prompt_tokens)
            for job, envelope in zip(jobs, envelopes, strict=True)
        ]

    return asyncio.run(block())


def run(ctx: Context) -> Result:
    count, blocks = ctx.size(200, 8), ctx.size(8, 2)
    rows = load_sms(count + 2)
    warmup, rows = rows[count:], rows[:count]
    result = Result(
        NAME,
        f"local llama.cpp, {count} SMS classifications (SmolLM2-135M)",
        sibylq_side=f"facade classify_async, one `sibylq worker {MODEL}` (prefork, 1 process)",
        baseline_side="llama-cpp-python loop in one process: same messages, grammar, settings",
        params={"rows": count, "blocks": blocks, "prompt": PROMPT, "labels": LABELS},
    )
    with ctx.cluster(NAME) as cluster:
        direct = DirectLoop(cluster.settings())
        cluster.start_worker(MODEL, queue=queue_name("llamacpp", "smollm2"))
        client = Client(cluster.settings())
        model = Models.create(MODEL, client=client)
        facade_block(model, warmup)  # the worker loads its model on its first job
        for row in warmup:
            direct.classify(row["text"])
        outcome = _interleave(model, direct, rows, blocks)
        client.close()
    _fill(result, rows, outcome)
    return result


Outcome = dict[str, tuple[list[float], list[tuple[str, int]]]]


def _interleave(
    model: Model, direct: DirectLoop, rows: list[dict[str, Any]], blocks: int
) -> Outcome:
    """Each block by both sides, sibylq first in even blocks; rates and answers per side."""
    size = -(-len(rows) // blocks)
    outcome: Outcome = {"sibylq": ([], []), "baseline": ([], [])}
    for index in range(blocks):
        block = rows[index * size : (index + 1) * size]
        order = ("sibylq", "baseline") if index % 2 == 0 else ("baseline", "sibylq")
        for side in order:
            started = time.perf_counter()
            if side == "sibylq":
                answers = facade_block(model, block)
            else:
                answers = [direct.classify(row["text"]) for row in block]
            outcome[side][0].append(len(block) / (time.perf_counter() - started))
            outcome[side][1].extend(answers)
    return outcome


def _fill(result: Result, rows: list[dict[str, Any]], outcome: Outcome) -> None:
    truth = [row["label"] for row in rows]
    figures: dict[str, dict[str, float]] = {}
    for side, (rates, answers) in outcome.items():
        labels = [label for label, _ in answers]
        figures[side] = {
            "rate": median(rates),
            "accuracy": sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth),
            "spam_share": labels.count("spam") / len(labels),
            "prompt_tokens": float(sum(tokens for _, tokens in answers)),
        }
    mine, theirs = figures["sibylq"], figures["baseline"]
    agree = sum(
        a[0] == b[0] for a, b in zip(outcome["sibylq"][1], outcome["baseline"][1], strict=True)
    )
    result.add(Row("throughput", "rows/s", mine["rate"], theirs["rate"], Target(">=", 0.95)))
    result.add(Row("accuracy vs dataset labels", "", mine["accuracy"], theirs["accuracy"]))
    result.add(Row("answered 'spam'", "share", mine["spam_share"], theirs["spam_share"]))
    result.add(Row("prompt tokens, all rows", "", mine["prompt_tokens"], theirs["prompt_tokens"]))
    result.notes.append(
        f"both sides gave the same label on {agree}/{len(rows)} rows; "
        f"{truth.count('spam')}/{len(rows)} rows are spam. The model is tiny: accuracy is "
        "reported, not claimed."
    )
    result.samples = {side: {"rates_rows_s": rates} for side, (rates, _) in outcome.items()}
