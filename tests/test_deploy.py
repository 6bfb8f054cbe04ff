"""The deployment examples match the code: every command parses, every probe asks a path the process
serves on the port it serves it, and services route to the ports containers listen on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from bot.__main__ import _parser
from bot.ingress import EVENTS_PATH
from bot.observability import health_routes

KUBERNETES = Path("deploy/kubernetes")


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
