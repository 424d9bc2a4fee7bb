"""Workers accept JSON only: a pickled message is refused, never executed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery

from producer import Client, Models
from tests.conftest import Worker
from wire.constants import TASK_NAME, queue_name


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_message_is_refused_and_never_runs(
    client: Client, fake_worker: Worker, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    attacker = Celery(broker=client.connect().broker_url, set_as_current=False)
    attacker.conf.update(task_serializer="pickle", accept_content=["pickle"], result_backend=None)
    attacker.send_task(
        TASK_NAME, args=[_RunsCodeWhenUnpickled(marker)], queue=queue_name("fake"),
        serializer="pickle",
    )  # fmt: skip
    attacker.close()

    # The worker serves the queue in order: once a later job is done, the pickle was seen.
    assert Models.create("fake", client=client).call("after the pickle") == "fake output"
    # Set aside before anything decodes it (workers.intake), as a dead letter.
    deadline = time.monotonic() + 10
    while "workers accept JSON only" not in fake_worker.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "content type 'application/x-python-serialize' refused" in fake_worker.log()
    assert not marker.exists()
    assert fake_worker.process.poll() is None
