"""The llama.cpp batching engine on the bundled SmolLM2: several jobs decoded in one batch,
each keeping the one-job path's semantics (schema, usage, finish reason, deadline, prompt
limit, revoke).

SmolLM2-135M is a weak model: these tests check validity and equality with the one-job path,
never accuracy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jsonschema
import llama_cpp
import pytest

from producer.targets import classify_target
from tests.conftest import wait_for
from wire.contract import GenConf, JobKind, JobSpec, Message
from wire.errors import (
    JobCancelledError,
    JobTimeLimitError,
    OutputValidationError,
    PromptTooLongError,
)
from wire.settings import Settings
from workers.backends.base import Completion, CompletionRequest, Deadline
from workers.backends.llama_engine import LlamaEngine
from workers.backends.llamacpp import LlamaCppBackend
from workers.execute import Progress, execute
from workers.model_files import resolve_model_path

SEQUENCES = 4
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
NAMES = {"type": "object", "properties": {"output": {"type": "array", "items": {"type": "string"}}}}


def request(prompt: str, schema: dict[str, Any] | None = None, **genconf: Any) -> CompletionRequest:
    genconf.setdefault("max_tokens", 32)
    messages = (Message(role="user", content=prompt),)
    return CompletionRequest("smollm2", messages, schema, GenConf(**genconf))


#: A batch of mixed kinds and schemas: classifications with two label sets, an extraction, a
#: list, a text cut by a stop string and a text cut at max_tokens.
MIXED = [
    request(
        "Is this SMS spam? WIN a FREE prize now, call 0800!",
        classify_target(["spam", "ham"]).json_schema,
    ),
    request(
        "Is this SMS spam? See you at 5 at the station",
        classify_target(["spam", "ham"]).json_schema,
    ),
    request("Is the sky blue?", classify_target(["yes", "no", "maybe"]).json_schema),
    request("John Smith is 42 years old and lives in Paris.", PERSON, max_tokens=40),
    request("Generate 3 English first names", NAMES, max_tokens=40),
    request("Say hello and introduce yourself.", stop=("!", ".")),
    request("Count from one to twenty in words.", max_tokens=12),
]


@pytest.fixture(scope="module")
def batching() -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(Settings(llama_batch=SEQUENCES))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def one_job() -> LlamaCppBackend:
    return LlamaCppBackend(Settings(llama_batch=1))


def at_once(
    backend: LlamaCppBackend, requests: list[CompletionRequest]
) -> list[Future[Completion]]:
    """``requests`` handed to ``backend`` together, as a threads pool hands its jobs."""
    pool = ThreadPoolExecutor(len(requests))
    futures = [pool.submit(backend.complete, one) for one in requests]
    pool.shutdown(wait=False)
    return futures


def engine_of(backend: LlamaCppBackend) -> Any:
    return backend.engine(resolve_model_path("smollm2", Settings()))


def test_a_mixed_batch_gives_every_job_the_one_job_paths_answer(
    batching: LlamaCppBackend, one_job: LlamaCppBackend
) -> None:
    expected = [one_job.complete(one) for one in MIXED]
    answers = [future.result(timeout=120) for future in at_once(batching, MIXED)]
    # The same prompts, to the token, and the same budgets.
    assert [a.usage.prompt_tokens for a in answers] == [e.usage.prompt_tokens for e in expected]
    for one, answer in zip(MIXED, answers, strict=True):
        assert answer.usage.completion_tokens <= one.genconf.max_tokens
        if one.json_schema is not None and answer.finish_reason == "stop":
            jsonschema.validate(json.loads(answer.text), one.json_schema)
    assert {answer.finish_reason for answer in answers} == {"stop", "length"}
    assert answers[-1].usage.completion_tokens == 12
    # Greedy decoding gives the one-job path's answers, but for near-ties: llama.cpp's sums
    # depend on the batch's shape, so a token the model all but hesitates on may flip (seen
    # once in CI on the unconstrained counting prompt). `python -m benchmarks llama` reports
    # the share; here most must match.
    assert sum(a == e for a, e in zip(answers, expected, strict=True)) >= len(MIXED) - 2


def test_more_jobs_than_sequences_wait_for_a_free_one(batching: LlamaCppBackend) -> None:
    jobs = [
        request(f"Is {n} an even number?", classify_target(["yes", "no"]).json_schema)
        for n in range(2 * SEQUENCES + 1)
    ]
    answers = [future.result(timeout=120) for future in at_once(batching, jobs)]
    assert all(json.loads(answer.text)["output"] in ("yes", "no") for answer in answers)
    assert engine_of(batching).active() == 0


def test_a_job_past_its_deadline_fails_alone_and_frees_its_sequence(
    batching: LlamaCppBackend,
) -> None:
    long = request("Write a very long story about a dragon.", max_tokens=2000)
    long = CompletionRequest(**{**long.__dict__, "deadline": Deadline.after(1.0)})
    short = [request(f"Say the number {n}.", max_tokens=8) for n in range(SEQUENCES - 1)]
    futures = at_once(batching, [long, *short])
    assert all(future.result(timeout=60).finish_reason for future in futures[1:])
    with pytest.raises(JobTimeLimitError, match="time limit of 1 s"):
        futures[0].result(timeout=30)
    # Every sequence is free again: a full batch runs.
    again = at_once(batching, [request(f"Say {n}.", max_tokens=4) for n in range(SEQUENCES)])
    assert all(future.result(timeout=60).usage.completion_tokens == 4 for future in again)


def test_a_prompt_too_long_fails_alone(batching: LlamaCppBackend) -> None:
    jobs = [
        request("word " * 5000),
        request("Is water wet?", classify_target(["yes", "no"]).json_schema),
    ]
    too_long, fine = at_once(batching, jobs)
    with pytest.raises(PromptTooLongError, match="context window of 2048"):
        too_long.result(timeout=60)
    assert json.loads(fine.result(timeout=60).text)["output"] in ("yes", "no")


def test_a_revoked_job_ends_midway_and_frees_its_sequence(batching: LlamaCppBackend) -> None:
    revoked = threading.Event()
    long = request("Write a very long story about a dragon.", max_tokens=2000)
    long = CompletionRequest(**{**long.__dict__, "job_id": "j-1", "cancelled": revoked.is_set})
    started = time.monotonic()
    doomed, other = at_once(batching, [long, request("Say hello.", max_tokens=8)])
    assert other.result(timeout=60).usage.completion_tokens == 8
    revoked.set()
    with pytest.raises(JobCancelledError, match="j-1"):
        doomed.result(timeout=30)
    assert time.monotonic() - started < 30  # long before 2000 tokens
    wait_for("the revoked job's sequence to be free", lambda: engine_of(batching).active() == 0)


def test_each_step_lists_its_sequences_in_id_order(
    batching: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp splits a batch over per-sequence KV streams into ubatches of sequences whose
    ids follow each other in batch order, each ubatch one more pass over the weights: jobs
    that finish and are replaced out of order must not turn one step into several."""
    steps: list[list[int]] = []
    decode = llama_cpp.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        steps.append([batch.seq_id[index][0] for index in range(batch.n_tokens)])
        result: int = decode(ctx, batch)
        return result

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    # Lengths that end the sequences out of the order they started in, so freed ids are
    # taken again while lower and higher ones still run.
    jobs = [
        request(f"Count from {n} to 100 in words.", max_tokens=(3, 17, 9, 25)[n % 4])
        for n in range(3 * SEQUENCES)
    ]
    assert all(future.result(timeout=120).text for future in at_once(batching, jobs))
    assert any(len(set(step)) == SEQUENCES for step in steps)
    assert all(step == sorted(step) for step in steps)


def test_schemas_taking_turns_in_a_sequence_keep_their_prompts_in_host_memory(
    batching: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sequence serves two classifications, an extraction, then the first
    classification again: the prefix the two classifications shared (system instruction and
    schema) comes back from host memory, so the last job decodes only what the second one
    decoded of its own (it decoded the classification's instruction again), and answers as
    the first did."""
    decoded: list[int] = []
    decode = llama_cpp.llama_decode

    def counting(ctx: Any, batch: Any) -> int:
        decoded.append(batch.n_tokens)
        result: int = decode(ctx, batch)
        return result

    engine = LlamaEngine(batching.load(resolve_model_path("smollm2", Settings())), 1, 2048)
    monkeypatch.setattr(llama_cpp, "llama_decode", counting)
    runs = []
    try:
        for job in (MIXED[0], MIXED[1], MIXED[4], MIXED[0]):
            decoded.clear()
            runs.append((engine.complete(job), sum(decoded)))
    finally:
        engine.close()
    (first, _), (second, second_decoded), _, (again, again_decoded) = runs

    # Each answer token is decoded after it is drawn (the end-of-text one excepted).
    shared = second.usage.prompt_tokens + second.usage.completion_tokens - second_decoded
    assert shared > 40  # the instruction and schema the two classifications share
    assert again_decoded == first.usage.prompt_tokens - shared + again.usage.completion_tokens
    assert again.text == first.text


def test_a_sequences_prompt_saved_in_host_memory_is_only_what_jobs_shared(
    batching: LlamaCppBackend,
) -> None:
    """Classifications of different texts, one after another in one sequence, save
    nothing: each one's own text is no use to the next, and what they share stays in the
    cells. Only a job of another schema saves the shared prefix, once."""
    engine = LlamaEngine(batching.load(resolve_model_path("smollm2", Settings())), 1, 2048)
    try:
        for job in (MIXED[0], MIXED[1], MIXED[0], MIXED[1]):
            engine.complete(job)
        assert len(engine._prompts) == 0
        engine.complete(MIXED[4])
        engine.complete(MIXED[2])  # another schema again
        assert len(engine._prompts) == 1
    finally:
        engine.close()


def test_a_seeded_sampled_job_repeats_itself(batching: LlamaCppBackend) -> None:
    job = request("Tell me a fun fact.", temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
    first, second = (future.result(timeout=60) for future in at_once(batching, [job, job]))
    assert first.text == second.text


def test_the_engine_log_states_its_kv_cache(
    batching: LlamaCppBackend, caplog: pytest.LogCaptureFixture
) -> None:
    del batching
    with caplog.at_level("INFO"):
        backend = LlamaCppBackend(Settings(llama_batch=2, llama_n_ctx=1024))
        engine_of(backend)
        backend.close()
    assert "2 sequences x n_ctx 1024 = 2048 KV cells" in caplog.text


#: An integer the grammar cannot hold to its minimum (llama.cpp's schema converter ignores
#: ``minimum``): the model writes some small number, the schema check refuses it, and the job
#: is re-asked.
HUGE = {
    "type": "object",
    "properties": {"output": {"type": "integer", "minimum": 10**12}},
    "required": ["output"],
}


def test_re_asks_run_inside_the_batch_while_other_jobs_finish(
    batching: LlamaCppBackend,
) -> None:
    def spec(prompt: str, schema: dict[str, Any] | None) -> JobSpec:
        messages = (Message(role="user", content=prompt),)
        return JobSpec(
            model="llamacpp:smollm2",
            kind=JobKind.EXTRACT,
            messages=messages,
            json_schema=schema,
            genconf=GenConf(max_tokens=24),
        )

    re_asked = Progress()
    jobs = [
        (spec("How many legs does a cat have?", HUGE), re_asked),
        *(
            (
                spec(f"Is {n} an even number?", classify_target(["yes", "no"]).json_schema),
                Progress(),
            )
            for n in range(SEQUENCES - 1)
        ),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(execute, one, batching, "w", progress, reask_max=2)
            for one, progress in jobs
        ]
        with pytest.raises(OutputValidationError, match=r"minimum .*\(after 3 tries\)"):
            futures[0].result(timeout=180)
        envelopes = [future.result(timeout=180) for future in futures[1:]]
    assert all(envelope.value["output"] in ("yes", "no") for envelope in envelopes)
    # Each re-ask asked again with the answer and the reason it was refused, so each prompt
    # was longer than the last; their tokens are all counted.
    assert re_asked.calls == 3
    assert len(re_asked.raw_outputs) == 3
    assert all(str(json.loads(raw)["output"]).lstrip("-").isdigit() for raw in re_asked.raw_outputs)
    assert re_asked.usage.completion_tokens > 0
    assert engine_of(batching).active() == 0


def test_a_classification_gives_each_labels_probability_on_both_paths(
    batching: LlamaCppBackend, one_job: LlamaCppBackend
) -> None:
    labels = ["spam", "ham", "unsure"]
    job = request("Is this SMS spam? WIN a FREE prize now!", classify_target(labels).json_schema)
    alone = one_job.complete(job)
    batched = [future.result(timeout=120) for future in at_once(batching, [job, MIXED[3]])]
    for answer in (alone, batched[0]):
        assert answer.label_probs is not None
        assert set(answer.label_probs) == set(labels)
        assert sum(answer.label_probs.values()) == pytest.approx(1)
        assert answer.label_probs[json.loads(answer.text)["output"]] > 0
    # The same logits at the same point, but for the batch's sums.
    for label in labels:
        assert batched[0].label_probs[label] == pytest.approx(alone.label_probs[label], abs=0.02)
    assert batched[1].label_probs is None  # not a classification


def test_a_label_the_model_finds_unlikely_still_gets_its_share(one_job: LlamaCppBackend) -> None:
    """Every token that can spell a label is read at the choice point, not only the likeliest
    ones: on this SMS (the shipped sample's third) no token of "ham" is among the model's
    64 likeliest there, yet the model gives it a few percent once the schema's grammar rules
    out everything else."""
    sms = (
        "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 "
        "to receive entry question(std txt rate)T&C's apply 08452810075over18's"
    )
    schema = classify_target(["spam", "ham"]).json_schema
    answer = one_job.complete(request(f"Is this SMS spam? {sms}", schema))
    assert answer.label_probs is not None
    assert 0.001 < answer.label_probs["ham"] < 0.5
