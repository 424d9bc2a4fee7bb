"""3. Local llama.cpp: SMS classification and extraction through the facade against a
direct loop.

Two tasks over the same SMS rows: classify (spam/ham) and extract (three words of the
message, a list). Three sides, each run on every block of rows in turn (order rotating), so
the machine's noise falls on all; figures are medians of the block rates:

- baseline: the same model file in this process, ``Llama.create_chat_completion`` row after
  row with the same messages (the backend's own schema instruction), the same grammar (from
  the same JSON schema) and the same settings (``n_ctx``, threads, ``GenConf`` defaults);
- ``sibylq worker llamacpp:smollm2`` at ``SIBYLQ_LLAMA_BATCH=1`` (prefork, one job a process);
- the same worker at ``SIBYLQ_LLAMA_BATCH=8`` (one process, a threads pool feeding the continuous
  batching engine), ``*_async`` for a block of rows at once.

Each side reports rows/s, completion tokens/s, the share of schema-valid answers, and (greedy
decoding) how many answers equal the direct loop's, token for token.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer import Client, GenConf, Job, Model, Models, OutputValidationError, Settings
from producer.messages import build_messages
from producer.targets import Target as OutputTarget
from producer.targets import classify_target, target_for
from wire.constants import queue_name

from .env import REPO_ROOT, Context
from .report import Result, Row, Skipped, Target, median

NAME = "llama"
LABELS = ["spam", "ham"]
PROMPT = "Is this SMS spam? {text}"
EXTRACT_PROMPT = "List three words from this SMS: {text}"
MODEL = "llamacpp:smollm2"
#: The batched worker's sequences (``SIBYLQ_LLAMA_BATCH``).
BATCH = 8
SIDES = ("direct", "N=1", f"N={BATCH}")
TASKS = ("classify", "extract")
#: Both sides' settings: greedy, and a bound on a tiny model's occasional endless list.
GENCONF = GenConf(max_tokens=64)

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


@dataclass(frozen=True)
class Answer:
    text: str
    valid: bool
    prompt_tokens: int
    completion_tokens: int


def task_target(task: str) -> OutputTarget:
    return classify_target(LABELS) if task == "classify" else target_for(list[str])


def task_prompt(task: str, text: str) -> str:
    return (PROMPT if task == "classify" else EXTRACT_PROMPT).format(text=text)


class DirectLoop:
    """llama-cpp-python in this process, as a hand-written script would call it."""

    def __init__(self, settings: Settings) -> None:
        try:
            from llama_cpp import Llama

            from workers.backends.llama_prompt import chat_messages
            from workers.backends.llama_sequence import grammar_for
            from workers.cli import llama_threads
            from workers.model_files import resolve_model_path
        except ImportError as exc:
            raise Skipped(f"llama-cpp-python is not installed: {exc}") from exc
        self._chat_messages = chat_messages
        self._grammar_for = grammar_for
        self.genconf = GENCONF
        self.llm = Llama(
            model_path=str(resolve_model_path("smollm2", settings)),
            n_ctx=settings.llama_n_ctx,
            n_gpu_layers=settings.llama_n_gpu_layers,
            n_threads=settings.llama_n_threads or llama_threads(1),  # as the worker
            verbose=False,
        )

    def answer(self, task: str, text: str) -> Answer:
        target = task_target(task)
        schema = target.json_schema
        assert schema is not None
        messages = self._chat_messages(build_messages(task_prompt(task, text)), schema)
        response: Any = self.llm.create_chat_completion(
            messages=messages,
            grammar=self._grammar_for(json.dumps(schema)),
            max_tokens=self.genconf.max_tokens,
            temperature=self.genconf.temperature,
            top_p=self.genconf.top_p,
            stop=list(self.genconf.stop) or None,
            seed=self.genconf.seed,
        )
        choice, usage = response["choices"][0], response["usage"]
        content = choice["message"]["content"] or ""
        try:
            target.parse(json.loads(content), raw_text=content)
            valid = choice["finish_reason"] == "stop"
        except (ValueError, OutputValidationError):
            valid = False
        return Answer(content, valid, usage["prompt_tokens"], usage["completion_tokens"])


def facade_block(model: Model, task: str, rows: list[dict[str, Any]]) -> list[Answer]:
    async def block() -> list[Answer]:
        jobs: list[Job[Any]] = [
            model.classify_async(LABELS, task_prompt(task, row["text"]))
            if task == "classify"
            else model.extract_async(list[str], task_prompt(task, row["text"]))
            for row in rows
        ]
        answers = await asyncio.gather(*(_answer(job) for job in jobs))
        await model.client.aclose_listener()
        return list(answers)

    return asyncio.run(block())


async def _answer(job: Job[Any]) -> Answer:
    try:
        envelope = await job.envelope_async()
    except OutputValidationError as exc:
        usage = exc.usage
        prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        return Answer(exc.raw_text or "", False, prompt, completion)
    usage = envelope.usage
    return Answer(envelope.raw_text, True, usage.prompt_tokens, usage.completion_tokens)


def run(ctx: Context) -> Result:
    count = ctx.rows or ctx.size(48, 4)
    # A block holds three batches: continuous batching is measured mostly full, not only
    # draining at each block's end (a labeling run submits every row at once).
    blocks = max(1, min(ctx.size(4, 1), count // (3 * BATCH)))
    rows = load_sms(count + 2)
    warmup, rows = rows[count:], rows[:count]
    result = Result(
        NAME,
        f"local llama.cpp, {count} SMS rows classified and extracted (SmolLM2-135M)",
        sibylq_side=f"facade *_async, one `sibylq worker {MODEL}` at SIBYLQ_LLAMA_BATCH=1 "
        f"(prefork) and at {BATCH} (continuous batching, one process)",
        baseline_side="llama-cpp-python loop in one process: same messages, grammar, settings",
        params={"rows": count, "blocks": blocks, "prompts": [PROMPT, EXTRACT_PROMPT]},
    )
    with ctx.cluster(NAME) as cluster:
        direct = DirectLoop(cluster.settings())
        client = Client(cluster.settings())
        models = {}
        for side, batch in ((SIDES[1], 1), (SIDES[2], BATCH)):
            queue = queue_name("llamacpp", f"bench{batch}")
            env = {"SIBYLQ_LLAMA_BATCH": str(batch)}
            cluster.start_worker(MODEL, "-Q", queue, queue=queue, env=env)
            models[side] = Models.create(
                MODEL, client=client, queue=queue, genconf=GENCONF.model_dump()
            )
            for task in TASKS:
                facade_block(models[side], task, warmup)  # the worker loads its model
        outcome = _interleave(models, direct, rows, blocks)
        client.close()
    _fill(result, outcome)
    return result


#: (task, side) -> (block rates in rows/s, block rates in completion tokens/s, answers)
Outcome = dict[tuple[str, str], tuple[list[float], list[float], list[Answer]]]


def _interleave(
    models: dict[str, Model], direct: DirectLoop, rows: list[dict[str, Any]], blocks: int
) -> Outcome:
    """Each block by every side, the order rotating from block to block."""
    size = -(-len(rows) // blocks)
    outcome: Outcome = {(task, side): ([], [], []) for task in TASKS for side in SIDES}
    for index in range(blocks):
        block = rows[index * size : (index + 1) * size]
        order = SIDES[index % 3 :] + SIDES[: index % 3]
        for task in TASKS:
            for side in order:
                started = time.perf_counter()
                if side == "direct":
                    answers = [direct.answer(task, row["text"]) for row in block]
                else:
                    answers = facade_block(models[side], task, block)
                elapsed = time.perf_counter() - started
                rates, token_rates, kept = outcome[(task, side)]
                rates.append(len(block) / elapsed)
                print(f"llama: block {index} {task} {side}: {rates[-1]:.3f} rows/s", flush=True)
                token_rates.append(sum(a.completion_tokens for a in answers) / elapsed)
                kept.extend(answers)
    return outcome


def _fill(result: Result, outcome: Outcome) -> None:
    targets = {("classify", SIDES[2]): 1.5, ("extract", SIDES[2]): 2.0}
    for task in TASKS:
        base_rates, base_tokens, base_answers = outcome[(task, "direct")]
        for side in SIDES[1:]:
            rates, token_rates, answers = outcome[(task, side)]
            target = Target(">=", targets.get((task, side), 0.95))
            name = f"{task} {side}"
            result.add(
                Row(f"{name} throughput", "rows/s", median(rates), median(base_rates), target)
            )
            result.add(Row(f"{name} tokens", "tokens/s", median(token_rates), median(base_tokens)))
            result.add(Row(f"{name} schema-valid", "share", _valid(answers), _valid(base_answers)))
            same = sum(a.text == b.text for a, b in zip(answers, base_answers, strict=True))
            result.add(Row(f"{name} equal to the sequential answer", "share", same / len(answers)))
    result.samples = {
        f"{task} {side}": {"rates_rows_s": rates, "rates_tokens_s": tokens}
        for (task, side), (rates, tokens, _) in outcome.items()
    }
    result.notes.append(
        "SmolLM2-135M is tiny: answers are checked for schema validity and equality with the "
        "direct loop's greedy answers, not for accuracy."
    )


def _valid(answers: list[Answer]) -> float:
    return sum(answer.valid for answer in answers) / len(answers)
