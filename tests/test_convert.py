"""bot.convert: classifying by metadata, every format turned into text or a scaled image, hostile files
(decompression and zip bombs, lies about the type, corrupt bytes), and the child process with its time
and memory limits. Every input is made here."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import shutil
import signal
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docx
import openpyxl
import pptx
import pytest
from PIL import Image
from pptx.util import Inches
from pypdf import PdfReader, PdfWriter
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

import bot.convert
from bot.convert import Converted, classify, convert, convert_in_child

MB = 1024 * 1024
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def read(data: bytes, name: str, mimetype: str = "", filetype: str = "") -> Converted:
    """``convert``, checking what every result must be: text valid Unicode, an image what it claims."""
    result = convert(data, name=name, mimetype=mimetype, filetype=filetype)
    result.text.encode("utf-8")  # raises on a lone surrogate
    if result.kind == "image":
        with Image.open(io.BytesIO(result.image)) as image:
            assert image.size == (result.width, result.height)
            assert Image.MIME[str(image.format)] == result.mime
    return result


def text_of(data: bytes, name: str, mimetype: str = "", filetype: str = "") -> Converted:
    result = read(data, name, mimetype, filetype)
    assert result.kind == "text", result.reason
    return result


def reason_for(data: bytes, name: str, mimetype: str = "", filetype: str = "") -> str:
    result = read(data, name, mimetype, filetype)
    assert result.kind == "unreadable", result
    assert not result.text and not result.image
    return result.reason


# Inputs --------------------------------------------------------------------------------------------------


def picture(size: tuple[int, int], format_: str, mode: str = "RGB", **save: Any) -> bytes:
    """An image whose left half is red and right half blue."""
    image = Image.new(mode, size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    image.save(out, format_, **save)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming a size, with no pixels: a signature, its header chunk, its end chunk."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    end = b"IEND"
    return b"".join(
        [b"\x89PNG\r\n\x1a\n"]
        + [
            struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
            for chunk in (ihdr, end)
        ]
    )


def pdf(pages: list[str]) -> bytes:
    """A PDF with one line of text per page ("" for a page with none)."""
    out = io.BytesIO()
    document = canvas.Canvas(out)
    for text in pages:
        if text:
            document.drawString(72, 720, text)
        document.showPage()
    document.save()
    return out.getvalue()


def report_pdf() -> bytes:
    return pdf([f"This is page {n} of the report." for n in range(1, 13)])


def scanned_pdf() -> bytes:
    out = io.BytesIO()
    document = canvas.Canvas(out)
    document.drawImage(ImageReader(Image.new("RGB", (200, 100), RED)), 72, 500, width=200, height=100)
    document.showPage()
    document.save()
    return out.getvalue()


def encrypted_pdf(user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf(["Secret plans."]))))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def word_document() -> bytes:
    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    document.add_paragraph("Sales grew in every region.")
    table = document.add_table(rows=3, cols=2)
    for row, values in zip(
        table.rows, [("Region", "Sales"), ("North", "12"), ("South | East", "7")], strict=True
    ):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph("Next quarter looks better.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def workbook(rows: int = 3) -> bytes:
    book = openpyxl.Workbook()
    sales = book.active
    sales.title = "Sales"
    sales.append(["Region", "Sales"])
    for n in range(1, rows):
        sales.append([f"Region {n}", n * 1.5])
    sales["E20"] = "far corner"  # the sheet is 5 columns wide: the rows above end in empty cells
    notes = book.create_sheet("Notes")
    notes.append(["hello, world", "plain"])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def presentation() -> bytes:
    deck = pptx.Presentation()
    first = deck.slides.add_slide(deck.slide_layouts[1])
    assert first.shapes.title is not None
    first.shapes.title.text = "Roadmap"
    first.placeholders[1].text_frame.text = "Ship the bot"
    second = deck.slides.add_slide(deck.slide_layouts[6])
    group = second.shapes.add_group_shape()
    group.shapes.add_textbox(Inches(1), Inches(1), Inches(3), Inches(1)).text_frame.text = "Grouped words"
    third = deck.slides.add_slide(deck.slide_layouts[6])
    table = third.shapes.add_table(2, 2, Inches(1), Inches(1), Inches(4), Inches(2)).table
    for (row, column), value in {(0, 0): "a", (0, 1): "b", (1, 0): "c", (1, 1): "d"}.items():
        table.cell(row, column).text = value
    third.notes_slide.notes_text_frame.text = "Say thanks"
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def archive(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zip_file:
        for name, data in members.items():
            zip_file.writestr(name, data)
    return out.getvalue()


def zip_bomb(path: Path, megabytes: int, member: str = "word/document.xml") -> bytes:
    """A zip whose one member unpacks to ``megabytes`` of zeros, written a megabyte at a time."""
    chunk = bytes(MB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zip_file, zip_file.open(member, "w") as out:
        for _ in range(megabytes):
            out.write(chunk)
    return path.read_bytes()


# classify ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mimetype", "filetype", "kind"),
    [
        ("shot.png", "image/png", "png", "image"),
        ("photo.jpg", "image/jpeg", "jpg", "image"),
        ("party.gif", "image/gif", "gif", "image"),
        ("sticker.webp", "image/webp", "webp", "image"),
        ("report.pdf", "application/pdf", "pdf", "document"),
        (
            "memo.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "docx",
            "document",
        ),
        ("q3.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx", "document"),
        (
            "deck.pptx",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            "pptx",
            "document",
        ),
        ("page.html", "text/html", "html", "document"),
        ("notes.txt", "text/plain", "text", "text"),
        ("data.csv", "text/csv", "csv", "text"),
        ("data.tsv", "text/tab-separated-values", "tsv", "text"),
        ("event.json", "application/json", "json", "text"),
        ("values.yaml", "application/x-yaml", "yaml", "text"),
        ("README.md", "text/markdown", "markdown", "text"),
        ("feed.xml", "application/xml", "xml", "text"),
        ("server.log", "text/plain", "text", "text"),
        *[
            (f"code.{ext}", "text/plain", filetype, "text")
            for ext, filetype in [
                ("py", "python"),
                ("js", "javascript"),
                ("ts", "typescript"),
                ("sh", "shell"),
                ("sql", "sql"),
                ("go", "go"),
                ("java", "java"),
                ("c", "c"),
                ("cpp", "cpp"),
                ("rs", "rust"),
                ("rb", "ruby"),
                ("php", "php"),
            ]
        ],
        ("odd.thing", "text/x-odd", "binary", "text"),
        ("main.rs", "application/octet-stream", "binary", "text"),
        ("Makefile", "application/octet-stream", "text", "text"),
        ("audio_message.m4a", "audio/mp4", "m4a", "audio"),
        ("voice.mp4", "audio/mp4", "mp4", "audio"),
        ("clip.webm", "audio/webm", "webm", "audio"),
        ("song.mp3", "audio/mpeg", "mp3", "audio"),
        ("take.wav", "audio/wav", "wav", "audio"),
        ("take.ogg", "audio/ogg", "ogg", "audio"),
        ("take.flac", "audio/flac", "flac", "audio"),
        ("recording.mp3", "", "mpga", "audio"),
        ("screen.webm", "video/webm", "webm", "unsupported"),
        ("movie.mp4", "video/mp4", "mp4", "unsupported"),
        ("bundle.zip", "application/zip", "zip", "unsupported"),
        ("old.doc", "application/msword", "doc", "unsupported"),
        ("setup.exe", "application/octet-stream", "binary", "unsupported"),
        ("photo.heic", "image/heic", "heic", "unsupported"),
        ("mystery", "", "", "unsupported"),
    ],
)
def test_classify_sorts_files_by_their_metadata(name: str, mimetype: str, filetype: str, kind: str) -> None:
    assert classify(name, mimetype, filetype) == kind


# Images --------------------------------------------------------------------------------------------------


def test_a_large_photo_is_scaled_down_to_1024_by_768_jpeg() -> None:
    result = read(picture((4000, 3000), "JPEG"), "photo.jpg", "image/jpeg", "jpg")
    assert (result.kind, result.mime, result.width, result.height) == ("image", "image/jpeg", 1024, 768)
    assert result.detail == "4000x3000"
    with Image.open(io.BytesIO(result.image)) as image:
        assert image.getpixel((100, 384)) == pytest.approx(RED, abs=8)
        assert image.getpixel((900, 384)) == pytest.approx(BLUE, abs=8)


def test_a_small_screenshot_stays_the_same_size_and_lossless_png() -> None:
    original = picture((300, 200), "PNG")
    result = read(original, "shot.png", "image/png", "png")
    assert (result.mime, result.width, result.height, result.detail) == ("image/png", 300, 200, "300x200")
    with Image.open(io.BytesIO(original)) as before, Image.open(io.BytesIO(result.image)) as after:
        assert after.convert("RGB").tobytes() == before.convert("RGB").tobytes()


@pytest.mark.parametrize(
    ("size", "scaled"),
    [
        ((3000, 1000), (2048, 683)),  # the 2048 square binds
        ((1000, 5000), (410, 2048)),
        ((1000, 800), (960, 768)),  # the 768 short side binds
        ((800, 600), (800, 600)),  # small enough: never scaled up
        ((10, 10), (10, 10)),
    ],
)
def test_images_fit_2048_square_then_768_short_side(size: tuple[int, int], scaled: tuple[int, int]) -> None:
    result = read(picture(size, "PNG"), "shot.png", "image/png", "png")
    assert (result.width, result.height) == scaled


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown turned 90° clockwise, so the red left half is on top
    result = read(picture((400, 200), "JPEG", exif=exif), "phone.jpg", "image/jpeg", "jpg")
    assert (result.width, result.height, result.detail) == (200, 400, "200x400")
    with Image.open(io.BytesIO(result.image)) as image:
        assert image.getpixel((100, 50)) == pytest.approx(RED, abs=8)
        assert image.getpixel((100, 350)) == pytest.approx(BLUE, abs=8)


def test_an_animated_gif_becomes_its_first_frame_as_png() -> None:
    frames = [Image.new("RGB", (120, 80), colour) for colour in (RED, BLUE)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = read(out.getvalue(), "party.gif", "image/gif", "gif")
    assert (result.mime, result.width, result.height) == ("image/png", 120, 80)
    with Image.open(io.BytesIO(result.image)) as image:
        assert image.convert("RGB").getpixel((60, 40)) == RED


def test_webp_keeps_transparency_as_png_and_a_photo_becomes_jpeg() -> None:
    clear = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    clear.paste((255, 0, 0, 255), (0, 0, 50, 100))
    out = io.BytesIO()
    clear.save(out, "WEBP", lossless=True)
    transparent = read(out.getvalue(), "sticker.webp", "image/webp", "webp")
    assert transparent.mime == "image/png"
    with Image.open(io.BytesIO(transparent.image)) as image:
        assert image.getchannel("A").getpixel((75, 50)) == 0
        assert image.getchannel("A").getpixel((25, 50)) == 255
    photo = read(picture((100, 100), "WEBP", quality=80), "photo.webp", "image/webp", "webp")
    assert photo.mime == "image/jpeg"


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 8000)], ids=["bomb-error", "bomb-warning"])
def test_decompression_bombs_are_too_large_to_read(size: tuple[int, int]) -> None:
    assert size[0] * size[1] > bot.convert.MAX_IMAGE_PIXELS
    assert reason_for(png_header(*size), "huge.png", "image/png", "png") == "too large to read"


@pytest.mark.parametrize(
    "data",
    [
        png_header(100, 100),  # a header and no pixels
        picture((300, 200), "PNG")[:400],  # cut short
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # a signature, then noise
        b"this is not a picture at all",  # no signature
    ],
    ids=["no-pixels", "truncated", "noise", "text"],
)
def test_a_broken_or_fake_png_is_not_a_readable_image(data: bytes) -> None:
    assert reason_for(data, "shot.png", "image/png", "png") == "not a readable image"


def test_the_bytes_win_over_the_metadata() -> None:
    as_pdf = text_of(report_pdf(), "shot.png", "image/png", "png")
    assert as_pdf.detail == "12 pages"
    as_png = read(picture((50, 40), "PNG"), "notes.txt", "text/plain", "text")
    assert (as_png.kind, as_png.mime) == ("image", "image/png")
    as_xlsx = text_of(workbook(), "memo.docx", "", "docx")
    assert as_xlsx.detail == "2 sheets"


# PDF -----------------------------------------------------------------------------------------------------


def test_a_pdf_is_read_page_by_page() -> None:
    result = text_of(report_pdf(), "report.pdf", "application/pdf", "pdf")
    assert result.detail == "12 pages"
    markers = [result.text.index(f"--- page {n} ---") for n in range(1, 13)]
    assert markers == sorted(markers)
    assert result.text.startswith("--- page 1 ---\nThis is page 1 of the report.\n\n--- page 2 ---\n")
    assert result.text.endswith("--- page 12 ---\nThis is page 12 of the report.")


def test_a_one_page_pdf_with_an_empty_page_says_so() -> None:
    assert text_of(pdf(["Only page."]), "one.pdf", "application/pdf", "pdf").detail == "1 page"
    two = text_of(pdf(["", "Second."]), "two.pdf", "application/pdf", "pdf")
    assert two.text == "--- page 1 ---\n(no text on this page)\n\n--- page 2 ---\nSecond."


def test_a_pdf_of_images_has_no_text_layer() -> None:
    assert (
        reason_for(scanned_pdf(), "scan.pdf", "application/pdf", "pdf")
        == "a PDF without a text layer, perhaps a scan"
    )


def test_an_encrypted_pdf_is_refused_unless_its_password_is_empty() -> None:
    assert reason_for(encrypted_pdf("secret"), "locked.pdf", "application/pdf", "pdf") == "an encrypted PDF"
    readable = text_of(encrypted_pdf(""), "restricted.pdf", "application/pdf", "pdf")
    assert "Secret plans." in readable.text


def test_pdf_extraction_stops_at_the_cap_but_counts_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.convert, "MAX_TEXT_CHARS", 100)
    result = text_of(report_pdf(), "report.pdf", "application/pdf", "pdf")
    assert result.detail == "12 pages"
    assert "--- page 3 ---" in result.text
    assert "--- page 4 ---" not in result.text
    assert result.text.endswith("(… 9 more pages not read)")


def test_a_broken_pdf_is_not_readable() -> None:
    assert reason_for(b"%PDF-1.7\n" + bytes(500), "x.pdf", "application/pdf", "pdf") == "not a readable PDF"
    assert reason_for(b"just text", "x.pdf", "application/pdf", "pdf") == "not a readable PDF"


# Office --------------------------------------------------------------------------------------------------


def test_a_word_document_keeps_paragraphs_and_tables_in_order() -> None:
    result = text_of(word_document(), "memo.docx", "", "docx")
    assert result.detail == "3 paragraphs, 1 table"
    assert result.text == (
        "# Quarterly report\n\n"
        "Sales grew in every region.\n\n"
        "| Region | Sales |\n| --- | --- |\n| North | 12 |\n| South \\| East | 7 |\n\n"
        "Next quarter looks better."
    )


def test_a_workbook_is_read_sheet_by_sheet() -> None:
    result = text_of(workbook(), "q3.xlsx", "", "xlsx")
    assert result.detail == "2 sheets"
    assert result.text == (
        '## Sales\nRegion,Sales\nRegion 1,1.5\nRegion 2,3\n,,,,far corner\n\n## Notes\n"hello, world",plain'
    )


def test_a_long_sheet_is_cut_at_the_row_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.convert, "MAX_ROWS_PER_SHEET", 3)
    result = text_of(workbook(rows=10), "q3.xlsx", "", "xlsx")
    sales = result.text.split("\n\n")[0]
    assert sales == "## Sales\nRegion,Sales\nRegion 1,1.5\nRegion 2,3\n(… 8 more rows)"


def test_a_presentation_is_read_slide_by_slide() -> None:
    result = text_of(presentation(), "deck.pptx", "", "pptx")
    assert result.detail == "3 slides"
    assert result.text == (
        "--- slide 1 ---\nRoadmap\nShip the bot\n\n"
        "--- slide 2 ---\nGrouped words\n\n"
        "--- slide 3 ---\n| a | b |\n| --- | --- |\n| c | d |\nNotes: Say thanks"
    )


def test_a_zip_bomb_is_too_large_once_unpacked(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.docx", 300)
    assert len(bomb) < 2 * MB
    assert reason_for(bomb, "bomb.docx", "", "docx") == "too large once unpacked"


def test_a_small_file_that_unpacks_far_too_well_is_refused(tmp_path: Path) -> None:
    dense = zip_bomb(tmp_path / "dense.xlsx", 20, "xl/workbook.xml")
    assert 20 * MB < bot.convert.MAX_UNPACKED_BYTES
    assert reason_for(dense, "dense.xlsx", "", "xlsx") == "too large once unpacked"


def test_zips_that_are_not_office_files() -> None:
    other = archive({"photos/readme.txt": b"hello"})
    assert reason_for(other, "bundle.zip", "application/zip", "zip") == "an archive, which I can't open"
    assert reason_for(other, "memo.docx", "", "docx") == "not a readable Word document"
    broken = archive({"[Content_Types].xml": b"<nope", "word/document.xml": b"not xml"})
    assert reason_for(broken, "memo.docx", "", "docx") == "not a readable Word document"
    odt = archive({"mimetype": b"application/vnd.oasis.opendocument.text", "content.xml": b"<x/>"})
    assert reason_for(odt, "memo.odt", "", "odt").startswith("an OpenDocument file")
    assert reason_for(b"PK\x03\x04" + bytes(100), "memo.docx", "", "docx") == "not a readable Word document"


# HTML and text -------------------------------------------------------------------------------------------


def test_html_loses_scripts_styles_and_blank_runs() -> None:
    page = b"""<html><head><title>Status</title><style>body { color: red }</style>
    <script>var token = "do-not-show";</script></head>
    <body><h1>All good</h1>\n\n\n\n<p>Every service is up.</p>
    <p>Next check at <b>noon</b>.</p></body></html>"""
    result = text_of(page, "status.html", "text/html", "html")
    assert "do-not-show" not in result.text
    assert "color" not in result.text
    assert "\n\n\n" not in result.text
    assert result.text.startswith("Status\n")
    for words in ("All good", "Every service is up.", "noon"):
        assert words in result.text


def test_csv_is_kept_exactly_as_it_is() -> None:
    data = b'name,amount\r\n"Lovelace, Ada",12\r\nTuring,7\r\n'
    result = text_of(data, "data.csv", "text/csv", "csv")
    assert (result.text, result.detail) == (data.decode(), "3 lines")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("Grüße\nzweite Zeile\n".encode("utf-16"), "Grüße\nzweite Zeile\n"),
        ("Grüße".encode("utf-16-be").join([b"\xfe\xff", b""]), "Grüße"),
        (b"\xef\xbb\xbfhello", "hello"),
        ("naïve — café".encode(), "naïve — café"),
        ("naïve \N{EN DASH} café".encode("cp1252"), "naïve \N{EN DASH} café"),
        (b"a\x81b", "a\x81b"),  # undefined in cp1252: Latin-1
        (b"\xff\xfe\x00\xd8" + "ok".encode("utf-16-le"), "\ufffdok"),  # a lone surrogate
    ],
    ids=["utf-16-le", "utf-16-be", "utf-8-bom", "utf-8", "cp1252", "latin-1", "lone-surrogate"],
)
def test_text_encodings(data: bytes, text: str) -> None:
    assert text_of(data, "notes.txt", "text/plain", "text").text == text


def test_a_binary_blob_is_not_text() -> None:
    blob = random.Random(7).randbytes(20_000)
    assert reason_for(blob, "notes.txt", "text/plain", "text") == "a binary file"
    assert reason_for(blob, "blob.bin", "application/octet-stream", "binary") == "an unsupported file type"


def test_a_long_text_is_cut_at_the_cap_with_its_true_line_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.convert, "MAX_TEXT_CHARS", 30)
    result = text_of(b"line\n" * 100, "app.log", "text/plain", "text")
    assert result.detail == "100 lines"
    assert result.text == "line\n" * 6 + "\n(… 94 more lines not read)"


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"", "notes.txt", "an empty file"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(100), "clip.mov", "a video"),
        (b"\x1f\x8b\x08" + bytes(100), "logs.txt", "an archive, which I can't open"),
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100),
            "old.docx",
            "an old-format or password-protected Office file",
        ),
        (b"ID3" + bytes(100), "song.mp3", "an audio file"),
        (b"anything", "setup.exe", "an unsupported file type"),
    ],
)
def test_what_cannot_be_read_is_named(data: bytes, name: str, reason: str) -> None:
    assert reason_for(data, name) == reason


# Hostile input -------------------------------------------------------------------------------------------

_SAMPLES: dict[str, Callable[[], bytes]] = {
    "report.pdf": report_pdf,
    "memo.docx": word_document,
    "q3.xlsx": workbook,
    "deck.pptx": presentation,
    "photo.jpg": lambda: picture((300, 200), "JPEG"),
    "shot.png": lambda: picture((300, 200), "PNG"),
}


@pytest.mark.parametrize("name", list(_SAMPLES))
def test_damaged_files_never_raise(name: str) -> None:
    data = _SAMPLES[name]()
    rng = random.Random(name)
    damaged = [data[: len(data) * n // 8] for n in range(1, 8)]
    for _ in range(6):
        flipped = bytearray(data)
        for _ in range(20):
            flipped[rng.randrange(16, len(data))] ^= 0xFF
        damaged.append(bytes(flipped))
    for sample in damaged:
        result = read(sample, name)  # never raises; valid Unicode; a real image when it says so
        assert result.kind in ("text", "image", "unreadable")
        assert (result.kind == "unreadable") == bool(result.reason)


# The child process ---------------------------------------------------------------------------------------


class Spawned:
    """Records the processes ``convert_in_child`` starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.processes: list[asyncio.subprocess.Process] = []
        self.started = asyncio.Event()
        spawn = asyncio.create_subprocess_exec

        async def recording(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
            process = await spawn(*args, **kwargs)
            self.processes.append(process)
            self.started.set()
            return process

        monkeypatch.setattr(asyncio, "create_subprocess_exec", recording)

    def assert_all_gone(self) -> None:
        assert self.processes
        for process in self.processes:
            assert process.returncode is not None  # waited for: no zombie either
            with pytest.raises(ProcessLookupError):
                os.kill(process.pid, 0)


async def in_child(data: bytes, name: str, *, seconds: float = 60, memory: int = 1024 * MB) -> Converted:
    return await convert_in_child(
        data, name=name, mimetype="", filetype="", timeout_seconds=seconds, memory_bytes=memory
    )


async def test_the_child_gives_what_convert_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned = Spawned(monkeypatch)
    photo = picture((4000, 3000), "JPEG")
    assert await in_child(photo, "photo.jpg") == convert(photo, name="photo.jpg", mimetype="", filetype="")
    text = "naïve\u2028line\nsecond 🎉\n".encode()
    assert await in_child(text, "notes.txt") == Converted(kind="text", text=text.decode(), detail="2 lines")
    spawned.assert_all_gone()


async def test_a_child_too_slow_is_killed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spawned = Spawned(monkeypatch)
    caplog.set_level(logging.INFO, logger="bot.convert")
    # Far less than a Python interpreter needs to start: the child cannot have answered.
    result = await in_child(picture((300, 200), "PNG"), "secret-plans.png", seconds=0.001)
    assert result == Converted(kind="unreadable", reason="took too long to read")
    spawned.assert_all_gone()
    if sys.platform != "win32":
        assert spawned.processes[0].returncode == -signal.SIGKILL
    assert caplog.records
    assert "secret-plans" not in caplog.text


async def test_a_cancelled_conversion_leaves_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned = Spawned(monkeypatch)
    task = asyncio.create_task(in_child(picture((4000, 3000), "PNG"), "big.png"))
    await spawned.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    spawned.assert_all_gone()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux; macOS ignores it"
)
async def test_a_child_over_its_memory_limit_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned = Spawned(monkeypatch)
    huge = picture((6000, 6000), "PNG")  # 36 megapixels, 108 MB decoded; under the decompression-bomb cap
    small = picture((300, 200), "PNG")
    assert (await in_child(small, "small.png", memory=50 * MB)).kind == "image"
    assert await in_child(huge, "huge.png", memory=50 * MB) == Converted(
        kind="unreadable", reason="too large to read"
    )
    assert (await in_child(huge, "huge.png", memory=1024 * MB)).width == 768
    spawned.assert_all_gone()


@pytest.mark.parametrize("program", ["false", "echo"], ids=["dies", "prints-garbage"])
async def test_a_failing_child_could_not_be_read(monkeypatch: pytest.MonkeyPatch, program: str) -> None:
    executable = shutil.which(program)
    if executable is None:
        pytest.skip(f"no {program} on this machine")
    monkeypatch.setattr(sys, "executable", executable)
    result = await in_child(b"hello", "notes.txt")
    assert result == Converted(kind="unreadable", reason="could not be read")
