"""The deployment examples match the code: every command parses, every probe asks a path the process
serves on the port it serves it, services route to the ports containers listen on, images are pinned,
and every process gets longer to stop than a worker takes to drain its answers."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from bot.__main__ import _parser
from bot.ingress import EVENTS_PATH
from bot.observability import health_routes
from bot.worker import SHUTDOWN_GRACE_SECONDS

KUBERNETES = Path("deploy/kubernetes")
# A tag with a patch version (python:3.11.11-slim-bookworm, redis:7.2.5-alpine): a rebuild gets the same.
PINNED_TAG = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+([-.\w]*)$")


def served_paths() -> set[str]:
    app = web.Application()
    health_routes(app, {})
    return {route.resource.canonical for route in app.router.routes() if route.resource is not None}


def served_port(command: list[str]) -> int:
    """The port a bot command serves its probes on: the HTTP port with --http, else --metrics-port."""
    assert command[0] == "slack-gpt-bot"
    args = _parser().parse_args(command[1:])
    if getattr(args, "http", False):
        return int(args.port)
    assert args.metrics_port is not None, f"{command} serves no probes: give it --metrics-port"
    return int(args.metrics_port)


def seconds(duration: str) -> float:
    """A Compose duration ("45s", "1m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts is not None and duration, f"unexpected duration {duration!r}"
    minutes, secs = (int(part or 0) for part in parts.groups())
    return minutes * 60.0 + secs


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", Path("Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context: the last pattern matching the path
    or a directory above it decides, a ``!`` pattern taking it back in. ``**/`` is any depth, as for
    Docker; fnmatch's ``*`` also crosses ``/``, which Docker's does not (none of these patterns needs it)."""
    parts = path.split("/")
    above = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # "bot", "bot/__pycache__", ...
    ignored = False
    for line in Path(".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, g) for p in above for g in (pattern, pattern.removeprefix("**/"))):
            ignored = not keep
    return ignored


def documents() -> list[dict[str, Any]]:
    """Every resource the kustomization applies."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = sorted(path.name for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    return [doc for name in files for doc in yaml.safe_load_all((KUBERNETES / name).read_text())]


def test_kubernetes_deployments_probe_what_their_commands_serve() -> None:
    deployments = [doc for doc in documents() if doc["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"slack-gpt-bot-ingress", "slack-gpt-bot-worker"}
    commands = {}
    for deployment in deployments:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        port = served_port(container["command"])
        commands[deployment["metadata"]["name"]] = _parser().parse_args(container["command"][1:])
        assert [p["containerPort"] for p in container["ports"]] == [port]
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": port}
            assert path in served_paths()
        refs = {ref.get("configMapRef", ref.get("secretRef", {}))["name"] for ref in container["envFrom"]}
        assert refs == {"slack-gpt-bot"}
    # Ingress and workers scale apart: the ingress runs no worker, the worker no ingress.
    ingress, worker = commands["slack-gpt-bot-ingress"], commands["slack-gpt-bot-worker"]
    assert (ingress.command, ingress.http, ingress.workers) == ("run", True, 0)
    assert worker.command == "worker"


def test_kubernetes_service_and_ingress_route_to_the_events_api() -> None:
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents()}
    service = docs[("Service", "slack-gpt-bot-ingress")]
    deployment = docs[("Deployment", "slack-gpt-bot-ingress")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == served_port(container["command"])
    (rule,) = docs[("Ingress", "slack-gpt-bot")]["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == EVENTS_PATH
    assert path["backend"]["service"] == {"name": "slack-gpt-bot-ingress", "port": {"number": port["port"]}}
    config = docs[("ConfigMap", "slack-gpt-bot")]["data"]
    assert config["REDIS_URL"].startswith("redis://")  # an external Redis, shared by every pod


def test_docker_compose_runs_a_scalable_worker_beside_the_ingress() -> None:
    compose = yaml.safe_load(Path("docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("ingress", "worker"):
        command = services[name]["command"]
        port = served_port(command)
        (url,) = re.findall(
            r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(services[name]["healthcheck"]["test"])
        )
        assert (int(url[0]), url[1]) == (port, "/readyz")
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert _parser().parse_args(services["ingress"]["command"][1:]).workers == 0
    assert "replicas" not in services["worker"].get("deploy", {})  # scaled with --scale worker=N


def test_docker_compose_starts_the_bot_once_redis_is_healthy_and_lets_workers_drain() -> None:
    services = yaml.safe_load(Path("docker-compose.yml").read_text())["services"]
    redis = services["redis"]
    assert PINNED_TAG.match(redis["image"]), f"pin the Redis image to a patch version: {redis['image']}"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("ingress", "worker"):
        service = services[name]
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert seconds(service["stop_grace_period"]) > SHUTDOWN_GRACE_SECONDS
    # --scale worker=N: nothing that exists once per host.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]


def test_kubernetes_gives_pods_longer_to_stop_than_a_worker_drains() -> None:
    for deployment in (doc for doc in documents() if doc["kind"] == "Deployment"):
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > SHUTDOWN_GRACE_SECONDS, deployment["metadata"]["name"]


def test_the_dockerfile_pins_its_base_caches_dependencies_and_runs_as_a_user() -> None:
    instructions = dockerfile()
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert bases and all(PINNED_TAG.match(base) for base in bases), f"pin the base image: {bases}"
    # The dependencies are installed before the code is copied, so a code change reuses their layer;
    # the bot itself is then installed without touching them.
    ops = [(op, args) for op, args in instructions if op in ("COPY", "RUN")]
    copy_code = next(i for i, (op, args) in enumerate(ops) if op == "COPY" and args.split()[0] == "bot")
    install_deps = next(i for i, (op, args) in enumerate(ops) if op == "RUN" and "pip install -r" in args)
    assert install_deps < copy_code
    assert any("pip install --no-deps ." in args for op, args in ops[copy_code:] if op == "RUN")
    (user,) = [args for op, args in instructions if op == "USER"]
    assert user not in ("root", "0")
    exposed = {int(port) for op, args in instructions if op == "EXPOSE" for port in args.split()}
    assert exposed == {3000, 9100}
    # What the processes serve, in Kubernetes and in Compose, is exposed.
    for deployment in (doc for doc in documents() if doc["kind"] == "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert served_port(container["command"]) in exposed
    compose = yaml.safe_load(Path("docker-compose.yml").read_text())["services"]
    assert {served_port(compose[name]["command"]) for name in ("ingress", "worker")} <= exposed


def test_the_build_context_keeps_secrets_and_local_state_out_and_the_sources_in() -> None:
    for path in (
        ".env",
        ".venv/bin/python",
        ".venv-ci/lib/site.py",
        "data/redis.db",
        ".git/HEAD",
        "bot/__pycache__/history.cpython-311.pyc",
        ".pytest_cache/README.md",
        "tests/conftest.py",
        "bench/results.json",
        "docs/architecture.md",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker build"
    copied = [
        source
        for op, args in dockerfile()
        if op == "COPY"
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    ]
    assert {"pyproject.toml", "README.md", "bot"} <= set(copied)
    for source in [*copied, "bot/__init__.py", "bot/history.py"]:
        assert not dockerignored(source), f"the Dockerfile copies {source}, which .dockerignore leaves out"
