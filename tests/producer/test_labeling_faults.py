"""A labeling run rides out Redis faults on the producer's side (issue 11: "every resilience
claim ... the labeling run"): its connections refused, blackholed (no RST) or gone silently
dead mid-run, it ends with every row labeled once and none failed. (Killed worker processes and
workers: ``tests/workers/test_resilience.py``.)

The producer reaches Redis through a proxy; the worker talks to Redis directly."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from producer import Client, Models, Settings
from producer.labeling import label_file, make_task
from producer.labeling.progress import NoProgress
from tests.conftest import HEARTBEAT_S, Worker
from tests.faults import FaultyProxy

ROWS = 60


@pytest.mark.parametrize("fault", ["refuse", "blackhole", "go_stale"])
async def test_a_labeling_run_rides_out_a_cut_of_its_connections(
    proxy: FaultyProxy, fake_worker: Worker, tmp_path: Path, fault: str
) -> None:
    client = Client(
        Settings(
            broker_url=proxy.url(),
            heartbeat_interval_s=HEARTBEAT_S,
            no_worker_timeout_s=0,  # it cannot see the workers while it is cut off
            cache=False,
        )
    )
    rows = tmp_path / "in.jsonl"
    rows.write_text(
        "".join(json.dumps({"id": i, "text": f"sms {fault} {i}"}) + "\n" for i in range(ROWS))
    )
    out = tmp_path / "out.jsonl"
    task = make_task(
        Models.create("fake:delay=0.1", client=client), prompt="{text}", classify=["spam", "ham"]
    )
    run = asyncio.ensure_future(label_file(task, rows, out, progress=NoProgress(), max_in_flight=8))

    def written() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    while written() < 10:
        assert not run.done(), run
        await asyncio.sleep(0.05)
    getattr(proxy, fault)()
    await asyncio.sleep(3.0)
    proxy.heal()

    summary = await asyncio.wait_for(run, timeout=120)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["key"] for r in records) == Counter(range(ROWS))
    assert {r["status"] for r in records} == {"done"}
    assert (summary.done, summary.failed) == (ROWS, 0)
    await client.aclose_listener()
    client.close()
