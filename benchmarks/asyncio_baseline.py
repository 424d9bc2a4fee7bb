"""The remote baseline: a plain asyncio script, ``AsyncOpenAI`` behind a semaphore.

Run as a process of its own (``python -m benchmarks.asyncio_baseline --base-url URL
--model M --concurrency N``). It warms up (one request per semaphore slot), prints ``ready``,
then for each line ``<count>`` on stdin sends that many requests, at most N at once, and
prints ``{"elapsed_s": ..., "requests": ...}``. The requests are what a sibylq remote worker
sends for a text job: the same messages and generation settings.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time

from openai import AsyncOpenAI

_serial = itertools.count()


async def _one(client: AsyncOpenAI, model: str, gate: asyncio.Semaphore) -> str:
    async with gate:
        response = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Say something about number {next(_serial)}."}],
            max_tokens=1024,
            temperature=0.0,
            top_p=1.0,
        )
    return response.choices[0].message.content or ""


async def _batch(client: AsyncOpenAI, model: str, gate: asyncio.Semaphore, count: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(_one(client, model, gate) for _ in range(count)))
    return time.perf_counter() - started


async def serve(base_url: str, model: str, concurrency: int) -> None:
    client = AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    await _batch(client, model, gate, concurrency)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        count = int(line)
        elapsed = await _batch(client, model, gate, count)
        print(json.dumps({"elapsed_s": elapsed, "requests": count}), flush=True)
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.base_url, args.model, args.concurrency))


if __name__ == "__main__":
    main()
