"""The providers Sibila names (``groq:``, ``mistral:``, ``together:``, ``fireworks:``,
``anthropic:``) are aliases of the OpenAI-compatible worker: each with its endpoint, its key
variable and its own queue. Real workers run jobs end to end against the OpenAI stub, each
pointed at it by its ``SIBYLQ_<NAME>_BASE_URL``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import BackendError, Client, Models, OutputValidationError
from tests.conftest import Worker, wait_for
from tests.openai_stub import OpenAIStub
from wire.constants import dead_letter_key, result_key, worker_info_key, workers_key
from wire.errors import MissingApiKeyError
from wire.modelref import parse_model_ref
from wire.providers import API_PROVIDERS, PLACEHOLDER_API_KEY
from wire.redact import secrets_of
from wire.settings import Settings

HOSTED = [name for name in API_PROVIDERS if name != "openai"]


@dataclasses.dataclass
class Person:
    name: str
    age: int


def key_of(name: str) -> str:
    """A distinct, recognisable key per provider, long enough to be masked wherever it shows."""
    return f"{name[:3]}-test-key-5f2K9qZxR7mW3vT8nB1c-{name}"


#: What may point a process at a provider, or give it a key.
_KEY_AND_URL_VARIABLES = {
    variable
    for p in API_PROVIDERS.values()
    for variable in (p.key_env, p.base_url_env, p.settings_env)
    if variable
}


@pytest.fixture(scope="module")
def provider_workers(
    start_worker: Callable[..., Worker], openai_stub: OpenAIStub
) -> Iterator[Mapping[str, Worker]]:
    """A worker per hosted provider, started as ``sibylq worker <name>`` is, with its key and
    its endpoint overridden to the stub; stopped after this module's tests."""
    workers = {}
    for name in HOSTED:
        provider = API_PROVIDERS[name]
        env = {provider.key_env: key_of(name), provider.settings_env: openai_stub.base_url}
        workers[name] = start_worker(name, "-c", "4", queue=f"sibylq.{name}", env=env)
    yield workers
    for worker in workers.values():
        worker.stop()


# -- the table ---------------------------------------------------------------------------------


def test_each_provider_has_its_own_queue_and_endpoint() -> None:
    queues = {name: parse_model_ref(f"{name}:some-model").queue for name in API_PROVIDERS}

    assert queues["groq"] == "sibylq.groq"
    assert len(set(queues.values())) == len(API_PROVIDERS)
    assert len({provider.base_url for provider in API_PROVIDERS.values()}) == len(API_PROVIDERS)
    assert len({provider.key_env for provider in API_PROVIDERS.values()}) == len(API_PROVIDERS)


def test_sibylq_queue_prints_a_providers_queue() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sibylq", "queue", "groq:llama-3.1-8b-instant"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "sibylq.groq")


@pytest.mark.parametrize("name", list(API_PROVIDERS))
def test_the_endpoint_is_sibylqs_override_then_the_providers_variable_then_its_own(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = API_PROVIDERS[name]
    for variable in _KEY_AND_URL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert Settings().base_url(provider) == provider.base_url

    if provider.base_url_env is not None:  # OPENAI_BASE_URL, GROQ_BASE_URL (Sibila's)...
        monkeypatch.setenv(provider.base_url_env, "http://own:1/v1")
        assert Settings().base_url(provider) == "http://own:1/v1"

    monkeypatch.setenv(provider.settings_env, "http://sibylq:2/v1")
    assert Settings().base_url(provider) == "http://sibylq:2/v1"


def test_a_hosted_api_needs_its_key_and_a_local_server_does_not() -> None:
    with pytest.raises(MissingApiKeyError, match="GROQ_API_KEY is not set") as raised:
        API_PROVIDERS["groq"].api_key({})
    assert (raised.value.provider, raised.value.variable) == ("groq", "GROQ_API_KEY")
    assert API_PROVIDERS["openai"].api_key({}) == PLACEHOLDER_API_KEY
    assert API_PROVIDERS["mistral"].api_key({"MISTRAL_API_KEY": " k-1 "}) == "k-1"


def test_every_providers_key_is_a_secret_of_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for provider in API_PROVIDERS.values():
        monkeypatch.setenv(provider.key_env, key_of(provider.name))

    assert set(secrets_of()) == {key_of(name) for name in API_PROVIDERS}


# -- workers, end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTED)
def test_a_provider_worker_runs_extract_and_classify_jobs(
    name: str, client: Client, provider_workers: Mapping[str, Worker], openai_stub: OpenAIStub
) -> None:
    model = Models.create(f"{name}:{name}-model", client=client)

    assert model.extract(Person, "John, 42") == Person(name="fake", age=0)
    assert model.classify(["spam", "ham"], "win a prize") == "spam"
    assert model.call("hello") == "stub reply: hello"

    asked = openai_stub.requests_for(f"{name}-model")
    assert len(asked) == 3  # each job went to the stub, through this provider's worker
    formats = [(body.get("response_format") or {}).get("type") for body in asked]
    if API_PROVIDERS[name].modes == ("tools",):  # Anthropic ignores response_format
        assert formats == [None, None, None]
        assert [body.get("tool_choice") is not None for body in asked] == [True, True, False]
    else:
        assert formats == ["json_schema", "json_schema", None]


@pytest.mark.parametrize("name", HOSTED)
def test_a_provider_worker_is_a_threads_pool_on_its_own_queue(
    name: str, redis_server: RedisServer, provider_workers: Mapping[str, Worker]
) -> None:
    results = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        (hostname,) = results.zrange(workers_key(f"sibylq.{name}"), 0, -1)
        info = json.loads(results.get(worker_info_key(hostname)) or "{}")
    finally:
        results.close()

    assert (info["model"], info["pool"], info["concurrency"]) == (name, "threads", 4)


@pytest.mark.parametrize("name", HOSTED)
def test_a_provider_worker_sends_its_own_key(
    name: str, client: Client, provider_workers: Mapping[str, Worker]
) -> None:
    # The stub's 401 quotes the key it was given as OpenAI does: 8 characters, stars, 4.
    with pytest.raises(BackendError) as raised:
        Models.create(f"{name}:stub-status-401", client=client).call("hello")

    key = key_of(name)
    assert f"{key[:8]}{'*' * (len(key) - 12)}{key[-4:]}" in str(raised.value)


@pytest.mark.parametrize("name", HOSTED)
def test_the_seed_goes_in_the_providers_own_field(
    name: str, client: Client, provider_workers: Mapping[str, Worker], openai_stub: OpenAIStub
) -> None:
    model_name = f"{name}-seeded"
    Models.create(f"{name}:{model_name}", client=client, genconf={"seed": 7}).call("hello")

    (body,) = openai_stub.requests_for(model_name)
    field = API_PROVIDERS[name].seed_field  # random_seed for Mistral, none for Anthropic
    sent = {key: body[key] for key in ("seed", "random_seed") if key in body}
    assert sent == ({} if field is None else {field: 7})


def test_anthropic_structured_jobs_work_where_response_format_is_ignored(
    client: Client, provider_workers: Mapping[str, Worker]
) -> None:
    # Anthropic's compatibility layer accepts response_format and ignores it: an endpoint
    # that does so (as stub-ignore-format) answers text, which is no Person...
    with pytest.raises(OutputValidationError):
        Models.create("groq:stub-ignore-format", client=client).extract(Person, "John, 42")
    # ...so anthropic: jobs ask for a forced tool call only, which it honours.
    model = Models.create("anthropic:stub-ignore-format", client=client)
    assert model.extract(Person, "John, 42") == Person(name="fake", age=0)


# -- keys: missing, and never written out -------------------------------------------------------


@pytest.mark.parametrize("name", HOSTED)
def test_a_worker_without_its_key_exits_2_naming_the_variable(
    name: str, worker_env: dict[str, str]
) -> None:
    provider = API_PROVIDERS[name]
    env = {k: v for k, v in worker_env.items() if k not in _KEY_AND_URL_VARIABLES}

    result = subprocess.run(
        [sys.executable, "-m", "sibylq", "worker", f"{name}:some-model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert f"sibylq: error: {provider.key_env} is not set" in result.stderr


@pytest.mark.parametrize("name", ["groq", "anthropic"])
def test_a_key_the_endpoint_echoes_is_in_no_error_result_dead_letter_or_log(
    name: str, client: Client, provider_workers: Mapping[str, Worker], dead_letters: redis.Redis
) -> None:
    # stub-echo-key-400 names the bare key ("invalid API key: gro-test-..."), no Bearer before
    # it: only the process's own secrets (every provider's key) can mask it.
    job = Models.create(f"{name}:stub-echo-key-400", client=client).call_async("hello")
    with pytest.raises(BackendError) as raised:
        job.result(timeout=30)

    worker = provider_workers[name]
    stored = dead_letters.get(result_key(job.id))
    letter = dead_letters.get(dead_letter_key(job.id))
    assert stored is not None and letter is not None
    assert "openai.BadRequestError" in json.loads(stored)["traceback"]  # the chain is kept...
    wait_for("the failure in the worker's log", lambda: f"{job.id}] raised" in worker.log())
    assert "invalid API key: ***" in str(raised.value)
    for where, text in {
        "error": str(raised.value),
        "stored result": stored.decode(),
        "dead letter": letter.decode(),
        "worker log": worker.log(),
    }.items():
        assert key_of(name) not in text, where  # ...but not the key
