"""The OpenAI stub's fault injection, seen through the real openai SDK.

The behaviours the backends rely on are covered in ``tests/workers/test_openai_backend.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import openai
import pytest

from tests.openai_stub import (
    Chaos,
    Fault,
    OpenAIStub,
    Violation,
    argument_parser,
    chaos_of,
    conversation_digest,
)

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

# Short faults, for speed. The client waits out these stalls (then they are late answers), so
# that no test depends on how fast a busy machine answers; STALLING tests the client timeout.
FAST = Chaos(retry_after_s=0.05, stall_s=0.2)
CLIENT_TIMEOUT_S = 10
STALLING = Chaos(rate_limit=0, server_error=0, stall=1, stall_s=1.0)


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(chaos=FAST) as server:
        yield server


@pytest.fixture
def client(stub: OpenAIStub) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stub.base_url, api_key="sk-test", max_retries=0, timeout=CLIENT_TIMEOUT_S
    )


def ask(client: openai.OpenAI, model: str, content: str = "hello") -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}]
    )


def outcome(client: openai.OpenAI, model: str, content: str) -> str:
    """What the SDK made of one request: the exception class it raised, or ``"ok"``."""
    try:
        ask(client, model, content)
    except openai.OpenAIError as error:
        return type(error).__name__
    return "ok"


def outcomes(client: openai.OpenAI, model: str, n: int) -> dict[str, str]:
    """The outcomes of ``n`` one-message conversations, sent 16 at a time (for speed)."""
    contents = [f"request {i}" for i in range(n)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(
            zip(contents, pool.map(lambda c: outcome(client, model, c), contents), strict=True)
        )


# -- chaos ------------------------------------------------------------------------------------


def test_chaos_faults_come_in_the_configured_proportions(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    n = 400
    seen = Counter(outcomes(client, "stub-chaos", n).values())
    faults = Counter(exchange.fault for exchange in stub.log)

    expected: dict[Fault | None, float] = {
        "rate_limit": FAST.rate_limit,
        "server_error": FAST.server_error,
        "stall": FAST.stall,
        None: 1 - FAST.rate_limit - FAST.server_error - FAST.stall,
    }
    assert set(faults) == set(expected)
    for fault, rate in expected.items():
        tolerance = 4 * math.sqrt(n * rate * (1 - rate))  # four binomial standard deviations
        assert abs(faults[fault] - n * rate) <= tolerance, (fault, faults)
    assert seen == {
        "RateLimitError": faults["rate_limit"],
        "InternalServerError": faults["server_error"],
        "ok": faults["stall"] + faults[None],  # stalls shorter than the client's timeout
    }


def test_the_log_says_which_fault_each_request_got(stub: OpenAIStub, client: openai.OpenAI) -> None:
    sdk_outcomes = outcomes(client, "stub-chaos", 100)

    by_fault: dict[Fault | None, tuple[str, int]] = {
        "rate_limit": ("RateLimitError", 429),
        "server_error": ("InternalServerError", 500),
        "stall": ("ok", 200),  # late, within the client's timeout
        None: ("ok", 200),
    }
    log = stub.log
    assert "stall" in {exchange.fault for exchange in log}
    assert {
        exchange.body["messages"][0]["content"]: by_fault[exchange.fault][0] for exchange in log
    } == sdk_outcomes
    for exchange in log:
        assert exchange.status == by_fault[exchange.fault][1]
        assert exchange.retry_after_s == (
            FAST.retry_after_s if exchange.fault == "rate_limit" else None
        )
        took_s = (exchange.answered_at or 0) - exchange.received_at
        assert took_s >= (FAST.stall_s if exchange.fault == "stall" else 0)


def test_chaos_is_reproducible_from_its_seed(client: openai.OpenAI) -> None:
    def faults(model: str) -> list[Fault | None]:
        with OpenAIStub(chaos=FAST) as fresh:
            pointed = client.with_options(base_url=fresh.base_url)
            for i in range(20):
                outcome(pointed, model, f"request {i}")
            return [exchange.fault for exchange in fresh.log]

    assert faults("stub-chaos") == faults("stub-chaos-1")  # Chaos.seed is 1
    assert faults("stub-chaos-2") == faults("stub-chaos-2")
    assert faults("stub-chaos-2") != faults("stub-chaos-3")


def test_clear_reseeds_chaos(stub: OpenAIStub, client: openai.OpenAI) -> None:
    for i in range(20):
        outcome(client, "stub-chaos-5", f"request {i}")
    first = [exchange.fault for exchange in stub.log]
    stub.clear()
    for i in range(20):
        outcome(client, "stub-chaos-5", f"request {i}")

    assert [exchange.fault for exchange in stub.log] == first


def test_chaos_answers_normally_with_schema_valid_json(client: openai.OpenAI) -> None:
    contents = []
    for i in range(20):
        try:
            response = client.chat.completions.create(
                model="stub-chaos",
                messages=[{"role": "user", "content": f"person {i} as json"}],
                response_format=PERSON_FORMAT,
            )
        except openai.OpenAIError:
            continue
        contents.append(json.loads(response.choices[0].message.content or ""))

    assert contents
    assert all(set(person) == {"name", "age"} for person in contents)


def test_chaos_rates_are_validated() -> None:
    with pytest.raises(ValueError, match="fault rates"):
        Chaos(rate_limit=0.9, server_error=0.2)
    with pytest.raises(ValueError, match="fault rates"):
        Chaos(stall=-0.1)
    with pytest.raises(ValueError, match="stall_s"):
        Chaos(stall_s=-1)


def test_all_faults_can_be_turned_off() -> None:
    with OpenAIStub(chaos=Chaos(rate_limit=0, server_error=0, stall=0)) as stub:
        plain = openai.OpenAI(base_url=stub.base_url, api_key="sk-test", max_retries=0)
        assert all(outcome(plain, "stub-chaos", f"request {i}") == "ok" for i in range(50))


# -- errors as the SDK sees them --------------------------------------------------------------


def test_a_rate_limit_is_a_rate_limit_error_with_openais_headers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        ask(client, "stub-ratelimit")

    error = raised.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert "Please try again in 50ms" in error.message
    headers = error.response.headers
    assert headers["retry-after-ms"] == "50"
    assert headers["retry-after"] == "1"  # whole seconds, rounded up
    assert headers["x-ratelimit-reset-requests"] == "50ms"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-request-id"].startswith("req_")


def test_the_ratelimit_delay_can_be_set_in_the_model_name(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        ask(client, "stub-ratelimit-1500")

    headers = raised.value.response.headers
    assert (headers["retry-after-ms"], headers["retry-after"]) == ("1500", "2")
    assert headers["x-ratelimit-reset-requests"] == "1.5s"
    (exchange,) = stub.log
    assert (exchange.status, exchange.retry_after_s, exchange.fault) == (429, 1.5, "rate_limit")


def test_the_sdk_waits_the_retry_after_it_is_told(stub: OpenAIStub) -> None:
    patient = openai.OpenAI(base_url=stub.base_url, api_key="sk-test", max_retries=2, timeout=5)

    with pytest.raises(openai.RateLimitError):
        ask(patient, "stub-ratelimit-200")

    assert len(stub.log) == 3
    assert stub.violations == []


def test_ratelimit_first_limits_only_the_first_request_for_the_name(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        ask(client, "stub-ratelimit-first-a1b2", "one")
    time.sleep(FAST.retry_after_s)
    ask(client, "stub-ratelimit-first-a1b2", "one")
    ask(client, "stub-ratelimit-first-a1b2", "two")
    with pytest.raises(openai.RateLimitError):
        ask(client, "stub-ratelimit-first", "three")  # another name: its own first request

    assert raised.value.response.headers["retry-after-ms"] == "50"
    statuses = [(exchange.model, exchange.status) for exchange in stub.log]
    assert statuses == [
        ("stub-ratelimit-first-a1b2", 429),
        ("stub-ratelimit-first-a1b2", 200),
        ("stub-ratelimit-first-a1b2", 200),
        ("stub-ratelimit-first", 429),
    ]
    assert stub.violations == []
    stub.clear()
    with pytest.raises(openai.RateLimitError):
        ask(client, "stub-ratelimit-first-a1b2", "four")  # clear() forgets who was limited


def test_status_429_still_answers_without_retry_after(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        ask(client, "stub-status-429")

    assert "Please try again in 20s" in raised.value.message
    assert "retry-after-ms" not in raised.value.response.headers
    (exchange,) = stub.log
    assert (exchange.status, exchange.retry_after_s, exchange.fault) == (429, None, None)


def test_a_server_error_is_an_internal_server_error(client: openai.OpenAI) -> None:
    with OpenAIStub(chaos=Chaos(rate_limit=0, server_error=1, stall=0)) as stub:
        failing = client.with_options(base_url=stub.base_url)
        with pytest.raises(openai.InternalServerError) as raised:
            ask(failing, "stub-chaos")

    assert raised.value.status_code == 500
    assert raised.value.type == "server_error"


def test_a_stall_outlasts_the_client_timeout() -> None:
    with OpenAIStub(chaos=STALLING) as stalling:
        timing_out = openai.OpenAI(
            base_url=stalling.base_url, api_key="sk-test", max_retries=0, timeout=0.1
        )
        with pytest.raises(openai.APITimeoutError):
            ask(timing_out, "stub-chaos")
        (pending,) = stalling.log
        assert (pending.fault, pending.status) == ("stall", None)  # not answered yet

        patient = timing_out.with_options(timeout=10)
        response = ask(patient, "stub-chaos", "wait for it")
        late = stalling.log[-1]

    assert response.choices[0].message.content == "stub reply: wait for it"
    assert (late.fault, late.status) == ("stall", 200)
    assert (late.answered_at or 0) - late.received_at >= STALLING.stall_s


def test_closing_the_stub_ends_a_stall() -> None:
    stub = OpenAIStub(chaos=replace(STALLING, stall_s=60))
    client = openai.OpenAI(base_url=stub.base_url, api_key="sk-test", max_retries=0, timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        ask(client, "stub-chaos")

    started = time.monotonic()
    stub.close()

    assert time.monotonic() - started < 2


def test_normal_answers_carry_rate_limit_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="stub", messages=[{"role": "user", "content": "three words here"}]
    )

    total = raw.parse().usage.total_tokens  # type: ignore[union-attr]
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(2_000_000 - total)
    assert int(raw.headers["x-ratelimit-remaining-requests"]) > 0
    assert raw.headers["x-request-id"].startswith("req_")


def test_request_ids_are_unique(client: openai.OpenAI) -> None:
    ids = {
        client.chat.completions.with_raw_response.create(
            model="stub", messages=[{"role": "user", "content": "same"}]
        ).headers["x-request-id"]
        for _ in range(3)
    }

    assert len(ids) == 3


# -- retry-after violations -------------------------------------------------------------------


def test_a_retry_before_the_retry_after_is_a_violation(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.RateLimitError):
        ask(client, "stub-ratelimit-1000", "hurry")
    with pytest.raises(openai.RateLimitError):
        ask(client, "stub-ratelimit-1000", "hurry")

    ((conversation, early_by_s),) = stub.violations
    assert conversation == conversation_digest([{"role": "user", "content": "hurry"}])
    assert 0 < early_by_s <= 1.0
    assert all(exchange.conversation == conversation for exchange in stub.log)


def test_a_retry_after_the_retry_after_is_no_violation(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.RateLimitError):
        ask(client, "stub-ratelimit-100", "patience")
    time.sleep(0.15)
    ask(client, "stub", "patience")

    assert stub.violations == []


def test_other_conversations_are_not_held_back(stub: OpenAIStub, client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        ask(client, "stub-ratelimit-1000", "one")
    ask(client, "stub", "another")

    assert stub.violations == []


def test_clear_forgets_violations_and_retry_afters(stub: OpenAIStub, client: openai.OpenAI) -> None:
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            ask(client, "stub-ratelimit-1000", "again")
    assert len(stub.violations) == 1

    stub.clear()
    ask(client, "stub", "again")

    assert stub.violations == []
    assert isinstance(Violation("x", 1.0), tuple)


# -- invalid once -----------------------------------------------------------------------------


def test_invalid_once_is_valid_on_the_reask(stub: OpenAIStub, client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "a person as json"}]
    first = client.chat.completions.create(
        model="stub-invalid-once", messages=messages, response_format=PERSON_FORMAT
    )
    assert first.choices[0].message.content == "this is not json"
    assert first.choices[0].finish_reason == "stop"

    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "That was not valid JSON. Answer with the JSON only."},
    ]
    second = client.chat.completions.create(
        model="stub-invalid-once", messages=messages, response_format=PERSON_FORMAT
    )

    assert set(json.loads(second.choices[0].message.content or "")) == {"name", "age"}
    assert [len(body["messages"]) for body in stub.requests_for("stub-invalid-once")] == [1, 3]


# -- the log ----------------------------------------------------------------------------------


def test_requests_and_log_record_arrival_and_answer(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    before = time.time()
    ask(client, "stub", "first")
    with pytest.raises(openai.BadRequestError):
        ask(client, "stub-context", "second")

    assert [body["model"] for body in stub.requests] == ["stub", "stub-context"]
    assert stub.requests_for("stub") == [stub.log[0].body]
    ok, refused = stub.log
    assert (ok.model, ok.status, ok.fault) == ("stub", 200, None)
    assert (refused.model, refused.status, refused.retry_after_s) == ("stub-context", 400, None)
    assert before <= ok.received_at <= refused.received_at <= time.time()


def test_the_command_line_takes_the_chaos_options() -> None:
    args = argument_parser().parse_args(
        ["--rate-limit", "0.5", "--stall", "0", "--retry-after-s", "2", "--seed", "7"]
    )

    assert chaos_of(args) == Chaos(rate_limit=0.5, stall=0, retry_after_s=2, seed=7)
    assert chaos_of(argument_parser().parse_args([])) == Chaos()
