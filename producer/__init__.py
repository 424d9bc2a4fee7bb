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
from .job import Job, JobStatus
from .models import Model, Models

__all__ = [
    "BackendError",
    "BrokerUnavailableError",
    "Client",
    "ConfigurationError",
    "ContextUnavailableError",
    "ContractError",
    "Envelope",
    "GenConf",
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
    "NoWorkerError",
    "OutputValidationError",
    "PromptTooLongError",
    "Settings",
    "SibylqError",
    "UnknownModelError",
    "UnsupportedTargetError",
    "Usage",
    "get_settings",
]
