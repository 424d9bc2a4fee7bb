"""deploy/k8s: every core object valid against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), the KEDA objects checked
structurally (their CRDs are not in those schemas), and the references between objects:
Secret keys, Services, scale targets, and queue names computed the way sibylq computes them."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv
import pytest
import yaml

from wire.modelref import parse_model_ref

from .helpers import DEPLOY, longest_job_s

K8S = DEPLOY / "k8s"
#: The Kubernetes version whose schemas the manifests are checked against: an old release
#: still offered by the large clouds; the manifests use nothing newer.
K8S_VERSION = "1.29"
KEDA_API = "keda.sh/v1alpha1"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
NAMESPACE = "sibylq"
SCALED_OBJECT_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
REDIS_TRIGGER_FIELDS = {
    "address",
    "host",
    "port",
    "databaseIndex",
    "listName",
    "listLength",
    "activationListLength",
    "enableTLS",
    "unsafeSsl",
}

Doc = dict[str, Any]


def manifest_files() -> list[Path]:
    """What `kubectl apply -f deploy/k8s/` and `-f deploy/k8s/keda/` apply, plus the Secret
    template (named .example so that kubectl skips it)."""
    files = sorted(K8S.glob("*.yaml")) + sorted((K8S / "keda").glob("*.yaml"))
    return [*files, K8S / "secret.yaml.example"]


def load_all() -> list[tuple[Path, Doc]]:
    return [
        (path, doc)
        for path in manifest_files()
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


DOCS = load_all()


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def of_kind(kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def worker_container(deployment: Doc) -> Doc:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def served_queue(deployment: Doc) -> str:
    """The queue ``sibylq worker MODEL [-Q QUEUE]`` consumes, from the container's args."""
    args = worker_container(deployment)["args"]
    assert args[0] == "worker", args
    for flag in ("-Q", "--queue"):
        if flag in args:
            return str(args[args.index(flag) + 1])
    return parse_model_ref(args[1], any_api_model=True).queue


def secret_key_refs(node: Any) -> list[Doc]:
    """Every ``secretKeyRef`` anywhere in ``node``."""
    if isinstance(node, dict):
        found = [node["secretKeyRef"]] if "secretKeyRef" in node else []
        return found + [ref for value in node.values() for ref in secret_key_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in secret_key_refs(item)]
    return []


def env_of(container: Doc) -> list[Doc]:
    return list(container.get("env", []))


# --- every object is valid


def test_the_manifests_hold_every_piece() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds.count("Deployment") == 3 and kinds.count("ScaledObject") == 3
    assert {"Namespace", "Secret", "StatefulSet", "Service", "TriggerAuthentication"} <= set(kinds)
    assert all(path.exists() for path in manifest_files())


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[f"{p.name}:{ident(d)}" for p, d in DOCS])
def test_every_object_validates(doc: Doc) -> None:
    if doc["apiVersion"] == KEDA_API and doc["kind"] in KEDA_KINDS:
        # Not a core kind: kubernetes-validate has no schema for it (its CLI only warns and
        # passes). Make that explicit here, and check the object in the KEDA tests below.
        with pytest.raises(kv.SchemaNotFoundError):
            kv.validate(doc, K8S_VERSION, strict=True)
        return
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.SchemaNotFoundError as exc:  # a kind that would otherwise go unchecked
        pytest.fail(f"{ident(doc)}: {exc.message}")
    except kv.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{ident(doc)}: {path}: {exc.message}")


def test_the_validator_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(of_kind("Deployment")["worker-openai"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 660
    with pytest.raises(kv.ValidationError, match="terminationGracePeriod"):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_no_other_kind_escapes_validation() -> None:
    for _, doc in DOCS:
        if doc["apiVersion"].startswith("keda.sh/"):
            assert (doc["apiVersion"], doc["kind"]) in {(KEDA_API, k) for k in KEDA_KINDS}


def test_everything_lives_in_the_sibylq_namespace() -> None:
    assert NAMESPACE in of_kind("Namespace")
    for _, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, ident(doc)


# --- secrets and Redis


def test_every_secret_reference_names_a_key_of_the_secret_template() -> None:
    [secret] = of_kind("Secret").values()
    refs = secret_key_refs([doc for _, doc in DOCS])
    assert len(refs) >= 5
    assert {ref["name"] for ref in refs} == {secret["metadata"]["name"]}
    assert {ref["key"] for ref in refs} <= set(secret["stringData"])
    assert all(re.search("REPLACE", value, re.I) for value in secret["stringData"].values())


def test_redis_is_durable_never_evicts_and_needs_the_password() -> None:
    redis = of_kind("StatefulSet")["redis"]
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert container["image"].split(":")[:2] == ["redis", "7"]
    assert re.search(r"--appendonly yes\b", args)
    assert re.search(r"--maxmemory-policy noeviction\b", args)
    assert "--requirepass $(REDIS_PASSWORD)" in args
    assert [e["name"] for e in env_of(container)] == ["REDIS_PASSWORD"]
    assert env_of(container)[0]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = [c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]]
    assert mounts == {"data": "/data"} and claims == ["data"]
    service = of_kind("Service")["redis"]
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert redis["spec"]["serviceName"] in of_kind("Service")


# --- worker pools


@pytest.mark.parametrize("name", sorted(of_kind("Deployment")))
def test_a_worker_pool_reaches_redis_and_finishes_its_jobs(name: str) -> None:
    deployment = of_kind("Deployment")[name]
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= longest_job_s()
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = worker_container(deployment)
    names = [e["name"] for e in env_of(container)]
    broker = next(e["value"] for e in env_of(container) if e["name"] == "SIBYLQ_BROKER_URL")
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    assert broker == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    assert names.index("REDIS_PASSWORD") < names.index("SIBYLQ_BROKER_URL")
    assert "redis" in of_kind("Service")
    # Ready while its heartbeat is in Redis; no liveness probe restarts busy workers.
    assert container["readinessProbe"]["exec"]["command"] == [
        "sibylq-healthcheck",
        *container["args"][1:2],
    ]
    assert "livenessProbe" not in container


def test_the_remote_api_pool_gets_its_key_from_the_secret() -> None:
    container = worker_container(of_kind("Deployment")["worker-openai"])
    assert served_queue(of_kind("Deployment")["worker-openai"]) == "sibylq.openai"
    env = {e["name"]: e for e in env_of(container)}
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "openai-api-key"
    assert "value" in env["OPENAI_BASE_URL"]


def test_the_gpu_pool_gets_a_gpu_node_and_offloads_every_layer() -> None:
    deployment = of_kind("Deployment")["worker-llama-gpu"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    container = worker_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda" in container["image"]
    env = {e["name"]: e.get("value") for e in env_of(container)}
    assert env["SIBYLQ_LLAMA_N_GPU_LAYERS"] == "-1"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[env["SIBYLQ_MODELS_DIR"]]]["persistentVolumeClaim"]["claimName"]
    assert claim in of_kind("PersistentVolumeClaim")


def test_the_cpu_pool_runs_the_bundled_model_one_job_per_pod() -> None:
    deployment = of_kind("Deployment")["worker-llama-cpu"]
    container = worker_container(deployment)
    assert served_queue(deployment) == "sibylq.llamacpp.smollm2"
    assert "-c" not in container["args"] and "--concurrency" not in container["args"]
    env = {e["name"]: e.get("value") for e in env_of(container)}
    assert env["SIBYLQ_LLAMA_N_THREADS"] == container["resources"]["limits"]["cpu"]


# --- KEDA


def scaled_objects() -> dict[str, Doc]:
    return of_kind("ScaledObject")


@pytest.mark.parametrize("name", sorted(scaled_objects()))
def test_a_scaled_object_scales_an_existing_pool_on_its_queue(name: str) -> None:
    scaled = scaled_objects()[name]
    assert scaled["apiVersion"] == KEDA_API
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_FIELDS, set(spec) - SCALED_OBJECT_FIELDS
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    deployment = of_kind("Deployment")[target["name"]]
    # A Deployment that KEDA scales must not pin replicas: re-applying it would reset them.
    assert "replicas" not in deployment["spec"]
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[field], int) and spec[field] >= 0, field
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert set(metadata) <= REDIS_TRIGGER_FIELDS, set(metadata) - REDIS_TRIGGER_FIELDS
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA wants strings"
    assert metadata["listName"] == served_queue(deployment)
    assert int(metadata["listLength"]) > 0 and int(metadata["activationListLength"]) >= 0
    assert metadata["databaseIndex"] == "0"  # the /0 of SIBYLQ_BROKER_URL
    # KEDA runs in its own namespace: the Service's full name.
    assert metadata["address"] == f"redis.{NAMESPACE}.svc.cluster.local:6379"
    assert trigger["authenticationRef"]["name"] in of_kind("TriggerAuthentication")


@pytest.mark.parametrize("name", sorted(scaled_objects()))
def test_scaling_in_waits_longer_than_the_longest_job(name: str) -> None:
    """LLEN counts waiting jobs only: an empty queue says nothing about running ones. Pods
    leave only after the queue stayed empty a full job's length, and then finish their jobs."""
    spec = scaled_objects()[name]["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= longest_job_s()
    if spec["minReplicaCount"] == 0:
        assert spec["cooldownPeriod"] >= longest_job_s()
    # KEDA hands `behavior` to the HPA it creates: check it against the HPA's own schema.
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": max(1, spec["minReplicaCount"]),
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kv.validate(hpa, K8S_VERSION, strict=True)


def test_every_pool_has_a_scaled_object() -> None:
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects().values()}
    assert targets == set(of_kind("Deployment"))


def test_keda_reads_the_redis_password_from_the_secret() -> None:
    [auth] = of_kind("TriggerAuthentication").values()
    assert auth["apiVersion"] == KEDA_API
    assert set(auth["spec"]) == {"secretTargetRef"}
    [ref] = auth["spec"]["secretTargetRef"]
    [secret] = of_kind("Secret").values()
    assert ref == {
        "parameter": "password",
        "name": secret["metadata"]["name"],
        "key": "redis-password",
    }
    assert ref["key"] in secret["stringData"]
