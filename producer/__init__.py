"""sibylq's producer side: everything a caller imports. It never imports llama_cpp or openai."""

from wire.contract import Envelope, GenConf, JobKind, JobSpec, Message, ModelFacts, Usage
from wire.errors import (
    BackendError,
    BrokerUnavailableError,
    ConfigurationError,
    ContextUnavailableError,
    ContractError,
    InvalidRequestError,
    JobCancelledError,
    JobFailedError,
    JobTimeLimitError,
    JobTimeoutError,
    NoWorkerError,
    OutputValidationError,
    PromptTooLongError,
    SibylqError,
    UnknownModelError,
    UnsupportedTargetError,
)
from wire.settings import Settings, get_settings

from .client import Client
from .genout import GenOut, GenRes
from .job import Job, JobStatus
from .models import Model, Models
from .thread import Msg, Thread

__all__ = [
    "BackendError",
    "BrokerUnavailableError",
    "Client",
    "ConfigurationError",
    "ContextUnavailableError",
    "ContractError",
    "Envelope",
    "GenConf",
    "GenOut",
    "GenRes",
    "InvalidRequestError",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "JobKind",
    "JobSpec",
    "JobStatus",
    "JobTimeLimitError",
    "JobTimeoutError",
    "Message",
    "Model",
    "ModelFacts",
    "Models",
    "Msg",
    "NoWorkerError",
    "OutputValidationError",
    "PromptTooLongError",
    "Settings",
    "SibylqError",
    "Thread",
    "UnknownModelError",
    "UnsupportedTargetError",
    "Usage",
    "get_settings",
]
