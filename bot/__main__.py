"""Command line: ``slack-gpt-bot run [--http --port 3000]`` (also ``python -m bot``).

The only module that touches the process environment: settings are read here, once, and logging is
configured here. Problems the operator must fix (settings, Slack token, Redis) end the process with one
clear message and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from bot.errors import BotError, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slack-gpt-bot", description="A Slack bot for OpenAI-compatible models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="connect to Slack and answer messages")
    run.add_argument(
        "--http", action="store_true", help="serve the Events API over HTTP instead of Socket Mode"
    )
    run.add_argument("--host", default="0.0.0.0", help="address to listen on with --http (default 0.0.0.0)")
    run.add_argument("--port", type=int, default=3000, help="port to listen on with --http (default 3000)")
    return parser


async def _run(args: argparse.Namespace) -> None:
    from bot.app import run
    from bot.settings import load_settings

    settings = load_settings(http=args.http)
    logging.getLogger().setLevel(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, http=args.http, host=args.host, port=args.port, stop=stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slack-gpt-bot`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_run(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BotError as exc:
        print(f"The bot stopped: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
