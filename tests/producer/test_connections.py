"""Every client reaches Redis the same way (``wire.connections``): TLS verified by default
and by all of them, ACL users that hold only sibylq's keys, and a worker that cannot use its
URL exits non-zero, saying why."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError

from producer import BrokerUnavailableError, Client, Job, Models, OutputValidationError, Settings
from sibylq.status import fleet_status
from tests.conftest import Worker, wait_for
from tests.secure_redis import Certificates, PasswordRedis, TLSRedis, make_certificates
from wire.connections import connect, endpoint
from wire.constants import queue_name, workers_key
from wire.errors import ConfigurationError
from workers.celery_app import create_app

SECURITY_PAGE = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def documented_acl() -> list[str]:
    """The rules of the ``ACL SETUSER sibylq`` line in docs/security.md: the test runs what it
    documents."""
    lines = SECURITY_PAGE.read_text().splitlines()
    (line,) = [line for line in lines if "ACL SETUSER sibylq" in line]
    return line.split(">PASSWORD", 1)[1].split()


REFUSED = (BrokerUnavailableError, OperationalError, redis.ConnectionError)
FAILING_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "string", "pattern": "^x$"}},  # the fake backend writes "fake"
    "required": ["a"],
}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: Certificates) -> Iterator[TLSRedis]:
    """A TLS Redis of the test's own: kombu's process-wide producer pools (``kombu.pools``)
    are keyed by host, port and credentials, not TLS options, so a connection made with a
    trusted CA would be reused by a client of the same URL that should refuse it."""
    with TLSRedis(tmp_path / "tls-redis", certificates) as server:
        yield server


def start_worker(settings: Settings, env: dict[str, str], tmp_path: Path, *, queue: str) -> Worker:
    """A ``sibylq worker fake`` on ``queue``, once its heartbeat shows (read with ``settings``)."""
    worker = Worker(["fake", "-c", "2", "-Q", queue], env, tmp_path / f"{queue}.log")
    results = connect(settings.result_url, settings)
    try:
        wait_for(
            "the worker's heartbeat",
            lambda: (
                worker.process.poll() is not None
                or results.zcount(workers_key(queue), time.time() - 5, "+inf") > 0
            ),
            timeout_s=60,
            detail=worker.log,
        )
    finally:
        results.close()
    assert worker.process.poll() is None, worker.log()
    return worker


def run_jobs(settings: Settings, queue: str) -> None:
    """A success through a blocking wait and an awaited one, and a failure (stored by
    Celery's result backend): every client of a producer and of a worker took part."""
    client = Client(settings)
    try:
        model = Models.create("fake", client=client, queue=queue)
        assert model.call("hello") == "fake output"
        with pytest.raises(OutputValidationError):
            model.json("a", json_schema=FAILING_SCHEMA)

        async def awaited() -> Any:
            try:
                return await model.call_async("hello")
            finally:
                await client.aclose_listener()

        assert asyncio.run(awaited()) == "fake output"
    finally:
        client.close()


# --- TLS


def test_a_trusted_certificate_serves_jobs_end_to_end_over_tls(
    tls_redis: TLSRedis,
    certificates: Certificates,
    worker_env: dict[str, str],
    tmp_path: Path,
) -> None:
    settings = Settings(
        broker_url=tls_redis.url, redis_tls_ca_file=certificates.ca, cache=False,
        heartbeat_interval_s=0.5,
    )  # fmt: skip
    env = {**worker_env, "SIBYLQ_BROKER_URL": tls_redis.url}
    env["SIBYLQ_REDIS_TLS_CA_FILE"] = str(certificates.ca)
    queue = queue_name("fake", "tls")
    worker = start_worker(settings, env, tmp_path, queue=queue)
    try:
        run_jobs(settings, queue)
        assert fleet_status(settings).queues  # `sibylq status` reads over TLS too
    finally:
        worker.stop()


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
def test_a_certificate_the_client_does_not_trust_is_refused_by_every_client(
    tls_redis: TLSRedis,
    certificates: Certificates,
    worker_env: dict[str, str],
    tmp_path: Path,
    trust: str,
) -> None:
    ca = certificates.other_ca if trust == "another CA" else None
    url = tls_redis.url.replace("rediss://", "rediss://:tls-secret-pw@")
    settings = Settings(broker_url=url, redis_tls_ca_file=ca, cache=False, broker_timeout_s=1)
    app = create_app(settings)
    client = Client(settings)
    refusals: dict[str, Callable[[], object]] = {
        "producer, kombu": lambda: Models.create("fake", client=client).call_async("x"),
        "producer, redis-py": client.redis.ping,
        "worker, kombu": lambda: app.connection_for_write().ensure_connection(max_retries=0),
        "worker, Celery result backend": app.backend.client.ping,
        "worker, redis-py": lambda: connect(settings.result_url, settings).ping(),
        "status": lambda: fleet_status(settings),
    }
    try:
        outcomes = {name: _refusal(attempt) for name, attempt in refusals.items()}
        assert all("certificate verify failed" in text for text in outcomes.values()), outcomes
        assert "tls-secret-pw" not in str(outcomes)
        with pytest.raises(BrokerUnavailableError):
            _await_with_listener(client)  # the asyncio listener's connections
    finally:
        client.close()
        app.close()

    env = {**worker_env, "SIBYLQ_BROKER_URL": url}
    if ca is not None:
        env["SIBYLQ_REDIS_TLS_CA_FILE"] = str(ca)
    worker = Worker(["fake"], env, tmp_path / "worker.log")
    try:
        assert worker.process.wait(timeout=60) != 0
    finally:
        worker.stop()
    assert "certificate verify failed" in worker.log()
    assert "SIBYLQ_REDIS_TLS_CA_FILE" in worker.log()
    assert "tls-secret-pw" not in worker.log()


def test_a_server_that_asks_for_a_client_certificate_gets_the_configured_one(
    certificates: Certificates, tmp_path: Path
) -> None:
    with TLSRedis(tmp_path / "redis", certificates, client_certificates=True) as server:
        settings = Settings(
            broker_url=server.url, redis_tls_ca_file=certificates.ca,
            redis_tls_cert_file=certificates.client_cert,
            redis_tls_key_file=certificates.client_key, cache=False,
        )  # fmt: skip
        app = create_app(settings)
        client = Client(settings)
        try:
            assert client.redis.ping()
            client.celery.connection_for_write().ensure_connection(max_retries=0)
            assert app.backend.client.ping()
            no_cert = {"redis_tls_cert_file": None, "redis_tls_key_file": None}
            with pytest.raises(redis.ConnectionError):
                connect(server.url, settings.model_copy(update=no_cert)).ping()
        finally:
            client.close()
            app.close()


def _refusal(attempt: Callable[[], object]) -> str:
    """Why ``attempt`` failed to connect (or that it connected)."""
    try:
        attempt()
    except REFUSED as exc:
        return str(exc)
    return "connected"


def _await_with_listener(client: Client) -> None:
    """Wait for a job through the asyncio listener (its own redis-py connections)."""

    async def wait() -> None:
        try:
            await Job.from_id("no-such-job", client=client, model="fake").result(timeout=30)
        finally:
            await client.aclose_listener()

    asyncio.run(wait())


def test_the_url_says_how_to_verify_and_nothing_else_does() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0")
    assert endpoint("redis://h:6379/0?foo=1", settings).ssl_options() == {}
    default = endpoint("rediss://h:6379/0", settings).ssl_options()
    assert default == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    off = endpoint("rediss://h/0?ssl_cert_reqs=CERT_NONE&foo=1", settings)
    assert off.url == "rediss://h/0?foo=1"  # no client reads the TLS query its own way
    assert off.ssl_options() == {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
    for bad in (
        "http://h/0",
        "redis://h/0?ssl_cert_reqs=required",
        "rediss://h/0?ssl_cert_reqs=maybe",
        "rediss://h/0?ssl_ca_certs=/no/such/ca.pem",
    ):
        with pytest.raises(ConfigurationError):
            endpoint(bad, settings)


@pytest.mark.parametrize(
    ("url", "ca_file"),
    [
        ("http://127.0.0.1:6379/0", ""),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", ""),
        ("rediss://127.0.0.1:6379/0", "/no/such/ca.pem"),
    ],
    ids=["bad scheme", "bad ssl_cert_reqs", "missing CA file"],
)
def test_a_worker_given_a_url_it_cannot_use_exits_non_zero(
    url: str, ca_file: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**worker_env, "SIBYLQ_BROKER_URL": url}
    if ca_file:
        env["SIBYLQ_REDIS_TLS_CA_FILE"] = ca_file
    worker = Worker(["fake"], env, tmp_path / "w.log")
    try:
        assert worker.process.wait(timeout=60) != 0
    finally:
        worker.stop()
    assert "sibylq: error:" in worker.log()
    assert "Traceback" not in worker.log()
    if ca_file:
        assert f"SIBYLQ_REDIS_TLS_CA_FILE {ca_file!r} is not a file" in worker.log()


# --- ACL


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    """A Redis whose default user has a password, with the README's ACL user ``sibylq``."""
    with PasswordRedis(tmp_path_factory.mktemp("acl-redis"), "admin-password") as server:
        admin = server.admin()
        rules = documented_acl()
        admin.execute_command("ACL", "SETUSER", "sibylq", "on", ">sibylq-password", *rules)
        admin.close()
        yield server


def test_a_producer_and_a_worker_under_the_documented_acl_run_jobs_end_to_end(
    acl_redis: PasswordRedis, worker_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"redis://sibylq:sibylq-password@127.0.0.1:{acl_redis.port}/0"
    settings = Settings(broker_url=url, cache=False, heartbeat_interval_s=0.5)
    queue = queue_name("fake", "acl")
    worker = start_worker(settings, {**worker_env, "SIBYLQ_BROKER_URL": url}, tmp_path, queue=queue)
    try:
        run_jobs(settings, queue)
        assert fleet_status(settings).queues
    finally:
        worker.stop()
    assert "NOPERM" not in worker.log() and "no permissions" not in worker.log()
    user = connect(url, settings)
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get("someone-elses-key")  # the ACL does restrict the user
    user.close()
