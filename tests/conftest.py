"""Shared test set-up: offline guards, a real Redis, and a harness that runs the real bot against fakes.

Redis is the machine's when ``REDIS_URL`` is set, otherwise a private ``redis-server`` started once per
session. Every test gets its own key prefix and its keys are deleted afterwards. The harness runs
the real Bolt app in Socket Mode with the real slack_sdk and openai clients, pointed at ``FakeSlack`` and
``FakeModel`` on loopback. Network access other than loopback is refused by pytest-socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from bot.jobs import JobQueue
from bot.processes import run, run_worker
from bot.services import Services, open_services
from bot.settings import Settings
from bot.tokens import TiktokenCounter, load_encoding
from tests.fake_model import FakeModel
from tests.fake_slack import BOT_USER_ID, TEAM_ID, FakeSlack
from tests.procs import PrivateRedis, PrivateRedisCluster, clean_env

for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(proxy, None)
# A fresh, empty tiktoken cache: the bot must fill it from the bundled files, never from the network.
os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgb-tiktoken-")


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    """The machine's Redis (``REDIS_URL``) or a private one for the whole session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = PrivateRedis(Path(tempfile.mkdtemp(prefix="sgb-redis-")), appendonly=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    """A real Redis Cluster of three primaries on loopback, for the whole session (started when a test
    first asks for it)."""
    cluster = PrivateRedisCluster(Path(tempfile.mkdtemp(prefix="sgb-cluster-")))
    cluster.start()
    yield cluster
    cluster.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``cluster`` runs twice: on the single server, and on the Redis Cluster."""
    if metafunc.definition.get_closest_marker("cluster"):
        metafunc.parametrize("redis_kind", ["single", "cluster"], indirect=True)


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    """``single`` or ``cluster``: which Redis the test's bot uses."""
    return str(getattr(request, "param", "single"))


@pytest.fixture
def redis_url(redis_kind: str, request: pytest.FixtureRequest) -> str:
    if redis_kind == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("single_redis_url"))


# What redis-py or the cluster says when one command, transaction or script would touch two slots.
CROSS_SLOT = re.compile(r"CROSSSLOT|CrossSlot|same (key )?slot|non local key", re.IGNORECASE)


class _Warnings(logging.Handler):
    """Every WARNING or worse the bot logs in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
async def redis_client(
    redis_url: str, redis_kind: str, prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[redis.Redis]:
    """A client of the test's Redis. On the cluster, the test fails afterwards if any node refused a
    command for touching two slots (``INFO errorstats``) or the bot logged such a refusal (redis-py's
    cluster client refuses a cross-slot transaction or script before it is sent)."""
    cluster: PrivateRedisCluster | None = None
    warnings = _Warnings()
    if redis_kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        client = cast(redis.Redis, RedisCluster.from_url(redis_url, decode_responses=True))
        cluster.reset_errors()
        logging.getLogger().addHandler(warnings)
    else:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        logging.getLogger().removeHandler(warnings)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    if cluster is not None:
        assert cluster.errors().get("CROSSSLOT", 0) == 0, "a command touched two slots"
        assert not [m for m in warnings.messages if CROSS_SLOT.search(m)]


@pytest.fixture(scope="session")
def counter() -> TiktokenCounter:
    """The bot's token counter for o200k_base, loaded offline like the bot does."""
    return TiktokenCounter(load_encoding("o200k_base", Path(os.environ["TIKTOKEN_CACHE_DIR"])))


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


_ts_counter = itertools.count(1)


def next_ts() -> str:
    """A Slack-style message ts, increasing, older than anything the fake Slack posts."""
    return f"1600000000.{next(_ts_counter):06d}"


@dataclass
class Harness:
    """The fakes, the Redis the bot uses, and helpers to run the real bot and talk to it like a user."""

    slack: FakeSlack
    model: FakeModel
    redis: redis.Redis
    redis_url: str
    prefix: str
    data_dir: Path
    cluster: bool = False  # the Redis is a cluster: the bot is told so
    defaults: dict[str, Any] = field(default_factory=dict)

    def env(self, **overrides: str) -> dict[str, str]:
        """A process environment for the bot against the fakes, with ``overrides`` on top."""
        defaults = {
            "SLACK_BOT_TOKEN": "xoxb-test",
            "SLACK_APP_TOKEN": "xapp-test",
            "SLACK_API_URL": self.slack.api_url,
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": self.model.base_url,
            "OPENAI_MAX_RETRIES": "0",
            "REDIS_URL": self.redis_url,
            "REDIS_CLUSTER": "true" if self.cluster else "false",
            "REDIS_PREFIX": self.prefix,
            "SYSTEM_PROMPT": "You are a test bot.",
            "PYTHONPATH": os.getcwd(),
        }
        return clean_env(**(defaults | overrides))

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "slack_bot_token": "xoxb-test",
            "slack_app_token": "xapp-test",
            "slack_signing_secret": "signing-secret",
            "slack_api_url": self.slack.api_url,
            "openai_api_key": "sk-test",
            "openai_base_url": self.model.base_url,
            "openai_max_retries": 0,
            "openai_timeout_seconds": 5,
            "redis_url": self.redis_url,
            "redis_cluster": self.cluster,
            "redis_prefix": self.prefix,
            "data_dir": self.data_dir,
            "system_prompt": "You are a test bot.",
            **self.defaults,
            **overrides,
        }
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    @asynccontextmanager
    async def running(
        self, *, workers: int | None = None, metrics_port: int | None = None, **overrides: Any
    ) -> AsyncIterator[Services]:
        """The real bot connected to the fake Slack over Socket Mode: the ingress and, unless ``workers``
        says otherwise (see ``slack-gpt-bot run --workers``), a worker in the same process."""
        stop = asyncio.Event()
        connections = len(self.slack.calls_to("apps.connections.open"))
        async with open_services(self.settings(**overrides)) as services:
            serving = asyncio.create_task(
                run(
                    services,
                    http=False,
                    host="127.0.0.1",
                    port=0,
                    workers=workers,
                    metrics_port=metrics_port,
                    stop=stop,
                )
            )
            await self.slack.wait_for(
                lambda: len(self.slack.calls_to("apps.connections.open")) > connections or serving.done(),
                what="connect",
            )
            if serving.done():
                await serving  # it failed to start: show why
            try:
                yield services
            finally:
                stop.set()
                await serving

    @asynccontextmanager
    async def worker(self, **overrides: Any) -> AsyncIterator[Services]:
        """A worker alone (``slack-gpt-bot worker``), in this process."""
        stop = asyncio.Event()
        async with open_services(self.settings(**overrides)) as services:
            working = asyncio.create_task(
                run_worker(services, host="127.0.0.1", metrics_port=None, stop=stop)
            )
            try:
                yield services
            finally:
                stop.set()
                await working

    async def say(
        self,
        text: str,
        *,
        channel: str = "C1",
        user: str = "U1",
        thread_ts: str | None = None,
        mention: bool = True,
        event_type: str | None = None,
        event_id: str | None = None,
        ts: str | None = None,
        acked: bool = True,
        files: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """A person posts ``text`` (with ``files``, made with ``slack.add_file``): stored in the fake
        Slack and delivered as an event, acknowledged unless ``acked`` is False (then it is not waited
        for). Returns its ts."""
        ts = ts or self.slack.next_ts()
        if mention:
            text = f"<@{BOT_USER_ID}> {text}"
        is_dm = channel.startswith("D")
        self.slack.add_message(channel, ts=ts, user=user, text=text, thread_ts=thread_ts, files=files)
        if files:
            extra["files"] = files
        event: dict[str, Any] = {
            "type": event_type or ("app_mention" if mention and not is_dm else "message"),
            "user": user,
            "text": text,
            "ts": ts,
            "channel": channel,
            "team": TEAM_ID,
            "event_ts": ts,
            **extra,
        }
        if event["type"] == "message":
            event["channel_type"] = "im" if is_dm else "channel"
            if files:
                event["subtype"] = "file_share"
        if thread_ts:
            event["thread_ts"] = thread_ts
        envelope = await self.slack.send_event(event, event_id=event_id)
        if acked:
            await self.slack.wait_ack(envelope)
        return ts

    def answers(self, channel: str = "C1") -> list[str]:
        """The texts of the bot's messages in a channel, thread by thread, in order."""
        threads = {c.args.get("thread_ts", "") for c in self.slack.calls if c.args.get("channel") == channel}
        return [
            m["text"]
            for thread in sorted(threads - {""})
            for m in self.slack.thread(channel, thread)
            if m.get("user") == BOT_USER_ID
        ]

    async def settled(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until nothing more can happen: every event acknowledged, and no job queued or running
        (a job leaves its stream only when it is done)."""
        await self.slack.wait_for(self.slack.all_acked, timeout, "every event acknowledged")
        deadline = asyncio.get_running_loop().time() + timeout
        while await self.queued():
            assert asyncio.get_running_loop().time() < deadline, "jobs still queued or running"
            await asyncio.sleep(0.01)

    def queue(self) -> JobQueue:
        """The bot's job queue, as a process of its own sees it."""
        return JobQueue(self.redis, prefix=self.prefix, team=TEAM_ID, lease_seconds=10, max_attempts=3)

    async def queued(self) -> int:
        """Jobs in the bot's streams, waiting or being answered (a job leaves its stream when done)."""
        return sum([await self.redis.xlen(key) for key in self.queue().queue_keys])

    def stream_stops(self) -> int:
        """Replies finished so far (each ends with chat.stopStream in native mode)."""
        return len(self.slack.calls_to("chat.stopStream"))

    async def replies_done(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``n`` replies finished (native stop, or a post/update in other modes)."""
        await self.slack.wait_for(lambda: self.stream_stops() >= n, timeout, f"{n} finished replies")


@pytest.fixture
async def harness(
    redis_client: redis.Redis, redis_url: str, redis_kind: str, prefix: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    slack, model = FakeSlack(), FakeModel()
    await slack.start()
    await model.start()
    try:
        yield Harness(
            slack, model, redis_client, redis_url, prefix, tmp_path, cluster=redis_kind == "cluster"
        )
    finally:
        await model.close()
        await slack.close()
