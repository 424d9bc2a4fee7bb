"""Python types -> the JSON schema a model must follow, and back to typed values."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pydantic
import pytest
from typing_extensions import TypedDict

from producer.targets import classify_target, json_target, target_for
from wire.errors import InvalidRequestError, OutputValidationError, UnsupportedTargetError


@dataclasses.dataclass
class City:
    name: Annotated[str, "the city's name in English"]


class Trip(pydantic.BaseModel):
    traveller: Annotated[str, "full name"]
    stops: list[City]


class Point(TypedDict):
    x: Annotated[int, "horizontal position"]


def test_objects_travel_as_they_are_and_other_types_are_wrapped() -> None:
    assert target_for(Trip).wrapped is False
    assert target_for(Point).wrapped is False
    for wrapped in (str, list[int], dict[str, int], Literal["a"], int | None):
        target = target_for(wrapped)
        assert target.wrapped
        assert target.json_schema is not None
        assert target.json_schema["required"] == ["output"]


def test_annotated_strings_become_descriptions_at_every_depth() -> None:
    trip = target_for(Trip).json_schema or {}
    assert trip["properties"]["traveller"]["description"] == "full name"
    assert (
        trip["$defs"]["City"]["properties"]["name"]["description"] == "the city's name in English"
    )
    point = target_for(Point).json_schema or {}
    assert point["properties"]["x"]["description"] == "horizontal position"
    names = target_for(Annotated[list[str], "first names"]).json_schema or {}
    assert names["properties"]["output"]["description"] == "first names"


def test_values_come_back_as_the_exact_type() -> None:
    trip = target_for(Trip).parse({"traveller": "Ann", "stops": [{"name": "Oslo"}]})
    assert trip == Trip(traveller="Ann", stops=[City(name="Oslo")])
    assert target_for(list[int]).parse({"output": ["1", 2]}) == [1, 2]


@pytest.mark.parametrize("value", [{"output": "x"}, {"wrong": 1}, [1]])
def test_values_of_the_wrong_shape_are_validation_errors(value: Any) -> None:
    with pytest.raises(OutputValidationError):
        target_for(list[int]).parse(value, raw_text="raw")


@pytest.mark.parametrize("unsupported", [object(), lambda: 1, type("Opaque", (), {})])
def test_unsupported_types_raise_type_errors(unsupported: Any) -> None:
    with pytest.raises(UnsupportedTargetError):
        target_for(unsupported)


def test_labels() -> None:
    assert (classify_target(["spam", "ham"]).json_schema or {})["properties"]["output"]["enum"] == [
        "spam",
        "ham",
    ]
    with pytest.raises(InvalidRequestError):
        classify_target([])


def test_json_schemas_are_checked() -> None:
    assert json_target(None).json_schema == {"type": "object"}
    with pytest.raises(InvalidRequestError):
        json_target({"type": 12})
