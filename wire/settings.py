"""Typed settings, read once from ``SIBYLQ_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError
from .providers import ApiProvider

#: A lease spans at least this many heartbeats (``SIBYLQ_VISIBILITY_TIMEOUT_S``).
LEASE_BEATS = 4
#: kombu's own visibility timeout when leases are in force (``broker_visibility_timeout_s``).
BROKER_VISIBILITY_BACKSTOP_S = 3600
#: A prefork job's process is killed this long after its time limit.
HARD_LIMIT_GRACE_S = 30.0
#: Jobs a llama.cpp worker process with GPU layers decodes together unless told otherwise:
#: on a GPU a decode step of 8 sequences costs about what a step of one does.
LLAMA_GPU_BATCH = 8


class RateLimit(BaseModel):
    """A provider's limits for one model: requests and tokens per minute (None: no limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)


class Price(BaseModel):
    """What one model costs, in dollars per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class Settings(BaseSettings):
    """Configuration shared by producers and workers. Every variable is in docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="SIBYLQ_", frozen=True)

    broker_url: str | None = Field(
        default=None,
        description="Redis URL of the queues; unset: producers start an embedded cluster.",
    )
    result_backend: str | None = Field(
        default=None, description="Redis URL for results; defaults to broker_url."
    )
    redis_tls_ca_file: Path | None = Field(
        default=None,
        description="CA bundle verifying a rediss:// server's certificate (wire.connections); "
        "unset: the system's CAs.",
    )
    redis_tls_cert_file: Path | None = Field(
        default=None, description="Client certificate, for rediss:// servers that ask for one."
    )
    redis_tls_key_file: Path | None = Field(default=None, description="The client key.")
    result_expires_s: int = Field(default=7 * 24 * 3600, gt=0)
    result_timeout_s: float | None = Field(
        default=None, gt=0, description="Default wait for a result; unset waits without limit."
    )
    no_worker_timeout_s: float = Field(
        default=30.0, ge=0, description="Fail a wait when no worker serves the queue this long."
    )
    broker_timeout_s: float = Field(
        default=120.0, gt=0, description="Fail a wait when Redis stays unreachable this long."
    )
    job_time_limit_s: float = Field(
        default=600.0,
        gt=0,
        description="A job running longer than this on a worker fails with JobTimeLimitError "
        "(every pool; prefork also kills a process that overruns it by 30 s).",
    )
    visibility_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="The lease on a delivered job: a live worker renews it on every heartbeat, "
        "and the jobs of a worker that stopped renewing are requeued this long after its last "
        "renewal (workers.leases). A live worker's job is never requeued, however long it runs.",
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="A job whose worker process died this many times fails with BackendError "
        "instead of running again.",
    )
    models_dir: Path | None = None
    worker_model: str | None = Field(
        default=None, description="Set by `sibylq worker MODEL`: the model this worker serves."
    )
    llama_n_ctx: int = Field(
        default=2048, gt=0, description="Context (KV cells) of each llama.cpp sequence."
    )
    llama_batch: int = Field(
        default=1,
        ge=1,
        description="Jobs a llama.cpp worker process decodes together (continuous batching, "
        "a threads pool of this many); 1: one job a process, prefork. The KV cache holds "
        "llama_batch x llama_n_ctx cells. Unset: 1 on CPUs (on 2 cores 8 measured 1.24x for "
        f"classifications, 1.82x for extractions), {LLAMA_GPU_BATCH} with GPU layers "
        "(llama_n_gpu_layers not 0: on an H200 8 measured 1.19x and 4.93x, 32 no better); "
        "benchmarks/llama.py.",
    )
    llama_n_gpu_layers: int = 0
    llama_n_threads: int | None = Field(default=None, gt=0)
    openai_base_url: str | None = Field(
        default=None,
        description="The endpoint of `openai:` workers; unset: OPENAI_BASE_URL, else OpenAI's.",
    )
    groq_base_url: str | None = Field(
        default=None,
        description="The endpoint of `groq:` workers; unset: GROQ_BASE_URL, else Groq's.",
    )
    mistral_base_url: str | None = Field(
        default=None, description="The endpoint of `mistral:` workers; unset: Mistral's."
    )
    together_base_url: str | None = Field(
        default=None,
        description="The endpoint of `together:` workers; unset: TOGETHER_BASE_URL, else "
        "Together's.",
    )
    fireworks_base_url: str | None = Field(
        default=None,
        description="The endpoint of `fireworks:` workers; unset: FIREWORKS_BASE_URL, else "
        "Fireworks'.",
    )
    anthropic_base_url: str | None = Field(
        default=None,
        description="The endpoint of `anthropic:` workers (Anthropic's OpenAI SDK compatibility "
        "layer); unset: Anthropic's.",
    )
    openai_concurrency: int = Field(default=64, gt=0)
    openai_timeout_s: float = Field(default=120.0, gt=0)
    openai_max_retries: int = Field(
        default=8,
        ge=0,
        description="Retries of a request that failed on a rate limit (429), a timeout, a "
        "connection error or a 5xx, by sibylq (the SDK's own retries are off). A waiting job is "
        "parked in Redis, not in a worker.",
    )
    retry_backoff_s: float = Field(
        default=1.0, gt=0, description="First retry's backoff when the server names no delay."
    )
    retry_backoff_max_s: float = Field(default=60.0, gt=0, description="Longest backoff.")
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict,
        description='Fleet-wide limits per remote model, as JSON: {"gpt-4o-mini": {"rpm": 500, '
        '"tpm": 200000}}; the key "*" applies to models not named. Enforced through Redis for '
        "every worker sharing an endpoint and API key.",
    )
    rate_limit_max_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="A job waits in its worker this long at most for the rate limiter; longer "
        "waits park it in Redis.",
    )
    reask_max: int = Field(
        default=2,
        ge=0,
        description="Re-asks of a model whose output is not valid JSON for the schema, with "
        "the error fed back.",
    )
    cache: bool = Field(
        default=True,
        description="Answer identical temperature-0 requests from a cache in Redis.",
    )
    cache_ttl_s: int = Field(default=24 * 3600, gt=0, description="How long answers stay cached.")
    dead_letters_expire_s: int = Field(
        default=30 * 24 * 3600,
        gt=0,
        description="How long a finally failed job stays listed by `sibylq failed`.",
    )
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description='Dollars per million tokens by model, as JSON: {"gpt-4o-mini": {"input": '
        '0.15, "output": 0.6}}; `sibylq label` then reports the cost.',
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port of each worker; 0 picks a free "
        "port (logged, and in the worker's heartbeat); unset: no metrics.",
    )
    metrics_addr: str = Field(default="0.0.0.0", description="Address the metrics server binds.")
    worker_events: bool = Field(
        default=False,
        description="Workers send Celery task events (what `celery worker -E` does), for "
        "Flower and `celery events`: about 1.5 more Redis PUBLISHes per job.",
    )

    @model_validator(mode="before")
    @classmethod
    def _gpus_batch(cls, values: Any) -> Any:
        """``llama_batch`` unset, with GPU layers: ``LLAMA_GPU_BATCH``."""
        if not isinstance(values, dict) or "llama_batch" in values:
            return values
        try:
            gpu_layers = int(values.get("llama_n_gpu_layers", 0))
        except (TypeError, ValueError):
            return values  # the field's own validation says what is wrong
        return {**values, "llama_batch": LLAMA_GPU_BATCH} if gpu_layers != 0 else values

    @model_validator(mode="after")
    def _lease_outlasts_missed_beats(self) -> Settings:
        # Leases are renewed on every heartbeat: a lease of a few beats would requeue a live
        # worker's jobs after one slow beat (a busy machine, a Redis hiccup).
        if self.visibility_timeout_s < LEASE_BEATS * self.heartbeat_interval_s:
            raise ValueError(
                f"SIBYLQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s:g}) must be at least "
                f"{LEASE_BEATS} times SIBYLQ_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g})"
            )
        return self

    @property
    def broker_visibility_timeout_s(self) -> int:
        """kombu's own visibility timeout, now only a backstop: leases requeue a lost worker's
        jobs long before it, and a live worker's renewed jobs never reach it. Far past the
        longest job (prefork kills it 30 s past its limit), so even a sibylq sweep that stopped
        working would never hand a running job to a second worker."""
        longest_s = self.job_time_limit_s + HARD_LIMIT_GRACE_S
        return int(max(BROKER_VISIBILITY_BACKSTOP_S, 2 * longest_s))

    def base_url(self, provider: ApiProvider, environ: Mapping[str, str] = os.environ) -> str:
        """Where ``provider``'s workers send requests: ``SIBYLQ_<NAME>_BASE_URL``, else the
        provider's own variable (``GROQ_BASE_URL``...), else its public endpoint."""
        override = getattr(self, f"{provider.name}_base_url", None)
        if isinstance(override, str) and override.strip():
            return override.strip()
        own = environ.get(provider.base_url_env, "").strip() if provider.base_url_env else ""
        return own or provider.base_url

    @property
    def result_url(self) -> str:
        return self.result_backend or self.broker

    @property
    def broker(self) -> str:
        """The broker URL, which a worker must be given."""
        if self.broker_url is None:
            raise ConfigurationError(
                "SIBYLQ_BROKER_URL is not set: point it at your Redis (e.g. "
                "redis://localhost:6379/0), or run `sibylq up MODEL` and use the URL it prints"
            )
        return self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
