"""The README's first example: typed calls to the bundled SmolLM2-135M, run by a worker.

    python examples/quickstart.py [MODEL]        # default: llamacpp:smollm2

Nothing to set up: with SIBYLQ_BROKER_URL unset, sibylq starts an embedded cluster for the
script (a private Redis and a llama.cpp worker) and stops it when the script ends. With
SIBYLQ_BROKER_URL set, the calls go to that fleet's workers instead.

SmolLM2-135M is tiny: it shows the types and the plumbing, not accuracy. An unbounded
``list[str]`` is too much for it (asked for 3 names it repeats one until max_tokens, and the
job fails with OutputValidationError), so the names below are bounded by the schema, which
the grammar then enforces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import Annotated

from pydantic import Field

from producer import Models

#: Exactly three names: the schema says so, and llama.cpp's grammar holds the model to it.
ThreeNames = Annotated[list[str], Field(min_length=3, max_length=3)]

REVIEWS = (
    "I love this phone, the battery lasts for days.",
    "Terrible service, I want my money back.",
    "The food was cold and the waiter was rude.",
)


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

    names = await model.extract_async(ThreeNames, "Generate 3 English names")
    print("await extract_async(ThreeNames) ->", names)

    jobs = [model.classify_async(["positive", "negative"], review) for review in REVIEWS]
    print("await gather ->", await asyncio.gather(*jobs))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "llamacpp:smollm2"))
