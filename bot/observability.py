"""What an operator sees of a running bot: Prometheus metrics, health endpoints and the log format.

- Metrics (prometheus-client, the default registry): defined here once, counted where things happen
  (the ingress, the worker, the Slack and model adapters, usage). ``/metrics`` serves them.
- Health: ``/healthz`` says the process is alive; ``/readyz`` runs the process's own readiness checks
  (Redis reachable, Slack connected, the worker consuming: whichever parts the process has) and
  answers 503 with the failing ones. ``health_routes`` adds all three to an aiohttp app: Bolt's in
  HTTP mode, or the small one ``serve_health`` runs on ``--metrics-port``.
- Logging: ``LOG_FORMAT=json`` writes one JSON object per line; every line carries the thread key and
  job id of the job it was logged for (a context variable the worker sets), never message content at
  INFO. The HTTP clients' per-request INFO lines are quiet unless ``LOG_LEVEL=DEBUG``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pythonjsonlogger.json import JsonFormatter

from bot.errors import StartupError

log = logging.getLogger(__name__)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

EVENTS_RECEIVED = Counter("sgb_events_received", "Slack message events received by the ingress")
EVENTS_ACKED = Counter("sgb_events_acked", "Slack message events acknowledged (queued, or not for the bot)")
EVENTS_DUPLICATE = Counter("sgb_events_duplicate", "Slack message events that were queued before")
EVENTS_REFUSED = Counter(
    "sgb_events_refused", "Slack message events left unacknowledged because Redis could not take them"
)
JOBS_QUEUED = Counter("sgb_jobs_queued", "Jobs put on the queue")
JOBS_IN_FLIGHT = Gauge("sgb_jobs_in_flight", "Jobs this process is working on")
JOBS_WAITING = Gauge("sgb_jobs_waiting", "Jobs in the queue that no worker has taken yet (seen by a worker)")
JOBS_DONE = Counter("sgb_jobs_done", "Jobs finished and acknowledged")
JOBS_FAILED = Counter("sgb_jobs_failed", "Job attempts that failed and will be tried again")
JOBS_RECLAIMED = Counter("sgb_jobs_reclaimed", "Jobs taken over from a worker that went silent")
JOBS_DEAD_LETTERED = Counter("sgb_jobs_dead_lettered", "Jobs that failed every attempt")
QUEUE_WAIT = Histogram("sgb_queue_wait_seconds", "From queued to a worker starting on it", buckets=_LATENCY)
FIRST_TOKEN = Histogram(
    "sgb_time_to_first_token_seconds", "From the model request to its first token", buckets=_LATENCY
)
REPLY_DURATION = Histogram(
    "sgb_reply_duration_seconds", "From a worker starting on a job to the job done", buckets=_LATENCY
)
MODEL_ERRORS = Counter("sgb_model_errors", "Model endpoint failures, by kind", ["kind"])
SLACK_ERRORS = Counter("sgb_slack_api_errors", "Slack Web API calls that failed, by method", ["method"])
TOKENS = Counter("sgb_tokens", "Tokens used by replies, by kind (prompt, completion)", ["kind"])
BUDGET_REFUSALS = Counter("sgb_budget_refusals", "Replies declined because a budget was used up")

# The thread key and job id of the job being worked on, for every log line written meanwhile.
_job_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("job", default=None)


@contextmanager
def job_context(thread: str, job: str) -> Iterator[None]:
    """Tag every log line written inside with the thread key and the job id."""
    token = _job_context.set({"thread_key": thread, "job_id": job})
    try:
        yield
    finally:
        _job_context.reset(token)


class _JobFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_job_context.get() or {}).items():
            setattr(record, name, value)
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Log at ``level`` as ``text`` or ``json`` (one object a line, with thread and job when known)."""
    handler = logging.StreamHandler()
    handler.addFilter(_JobFields())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One INFO line per HTTP request (the model client's, via httpx) or retry (slack_sdk's) is noise.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("httpx", "httpx2", "openai", "aiohttp.access", "slack_sdk.web", "slack_sdk.http_retry"):
        logging.getLogger(name).setLevel(quiet)


ReadinessCheck = Callable[[], Awaitable[bool]]
READINESS_TIMEOUT_SECONDS = 2.0  # a check that takes longer (Redis retrying a lost connection) fails


def health_routes(app: web.Application, checks: Mapping[str, ReadinessCheck]) -> None:
    """Add ``/healthz``, ``/readyz`` (every check in ``checks`` must pass) and ``/metrics`` to ``app``."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        results = {}
        for name, check in checks.items():
            try:
                async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
                    results[name] = await check()
            except Exception as exc:  # a readiness check reports, it never fails the probe itself
                log.debug("readiness check %s failed: %s", name, type(exc).__name__)
                results[name] = False
        ready = all(results.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": results}, status=200 if ready else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve_health(checks: Mapping[str, ReadinessCheck], *, host: str, port: int) -> web.AppRunner:
    """Serve the health and metrics endpoints on their own port; the caller cleans the runner up."""
    app = web.Application()
    health_routes(app, checks)
    runner = await listen(app, host=host, port=port, option="--metrics-port")
    log.info("serving /healthz, /readyz and /metrics on %s:%d", host, port)
    return runner


async def listen(app: web.Application, *, host: str, port: int, option: str) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; a port that cannot be had is a ``StartupError`` naming ``option``
    (the caller cleans the runner up)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc}): "
            f"free the port or choose another {option}"
        ) from exc
    return runner
