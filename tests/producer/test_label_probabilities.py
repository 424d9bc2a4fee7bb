"""A classification's label probabilities reach the caller through the whole fleet: in the
envelope a worker stored (API and llama.cpp workers), and as ``sibylq label``'s column."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from producer import Client, Models
from tests.conftest import Worker
from tests.producer.labeling_cli import run_label

LABELS = ["spam", "ham"]


def test_an_api_workers_classification_carries_label_probabilities(
    client: Client, openai_worker: Worker
) -> None:
    model = Models.create("openai:stub", client=client)
    job = model.classify_async(LABELS, "WIN a FREE cruise, reply now!")
    assert job.result(timeout=60) == "spam"
    # The stub gives the label it writes 0.5 at the label's first token.
    assert job.envelope().label_probs == pytest.approx({"spam": 0.5, "ham": 0.5})


def test_a_llama_workers_classification_carries_label_probabilities(
    client: Client, llama_worker: Worker
) -> None:
    model = Models.create("llamacpp:smollm2", client=client, genconf={"max_tokens": 32})
    job = model.classify_async(LABELS, "Is this SMS spam? WIN a FREE cruise, reply now!")
    label = job.result(timeout=180)
    probs = job.envelope().label_probs
    assert probs is not None
    assert set(probs) == set(LABELS)
    assert sum(probs.values()) == pytest.approx(1)
    assert probs[label] > 0


def test_other_jobs_carry_none(client: Client, openai_worker: Worker) -> None:
    job = Models.create("openai:stub", client=client).extract_async(list[str], "three names")
    job.result(timeout=60)
    assert job.envelope().label_probs is None


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_sibylq_label_writes_each_rows_label_probabilities(
    worker_env: dict[str, str], openai_worker: Worker, tmp_path: Path, suffix: str
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": f"sms {i}"}) + "\n" for i in range(3)))
    out = tmp_path / f"out.{suffix}"
    args = ["--model", "openai:stub", "--classify", "spam,ham", "--prompt", "Spam? {text}"]
    args += ["-o", str(out)]
    result = run_label(worker_env, str(source), *args)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]]
    if suffix == "csv":
        with out.open(newline="") as table:
            rows = [
                {**row, "label_probs": json.loads(row["label_probs"])}
                for row in csv.DictReader(table)
            ]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert all(row["label_probs"] == {"spam": 0.5, "ham": 0.5} for row in rows)
