"""The README's first example: typed calls to a model that runs on a worker.

Needs Redis (SIBYLQ_BROKER_URL, default redis://localhost:6379/0) and a worker:
    sibylq worker llamacpp:smollm2
SmolLM2-135M is tiny and often wrong: this shows the types and the plumbing, not accuracy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from producer import Models


@dataclasses.dataclass
class Person:
    name: str
    age: int
    city: str


async def main(ref: str) -> None:
    model = Models.create(ref, genconf={"max_tokens": 256})

    label = model.classify(["spam", "not spam"], "I am a Nigerian prince and will make you rich!")
    print("classify ->", repr(label))

    person = model.extract(Person, "John Smith is 42 years old and lives in Paris.")
    print("extract(Person) ->", person)

    jobs = [model.extract_async(int, f"How many legs does a {animal} have?") for animal in
            ("cat", "spider", "bird")]  # fmt: skip
    print("await gather ->", await asyncio.gather(*jobs))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "llamacpp:smollm2"))
