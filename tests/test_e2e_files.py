"""End to end, questions with files: images shown to the model, documents read as text, what cannot be
read named in the reply, follow-ups that still see an earlier file, files read from a thread the bot
had not seen, deletions honoured, and nothing of a file in the logs.

The real bot (Bolt in Socket Mode, slack_sdk, openai, Redis, the converter's child processes) against
the fake Slack, which serves files only to the bot token, and the fake model. Files are made here.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import orjson
import pytest
from PIL import Image

from bot.domain import Picture
from bot.tokens import TiktokenCounter, picture_tokens
from tests import samples
from tests.conftest import Harness, next_ts
from tests.fake_model import Reply
from tests.fake_slack import TEAM_ID

PNG, PDF, DOCX = (
    "image/png",
    "application/pdf",
    ("application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
)


def user_content(request: dict[str, Any]) -> Any:
    """The content of a request's last (the asker's) message."""
    return request["messages"][-1]["content"]


def pictures_sent(request: dict[str, Any]) -> list[Image.Image]:
    """The images a request shows the model, decoded from their data URLs."""
    found: list[Image.Image] = []
    for message in request["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    url = part["image_url"]["url"]
                    assert url.startswith("data:image/") and part["image_url"]["detail"] == "high"
                    found.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return found


def texts(request: dict[str, Any]) -> str:
    """Every text a request carries, joined."""
    out = []
    for message in request["messages"]:
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        out += [part["text"] for part in parts if part["type"] == "text"]
    return "\n".join(out)


async def stored_turns(harness: Harness, channel: str, thread_ts: str) -> list[dict[str, Any]]:
    key = f"{harness.prefix}{{{TEAM_ID}:{channel}:{thread_ts}}}:turns"
    return [orjson.loads(raw) for raw in await harness.redis.lrange(key, 0, -1)]


async def test_an_image_reaches_the_model_scaled_with_its_token_count(harness: Harness) -> None:
    screenshot = harness.slack.add_file("error.png", samples.image(3000, 2000), PNG, "png")
    harness.model.script(Reply(text="That is a red square."))
    async with harness.running():
        ts = await harness.say("what does this show?", files=[screenshot])
        await harness.replies_done(1)
    [request] = harness.model.requests
    content = user_content(request)
    assert content[0] == {
        "type": "text",
        "text": "alice: what does this show?\n\n[image: error.png, 3000x2000]",
    }
    [picture] = pictures_sent(request)
    assert picture.size == (1152, 768)  # within 2048 x 2048, then a shortest side of 768
    [question, _] = await stored_turns(harness, "C1", ts)
    tokens, billed = picture_tokens("gpt-4o-mini", 1152, 768)
    assert question["files"][0]["picture"] == {
        "mime": "image/png",
        "width": 1152,
        "height": 768,
        "tokens": tokens,
        "billed": billed,
    }
    assert question["tokens"] > tokens
    [download] = harness.slack.downloads()
    assert download.token == "xoxb-test"
    assert harness.answers() == ["That is a red square."]


async def test_a_pdf_and_a_word_document_arrive_as_text_under_headers(harness: Harness) -> None:
    spec = harness.slack.add_file(
        "spec.pdf", samples.pdf([f"Requirement {n}: the bot shall answer." for n in range(1, 13)]), PDF, "pdf"
    )
    notes = harness.slack.add_file(
        "notes.docx",
        samples.word(["Meeting notes", "Decision: ship on Friday."], [["owner", "task"], ["bob", "deploy"]]),
        DOCX,
        "docx",
        redirect=True,  # served behind one of Slack's redirects
    )
    async with harness.running():
        await harness.say("summarise these", files=[spec, notes])
        await harness.replies_done(1)
    content = user_content(harness.model.requests[0])
    assert isinstance(content, str)  # no images: plain text
    assert "[file: spec.pdf, 12 pages]" in content
    assert "Requirement 1: the bot shall answer." in content and "Requirement 12:" in content
    assert "[file: notes.docx" in content
    assert "Decision: ship on Friday." in content and "bob" in content and "deploy" in content
    assert len(harness.slack.downloads()) == 3  # the redirect, then the file, and the PDF


async def test_files_it_cannot_read_are_named_first_in_the_reply_and_the_text_is_answered(
    harness: Harness,
) -> None:
    big = harness.slack.add_file("dump.csv", b"a,b\n1,2\n", "text/csv", "csv", size=50 * 1024 * 1024)
    zipped = harness.slack.add_file("logs.zip", samples.archive({"a.log": b"x"}), "application/zip", "zip")
    scan = harness.slack.add_file("scan.pdf", samples.scanned_pdf(), PDF, "pdf")
    harness.model.script(Reply(text="Here is my answer."))
    async with harness.running():
        await harness.say("can you check these?", files=[big, zipped, scan])
        await harness.replies_done(1)
    [answer] = harness.answers()
    first, rest = answer.split("\n", 1)
    assert first == (
        "_(I couldn't read dump.csv (over the 20 MB limit), logs.zip (an archive, which I can't open), "
        "scan.pdf (a PDF without a text layer, perhaps a scan).)_"
    )
    assert rest.strip() == "Here is my answer."
    asked = user_content(harness.model.requests[0])
    assert (
        "can you check these?" in asked
        and "[file: logs.zip, not read: an archive, which I can't open]" in asked
    )
    assert [d.args["file"] for d in harness.slack.downloads()] == [scan["id"]]  # nothing over the limit


@pytest.mark.cluster
async def test_a_follow_up_about_an_earlier_image_shows_it_again_without_asking_slack(
    harness: Harness,
) -> None:
    chart = harness.slack.add_file("chart.jpg", samples.image(800, 600, "JPEG"), "image/jpeg", "jpg")
    async with harness.running():
        ts = await harness.say("look at this chart", files=[chart])
        await harness.replies_done(1)
        await harness.say("which colour was it?", mention=False, thread_ts=ts)
        await harness.replies_done(2)
    first, second = harness.model.requests
    assert [p.size for p in pictures_sent(first)] == [(800, 600)]
    assert [p.size for p in pictures_sent(second)] == [(800, 600)]  # the earlier turn, with its image
    assert user_content(second) == "alice: which colour was it?"
    assert len(harness.slack.downloads()) == 1  # the scaled copy was kept with the thread


async def test_without_a_cached_copy_a_follow_up_fetches_the_image_again(harness: Harness) -> None:
    chart = harness.slack.add_file("chart.png", samples.image(400, 300), PNG, "png")
    async with harness.running(image_cache_seconds=0):
        ts = await harness.say("look", files=[chart])
        await harness.replies_done(1)
        await harness.say("again?", mention=False, thread_ts=ts)
        await harness.replies_done(2)
        harness.slack.delete_file(chart["id"])  # gone from Slack: the model is told so
        await harness.say("and now?", mention=False, thread_ts=ts)
        await harness.replies_done(3)
    assert [len(pictures_sent(r)) for r in harness.model.requests] == [1, 1, 0]
    assert len(harness.slack.downloads()) == 3
    assert "(The image chart.png is no longer available.)" in texts(harness.model.requests[2])


async def test_a_mention_mid_thread_reads_the_files_posted_earlier(harness: Harness) -> None:
    parent = next_ts()
    log_file = harness.slack.add_file("app.log", b"ERROR disk full on /var\n", "text/plain", "text")
    photo = harness.slack.add_file("rack.png", samples.image(640, 480), PNG, "png")
    harness.slack.add_message("C1", ts=parent, user="U2", text="the app fell over", files=[log_file])
    harness.slack.add_message(
        "C1", ts=next_ts(), user="U2", text="and the rack", thread_ts=parent, files=[photo]
    )
    async with harness.running():
        await harness.say("what went wrong?", thread_ts=parent)
        await harness.replies_done(1)
    [request] = harness.model.requests
    assert "[file: app.log, 1 line]\nERROR disk full on /var" in texts(request)
    assert [p.size for p in pictures_sent(request)] == [(640, 480)]
    assert user_content(request) == "alice: what went wrong?"


async def test_an_endpoint_that_refuses_images_gets_the_text_and_a_one_line_explanation(
    harness: Harness,
) -> None:
    shot = harness.slack.add_file("shot.png", samples.image(100, 100), PNG, "png")
    harness.model.script(
        Reply(
            status=400, error_message="Invalid content type. image_url is only supported by certain models."
        ),
        Reply(text="From the text alone: restart it."),
        Reply(text="Second."),
    )
    async with harness.running():
        ts = await harness.say("what now?", files=[shot])
        await harness.replies_done(1)
        await harness.say("and then?", mention=False, thread_ts=ts)
        await harness.replies_done(2)
    refused, retried, later = harness.model.requests
    assert len(pictures_sent(refused)) == 1
    assert pictures_sent(retried) == [] and "[image: shot.png, 100x100]" in texts(retried)
    assert pictures_sent(later) == []  # the refusal is remembered: no second try with images
    first = harness.answers()[0]
    assert first == (
        "_(The model at this endpoint refused images, so I answered from the text alone.)_\n\n"
        "From the text alone: restart it."
    )


async def test_with_vision_off_the_image_is_named_and_not_sent(harness: Harness) -> None:
    shot = harness.slack.add_file("shot.png", samples.image(100, 100), PNG, "png")
    harness.model.script(Reply(text="Answer."))
    async with harness.running(vision="off"):
        await harness.say("see?", files=[shot])
        await harness.replies_done(1)
    assert pictures_sent(harness.model.requests[0]) == []
    assert harness.answers()[0].startswith("_(This model doesn't see images, so I didn't look at shot.png.)_")


async def test_a_voice_clip_is_transcribed_when_a_transcription_model_is_set(harness: Harness) -> None:
    clip = harness.slack.add_file("audio_message.m4a", b"\x00\x00\x00 ftypM4A fake audio", "audio/mp4", "m4a")
    harness.model.transcript = "please restart the staging server"
    async with harness.running(transcribe_model="whisper-1"):
        await harness.say("", files=[clip])
        await harness.replies_done(1)
    assert "[voice clip: audio_message.m4a, transcribed]\nplease restart the staging server" in user_content(
        harness.model.requests[0]
    )
    [transcription] = harness.model.transcriptions
    assert transcription["model"] == "whisper-1" and transcription["file_name"] == "audio_message.m4a"


async def test_a_long_transcript_is_cut_to_the_file_token_limit_and_says_so(harness: Harness) -> None:
    clip = harness.slack.add_file("standup.m4a", b"\x00\x00\x00 ftypM4A fake audio", "audio/mp4", "m4a")
    harness.model.transcript = "we talked about the release " * 200
    async with harness.running(transcribe_model="whisper-1", file_max_tokens=100):
        await harness.say("what did we decide?", files=[clip])
        await harness.replies_done(1)
    content = user_content(harness.model.requests[0])
    assert "[voice clip: standup.m4a, transcribed; only its first 100 tokens]\nwe talked about" in content
    assert content.count("release") < 50


async def test_without_a_transcription_model_a_voice_clip_is_named_as_unread(harness: Harness) -> None:
    clip = harness.slack.add_file("clip.m4a", b"fake", "audio/mp4", "m4a")
    harness.model.script(Reply(text="ok"))
    async with harness.running():
        await harness.say("listen", files=[clip])
        await harness.replies_done(1)
    assert harness.answers()[0].startswith(
        "_(I couldn't read clip.m4a (a voice clip, and transcription is not set up).)_"
    )
    assert harness.slack.downloads() == []


async def test_a_wrong_token_or_a_url_off_slack_gets_no_file_and_says_so(harness: Harness) -> None:
    refused = harness.slack.add_file("a.txt", b"secret", "text/plain", "text")
    foreign = harness.slack.add_file("b.txt", b"secret", "text/plain", "text")
    foreign["url_private_download"] = foreign["url_private"].replace("127.0.0.1", "localhost")
    harness.slack.bot_token = "xoxb-another-app"  # the bot's token may not read files
    harness.model.script(Reply(text="ok"))
    async with harness.running():
        await harness.say("read", files=[refused, foreign])
        await harness.replies_done(1)
    assert harness.answers()[0].startswith(
        "_(I couldn't read a.txt (Slack would not let me download it), b.txt (not stored in Slack).)_"
    )
    assert [d.args["file"] for d in harness.slack.downloads()] == [refused["id"]]  # none to localhost


async def test_a_huge_document_is_cut_and_the_context_stays_within_the_budget(harness: Harness) -> None:
    pages = [f"Page {n}: " + "lorem ipsum dolor sit amet " * 60 for n in range(300)]
    book = harness.slack.add_file("book.pdf", samples.pdf(pages), PDF, "pdf")
    harness.model.script(Reply(text="A long book.", prompt_tokens=3000))
    async with harness.running(max_prompt_tokens=4000, file_max_tokens=2000):
        await harness.say("what is this about?", files=[book])
        await harness.replies_done(1)
    content = user_content(harness.model.requests[0])
    assert "[file: book.pdf, 300 pages; only its first 2,000 tokens]" in content
    assert "Page 0:" in content and "Page 299:" not in content
    reservations = await harness.redis.hgetall(f"{harness.prefix}{{{TEAM_ID}:usage}}:" + _month())
    assert int(reservations.get("pending:all:tokens", "0")) == 0  # settled
    assert int(reservations["all:prompt"]) == 3000


def _month() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m")


@pytest.mark.cluster
async def test_deleting_a_file_or_a_message_in_slack_removes_it_from_the_history(
    harness: Harness, counter: TiktokenCounter
) -> None:
    doc = harness.slack.add_file("plan.txt", b"the secret plan", "text/plain", "text")
    shot = harness.slack.add_file("shot.png", samples.image(64, 64), PNG, "png")
    async with harness.running():
        ts = await harness.say("read this", files=[doc, shot])
        await harness.replies_done(1)
        follow = await harness.say("and this?", mention=False, thread_ts=ts)
        await harness.replies_done(2)
        await harness.slack.send_event({"type": "file_deleted", "file_id": doc["id"], "event_ts": next_ts()})
        deletion = {
            "type": "message",
            "subtype": "message_deleted",
            "channel": "C1",
            "ts": next_ts(),
            "deleted_ts": follow,
            "hidden": True,
            "previous_message": {"type": "message", "ts": follow, "thread_ts": ts, "user": "U1"},
        }
        await harness.slack.send_event(deletion)
        await harness.settled()
    turns = await stored_turns(harness, "C1", ts)
    assert [t["ts"] for t in turns if t["role"] == "user"] == [ts]  # the follow-up is gone
    [question] = [t for t in turns if t["role"] == "user"]
    assert [f["file"]["id"] for f in question["files"]] == [shot["id"]]  # the text file is gone
    assert "secret plan" not in orjson.dumps(turns).decode()
    picture = Picture(**question["files"][0]["picture"])
    content = "alice: read this\n\n[image: shot.png, 64x64]"
    assert question["tokens"] == counter.message_tokens("user", content) + picture.tokens  # recounted


async def test_deleting_a_threads_parent_forgets_the_whole_thread(harness: Harness) -> None:
    shot = harness.slack.add_file("shot.png", samples.image(64, 64), PNG, "png")
    async with harness.running():
        ts = await harness.say("look", files=[shot])
        await harness.replies_done(1)
        deletion = {
            "type": "message",
            "subtype": "message_deleted",
            "channel": "C1",
            "ts": next_ts(),
            "deleted_ts": ts,
            "hidden": True,
            "previous_message": {"type": "message", "ts": ts, "user": "U1"},
        }
        await harness.slack.send_event(deletion)
        await harness.settled()
        await harness.say("still there?", mention=False, thread_ts=ts)  # the bot left the thread
        await harness.settled()
    thread_keys = [k async for k in harness.redis.scan_iter(match=f"{harness.prefix}{{{TEAM_ID}:C1:{ts}}}*")]
    assert thread_keys == []
    assert len(harness.model.requests) == 1


async def test_no_file_content_or_url_is_logged_at_info(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "the launch code is 0000"
    doc = harness.slack.add_file("secret.txt", secret.encode(), "text/plain", "text")
    caplog.set_level(logging.INFO)
    async with harness.running():
        await harness.say("keep it safe", files=[doc])
        await harness.replies_done(1)
    assert secret in user_content(harness.model.requests[0])
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "launch code" not in logged and "files-pri" not in logged and "secret.txt" not in logged
