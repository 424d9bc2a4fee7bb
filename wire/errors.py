"""sibylq's exceptions: one base class, a small tree.

::

    SibylqError
    ├── ConfigurationError          bad settings or model options
    │   ├── UnknownModelError       unknown provider, or a model name that resolves to nothing
    │   └── MissingApiKeyError      an API worker started without its provider's key
    ├── UnsupportedTargetError      (also TypeError) a type sibylq cannot express as JSON schema
    ├── InvalidRequestError         (also ValueError) empty query, bad labels, bad JSON schema...
    ├── ContractError               a payload that does not match the job contract
    ├── BrokerUnavailableError      Redis could not be reached to enqueue or to wait
    ├── NoWorkerError               no live worker serves the job's queue
    ├── JobTimeoutError             (also TimeoutError) the wait timed out; the job may still finish
    ├── JobCancelledError           the job was cancelled (revoked)
    └── JobFailedError              the job failed on the worker
        ├── OutputValidationError   the model's output is not valid for the requested type
        │                           (truncated at max_tokens, bad JSON, wrong shape)
        ├── PromptTooLongError      the prompt does not fit the model's context
        ├── ContextUnavailableError the worker's model has less context than the job asks for
        └── BackendError            the model backend failed (HTTP error, load failure...)
            └── JobTimeLimitError   the job ran past SIBYLQ_JOB_TIME_LIMIT_S on its worker

Everything raised before a job is enqueued (configuration, target type, request) is raised in
the caller's process, so nothing is sent. Failures on a worker travel back as strings
(``remote_type``, ``remote_message``): exceptions are never pickled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .contract import Usage


class SibylqError(Exception):
    """Base class of every error sibylq raises."""


class ConfigurationError(SibylqError):
    """Settings or model options are invalid."""


class UnknownModelError(ConfigurationError):
    """The model reference names an unknown provider or a model that cannot be found."""


class MissingApiKeyError(ConfigurationError):
    """A worker for a hosted API (``groq``, ``anthropic``...) was started without its key."""

    def __init__(self, provider: str, variable: str) -> None:
        self.provider = provider
        self.variable = variable
        super().__init__(
            f"{variable} is not set: a {provider} worker sends it to {provider}'s API with "
            f"every request; export {variable}=<your key> and start the worker again"
        )


class UnsupportedTargetError(SibylqError, TypeError):
    """The requested output type cannot be expressed as a JSON schema."""


class InvalidRequestError(SibylqError, ValueError):
    """The request itself is invalid (empty query, bad labels, invalid JSON schema...)."""


class ContractError(SibylqError):
    """A payload does not match the job contract. ``data`` keeps what was received."""

    def __init__(self, message: str, data: object) -> None:
        self.data = data
        super().__init__(message)


class BrokerUnavailableError(SibylqError):
    """Redis (broker or result store) could not be reached."""


class NoWorkerError(SibylqError):
    """No live worker serves the queue the job was sent to. The job stays queued."""

    def __init__(self, queue: str, model: str, waited_s: float) -> None:
        self.queue = queue
        self.model = model
        self.waited_s = waited_s
        super().__init__(
            f"no live worker serves queue {queue!r} (waited {waited_s:.1f}s); the job stays "
            f"queued. Start one with: sibylq worker {model}"
            f"  (or: celery -A workers worker -Q {queue})"
        )


class JobTimeoutError(SibylqError, TimeoutError):
    """The result did not arrive in time. The job itself may still complete."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        super().__init__(
            f"job {job_id} gave no result within {timeout_s:g}s; it may still complete: "
            f"re-attach with Job.from_id({job_id!r})"
        )


class JobCancelledError(SibylqError):
    """The job was cancelled before it produced a result."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was cancelled")


class JobFailedError(SibylqError):
    """The job failed on the worker. The remote exception comes back as strings."""

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        remote_type: str = "",
        raw_text: str | None = None,
        finish_reason: str | None = None,
        raw_outputs: tuple[str, ...] = (),
        usage: Usage | None = None,
        attempts: int = 0,
    ) -> None:
        self.job_id = job_id
        self.remote_type = remote_type or type(self).__name__
        self.remote_message = message
        self.raw_text = raw_text
        self.finish_reason = finish_reason
        #: What the model wrote at every attempt (validation re-asks included), oldest first.
        self.raw_outputs = raw_outputs or ((raw_text,) if raw_text is not None else ())
        #: Tokens the failed job used, over all its attempts.
        self.usage = usage
        #: Model calls the job made (validation re-asks and retried requests included).
        self.attempts = attempts
        super().__init__(message)


class OutputValidationError(JobFailedError):
    """The model's output is not valid for the requested type.

    ``raw_text`` holds what the model wrote and ``finish_reason`` why it stopped
    (``"length"`` when the output was cut at ``max_tokens``).
    """


class PromptTooLongError(JobFailedError):
    """The prompt does not fit the model's context window."""


class ContextUnavailableError(JobFailedError):
    """The job asks for more context (``Models.create(ctx_len=...)``) than the worker's model
    has: start the worker with a larger context (``SIBYLQ_LLAMA_N_CTX``) or ask for less."""


class BackendError(JobFailedError):
    """The model backend failed: an HTTP error from the API, a model that will not load..."""


class JobTimeLimitError(BackendError):
    """The job ran longer than ``SIBYLQ_JOB_TIME_LIMIT_S`` on its worker and was stopped. Final:
    unlike ``JobTimeoutError`` (a wait that ran out), the job will not run again."""


#: Remote failure types the worker reports, mapped back to local classes.
REMOTE_FAILURES: dict[str, type[JobFailedError]] = {
    cls.__name__: cls
    for cls in (
        OutputValidationError,
        PromptTooLongError,
        ContextUnavailableError,
        BackendError,
        JobTimeLimitError,
    )
}
