"""Sibila's model API, side by side with sibylq's: threads, vision input and result objects.

Each test is one Sibila call shape. Its docstring (or param id) says what Sibila returns; the
assertions say what sibylq returns, through Redis and a real worker (the ``fake`` model, or the
OpenAI stub where what reaches the API matters). Where sibylq differs on purpose, the test
says so. docs/sibila.md is the prose version of this module.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import operator
import warnings
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer import (
    Client,
    ContractError,
    GenOut,
    GenRes,
    InvalidRequestError,
    JobSpec,
    Message,
    Models,
    Msg,
    OutputValidationError,
    PromptTooLongError,
    Thread,
)
from producer import images as images_module
from producer.messages import build_messages
from tests.conftest import Worker
from tests.openai_stub import OpenAIStub

URL = "https://example.com/surfer.jpg"
#: The 8-byte PNG signature and a little more: enough for sibylq's image check and the stub.
IMAGE_PART: dict[str, Any] = {"type": "image_url", "image_url": {"url": URL}}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


@dataclasses.dataclass
class Person:
    name: str
    age: int


class Invoice(pydantic.BaseModel):
    number: str
    total: float


class Picky(pydantic.BaseModel):
    name: str

    @pydantic.field_validator("name")
    @classmethod
    def _not_fake(cls, name: str) -> str:
        if name == "fake":
            raise ValueError("a real name, please")
        return name


@pytest.fixture
def fake(client: Client, fake_worker: Worker) -> Any:
    return Models.create("fake", client=client)


@pytest.fixture
def stub_model(client: Client, openai_worker: Worker) -> Any:
    """``openai:<name>`` on the stub: a name of its own per test finds its requests."""

    def create(name: str) -> Any:
        return Models.create(f"openai:{name}", client=client)

    return create


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    return path


def sent_messages(stub: OpenAIStub, name: str) -> list[dict[str, Any]]:
    """The messages the stub received in its last request for model ``name``."""
    messages: list[dict[str, Any]] = stub.requests_for(name)[-1]["messages"]
    return messages


# -- 1. threads: building them -----------------------------------------------------------------


class TestThreadShapes:
    """``Thread`` and ``Msg`` hold what Sibila's hold (pure objects: no worker needed)."""

    def test_alternating_strings_user_first(self) -> None:
        """Sibila: ``Thread(["Hello model!", "Hello human. How can I help?"])`` prints
        ``0: IN='Hello model!'`` and ``1: OUT='Hello human. How can I help?'``."""
        thread = Thread(["Hello model!", "Hello human. How can I help?"])
        assert [(msg.kind, msg.text) for msg in thread] == [
            (Msg.Kind.IN, "Hello model!"),
            (Msg.Kind.OUT, "Hello human. How can I help?"),
        ]
        assert str(thread).splitlines() == [
            "Thread inst='', join_sep='\\n', len=2",
            "0: IN='Hello model!'",
            "1: OUT='Hello human. How can I help?'",
        ]

    def test_every_way_of_adding_a_message(self) -> None:
        """Sibila's docs (Threads and messages): add_IN, add_OUT, add(kind, text), += str,
        += ChatML dict: eight alternating messages, the instruction apart."""
        thread = Thread(inst="Be helpful.")
        thread.add_IN("Hello model!")
        thread.add_OUT("Hello human. How can I help?")
        thread.add(Msg.Kind.IN, "Can you tell me a motivating tale?")
        thread.add(Msg.Kind.OUT, "Sorry, I can't think of anything, no.")
        thread += "That sounds like ill will."
        thread += "I'm sorry, even models can have the blues."
        thread += {"role": "user", "content": "How can you be sad?"}
        thread += {"role": "assistant", "content": "Oh really?"}
        assert len(thread) == 8
        assert [msg.kind for msg in thread] == [Msg.Kind.IN, Msg.Kind.OUT] * 4
        assert thread.inst.text == "Be helpful."
        assert thread.as_chatml()[0] == {"role": "system", "content": "Be helpful."}

    def test_messages_of_the_same_kind_join(self) -> None:
        """Sibila: a second IN after an IN joins the first, with ``join_sep`` ("\\n")."""
        thread = Thread([Msg.make_IN("one"), Msg.make_IN("two"), Msg.make_OUT("three")])
        assert [msg.text for msg in thread] == ["one\ntwo", "three"]

    @given(
        st.lists(
            st.tuples(st.sampled_from([Msg.Kind.IN, Msg.Kind.OUT]), st.text("ab", min_size=1)),
            max_size=12,
        )
    )
    def test_any_adds_leave_alternating_messages(self, adds: list[tuple[Msg.Kind, str]]) -> None:
        """Sibila: however messages are added, the thread alternates; a run of one kind is
        one message, its texts joined by ``join_sep``."""
        thread = Thread()
        for kind, text in adds:
            thread.add(kind, text)
        runs = itertools.groupby(adds, key=operator.itemgetter(0))
        expected = [(kind, "\n".join(text for _, text in run)) for kind, run in runs]
        assert [(msg.kind, msg.text) for msg in thread] == expected

    def test_a_text_image_tuple_is_a_user_message_with_an_image(self) -> None:
        """Sibila: ``Thread(("Extract keypoints from this image", url))``: one IN message
        with ``images=[{"url": url}]``; its ChatML content is a text part and an image part."""
        thread = Thread(("Extract keypoints from this image", URL))
        assert thread[0].images == [{"url": URL}]
        assert thread.as_chatml() == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Extract keypoints from this image"},
                    {"type": "image_url", "image_url": {"url": URL}},
                ],
            }
        ]

    def test_a_local_image_is_read_into_a_data_url(self, png: Path) -> None:
        """Sibila: a local path becomes a ``data:image/png;base64,...`` URL when the Msg is
        made. sibylq reads it in the caller's process, checks it is an image, and sends it."""
        msg = Msg.make_IN("what is this?", str(png))
        assert msg.images == [{"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}]

    def test_chatml_and_dict_round_trips(self) -> None:
        """Sibila: ``Msg.from_chatml(msg.as_chatml())`` and ``Thread.from_dict(th.as_dict())``
        give the same objects back."""
        thread = Thread(["q", "a", ("look", URL)], inst="Be brief.")
        assert Thread.from_dict(thread.as_dict()) == thread
        assert [Msg.from_chatml(chatml) for chatml in thread.as_chatml(False)] == list(thread)

    def test_inst_comes_before_the_threads_own_instruction(self) -> None:
        """Sibila (``Thread.ensure(thread, inst)`` builds ``Thread(thread, inst)``): the
        argument ``inst`` first, then the thread's own, joined by ``join_sep``. sibylq used
        to raise InvalidRequestError here."""
        merged = Thread.ensure(Thread("hi", inst="Answer in French."), "Be brief.")
        assert merged.inst.text == "Be brief.\nAnswer in French."

    def test_inst_sets_the_instruction_of_a_plain_query(self) -> None:
        """Sibila: ``Thread.ensure("hi", inst="Be brief.")``: IN="hi", inst "Be brief."."""
        assert build_messages("hi", "Be brief.") == (
            Message(role="system", content="Be brief."),
            Message(role="user", content="hi"),
        )


# -- 1. threads: every model method takes them -------------------------------------------------


class TestThreadQueries:
    """Sibila's model methods take a Thread, a Msg, a (text, image) tuple or a str; sibylq's
    take those and lists of them (ChatML dicts, contract Messages, alternating strings)."""

    @pytest.mark.parametrize(
        "query",
        [
            pytest.param("John is 42", id="str"),
            pytest.param(Msg.make_IN("John is 42"), id="Msg"),
            pytest.param(Thread("John is 42", inst="Extract."), id="Thread"),
            pytest.param(("John is 42", URL), id="tuple-text-image"),
            pytest.param(["Who?", "John.", "How old?"], id="list-of-strings"),
            pytest.param([{"role": "user", "content": "John is 42"}], id="list-of-chatml"),
        ],
    )
    def test_every_query_shape_runs(self, fake: Any, query: Any) -> None:
        """Sibila: ``model.extract(Person, query)`` -> a Person. sibylq: the same (the fake
        model's example values)."""
        assert fake.extract(Person, query) == Person(name="fake", age=0)

    def test_every_method_takes_a_thread(self, fake: Any) -> None:
        thread = Thread(["Pick a colour", "Which kind?", "A warm one"], inst="Answer briefly.")
        assert fake.call(thread) == "fake output"
        assert fake(thread) == "fake output"
        assert fake.classify(["red", "blue"], thread) == "red"
        assert fake.json(thread) == {}
        assert fake.dataclass(Person, thread) == Person(name="fake", age=0)
        assert fake.pydantic(Invoice, thread) == Invoice(number="fake", total=0.0)

    async def test_async_methods_take_a_thread(self, fake: Any) -> None:
        """Sibila: ``await model.extract_async(int, thread)``."""
        assert await fake.extract_async(int, Thread("How many?")) == 0

    def test_inst_with_a_thread_that_has_one_reaches_the_model_merged(
        self, stub_model: Any, openai_stub: OpenAIStub
    ) -> None:
        """Sibila: merges (argument first). sibylq: the same, one system message."""
        stub_model("parity-inst").call(Thread("hi", inst="Answer in French."), inst="Be brief.")
        assert sent_messages(openai_stub, "parity-inst") == [
            {"role": "system", "content": "Be brief.\nAnswer in French."},
            {"role": "user", "content": "hi"},
        ]

    def test_a_thread_ending_with_the_models_turn_warns_and_runs(self, fake: Any) -> None:
        """Sibila: logs "Last thread message is not an IN message." and generates. sibylq:
        ``warnings.warn`` and runs (it used to raise InvalidRequestError)."""
        with pytest.warns(UserWarning, match="last message is not a user") as warned:
            assert fake.call(Thread(["Tell me a tale", "Once upon a time"])) == "fake output"
        assert warned[0].filename == __file__  # the caller's line, not sibylq's

    def test_a_well_formed_thread_does_not_warn(self, fake: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fake.call(Thread(["q", "a", "q again"])) == "fake output"

    @pytest.mark.parametrize(
        "query",
        [
            pytest.param(Thread(), id="empty-thread"),
            pytest.param(Thread(inst="only an instruction"), id="inst-only"),
            pytest.param(Thread(" "), id="blank-user-message"),
        ],
    )
    def test_an_empty_thread_is_refused(self, fake: Any, query: Any) -> None:
        """Sibila: ValueError("Cannot generate from an empty thread"). sibylq:
        InvalidRequestError (a ValueError) before anything is enqueued."""
        with pytest.raises(InvalidRequestError, match="empty"):
            fake.call(query)

    def test_a_bad_message_is_refused_before_enqueue(self, fake: Any) -> None:
        """Sibila: ValueError("Unknown ChatML role 'robot'")."""
        with pytest.raises(InvalidRequestError, match="robot"):
            fake.call([{"role": "robot", "content": "beep"}])


# -- 5. vision ---------------------------------------------------------------------------------


class TestVision:
    def test_an_image_url_reaches_the_api_as_an_image_part(
        self, stub_model: Any, openai_stub: OpenAIStub
    ) -> None:
        """Sibila: ``model.extract(list[str], ("Extract the main points", url))``. sibylq
        sends the URL as it is (the API fetches it; sibylq never does)."""
        assert stub_model("parity-vision-url").extract(list[str], ("Main points?", URL)) == ["fake"]
        user = sent_messages(openai_stub, "parity-vision-url")[-1]
        assert user == {
            "role": "user",
            "content": [
                {"type": "text", "text": "Main points?"},
                {"type": "image_url", "image_url": {"url": URL}},
            ],
        }

    def test_a_local_image_is_sent_inline(
        self, stub_model: Any, openai_stub: OpenAIStub, png: Path
    ) -> None:
        """Sibila: a local JPEG/PNG path is sent as a base64 data URL. sibylq: the same, and
        ``detail`` (OpenAI's resolution hint) travels when given in an image dict."""
        image = {"url": str(png), "detail": "low"}
        assert stub_model("parity-vision-file").call(Msg.make_IN("What is it?", image))
        part = sent_messages(openai_stub, "parity-vision-file")[-1]["content"][1]
        data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
        assert part == {"type": "image_url", "image_url": {"url": data_url, "detail": "low"}}

    def test_the_fake_model_takes_images(self, fake: Any, png: Path) -> None:
        assert fake.classify(["cat", "dog"], ("Which animal?", str(png))) == "cat"

    def test_a_missing_image_file_is_refused_before_enqueue(
        self, fake: Any, tmp_path: Path
    ) -> None:
        """Sibila: FileNotFoundError from ``open``. sibylq: InvalidRequestError naming it."""
        with pytest.raises(InvalidRequestError, match=r"cannot read image file .*nope\.png"):
            fake.call(("What is it?", str(tmp_path / "nope.png")))

    def test_a_file_that_is_no_image_is_refused(self, fake: Any, tmp_path: Path) -> None:
        """Sibila sends any file as ``image/jpeg``; sibylq checks the bytes first."""
        notes = tmp_path / "notes.jpg"
        notes.write_text("not an image")
        with pytest.raises(InvalidRequestError, match="is not a PNG, JPEG, GIF or WebP image"):
            fake.call(("What is it?", str(notes)))

    def test_an_oversized_image_is_refused(
        self, fake: Any, png: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(images_module, "MAX_IMAGE_BYTES", 16)
        with pytest.raises(InvalidRequestError, match="at most 16 are sent"):
            fake.call(("What is it?", str(png)))

    def test_images_for_a_llamacpp_model_are_refused_before_enqueue(self, client: Client) -> None:
        """Sibila loads a projector (``llamacpp:model.gguf*mmproj.gguf``). sibylq does not
        yet: the job fails in the caller's process, naming what to use instead."""
        model = Models.create("llamacpp:smollm2", client=client)
        with pytest.raises(InvalidRequestError, match=r"cannot take images.*openai:"):
            model.call(("What is it?", URL))

    def test_sibilas_projector_syntax_is_refused_plainly(self, client: Client) -> None:
        """Sibila: ``Models.create("llamacpp:moondream2-text.gguf*moondream2-mmproj.gguf")``
        loads both files. sibylq: not supported yet, said before anything is enqueued."""
        model = Models.create("llamacpp:moondream2-text.gguf*moondream2-mmproj.gguf", client=client)
        with pytest.raises(InvalidRequestError, match=r"no multimodal projector yet \(Sibila"):
            model.call("Describe the image")

    def test_images_belong_to_user_messages(self, fake: Any) -> None:
        """OpenAI refuses images in assistant or system messages; sibylq refuses them before
        enqueue (Sibila sends them and the API answers 400)."""
        with pytest.raises(InvalidRequestError, match="images go in user messages"):
            fake.call(Thread([("q", URL), ("a", URL), "q again"]))

    def test_the_contract_validates_image_parts(self) -> None:
        """A job from elsewhere with a malformed part is refused by the worker's decoder."""
        spec = JobSpec(
            model="fake", kind="text", messages=(Message(role="user", content="x"),)
        ).encode()
        spec["messages"] = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}
        ]
        with pytest.raises(ContractError, match="http"):
            JobSpec.decode(spec)

    @pytest.mark.parametrize(
        ("message", "param"),
        [
            pytest.param(
                {"role": "user", "content": [{"type": "image", "url": URL}]},
                "messages[0].content[0].type",
                id="unknown-part-type",
            ),
            pytest.param(
                {"role": "assistant", "content": [IMAGE_PART]},
                "messages[0].content[0].type",
                id="image-in-assistant-message",
            ),
            pytest.param(
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                "messages[0].content[0].image_url.url",
                id="not-a-url",
            ),
            pytest.param(
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}
                    ],
                },
                "messages[0].content[0].image_url.url",
                id="bad-base64",
            ),
            pytest.param(
                {"role": "user", "content": [{"type": "text"}]},
                "messages[0].content[0].text",
                id="text-part-without-text",
            ),
            pytest.param({"role": "user", "content": []}, "messages[0].content", id="no-parts"),
        ],
    )
    def test_the_stub_refuses_malformed_parts_as_openai_does(
        self, openai_stub: OpenAIStub, message: dict[str, Any], param: str
    ) -> None:
        api = openai.OpenAI(base_url=openai_stub.base_url, api_key="sk-test", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model="stub", messages=[message])
        assert refused.value.body["param"] == param  # type: ignore[index]


# -- 7. result objects -------------------------------------------------------------------------


class TestGenOut:
    """Sibila's ``gen_*`` methods return a GenOut and do not raise when the output is bad."""

    def test_gen(self, fake: Any) -> None:
        """Sibila: ``model.gen(thread)`` -> ``GenOut(res=OK_STOP, text=..., dic=None,
        value=None)``. sibylq: the same, and the job's envelope."""
        out = fake.gen(Thread("hi"))
        assert (out.res, out.text, out.dic, out.value) == (
            GenRes.OK_STOP,
            "fake output",
            None,
            None,
        )
        assert out.envelope is not None and out.envelope.usage.prompt_tokens == 1

    def test_gen_json(self, fake: Any) -> None:
        """Sibila: ``model.gen_json(thread, schema)`` -> the object in ``dic``."""
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        out = fake.gen_json(Thread("n?"), schema)
        assert (out.res, out.dic, out.value) == (GenRes.OK_STOP, {"n": 0}, None)

    def test_gen_extract(self, fake: Any) -> None:
        """Sibila: ``model.gen_extract(int, thread)`` -> ``value=0``, ``dic={"output": 0}``
        (both wrap a non-object type under the key "output")."""
        out = fake.gen_extract(int, Thread("How many?"))
        assert (out.res, out.dic, out.value, out.text) == (
            GenRes.OK_STOP,
            {"output": 0},
            0,
            '{"output": 0}',
        )

    def test_gen_dataclass_and_gen_pydantic(self, fake: Any) -> None:
        assert fake.gen_dataclass(Person, Thread("John")).value == Person(name="fake", age=0)
        assert fake.gen_pydantic(Invoice, "A1, 3 EUR").value == Invoice(number="fake", total=0)

    async def test_the_async_twins(self, fake: Any) -> None:
        """Sibila: ``await model.gen_extract_async(int, thread)``."""
        outs = await asyncio.gather(fake.gen_extract_async(int, "n?"), fake.gen_async("hi"))
        assert [out.res for out in outs] == [GenRes.OK_STOP, GenRes.OK_STOP]
        assert outs[0].value == 0

    def test_output_that_is_not_json(self, stub_model: Any) -> None:
        """Sibila: ``GenOut(res=ERROR_JSON, ...)``; ``model.extract`` raises GenError.
        sibylq: the same code, the model's text, and the OutputValidationError in ``error``
        (``model.extract`` raises that error)."""
        out = stub_model("stub-invalid").gen_extract(Person, "John")
        assert (out.res, out.text, out.value) == (GenRes.ERROR_JSON, "this is not json", None)
        assert isinstance(out.error, OutputValidationError)

    def test_json_cut_at_max_tokens(self, stub_model: Any) -> None:
        """Sibila: the cut JSON does not parse: ERROR_JSON."""
        out = stub_model("stub-truncate").gen_extract(Person, "John")
        assert out.res is GenRes.ERROR_JSON
        assert out.error is not None and out.error.finish_reason == "length"

    def test_text_cut_at_max_tokens(self, stub_model: Any) -> None:
        """Sibila: ``model.gen(thread, GenConf(max_tokens=1))`` -> OK_LENGTH."""
        out = stub_model("parity-length").gen("say many words", {"max_tokens": 1})
        assert (out.res, out.text) == (GenRes.OK_LENGTH, "stub")

    def test_a_model_failure(self, stub_model: Any) -> None:
        """Sibila: an API error raises. sibylq: a job that failed on its worker (here
        PromptTooLongError) is ERROR_MODEL, with the error kept."""
        out = stub_model("stub-context").gen("long")
        assert out.res is GenRes.ERROR_MODEL
        assert isinstance(out.error, PromptTooLongError)

    def test_json_the_callers_type_refuses(self, fake: Any) -> None:
        """Sibila: JSON valid for the schema that the type then refuses ->
        ERROR_JSON_SCHEMA_VAL, ``dic`` holding the JSON. sibylq: the same (here a pydantic
        validator the schema cannot express refuses the fake model's "fake")."""
        out = fake.gen_pydantic(Picky, "a name")
        assert (out.res, out.dic, out.value) == (
            GenRes.ERROR_JSON_SCHEMA_VAL,
            {"name": "fake"},
            None,
        )
        assert isinstance(out.error, OutputValidationError) and out.envelope is not None

    def test_a_request_refused_before_enqueue_still_raises(self, fake: Any) -> None:
        with pytest.raises(InvalidRequestError):
            fake.gen(Thread())

    def test_genres_has_sibilas_values(self) -> None:
        """Sibila's GenRes: OK_STOP=1, OK_LENGTH=0, ERROR_JSON=-1, ERROR_JSON_SCHEMA_VAL=-2
        (ERROR_JSON_SCHEMA_ERROR its alias), ERROR_MODEL=-3; from_finish_reason maps the
        chat completion's finish reason."""
        assert {res.name: int(res) for res in GenRes} == {
            "OK_STOP": 1,
            "OK_LENGTH": 0,
            "ERROR_JSON": -1,
            "ERROR_JSON_SCHEMA_VAL": -2,
            "ERROR_MODEL": -3,
        }
        assert GenRes.ERROR_JSON_SCHEMA_ERROR is GenRes.ERROR_JSON_SCHEMA_VAL
        assert GenRes.from_finish_reason("content_filter") is GenRes.ERROR_MODEL
        assert GenOut(GenRes.OK_STOP, "x").as_dict() == {
            "res": GenRes.OK_STOP,
            "text": "x",
            "dic": None,
            "value": None,
        }


@pytest.mark.parametrize(
    ("query", "inst"),
    [("hi", None), ("hi", ""), ("hi", "Be brief."), ("two\nlines", "Be\nbrief.")],
)
def test_a_string_query_gives_what_its_thread_gives(query: str, inst: str | None) -> None:
    """A string query takes a shortcut past ``Thread``; it gives the same messages."""
    thread = Thread.ensure(query, inst)
    assert build_messages(query, inst) == build_messages(thread)
    assert [message.model_dump() for message in build_messages(query, inst)] == (thread.as_chatml())


class TestThreadEditing:
    def test_deleting_a_middle_message_keeps_the_alternation(self) -> None:
        """Sibila: ``del thread[1]`` on IN, OUT, IN, OUT joins the two INs around it."""
        thread = Thread(["q1", "a1", "q2", "a2"])
        del thread[1]
        assert [(msg.kind, msg.text) for msg in thread] == [
            (Msg.Kind.IN, "q1\nq2"),
            (Msg.Kind.OUT, "a2"),
        ]
        del thread[-1]
        assert [msg.text for msg in thread] == ["q1\nq2"]

    def test_save_and_load(self, tmp_path: Path) -> None:
        """Sibila: ``thread.save(path)``, ``Thread().load(path, clear=True)``."""
        thread = Thread(["q", "a", ("look", URL)], inst="Be brief.")
        thread.save(tmp_path / "thread.json")
        loaded = Thread(["old"])
        loaded.load(tmp_path / "thread.json", clear=True)
        assert loaded == thread
        kinds = [msg.kind for msg in thread.get_iter(True)]
        assert kinds == [Msg.Kind.INST, Msg.Kind.IN, Msg.Kind.OUT, Msg.Kind.IN]
