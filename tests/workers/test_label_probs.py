"""Label probabilities read at a classification's choice point, whatever lists the candidates
(local logits or an API's top_logprobs)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.targets import classify_target
from workers.label_probs import ChoiceProbe, choice_labels

START = '{"output": '


def run(labels: list[Any], steps: list[tuple[str, dict[str, float]]], answer: str) -> Any:
    """Feed ``steps`` (the answer so far, and each candidate's probability) as a backend
    would, asking ``wants`` first; the probabilities for the whole ``answer``."""
    probe = ChoiceProbe(labels)
    for text, candidates in steps:
        if probe.wants(text):
            probe.observe(text, ((piece, math.log(p)) for piece, p in candidates.items()))
    return probe.result(answer)


def test_labels_that_part_at_their_first_token_get_its_probability() -> None:
    steps = [
        ("", {"{": 1.0}),
        ('{"output": "', {"sp": 0.6, "ham": 0.3, "x": 0.1}),
        ('{"output": "sp', {"am": 1.0}),
    ]
    probs = run(["spam", "ham"], steps, '{"output": "spam"}')
    # "x" fits no label: the grammar would not allow it, so the rest is renormalized.
    assert probs == pytest.approx({"spam": 2 / 3, "ham": 1 / 3})


def test_a_shared_beginning_the_model_writes_divides_what_it_carried() -> None:
    labels = ["not spam", "not sure", "spam"]
    steps = [
        (START, {'"': 0.9, " ": 0.1}),  # both shared by every label: followed
        (START + '"', {"not": 0.5, "spam": 0.5}),
        (START + '"not', {" spam": 0.3, " sure": 0.1}),
    ]
    probs = run(labels, steps, START + '"not spam"}')
    assert probs == pytest.approx({"spam": 0.5, "not spam": 0.375, "not sure": 0.125})


def test_a_shared_beginning_the_model_leaves_is_divided_evenly() -> None:
    labels = ["not spam", "not sure", "spam"]
    steps = [(START + '"', {"not": 0.4, "sp": 0.6}), (START + '"sp', {"am": 1.0})]
    probs = run(labels, steps, START + '"spam"}')
    assert probs == pytest.approx({"spam": 0.6, "not spam": 0.2, "not sure": 0.2})


def test_a_token_may_finish_the_label_and_the_object() -> None:
    steps = [(START + '"', {'yes"}': 0.7, 'no"': 0.2, "nope": 0.1})]
    assert run(["yes", "no"], steps, START + '"yes"}') == pytest.approx({"yes": 7 / 9, "no": 2 / 9})


def test_labels_of_other_types_are_named_by_their_json() -> None:
    steps = [(START, {"1": 0.25, "2": 0.75}), (START + "2", {"}": 1.0})]
    assert run([1, 2], steps, START + "2}") == pytest.approx({"1": 0.25, "2": 0.75})
    steps = [(START, {"true": 0.5, "fal": 0.5})]
    assert run([True, False], steps, START + "true}") == pytest.approx({"true": 0.5, "false": 0.5})


def test_a_label_written_as_llama_cpp_escapes_it_or_as_is() -> None:
    for spelled in ('"caf\\u00e9"', '"café"'):
        steps = [(START, {spelled + "}": 0.5, '"tea"': 0.5})]
        assert run(["café", "tea"], steps, START + spelled + "}") == pytest.approx(
            {"café": 0.5, "tea": 0.5}
        )


def test_no_probabilities_when_the_answer_never_reaches_a_choice() -> None:
    assert run(["spam", "ham"], [("", {"{": 1.0})], "{") is None
    assert run(["spam", "ham"], [], START + '"spam"}') is None


def test_only_a_classifications_schema_names_labels() -> None:
    assert choice_labels(classify_target(["spam", "ham"]).json_schema) == ["spam", "ham"]
    assert choice_labels(classify_target([1, 2, 3]).json_schema) == [1, 2, 3]
    assert choice_labels(None) is None
    assert choice_labels({"type": "object", "properties": {"output": {"type": "string"}}}) is None
    assert choice_labels({"properties": {"output": {"enum": ["only"]}}}) is None


labels_st = st.lists(
    st.text(alphabet="abn ", min_size=1, max_size=4), min_size=2, max_size=5, unique=True
)


@given(labels=labels_st, data=st.data())
def test_probabilities_sum_to_one_over_the_labels_along_any_path(
    labels: list[str], data: st.DataObject
) -> None:
    """Whatever the labels share and whatever the model weighs, walking to any label gives
    every label a probability in [0, 1], summing to 1."""
    chosen = data.draw(st.sampled_from(labels))
    probe, written = ChoiceProbe(labels), '"'
    target = f'"{chosen}"' + "}"
    while probe.wants(START + written) and written != target:
        pieces = data.draw(st.lists(st.text(alphabet='abn "}', min_size=1, max_size=3)))
        step = target[len(written) : len(written) + data.draw(st.integers(1, 3))]
        weights = data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(pieces) + 1))
        candidates = list(zip([step, *pieces], weights, strict=False))
        probe.observe(START + written, ((piece, math.log(w)) for piece, w in candidates))
        written += step
    probs = probe.result(START + target)
    if probs is None:  # only when no step was observed: the chosen label was the only one left
        return
    assert set(probs) == set(labels)
    assert all(0 <= p <= 1 for p in probs.values())
    assert sum(probs.values()) == pytest.approx(1)


def test_a_token_with_no_text_spells_no_label() -> None:
    """A special token (the end of text) has no text: it must not count as the beginning
    every label shares."""
    steps = [(START + '"', {"": 0.5, "sp": 0.3, "ham": 0.2})]
    assert run(["spam", "ham"], steps, START + '"spam"}') == pytest.approx(
        {"spam": 0.6, "ham": 0.4}
    )


def _envelope(label_probs: dict[str, float] | None) -> Any:
    from datetime import UTC, datetime

    from wire.contract import Envelope, Timings, Usage

    now = datetime.now(UTC)
    return Envelope(
        value={"output": "spam"},
        raw_text='{"output": "spam"}',
        finish_reason="stop",
        usage=Usage(),
        model="m",
        worker="w",
        timings=Timings(created_at=now, started_at=now, finished_at=now),
        label_probs=label_probs,
    )


def test_a_result_or_cache_entry_without_probabilities_leaves_the_field_out() -> None:
    """Producers and workers of earlier releases refuse fields they do not know: a result
    (or a cache entry, which a worker of an earlier release may read) without
    probabilities is the JSON it always was."""
    from wire.cache import entry
    from wire.contract import Envelope, GenConf, JobKind, JobSpec, Message

    spec = JobSpec(
        model="fake",
        kind=JobKind.CLASSIFY,
        messages=(Message(role="user", content="x"),),
        json_schema=classify_target(["spam", "ham"]).json_schema,
        genconf=GenConf(temperature=0),
    )
    plain, with_probs = _envelope(None), _envelope({"spam": 0.9, "ham": 0.1})
    assert "label_probs" not in plain.encode()
    cached = entry(spec, plain)
    assert cached is not None and "label_probs" not in json.loads(cached[1])
    assert Envelope.decode(with_probs.encode()).label_probs == {"spam": 0.9, "ham": 0.1}
