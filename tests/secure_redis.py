"""Real Redis servers that demand something of their clients: TLS with a certificate signed by
a CA made for the test (with ``openssl``), and ACL users."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from embedded.redis_server import RedisServer


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    #: A CA that signed nothing this server presents.
    other_ca: Path
    #: A client certificate the CA signed, for servers that ask for one.
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate it signs for 127.0.0.1 and localhost, and a second CA."""
    if shutil.which("openssl") is None:
        pytest.fail("these tests make their certificates with openssl: install it")
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        subject = f"/CN=sibylq test {name}"
        _openssl(directory, f"req -x509 -new -out {name}.pem -days 2", f"{name}.key", subject)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(directory, f"req -new -out {name}.csr", f"{name}.key", f"/CN={name}")
        _openssl(
            directory,
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
            f"-out {name}.pem -days 2 -extfile san.cnf",
        )
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        other_ca=directory / "other-ca.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


def _openssl(directory: Path, command: str, key: str = "", subject: str = "") -> None:
    """``openssl command``, with a new P-256 key written to ``key`` and ``subject``."""
    args = command.split()
    if key:
        args += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        args += ["-keyout", key, "-subj", subject]
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


class TLSRedis(RedisServer):
    """``redis-server`` accepting TLS only, on its port; with ``client_certificates``, only
    from clients presenting a certificate its CA signed."""

    def __init__(
        self, directory: Path, certificates: Certificates, *, client_certificates: bool = False
    ) -> None:
        super().__init__(directory)
        self.certificates = certificates
        self.client_certificates = client_certificates

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        plain = super().command()
        port_at = plain.index("--port")
        return [*plain[:port_at], "--port", "0", *plain[port_at + 2 :],
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.certificates.server_cert),
                "--tls-key-file", str(self.certificates.server_key),
                "--tls-ca-cert-file", str(self.certificates.ca),
                "--tls-auth-clients", "yes" if self.client_certificates else "no"]  # fmt: skip

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(
            port=self.port, ssl=True, ssl_ca_certs=str(self.certificates.ca),
            ssl_certfile=str(self.certificates.client_cert),
            ssl_keyfile=str(self.certificates.client_key), socket_connect_timeout=0.5,
        )  # fmt: skip
        _ping_until_ready(client, self, timeout_s)


class PasswordRedis(RedisServer):
    """``redis-server`` with ``requirepass``: the default user needs ``password``."""

    def __init__(self, directory: Path, password: str) -> None:
        super().__init__(directory)
        self.password = password

    def command(self) -> list[str]:
        return [*super().command(), "--requirepass", self.password]

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        _ping_until_ready(client, self, timeout_s)


def _ping_until_ready(client: redis.Redis, server: RedisServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                log = server.directory / "redis.log"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
    finally:
        client.close()
