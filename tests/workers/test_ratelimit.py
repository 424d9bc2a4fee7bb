"""The fleet-wide rate limiter, against a real Redis.

Most assertions are on the schedule the limiter reserves: each grant's wait is turned into the
moment its caller may send, on this process's monotonic clock. A call's duration bounds how far
that moment can be off, so tolerances widen by itself on a slow machine instead of flaking.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from embedded.redis_server import RedisServer, free_port
from wire.constants import rate_limit_keys
from wire.contract import Message
from wire.settings import RateLimit
from workers.ratelimit import (
    KEY_MARGIN_MS,
    TOKENS_PER_IMAGE,
    Grant,
    RateLimiter,
    estimate_tokens,
    scope_for,
)

#: Rounding in Redis (ms with 3 decimals) and clock drift over a few seconds.
TOLERANCE_S = 0.005


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def limiter(redis_client: redis.Redis) -> RateLimiter:
    return RateLimiter(redis_client)


@pytest.fixture
def scope() -> str:
    return f"test:{uuid.uuid4().hex}"


class Schedule:
    """Acquires for one scope and records when each reserved request may be sent."""

    def __init__(self, limiter: RateLimiter, scope: str, limits: RateLimit) -> None:
        self.limiter = limiter
        self.scope = scope
        self.limits = limits
        self.sends: list[float] = []
        self.slack_s = TOLERANCE_S
        self._lock = threading.Lock()

    def acquire(self, tokens: int = 1, max_wait_s: float = 60.0) -> Grant:
        before = time.monotonic()
        grant = self.limiter.acquire(self.scope, self.limits, tokens, max_wait_s)
        took = time.monotonic() - before
        with self._lock:
            self.slack_s = max(self.slack_s, took + TOLERANCE_S)
            if grant.reserved:
                self.sends.append(before + grant.wait_s)
        return grant

    def offsets(self) -> list[float]:
        """When each reserved request may go, in seconds after the first one."""
        first = min(self.sends)
        return sorted(send - first for send in self.sends)

    def assert_offsets(self, expected: list[float]) -> None:
        assert self.offsets() == pytest.approx(expected, abs=self.slack_s)


class TestPacing:
    def test_an_idle_bucket_admits_at_once(self, limiter: RateLimiter, scope: str) -> None:
        grant = limiter.acquire(scope, RateLimit(rpm=60, tpm=1000), tokens=10, max_wait_s=0)
        assert grant == Grant(reserved=True, wait_s=0.0)

    def test_concurrent_reservations_are_spaced_at_exactly_the_limit_rate(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        schedule = Schedule(limiter, scope, RateLimit(rpm=600))
        with ThreadPoolExecutor(max_workers=4) as pool:
            grants = list(pool.map(lambda _: schedule.acquire(), range(20)))
        assert all(grant.reserved for grant in grants)
        schedule.assert_offsets([k * 0.1 for k in range(20)])

    def test_callers_sleeping_their_waits_send_at_the_limit_rate(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        limits = RateLimit(rpm=1200)  # 20 per second: 61 requests span 3 s

        def send() -> float:
            grant = limiter.acquire(scope, limits, tokens=1, max_wait_s=10)
            assert grant.reserved
            time.sleep(grant.wait_s)
            return time.monotonic()

        with ThreadPoolExecutor(max_workers=16) as pool:
            sent = sorted(pool.map(lambda _: send(), range(61)))
        rate_per_s = (len(sent) - 1) / (sent[-1] - sent[0])
        assert rate_per_s == pytest.approx(20, rel=0.05)

    def test_tokens_advance_the_tpm_bucket_by_their_cost(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        schedule = Schedule(limiter, scope, RateLimit(tpm=6000))  # 10 ms per token
        for tokens in (50, 10, 1):
            schedule.acquire(tokens)
        schedule.assert_offsets([0.0, 0.5, 0.6])

    def test_the_slower_of_both_buckets_sets_the_pace(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        schedule = Schedule(limiter, scope, RateLimit(rpm=600, tpm=6000))
        for tokens in (1, 30, 1, 1):  # 0.1 s per request, 10 ms per token
            schedule.acquire(tokens)
        schedule.assert_offsets([0.0, 0.1, 0.4, 0.5])

    def test_a_request_larger_than_a_minute_of_tokens_goes_when_idle(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        limits = RateLimit(tpm=600)  # 0.1 s per token
        assert limiter.acquire(scope, limits, tokens=1000, max_wait_s=0).reserved
        after = limiter.acquire(scope, limits, tokens=1, max_wait_s=0)
        assert not after.reserved
        assert after.wait_s == pytest.approx(100, abs=1)

    def test_without_limits_every_request_goes_at_once_and_nothing_is_stored(
        self, limiter: RateLimiter, redis_client: redis.Redis, scope: str
    ) -> None:
        grants = {
            limiter.acquire(scope, RateLimit(), tokens=10**6, max_wait_s=0) for _ in range(50)
        }
        assert grants == {Grant(reserved=True, wait_s=0.0)}
        assert redis_client.exists(*rate_limit_keys(scope)) == 0

    def test_negative_tokens_are_refused(self, limiter: RateLimiter, scope: str) -> None:
        with pytest.raises(ValueError, match="tokens"):
            limiter.acquire(scope, RateLimit(tpm=100), tokens=-1, max_wait_s=1)


class TestMaxWait:
    def test_a_wait_beyond_max_wait_reserves_nothing(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        limits = RateLimit(rpm=60, tpm=60_000)
        assert limiter.acquire(scope, limits, tokens=1, max_wait_s=0).reserved
        refused = [limiter.acquire(scope, limits, tokens=1, max_wait_s=0.5) for _ in range(3)]
        assert [grant.reserved for grant in refused] == [False] * 3
        # Had any of them reserved, the next would have to wait 2 s or more.
        assert [grant.wait_s for grant in refused] == pytest.approx([1.0] * 3, abs=0.2)
        granted = limiter.acquire(scope, limits, tokens=1, max_wait_s=1.5)
        assert granted.reserved
        assert granted.wait_s == pytest.approx(1.0, abs=0.2)


class TestPause:
    def test_a_pause_delays_every_request_of_the_scope(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        assert limiter.pause(scope, 0.5) == pytest.approx(0.5, abs=TOLERANCE_S)
        unlimited = limiter.acquire(scope, RateLimit(), tokens=1, max_wait_s=5)
        limited = limiter.acquire(scope, RateLimit(rpm=600), tokens=1, max_wait_s=5)
        assert unlimited.reserved and limited.reserved
        assert 0.4 <= unlimited.wait_s <= 0.5
        assert 0.4 <= limited.wait_s <= 0.5

    def test_requests_resume_at_the_limit_rate_when_the_pause_ends(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        schedule = Schedule(limiter, scope, RateLimit(rpm=600))
        limiter.pause(scope, 0.3)
        for _ in range(3):
            schedule.acquire()
        assert schedule.sends[0] - time.monotonic() == pytest.approx(0.3, abs=0.1)
        schedule.assert_offsets([0.0, 0.1, 0.2])

    def test_a_shorter_pause_never_shortens_a_longer_one(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        limiter.pause(scope, 2.0)
        assert limiter.pause(scope, 0.5) == pytest.approx(2.0, abs=0.1)
        grant = limiter.acquire(scope, RateLimit(), tokens=1, max_wait_s=0)
        assert not grant.reserved
        assert grant.wait_s == pytest.approx(2.0, abs=0.1)

    def test_a_longer_pause_extends_a_shorter_one(self, limiter: RateLimiter, scope: str) -> None:
        limiter.pause(scope, 0.5)
        assert limiter.pause(scope, 3.0) == pytest.approx(3.0, abs=TOLERANCE_S)

    def test_a_pause_of_nothing_leaves_no_key(
        self, limiter: RateLimiter, redis_client: redis.Redis, scope: str
    ) -> None:
        assert limiter.pause(scope, 0) == 0
        assert limiter.pause(scope, -5) == 0
        assert redis_client.exists(rate_limit_keys(scope)[2]) == 0


class TestReconcile:
    LIMITS = RateLimit(tpm=6000)  # 10 ms per token

    def next_wait_s(self, limiter: RateLimiter, scope: str) -> float:
        grant = limiter.acquire(scope, self.LIMITS, tokens=0, max_wait_s=0)
        return grant.wait_s

    def test_unused_tokens_are_refunded(self, limiter: RateLimiter, scope: str) -> None:
        limiter.acquire(scope, self.LIMITS, tokens=100, max_wait_s=0)
        limiter.reconcile(scope, self.LIMITS, estimated_tokens=100, actual_tokens=20)
        assert self.next_wait_s(limiter, scope) == pytest.approx(0.2, abs=0.05)

    def test_tokens_beyond_the_estimate_are_charged(self, limiter: RateLimiter, scope: str) -> None:
        limiter.acquire(scope, self.LIMITS, tokens=100, max_wait_s=0)
        limiter.reconcile(scope, self.LIMITS, estimated_tokens=100, actual_tokens=300)
        assert self.next_wait_s(limiter, scope) == pytest.approx(3.0, abs=0.05)

    def test_a_refund_banks_no_credit_for_later_requests(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        limiter.acquire(scope, self.LIMITS, tokens=10, max_wait_s=0)
        limiter.reconcile(scope, self.LIMITS, estimated_tokens=10_000, actual_tokens=0)
        assert limiter.acquire(scope, self.LIMITS, tokens=10, max_wait_s=0).wait_s == 0
        assert self.next_wait_s(limiter, scope) == pytest.approx(0.1, abs=0.05)

    def test_a_charge_on_an_idle_bucket_counts_from_now(
        self, limiter: RateLimiter, scope: str
    ) -> None:
        limiter.reconcile(scope, self.LIMITS, estimated_tokens=0, actual_tokens=50)
        assert self.next_wait_s(limiter, scope) == pytest.approx(0.5, abs=0.05)

    def test_without_a_tpm_limit_nothing_changes(
        self, limiter: RateLimiter, redis_client: redis.Redis, scope: str
    ) -> None:
        limiter.reconcile(scope, RateLimit(rpm=60), estimated_tokens=10, actual_tokens=5000)
        assert redis_client.exists(*rate_limit_keys(scope)) == 0


class TestKeys:
    def test_buckets_expire_shortly_after_their_stored_time(
        self, limiter: RateLimiter, redis_client: redis.Redis, scope: str
    ) -> None:
        limiter.acquire(scope, RateLimit(rpm=60, tpm=6000), tokens=200, max_wait_s=0)
        rpm_key, tpm_key, _ = rate_limit_keys(scope)
        assert 1000 < redis_client.pttl(rpm_key) <= 1000 + KEY_MARGIN_MS
        assert 2000 < redis_client.pttl(tpm_key) <= 2000 + KEY_MARGIN_MS

    def test_a_pause_expires_shortly_after_it_ends(
        self, limiter: RateLimiter, redis_client: redis.Redis, scope: str
    ) -> None:
        limiter.pause(scope, 4.0)
        assert 4000 < redis_client.pttl(rate_limit_keys(scope)[2]) <= 4000 + KEY_MARGIN_MS

    def test_two_processes_share_the_limits(
        self, redis_server: RedisServer, limiter: RateLimiter, scope: str
    ) -> None:
        other_client = redis.Redis.from_url(redis_server.url)
        other = RateLimiter(other_client)
        limits = RateLimit(rpm=600)
        try:
            assert limiter.acquire(scope, limits, tokens=1, max_wait_s=0).reserved
            assert other.acquire(scope, limits, tokens=1, max_wait_s=0).wait_s > 0.05
            other.pause(scope, 2.0)
            assert limiter.acquire(scope, limits, tokens=1, max_wait_s=0).wait_s > 1.9
        finally:
            other_client.close()

    def test_scripts_survive_a_script_flush(
        self, limiter: RateLimiter, redis_client: redis.Redis, scope: str
    ) -> None:
        """As after a Redis restart: redis-py reloads a script Redis no longer knows."""
        redis_client.script_flush()
        assert limiter.acquire(scope, RateLimit(rpm=60), tokens=1, max_wait_s=0).reserved

    def test_redis_errors_reach_the_caller(self, scope: str) -> None:
        unreachable = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), retries=0))
        try:
            with pytest.raises(redis.ConnectionError):
                RateLimiter(unreachable).acquire(scope, RateLimit(rpm=60), tokens=1, max_wait_s=0)
        finally:
            unreachable.close()


class TestScope:
    def test_never_contains_the_api_key(self) -> None:
        scope = scope_for("https://api.example.com/v1", "sk-secret-123", "gpt-4o-mini")
        assert "sk-secret-123" not in scope
        assert "secret" not in scope
        assert scope.endswith(":gpt-4o-mini")

    def test_is_stable_and_ignores_a_trailing_slash(self) -> None:
        scope = scope_for("https://api.example.com/v1", "sk-a", "m")
        assert scope == scope_for("https://api.example.com/v1", "sk-a", "m")
        assert scope == scope_for("https://api.example.com/v1/", "sk-a", "m")

    @pytest.mark.parametrize(
        ("base_url", "api_key", "model"),
        [
            ("https://api.example.com/v1", "sk-b", "m"),
            ("https://other.example.com/v1", "sk-a", "m"),
            ("https://api.example.com/v1", "sk-a", "m2"),
        ],
    )
    def test_differs_by_endpoint_key_and_model(
        self, base_url: str, api_key: str, model: str
    ) -> None:
        assert scope_for(base_url, api_key, model) != scope_for(
            "https://api.example.com/v1", "sk-a", "m"
        )


class TestEstimateTokens:
    def test_counts_about_four_characters_per_token_plus_the_reply_budget(self) -> None:
        messages = [
            Message(role="system", content="x" * 400),
            Message(role="user", content="y" * 800),
        ]
        assert 300 + 500 <= estimate_tokens(messages, max_tokens=500) <= 320 + 500

    def test_counts_overhead_for_every_message(self) -> None:
        one = estimate_tokens([Message(role="user", content="")], max_tokens=10)
        two = estimate_tokens([Message(role="user", content="")] * 2, max_tokens=10)
        assert estimate_tokens([], max_tokens=10) < one < two

    def test_counts_non_latin_text_heavier_per_character(self) -> None:
        latin = estimate_tokens([Message(role="user", content="a" * 100)], max_tokens=0)
        cjk = estimate_tokens([Message(role="user", content="語" * 100)], max_tokens=0)
        assert cjk > latin

    def test_counts_images_at_a_fixed_price_and_text_parts_as_text(self) -> None:
        text = Message(role="user", content="y" * 800)
        parts = Message.model_validate(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 800},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
                ],
            }
        )
        with_images = estimate_tokens([parts], max_tokens=0)
        assert with_images == estimate_tokens([text], max_tokens=0) + 2 * TOKENS_PER_IMAGE
