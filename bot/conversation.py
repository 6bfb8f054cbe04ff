"""The pipeline: from one job (an accepted Slack message) to an answer streamed into its thread.

``build_context`` is pure: persona + budget + stored history + new question -> the messages to send.
``Responder.respond`` reads top to bottom as the worker's flow in docs/architecture.md: thread lock,
what an earlier attempt of the job already did, resolve the persona, build the context from the
thread's history (read from Slack first when the bot remembers nothing of the thread), check the
budget, store the question, stream the model's answer into Slack, store the answer.
``Responder.respond_to_shortcut`` is the same pipeline for a message shortcut, with the question built
for its kind and nothing stored. It does no I/O of its own; it talks to the protocols in ``domain``,
so its tests use small in-memory fakes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from bot.domain import (
    REPLY_PRIMING_TOKENS,
    UNCOUNTED,
    Attachment,
    BudgetCheck,
    ChannelExcerpt,
    ChatMessage,
    ChatModel,
    FileReader,
    History,
    ImagePart,
    Incoming,
    Job,
    JobProgress,
    PaneContext,
    Persona,
    PersonaSource,
    Rated,
    Recall,
    ReplyLog,
    ReplyStream,
    Role,
    Shortcut,
    ShortcutSlack,
    SlackFile,
    SlackMessage,
    SlackPort,
    StreamEnd,
    Summaries,
    TextPart,
    ThreadHold,
    TokenCounter,
    Turn,
    Usage,
    UsageLedger,
)
from bot.errors import BotError, ModelError, SlackError

log = logging.getLogger(__name__)

EMPTY_MENTION_HINT = "Hi! Ask me something after the mention, e.g. _@me how do I rotate a Redis password?_"
REPLY_TOKENS_ESTIMATE = 1000  # a reply's size for budget reservations when the persona sets no maximum
LENGTH_NOTE = "_(The answer was cut off at the reply token limit.)_"
UNKNOWN_PERSONA = "_(There is no persona named {name} here, so I answer as {persona}.)_"
EMPTY_ANSWER = "_(The model returned an empty answer.)_"
UNREADABLE_FILES = "_(I couldn't read {files}.)_"
PICTURES_UNSEEN = "_(This model doesn't see images, so I didn't look at {files}.)_"
PICTURES_REFUSED = "_(The model at this endpoint refused images, so I answered from the text alone.)_"
# A mention in a thread the bot has never seen reads the files of the newest earlier messages, up to this
# many; older ones are named in the history but not downloaded (they would rarely fit the budget).
THREAD_FILES_READ = 10
TITLE_CHARS = 80
TOO_FAR_BACK = "too far back in the thread"
# A long thread: what the context carries of its older turns, and the footnote the first time.
SUMMARY_MESSAGE = "Earlier in this thread, summarized: {summary}"
SUMMARIZING_NOTE = (
    "_(This thread is getting long: from here on I keep a summary of its older messages, and its first "
    "message word for word.)_"
)
CHANNEL_READ = "_(I read the last {count} messages of <#{channel}>, from {oldest} to {newest} UTC.)_"
# The message shortcuts: what the model is asked, and the line that says who asked, in the thread.
ASKED_ABOUT = "_{asker} asked about {author}'s message: “{question}”_"
SUMMARY_FOR = "_A summary of this thread ({count} messages), asked for by {asker}.{left_out}_"
SUMMARY_LEFT_OUT = " I read its first message and the newest {kept}; the {count} between did not fit."
SUMMARIZE = (
    "Summarize this Slack thread for {asker}: what it is about, what was decided, the open questions, and "
    "who is doing what. Be brief, use Markdown, and write in the language of the thread."
)
TRANSLATE = (
    "You translate Slack messages. Translate the user's message into {language}. Answer with the "
    "translation only, keeping names, mentions, links, code and formatting as they are. If the message is "
    "in {language} already, say so in one short sentence."
)
SHORTCUT_REFUSED = (
    "Slack won't let me {what} here ({error}). If I'm not in this channel, invite me and try again."
)


class Spent(NamedTuple):
    """What an answer used: the model that gave it, its tokens, and whether older turns were trimmed."""

    model: str
    usage: Usage
    trimmed: int


@dataclass(frozen=True, slots=True)
class Context:
    """What one model call sends, and what trimming did to get there: the system prompt, the kept turns
    (oldest first), the question (shortened when it alone would not fit), and whether images go too.
    ``picture_urls`` (file id -> data URL) is filled in once the kept images are fetched."""

    system_prompt: str
    turns: tuple[Turn, ...]
    question: Turn
    question_content: str
    estimated_tokens: int
    trimmed: bool
    pictures: bool = False  # the model sees the images of the kept turns
    question_pictures: bool = False  # ... and those of the question (dropped when it alone is too big)
    picture_urls: Mapping[str, str] = field(default_factory=dict)
    first: Turn | None = None  # the thread's first message, kept before everything else
    summary: str = ""  # the summary of the turns between the first and the kept ones
    left_out: range = range(0)  # the positions of the turns neither summarized nor kept
    noted: bool = True  # the thread was told before that its older messages are summarized

    @property
    def kept_turns(self) -> int:
        return len(self.turns)

    @property
    def wanted_pictures(self) -> list[Attachment]:
        """The images the model is to see."""
        if not self.pictures:
            return []
        found = [a for turn in self._history for a in turn.pictures]
        return found + list(self.question.pictures if self.question_pictures else ())

    @property
    def _history(self) -> tuple[Turn, ...]:
        return (self.first, *self.turns) if self.first else self.turns

    @property
    def billed_beyond_context(self) -> int:
        """Tokens the API bills for the images beyond what they take of the context."""
        return sum(a.picture.billed - a.picture.tokens for a in self.wanted_pictures if a.picture)

    @property
    def messages(self) -> list[ChatMessage]:
        """The request's messages."""
        messages: list[ChatMessage] = [{"role": "system", "content": self.system_prompt}]
        if self.first is not None:
            messages.append(
                self._message(self.first.role, self.first.content, self.first.pictures, self.pictures)
            )
        if self.summary:
            messages.append({"role": "system", "content": SUMMARY_MESSAGE.format(summary=self.summary)})
        messages += [self._message(t.role, t.content, t.pictures, self.pictures) for t in self.turns]
        messages.append(
            self._message("user", self.question_content, self.question.pictures, self.question_pictures)
        )
        return messages

    def _message(self, role: Role, text: str, pictures: Sequence[Attachment], shown: bool) -> ChatMessage:
        if not (shown and pictures):
            return {"role": role, "content": text}
        parts: list[TextPart | ImagePart] = [{"type": "text", "text": text}]
        for picture in pictures:
            url = self.picture_urls.get(picture.file.id)
            if url:
                parts.append({"type": "image_url", "image_url": {"url": url, "detail": "high"}})
            else:
                parts.append(
                    {"type": "text", "text": f"(The image {picture.file.name} is no longer available.)"}
                )
        return {"role": role, "content": parts}


_PERSONA_REQUEST = re.compile(r"^\s*persona:([A-Za-z0-9_-]{1,40})\s*")


def split_persona_request(text: str) -> tuple[str | None, str]:
    """``persona:NAME rest`` -> (NAME, rest): a thread's first message may choose its persona."""
    match = _PERSONA_REQUEST.match(text)
    return (match.group(1), text[match.end() :]) if match else (None, text)


def safety_margin(budget: int) -> int:
    """Tokens held back from the budget, since the cookbook formula is an estimate."""
    return max(16, budget // 100)


def build_context(
    system_prompt: str,
    history: Sequence[Turn],
    question: Turn,
    budget: int,
    counter: TokenCounter,
    *,
    pictures: bool = False,
    first: Turn | None = None,
    summary: str = "",
    summary_tokens: int = 0,
) -> Context:
    """System prompt + the thread's first message + the summary of older turns + as many of the newest
    turns as fit + the question, within ``budget`` tokens.

    ``history`` is newest first and carries each turn's stored token count (images included), as do
    ``first`` and ``summary_tokens``, so nothing here re-encodes them; without ``pictures`` (the model
    sees no images) a turn's images cost nothing. The system prompt and the question are always kept; if
    they alone exceed the budget, the question's images are left out, then both are truncated at a token
    boundary (the question first, the system prompt to no less than half). The first message comes next
    when it fits in half of what is left, then the summary when it fits, then the newest turns.
    """

    def cost(turn: Turn) -> int:
        return turn.tokens if pictures else turn.tokens - turn.picture_tokens

    available = budget - safety_margin(budget) - REPLY_PRIMING_TOKENS
    system_tokens = counter.message_tokens("system", system_prompt)
    question_content, question_tokens = question.content, cost(question)
    question_pictures = pictures and bool(question.pictures)
    if system_tokens + question_tokens > available:
        if question_pictures:
            question_pictures, question_tokens = False, question_tokens - question.picture_tokens
        if system_tokens + question_tokens > available and system_tokens > available // 2:
            system_prompt = _shrink(
                counter, "system", system_prompt, max(available // 2, available - question_tokens)
            )
            system_tokens = counter.message_tokens("system", system_prompt)
        if system_tokens + question_tokens > available:
            question_content = _shrink(counter, "user", question_content, available - system_tokens)
            question_tokens = counter.message_tokens("user", question_content)

    used = system_tokens + question_tokens
    # A first message too big to keep ahead of the rest still goes when everything else fits too.
    deferred, first = (
        (first, None) if first is not None and cost(first) > (available - used) // 2 else (None, first)
    )
    if first is not None:
        used += cost(first)
    if summary:
        summary_cost = summary_tokens + counter.message_tokens("system", SUMMARY_MESSAGE.format(summary=""))
        if used + summary_cost <= available:
            used += summary_cost
        else:
            summary = ""
    kept: list[Turn] = []
    for turn in history:
        if used + cost(turn) > available:
            break
        kept.append(turn)
        used += cost(turn)
    if deferred is not None and len(kept) == len(history) and used + cost(deferred) <= available:
        first, used = deferred, used + cost(deferred)
    return Context(
        system_prompt,
        tuple(reversed(kept)),
        question,
        question_content,
        used + REPLY_PRIMING_TOKENS,
        trimmed=len(kept) < len(history) or (first is None and deferred is not None),
        pictures=pictures,
        question_pictures=question_pictures,
        first=first,
        summary=summary,
    )


def _title(question: str) -> str:
    """A thread's title from its first question: its first line, cut at a word near 80 characters."""
    line = question.strip().split("\n", 1)[0]
    if len(line) <= TITLE_CHARS:
        return line
    return line[:TITLE_CHARS].rsplit(" ", 1)[0] + "…"


def newest_that_fit(counter: TokenCounter, lines: Sequence[str], max_tokens: int) -> list[str]:
    """The newest of ``lines`` (oldest first) whose tokens, as parts of one message, stay within
    ``max_tokens``; oldest first."""
    kept: list[str] = []
    used, overhead = 0, counter.message_tokens("user", "")
    for line in reversed(lines):
        used += counter.message_tokens("user", f"{line}\n") - overhead  # each on a line of its own
        if used > max_tokens:
            break
        kept.append(line)
    return kept[::-1]


def _files_to_read(messages: Sequence[SlackMessage]) -> list[bool]:
    """For each message, oldest first: whether to read its files (those of the newest messages, up to
    ``THREAD_FILES_READ`` files)."""
    left = THREAD_FILES_READ
    reads = []
    for message in reversed(messages):
        reads.append(bool(message.files) and left >= len(message.files))
        if reads[-1]:
            left -= len(message.files)
    return reads[::-1]


def _shrink(counter: TokenCounter, role: str, content: str, max_message_tokens: int) -> str:
    overhead = counter.message_tokens(role, "")
    return counter.truncate(content, max(max_message_tokens - overhead, 0))


class _AfterStored:
    """A reply that writes nothing in the thread until its question is stored: a store that fails
    fails the attempt before anything shows, and the answer is always stored after its question."""

    def __init__(self, reply: ReplyStream, store: Coroutine[Any, Any, None]) -> None:
        self._reply = reply
        self._stored = asyncio.create_task(store)
        # Raised where it is awaited; never logged as unretrieved when the reply failed first.
        self._stored.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def settled(self) -> None:
        """Wait for the store however it ends: the thread is never let go with it under way."""
        await asyncio.wait({self._stored})

    async def thinking(self, title: str | None = None) -> None:
        await self._reply.thinking(title)  # a status is not part of the thread

    async def append(self, text: str) -> None:
        await self._stored
        await self._reply.append(text)

    async def finish(self, footnote: str | None = None, rated: Rated | None = None) -> None:
        await self._stored
        await self._reply.finish(footnote, rated)

    async def fail(self, message: str) -> None:
        await self._stored
        await self._reply.fail(message)

    async def notice(self, text: str) -> None:
        await self._stored
        await self._reply.notice(text)


class Responder:
    """Answers jobs; one instance serves every thread."""

    def __init__(
        self,
        *,
        history: History,
        model: ChatModel,
        slack: SlackPort,
        personas: PersonaSource,
        counter: TokenCounter,
        max_prompt_tokens: int,
        usage: UsageLedger | None = None,
        files: FileReader | None = None,
        pane: PaneContext | None = None,
        shortcut_slack: ShortcutSlack | None = None,
        summaries: Summaries | None = None,
    ) -> None:
        self.history = history
        self.model = model
        self.slack = slack
        self.personas = personas
        self.counter = counter
        self.max_prompt_tokens = max_prompt_tokens
        self.usage = usage
        self.files = files
        self.pane = pane
        self.shortcut_slack = shortcut_slack
        self.summaries = summaries

    async def respond(self, job: Job) -> Spent | None:
        """Answer the job's message in its thread; a retried job finishes what the attempt before it
        started (it never stores the question twice nor leaves a half-written message behind). What the
        answer used, or None when there was none (a notice, a refusal, a model failure)."""
        incoming = job.incoming
        check, spent, context = BudgetCheck(True), None, None
        try:
            async with self.history.lock(incoming.key) as hold:
                # A first delivery has no attempt before it: nothing to read.
                progress = (
                    await self.history.progress(incoming.key, job.id) if job.attempt > 1 else JobProgress()
                )
                if progress.answered:
                    return None  # an earlier attempt answered; only its acknowledgement was lost
                reply = self.slack.reply_stream(incoming, self._reply_log(job, progress))
                text = await self.slack.readable(incoming.key.team, incoming.text)
                requested = None
                if not incoming.in_thread:
                    requested, text = split_persona_request(text)
                if not text.strip() and not incoming.files:
                    await reply.notice(EMPTY_MENTION_HINT)
                    return None
                excerpt = await self._channel_excerpt(incoming, text)
                question = await self._question(incoming, text, excerpt)
                # Side by side: neither read needs the other, and each hop costs most under load.
                persona, recall = await asyncio.gather(
                    self.personas.resolve(incoming.key, requested),
                    self._recall(incoming, question, self.max_prompt_tokens),
                )
                pictures = self.model.sees_images(persona)
                context = await self._context(
                    incoming, persona, question, self.max_prompt_tokens, pictures, recall=recall
                )
                check = await self._reserve(incoming, persona, context)
                if not check.allowed:
                    await reply.notice(f":warning: {check.message}")
                    return None
                stored_first = None
                if not progress.question_stored:
                    # Stored while the model request goes out; nothing is written in the thread before it is.
                    reply = stored_first = _AfterStored(
                        reply, self.history.store_question(incoming.key, job.id, question)
                    )
                prelude = self._prelude(requested, persona, question, pictures, excerpt)
                try:
                    spent = await self._reply(job, reply, persona, question, context, check, prelude, hold)
                finally:
                    if stored_first is not None:
                        await stored_first.settled()
        finally:
            # Usage needs no thread lock: recorded after it, so a follow-up does not wait on it.
            await self._account(incoming, check, spent)
        if spent is not None and context is not None and context.left_out and self.summaries is not None:
            # After the answer and outside the lock: the summary never delays a reply.
            await self.summaries.catch_up(incoming.key, incoming.user_id, persona, context.left_out)
        return spent

    async def _account(self, incoming: Incoming, check: BudgetCheck, spent: Spent | None) -> None:
        """Record what a reply used, or give its reservation back. A failure here is logged, not raised:
        it must neither hide why a reply failed nor fail a reply that was given."""
        if self.usage is None:
            return
        try:
            if spent is not None:
                await self.usage.settle(incoming.key, incoming.user_id, *spent, check)
            else:
                await self.usage.release(incoming.key, incoming.user_id, check)
        except BotError as exc:
            log.warning("could not record usage in %s: %s", incoming.key, exc)

    async def notice(self, job: Job, message: str) -> None:
        """Replace whatever the job's attempts wrote with one short notice instead of an answer (an
        apology for a job that failed every attempt, a refusal); a shortcut's user is told privately."""
        if isinstance(job.work, Shortcut):
            await self._private_slack.private_reply(job.work.response_url).notice(f":warning: {message}")
            return
        progress = await self.history.progress(job.incoming.key, job.id)
        await self.slack.reply_stream(job.incoming, self._reply_log(job, progress)).notice(
            f":warning: {message}"
        )

    @property
    def _private_slack(self) -> ShortcutSlack:
        if self.shortcut_slack is None:
            raise TypeError("this responder answers no shortcuts")
        return self.shortcut_slack

    async def respond_to_shortcut(self, job: Job) -> Spent | None:
        """Answer a message shortcut: in the message's thread (under the thread's lock, like any answer,
        but stored nowhere and joining nothing: the thread's people did not ask the bot in), or only to
        whoever used it. Refusals and problems are told to them alone."""
        shortcut = job.work
        assert isinstance(shortcut, Shortcut)
        if shortcut.only_me:
            return await self._answer_shortcut(job, shortcut)
        async with self.history.lock(shortcut.key):
            return await self._answer_shortcut(job, shortcut)

    async def _answer_shortcut(self, job: Job, shortcut: Shortcut) -> Spent | None:
        incoming = shortcut.incoming
        check, spent = BudgetCheck(True), None
        progress = await self.history.progress(incoming.key, job.id) if job.attempt > 1 else JobProgress()
        if progress.answered:
            return None  # an earlier attempt answered; only its acknowledgement was lost
        private = self._private_slack.private_reply(shortcut.response_url)
        reply = (
            private if shortcut.only_me else self.slack.reply_stream(incoming, self._reply_log(job, progress))
        )
        what = "read this thread" if shortcut.kind == "summarize" else "post in this thread"
        try:
            # The thread's persona if it has one, else the channel's, pinning nothing.
            persona = await self.personas.resolve(incoming.key, pin=False)
            persona, question, asked_for = await self._shortcut_question(shortcut, persona)
            pictures = self.model.sees_images(persona)
            context = await self._context(incoming, persona, question, self.max_prompt_tokens, pictures, ())
            check = await self._reserve(incoming, persona, context)
            if not check.allowed:
                await private.notice(f":warning: {check.message}")
            else:
                lines = [
                    "" if shortcut.only_me else asked_for,
                    self._prelude(None, persona, question, pictures, None) or "",
                ]
                prelude = "\n".join(line for line in lines if line) or None
                spent = await self._reply(job, reply, persona, question, context, check, prelude, keep=False)
        except SlackError as exc:
            if exc.transient:
                raise  # tried again later
            log.info("a %s shortcut was refused by Slack: %s", shortcut.kind, exc.error)
            try:
                await private.notice(f":warning: {SHORTCUT_REFUSED.format(what=what, error=exc.error)}")
            except SlackError as refused:  # the response URL itself may be what Slack refuses (expired)
                log.info("could not tell a shortcut's user why: %s", refused.error)
        finally:
            await self._account(incoming, check, spent)
        await self.history.mark_answered(incoming.key, job.id)
        return spent

    async def _shortcut_question(self, shortcut: Shortcut, persona: Persona) -> tuple[Persona, Turn, str]:
        """What the model is asked for a shortcut (the persona, for a translation, made a translator),
        and the line that says in the thread who asked for what."""
        team = shortcut.key.team
        asker = await self.slack.display_name(team, shortcut.user_id)
        text = await self.slack.readable(team, shortcut.text)
        incoming = shortcut.incoming
        if shortcut.kind == "translate":
            language = await self._private_slack.user_language(shortcut.user_id)
            persona = replace(persona, system_prompt=TRANSLATE.format(language=language))
            return persona, self._turn("user", text, incoming.ts, shortcut.user_id), ""
        if shortcut.kind == "ask":
            author = await self.slack.display_name(team, shortcut.author) if shortcut.author else "someone"
            attachments = await self._read_files(incoming, shortcut.files)
            content = f"{shortcut.question}\n\n[the message this is about, from {author}]\n{text}"
            question = self._turn("user", content, incoming.ts, shortcut.user_id, asker, attachments)
            asked = ASKED_ABOUT.format(asker=asker, author=author, question=shortcut.question)
            return persona, question, asked
        messages = await self.slack.thread_messages(shortcut.key)
        lines = [f"{m.speaker_name or 'you (the assistant)'}: {m.text}" for m in messages]
        instruction = SUMMARIZE.format(asker=asker)
        room = (
            self.max_prompt_tokens
            - safety_margin(self.max_prompt_tokens)
            - REPLY_PRIMING_TOKENS
            - self.counter.message_tokens("system", persona.system_prompt)
            - self.counter.message_tokens("user", instruction)
        )
        head = lines[:1]
        room -= self.counter.message_tokens("user", "\n".join(head)) - self.counter.message_tokens("user", "")
        newest = newest_that_fit(self.counter, lines[1:], room)
        left_out = len(lines) - len(head) - len(newest)
        gap = [f"[{left_out} messages left out]"] if left_out else []
        content = "\n".join([instruction, "", *head, *gap, *newest])
        note = SUMMARY_LEFT_OUT.format(kept=len(newest), count=left_out) if left_out else ""
        prelude = SUMMARY_FOR.format(count=len(messages), asker=asker, left_out=note)
        return persona, self._turn("user", content, incoming.ts, shortcut.user_id), prelude

    @staticmethod
    def _prelude(
        requested: str | None,
        persona: Persona,
        question: Turn,
        pictures: bool,
        excerpt: ChannelExcerpt | None,
    ) -> str | None:
        """The lines for the asker before the answer: a persona asked for that does not exist, files
        that could not be read and why, images the model will not see, the span of a channel read (or
        why it could not be)."""
        lines = []
        if excerpt is not None:
            lines.append(
                f"_({excerpt.problem})_"
                if excerpt.problem
                else CHANNEL_READ.format(
                    count=excerpt.count, channel=excerpt.channel, oldest=excerpt.oldest, newest=excerpt.newest
                )
            )
        if requested and persona.name != requested:
            lines.append(UNKNOWN_PERSONA.format(name=requested, persona=persona.name))
        unreadable = [f"{a.file.name} ({a.problem})" for a in question.attachments if a.problem]
        if unreadable:
            lines.append(UNREADABLE_FILES.format(files=", ".join(unreadable)))
        if question.pictures and not pictures:
            lines.append(PICTURES_UNSEEN.format(files=", ".join(a.file.name for a in question.pictures)))
        return "\n".join(lines) or None

    def _reply_log(self, job: Job, progress: JobProgress) -> ReplyLog:
        async def record(index: int, ts: str) -> None:
            await self.history.record_part(job.incoming.key, job.id, index, ts)

        return ReplyLog(job.id, job.attempt, progress.parts, record)

    async def _reply(
        self,
        job: Job,
        reply: ReplyStream,
        persona: Persona,
        question: Turn,
        context: Context,
        check: BudgetCheck,
        prelude: str | None,
        hold: ThreadHold | None = None,
        *,
        keep: bool = True,
    ) -> Spent | None:
        """Answer and store (unless not ``keep``: a shortcut's answer); what the reply used, or None when
        the model failed. ``prelude`` is a line for the asker before the answer (not part of it); ``hold``
        is the thread's lock, let go as the answer is stored."""
        incoming = job.incoming
        # The assistant pane's threads are DM threads; the first question there names the thread.
        first = keep and incoming.is_dm and incoming.in_thread and not context.turns and not context.trimmed
        await reply.thinking(title=_title(question.text) if first else None)
        if prelude:
            await reply.append(prelude + "\n\n")
        try:
            notes = [check.notice, SUMMARIZING_NOTE if context.left_out and not context.noted else None]
            answer, end, context = await self._answer(
                incoming,
                persona,
                question,
                context,
                reply,
                "\n".join(n for n in notes if n) or None,
                None if keep else (),
            )
        except ModelError as exc:
            log.warning("model failed in %s: %s", incoming.key, exc)
            await reply.fail(exc.user_message)
            return None  # the question stays stored, unanswered: a "try again" sees it
        if keep:
            # The last step under the thread's lock: a follow-up waiting for the thread starts now.
            await self.history.store_answer(incoming.key, job.id, answer, releasing=hold)
        usage = end.usage or Usage(
            context.estimated_tokens + context.billed_beyond_context,
            self.counter.message_tokens("assistant", answer.text)
            - self.counter.message_tokens("assistant", ""),
            estimated=True,
        )
        return Spent(end.model or self.model.model_for(persona), usage, int(context.trimmed))

    async def _reserve(self, incoming: Incoming, persona: Persona, context: Context) -> BudgetCheck:
        """Check the budgets and reserve what this reply can use: its context and its longest answer."""
        if self.usage is None:
            return BudgetCheck(True)
        worst = (
            context.estimated_tokens
            + context.billed_beyond_context
            + (self.model.reply_cap(persona) or REPLY_TOKENS_ESTIMATE)
        )
        return await self.usage.reserve(incoming.key, incoming.user_id, self.model.model_for(persona), worst)

    async def _context(
        self,
        incoming: Incoming,
        persona: Persona,
        question: Turn,
        budget: int,
        pictures: bool,
        history: Sequence[Turn] | None = None,
        *,
        recall: Recall | None = None,
    ) -> Context:
        """What the model gets within ``budget``: the thread's newest turns that fit (or ``history``'s),
        and the images of those turns when the model sees images; ``recall`` is the thread's, when it
        was read already for this budget."""
        if history is None:
            if recall is None:
                recall = await self._recall(incoming, question, budget)
            context = build_context(
                persona.system_prompt,
                recall.turns,
                question,
                budget,
                self.counter,
                pictures=pictures,
                first=recall.first,
                summary=recall.summary,
                summary_tokens=recall.summary_tokens,
            )
            left_out = recall.left_out(context.kept_turns) if self.summaries is not None else range(0)
            context = replace(context, left_out=left_out, noted=recall.noted)
        else:
            context = build_context(
                persona.system_prompt, history, question, budget, self.counter, pictures=pictures
            )
        wanted = context.wanted_pictures
        if wanted and self.files is not None:
            context = replace(context, picture_urls=await self.files.picture_urls(incoming.key, wanted))
        return context

    async def _recall(self, incoming: Incoming, question: Turn, budget: int) -> Recall:
        """What the history holds of the thread for a context of ``budget`` tokens. Asked in a thread
        it remembers nothing of, the bot first stores what was said before: found by the recall itself,
        so every other reply pays no round trip to ask."""
        # The question may be stored already (a retried job); the context carries it last, whatever
        # came after it.
        budget += question.tokens
        recall = await self.history.recall(incoming.key, budget, without_ts=question.ts)
        if recall.remembered or not incoming.in_thread:
            return recall
        await self._read_thread(incoming)
        return await self.history.recall(incoming.key, budget, without_ts=question.ts)

    async def _read_thread(self, incoming: Incoming) -> None:
        """Store what was said in the thread before, with the files of the newest messages read."""
        earlier = [m for m in await self.slack.thread_messages(incoming.key) if m.ts != incoming.ts]
        turns = [
            await self._earlier_turn(incoming, message, reads)
            for message, reads in zip(earlier, _files_to_read(earlier), strict=True)
        ]
        await self.history.seed(incoming.key, turns)
        log.info("read %d earlier messages of thread %s", len(turns), incoming.key)

    async def _earlier_turn(self, incoming: Incoming, message: SlackMessage, read_files: bool) -> Turn:
        if not message.files:
            attachments: list[Attachment] = []
        elif read_files:
            attachments = await self._read_files(incoming, message.files)
        else:
            attachments = [
                Attachment(f, f"[file: {f.name}, not read: {TOO_FAR_BACK}]", problem=TOO_FAR_BACK)
                for f in message.files
            ]
        # Not counted here: of a long thread only the newest turns will fit, and the history counts a
        # turn when it first needs its cost (so a first mention does not grow with the thread).
        return Turn(
            role=message.role,
            text=message.text,
            tokens=0,
            encoding=UNCOUNTED,
            ts=message.ts,
            speaker_id=message.speaker_id,
            speaker_name=message.speaker_name,
            attachments=tuple(attachments),
        )

    async def _channel_excerpt(self, incoming: Incoming, text: str) -> ChannelExcerpt | None:
        """In a thread of the assistant pane (a DM thread), a question about "this channel" reads the
        channel the person is looking at."""
        if self.pane is None or not (incoming.is_dm and incoming.in_thread):
            return None
        return await self.pane.channel_excerpt(incoming.key, text)

    async def _question(self, incoming: Incoming, text: str, excerpt: ChannelExcerpt | None = None) -> Turn:
        """The question as a turn: its text (and the channel messages it asks about, stored with it so
        that follow-ups see them too), its files read."""
        name = await self.slack.display_name(incoming.key.team, incoming.user_id)
        attachments = await self._read_files(incoming, incoming.files)
        if excerpt is not None and excerpt.text:
            text = f"{text}\n\n{excerpt.text}"
        return self._turn("user", text, incoming.ts, incoming.user_id, name, attachments)

    async def _read_files(self, incoming: Incoming, files: Sequence[SlackFile]) -> list[Attachment]:
        if not files or self.files is None:
            return []
        return await self.files.read(incoming.key, files)

    def _turn(
        self,
        role: Role,
        text: str,
        ts: str,
        speaker_id: str = "",
        speaker_name: str = "",
        attachments: Sequence[Attachment] = (),
    ) -> Turn:
        """A turn with its token cost (its text, its files' text, its images), counted once, here,
        before it is stored."""
        turn = Turn(
            role, text, 0, self.counter.encoding_name, ts, speaker_id, speaker_name, tuple(attachments)
        )
        return replace(turn, tokens=self.counter.message_tokens(role, turn.content) + turn.picture_tokens)

    async def _answer(
        self,
        incoming: Incoming,
        persona: Persona,
        question: Turn,
        context: Context,
        reply: ReplyStream,
        notice: str | None,
        history: Sequence[Turn] | None,
    ) -> tuple[Turn, StreamEnd, Context]:
        """Stream the model's answer into ``reply``; on context_length_exceeded retry once at half budget
        (with ``history`` in place of the thread's, when given)."""
        budget = self.max_prompt_tokens
        end_user = f"{incoming.key.team}:{incoming.user_id}"
        while True:
            try:
                answer, end = await self._stream(context, persona, reply, end_user, notice)
                return answer, end, context
            except ModelError as exc:
                if exc.kind == "images_refused" and context.pictures:
                    log.warning("the endpoint refused images; answering from the text alone")
                    await reply.append(PICTURES_REFUSED + "\n\n")
                elif exc.kind == "context_length" and budget == self.max_prompt_tokens:
                    log.warning("context_length_exceeded at %d tokens; retrying with half", budget)
                    budget //= 2
                else:
                    raise
                pictures = context.pictures and exc.kind != "images_refused"
                context = await self._context(incoming, persona, question, budget, pictures, history)

    async def _stream(
        self, context: Context, persona: Persona, reply: ReplyStream, end_user: str, notice: str | None
    ) -> tuple[Turn, StreamEnd]:
        parts: list[str] = []
        end = StreamEnd(finish_reason=None, usage=None)
        async for piece in self.model.stream(context.messages, persona, end_user):
            if isinstance(piece, StreamEnd):
                end = piece
            elif piece:
                parts.append(piece)
                await reply.append(piece)
        text = "".join(parts)
        if not text:
            await reply.append(EMPTY_ANSWER)
        notes = [LENGTH_NOTE if end.finish_reason == "length" else None, notice]
        rated = Rated(
            persona.name, end.model or self.model.model_for(persona), time.strftime("%Y-%m-%d", time.gmtime())
        )
        await reply.finish("\n".join(note for note in notes if note) or None, rated)
        if end.usage is not None:
            log.info(
                "reply: %d prompt tokens (estimated %d, %+d), %d completion tokens, %d turns kept%s",
                end.usage.prompt_tokens,
                context.estimated_tokens,
                end.usage.prompt_tokens - context.estimated_tokens,
                end.usage.completion_tokens,
                context.kept_turns,
                ", older trimmed" if context.trimmed else "",
            )
        return self._turn("assistant", text, ""), end
