"""A fleet-wide rate limiter in Redis: every worker, on every machine, that calls one provider
with one API key and model (a *scope*) shares its requests-per-minute and tokens-per-minute.

Each limit is a GCRA bucket without burst: Redis keeps the bucket's theoretical arrival time
(TAT, unix ms), the moment its next request may go. A request goes at
``max(now, pause end, TAT of each limited bucket)`` and then moves each bucket's TAT to that
moment plus its cost: ``60 / rpm`` s for the RPM bucket, ``tokens * 60 / tpm`` s for the TPM
bucket. Requests are thus evenly spaced at exactly the limit's rate, and a request larger than
a minute's budget still goes when its bucket is idle (it then holds the bucket that long).

Every decision runs in one Lua script on Redis's clock (``TIME``), so machines with skewed
clocks agree and concurrent workers never both take the same slot. Keys expire a little after
their stored time: an idle scope leaves nothing behind.

Typical use by a remote-API worker::

    grant = limiter.acquire(scope, limits, tokens=estimate, max_wait_s=2.0)
    if not grant.reserved:
        park the job for grant.wait_s and stop
    time.sleep(grant.wait_s)
    call the provider; on 429 with Retry-After: limiter.pause(scope, retry_after_s)
    limiter.reconcile(scope, limits, estimate, actual_tokens)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from wire.constants import rate_limit_keys
from wire.contract import Message
from wire.settings import RateLimit

#: Keys live this long past the time they store, then the idle bucket or pause vanishes.
KEY_MARGIN_MS = 1000
#: The estimate's overhead per message (role, separators) and for priming the reply.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
BYTES_PER_TOKEN = 4
#: An image's tokens, whatever its size: OpenAI bills a high-detail 1024x1024 image about 765.
TOKENS_PER_IMAGE = 800

# Shared by the scripts: Redis's clock in unix ms (with microseconds), and how to store a time.
_LUA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local margin = tonumber(ARGV[#ARGV])
local function store(key, at)
  redis.call('SET', key, string.format('%.3f', at), 'PX',
             string.format('%d', math.ceil(at - now) + margin))
end
local function stored(key)
  return tonumber(redis.call('GET', key)) or 0
end
"""

# KEYS: rpm, tpm, pause. ARGV: rpm, tpm (0: no limit), tokens, max wait (ms), margin (ms).
# Returns {1 if reserved else 0, wait in ms}.
_ACQUIRE_LUA = (
    _LUA_PRELUDE
    + """
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local costs = {1, tonumber(ARGV[3])}
local at = math.max(now, stored(KEYS[3]))
for i = 1, 2 do
  if limits[i] > 0 then at = math.max(at, stored(KEYS[i])) end
end
local wait = string.format('%.3f', at - now)
if at - now > tonumber(ARGV[4]) then return {0, wait} end
for i = 1, 2 do
  if limits[i] > 0 then store(KEYS[i], at + costs[i] * 60000 / limits[i]) end
end
return {1, wait}
"""
)

# KEYS: pause. ARGV: pause (ms), margin (ms). Returns the pause left (ms).
_PAUSE_LUA = (
    _LUA_PRELUDE
    + """
local untl = math.max(stored(KEYS[1]), now + tonumber(ARGV[1]))
if untl > now then store(KEYS[1], untl) end
return string.format('%.3f', math.max(untl - now, 0))
"""
)

# KEYS: tpm. ARGV: tpm, tokens to add (negative: a refund), margin (ms).
# A refund never moves the TAT before now: an idle bucket banks no credit.
_RECONCILE_LUA = (
    _LUA_PRELUDE
    + """
local at = math.max(now, stored(KEYS[1])) + tonumber(ARGV[2]) * 60000 / tonumber(ARGV[1])
store(KEYS[1], math.max(at, now))
return 1
"""
)


@dataclass(frozen=True)
class Grant:
    """The limiter's answer. ``reserved``: sleep ``wait_s``, then send. Otherwise nothing was
    taken, and the request could go in ``wait_s`` at the earliest: park it and ask again."""

    reserved: bool
    wait_s: float


class RateLimiter:
    """The scripts, registered once on ``redis_client``. Thread-safe; Redis errors propagate."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._acquire = redis_client.register_script(_ACQUIRE_LUA)
        self._pause = redis_client.register_script(_PAUSE_LUA)
        self._reconcile = redis_client.register_script(_RECONCILE_LUA)

    def acquire(self, scope: str, limits: RateLimit, tokens: int, max_wait_s: float) -> Grant:
        """Reserve a slot for one request of ``tokens`` tokens if it can go within
        ``max_wait_s``; a pause of the scope is honoured even without limits."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        reserved, wait_ms = self._acquire(
            keys=rate_limit_keys(scope),
            args=[limits.rpm or 0, limits.tpm or 0, tokens, max_wait_s * 1000, KEY_MARGIN_MS],
        )
        return Grant(reserved=bool(int(reserved)), wait_s=float(wait_ms) / 1000)

    def pause(self, scope: str, seconds: float) -> float:
        """Hold every request of ``scope`` for ``seconds`` from now (a 429's Retry-After),
        unless it is already held longer. Returns the seconds the pause has left."""
        _, _, pause_key = rate_limit_keys(scope)
        left_ms = self._pause(keys=[pause_key], args=[max(seconds, 0) * 1000, KEY_MARGIN_MS])
        return float(left_ms) / 1000

    def reconcile(
        self, scope: str, limits: RateLimit, estimated_tokens: int, actual_tokens: int
    ) -> None:
        """Charge the TPM bucket the tokens a request used beyond its estimate, or refund
        those it did not use. Nothing to do without a TPM limit."""
        delta = actual_tokens - estimated_tokens
        if limits.tpm is None or delta == 0:
            return
        _, tpm_key, _ = rate_limit_keys(scope)
        self._reconcile(keys=[tpm_key], args=[limits.tpm, delta, KEY_MARGIN_MS])


def estimate_tokens(messages: Iterable[Message], max_tokens: int) -> int:
    """An upper-leaning guess of a request's tokens without a tokenizer: about four UTF-8 bytes
    per token (so non-Latin scripts count more per character), per-message overhead, and the
    whole ``max_tokens`` the reply may use, ``TOKENS_PER_IMAGE`` per image. ``reconcile``
    corrects it once the usage is known."""
    prompt = sum(
        TOKENS_PER_MESSAGE
        + math.ceil(len(message.text.encode()) / BYTES_PER_TOKEN)
        + TOKENS_PER_IMAGE * len(message.images)
        for message in messages
    )
    return prompt + TOKENS_PER_REPLY + max_tokens


def scope_for(base_url: str, api_key: str, model: str) -> str:
    """The scope of a provider account and model: ``<16 hex of sha256>:<model>``. The API key
    only enters the hash, so it never shows in Redis."""
    account = f"{base_url.rstrip('/')}\n{api_key}".encode()
    return f"{hashlib.sha256(account).hexdigest()[:16]}:{model}"
