"""How many jobs a worker process runs at once when the command does not say
(``workers.cli.pool_defaults``): llama.cpp batches on a GPU, not on CPUs; APIs run threads."""

from __future__ import annotations

import pytest

from wire.modelref import parse_model_ref
from wire.settings import LLAMA_GPU_BATCH, Settings
from workers.cli import PoolDefaults, pool_defaults

LLAMA = parse_model_ref("llamacpp:smollm2")


def test_a_llama_worker_on_cpus_runs_one_job_a_process() -> None:
    assert pool_defaults(LLAMA, Settings()) == PoolDefaults("prefork", 1)


@pytest.mark.parametrize("layers", ["-1", "12"])
def test_a_llama_worker_with_gpu_layers_batches_by_default(
    monkeypatch: pytest.MonkeyPatch, layers: str
) -> None:
    monkeypatch.setenv("SIBYLQ_LLAMA_N_GPU_LAYERS", layers)
    monkeypatch.delenv("SIBYLQ_LLAMA_BATCH", raising=False)
    settings = Settings()

    assert settings.llama_batch == LLAMA_GPU_BATCH == 8
    assert pool_defaults(LLAMA, settings) == PoolDefaults("threads", 8)


@pytest.mark.parametrize(("layers", "batch"), [("-1", "1"), ("0", "4")])
def test_a_batch_given_is_kept_with_or_without_gpu_layers(
    monkeypatch: pytest.MonkeyPatch, layers: str, batch: str
) -> None:
    monkeypatch.setenv("SIBYLQ_LLAMA_N_GPU_LAYERS", layers)
    monkeypatch.setenv("SIBYLQ_LLAMA_BATCH", batch)

    assert Settings().llama_batch == int(batch)


def test_an_api_worker_runs_threads() -> None:
    settings = Settings(openai_concurrency=64)
    assert pool_defaults(parse_model_ref("openai:gpt-4o-mini"), settings) == PoolDefaults(
        "threads", 64
    )
