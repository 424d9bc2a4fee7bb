"""The wait flow decides timeouts, "no worker" and "Redis gone" with no I/O: driven here by
hand with a fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer.waiting import UNREACHABLE, CheckWorkers, Wait, WaitPlan, wait_flow
from wire.errors import BrokerUnavailableError, JobTimeoutError, NoWorkerError

DONE = json.dumps({"status": "SUCCESS", "result": 1}).encode()
STARTED = json.dumps({"status": "STARTED", "result": None}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plan(**overrides: Any) -> WaitPlan:
    values: dict[str, Any] = {
        "job_id": "j1",
        "queue": "sibylq.fake",
        "model": "fake",
        "timeout_s": None,
        "no_worker_timeout_s": 10.0,
        "broker_timeout_s": 20.0,
        "check_every_s": 2.0,
    }
    return WaitPlan(**{**values, **overrides})


def _run(flow: Any, clock: Clock, answer_wait: Any, workers: Any = True) -> Any:
    """Drive ``flow``, each Wait costing its seconds on the clock."""
    step = next(flow)
    for _ in range(1000):
        if isinstance(step, Wait):
            clock.now += step.seconds
            answer = answer_wait(clock.now)
        else:
            assert isinstance(step, CheckWorkers)
            answer = workers
        try:
            step = flow.send(answer)
        except StopIteration as done:
            return done.value
    raise AssertionError("flow never ended")


def test_returns_the_stored_result_once_the_job_is_ready() -> None:
    clock = Clock()
    meta = _run(wait_flow(_plan(), clock), clock, lambda now: DONE if now >= 6 else STARTED)
    assert meta["status"] == "SUCCESS"


def test_times_out_at_the_deadline_not_later() -> None:
    clock = Clock()
    with pytest.raises(JobTimeoutError):
        _run(wait_flow(_plan(timeout_s=5.0), clock), clock, lambda now: None)
    assert clock.now == pytest.approx(5.0)


def test_no_worker_after_the_grace_period() -> None:
    clock = Clock()
    with pytest.raises(NoWorkerError, match="sibylq worker fake"):
        _run(wait_flow(_plan(), clock), clock, lambda now: None, workers=False)
    assert 10.0 <= clock.now <= 12.0


def test_a_live_worker_means_waiting_on() -> None:
    clock = Clock()
    meta = _run(wait_flow(_plan(), clock), clock, lambda now: DONE if now > 100 else None)
    assert meta["status"] == "SUCCESS"


def test_no_worker_check_can_be_disabled() -> None:
    clock = Clock()
    flow = wait_flow(_plan(no_worker_timeout_s=0.0), clock)
    meta = _run(flow, clock, lambda now: DONE if now > 100 else None, workers=False)
    assert meta["status"] == "SUCCESS"


def test_redis_away_too_long_is_reported() -> None:
    clock = Clock()
    with pytest.raises(BrokerUnavailableError):
        _run(wait_flow(_plan(), clock), clock, lambda now: UNREACHABLE, workers=UNREACHABLE)
    assert 20.0 <= clock.now <= 22.0


def test_redis_coming_back_resets_the_clock() -> None:
    clock = Clock()
    answers = lambda now: UNREACHABLE if now % 30 < 15 else (DONE if now > 200 else None)  # noqa: E731
    assert _run(wait_flow(_plan(), clock), clock, answers)["status"] == "SUCCESS"
