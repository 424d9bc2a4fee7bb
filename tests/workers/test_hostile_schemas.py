"""Hostile schemas through the public API, and pushed past it: a clear ``InvalidRequestError``
before anything is enqueued, and a typed failure, never a crash, on a worker that gets one
anyway (a job pushed by hand, an older producer). The rules are ``wire.schema_limits``."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from embedded.redis_server import RedisServer
from producer import Client, InvalidRequestError, JobFailedError, Models, OutputValidationError
from producer.job import Job
from tests.conftest import Worker
from wire.constants import attempts_key, queue_list_keys, queue_name
from wire.contract import GenConf, JobKind, JobSpec, Message
from wire.schema_limits import MAX_DEPTH

#: No worker serves it: what the producer refuses must not be waiting there.
UNSERVED = queue_name("fake", "hostile-unserved")


class Node(BaseModel):
    """A tree: a recursive model, whose schema is a ``$ref`` cycle through array items."""

    name: str
    children: list[Node]


def nested_arrays(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def nested_list_type(levels: int) -> Any:
    python_type: Any = str
    for _ in range(levels):
        python_type = list[python_type]
    return python_type


#: A $ref cycle without nesting: A -> B -> A. llama.cpp's grammar for it is a SIGSEGV.
REF_LOOP = {
    "type": "object",
    "properties": {"output": {"$ref": "#/$defs/A"}},
    "required": ["output"],
    "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}},
}


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 900, 5000])
@pytest.mark.parametrize("as_text", [False, True], ids=["dict", "JSON text"])
def test_a_deep_json_schema_is_refused_before_enqueue(
    client: Client, redis_server: RedisServer, levels: int, as_text: bool
) -> None:
    schema = nested_arrays(levels)
    given: Any = _deep_json_text(levels) if as_text else schema
    model = Models.create("fake", client=client, queue=UNSERVED)
    with pytest.raises(InvalidRequestError, match="nests"):
        model.json_async("q", json_schema=given)
    assert _waiting(redis_server) == 0


@pytest.mark.parametrize("levels", [MAX_DEPTH, 900, 5000])
def test_a_deeply_nested_python_type_is_refused_before_enqueue(
    client: Client, redis_server: RedisServer, levels: int
) -> None:
    model = Models.create("fake", client=client, queue=UNSERVED)
    with pytest.raises(InvalidRequestError, match="nest"):
        model.extract_async(nested_list_type(levels), "q")
    assert _waiting(redis_server) == 0


@pytest.mark.parametrize(
    "schema",
    [
        REF_LOOP,
        {"$ref": "#"},
        {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#/properties/a"}]}}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
    ],
    ids=["A -> B -> A", "root", "through anyOf", "unresolvable", "remote"],
)
@pytest.mark.parametrize("model_ref", ["llamacpp:smollm2", "openai:gpt-4o-mini", "fake"])
def test_a_ref_no_backend_can_take_is_refused_before_enqueue(
    client: Client, redis_server: RedisServer, schema: dict[str, Any], model_ref: str
) -> None:
    model = Models.create(model_ref, client=client, queue=UNSERVED)
    with pytest.raises(InvalidRequestError, match=r"\$ref|itself"):
        model.json_async("q", json_schema=schema)
    assert _waiting(redis_server) == 0


def test_a_recursive_model_runs_on_the_fake_backend(client: Client, fake_worker: Worker) -> None:
    tree = Models.create("fake", client=client).extract(Node, "a tree", timeout=30)
    assert tree == Node(name="fake", children=[])


def test_a_recursive_model_runs_on_llama_cpp(client: Client, llama_worker: Worker) -> None:
    pool = llama_worker.children()
    # Sampling under a recursive grammar is slow (~0.5 s a token on a busy 2-core VM).
    model = Models.create("llamacpp:smollm2", client=client, genconf={"max_tokens": 16})
    job = model.extract_async(Node, "A family tree: Ann, whose children are Bob and Cy.")
    try:
        assert isinstance(job.result(timeout=300), Node)
    except OutputValidationError as exc:  # a 135M model may nest until max_tokens
        assert exc.finish_reason == "length"
    assert llama_worker.children() == pool  # the grammar did not take the process down
    assert _attempts(client, job.id) == 1


# 70 levels: past the schema limit (64), short of the intake's nesting cap (workers.intake),
# which sets deeper messages aside before they decode (tests/workers/test_intake.py).
@pytest.mark.parametrize("schema", [REF_LOOP, nested_arrays(70)], ids=["ref loop", "deep"])
def test_a_worker_given_such_a_job_anyway_stores_a_typed_failure(
    client: Client, llama_worker: Worker, schema: dict[str, Any]
) -> None:
    pool = llama_worker.children()
    job = _push_unchecked(client, "llamacpp:smollm2", schema)
    with pytest.raises(JobFailedError) as raised:
        job.result(timeout=120)

    assert raised.value.remote_type == "InvalidRequestError"
    assert llama_worker.children() == pool  # no pool process died
    assert _attempts(client, job.id) == 1  # it ran once: no crash, no redelivery
    assert llama_worker.process.poll() is None


def test_the_fake_worker_checks_too(client: Client, fake_worker: Worker) -> None:
    job = _push_unchecked(client, "fake", nested_arrays(70))
    with pytest.raises(JobFailedError) as raised:
        job.result(timeout=30)
    assert raised.value.remote_type == "InvalidRequestError"
    assert "nests" in str(raised.value)


def _push_unchecked(client: Client, model_ref: str, schema: dict[str, Any]) -> Job[Any]:
    """Enqueue a job the way an older producer could: its schema never checked."""
    spec = JobSpec(
        model=model_ref,
        kind=JobKind.JSON,
        messages=(Message(role="user", content="hello"),),
        json_schema=schema,
        genconf=GenConf(max_tokens=16),
    )
    queue = Models.create(model_ref, client=client).queue
    job_id = client.submit(spec, queue, f"hostile-{uuid.uuid4()}")
    return Job.from_id(job_id, model=model_ref, client=client)


def _deep_json_text(levels: int) -> str:
    return '{"type": "array", "items": ' * levels + '{"type": "string"}' + "}" * levels


def _waiting(server: RedisServer) -> int:
    admin = redis.Redis(port=server.port)
    try:
        return sum(int(admin.llen(key)) for key in queue_list_keys(UNSERVED))
    finally:
        admin.close()


def _attempts(client: Client, job_id: str) -> int:
    return int(json.loads(client.redis.get(attempts_key(job_id)) or b"0"))
