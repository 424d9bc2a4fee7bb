"""3. Local llama.cpp: SMS classification and extraction through the facade against a
direct loop.

Two tasks over the same SMS rows: classify (spam/ham) and extract (three words of the
message, a list). Three sides, each run on every block of rows in turn (order rotating), so
the machine's noise falls on all; figures are medians of the block rates:

- baseline: the same model file in this process, ``Llama.create_chat_completion`` row after
  row with the same messages (the backend's own schema instruction), the same grammar (from
  the same JSON schema) and the same settings (``n_ctx``, threads, ``GenConf`` defaults);
- ``sibylq worker llamacpp:smollm2`` at ``SIBYLQ_LLAMA_BATCH=1`` (prefork, one job a process);
- the same worker at ``SIBYLQ_LLAMA_BATCH=8`` (or ``SIBYLQ_BENCH_LLAMA_BATCH``: one process, a
  threads pool feeding the continuous batching engine), ``*_async`` for a block of rows at once;
- when ``SIBYLQ_BENCH_LLAMA_SERVER`` names a ``llama-server`` binary (llama.cpp's own server,
  built from the llama.cpp vendored in llama-cpp-python's sdist: see docs/benchmarks.md),
  that server with half as many and as many parallel slots as the batched worker's sequences
  (4 and 8), fed as many requests at a time as it has slots, on its ``/completion`` endpoint:
  the direct loop's prompt, to the token, and the same grammar (GBNF from the same JSON
  schema), greedy, the same ``max_tokens``.

Each side reports rows/s, completion tokens/s, the share of schema-valid answers, and (greedy
decoding) how many answers equal the direct loop's, token for token.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer import Client, GenConf, Job, Model, Models, OutputValidationError, Settings
from producer.messages import build_messages
from producer.targets import Target as OutputTarget
from producer.targets import classify_target, target_for
from wire.constants import queue_name

from .env import REPO_ROOT, Context
from .llama_decode import DecodeCosts, decode_costs
from .report import Result, Row, Skipped, Target, median

NAME = "llama"
LABELS = ["spam", "ham"]
PROMPT = "Is this SMS spam? {text}"
EXTRACT_PROMPT = "List three words from this SMS: {text}"
MODEL = "llamacpp:smollm2"
#: The batched worker's sequences (``SIBYLQ_LLAMA_BATCH``): 8, or ``SIBYLQ_BENCH_LLAMA_BATCH``
#: (a GPU takes more sequences a step for the price of one).
BATCH = int(os.environ.get("SIBYLQ_BENCH_LLAMA_BATCH", "8"))
#: llama.cpp's own server as a further baseline, when a binary is given, at these slots.
LLAMA_SERVER = os.environ.get("SIBYLQ_BENCH_LLAMA_SERVER")
SERVER_SLOTS = (max(1, BATCH // 2), BATCH)
#: The step sizes whose llama_decode cost per token is measured (the bound on batching).
DECODE_SIZES = (1, 4, 8, 16)
#: sibylq's two workers: one job a process, and the batching engine.
WORKER_SIDES = ("N=1", f"N={BATCH}")
SIDES = (
    "direct",
    *WORKER_SIDES,
    *((f"llama-server x{slots}" for slots in SERVER_SLOTS) if LLAMA_SERVER else ()),
)
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

    def messages(self, task: str, text: str) -> list[Any]:
        """What the backend sends the model: the query and the schema instruction."""
        schema = task_target(task).json_schema
        return list(self._chat_messages(build_messages(task_prompt(task, text)), schema))

    def grammar(self, task: str) -> Any:
        return self._grammar_for(json.dumps(task_target(task).json_schema))

    def answer(self, task: str, text: str) -> Answer:
        response: Any = self.llm.create_chat_completion(
            messages=self.messages(task, text),
            grammar=self.grammar(task),
            max_tokens=self.genconf.max_tokens,
            temperature=self.genconf.temperature,
            top_p=self.genconf.top_p,
            stop=list(self.genconf.stop) or None,
            seed=self.genconf.seed,
        )
        choice, usage = response["choices"][0], response["usage"]
        content = choice["message"]["content"] or ""
        valid = choice["finish_reason"] == "stop" and _parses(task, content)
        return Answer(content, valid, usage["prompt_tokens"], usage["completion_tokens"])


def _parses(task: str, content: str) -> bool:
    try:
        task_target(task).parse(json.loads(content), raw_text=content)
    except (ValueError, OutputValidationError):
        return False
    return True


class LlamaServer:
    """llama.cpp's ``llama-server`` with ``slots`` parallel slots, on the direct loop's model
    file, context per slot and threads; asked the direct loop's prompt tokens and grammar."""

    def __init__(self, binary: str, direct: DirectLoop, slots: int, settings: Settings) -> None:
        from embedded.redis_server import free_port
        from workers.backends.llama_prompt import chat_prompt

        self._direct, self._chat_prompt, self.slots = direct, chat_prompt, slots
        llm, port = direct.llm, free_port()
        command = [
            binary, "-m", llm.model_path, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * llm.n_ctx()), "-t", str(llm.n_threads),
            "-tb", str(llm.n_threads), "-ngl", _server_gpu_layers(settings.llama_n_gpu_layers),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(self._url + "/health", self._process)
        except BaseException:
            self.close()
            raise

    def block(self, task: str, rows: list[dict[str, Any]]) -> list[Answer]:
        """The rows' answers, as many requests in flight as the server has slots."""
        with ThreadPoolExecutor(self.slots) as pool:
            return list(pool.map(lambda row: self.answer(task, row["text"]), rows))

    def answer(self, task: str, text: str) -> Answer:
        llm, genconf = self._direct.llm, self._direct.genconf
        prompt = self._chat_prompt(llm, self._direct.messages(task, text), genconf.stop)
        body = {
            "prompt": list(prompt.tokens),
            "grammar": self._direct.grammar(task)._grammar,
            "n_predict": genconf.max_tokens,
            "temperature": genconf.temperature,
            "stop": list(prompt.stop),
            "cache_prompt": True,
        }
        request = urllib.request.Request(
            self._url + "/completion",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            reply = json.load(response)
        content, predicted = reply["content"], reply["timings"]["predicted_n"]
        valid = reply.get("stop_type") in ("eos", "word") and _parses(task, content)
        return Answer(content, valid, len(prompt.tokens), predicted)

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


def _server_gpu_layers(layers: int) -> str:
    """sibylq's ``-1`` (every layer) in llama-server's words (there ``-1`` means "auto")."""
    return "all" if layers < 0 else str(layers)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"llama-server did not answer {url} within {timeout_s:g} s")


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
    # draining at each block's end (a labeling run submits every row at once). More rows
    # make more blocks, not longer ones: ratios are paired block by block (``_paired``).
    blocks = ctx.size(max(1, count // (3 * BATCH)), 1)
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
        for side, batch in zip(WORKER_SIDES, (1, BATCH), strict=True):
            queue = queue_name("llamacpp", f"bench{batch}")
            env = {"SIBYLQ_LLAMA_BATCH": str(batch)}
            cluster.start_worker(MODEL, "-Q", queue, queue=queue, env=env)
            models[side] = Models.create(
                MODEL, client=client, queue=queue, genconf=GENCONF.model_dump()
            )
            for task in TASKS:
                facade_block(models[side], task, warmup)  # the worker loads its model
        costs = decode_costs(direct.llm, DECODE_SIZES)
        servers = _servers(direct, cluster.settings())
        try:
            outcome = _interleave(models, servers, direct, rows, blocks)
        finally:
            for server in servers.values():
                server.close()
        client.close()
    _fill(result, outcome)
    _fill_decode_costs(result, costs)
    if not LLAMA_SERVER:
        result.notes.append(
            "no llama-server rows: set SIBYLQ_BENCH_LLAMA_SERVER to a llama-server binary "
            "(docs/benchmarks.md says how to build it from the same sdist)"
        )
    return result


def _servers(direct: DirectLoop, settings: Settings) -> dict[str, LlamaServer]:
    """The llama-server sides, started (and warmed on one row each) when a binary is given."""
    if not LLAMA_SERVER:
        return {}
    servers = {}
    for slots in SERVER_SLOTS:
        server = LlamaServer(LLAMA_SERVER, direct, slots, settings)
        for task in TASKS:
            server.answer(task, "warm-up")
        servers[f"llama-server x{slots}"] = server
    return servers


#: (task, side) -> (block rates in rows/s, block rates in completion tokens/s, answers)
Outcome = dict[tuple[str, str], tuple[list[float], list[float], list[Answer]]]


def _interleave(
    models: dict[str, Model],
    servers: dict[str, LlamaServer],
    direct: DirectLoop,
    rows: list[dict[str, Any]],
    blocks: int,
) -> Outcome:
    """Each block by every side, the order rotating from block to block."""
    size = -(-len(rows) // blocks)
    outcome: Outcome = {(task, side): ([], [], []) for task in TASKS for side in SIDES}
    for index in range(blocks):
        block = rows[index * size : (index + 1) * size]
        order = SIDES[index % len(SIDES) :] + SIDES[: index % len(SIDES)]
        for task in TASKS:
            for side in order:
                started = time.perf_counter()
                if side == "direct":
                    answers = [direct.answer(task, row["text"]) for row in block]
                elif side in servers:
                    answers = servers[side].block(task, block)
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
    targets = {("classify", WORKER_SIDES[1]): 1.5, ("extract", WORKER_SIDES[1]): 2.0}
    for task in TASKS:
        base_rates, base_tokens, base_answers = outcome[(task, "direct")]
        for side in WORKER_SIDES:
            rates, token_rates, answers = outcome[(task, side)]
            target = Target(">=", targets.get((task, side), 0.95), on="sibylq")
            name = f"{task} {side}"
            result.add(Row(f"{name} throughput", "rows/s", median(rates), median(base_rates)))
            result.add(
                Row(
                    f"{name} throughput, same-block ratio",
                    "x",
                    _paired(rates, base_rates),
                    target=target,
                )
            )
            result.add(Row(f"{name} tokens", "tokens/s", median(token_rates), median(base_tokens)))
            result.add(Row(f"{name} schema-valid", "share", _valid(answers), _valid(base_answers)))
            same = sum(a.text == b.text for a, b in zip(answers, base_answers, strict=True))
            result.add(Row(f"{name} equal to the sequential answer", "share", same / len(answers)))
    for task in TASKS:
        _fill_server_rows(result, outcome, task)
    result.samples = {
        f"{task} {side}": {"rates_rows_s": rates, "rates_tokens_s": tokens}
        for (task, side), (rates, tokens, _) in outcome.items()
    }
    result.notes.append(
        "SmolLM2-135M is tiny: answers are checked for schema validity and equality with the "
        "direct loop's greedy answers, not for accuracy."
    )


def _fill_decode_costs(result: Result, costs: DecodeCosts) -> None:
    """The bound on any batching here: llama_decode's cost per token in a step of n
    sequences (and in a prompt) against a step of one."""
    alone = costs.step_ms[1]
    for size, cost in costs.step_ms.items():
        if size > 1:
            result.add(Row(f"llama_decode per token, step of {size}", "ms", cost, alone))
    result.add(Row("llama_decode per token, prompt", "ms", costs.prompt_ms, alone))
    result.notes.append(
        "llama_decode rows: ms per token against a step of one sequence (ratio below 1: what "
        "batching saves per token at most; a prompt's tokens cost what they cost, batched or not)"
    )


def _fill_server_rows(result: Result, outcome: Outcome, task: str) -> None:
    """llama-server's own figures against the direct loop, then sibylq's batched worker
    against llama-server's 8 slots, in rows/s and in tokens/s (the server's answers may be
    longer or shorter: tokens/s compares the decoding alone)."""
    base_rates, base_tokens, base_answers = outcome[(task, "direct")]
    for slots in SERVER_SLOTS if LLAMA_SERVER else ():
        rates, token_rates, answers = outcome[(task, f"llama-server x{slots}")]
        name = f"{task} llama-server x{slots}"
        result.add(Row(f"{name} throughput", "rows/s", median(rates), median(base_rates)))
        result.add(Row(f"{name} tokens", "tokens/s", median(token_rates), median(base_tokens)))
        result.add(Row(f"{name} schema-valid", "share", _valid(answers)))
        same = sum(a.text == b.text for a, b in zip(answers, base_answers, strict=True))
        result.add(Row(f"{name} equal to the sequential answer", "share", same / len(answers)))
    if not LLAMA_SERVER:
        return
    server = outcome[(task, f"llama-server x{SERVER_SLOTS[-1]}")]
    ours = outcome[(task, WORKER_SIDES[1])]
    target = Target(">=", 1.0, on="sibylq") if task == "extract" else None
    name = f"{task} {WORKER_SIDES[1]} vs llama-server x{SERVER_SLOTS[-1]}"
    result.add(Row(f"{name} throughput", "rows/s", median(ours[0]), median(server[0])))
    paired = _paired(ours[0], server[0])
    result.add(Row(f"{name} throughput, same-block ratio", "x", paired, target=target))
    result.add(Row(f"{name} tokens", "tokens/s", median(ours[1]), median(server[1])))


def _paired(rates: list[float], base_rates: list[float]) -> float:
    """The median over blocks of one side's rate over the other's in the same block: the
    machine's speed drifts between blocks (by half, on a shared VM), so a ratio of medians
    taken over different blocks measures the drift as much as the sides."""
    return median(a / b for a, b in zip(rates, base_rates, strict=True))


def _valid(answers: list[Answer]) -> float:
    return sum(answer.valid for answer in answers) / len(answers)
