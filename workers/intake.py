"""Every queue entry a worker pops is screened before kombu and Celery decode it.

A sibylq queue holds kombu's Redis envelope (JSON: ``properties`` with a delivery tag,
``headers``, a base64 ``body``) around a Celery protocol-2 message whose body is
``[args, kwargs, embed]``, exactly as ``producer.client`` and ``workers.parking`` send it. Any
other entry would stop the worker, or worse: kombu cannot parse an entry that is not JSON or
lacks its properties, and raises in the consumer's event loop ("Unrecoverable error", the
entry is lost); Celery raises on a body that is not ``[args, kwargs, embed]`` (the warm
shutdown puts it back: every worker that pops it dies), restarts its consumer on a message
without an id (requeueing every running job), and drops undecodable bodies and refused content
types without a word to whoever waits (celery/celery#4308; kombu has no hook before it decodes
a popped entry, celery/kombu#2421). ``workers.broker`` calls ``admit`` on every entry BRPOP
returns, before kombu sees it.

An entry ``screen`` refuses is *set aside*: kept as a dead letter with its bytes
(``wire.deadletters``: ``sibylq failed`` lists it, ``sibylq retry`` refuses it), and when it
names a job id, that job's result becomes a ``ContractError`` FAILURE unless it already has a
final one: whoever waits on it gets an error instead of waiting forever. The worker goes on.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import redis

from wire import deadletters
from wire.constants import KOMBU_PRIORITY_SEP, TASK_NAME
from wire.contract import Failure
from wire.deadletters import DeadLetter, RawMessage
from wire.errors import ContractError
from wire.settings import Settings, get_settings

from .delivery import store_failure
from .execute import Progress
from .store import result_redis
from .task import count_failure

log = logging.getLogger(__name__)

#: The Celery headers sibylq's messages may carry, each a string or null.
_TEXT_HEADERS = ("id", "task", "root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr")
#: Task options sibylq never sends (ETA jobs would run twice under Redis' visibility timeout;
#: callbacks would let a message make the worker send others).
_ABSENT_EMBED = ("callbacks", "errbacks", "chain", "chord")
_MAX_ID_LENGTH = 255
#: How deep a message's arrays and objects may nest (its body, headers and properties). A
#: prefork worker's main process pickles a job's arguments, headers and properties to hand
#: them to a pool process, and pickling recurses: near 500 levels it raises RecursionError
#: there ("Unrecoverable error"; the warm shutdown puts the message back for the next
#: worker); pydantic cannot serialize a job past ~250 levels either. Jobs sibylq sends nest
#: far less.
MAX_NESTING = 200
_LOGGED_BYTES = 2048
#: Celery's remote-control replies (``celery inspect``, a plain ``celery worker``'s mingle)
#: come back on ``<oid>.reply.celery.pidbox`` lists: kombu messages, not jobs
#: (``screen_reply``).
_REPLY_QUEUE_SUFFIX = ".reply.celery.pidbox"


@dataclass(frozen=True)
class Refusal:
    """Why an entry cannot run, and the job it names (None: it names none)."""

    reason: str
    job_id: str | None


class MalformedError(ValueError):
    """An entry is not a sibylq job message; the argument says why."""


def screen(entry: bytes | str) -> Refusal | None:
    """None when ``entry`` is a message sibylq's workers can run, else why not."""
    message = _json_object(entry)
    if isinstance(message, Refusal):
        return message
    try:
        # Celery hands the headers and properties, as they are, to a prefork pool process.
        _check_nesting(entry, message, "the headers or properties nest")
        _check_envelope(message)
        _check_headers(message.get("headers"))
        _check_body(message["body"])
    except MalformedError as exc:
        return Refusal(str(exc), _job_id(message))
    return None


def screen_reply(entry: bytes | str) -> Refusal | None:
    """None when ``entry`` is a kombu message whose body is JSON: what Celery's
    remote-control replies (``celery inspect``, a plain worker's mingle) are. They are no
    jobs, so only their shape is checked, enough for kombu to decode them."""
    message = _json_object(entry)
    if isinstance(message, Refusal):
        return message
    try:
        _check_envelope(message)
        json.loads(base64.b64decode(message["body"], validate=True))
    except MalformedError as exc:
        return Refusal(str(exc), None)
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError too
        return Refusal("the reply's body is not base64-encoded JSON", None)
    return None


def _json_object(entry: bytes | str) -> dict[str, Any] | Refusal:
    """The entry decoded, or why it cannot be: not UTF-8 JSON, or not an object."""
    try:
        message = json.loads(entry)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return Refusal("the entry is not UTF-8 JSON", None)
    if not isinstance(message, dict):
        return Refusal("the entry is not a JSON object", None)
    return message


def _check_envelope(message: dict[str, Any]) -> None:
    properties = message.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        raise MalformedError("the entry has no properties with a delivery tag")
    if properties.get("body_encoding") != "base64":
        raise MalformedError("the body is not base64-encoded")
    delivery = properties.get("delivery_info")
    if not isinstance(delivery, dict) or not _strings(delivery, ("exchange", "routing_key")):
        # kombu reads both to acknowledge the entry or put it back
        raise MalformedError("the delivery info has no exchange and routing key")
    if not _strings(properties, ("correlation_id", "reply_to"), optional=True):
        raise MalformedError("the correlation id and reply-to must be strings")
    if not isinstance(properties.get("priority", 0), int | None):
        raise MalformedError("the priority is not an integer")
    if message.get("content-type") != "application/json":
        raise MalformedError(
            f"content type {message.get('content-type')!r} refused: workers accept JSON only"
        )
    if str(message.get("content-encoding", "utf-8")).lower() != "utf-8":
        raise MalformedError("the body is not UTF-8")
    if not isinstance(message.get("body"), str):
        raise MalformedError("the entry has no body")


def _check_headers(headers: Any) -> None:
    if not isinstance(headers, dict):
        raise MalformedError("the message has no headers")
    if headers.get("task") != TASK_NAME:
        raise MalformedError(f"task {headers.get('task')!r} is not {TASK_NAME!r}")
    if _valid_id(headers.get("id")) is None:
        raise MalformedError("the message names no job id")
    if not _strings(headers, _TEXT_HEADERS, optional=True):
        raise MalformedError(f"headers {', '.join(_TEXT_HEADERS)} must be strings")
    if headers.get("eta") is not None or headers.get("expires") is not None:
        raise MalformedError("sibylq jobs have no ETA and no expiry")
    limits = headers.get("timelimit")
    if limits is not None and not _time_limits(limits):
        raise MalformedError("the time limits are not [soft, hard] seconds")


def _check_body(body: str) -> None:
    try:
        decoded = base64.b64decode(body, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise MalformedError("the body is not base64 of UTF-8 text") from None
    try:
        content = json.loads(decoded)
    except (ValueError, RecursionError):
        raise MalformedError("the body is not JSON") from None
    _check_nesting(decoded, content, "the body nests")
    if not (isinstance(content, list) and len(content) == 3):
        raise MalformedError("the body is not Celery's [args, kwargs, embed]")
    args, kwargs, embed = content
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict)):
        raise MalformedError("the arguments are not one job object")
    if not (isinstance(kwargs, dict) and set(kwargs) <= {"carry"}):
        raise MalformedError("the keyword arguments are not sibylq's")
    try:
        Progress.decode(kwargs.get("carry"))
    except ContractError:
        raise MalformedError("the progress carried from earlier attempts is not valid") from None
    if not isinstance(embed, dict) or any(embed.get(name) for name in _ABSENT_EMBED):
        raise MalformedError("the message asks for callbacks, a chain or a chord")


def _strings(fields: dict[str, Any], names: tuple[str, ...], optional: bool = False) -> bool:
    """Whether each of ``names`` in ``fields`` is a string (or absent or null, if optional)."""
    allowed = (str, type(None)) if optional else (str,)
    return all(isinstance(fields.get(name), allowed) for name in names)


def _check_nesting(text: bytes | str, value: Any, what: str) -> None:
    """``value`` (decoded from ``text``) nests at most ``MAX_NESTING`` levels; ``what`` names
    it, with its verb."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    # Nesting needs as many brackets: counting them is cheap, walking the value is not.
    brackets = text.count("[") + text.count("{")
    if brackets > MAX_NESTING and _nests_deeper(value, MAX_NESTING):
        raise MalformedError(f"{what} more than {MAX_NESTING} levels deep")


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` (a list or dict) nests lists and dicts more than ``limit`` levels deep
    (without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _time_limits(limits: Any) -> bool:
    return (
        isinstance(limits, list)
        and len(limits) == 2
        and all(isinstance(limit, int | float | None) for limit in limits)
    )


def _job_id(message: dict[str, Any]) -> str | None:
    """The job a broken message names: its id header, else its correlation id (Celery sets
    both to the task id)."""
    headers, properties = message.get("headers"), message.get("properties")
    found = _valid_id(headers.get("id")) if isinstance(headers, dict) else None
    if found is None and isinstance(properties, dict):
        found = _valid_id(properties.get("correlation_id"))
    return found


def _valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_ID_LENGTH else None


def admit(list_key: bytes | str, entry: bytes | str, settings: Settings | None = None) -> bool:
    """True if the entry popped from ``list_key`` may go on to kombu; else it is set aside."""
    replies = _text(list_key).partition(KOMBU_PRIORITY_SEP)[0].endswith(_REPLY_QUEUE_SUFFIX)
    refusal = screen_reply(entry) if replies else screen(entry)
    if refusal is None:
        return True
    raw = entry.encode() if isinstance(entry, str) else entry
    set_aside(_text(list_key), raw, refusal, settings or get_settings())
    return False


def set_aside(list_key: str, raw: bytes, refusal: Refusal, settings: Settings) -> None:
    """Keep a refused entry as a dead letter and fail the job it names (see the module doc)."""
    queue, _, step = list_key.partition(KOMBU_PRIORITY_SEP)
    named = f"job {refusal.job_id}" if refusal.job_id else "a message naming no job"
    failure = Failure(
        type="ContractError",
        message=(
            f"{named} on queue {queue} could not be decoded: {refusal.reason}. It was set aside "
            "as a dead letter (`sibylq failed --json` shows it as received)"
        ),
    )
    letter = DeadLetter.undecodable(
        job_id=refusal.job_id,
        queue=queue,
        priority=int(step) if step.isdigit() else 0,
        message=RawMessage.of(raw, refusal.reason),
        failure=failure,
        worker=socket.gethostname(),
    )
    log.error("%s (dead letter %s)", failure.message, letter.job_id)
    try:
        deadletters.record(result_redis(settings), letter, settings.dead_letters_expire_s)
        if refusal.job_id is not None:
            store_failure(refusal.job_id, failure, settings)
        count_failure(settings, queue)
    except redis.RedisError as exc:
        # Popped, and not kept: the log is all that is left of it.
        shown = base64.b64encode(raw[:_LOGGED_BYTES]).decode()
        log.error("cannot keep the refused entry (%s); its first bytes, base64: %s", exc, shown)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
