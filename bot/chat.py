"""``slack-gpt-bot chat``: a conversation in the terminal through the same pipeline as Slack.

It opens the same services as the bot (so the history cap, personas, usage and budgets apply alike) and
runs the pipeline directly, without the job queue. It needs no Slack tokens, which makes it the way to
try a persona before installing the app. This module owns the terminal front end:

- The workspace: ``--team``, else the one ``SLACK_BOT_TOKEN`` belongs to (``auth.test``), else
  ``local``; so ``--persona`` and ``--channel`` see the personas made in Slack.
- Where a session lives: one thread per session, in the ``--channel`` id (``terminal`` without one),
  whose ts is ``terminal:<start time>``. Slack's ts are digits only, so a session never mixes with a
  Slack thread, while the channel's persona is resolved and pinned exactly as for a thread there.
- The keyboard: lines are read by a daemon thread, so leaving never waits on a read in progress.
  Ctrl-C at the prompt (or while starting) leaves with exit status 0; Ctrl-C during an answer stops that
  answer only and the conversation goes on.
- The screen: while chatting, log records go to ``DATA_DIR/chat.log`` instead of the terminal; a failure
  shows as one ``[!]`` line, and an endpoint that cannot be reached is named with its URL; every answer
  is followed by what the pipeline recorded of it (counted with tiktoken and marked estimated when the
  endpoint sent no usage).
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import openai

from bot.conversation import Spent
from bot.domain import (
    ChatMessage,
    ChatModel,
    Incoming,
    Job,
    Persona,
    Rated,
    ReplyLog,
    SlackMessage,
    StreamEnd,
    ThreadKey,
    Usage,
)
from bot.errors import BotError, ConfigError, ModelError, SlackError
from bot.services import Services, open_services, slack_client
from bot.settings import Settings, secret_value
from bot.slack import fetch_identity
from bot.usage import micro_usd

log = logging.getLogger(__name__)

LOCAL_TEAM = "local"
TERMINAL_CHANNEL = "terminal"
SESSION_PREFIX = "terminal:"
PROMPT = "you> "
LOG_FILE = "chat.log"
STOPPED = "[stopped]"


class Screen:
    """The terminal's output. It knows whether the cursor is mid-line, so that a note (a failure, an
    interruption, the usage) always starts a line of its own, or completes a line that holds only the
    bot's label."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._mid_line = False
        self._label_only = False

    def write(self, text: str) -> None:
        if not text:
            return
        self._out.write(text)
        self._out.flush()
        self._mid_line = not text.endswith("\n")
        self._label_only = False

    def label(self, speaker: str) -> None:
        """Start a line spoken by ``speaker``."""
        self.end_line()
        self.write(f"{speaker}> ")
        self._label_only = True

    def say(self, text: str) -> None:
        """``text`` as a line of its own, or as the rest of a line that holds only a label."""
        if self._mid_line and not self._label_only:
            self.write("\n")
        self.write(f"{text}\n")

    def end_line(self) -> None:
        if self._mid_line:
            self.write("\n")

    def entered(self) -> None:
        """The person pressed Enter: the terminal echoed the newline, the cursor is at a line start."""
        self._mid_line = self._label_only = False


class TerminalReply:
    """A reply written to the terminal as it streams (implements ``domain.ReplyStream``)."""

    def __init__(self, screen: Screen) -> None:
        self._screen = screen

    async def thinking(self, title: str | None = None) -> None:
        self._screen.label("bot")

    async def append(self, text: str) -> None:
        self._screen.write(text)

    async def finish(self, footnote: str | None = None, rated: Rated | None = None) -> None:
        self._screen.end_line()  # no feedback buttons in a terminal
        if footnote:
            self._screen.say(footnote)

    async def fail(self, message: str) -> None:
        self._screen.say(f"[!] {message}")

    async def notice(self, text: str) -> None:
        self._screen.label("bot")
        self._screen.say(text)


class TerminalPort:
    """Implements ``domain.SlackPort`` for the terminal: plain text in, plain text out."""

    def __init__(self, screen: Screen, name: str) -> None:
        self._screen = screen
        self._name = name

    async def readable(self, team: str, text: str) -> str:
        return text

    async def display_name(self, team: str, user_id: str) -> str:
        return self._name

    async def thread_messages(self, key: ThreadKey) -> list[SlackMessage]:
        return []

    def reply_stream(self, incoming: Incoming, log: ReplyLog) -> TerminalReply:
        return TerminalReply(self._screen)


class EndpointDown(ModelError):
    """The model endpoint could not be reached at all: the pipeline's own sentence, then where the
    endpoint was looked for and what to check (the person at the terminal is the one who can fix it)."""

    def __init__(self, cause: ModelError, where: str) -> None:
        super().__init__(cause.kind, cause.detail)
        self.where = where

    @property
    def user_message(self) -> str:
        return f"{super().user_message} Could not connect to {self.where}."


def endpoint(settings: Settings, client: openai.AsyncOpenAI) -> str:
    """The model endpoint's URL, the setting it comes from, and what to check when it is unreachable."""
    if settings.azure_openai_endpoint:
        return f"{settings.azure_openai_endpoint} (AZURE_OPENAI_ENDPOINT): check that URL and the network"
    if settings.openai_base_url:
        return (
            f"{settings.openai_base_url} (OPENAI_BASE_URL): check that the server is running "
            "and that the host and port are right"
        )
    default = str(client.base_url).rstrip("/")
    return f"{default} (OpenAI's default): check the network and proxy settings, or set OPENAI_BASE_URL"


class NamedEndpoint:
    """A ``ChatModel`` whose connection failures name the endpoint, so that the message says where."""

    def __init__(self, model: ChatModel, where: str) -> None:
        self._model = model
        self._where = where

    def model_for(self, persona: Persona) -> str:
        return self._model.model_for(persona)

    def reply_cap(self, persona: Persona) -> int | None:
        return self._model.reply_cap(persona)

    def sees_images(self, persona: Persona) -> bool:
        return self._model.sees_images(persona)

    async def stream(
        self, messages: Sequence[ChatMessage], persona: Persona, end_user: str = ""
    ) -> AsyncIterator[str | StreamEnd]:
        try:
            async for piece in self._model.stream(messages, persona, end_user):
                yield piece
        except ModelError as exc:
            # Only a connection that never opened (refused, unknown host): a 5xx or a stream cut mid-way
            # is also "unavailable", but there the endpoint was found and its URL is not the problem.
            if exc.kind == "unavailable" and isinstance(exc.__cause__, openai.APIConnectionError):
                raise EndpointDown(exc, self._where) from exc.__cause__
            raise


class Keyboard:
    """Lines typed at the terminal, read by a daemon thread straight from the file descriptor.

    ``asyncio.to_thread(input)`` ran on the loop's executor, which ``asyncio.run`` joins at exit: a read
    still waiting for a line kept the process alive after Ctrl-C. A daemon thread is not joined, and
    ``os.read`` holds no lock of ``sys.stdin`` that the interpreter would wait for when it exits.
    """

    def __init__(self, stdin: TextIO) -> None:
        self._fd = stdin.fileno()
        self.echoes = os.isatty(self._fd)  # a terminal shows what is typed; a file or a pipe does not
        self._loop = asyncio.get_running_loop()
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._read, name="chat-keyboard", daemon=True).start()

    async def line(self) -> str | None:
        """The next line typed, without its line end; None at the end of input."""
        return await self._lines.get()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                data = b""
            # Split before decoding: a character's bytes may arrive in two reads.
            *lines, pending = (pending + data).split(b"\n")
            for raw in lines:
                if not self._put(raw.decode(errors="replace").removesuffix("\r")):
                    return
            if not data:
                if pending:
                    self._put(pending.decode(errors="replace"))
                self._put(None)
                return

    def _put(self, line: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)
        except RuntimeError:  # the conversation is over and its loop closed
            return False
        return True


@contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Log records go to ``path`` meanwhile instead of the terminal, where they would cut into the
    conversation; the conversation shows failures itself."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"DATA_DIR {path.parent} cannot hold the chat log: {exc.strerror}"]) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    before = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = before
        handler.close()


async def workspace(settings: Settings, team: str | None) -> str:
    """``team`` (``--team``), else the workspace ``SLACK_BOT_TOKEN`` belongs to, else ``local``."""
    if team:
        return team
    if secret_value(settings.slack_bot_token):
        return (await fetch_identity(slack_client(settings))).team_id
    return LOCAL_TEAM


class Conversation:
    """One terminal session: start-up, the prompt loop, and what Ctrl-C means at each moment."""

    def __init__(
        self,
        settings: Settings,
        *,
        persona: str | None,
        channel: str | None,
        team: str | None,
        stdin: TextIO,
        out: TextIO,
    ) -> None:
        self._settings = settings
        self._persona = persona
        self._channel = channel or TERMINAL_CHANNEL
        self._team = team
        self._stdin = stdin
        self._screen = Screen(out)
        self._log_path = settings.data_dir / LOG_FILE
        self._session: asyncio.Task[int] | None = None
        self._answer: asyncio.Task[Spent | None] | None = None
        self._leaving = False

    async def run(self) -> int:
        """Converse until end of input, ``/exit`` or Ctrl-C at the prompt; the exit status."""
        loop = asyncio.get_running_loop()
        with logs_to(self._log_path):
            session = asyncio.ensure_future(self._converse())
            self._session = session
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
            try:
                return await session
            except asyncio.CancelledError:
                if not self._leaving:
                    raise  # cancelled from outside, not by Ctrl-C
                self._screen.end_line()
                return 0
            finally:
                loop.remove_signal_handler(signal.SIGINT)

    def _interrupt(self) -> None:
        """Ctrl-C: stop the answer being written, else leave (at the prompt, or while starting)."""
        if self._answer is not None and not self._answer.done():
            # Once only: a second cancel would cut the answer's own clean-up short (its thread lock).
            if not self._answer.cancelling():
                self._answer.cancel()
        elif self._session is not None:
            self._leaving = True
            self._session.cancel()

    async def _converse(self) -> int:
        try:
            team = await workspace(self._settings, self._team)
        except SlackError as exc:
            self._screen.say(
                "[!] Could not ask Slack which workspace SLACK_BOT_TOKEN belongs to "
                f"(auth.test: {exc.error}): pass --team, "
                "or unset SLACK_BOT_TOKEN to chat in the 'local' workspace."
            )
            return 1
        keyboard = Keyboard(self._stdin)
        async with open_services(self._settings, slack=False) as services:
            model = NamedEndpoint(services.model, endpoint(self._settings, services.openai))
            user = getpass.getuser()
            responder = services.responder(TerminalPort(self._screen, user), model)
            thread_ts = f"{SESSION_PREFIX}{time.time():.6f}"
            key = ThreadKey(team, self._channel, thread_ts)
            chosen = await services.personas.resolve(key, self._persona)  # pins the session's persona
            if self._persona and chosen.name != self._persona:
                self._screen.say(f"There is no persona named {self._persona!r} in workspace {team}.")
            self._screen.say(
                f"Chatting as {user} in workspace {team}, channel {self._channel}, with persona "
                f"{chosen.name!r} ({model.model_for(chosen)}). Logs go to {self._log_path}. "
                "/exit or Ctrl-C to leave."
            )
            numbers = itertools.count(1)
            while True:
                self._screen.write(PROMPT)
                line = await keyboard.line()
                if line is None:
                    self._screen.end_line()
                    break
                if keyboard.echoes:
                    self._screen.entered()
                else:
                    # Read from a file or a pipe: show the question, so the output reads as a conversation.
                    self._screen.write(f"{line}\n")
                if line.strip() in ("/exit", "/quit"):
                    break
                if not line.strip():
                    continue
                n = next(numbers)
                # The first message's ts is the thread's, as in Slack; the later ones sort after it.
                ts = thread_ts if n == 1 else f"{thread_ts}{n:06d}"
                job = Job(f"terminal-{n}", Incoming(key, ts, user, line, addressed=True, is_dm=True))
                spent = await self._answer_to(responder.respond(job))
                if spent is not None:  # a refusal or a failure used nothing: no usage line then
                    self._usage_line(services, spent.model, spent.usage)
        return 0

    async def _answer_to(self, respond: Coroutine[Any, Any, Spent | None]) -> Spent | None:
        """Run one answer as a task of its own, so that Ctrl-C can stop it alone; what it used, or None
        when there was no answer (a notice or a failure the pipeline already showed, or Ctrl-C)."""
        answer = asyncio.create_task(respond)
        self._answer = answer
        try:
            return await answer
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the session itself is ending, not just this answer
            self._screen.say(STOPPED)
            return None
        except BotError as exc:
            # Redis failing, say: nothing was answered, but the next question may fare better.
            log.warning("no answer: %s", exc)
            self._screen.say(f"[!] {exc.user_message}")
            return None
        finally:
            self._answer = None

    def _usage_line(self, services: Services, model: str, used: Usage) -> None:
        cost = micro_usd(services.usage.prices, model, used.prompt_tokens, used.completion_tokens) / 1e6
        tokens = f"{used.prompt_tokens} prompt + {used.completion_tokens} completion tokens"
        estimated = " (estimated)" if used.estimated else ""
        self._screen.say(f"[{tokens}{estimated}, about ${cost:.4f}]")


async def chat(
    settings: Settings,
    *,
    persona: str | None,
    channel: str | None,
    team: str | None = None,
    stdin: TextIO = sys.stdin,
    out: TextIO = sys.stdout,
) -> int:
    """Run a terminal conversation until end of input, ``/exit`` or Ctrl-C at the prompt."""
    conversation = Conversation(settings, persona=persona, channel=channel, team=team, stdin=stdin, out=out)
    return await conversation.run()
