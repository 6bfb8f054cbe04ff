"""The pipeline in ``bot.conversation``: ``build_context`` trimming and ``Responder`` answering jobs."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import get_args

import pytest

from bot.conversation import (
    EMPTY_MENTION_HINT,
    LENGTH_NOTE,
    PICTURES_REFUSED,
    THREAD_FILES_READ,
    TOO_FAR_BACK,
    Responder,
    build_context,
    safety_margin,
)
from bot.domain import (
    REPLY_PRIMING_TOKENS,
    Attachment,
    ChatMessage,
    Incoming,
    Job,
    Persona,
    Picture,
    Recall,
    Role,
    Shortcut,
    ShortcutKind,
    SlackFile,
    SlackMessage,
    ThreadKey,
    Turn,
)
from bot.errors import HistoryError, ModelError, ModelErrorKind
from tests.memory import (
    BOT_USER_ID,
    MemoryHistory,
    RecordingSlack,
    ScriptedModel,
    ShelfFiles,
    StaticPersonas,
    WordCounter,
)

WORDS = WordCounter()
TEAM = "T1"
MAX_PROMPT_TOKENS = 1000
DEFAULT = Persona(name="default", system_prompt="You are a test bot.")
PIRATE = Persona(name="pirate", system_prompt="You are a pirate. Answer like one.", temperature=0.9)


def make_turn(role: Role, text: str, name: str = "", ts: str = "") -> Turn:
    """A stored turn whose token count was taken with the word counter, as the store would hold it."""
    unsized = Turn(role, text, 0, "words", ts, "U9" if name else "", name)
    return Turn(
        role, text, WORDS.message_tokens(role, unsized.content), "words", ts, unsized.speaker_id, name
    )


def words(n: int, word: str = "w") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


def text_of(message: ChatMessage) -> str:
    """A text-only message's content."""
    assert isinstance(message["content"], str)
    return message["content"]


def message_cost(messages: list[ChatMessage]) -> int:
    return sum(WORDS.message_tokens(m["role"], text_of(m)) for m in messages) + REPLY_PRIMING_TOKENS


def available(budget: int) -> int:
    return budget - safety_margin(budget) - REPLY_PRIMING_TOKENS


# build_context ---------------------------------------------------------------------------------------


def test_build_context_keeps_newest_turns_and_stops_at_first_that_does_not_fit() -> None:
    question = make_turn("user", "what now", name="alice")  # 7 tokens
    system = "You are terse."  # 7 tokens
    t1 = make_turn("assistant", words(3, "oldest"))  # 7 tokens: would fit, but comes after the misfit
    t2 = make_turn("user", words(36, "big"))  # 40 tokens: does not fit
    t3 = make_turn("assistant", words(16, "older"))  # 20 tokens
    t4 = make_turn("user", words(16, "newest"))  # 20 tokens
    history = [t4, t3, t2, t1]  # newest first

    context = build_context(system, history, question, 100, WORDS)  # 81 tokens available

    assert context.messages == [
        {"role": "system", "content": system},
        {"role": "assistant", "content": t3.content},
        {"role": "user", "content": t4.content},
        {"role": "user", "content": question.content},
    ]
    assert context.kept_turns == 2
    assert context.trimmed is True
    assert context.estimated_tokens == 7 + 7 + 20 + 20 + REPLY_PRIMING_TOKENS


@pytest.mark.parametrize("over", [0, 1], ids=["fills-the-budget-exactly", "one-token-too-many"])
def test_a_turn_that_exactly_fills_the_budget_is_kept_and_one_token_more_is_not(over: int) -> None:
    question = make_turn("user", "what now", name="alice")  # 7 tokens
    system = "You are terse."  # 7 tokens
    room = available(100) - 7 - 7  # 67 tokens left for history
    turn = make_turn("assistant", words(room - 4 + over))  # 4 tokens of message overhead

    context = build_context(system, [turn], question, 100, WORDS)

    assert turn.tokens == room + over
    assert context.kept_turns == (1 if over == 0 else 0)
    assert context.estimated_tokens <= 100 - safety_margin(100)


def test_build_context_keeps_everything_that_fits_untrimmed_in_chronological_order() -> None:
    question = make_turn("user", "and then?", name="alice")
    history = [
        make_turn("assistant", "third"),
        make_turn("user", "second", name="bob"),
        make_turn("user", "first"),
    ]

    context = build_context("System.", history, question, 500, WORDS)

    assert [m["content"] for m in context.messages] == [
        "System.",
        "first",
        "bob: second",
        "third",
        "alice: and then?",
    ]
    assert [m["role"] for m in context.messages] == ["system", "user", "user", "assistant", "user"]
    assert context.kept_turns == 3
    assert context.trimmed is False


def test_build_context_with_no_history_is_system_and_question() -> None:
    question = make_turn("user", "hello", name="alice")

    context = build_context("System.", [], question, 300, WORDS)

    assert context.messages == [
        {"role": "system", "content": "System."},
        {"role": "user", "content": "alice: hello"},
    ]
    assert context.kept_turns == 0
    assert context.trimmed is False


def test_build_context_truncates_a_question_larger_than_the_budget_and_keeps_the_system_prompt() -> None:
    question = make_turn("user", words(200, "q"), name="alice")
    system = "You are terse."

    context = build_context(system, [make_turn("assistant", "earlier")], question, 100, WORDS)

    assert context.messages[0] == {"role": "system", "content": system}
    assert context.messages[-1]["role"] == "user"
    asked = text_of(context.messages[-1])
    assert asked, "the question must still be there"
    assert len(asked) < len(question.content)
    assert question.content.startswith(asked)
    kept_words = asked.split()
    assert kept_words == question.content.split()[: len(kept_words)], "cut at a token (word) boundary"
    assert context.kept_turns == 0
    assert context.estimated_tokens <= 100


@pytest.mark.parametrize("question_words", [3, 500], ids=["small-question", "huge-question"])
def test_build_context_cuts_a_huge_system_prompt_to_no_less_than_half(question_words: int) -> None:
    budget = 200
    system = words(1000, "sys")
    question = make_turn("user", words(question_words, "q"), name="alice")

    context = build_context(system, [], question, budget, WORDS)

    sent_system = text_of(context.messages[0])
    assert context.messages[0]["role"] == "system"
    assert system.startswith(sent_system)
    assert len(sent_system) < len(system)
    assert WORDS.message_tokens("system", sent_system) >= available(budget) // 2
    assert context.messages[-1]["role"] == "user"
    assert text_of(context.messages[-1]), "the question is always kept"
    assert question.content.startswith(text_of(context.messages[-1]))
    assert context.estimated_tokens <= budget


def test_build_context_puts_speaker_names_in_user_content() -> None:
    history = [make_turn("assistant", "hi bob"), make_turn("user", "hello there", name="bob")]
    question = make_turn("user", "how are you", name="alice")

    context = build_context("System.", history, question, 300, WORDS)

    assert context.messages[1] == {"role": "user", "content": "bob: hello there"}
    assert context.messages[2] == {"role": "assistant", "content": "hi bob"}
    assert context.messages[-1] == {"role": "user", "content": "alice: how are you"}


@pytest.mark.parametrize("budget", [40, 64, 100, 257, 1000, 4096])
@pytest.mark.parametrize("seed", range(5))
def test_build_context_estimate_never_exceeds_the_budget(budget: int, seed: int) -> None:
    rng = random.Random(seed)
    history = [
        make_turn(rng.choice(["user", "assistant"]), words(rng.randint(0, 120)), name=rng.choice(["", "bob"]))
        for _ in range(rng.randint(0, 60))
    ]
    question = make_turn("user", words(rng.choice([1, 10, 300, 5000]), "q"), name="alice")
    system = words(rng.choice([1, 20, 400, 3000]), "s")

    context = build_context(system, history, question, budget, WORDS)

    assert context.estimated_tokens <= budget
    assert context.estimated_tokens == message_cost(context.messages)
    assert context.messages[0]["role"] == "system"
    assert context.messages[-1]["role"] == "user"
    assert len(context.messages) == context.kept_turns + 2
    assert context.trimmed == (context.kept_turns < len(history))


class CountingWordCounter(WordCounter):
    """A word counter that remembers every content it was asked to count or truncate."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def message_tokens(self, role: str, content: str) -> int:
        self.seen[content] += 1
        return super().message_tokens(role, content)

    def truncate(self, text: str, max_tokens: int) -> str:
        self.seen[text] += 1
        return super().truncate(text, max_tokens)


@pytest.mark.parametrize("budget", [60, 300, 5000], ids=["trimming", "some-kept", "all-kept"])
def test_build_context_never_reencodes_history(budget: int) -> None:
    history = [
        make_turn(
            "user" if i % 2 else "assistant", f"turn {i} " + words(10 + i, f"t{i}x"), name="bob" * (i % 2)
        )
        for i in range(20)
    ]
    counter = CountingWordCounter()

    context = build_context("System.", history, make_turn("user", "q?", name="alice"), budget, counter)

    assert context.trimmed == (budget != 5000)
    encoded = set(counter.seen)
    for turn in history:
        assert turn.content not in encoded
        assert turn.text not in encoded


# Responder.respond -----------------------------------------------------------------------------------


@dataclass
class Pipeline:
    history: MemoryHistory
    model: ScriptedModel
    slack: RecordingSlack
    responder: Responder


def make_pipeline(thread: list[SlackMessage] | None = None) -> Pipeline:
    history, model = MemoryHistory(), ScriptedModel()
    slack = RecordingSlack(names={"U1": "alice", "U2": "bob"}, thread=thread or [])
    responder = Responder(
        history=history,
        model=model,
        slack=slack,
        personas=StaticPersonas(DEFAULT, {"C2": PIRATE}),
        counter=WordCounter(),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        shortcut_slack=slack,
    )
    return Pipeline(history, model, slack, responder)


@pytest.fixture
def pipe() -> Pipeline:
    return make_pipeline()


def incoming(
    ts: str,
    text: str = f"<@{BOT_USER_ID}> how do I rotate a password?",
    *,
    thread_ts: str | None = None,
    addressed: bool = True,
    user: str = "U1",
    channel: str = "C1",
) -> Incoming:
    return Incoming(
        key=ThreadKey(TEAM, channel, thread_ts or ts),
        ts=ts,
        user_id=user,
        text=text,
        addressed=addressed,
        is_dm=False,
    )


def job(message: Incoming, attempt: int = 1) -> Job:
    """The job the ingress would queue for ``message``."""
    return Job(f"job-{message.ts}", message, attempt)


def contents(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m)) for m in messages]


async def test_mention_streams_an_answer_and_stores_question_and_answer(pipe: Pipeline) -> None:
    pipe.model.answer("Use ", "CONFIG SET ", "requirepass.")
    message = incoming("100.1")

    await pipe.responder.respond(job(message))

    [reply] = pipe.slack.replies
    assert reply.incoming == message
    assert reply.events == [
        ("thinking", None),
        ("append", "Use "),
        ("append", "CONFIG SET "),
        ("append", "requirepass."),
        ("finish", None),
    ]
    assert contents(pipe.model.calls[0].messages) == [
        ("system", DEFAULT.system_prompt),
        ("user", "alice: how do I rotate a password?"),
    ]
    stored = pipe.history.turns[message.key]
    assert [(t.role, t.text, t.speaker_name) for t in stored] == [
        ("user", "how do I rotate a password?", "alice"),
        ("assistant", "Use CONFIG SET requirepass.", ""),
    ]
    assert [t.tokens for t in stored] == [WORDS.message_tokens(t.role, t.content) for t in stored]
    assert all(t.encoding == "words" for t in stored)
    assert stored[0].ts == "100.1"


async def test_follow_up_in_a_thread_the_bot_answered_is_answered_with_the_earlier_exchange(
    pipe: Pipeline,
) -> None:
    pipe.model.answer("first answer")
    pipe.model.answer("second answer")
    await pipe.responder.respond(job(incoming("100.1", f"<@{BOT_USER_ID}> first question")))

    follow_up = incoming("100.2", "and a follow-up", thread_ts="100.1", addressed=False, user="U2")
    await pipe.responder.respond(job(follow_up))

    assert len(pipe.slack.replies) == 2
    assert pipe.slack.replies[1].text == "second answer"
    assert contents(pipe.model.calls[1].messages) == [
        ("system", DEFAULT.system_prompt),
        ("user", "alice: first question"),
        ("assistant", "first answer"),
        ("user", "bob: and a follow-up"),
    ]
    assert pipe.slack.thread_reads == [], "a thread the bot already takes part in is not read from Slack"
    assert [t.text for t in pipe.history.turns[follow_up.key]] == [
        "first question",
        "first answer",
        "and a follow-up",
        "second answer",
    ]


async def test_mention_in_an_unseen_thread_reads_the_thread_first() -> None:
    thread = [
        SlackMessage("200.1", "user", "U2", "bob", "the deploy is failing"),
        SlackMessage("200.2", "assistant", BOT_USER_ID, "", "an older bot message"),
        SlackMessage("200.3", "user", "U1", "alice", "same here"),
        SlackMessage("200.5", "user", "U1", "alice", "what should we do?"),  # the mention itself
    ]
    pipe = make_pipeline(thread)
    pipe.model.answer("Roll back.")
    mention = incoming("200.5", f"<@{BOT_USER_ID}> what should we do?", thread_ts="200.1")

    await pipe.responder.respond(job(mention))

    assert pipe.slack.thread_reads == [mention.key]
    stored = pipe.history.turns[mention.key]
    assert [(t.role, t.ts, t.content) for t in stored] == [
        ("user", "200.1", "bob: the deploy is failing"),
        ("assistant", "200.2", "an older bot message"),
        ("user", "200.3", "alice: same here"),
        ("user", "200.5", "alice: what should we do?"),
        ("assistant", "", "Roll back."),
    ]
    assert contents(pipe.model.calls[0].messages) == [
        ("system", DEFAULT.system_prompt),
        ("user", "bob: the deploy is failing"),
        ("assistant", "an older bot message"),
        ("user", "alice: same here"),
        ("user", "alice: what should we do?"),
    ]


async def test_empty_mention_posts_the_hint_and_does_not_call_the_model(pipe: Pipeline) -> None:
    mention = incoming("100.1", f"<@{BOT_USER_ID}>  ")

    await pipe.responder.respond(job(mention))

    [reply] = pipe.slack.replies
    assert reply.events == [("notice", EMPTY_MENTION_HINT)]
    assert pipe.model.calls == []
    assert pipe.history.turns[mention.key] == []


@pytest.mark.parametrize("kind", get_args(ModelErrorKind))
async def test_model_error_fails_the_reply_with_its_message_and_stores_no_answer(
    pipe: Pipeline, kind: ModelErrorKind
) -> None:
    key = ThreadKey(TEAM, "C1", "100.1")
    earlier = [make_turn("user", "earlier question", name="alice"), make_turn("assistant", "earlier answer")]
    await pipe.history.seed(key, earlier)
    pipe.model.fail(kind)
    if kind == "context_length":
        pipe.model.fail(kind)  # the retry at half budget fails too

    await pipe.responder.respond(job(incoming("100.3", f"<@{BOT_USER_ID}> again?", thread_ts="100.1")))

    [reply] = pipe.slack.replies
    assert reply.events == [("thinking", None), ("fail", ModelError(kind).user_message)]
    assert pipe.model.pending == 0
    # The earlier turns are untouched and no answer is stored; only the unanswered question is kept.
    stored = pipe.history.turns[key]
    assert stored[:2] == earlier
    assert [(t.role, t.text) for t in stored[2:]] == [("user", "again?")]


async def _long_active_thread(pipe: Pipeline) -> ThreadKey:
    """A thread the bot takes part in with 30 turns of 40 tokens each: more than fits the budget."""
    key = ThreadKey(TEAM, "C1", "300.1")
    await pipe.history.seed(
        key, [make_turn("user" if i % 2 else "assistant", words(36, f"t{i}x")) for i in range(30)]
    )
    return key


async def test_context_length_is_retried_once_with_half_the_budget(pipe: Pipeline) -> None:
    key = await _long_active_thread(pipe)
    pipe.model.fail("context_length")
    pipe.model.answer("fits now")

    await pipe.responder.respond(job(incoming("300.9", "<@UBOT> hi there", thread_ts=key.thread_ts)))

    question = WORDS.message_tokens("user", "alice: hi there")  # stored already, read back with the rest
    assert pipe.history.recent_budgets == [MAX_PROMPT_TOKENS + question, MAX_PROMPT_TOKENS // 2 + question]
    first, second = pipe.model.calls
    assert len(second.messages) < len(first.messages)
    assert message_cost(second.messages) <= MAX_PROMPT_TOKENS // 2 < message_cost(first.messages)
    assert second.messages[-1] == {"role": "user", "content": "alice: hi there"}
    [reply] = pipe.slack.replies
    assert reply.events == [("thinking", None), ("append", "fits now"), ("finish", None)]
    assert [t.text for t in pipe.history.turns[key][-2:]] == ["hi there", "fits now"]


async def test_context_length_twice_fails_with_the_context_length_message(pipe: Pipeline) -> None:
    key = await _long_active_thread(pipe)
    before = list(pipe.history.turns[key])
    pipe.model.fail("context_length")
    pipe.model.fail("context_length")

    await pipe.responder.respond(job(incoming("300.9", "<@UBOT> hi there", thread_ts=key.thread_ts)))

    assert len(pipe.model.calls) == 2
    [reply] = pipe.slack.replies
    assert reply.events[-1] == ("fail", ModelError("context_length").user_message)
    assert "fail" not in reply.methods[:-1]
    assert "finish" not in reply.methods
    stored = pipe.history.turns[key]
    assert stored[:-1] == before
    assert (stored[-1].role, stored[-1].text) == ("user", "hi there"), "no answer stored, only the question"


async def test_answer_cut_at_the_token_limit_gets_the_length_note(pipe: Pipeline) -> None:
    pipe.model.answer("a long answer that was", finish_reason="length")

    await pipe.responder.respond(job(incoming("100.1")))

    [reply] = pipe.slack.replies
    assert reply.events[-1] == ("finish", LENGTH_NOTE)
    assert reply.text == "a long answer that was"


async def test_complete_answer_has_no_footnote(pipe: Pipeline) -> None:
    pipe.model.answer("done", finish_reason="stop")

    await pipe.responder.respond(job(incoming("100.1")))

    assert pipe.slack.replies[0].events[-1] == ("finish", None)


async def test_the_channel_persona_system_prompt_is_used(pipe: Pipeline) -> None:
    pipe.model.answer("Arr.")
    pipe.model.answer("Hello.")

    await pipe.responder.respond(job(incoming("100.1", channel="C2")))
    await pipe.responder.respond(job(incoming("100.2", channel="C1")))

    pirate_call, default_call = pipe.model.calls
    assert pirate_call.persona == PIRATE
    assert pirate_call.messages[0] == {"role": "system", "content": PIRATE.system_prompt}
    assert default_call.persona == DEFAULT
    assert default_call.messages[0] == {"role": "system", "content": DEFAULT.system_prompt}


async def test_a_retried_job_stores_its_question_once_and_rewrites_its_earlier_messages(
    pipe: Pipeline,
) -> None:
    message = incoming("100.1")
    pipe.model.fail("unavailable")
    pipe.model.answer("the answer")
    await pipe.responder.respond(job(message))
    await pipe.history.record_part(message.key, job(message).id, 0, "100.5")  # what attempt 1 wrote

    await pipe.responder.respond(job(message, attempt=2))

    assert [t.text for t in pipe.history.turns[message.key]] == ["how do I rotate a password?", "the answer"]
    retry = pipe.slack.replies[1]
    assert (retry.log.attempt, retry.log.parts) == (2, ("100.5",))
    assert retry.methods[-1] == "finish"


class SlowStoreHistory(MemoryHistory):
    """Stores a question only once ``release`` is set, then fails if ``error`` is given."""

    def __init__(self, error: HistoryError | None = None) -> None:
        super().__init__()
        self.release, self.error = asyncio.Event(), error

    async def store_question(self, key: ThreadKey, job_id: str, turn: Turn) -> None:
        await self.release.wait()
        if self.error is not None:
            raise self.error
        await super().store_question(key, job_id, turn)


async def test_the_model_is_asked_while_the_question_is_stored_and_nothing_shows_before_it_is() -> None:
    pipe = make_pipeline()
    pipe.responder.history = history = SlowStoreHistory()
    pipe.model.answer("the ", "answer")
    message = incoming("100.1")

    answering = asyncio.create_task(pipe.responder.respond(job(message)))

    async def model_asked() -> None:
        while not pipe.model.calls:  # noqa: ASYNC110 (the scripted model signals nothing)
            await asyncio.sleep(0)

    await asyncio.wait_for(model_asked(), 5)  # before the store is let through
    for _ in range(10):  # the model's first words are in; the reply waits for the store
        await asyncio.sleep(0)
    [reply] = pipe.slack.replies
    assert reply.events == [("thinking", None)]
    assert history.turns[message.key] == []

    history.release.set()
    await answering
    assert reply.methods == ["thinking", "append", "append", "finish"]
    assert [t.role for t in history.turns[message.key]] == ["user", "assistant"]


async def test_a_question_that_cannot_be_stored_fails_the_attempt_before_anything_is_written() -> None:
    pipe = make_pipeline()
    pipe.responder.history = history = SlowStoreHistory(HistoryError("storing a question: down"))
    history.release.set()
    pipe.model.answer("the answer")
    message = incoming("100.1")

    with pytest.raises(HistoryError):
        await pipe.responder.respond(job(message))

    [reply] = pipe.slack.replies
    assert reply.events == [("thinking", None)]  # no text: the retry answers, once
    assert history.turns[message.key] == []


class RecallSignals(MemoryHistory):
    def __init__(self) -> None:
        super().__init__()
        self.recalled = asyncio.Event()

    async def recall(self, key: ThreadKey, token_budget: int, *, without_ts: str = "") -> Recall:
        self.recalled.set()
        return await super().recall(key, token_budget, without_ts=without_ts)


class PersonasAfterRecall(StaticPersonas):
    """Resolves only once the thread's recall has begun: the two reads must be under way together."""

    def __init__(self, history: RecallSignals) -> None:
        super().__init__(DEFAULT)
        self.history = history

    async def resolve(self, key: ThreadKey, requested: str | None = None, *, pin: bool = True) -> Persona:
        await asyncio.wait_for(self.history.recalled.wait(), 5)
        return await super().resolve(key, requested, pin=pin)


async def test_the_persona_and_the_thread_are_read_side_by_side() -> None:
    pipe = make_pipeline()
    pipe.responder.history = history = RecallSignals()
    pipe.responder.personas = PersonasAfterRecall(history)
    pipe.model.answer("the answer")

    await pipe.responder.respond(job(incoming("100.1")))

    assert pipe.slack.replies[0].methods == ["thinking", "append", "finish"]


async def test_a_job_found_answered_is_not_answered_again(pipe: Pipeline) -> None:
    message = incoming("100.1")
    pipe.model.answer("the answer")
    await pipe.responder.respond(job(message))

    await pipe.responder.respond(job(message, attempt=2))  # its acknowledgement was lost

    assert len(pipe.model.calls) == 1 and len(pipe.slack.replies) == 1
    assert len(pipe.history.turns[message.key]) == 2


async def test_an_apology_replaces_what_the_jobs_attempts_wrote(pipe: Pipeline) -> None:
    message = incoming("100.1")
    await pipe.history.record_part(message.key, job(message).id, 0, "100.5")

    await pipe.responder.notice(job(message, attempt=4), "Sorry.")

    [reply] = pipe.slack.replies
    assert reply.log.parts == ("100.5",)
    assert reply.events == [("notice", ":warning: Sorry.")]


# files -----------------------------------------------------------------------------------------------


def picture(file_id: str, tokens: int, name: str = "") -> Attachment:
    name = name or f"{file_id}.png"
    return Attachment(
        SlackFile(file_id, name, "image/png", "png"),
        f"[image: {name}, 10x10]",
        Picture("image/png", 10, 10, tokens, tokens),
    )


def document(file_id: str, text: str) -> Attachment:
    return Attachment(
        SlackFile(file_id, f"{file_id}.txt", "text/plain", "text"), f"[file: {file_id}.txt]\n{text}"
    )


def unreadable(file_id: str, problem: str) -> Attachment:
    return Attachment(
        SlackFile(file_id, f"{file_id}.zip"), f"[file: {file_id}.zip, not read]", problem=problem
    )


def with_files(turn: Turn, *attachments: Attachment) -> Turn:
    dressed = replace(turn, attachments=attachments)
    return replace(dressed, tokens=WORDS.message_tokens(turn.role, dressed.content) + dressed.picture_tokens)


def test_images_cost_their_tokens_only_when_the_model_sees_them() -> None:
    question = make_turn("user", "what is it", name="alice")
    shot = with_files(make_turn("user", "see this", name="bob"), picture("F1", 60))
    blind = build_context("System.", [shot], question, 100, WORDS)
    seeing = build_context("System.", [shot], question, 100, WORDS, pictures=True)
    assert blind.kept_turns == 1 and blind.wanted_pictures == []
    assert blind.messages[1] == {"role": "user", "content": "bob: see this\n\n[image: F1.png, 10x10]"}
    assert seeing.kept_turns == 0 and seeing.trimmed  # 60 more tokens do not fit 100
    assert blind.estimated_tokens == message_cost(blind.messages)


def test_a_question_whose_images_alone_exceed_the_budget_goes_without_them() -> None:
    question = with_files(make_turn("user", "what is it", name="alice"), picture("F1", 500))
    context = build_context("System.", [], question, 100, WORDS, pictures=True)
    assert context.question_pictures is False and context.wanted_pictures == []
    assert context.messages[-1] == {"role": "user", "content": question.content}
    assert context.estimated_tokens <= 100


def test_images_go_as_content_parts_and_a_missing_one_is_said_to_be_gone() -> None:
    question = with_files(make_turn("user", "compare", name="alice"), picture("F2", 5))
    earlier = with_files(make_turn("user", "first", name="bob"), picture("F1", 5))
    context = replace(
        build_context("System.", [earlier], question, 500, WORDS, pictures=True),
        picture_urls={"F2": "data:image/png;base64,AAAA"},
    )
    assert [a.file.id for a in context.wanted_pictures] == ["F1", "F2"]
    assert context.messages[1]["content"] == [
        {"type": "text", "text": "bob: first\n\n[image: F1.png, 10x10]"},
        {"type": "text", "text": "(The image F1.png is no longer available.)"},
    ]
    assert context.messages[2]["content"] == [
        {"type": "text", "text": "alice: compare\n\n[image: F2.png, 10x10]"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
    ]
    assert context.billed_beyond_context == 0


def files_pipeline(
    files: ShelfFiles, *, sees_images: bool = True, thread: list[SlackMessage] | None = None
) -> Pipeline:
    pipe = make_pipeline(thread)
    pipe.model.images = sees_images
    pipe.responder.files = files
    return pipe


async def test_a_question_with_files_carries_what_was_read_and_names_what_was_not() -> None:
    files = ShelfFiles(
        [document("F1", "ERROR disk full"), unreadable("F2", "an archive"), picture("F3", 7)],
        urls={"F3": "data:image/png;base64,BBBB"},
    )
    pipe = files_pipeline(files)
    pipe.model.answer("Free some disk.")
    message = replace(
        incoming("100.1", f"<@{BOT_USER_ID}> why?"), files=tuple(a.file for a in files.attachments.values())
    )

    await pipe.responder.respond(job(message))

    assert files.reads == [["F1", "F2", "F3"]]
    asked = pipe.model.calls[0].messages[-1]["content"]
    assert isinstance(asked, list)
    assert asked[0] == {
        "type": "text",
        "text": "alice: why?\n\n[file: F1.txt]\nERROR disk full\n\n[file: F2.zip, not read]"
        "\n\n[image: F3.png, 10x10]",
    }
    assert asked[1]["type"] == "image_url"
    [reply] = pipe.slack.replies
    assert reply.events[1] == ("append", "_(I couldn't read F2.zip (an archive).)_\n\n")
    [question, _] = pipe.history.turns[message.key]
    assert question.attachments == tuple(files.attachments.values())
    assert question.tokens == WORDS.message_tokens("user", question.content) + 7


async def test_a_model_that_sees_no_images_is_not_sent_any_and_the_asker_is_told() -> None:
    files = ShelfFiles([picture("F3", 7, "shot.png")], urls={"F3": "data:image/png;base64,BBBB"})
    pipe = files_pipeline(files, sees_images=False)
    pipe.model.answer("ok")
    message = replace(incoming("100.1"), files=(files.attachments["F3"].file,))

    await pipe.responder.respond(job(message))

    assert files.url_requests == []
    assert isinstance(pipe.model.calls[0].messages[-1]["content"], str)
    assert pipe.slack.replies[0].events[1] == (
        "append",
        "_(This model doesn't see images, so I didn't look at shot.png.)_\n\n",
    )


async def test_images_refused_by_the_endpoint_are_dropped_and_the_answer_says_so() -> None:
    files = ShelfFiles([picture("F3", 7)], urls={"F3": "data:image/png;base64,BBBB"})
    pipe = files_pipeline(files)
    pipe.model.fail("images_refused")
    pipe.model.answer("from the text")
    message = replace(incoming("100.1"), files=(files.attachments["F3"].file,))

    await pipe.responder.respond(job(message))

    first, second = pipe.model.calls
    assert isinstance(first.messages[-1]["content"], list)
    assert isinstance(second.messages[-1]["content"], str)
    assert pipe.slack.replies[0].events[1:] == [
        ("append", PICTURES_REFUSED + "\n\n"),
        ("append", "from the text"),
        ("finish", None),
    ]


async def test_an_unseen_thread_has_the_files_of_its_newest_messages_read() -> None:
    count = THREAD_FILES_READ + 2
    shelf = [document(f"F{i}", f"file {i}") for i in range(count)]
    thread = [
        SlackMessage(f"200.{i + 1}", "user", "U2", "bob", f"message {i}", (shelf[i].file,))
        for i in range(count)
    ]
    thread.append(SlackMessage("200.99", "user", "U1", "alice", "summarise"))
    files = ShelfFiles(shelf)
    pipe = files_pipeline(files, thread=thread)
    pipe.model.answer("ok")
    mention = incoming("200.99", f"<@{BOT_USER_ID}> summarise", thread_ts="200.1")

    await pipe.responder.respond(job(mention))

    assert [ids for ids in files.reads] == [[f"F{i}"] for i in range(2, count)]
    stored = pipe.history.turns[mention.key]
    assert (
        stored[0].attachments[0].problem == TOO_FAR_BACK and stored[1].attachments[0].problem == TOO_FAR_BACK
    )
    assert stored[2].attachments == (shelf[2],)


# Responder.respond_to_shortcut ---------------------------------------------------------------------


def shortcut(kind: ShortcutKind = "ask", *, only_me: bool = False, question: str = "why?") -> Job:
    used = Shortcut(
        kind,
        "s1",
        ThreadKey(TEAM, "C1", "100.1"),
        "100.2",
        "U1",
        "U2",
        "it broke",
        "https://r/1",
        question=question,
        only_me=only_me,
    )
    return Job("job-s1", used)


async def test_a_shortcut_answer_in_the_thread_is_stored_nowhere_and_not_repeated_when_retried(
    pipe: Pipeline,
) -> None:
    pipe.model.answer("Because.")
    await pipe.responder.respond_to_shortcut(shortcut())
    [reply] = pipe.slack.replies
    assert reply.text == "_alice asked about bob's message: “why?”_\n\nBecause."
    assert pipe.history.turns == {}  # no turn of the thread, so a later mention reads it from Slack
    # A retry whose acknowledgement was lost finds the job answered and does nothing.
    await pipe.responder.respond_to_shortcut(replace(shortcut(), attempt=2))
    assert len(pipe.slack.replies) == 1  # nothing written again
    assert pipe.model.pending == 0 and len(pipe.model.calls) == 1


async def test_a_model_failure_and_a_dead_shortcut_are_told_to_the_asker_alone_when_only_me(
    pipe: Pipeline,
) -> None:
    pipe.model.fail("timeout")
    await pipe.responder.respond_to_shortcut(shortcut(only_me=True))
    await pipe.responder.notice(shortcut(only_me=True), "Sorry.")
    assert pipe.slack.replies == []
    (url, failed), (_, apology) = pipe.slack.private_replies
    assert url == "https://r/1"
    assert failed.events == [("thinking", None), ("fail", ModelError("timeout").user_message)]
    assert apology.events == [("notice", ":warning: Sorry.")]


async def test_a_translation_gets_a_translator_prompt_in_the_users_language_and_the_bare_message(
    pipe: Pipeline,
) -> None:
    pipe.slack.language = "Japanese"
    pipe.model.answer("壊れた")
    await pipe.responder.respond_to_shortcut(shortcut("translate", only_me=True, question=""))
    system, message = contents(pipe.model.calls[0].messages)
    assert "into Japanese" in system[1] and message == ("user", "it broke")
    [(_, reply)] = pipe.slack.private_replies
    assert reply.text == "壊れた"
