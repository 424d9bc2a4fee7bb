"""The ``Models`` facade: Sibila's model API, run by a worker fleet.

Every generation method has an ``_async`` twin that starts the enqueue and returns a ``Job``
at once (in an event loop the enqueue runs on the loop; ``await job`` awaits it, then the
result); the plain method is that same call followed by a blocking wait.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, Literal, Never, TypeVar, overload

from pydantic import BaseModel

from wire.constants import LANE_PRIORITIES
from wire.contract import PRODUCER_ONLY_GENCONF, GenConf, JobKind, JobSpec, ModelFacts
from wire.errors import InvalidRequestError, UnsupportedTargetError
from wire.modelref import ModelRef, fake_delay_s, parse_model_ref
from wire.settings import Settings

from .client import Client
from .facts import FactsCache
from .genout import GenMethods
from .job import Enqueue, Job
from .messages import Query, build_messages
from .targets import TEXT, Target, classify_target, json_target, target_for

T = TypeVar("T")
E = TypeVar("E", bound=Enum)
M = TypeVar("M", bound=BaseModel)
GenConfLike = GenConf | Mapping[str, Any] | None
#: ``interactive`` jobs are served before ``bulk`` ones waiting on the same queue.
Lane = Literal["interactive", "bulk"]


#: Sibila's GenConf fields resolved by the producer, reset before a job is built.
_PRODUCER_DEFAULTS: dict[str, Any] = {
    name: GenConf.model_fields[name].default for name in PRODUCER_ONLY_GENCONF
}
#: What every generation method takes besides its target and query (sync ones: ``timeout``).
CALL_OPTIONS = ("inst", "genconf", "job_id", "once", "lane")
CREATE_OPTIONS = ("genconf", "queue", "client", "settings", "lane", "ctx_len", "max_tokens_limit")
#: Sibila arguments sibylq has no use for, and why.
_SIBILA_ONLY = {
    "schemaconf": "sibylq builds JSON schemas with pydantic; Sibila's JSchemaConf has no "
    "equivalent",
    "ok_length_is_error": "output cut at max_tokens always fails (OutputValidationError)",
}


class Models:
    """Factory of remote models: ``Models.create("llamacpp:smollm2")``."""

    @staticmethod
    def create(
        ref: str,
        *,
        genconf: GenConfLike = None,
        queue: str | None = None,
        client: Client | None = None,
        settings: Settings | None = None,
        lane: Lane = "interactive",
        ctx_len: int | None = None,
        max_tokens_limit: int | None = None,
        **unknown: Never,
    ) -> Model:
        """``ref`` is ``openai:<model>``, ``llamacpp:<name or path.gguf>`` or
        ``fake[:delay=<s>]``. ``genconf`` sets this model's default generation settings;
        ``queue`` overrides the queue its jobs go to; ``lane="bulk"`` lets interactive jobs
        on the same workers go first (labeling runs use it).

        ``ctx_len`` is the context the model's jobs count on (as in Sibila): a worker whose
        model has less refuses them (``ContextUnavailableError``), and ``max_tokens`` 0 or
        negative resolves against it. ``max_tokens_limit`` caps every job's output."""
        _refuse_unknown("Models.create", unknown, CREATE_OPTIONS)
        model_ref = parse_model_ref(ref)
        if model_ref.provider == "fake":
            fake_delay_s(model_ref.options)  # bad options fail here, not on a worker
        ctx_len = _positive("ctx_len", ctx_len)
        max_tokens_limit = _positive("max_tokens_limit", max_tokens_limit)
        if ctx_len is not None and max_tokens_limit is not None:
            max_tokens_limit = min(max_tokens_limit, ctx_len)  # as Sibila does
        return Model(
            model_ref,
            client=client or Client(settings),
            genconf=merge_genconf(GenConf(), genconf),
            queue=queue or model_ref.queue,
            lane=_checked_lane(lane),
            ctx_len=ctx_len,
            max_tokens_limit=max_tokens_limit,
        )


class Model(GenMethods):
    """A model served by workers. Build with ``Models.create``. Sibila's ``gen_*`` methods
    (which return a ``GenOut``) come from ``GenMethods``."""

    def __init__(
        self,
        ref: ModelRef,
        *,
        client: Client,
        genconf: GenConf,
        queue: str,
        lane: Lane = "interactive",
        ctx_len: int | None = None,
        max_tokens_limit: int | None = None,
    ) -> None:
        self.ref = ref
        self.client = client
        self.genconf = genconf
        self.queue = queue
        self.lane = lane
        #: What the caller asked for in ``Models.create``; the ``ctx_len`` property answers
        #: what a worker serving the model gives.
        self.wanted_ctx_len = ctx_len
        self.wanted_max_tokens_limit = max_tokens_limit
        self._facts = FactsCache(self)

    def __repr__(self) -> str:
        return f"<Model {self.ref} queue={self.queue!r} lane={self.lane!r}>"

    def submit(
        self,
        kind: JobKind,
        target: Target,
        query: Query,
        *,
        inst: str | None = None,
        genconf: GenConfLike = None,
        job_id: str | None = None,
        once: bool = False,
        lane: Lane | None = None,
    ) -> Job[Any]:
        """Validate, build and enqueue one job: the core every method shares. With ``once``
        (and a ``job_id``) a job id enqueued before is not enqueued again: the handle
        attaches to it. ``lane`` overrides the model's lane for this job.

        In a running event loop the enqueue runs on the loop, without blocking it: the handle
        comes back at once and awaits the enqueue (and reports its errors) before the result.
        Elsewhere the job is enqueued before this returns."""
        spec = self.spec(kind, target, query, inst=inst, genconf=genconf)
        return self.enqueue(spec, target, job_id=job_id, once=once, lane=lane)

    def spec(
        self,
        kind: JobKind,
        target: Target,
        query: Query,
        *,
        inst: str | None = None,
        genconf: GenConfLike = None,
    ) -> JobSpec:
        """The job a call makes: its messages, schema and settings (Sibila's ``format``,
        ``json_schema`` and ``special`` resolved here: they never travel)."""
        merged = merge_genconf(self.genconf, genconf)
        if merged.special:
            raise InvalidRequestError(
                "genconf.special (provider-specific arguments) is not supported: sibylq's "
                "workers send only the settings GenConf names"
            )
        return JobSpec(
            model=str(self.ref),
            kind=kind,
            messages=build_messages(query, inst, model=self.ref),
            json_schema=target.json_schema,
            genconf=merged.model_copy(update=_PRODUCER_DEFAULTS),
            ctx_len=self.wanted_ctx_len,
            max_tokens_limit=self.wanted_max_tokens_limit,
        )

    def enqueue(
        self,
        spec: JobSpec,
        target: Target,
        *,
        job_id: str | None = None,
        once: bool = False,
        lane: Lane | None = None,
    ) -> Job[Any]:
        """Enqueue ``spec``; its handle reads the result as ``target``."""
        priority = LANE_PRIORITIES[_checked_lane(lane or self.lane)]
        once = once and job_id is not None
        job_id = job_id or str(uuid.uuid4())
        enqueue = Enqueue(
            self.client, self.ref, spec, self.queue, job_id, priority=priority, once=once
        )
        enqueue.start()
        return Job(
            job_id,
            client=self.client,
            target=target,
            model=spec.model,
            queue=self.queue,
            enqueue=enqueue,
        )

    # -- async twins: enqueue now, return an awaitable handle ----------------------------

    @overload
    def extract_async(self, target: type[T], query: Query, **kw: Any) -> Job[T]: ...
    @overload
    def extract_async(self, target: Sequence[str], query: Query, **kw: Any) -> Job[str]: ...
    @overload
    def extract_async(self, target: Sequence[bool], query: Query, **kw: Any) -> Job[bool]: ...
    @overload
    def extract_async(self, target: Sequence[int], query: Query, **kw: Any) -> Job[int]: ...
    @overload
    def extract_async(self, target: Sequence[float], query: Query, **kw: Any) -> Job[float]: ...
    @overload
    def extract_async(self, target: Any, query: Query, **kw: Any) -> Job[Any]: ...
    def extract_async(self, target: Any, query: Query, **kw: Any) -> Job[Any]:
        """Extract a value of Python type ``target`` (str, int, list[T], dataclass, ...), or
        one of a list of values (``["red", "blue"]``, as ``classify``)."""
        _refuse_unknown("extract_async", kw)
        return self.submit(JobKind.EXTRACT, target_for(target), query, **kw)

    @overload
    def classify_async(self, labels: type[E], query: Query, **kw: Any) -> Job[E]: ...
    @overload
    def classify_async(self, labels: Sequence[str], query: Query, **kw: Any) -> Job[str]: ...
    @overload
    def classify_async(self, labels: Sequence[bool], query: Query, **kw: Any) -> Job[bool]: ...
    @overload
    def classify_async(self, labels: Sequence[int], query: Query, **kw: Any) -> Job[int]: ...
    @overload
    def classify_async(self, labels: Sequence[float], query: Query, **kw: Any) -> Job[float]: ...
    @overload
    def classify_async(self, labels: Any, query: Query, **kw: Any) -> Job[Any]: ...
    def classify_async(self, labels: Any, query: Query, **kw: Any) -> Job[Any]:
        """Pick one of ``labels`` (a list of strings, ints, floats or bools, an Enum or a
        Literal); the label comes back in its own type."""
        _refuse_unknown("classify_async", kw)
        return self.submit(JobKind.CLASSIFY, classify_target(labels), query, **kw)

    def json_async(
        self, query: Query, *, json_schema: dict[str, Any] | str | None = None, **kw: Any
    ) -> Job[Any]:
        """A JSON object, following ``json_schema`` (else the genconf's) when given."""
        _refuse_unknown("json_async", kw)
        if json_schema is None:
            json_schema = merge_genconf(self.genconf, kw.get("genconf")).json_schema
        return self.submit(JobKind.JSON, json_target(json_schema), query, **kw)

    def dataclass_async(self, cls: type[T], query: Query, **kw: Any) -> Job[T]:
        _refuse_unknown("dataclass_async", kw)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise UnsupportedTargetError(f"dataclass() needs a dataclass type, not {cls!r}")
        return self.extract_async(cls, query, **kw)

    def pydantic_async(self, cls: type[M], query: Query, **kw: Any) -> Job[M]:
        _refuse_unknown("pydantic_async", kw)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise UnsupportedTargetError(f"pydantic() needs a pydantic model class, not {cls!r}")
        return self.extract_async(cls, query, **kw)

    def call_async(self, query: Query, **kw: Any) -> Job[str]:
        """Plain text generation; with ``GenConf(format="json")`` (and its ``json_schema``)
        the text is JSON, as in Sibila: a JSON job whose value comes back as its text."""
        _refuse_unknown("call_async", kw)
        genconf = merge_genconf(self.genconf, kw.get("genconf"))
        if genconf.format == "json":
            target = dataclasses.replace(json_target(genconf.json_schema), as_text=True)
            return self.submit(JobKind.JSON, target, query, **kw)
        return self.submit(JobKind.TEXT, TEXT, query, **kw)

    # -- sync methods: the same call, then a blocking wait --------------------------------

    @overload
    def extract(
        self, target: type[T], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> T: ...
    @overload
    def extract(
        self, target: Sequence[str], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> str: ...
    @overload
    def extract(
        self, target: Sequence[bool], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> bool: ...
    @overload
    def extract(
        self, target: Sequence[int], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> int: ...
    @overload
    def extract(
        self, target: Sequence[float], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> float: ...
    @overload
    def extract(
        self, target: Any, query: Query, *, timeout: float | None = None, **kw: Any
    ) -> Any: ...
    def extract(self, target: Any, query: Query, *, timeout: float | None = None, **kw: Any) -> Any:
        _refuse_unknown("extract", kw)
        return self._blocking(self.extract_async, timeout, target, query, **kw)

    @overload
    def classify(
        self, labels: type[E], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> E: ...
    @overload
    def classify(
        self, labels: Sequence[str], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> str: ...
    @overload
    def classify(
        self, labels: Sequence[bool], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> bool: ...
    @overload
    def classify(
        self, labels: Sequence[int], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> int: ...
    @overload
    def classify(
        self, labels: Sequence[float], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> float: ...
    @overload
    def classify(
        self, labels: Any, query: Query, *, timeout: float | None = None, **kw: Any
    ) -> Any: ...
    def classify(
        self, labels: Any, query: Query, *, timeout: float | None = None, **kw: Any
    ) -> Any:
        _refuse_unknown("classify", kw)
        return self._blocking(self.classify_async, timeout, labels, query, **kw)

    def json(self, query: Query, *, timeout: float | None = None, **kw: Any) -> Any:
        _refuse_unknown("json", kw, ("json_schema", *CALL_OPTIONS))
        return self._blocking(self.json_async, timeout, query, **kw)

    def dataclass(
        self, cls: type[T], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> T:
        _refuse_unknown("dataclass", kw)
        value: T = self._blocking(self.dataclass_async, timeout, cls, query, **kw)
        return value

    def pydantic(self, cls: type[M], query: Query, *, timeout: float | None = None, **kw: Any) -> M:
        _refuse_unknown("pydantic", kw)
        value: M = self._blocking(self.pydantic_async, timeout, cls, query, **kw)
        return value

    def call(self, query: Query, *, timeout: float | None = None, **kw: Any) -> str:
        _refuse_unknown("call", kw)
        return str(self._blocking(self.call_async, timeout, query, **kw))

    def __call__(self, query: Query, *, timeout: float | None = None, **kw: Any) -> str:
        return self.call(query, timeout=timeout, **kw)

    # -- model facts, answered by a worker serving the model (Sibila's properties) --------

    @property
    def ctx_len(self) -> int | None:
        """The context a worker serving this model gives its jobs (tokens, prompt and output
        together); None when unknown (an OpenAI-compatible model sibylq has no figure for,
        created without ``ctx_len``). Asked once, then kept."""
        return self._facts.context().ctx_len

    @property
    def max_tokens_limit(self) -> int | None:
        """The most output tokens a job may ask for: at most the context, as in Sibila;
        None when the context is unknown too."""
        return self._facts.context().max_tokens_limit

    def token_len(
        self, thread_or_text: Query, genconf: GenConfLike = None, *, timeout: float | None = None
    ) -> int:
        """Tokens ``thread_or_text`` takes in the model's context, counted by a worker: the
        chat template included (a string counts as a one-message thread). An estimate for
        OpenAI-compatible models (``Model.facts(...).token_len_exact``). ``genconf`` is
        accepted for Sibila's signature: settings do not change the count."""
        merge_genconf(self.genconf, genconf)  # bad settings fail as in every call
        return self._facts.token_len(thread_or_text, timeout)

    def facts(self, query: Query | None = None, *, timeout: float | None = None) -> ModelFacts:
        """Everything a worker knows of this model, and ``query``'s length (not cached)."""
        return self._facts.ask(query, timeout)

    def _blocking(
        self, submit: Callable[..., Job[Any]], timeout: float | None, *args: Any, **kw: Any
    ) -> Any:
        """Submit with ``submit`` (an ``_async`` twin) and wait. The wait subscribes to the
        job's channel before the job is sent: its result can only come after, so the wait
        needs no first read of the stored result (a round trip) before listening."""
        if kw.get("job_id") is not None:  # a caller's id may name a job that already ran
            return submit(*args, **kw).result(timeout)
        job_id = str(uuid.uuid4())
        with self.client.subscription(job_id, fresh=True) as subscription:
            job = submit(*args, job_id=job_id, **kw)
            return job.value_of(job.envelope(timeout, subscription=subscription))


def merge_genconf(base: GenConf, override: GenConfLike) -> GenConf:
    """``base`` with ``override``'s fields (a GenConf or a mapping) on top. Bad values raise
    ``InvalidRequestError`` naming the field, whichever form they came in."""
    if override is None:
        return base
    if isinstance(override, GenConf):
        fields = override.model_dump(exclude_unset=True)
    elif isinstance(override, Mapping):
        fields = dict(override)
    else:
        raise InvalidRequestError(f"genconf must be a GenConf or a mapping, not {override!r}")
    return base(**fields)


def _refuse_unknown(
    method: str, kw: Mapping[str, Any], takes: Sequence[str] = CALL_OPTIONS
) -> None:
    """Raise ``InvalidRequestError`` naming ``method`` for arguments it does not take (a
    Sibila-only one says why sibylq has none)."""
    unknown = sorted(set(kw) - set(takes))
    if not unknown:
        return
    why = "; ".join(f"{name}: {_SIBILA_ONLY[name]}" for name in unknown if name in _SIBILA_ONLY)
    raise InvalidRequestError(
        f"{method}() got unknown argument(s) {', '.join(unknown)}"
        + (f" ({why})" if why else "")
        + f"; it takes {', '.join(takes)}"
    )


def _positive(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise InvalidRequestError(f"{name} must be a positive number of tokens, not {value!r}")
    return value


def _checked_lane(lane: str) -> Lane:
    if lane not in LANE_PRIORITIES:
        raise InvalidRequestError(f"lane must be one of {sorted(LANE_PRIORITIES)}, not {lane!r}")
    return lane  # type: ignore[return-value]
