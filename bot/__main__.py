"""Command line: ``slack-gpt-bot run [--http] [--workers N] | worker | chat | models | check``
(also ``python -m bot``).

The only module that touches the process environment: settings are read here, once, and logging is
configured here. Problems the operator must fix (settings, Slack token, Redis) end the process with one
clear message and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from bot.errors import BotError, ConfigError, StartupError

if TYPE_CHECKING:
    from bot.settings import Serving, Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slack-gpt-bot", description="A Slack bot for OpenAI-compatible models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="connect to Slack and answer messages")
    run.add_argument(
        "--http", action="store_true", help="serve the Events API over HTTP instead of Socket Mode"
    )
    run.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    run.add_argument("--port", type=int, default=3000, help="port to listen on with --http (default 3000)")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="answer in N worker processes started and supervised here (0: queue only); "
        "default: a worker in this process",
    )
    run.add_argument("--metrics-port", type=int, help="serve /healthz, /readyz and /metrics on this port")
    worker = commands.add_parser("worker", help="answer queued messages only (no Slack connection)")
    worker.add_argument("--host", default="0.0.0.0", help="address for --metrics-port (default 0.0.0.0)")
    worker.add_argument("--metrics-port", type=int, help="serve /healthz, /readyz and /metrics on this port")
    commands.add_parser("models", help="list the models the configured endpoint offers")
    chat = commands.add_parser("chat", help="talk to the model in the terminal, through the same pipeline")
    chat.add_argument("--persona", help="a named persona to use")
    chat.add_argument("--channel", help="use the persona of this Slack channel id")
    chat.add_argument(
        "--team",
        metavar="TEAM_ID",
        help="the Slack workspace id (T...) whose personas to use; "
        "default: the one SLACK_BOT_TOKEN belongs to, else 'local'",
    )
    check = commands.add_parser("check", help="verify the whole set-up; exit code 0 only when all pass")
    check.add_argument("--http", action="store_true", help="check for HTTP mode instead of Socket Mode")
    return parser


def _settings(serving: Serving) -> Settings:
    """The settings, read once; and tiktoken told where the bot keeps its encoding files (tiktoken reads
    its cache directory from the environment, and the setting may come from .env)."""
    from bot.settings import load_settings

    settings = load_settings(serving=serving)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(settings.tiktoken_cache_dir)
    return settings


async def _chat(args: argparse.Namespace) -> int:
    from bot.chat import chat

    return await chat(_settings("model"), persona=args.persona, channel=args.channel, team=args.team)


async def _models() -> int:
    from bot.check import models_lines

    for line in await models_lines(_settings("model")):
        print(line)
    return 0


async def _check(args: argparse.Namespace) -> int:
    from bot.check import run_checks

    try:
        settings = _settings("http" if args.http else "socket")
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"FAIL settings: {problem}")
        return 1
    print("ok   settings: every setting is valid")
    results = await run_checks(settings, http=args.http)
    for result in results:
        print(result.line())
    return 0 if all(result.ok for result in results) else 1


async def _serve(args: argparse.Namespace) -> None:
    from bot.observability import configure_logging
    from bot.processes import run, run_worker, tune_garbage_collector
    from bot.services import open_services

    serving: Serving = "worker" if args.command == "worker" else "http" if args.http else "socket"
    if args.command == "run" and args.workers is not None and args.workers < 0:
        raise ConfigError(["--workers must be 0 or more"])
    settings = _settings(serving)
    configure_logging(settings.log_level, settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_services(settings) as services:
        if args.command == "worker":
            await run_worker(
                services,
                host=args.host,
                metrics_port=args.metrics_port,
                stop=stop,
                on_ready=tune_garbage_collector,
            )
            return
        await run(
            services,
            http=args.http,
            host=args.host,
            port=args.port,
            workers=args.workers,
            metrics_port=args.metrics_port,
            stop=stop,
            environ=os.environ,
            on_ready=tune_garbage_collector,  # this process is the bot's alone; the tests run it in theirs
        )


def _run_serving(serving: Coroutine[Any, Any, None]) -> None:
    """Run the bot on uvloop where it is installed (a dependency on Linux and macOS): its event loop
    spends about a tenth less CPU per reply (bench/RESULTS.md). Elsewhere, asyncio's own loop, which
    the in-process tests run on."""
    # slack_sdk checks every call's method against its list of deprecated ones; the bot calls none (the
    # tests' fake Slack knows only current methods), and this is slack_sdk's own switch to skip it.
    os.environ.setdefault("SLACKCLIENT_SKIP_DEPRECATION", "1")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serving)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serving)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slack-gpt-bot`` console script."""
    args = _parser().parse_args(argv)
    # The bot logs its life at INFO; the one-shot commands print their report and only log warnings.
    level = logging.INFO if args.command in ("run", "worker") else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "chat":
            return asyncio.run(_chat(args))
        if args.command == "models":
            return asyncio.run(_models())
        if args.command == "check":
            return asyncio.run(_check(args))
        _run_serving(_serve(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"The bot cannot start: {exc}", file=sys.stderr)
        return 1
    except BotError as exc:
        print(f"The bot stopped: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
