"""Long threads that do not forget: each thread's rolling summary (``domain.Summaries``).

When a reply's context leaves older turns out, the worker, after the reply, folds those turns into the
thread's summary: the previous summary plus the turns newly left out go to the summarizer model (one
call per chunk that fits half the prompt budget, a few chunks at most per reply, the rest after the next
one), and the new summary replaces the old if nothing changed the thread meanwhile. The summarizer
never reads the whole thread, only what the summary does not cover yet. Its tokens are reserved against
the budgets and recorded in usage like a reply's, counted as summaries. A failure (the model, Redis, a
budget) is logged and left for the next reply to try again; nobody is shown an error for it.
"""

from __future__ import annotations

import dataclasses
import logging

from bot.domain import (
    ChatMessage,
    ChatModel,
    Persona,
    StreamEnd,
    ThreadKey,
    TokenCounter,
    Turn,
    Usage,
    UsageLedger,
)
from bot.errors import BotError
from bot.history import RedisHistory, StoredSummary

log = logging.getLogger(__name__)

SUMMARIZER_PROMPT = (
    "You keep the running summary of a long Slack thread, so that an assistant can go on answering in it "
    "after its older messages are gone. You are given the summary so far (it may be empty) and the next "
    "messages, oldest first. Write the new summary: keep what still matters from the summary so far and add "
    "what the next messages bring: the thread's goal, facts and figures, decisions, open questions, and who "
    "is doing what, with people's names. Be concise: at most {words} words, in short sentences or bullet "
    "points, in the language of the thread. Answer with the summary only."
)
SUMMARY_REQUEST = "Summary so far:\n{summary}\n\nNext messages:\n{messages}"
CALLS_PER_REPLY = 3  # a thread read back from Slack catches up over a few replies, not in one long stall


class Summarizer:
    """Writes the rolling summaries of every workspace's threads; one instance serves them all."""

    def __init__(
        self,
        history: RedisHistory,
        model: ChatModel,
        counter: TokenCounter,
        *,
        max_prompt_tokens: int,
        max_tokens: int,
        model_name: str | None = None,
        usage: UsageLedger | None = None,
    ) -> None:
        self._history = history
        self._model = model
        self._counter = counter
        self._chunk_tokens = max(max_prompt_tokens // 2, 100)
        self._max_tokens = max_tokens
        self._model_name = model_name
        self._usage = usage

    async def catch_up(self, key: ThreadKey, user_id: str, persona: Persona, left_out: range) -> None:
        """Fold the turns at ``left_out`` into the thread's summary (see the module docstring)."""
        try:
            async with self._history.summarizing(key) as held:
                if held:
                    await self._catch_up(key, user_id, self._summarizer(persona), left_out.stop)
        except BotError as exc:
            log.warning(
                "could not summarize older messages in %s, to be tried after the next reply: %s", key, exc
            )

    def _summarizer(self, persona: Persona) -> Persona:
        """The persona's model (or ``SUMMARY_MODEL``) with the summarizer's prompt and length, and none
        of the persona's sampling choices, which are for its answers."""
        return Persona(
            name=persona.name,
            system_prompt=SUMMARIZER_PROMPT.format(words=self._max_tokens * 3 // 4),
            model=self._model_name or persona.model,
            max_tokens=self._max_tokens,
            reasoning_effort=persona.reasoning_effort,
            service_tier=persona.service_tier,
            vision="off",
        )

    async def _catch_up(self, key: ThreadKey, user_id: str, summarizer: Persona, until: int) -> None:
        summary = await self._history.summary(key)
        for _ in range(CALLS_PER_REPLY):
            start = max(summary.until, 1)
            if start >= until:
                return
            turns = await self._history.turns_between(key, start, until, self._chunk_tokens)
            if not turns:
                return
            text = await self._summarize(key, user_id, summarizer, summary, turns)
            if text is None:
                return
            end = start + len(turns)
            if not await self._history.save_summary(key, summary, end, text):
                log.info("the thread changed while it was summarized; the summary waits for the next reply")
                return
            log.info("summarized %d older messages of %s", len(turns), key)
            summary = dataclasses.replace(summary, text=text, until=end)

    async def _summarize(
        self, key: ThreadKey, user_id: str, summarizer: Persona, summary: StoredSummary, turns: list[Turn]
    ) -> str | None:
        """One summarizer call: the new summary, or None when the budget does not allow it."""
        lines = "\n\n".join(self._line(turn) for turn in turns)
        request = SUMMARY_REQUEST.format(summary=summary.text or "(none yet)", messages=lines)
        request = self._counter.truncate(request, self._chunk_tokens + self._max_tokens)
        messages: list[ChatMessage] = [
            {"role": "system", "content": summarizer.system_prompt},
            {"role": "user", "content": request},
        ]
        model = self._model.model_for(summarizer)
        prompt_tokens = self._counter.message_tokens("system", summarizer.system_prompt)
        prompt_tokens += self._counter.message_tokens("user", request)
        check = None
        if self._usage is not None:
            check = await self._usage.reserve(key, user_id, model, prompt_tokens + self._max_tokens)
            if not check.allowed:
                log.info("a budget leaves no room to summarize older messages in %s", key)
                return None
        parts: list[str] = []
        end = StreamEnd(None, None)
        try:
            async for piece in self._model.stream(messages, summarizer, f"{key.team}:{user_id}"):
                if isinstance(piece, StreamEnd):
                    end = piece
                else:
                    parts.append(piece)
        except BotError:
            if self._usage is not None and check is not None:
                await self._usage.release(key, user_id, check)
            raise
        if self._usage is not None and check is not None:
            completion = self._counter.message_tokens("assistant", "".join(parts))
            usage = end.usage or Usage(prompt_tokens, completion, estimated=True)
            await self._usage.settle(key, user_id, end.model or model, usage, 0, check, counted="summaries")
        text = self._counter.truncate("".join(parts).strip(), self._max_tokens)
        return text or None

    @staticmethod
    def _line(turn: Turn) -> str:
        return turn.content if turn.role == "user" else f"Assistant: {turn.content}"
