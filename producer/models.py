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
from typing import Any, Literal, TypeVar, overload

from pydantic import BaseModel, ValidationError

from wire.constants import LANE_PRIORITIES
from wire.contract import GenConf, JobKind, JobSpec
from wire.errors import InvalidRequestError, UnsupportedTargetError
from wire.modelref import ModelRef, fake_delay_s, parse_model_ref
from wire.settings import Settings

from .client import Client
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
    ) -> Model:
        """``ref`` is ``openai:<model>``, ``llamacpp:<name or path.gguf>`` or
        ``fake[:delay=<s>]``. ``genconf`` sets this model's default generation settings;
        ``queue`` overrides the queue its jobs go to; ``lane="bulk"`` lets interactive jobs
        on the same workers go first (labeling runs use it)."""
        model_ref = parse_model_ref(ref)
        if model_ref.provider == "fake":
            fake_delay_s(model_ref.options)  # bad options fail here, not on a worker
        return Model(
            model_ref,
            client=client or Client(settings),
            genconf=merge_genconf(GenConf(), genconf),
            queue=queue or model_ref.queue,
            lane=_checked_lane(lane),
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
    ) -> None:
        self.ref = ref
        self.client = client
        self.genconf = genconf
        self.queue = queue
        self.lane = lane

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
        priority = LANE_PRIORITIES[_checked_lane(lane or self.lane)]
        spec = JobSpec(
            model=str(self.ref),
            kind=kind,
            messages=build_messages(query, inst, model=self.ref),
            json_schema=target.json_schema,
            genconf=merge_genconf(self.genconf, genconf),
        )
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
    def extract_async(self, target: Any, query: Query, **kw: Any) -> Job[Any]: ...
    def extract_async(self, target: Any, query: Query, **kw: Any) -> Job[Any]:
        """Extract a value of Python type ``target`` (str, int, list[T], dataclass, ...)."""
        return self.submit(JobKind.EXTRACT, target_for(target), query, **kw)

    @overload
    def classify_async(self, labels: type[E], query: Query, **kw: Any) -> Job[E]: ...
    @overload
    def classify_async(self, labels: Sequence[str], query: Query, **kw: Any) -> Job[str]: ...
    @overload
    def classify_async(self, labels: Any, query: Query, **kw: Any) -> Job[Any]: ...
    def classify_async(self, labels: Any, query: Query, **kw: Any) -> Job[Any]:
        """Pick one of ``labels`` (a list of strings, an Enum or a Literal)."""
        return self.submit(JobKind.CLASSIFY, classify_target(labels), query, **kw)

    def json_async(
        self, query: Query, *, json_schema: dict[str, Any] | str | None = None, **kw: Any
    ) -> Job[Any]:
        """A JSON object, following ``json_schema`` when given."""
        return self.submit(JobKind.JSON, json_target(json_schema), query, **kw)

    def dataclass_async(self, cls: type[T], query: Query, **kw: Any) -> Job[T]:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise UnsupportedTargetError(f"dataclass() needs a dataclass type, not {cls!r}")
        return self.extract_async(cls, query, **kw)

    def pydantic_async(self, cls: type[M], query: Query, **kw: Any) -> Job[M]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise UnsupportedTargetError(f"pydantic() needs a pydantic model class, not {cls!r}")
        return self.extract_async(cls, query, **kw)

    def call_async(self, query: Query, **kw: Any) -> Job[str]:
        """Plain text generation."""
        return self.submit(JobKind.TEXT, TEXT, query, **kw)

    # -- sync methods: the same call, then a blocking wait --------------------------------

    @overload
    def extract(
        self, target: type[T], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> T: ...
    @overload
    def extract(
        self, target: Any, query: Query, *, timeout: float | None = None, **kw: Any
    ) -> Any: ...
    def extract(self, target: Any, query: Query, *, timeout: float | None = None, **kw: Any) -> Any:
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
        self, labels: Any, query: Query, *, timeout: float | None = None, **kw: Any
    ) -> Any: ...
    def classify(
        self, labels: Any, query: Query, *, timeout: float | None = None, **kw: Any
    ) -> Any:
        return self._blocking(self.classify_async, timeout, labels, query, **kw)

    def json(self, query: Query, *, timeout: float | None = None, **kw: Any) -> Any:
        return self._blocking(self.json_async, timeout, query, **kw)

    def dataclass(
        self, cls: type[T], query: Query, *, timeout: float | None = None, **kw: Any
    ) -> T:
        value: T = self._blocking(self.dataclass_async, timeout, cls, query, **kw)
        return value

    def pydantic(self, cls: type[M], query: Query, *, timeout: float | None = None, **kw: Any) -> M:
        value: M = self._blocking(self.pydantic_async, timeout, cls, query, **kw)
        return value

    def call(self, query: Query, *, timeout: float | None = None, **kw: Any) -> str:
        return str(self._blocking(self.call_async, timeout, query, **kw))

    def __call__(self, query: Query, *, timeout: float | None = None, **kw: Any) -> str:
        return self.call(query, timeout=timeout, **kw)

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
    """``base`` with ``override``'s fields (a GenConf or a mapping) on top."""
    if override is None:
        return base
    fields = override.model_dump(exclude_unset=True) if isinstance(override, GenConf) else override
    try:
        return GenConf.model_validate({**base.model_dump(), **dict(fields)})
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid genconf: {exc}") from exc


def _checked_lane(lane: str) -> Lane:
    if lane not in LANE_PRIORITIES:
        raise InvalidRequestError(f"lane must be one of {sorted(LANE_PRIORITIES)}, not {lane!r}")
    return lane  # type: ignore[return-value]
