"""The long-lived ways the bot runs: ``run`` (the ingress, with workers) and ``worker`` (a worker only).

- ``run``: the ingress over Socket Mode (or HTTP with ``--http``) and, by default, a worker in the same
  process: everything in one, as the README's first command promises. ``--workers N`` starts N worker
  processes instead and restarts any that dies; ``--workers 0`` runs the ingress alone.
- ``worker``: a worker only, for deployments that scale ingress and workers apart.

Each serves ``/healthz``, ``/readyz`` and ``/metrics``: on the HTTP port in HTTP mode, else on
``--metrics-port`` when given (worker processes started by ``run --workers N`` get the ports after it).
Stopping (SIGTERM), the ingress stops taking requests first, then workers finish what they are doing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack

from bot.ingress import SocketModeIngress, bolt_app, serve_http
from bot.observability import ReadinessCheck, serve_health
from bot.places import Places
from bot.services import Services
from bot.settings import secret_value
from bot.worker import SHUTDOWN_GRACE_SECONDS, Worker

log = logging.getLogger(__name__)

RESTART_DELAY_SECONDS = 1.0


# A reply's objects (tasks, futures, requests, responses) live for the whole reply, across awaits. At
# the default threshold of 700 allocations the youngest generation is collected many times per reply, and
# each pass finds most of them alive, promotes them, and the older generations walk them again. Timed with
# gc.callbacks in a worker of the bench's scenario 9 (1,000 replies at once): 0.5 ms of collection per
# reply at 700, 0.08 at 20,000; its longest pause (34 ms) stays under the full collections it saves (52).
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Take what start-up built (modules, clients, settings: about 150,000 objects) out of the garbage
    collector's full passes, which otherwise walk all of it and stall every reply in flight for 36-62
    ms each in the bench (bench/RESULTS.md); and collect the youngest generation less often. What
    start-up built lives as long as the process anyway; its garbage is collected first, or it would be
    kept for good. Once per process, when it is ready."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)


def _worker(services: Services) -> Worker:
    slack = services.require_slack()
    return Worker(
        slack.queue,
        services.responder(slack.adapter, files=slack.files, pane=slack.pane, shortcut_slack=slack.adapter),
        services.history,
        slack.forgetting,
        concurrency=services.settings.worker_concurrency,
        places=Places(*services.settings.places, services.settings.allow_dms, slack.adapter.channel_name),
    )


def _redis_reachable(services: Services) -> ReadinessCheck:
    async def ping() -> bool:
        return bool(await services.redis.ping())

    return ping


def _as_check(test: Callable[[], bool]) -> ReadinessCheck:
    async def check() -> bool:
        return test()

    return check


async def run(
    services: Services,
    *,
    http: bool,
    host: str,
    port: int,
    workers: int | None,
    metrics_port: int | None,
    stop: asyncio.Event,
    environ: Mapping[str, str] = {},
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """The ingress, with a worker in this process (``workers`` None) or ``workers`` worker processes
    (given ``environ``, this process's environment), until ``stop`` is set; ``on_ready`` is called once
    it serves."""
    settings = services.settings
    checks: dict[str, ReadinessCheck] = {"redis": _redis_reachable(services)}
    background: list[asyncio.Task[None]] = []
    worker_stop = asyncio.Event()
    async with AsyncExitStack() as ingress:
        app = bolt_app(services)
        if http:
            server = await serve_http(
                app, checks, host=host, port=port, signing_secret=secret_value(settings.slack_signing_secret)
            )
            ingress.push_async_callback(server.cleanup)
        else:
            socket = SocketModeIngress(app, secret_value(settings.slack_app_token))
            checks["slack"] = socket.connected
            if metrics_port is not None:  # alive (and saying it is not ready) while it connects
                ingress.push_async_callback(
                    (await serve_health(checks, host=host, port=metrics_port)).cleanup
                )
            await socket.start()
            ingress.push_async_callback(socket.close)
        if workers is None:
            worker = _worker(services)
            checks["worker"] = _as_check(worker.consuming)
            background.append(asyncio.create_task(worker.run(worker_stop)))
        elif workers > 0:
            # The workers read the same settings and share this process's Redis (perhaps the embedded one).
            env = {**environ, "REDIS_URL": services.redis_url}
            supervisor = Supervisor(workers, env=env, metrics_port=metrics_port)
            checks["workers"] = _as_check(supervisor.all_running)
            background.append(asyncio.create_task(supervisor.run(worker_stop)))
        on_ready()
        log.info("ready")
        try:
            await stop.wait()
        finally:
            await ingress.aclose()  # the ingress stops taking requests first ...
            worker_stop.set()  # ... then workers finish what they are doing
            await asyncio.gather(*background)


async def run_worker(
    services: Services,
    *,
    host: str,
    metrics_port: int | None,
    stop: asyncio.Event,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """A worker only, until ``stop`` is set; ``on_ready`` is called once it serves."""
    async with AsyncExitStack() as stack:
        worker = _worker(services)
        if metrics_port is not None:
            checks = {"redis": _redis_reachable(services), "worker": _as_check(worker.consuming)}
            health = await serve_health(checks, host=host, port=metrics_port)
            stack.push_async_callback(health.cleanup)
        on_ready()
        log.info("worker ready")
        await worker.run(stop)


class Supervisor:
    """Keeps ``count`` worker processes (``python -m bot worker``) running, restarting any that dies."""

    def __init__(self, count: int, *, env: Mapping[str, str], metrics_port: int | None) -> None:
        self._count = count
        self._env = dict(env)
        self._metrics_port = metrics_port
        self.processes: dict[int, asyncio.subprocess.Process] = {}

    def all_running(self) -> bool:
        return len(self.processes) == self._count and all(
            p.returncode is None for p in self.processes.values()
        )

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._keep(number, stop) for number in range(self._count)))

    async def _keep(self, number: int, stop: asyncio.Event) -> None:
        args = [sys.executable, "-m", "bot", "worker"]
        if self._metrics_port is not None:
            args += ["--metrics-port", str(self._metrics_port + 1 + number)]
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                process = await asyncio.create_subprocess_exec(*args, env=self._env)
                self.processes[number] = process
                log.info("started worker %d (pid %d)", number, process.pid)
                exited = asyncio.create_task(process.wait())
                await asyncio.wait({exited, stopping}, return_when="FIRST_COMPLETED")
                if stop.is_set():
                    await _terminate(process, exited)
                    return
                log.warning("worker %d exited with %s; starting it again", number, process.returncode)
                await asyncio.wait({stopping}, timeout=RESTART_DELAY_SECONDS)
        finally:
            stopping.cancel()


async def _terminate(process: asyncio.subprocess.Process, exited: Awaitable[int]) -> None:
    """SIGTERM, the grace period for its jobs, then SIGKILL."""
    if process.returncode is None:
        process.terminate()
    try:
        await asyncio.wait_for(exited, SHUTDOWN_GRACE_SECONDS + 5)
    except TimeoutError:
        process.kill()
        await process.wait()
