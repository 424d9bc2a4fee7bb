"""How every sibylq client reaches Redis: one URL check and one TLS policy.

sibylq talks to Redis through kombu (the broker), Celery's result backend (workers) and
redis-py, sync and asyncio (results, heartbeats, status...). Their TLS defaults differ: kombu
checks no certificate for a bare ``rediss://`` URL, Celery refuses one without
``ssl_cert_reqs``, redis-py verifies. So none keeps its own: each is given the options made
here from the URL and the settings.

- ``redis://`` is plain TCP. ``rediss://`` is TLS, and the server's certificate and host name
  are verified against ``SIBYLQ_REDIS_TLS_CA_FILE`` (the system's CAs when unset).
  ``SIBYLQ_REDIS_TLS_CERT_FILE`` and ``SIBYLQ_REDIS_TLS_KEY_FILE`` give a client certificate,
  for servers that ask for one.
- The URL's standard query parameters override those settings for that URL:
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, and ``ssl_cert_reqs`` (``required``,
  ``optional`` or ``none``; ``none`` is the only way to turn verification off).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from wire.errors import ConfigurationError
from wire.redact import redact_url
from wire.settings import Settings

SCHEMES = ("redis", "rediss")

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_QUERY = ("ssl_cert_reqs", *_FILE_OPTIONS)
_SETTINGS = {
    "ssl_ca_certs": "SIBYLQ_REDIS_TLS_CA_FILE",
    "ssl_certfile": "SIBYLQ_REDIS_TLS_CERT_FILE",
    "ssl_keyfile": "SIBYLQ_REDIS_TLS_KEY_FILE",
}


@dataclass(frozen=True)
class Endpoint:
    """A Redis URL (without its TLS query parameters) and the TLS options for every client."""

    url: str
    tls: tuple[tuple[str, Any], ...] | None = None

    def ssl_options(self) -> dict[str, Any]:
        """The TLS options, as redis-py's ``SSLConnection``, kombu's ``broker_use_ssl`` and
        Celery's ``redis_backend_use_ssl`` all take them; empty for plain TCP."""
        return dict(self.tls or ())


def plain_endpoint(url: str) -> Endpoint:
    """``url`` as it is, with no TLS options: for callers that checked it themselves."""
    return Endpoint(url)


def endpoint(url: str, settings: Settings) -> Endpoint:
    """``url`` checked, with the TLS policy applied; raises ConfigurationError. Cached: a
    worker asks for its result Redis several times per job."""
    files = (settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file)
    return _endpoint(url, *files)


@lru_cache(maxsize=64)
def _endpoint(
    url: str, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(
            f"cannot use {redact_url(url)!r} for Redis: the URL must start with redis:// "
            "(plain TCP) or rediss:// (TLS)"
        )
    _check_parses(parts)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {key: value for key, value in query if key in _TLS_QUERY}
    plain = urlunsplit(parts._replace(query=urlencode([kv for kv in query if kv[0] not in given])))
    if parts.scheme == "redis":
        if given:
            raise ConfigurationError(
                f"{redact_url(url)!r} sets {', '.join(sorted(given))} on a plain redis:// URL: "
                "use rediss:// for TLS"
            )
        return Endpoint(plain)
    configured = {"ssl_ca_certs": ca_file, "ssl_certfile": cert_file, "ssl_keyfile": key_file}
    return Endpoint(plain, tuple(sorted(_tls_options(given, configured).items())))


def _check_parses(parts: SplitResult) -> None:
    """A password with ``/``, ``#``, ``?`` or ``@`` not percent-encoded ends the host part
    early: what follows (the password's rest) would be read as a port, a database or a host,
    and shown in errors. Such a URL is refused without a word of it."""
    try:
        port_parses = parts.port is None or parts.port > 0
    except ValueError:
        port_parses = False
    if not port_parses or not parts.hostname or "@" in parts.path + parts.query + parts.fragment:
        raise ConfigurationError(
            f"cannot use this {parts.scheme}:// URL for Redis: its host, port or database does "
            "not parse (the URL is not shown: it may hold a password). Percent-encode a "
            "password's / # ? @ and : (as %2F %23 %3F %40 %3A)"
        )


def _tls_options(given: dict[str, str], configured: dict[str, Path | None]) -> dict[str, Any]:
    reqs_name = given.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs_name not in _CERT_REQS:
        raise ConfigurationError(
            f"ssl_cert_reqs={given['ssl_cert_reqs']!r}: use required, optional or none"
        )
    options: dict[str, Any] = {
        "ssl_cert_reqs": _CERT_REQS[reqs_name],
        "ssl_check_hostname": reqs_name != "none",
    }
    for key in _FILE_OPTIONS:
        path = given.get(key) or configured[key]
        if path is not None:
            if not Path(path).is_file():
                where = f"the URL's {key}" if key in given else _SETTINGS[key]
                raise ConfigurationError(f"Redis TLS: {where} {str(path)!r} is not a file")
            options[key] = str(path)
    return options


def connect(url: str, settings: Settings, **kwargs: Any) -> redis.Redis:
    """A redis-py client of ``url``, with sibylq's TLS policy."""
    target = endpoint(url, settings)
    return redis.Redis.from_url(target.url, **target.ssl_options(), **kwargs)


def check_usable(url: str, settings: Settings) -> None:
    """Connect to ``url`` once, to fail at start rather than retry forever: raises
    ConfigurationError when Redis refuses this client for good (a wrong password or user, an
    ACL without PING, a certificate this client does not trust). An unreachable Redis passes:
    workers wait for it, as they wait out an outage."""
    client = connect(url, settings, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        raise ConfigurationError(f"Redis at {redact_url(url)} refused this client: {exc}") from exc
    except redis.ConnectionError as exc:
        if _tls_failure(exc):
            raise ConfigurationError(
                f"TLS with Redis at {redact_url(url)} failed: {exc}. Check the URL's scheme and "
                "SIBYLQ_REDIS_TLS_CA_FILE (the CA that signed the server's certificate)"
            ) from exc
    finally:
        client.close()


def _tls_failure(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
