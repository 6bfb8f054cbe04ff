"""Pure functions of the adapters: Slack event parsing, markup and message splitting, settings, personas,
token counting and offline encodings, and the OpenAI request and error mapping."""

from __future__ import annotations

import gc
import hashlib
import os
import random
import re
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import tiktoken

from bot.domain import Persona, StreamEnd, ThreadKey
from bot.errors import ConfigError
from bot.llm import OpenAIChat, error_kind, make_client
from bot.personas import FilePersonas, parse_personas
from bot.places import ChannelSet
from bot.processes import YOUNG_GENERATION_THRESHOLD, tune_garbage_collector
from bot.settings import Serving, Settings, load_settings
from bot.slack import mentioned_users, parse_event, readable_markup, split_message
from bot.tokens import TiktokenCounter, encoding_name_for, load_encoding, seed_cache
from tests.fake_model import FakeModel, Reply

BOT = "UBOT"
TEAM = "T1"

# bot.slack.parse_event ---------------------------------------------------------------------------------


def event(**fields: Any) -> dict[str, Any]:
    """A ``message`` event from a person in a public channel; ``fields`` override or add keys."""
    base: dict[str, Any] = {
        "type": "message",
        "channel": "C1",
        "channel_type": "channel",
        "user": "U1",
        "text": "hello",
        "ts": "1700000000.000200",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(event(user=BOT, text=f"<@{BOT}> me"), id="own-message"),
        pytest.param(event(type="app_mention", user=BOT, text=f"<@{BOT}> me"), id="own-mention"),
        pytest.param(event(bot_id="B2", text=f"<@{BOT}> hi"), id="other-bot"),
        pytest.param(event(bot_id="B2", user="U7", channel="D1", channel_type="im"), id="other-bot-dm"),
        pytest.param(event(subtype="message_changed", text=f"<@{BOT}> hi"), id="message_changed"),
        pytest.param(event(subtype="message_deleted", text=f"<@{BOT}> hi"), id="message_deleted"),
        pytest.param(event(subtype="channel_join", text=f"<@{BOT}> joined"), id="channel_join"),
        pytest.param(event(text="just chatting"), id="top-level-chatter"),
        pytest.param(event(type="reaction_added"), id="other-event-type"),
    ],
)
def test_parse_event_ignores_what_the_bot_must_not_answer(raw: dict[str, Any]) -> None:
    assert parse_event(raw, team=TEAM, bot_user_id=BOT) is None


def test_parse_event_accepts_an_app_mention() -> None:
    raw = event(type="app_mention", channel_type=None, text=f"<@{BOT}> hi")

    incoming = parse_event(raw, team=TEAM, bot_user_id=BOT)

    assert incoming is not None
    assert incoming.key == ThreadKey(TEAM, "C1", "1700000000.000200")
    assert incoming.ts == "1700000000.000200"
    assert incoming.user_id == "U1"
    assert incoming.text == f"<@{BOT}> hi"
    assert incoming.addressed is True
    assert incoming.is_dm is False
    assert incoming.in_thread is False


def test_parse_event_accepts_a_direct_message_without_mention() -> None:
    incoming = parse_event(event(channel="D1", channel_type="im", text="hi"), team=TEAM, bot_user_id=BOT)

    assert incoming is not None
    assert incoming.is_dm is True
    assert incoming.addressed is True
    assert incoming.key == ThreadKey(TEAM, "D1", "1700000000.000200")


def test_parse_event_accepts_thread_replies_addressed_only_with_a_mention() -> None:
    plain = parse_event(event(thread_ts="1700000000.000100"), team=TEAM, bot_user_id=BOT)
    mention = parse_event(
        event(thread_ts="1700000000.000100", text=f"hey <@{BOT}>"), team=TEAM, bot_user_id=BOT
    )

    assert plain is not None and mention is not None
    assert plain.addressed is False
    assert mention.addressed is True
    for incoming in (plain, mention):
        assert incoming.key == ThreadKey(TEAM, "C1", "1700000000.000100")
        assert incoming.in_thread is True


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(event(subtype="file_share", text=f"<@{BOT}> look at this"), id="file_share"),
        pytest.param(
            event(subtype="thread_broadcast", thread_ts="1700000000.000100", text="also to channel"),
            id="thread_broadcast",
        ),
    ],
)
def test_parse_event_accepts_subtypes_that_are_still_people_talking(raw: dict[str, Any]) -> None:
    incoming = parse_event(raw, team=TEAM, bot_user_id=BOT)

    assert incoming is not None
    assert incoming.key.thread_ts == raw.get("thread_ts", raw["ts"])


def test_parse_event_thread_key_uses_thread_ts_else_ts() -> None:
    top = parse_event(event(ts="5.1", text=f"<@{BOT}> a"), team=TEAM, bot_user_id=BOT)
    reply = parse_event(event(ts="5.2", thread_ts="5.1"), team=TEAM, bot_user_id=BOT)

    assert top is not None and reply is not None
    assert top.key.thread_ts == "5.1"
    assert reply.key.thread_ts == "5.1"
    assert top.key == reply.key


def test_parse_event_dedup_key_is_the_same_for_app_mention_and_message_events() -> None:
    text = f"<@{BOT}> question"
    mention = parse_event(event(type="app_mention", channel_type=None, text=text), team=TEAM, bot_user_id=BOT)
    message = parse_event(event(text=text), team=TEAM, bot_user_id=BOT)
    other = parse_event(event(text=text, ts="1700000000.000300"), team=TEAM, bot_user_id=BOT)

    assert mention is not None and message is not None and other is not None
    assert mention.dedup_key == message.dedup_key
    assert other.dedup_key != mention.dedup_key


# bot.slack.readable_markup -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("ask <@U123> please", "ask @Alice please"),
        (f"<@{BOT}> what is up?", "what is up?"),
        (f"hey <@{BOT}>, thanks", "hey , thanks"),
        ("<@U999|bob> said", "@bob said"),
        ("in <#C1|general> now", "in #general now"),
        ("see <https://x.io|label>", "see label (https://x.io)"),
        ("see <https://x.io>", "see https://x.io"),
        ("mail <mailto:a@b.c|a@b.c>", "mail a@b.c"),
        ("<!here> heads up", "@here heads up"),
        ("ping <!subteam^S1|@team>", "ping @team"),
        ("a &amp; b &lt;c&gt;", "a & b <c>"),
        # Text without markup, entities or runs of blanks comes back as it was, only stripped.
        ("  plain words, nothing to change ", "plain words, nothing to change"),
        ("two  spaces,\ta tab and\t\ttwo", "two spaces,\ta tab and two"),
        ("a \t blank run", "a blank run"),
        ("ask <@U123>  twice", "ask @Alice twice"),
    ],
)
def test_readable_markup(markup: str, expected: str) -> None:
    assert readable_markup(markup, {"U123": "Alice"}, BOT) == expected


def test_mentioned_users_only_well_formed_mentions() -> None:
    assert mentioned_users("no mention at all, not even @U123") == set()
    assert mentioned_users("<@U123> and <@U9|bob>, not <#C1|general> or <@bad id>") == {"U123", "U9"}


# bot.slack.split_message -------------------------------------------------------------------------------

SENTENCES = [
    "Redis keeps the thread history close to the bot.",
    "Every reply streams into Slack as the model writes it.",
    "The token budget decides how much of the thread is sent.",
    "Rotate the password, then restart the clients one by one.",
    "Nothing here should ever reach the network during tests.",
]
JAPANESE = [
    "スレッドの履歴はRedisに保存されます。",
    "返信はモデルが書くそばからSlackに流れます。",
    "トークンの予算で送る量が決まります。",
    "パスワードを変更してから、クライアントを一つずつ再起動してください。",
]


def _paragraph(rng: random.Random, sentences: list[str], n: int, sep: str = " ") -> str:
    return sep.join(rng.choice(sentences) for _ in range(n))


def _code(rng: random.Random, lines: int, lang: str = "python", indent: str = "") -> str:
    body = []
    for i in range(lines):
        body.append(f"def step_{i}(x):" if i % 3 == 0 else f"    return x * {rng.randint(1, 99)}  # {i}")
        if i % 3 == 2:
            body.append("")  # blank lines inside the code, like real code
    return "\n".join(f"{indent}{line}" if line else "" for line in [f"```{lang}", *body, "```"]) + "\n"


def text_paragraphs(rng: random.Random) -> str:
    return "\n\n".join(_paragraph(rng, SENTENCES, rng.randint(1, 12)) for _ in range(40)) + "\n"


def text_lists(rng: random.Random) -> str:
    bullets = "\n".join(f"- {_paragraph(rng, SENTENCES, rng.randint(1, 3))}" for _ in range(80))
    numbered = "\n".join(
        f"{i}. {_paragraph(rng, SENTENCES, 2)}\n   - nested detail {i}" for i in range(1, 40)
    )
    return f"# Steps\n\nFirst the bullets:\n\n{bullets}\n\nThen in order:\n\n{numbered}\n"


def text_big_code(rng: random.Random) -> str:
    return (
        f"{_paragraph(rng, SENTENCES, 3)}\n\n{_code(rng, 150)}\n{_paragraph(rng, SENTENCES, 4)}\n\n"
        f"{_code(rng, 90, 'bash')}{_paragraph(rng, SENTENCES, 2)}\n"
    )


def text_giant_paragraph(rng: random.Random) -> str:
    return _paragraph(rng, SENTENCES, 120)


def text_japanese(rng: random.Random) -> str:
    paragraphs = [_paragraph(rng, JAPANESE, rng.randint(2, 10), sep="") for _ in range(30)]
    giant = _paragraph(rng, JAPANESE, 60, sep="")  # no spaces, no newlines
    return "\n\n".join([*paragraphs[:6], giant, _code(rng, 60, "text"), *paragraphs[6:]]) + "\n"


def text_code_in_list(rng: random.Random) -> str:
    return (
        f"1. {_paragraph(rng, SENTENCES, 2)}\n\n{_code(rng, 200, 'bash', indent='   ')}\n"
        f"2. {_paragraph(rng, SENTENCES, 2)}\n"
    )


TEXTS: dict[str, Callable[[random.Random], str]] = {
    "paragraphs": text_paragraphs,
    "lists": text_lists,
    "big-code-blocks": text_big_code,
    "giant-paragraph": text_giant_paragraph,
    "japanese": text_japanese,
    "code-block-in-a-list-item": text_code_in_list,
}
_FENCE_LINE = re.compile(r"^ {0,3}```")


def _fence_lines(part: str) -> int:
    return sum(1 for line in part.split("\n") if _FENCE_LINE.match(line))


def _split_all(text: str, limit: int) -> list[tuple[str, str, str]]:
    """Split ``text`` until nothing is left; each step as (text before the step, head, tail)."""
    steps = []
    rest = text
    while rest:
        head, tail = split_message(rest, limit)
        steps.append((rest, head, tail))
        assert len(steps) < 1000, "splitting does not make progress"
        rest = tail
    return steps


@pytest.mark.parametrize("limit", [400, 1500])
@pytest.mark.parametrize("name", list(TEXTS))
def test_split_message_parts_fit_the_limit_and_keep_code_fences_balanced(name: str, limit: int) -> None:
    text = TEXTS[name](random.Random(name))
    assert len(text) > 3 * limit

    parts = [head for _, head, _ in _split_all(text, limit)]

    assert len(parts) > 1
    for part in parts:
        assert 0 < len(part) <= limit + 10
        assert _fence_lines(part) % 2 == 0, f"unbalanced code fence in part: {part[:80]!r}…{part[-80:]!r}"


@pytest.mark.parametrize("limit", [400, 1500])
@pytest.mark.parametrize("name", list(TEXTS))
def test_split_message_loses_nothing_but_adds_fence_lines(name: str, limit: int) -> None:
    text = TEXTS[name](random.Random(name))

    for rest, head, tail in _split_all(text, limit):
        if head + tail == rest:
            continue
        # A cut inside a code block: the head got a closing fence line, the tail an opening one.
        closing = head.rsplit("\n", 1)[-1]
        opening, _, body = tail.partition("\n")
        assert _FENCE_LINE.match(closing) and _FENCE_LINE.match(opening)
        assert head[: -len(closing)] + body == rest, "the text around a mended code fence changed"


def test_split_message_returns_short_text_whole() -> None:
    assert split_message("short text\n\nand more", 100) == ("short text\n\nand more", "")


def test_split_message_prefers_the_last_paragraph_boundary_that_fits() -> None:
    first = "First paragraph. " * 8 + "\n\n"
    second = "Second paragraph. " * 6 + "\n\n"
    third = "\n".join(f"line {i} of a paragraph with soft line breaks" for i in range(40)) + "\n"
    text = first + second + third
    limit = len(first) + len(second) + 300  # a few lines of the third paragraph would fit too

    head, tail = split_message(text, limit)

    assert head == first + second
    assert tail == third


def test_split_message_prefers_a_paragraph_boundary_to_a_line_break() -> None:
    first = "\n".join(f"soft line {i}" for i in range(10)) + "\n\n"
    second = "\n".join(f"another soft line {i}" for i in range(50)) + "\n"
    text = first + second

    head, tail = split_message(text, len(first) + 200)

    assert head == first
    assert tail == second


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "Intro.\n\n" + "\n".join(f"line {i} of one long paragraph" for i in range(80)), id="lines"
        ),
        pytest.param("Intro.\n\n" + " ".join(f"word{i}" for i in range(600)), id="spaces"),
        pytest.param("はじめに。\n\n" + "日本語の文章です。" * 200, id="no-spaces"),
    ],
)
@pytest.mark.parametrize("floor", [50, 300, 599])
def test_split_message_never_cuts_before_floor(text: str, floor: int) -> None:
    head, tail = split_message(text, 600, floor=floor)

    assert len(head) > floor
    assert len(head) <= 600
    assert head + tail == text


def test_split_message_never_cuts_before_floor_inside_a_code_block() -> None:
    text = _code(random.Random(1), 200)

    head, tail = split_message(text, 800, floor=700)

    assert len(head) > 700 + len("\n```")
    assert head.endswith("\n```")
    assert tail.startswith("```python\n")


# bot.settings.load_settings ----------------------------------------------------------------------------

_SETTING_NAMES = {name.upper() for name in Settings.model_fields} | {
    "TIKTOKEN_CACHE_DIR",
    "DATA_GYM_CACHE_DIR",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The process environment without any setting the bot reads, so the developer's cannot leak in."""
    for name in list(os.environ):
        upper = name.upper()
        if upper in _SETTING_NAMES or upper.startswith(("SLACK_", "OPENAI_", "REDIS_")):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _valid_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("SLACK_BOT_TOKEN", "xoxb-secret-bot-token")
    env.setenv("SLACK_APP_TOKEN", "xapp-secret-app-token")
    env.setenv("SLACK_SIGNING_SECRET", "secret-signing-value")
    env.setenv("OPENAI_API_KEY", "sk-secret-api-key")


def test_load_settings_reports_every_bad_setting_in_one_error(clean_env: pytest.MonkeyPatch) -> None:
    _valid_env(clean_env)
    clean_env.delenv("SLACK_BOT_TOKEN")
    clean_env.setenv("MAX_PROMPT_TOKENS", "abc")
    clean_env.setenv("STREAM_MODE", "sideways")
    clean_env.setenv("REDIS_URL", "http://x")

    with pytest.raises(ConfigError) as raised:
        load_settings(env_file=None)

    problems = raised.value.problems
    assert len(problems) == 4, problems
    for name in ("MAX_PROMPT_TOKENS", "STREAM_MODE", "REDIS_URL", "SLACK_BOT_TOKEN"):
        assert sum(p.startswith(name) for p in problems) == 1, (name, problems)
    assert all(name in str(raised.value) for name in ("MAX_PROMPT_TOKENS", "STREAM_MODE", "REDIS_URL"))


def test_channel_lists_take_ids_and_names_and_name_what_is_neither(clean_env: pytest.MonkeyPatch) -> None:
    _valid_env(clean_env)
    clean_env.setenv("ALLOWED_CHANNELS", "C0123ABC, #General,help-desk")
    allowed, denied = load_settings(env_file=None).places
    assert allowed == ChannelSet(frozenset({"C0123ABC"}), frozenset({"general", "help-desk"}))
    assert not denied

    clean_env.setenv("DENIED_CHANNELS", "ok,not a channel!")
    clean_env.setenv("ALLOW_DMS", "perhaps")
    with pytest.raises(ConfigError) as raised:
        load_settings(env_file=None)
    assert [p.split(":")[0] for p in raised.value.problems] == ["DENIED_CHANNELS", "ALLOW_DMS"]
    assert "'not a channel!' is neither a channel id (C…) nor a channel name" in raised.value.problems[0]


def test_load_settings_builds_settings_from_a_valid_environment(clean_env: pytest.MonkeyPatch) -> None:
    _valid_env(clean_env)
    clean_env.setenv("MAX_PROMPT_TOKENS", "4096")
    clean_env.setenv("STREAM_MODE", "update")
    clean_env.setenv("REDIS_URL", "redis://localhost:6379/2")
    clean_env.setenv("SLACK_API_URL", "http://127.0.0.1:9999/api")

    settings = load_settings(env_file=None)

    assert isinstance(settings, Settings)
    assert settings.max_prompt_tokens == 4096
    assert settings.stream_mode == "update"
    assert settings.redis_url == "redis://localhost:6379/2"
    assert settings.slack_api_url == "http://127.0.0.1:9999/api/"
    assert settings.slack_bot_token is not None
    assert settings.slack_bot_token.get_secret_value() == "xoxb-secret-bot-token"


@pytest.mark.parametrize(
    ("serving", "required", "value", "other"),
    [
        ("http", "SLACK_SIGNING_SECRET", "secret-signing-value", "slack_app_token"),
        ("socket", "SLACK_APP_TOKEN", "xapp-secret-app-token", "slack_signing_secret"),
        ("worker", "REDIS_URL", "redis://127.0.0.1:6379/0", "slack_app_token"),
    ],
    ids=["http-needs-signing-secret", "socket-mode-needs-app-token", "a-worker-needs-a-shared-redis"],
)
def test_load_settings_requires_what_the_serving_mode_needs(
    clean_env: pytest.MonkeyPatch, serving: Serving, required: str, value: str, other: str
) -> None:
    _valid_env(clean_env)
    clean_env.delenv("SLACK_SIGNING_SECRET")
    clean_env.delenv("SLACK_APP_TOKEN")

    with pytest.raises(ConfigError) as raised:
        load_settings(serving=serving, env_file=None)

    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(required)
    clean_env.setenv(required, value)
    assert getattr(load_settings(serving=serving, env_file=None), other) is None


def test_settings_repr_hides_secrets(clean_env: pytest.MonkeyPatch) -> None:
    _valid_env(clean_env)

    settings = load_settings(env_file=None)

    shown = repr(settings) + str(settings)
    for secret in (
        "xoxb-secret-bot-token",
        "xapp-secret-app-token",
        "secret-signing-value",
        "sk-secret-api-key",
    ):
        assert secret not in shown


# bot.personas ------------------------------------------------------------------------------------------

VALID_PERSONAS = """
personas:
  pirate:
    system_prompt: "You are a pirate. Answer like one."
    model: gpt-4o
    temperature: 0.9
  terse:
    system_prompt: Answer in one line.
    stop: ["\\n\\n"]
channels:
  C0123: pirate
"""


def test_parse_personas_sets_only_the_given_parameters() -> None:
    personas, channels = parse_personas(VALID_PERSONAS)

    assert personas == {
        "pirate": Persona(
            name="pirate", system_prompt="You are a pirate. Answer like one.", model="gpt-4o", temperature=0.9
        ),
        "terse": Persona(name="terse", system_prompt="Answer in one line.", stop=("\n\n",)),
    }
    pirate = personas["pirate"]
    assert (
        pirate.top_p,
        pirate.max_tokens,
        pirate.presence_penalty,
        pirate.frequency_penalty,
        pirate.stop,
    ) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert channels == {"C0123": "pirate"}


def test_parse_personas_reports_every_problem_at_once() -> None:
    text = """
personas:
  wild:
    system_prompt: Go wild.
    temperature: 3
    stop: [a, b, c, d, e]
    colour: red
"""
    with pytest.raises(ConfigError) as raised:
        parse_personas(text)

    problems = raised.value.problems
    assert len(problems) == 3, problems
    assert any("temperature" in p for p in problems)
    assert any("stop" in p for p in problems)
    assert any("colour" in p for p in problems)


def test_parse_personas_reads_an_unquoted_vision_switch_as_written() -> None:
    # YAML turns an unquoted on/off into true/false.
    text = """
personas:
  eyes:
    system_prompt: Look.
    vision: on
  blind:
    system_prompt: No.
    vision: off
"""

    personas, _ = parse_personas(text)

    assert (personas["eyes"].vision, personas["blind"].vision) == ("on", "off")
    with pytest.raises(ConfigError) as raised:
        parse_personas("personas:\n  odd:\n    system_prompt: Hm.\n    vision: maybe\n")
    assert "vision" in raised.value.problems[0]


def test_parse_personas_rejects_a_channel_mapped_to_an_unknown_persona() -> None:
    text = "personas:\n  pirate:\n    system_prompt: Arr.\nchannels:\n  C1: pirate\n  C2: ghost\n"

    with pytest.raises(ConfigError) as raised:
        parse_personas(text)

    assert len(raised.value.problems) == 1
    assert "C2" in raised.value.problems[0] and "ghost" in raised.value.problems[0]


def test_file_personas_load_reports_problems_with_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "personas.yaml"
    path.write_text("personas:\n  x:\n    system_prompt: ''\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        FilePersonas.load("Default prompt.", path)

    assert str(path) in raised.value.problems[0]


# bot.tokens --------------------------------------------------------------------------------------------

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def _cache_file(cache_dir: Path, url: str = O200K_URL) -> Path:
    """Where tiktoken caches the file it would download from ``url``."""
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return load_encoding("o200k_base", Path(os.environ["TIKTOKEN_CACHE_DIR"]))


def test_load_encoding_works_offline_from_the_bundled_file(o200k: tiktoken.Encoding) -> None:
    cached = _cache_file(Path(os.environ["TIKTOKEN_CACHE_DIR"]))

    assert o200k.name == "o200k_base"
    assert o200k.decode(o200k.encode("hello world")) == "hello world"
    assert cached.is_file()
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == O200K_SHA256


def test_seed_cache_replaces_a_corrupted_cached_file(tmp_path: Path) -> None:
    cached = _cache_file(tmp_path)
    cached.write_bytes(b"not an encoding file")

    assert seed_cache("o200k_base", tmp_path) is True

    assert hashlib.sha256(cached.read_bytes()).hexdigest() == O200K_SHA256


def test_load_encoding_rejects_an_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_encoding("no_such_encoding", tmp_path)


@pytest.mark.parametrize(
    ("model", "override", "expected"),
    [
        ("gpt-4", None, "cl100k_base"),
        ("gpt-4o", None, "o200k_base"),
        ("gpt-4o-mini", None, "o200k_base"),
        ("my-azure-deployment", None, "o200k_base"),
        ("llama3.1:8b", None, "o200k_base"),
        ("gpt-4o", "cl100k_base", "cl100k_base"),
        ("gpt-4", "o200k_base", "o200k_base"),
    ],
)
def test_encoding_name_for(model: str, override: str | None, expected: str) -> None:
    assert encoding_name_for(model, override) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "スレッドの履歴はRedisに保存されます。絵文字も🎉👨‍👩‍👧‍👦混ざります🇯🇵。" * 3, id="japanese-emoji"
        ),
        pytest.param(
            "The quick brown fox 🦊 jumps over the lazy dog 🐶; naïve café, 한국어 too.", id="latin-emoji"
        ),
    ],
)
def test_tiktoken_truncate_cuts_at_a_token_boundary(o200k: tiktoken.Encoding, text: str) -> None:
    counter = TiktokenCounter(o200k)
    total = len(o200k.encode_ordinary(text))

    for n in range(total + 2):
        cut = counter.truncate(text, n)
        assert text.startswith(cut), n
        assert len(o200k.encode_ordinary(cut)) <= n, n
        assert not cut.endswith("\ufffd"), n
    assert counter.truncate(text, total) == text
    assert counter.truncate(text, 0) == ""


def test_tiktoken_message_tokens_follow_the_cookbook(o200k: tiktoken.Encoding) -> None:
    counter = TiktokenCounter(o200k)

    expected = 3 + len(o200k.encode_ordinary("user")) + len(o200k.encode_ordinary("hello world"))

    assert counter.message_tokens("user", "hello world") == expected
    assert counter.encoding_name == "o200k_base"


# bot.llm -----------------------------------------------------------------------------------------------

MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    async with make_client(
        api_key="sk-test",
        base_url="http://127.0.0.1:9/v1",
        organization=None,
        project=None,
        timeout_seconds=5,
        max_retries=0,
    ) as client:
        yield client


def test_request_without_persona_parameters_has_only_the_required_ones(client: openai.AsyncOpenAI) -> None:
    chat = OpenAIChat(client, defaults=Persona("settings", "", model="gpt-4o-mini"))

    request = chat.request(MESSAGES, Persona("default", "Be brief."))

    assert request == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_request_includes_every_parameter_the_persona_sets(client: openai.AsyncOpenAI) -> None:
    chat = OpenAIChat(client, defaults=Persona("settings", "", model="gpt-4o-mini", max_tokens=500))
    persona = Persona(
        "full",
        "Be brief.",
        model="gpt-4o",
        temperature=0.0,
        top_p=0.5,
        max_tokens=64,
        presence_penalty=0.1,
        frequency_penalty=-0.2,
        stop=("END",),
    )

    request = chat.request(MESSAGES, persona)

    assert request == {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "top_p": 0.5,
        "max_completion_tokens": 64,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "stop": ["END"],
    }


def test_request_sends_only_the_one_parameter_a_persona_sets(client: openai.AsyncOpenAI) -> None:
    chat = OpenAIChat(client, defaults=Persona("settings", "", model="gpt-4o-mini"))

    request = chat.request(MESSAGES, Persona("warm", "Be brief.", temperature=1.2))

    assert set(request) == {"model", "messages", "stream", "stream_options", "temperature"}
    assert request["temperature"] == 1.2


def test_request_max_completion_tokens_falls_back_to_max_reply_tokens(client: openai.AsyncOpenAI) -> None:
    chat = OpenAIChat(client, defaults=Persona("settings", "", model="gpt-4o-mini", max_tokens=500))

    assert chat.request(MESSAGES, Persona("default", "Be brief."))["max_completion_tokens"] == 500
    assert chat.request(MESSAGES, Persona("short", "Be brief.", max_tokens=20))["max_completion_tokens"] == 20


@pytest.mark.parametrize("seed", [42, 2**70], ids=["plain", "an-integer-orjson-refuses"])
async def test_a_stream_sends_its_body_to_the_endpoint_url_and_reads_the_answer(seed: int) -> None:
    # The body goes out as JSON made by orjson, or by the client's json for what orjson cannot encode
    # (an integer beyond 64 bits); the URL is the base URL's, with its path kept.
    model = FakeModel()
    await model.start()
    model.script(Reply(text="Short answer.", chunk_size=4))
    try:
        async with make_client(
            api_key="sk-test",
            base_url=model.base_url,
            organization=None,
            project=None,
            timeout_seconds=5,
            max_retries=0,
        ) as client:
            chat = OpenAIChat(client, defaults=Persona("settings", "", model="gpt-4o-mini"))
            persona = Persona("default", "Be brief.", seed=seed)
            pieces = [piece async for piece in chat.stream(MESSAGES, persona)]
    finally:
        await model.close()

    assert "".join(p for p in pieces if isinstance(p, str)) == "Short answer."
    assert isinstance(pieces[-1], StreamEnd) and pieces[-1].finish_reason == "stop"
    assert model.requests[0]["messages"] == MESSAGES
    assert model.requests[0]["seed"] == seed
    assert model.request_paths == ["/v1/chat/completions"]
    assert model.request_headers[0]["content-type"] == "application/json"


_REQUEST = httpx2.Request("POST", "https://api.example.test/v1/chat/completions")


def _status_error(
    cls: type[openai.APIStatusError], status: int, code: str | None = None
) -> openai.APIStatusError:
    """An API error built the way the openai client builds one from an error response."""
    body = {"error": {"message": "scripted", "type": "invalid_request_error", "param": None, "code": code}}
    response = httpx2.Response(status, request=_REQUEST, json=body)
    return cls(f"Error code: {status}", response=response, body=body["error"])


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(lambda: _status_error(openai.AuthenticationError, 401), "auth", id="401"),
        pytest.param(lambda: _status_error(openai.PermissionDeniedError, 403), "auth", id="403"),
        pytest.param(
            lambda: _status_error(openai.RateLimitError, 429, "rate_limit_exceeded"), "rate_limit", id="429"
        ),
        pytest.param(lambda: openai.APITimeoutError(request=_REQUEST), "timeout", id="timeout"),
        pytest.param(lambda: openai.APIConnectionError(request=_REQUEST), "unavailable", id="connection"),
        pytest.param(lambda: _status_error(openai.InternalServerError, 500), "unavailable", id="500"),
        pytest.param(lambda: _status_error(openai.InternalServerError, 503), "unavailable", id="503"),
        pytest.param(lambda: _status_error(openai.APIStatusError, 502), "unavailable", id="502-generic"),
        pytest.param(
            lambda: _status_error(openai.BadRequestError, 400, "context_length_exceeded"),
            "context_length",
            id="400-context-length",
        ),
        pytest.param(lambda: _status_error(openai.BadRequestError, 400), "bad_request", id="400"),
        pytest.param(
            lambda: _status_error(openai.NotFoundError, 404, "model_not_found"), "model_not_found", id="404"
        ),
        pytest.param(lambda: _status_error(openai.ConflictError, 409), "unknown", id="409"),
        pytest.param(lambda: openai.OpenAIError("odd"), "unknown", id="plain-openai-error"),
    ],
)
def test_error_kind_maps_openai_exceptions(make: Callable[[], openai.OpenAIError], kind: str) -> None:
    assert error_kind(make()) == kind


# bot.params ---------------------------------------------------------------------------------------------


def test_persona_and_settings_declare_exactly_the_chat_parameters_with_their_ranges() -> None:
    from dataclasses import fields

    from bot.params import PARAMS

    assert [f.name for f in fields(Persona)] == ["name", "system_prompt", *(p.name for p in PARAMS)]
    for param in PARAMS:
        declared = Settings.model_fields[param.setting]
        if param.name == "model":  # OPENAI_MODEL has a default; every other one is unset unless set
            assert declared.annotation is param.annotation and declared.default == "gpt-4o-mini"
        else:
            assert declared.annotation == param.annotation | None and declared.default is None, param.name


# bot.processes -----------------------------------------------------------------------------------------


def test_tuning_the_collector_freezes_what_lives_collects_the_garbage_first_and_waits_longer() -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    kept = Node()
    garbage, partner = Node(), Node()
    garbage.other, partner.other = partner, garbage  # a cycle only the collector can free
    gone = weakref.ref(garbage)
    del garbage, partner
    thresholds = gc.get_threshold()
    gc.disable()  # no collection of its own between here and the freeze
    try:
        tune_garbage_collector()
        assert gone() is None  # collected, not frozen for good
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: out of the collector's passes
        # the youngest generation waits for more allocations; the older ones keep their ratios
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *thresholds[1:])
        assert thresholds[0] < YOUNG_GENERATION_THRESHOLD
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        gc.enable()
