"""Issue 11, item 7, the size limit (``wire.schema_limits.MAX_BYTES``): a JSON schema too big is
refused with ``InvalidRequestError`` before anything is enqueued, and a worker given one anyway
(a job pushed by hand, an older producer) stores a typed failure instead of running it.
(The depth and ``$ref`` rules are in ``tests/workers/test_hostile_schemas.py``.)"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, InvalidRequestError, JobFailedError, Models
from producer.job import Job
from tests.conftest import Worker
from wire.constants import queue_list_keys, queue_name
from wire.contract import GenConf, JobKind, JobSpec, Message
from wire.schema_limits import MAX_BYTES

#: No worker serves it: what the producer refuses must not be waiting there.
UNSERVED = queue_name("fake", "hostile-size-unserved")


def wide_schema(min_bytes: int) -> dict[str, Any]:
    """A flat object schema (no nesting, no $ref) of at least ``min_bytes`` of JSON."""
    field = {"type": "string", "description": "x" * 200}
    count = min_bytes // len(json.dumps(field)) + 1
    return {
        "type": "object",
        "properties": {f"field_{i}": field for i in range(count)},
        "required": ["field_0"],
    }


def waiting(server: RedisServer) -> int:
    admin = redis.Redis(port=server.port)
    try:
        return sum(int(admin.llen(key)) for key in queue_list_keys(UNSERVED))
    finally:
        admin.close()


@pytest.mark.parametrize("as_text", [False, True], ids=["dict", "JSON text"])
def test_a_schema_over_the_size_limit_is_refused_before_enqueue(
    client: Client, redis_server: RedisServer, as_text: bool
) -> None:
    schema = wide_schema(MAX_BYTES + 1)
    given: Any = json.dumps(schema) if as_text else schema
    model = Models.create("fake", client=client, queue=UNSERVED)
    with pytest.raises(InvalidRequestError, match="bytes of JSON"):
        model.json_async("q", json_schema=given)
    assert waiting(redis_server) == 0


def test_a_schema_within_the_size_limit_is_enqueued(
    client: Client, redis_server: RedisServer
) -> None:
    model = Models.create("fake", client=client, queue=UNSERVED)
    model.json_async("q", json_schema=wide_schema(MAX_BYTES // 2))
    assert waiting(redis_server) == 1
    admin = redis.Redis(port=redis_server.port)
    admin.delete(*queue_list_keys(UNSERVED))
    admin.close()


def test_a_worker_given_a_schema_over_the_size_limit_stores_a_typed_failure(
    client: Client, fake_worker: Worker
) -> None:
    spec = JobSpec(
        model="fake",
        kind=JobKind.JSON,
        messages=(Message(role="user", content="hello"),),
        json_schema=wide_schema(MAX_BYTES + 1),
        genconf=GenConf(max_tokens=16),
    )
    queue = Models.create("fake", client=client).queue
    job_id = client.submit(spec, queue, f"hostile-size-{uuid.uuid4()}")  # never checked
    with pytest.raises(JobFailedError) as raised:
        Job.from_id(job_id, model="fake", client=client).result(timeout=30)
    assert raised.value.remote_type == "InvalidRequestError"
    assert "bytes of JSON" in str(raised.value)
    assert fake_worker.process.poll() is None
