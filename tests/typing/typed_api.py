"""What a type checker sees of sibylq's API: checked by mypy --strict in tests/test_typing.py.

Never run: it only has to type-check.
"""

from __future__ import annotations

import dataclasses
from enum import Enum, IntEnum
from typing import Any, assert_type

from pydantic import BaseModel

from producer import GenConf, GenOut, Job, Models, Msg, Thread


@dataclasses.dataclass
class Person:
    name: str
    age: int


class City(BaseModel):
    name: str


class Size(IntEnum):
    SMALL = 1
    LARGE = 2


class Color(Enum):
    RED = "red"
    BLUE = "blue"


async def typed_calls() -> None:
    model = Models.create("fake")
    assert_type(model.extract(Person, "John is 42"), Person)
    assert_type(model.extract(list[str], "three names"), list[str])
    assert_type(model.extract(int, "how many?"), int)
    assert_type(model.extract_async(Person, "John is 42"), Job[Person])
    assert_type(model.extract_async(list[str], "three names"), Job[list[str]])
    assert_type(await model.extract_async(dict[str, int], "ages"), dict[str, int])
    assert_type(model.classify(["spam", "ham"], "WIN!"), str)
    assert_type(model.classify(Color, "the sky"), Color)
    assert_type(model.classify_async(["spam", "ham"], "WIN!"), Job[str])
    assert_type(model.classify_async(Color, "the sky"), Job[Color])
    # labels and choices beyond strings (Sibila): the label comes back in its own type
    assert_type(model.classify([1, 2, 3], "how many?"), int)
    assert_type(model.classify([True, False], "is it?"), bool)
    assert_type(model.classify([0.5, 1.5], "which?"), float)
    assert_type(model.classify(Size, "how big?"), Size)
    assert_type(model.classify_async([1, 2, 3], "how many?"), Job[int])
    assert_type(model.classify_async([True, False], "is it?"), Job[bool])
    assert_type(model.extract(["red", "blue"], "which color?"), str)
    assert_type(model.extract_async([1, 2], "which?"), Job[int])
    # model facts (Sibila's properties), answered by a worker
    assert_type(model.ctx_len, int | None)
    assert_type(model.max_tokens_limit, int | None)
    assert_type(model.token_len("how long is this?"), int)
    assert_type(GenConf(max_tokens=0)(stop="###"), GenConf)
    assert_type(model.dataclass(Person, "John is 42"), Person)
    assert_type(model.pydantic(City, "Paris"), City)
    assert_type(model.pydantic_async(City, "Paris"), Job[City])
    assert_type(model.call("hello"), str)
    assert_type(model.call_async("hello"), Job[str])
    assert_type(model.json("a dict"), Any)
    assert_type(Job.from_id("an-id", target=Person), Job[Person])
    assert_type(Job.from_id("an-id"), Job[Any])
    assert_type(Job.from_id("an-id", target=Person).result(timeout=1), Person)


async def sibila_shapes() -> None:
    model = Models.create("fake")
    thread = Thread(["a question", "an answer", "another question"], inst="Be brief.")
    assert_type(model.extract(Person, thread), Person)
    assert_type(model.extract(int, Msg.make_IN("how many?")), int)
    assert_type(model.call(("what is it?", "https://example.com/a.png")), str)
    assert_type(model.classify(Color, [{"role": "user", "content": "the sky"}]), Color)
    assert_type(model.gen_extract(Person, thread), GenOut)
    assert_type(await model.gen_extract_async(Person, thread), GenOut)
    assert_type(model.gen(thread).text, str)
