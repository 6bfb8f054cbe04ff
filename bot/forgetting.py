"""Deletions and edits made in Slack, carried out in the bot's memory (the work of a ``Change`` job).

- A message edited in a thread the bot keeps is stored with its new text (recounted); a summary that
  covered it is built again.
- A message deleted in a thread the bot keeps leaves its history, with its files' cached images.
- A thread's parent deleted takes the whole thread: its turns, its pinned persona, its images, and the
  bot's part in it (follow-ups there need a mention again).
- A file deleted in Slack leaves every thread that holds it: the turns are recounted without it.

Each owner deletes its own keys (``history``, ``personas``, ``files``, ``jobs``); this module only says
what goes. Thread changes happen under the thread's lock, so no reply writes it meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bot.conversation import split_persona_request
from bot.domain import Change, Edit, ThreadKey
from bot.files import SlackFiles, file_ids
from bot.history import RedisHistory
from bot.jobs import JobQueue
from bot.personas import PersonaStore

log = logging.getLogger(__name__)


class Forgetting:
    """Carries out deletions and edits; one instance serves every workspace thread."""

    def __init__(
        self,
        history: RedisHistory,
        files: SlackFiles,
        personas: PersonaStore,
        queue: JobQueue,
        readable: Callable[[str, str], Awaitable[str]],
    ) -> None:
        self._history = history
        self._files = files
        self._personas = personas
        self._queue = queue
        self._readable = readable  # (team, Slack markup) -> the text as stored, names resolved

    async def carry_out(self, deletion: Change) -> None:
        if isinstance(deletion, Edit):
            await self._edit(deletion)
        elif deletion.file_id:
            for key in await self._files.threads_holding(deletion.team, deletion.file_id):
                async with self._history.lock(key):
                    await self._history.forget_file(key, deletion.file_id)
                await self._files.forget(key, [deletion.file_id])
            log.info("forgot a deleted file")
        elif deletion.key is not None and deletion.ts == deletion.key.thread_ts:
            await self.forget_thread(deletion.key)
        elif deletion.key is not None:
            async with self._history.lock(deletion.key):
                gone = await self._history.forget_message(deletion.key, deletion.ts)
            await self._files.forget(deletion.key, file_ids(gone))
            log.info("forgot a deleted message" if gone else "a deleted message was not kept")

    async def _edit(self, edit: Edit) -> None:
        text = await self._readable(edit.team, edit.text)
        if edit.ts == edit.key.thread_ts:
            _, text = split_persona_request(text)  # a thread's parent may name its persona first
        async with self._history.lock(edit.key):
            changed = await self._history.edit_message(edit.key, edit.ts, text)
        log.info("changed an edited message" if changed else "an edited message was not kept")

    async def forget_thread(self, key: ThreadKey) -> None:
        """Everything of a thread: its turns and memory, pinned persona, images, the bot's part in it."""
        async with self._history.lock(key):
            turns = await self._history.forget_thread(key)
        await self._personas.unpin(key)
        await self._files.forget(key, file_ids(turns))
        await self._queue.leave(key)
        log.info("forgot a thread (%d messages)", len(turns))
