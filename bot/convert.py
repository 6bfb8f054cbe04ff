"""Files people share, turned into what a chat model can read.

``classify`` sorts a file by Slack's metadata alone, before anything is downloaded. ``convert`` turns
its bytes into text (PDF, Word, Excel, PowerPoint, HTML, plain text and code) or a scaled-down image
(PNG, JPEG, GIF, WebP). The bytes' magic numbers win over the metadata when they disagree. A file it
cannot read is ``unreadable``, with the reason in words a Slack user reads after the file name; it
never raises for bad input.

``convert_in_child`` runs ``convert`` in a child process (``python -m bot.convert``) that limits its
own address space and is killed when it takes too long: a hostile or huge file costs a process, never
the bot's event loop or memory. Both ways the framing is one JSON header line, then raw bytes.

The parsers are imported where they are used: the bot process only classifies and starts children,
and a child loads only the library its file needs, which keeps it small under its memory limit.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import datetime
import io
import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bot.domain import valid_text

if TYPE_CHECKING:
    from docx.text.paragraph import Paragraph
    from PIL import Image
    from pptx.shapes.base import BaseShape

log = logging.getLogger(__name__)

Kind = Literal["image", "document", "text", "audio", "unsupported"]

# Images: within a 2048 px square, then the shortest side at most 768 px (OpenAI's high-detail scaling).
MAX_IMAGE_SIDE = 2048
MAX_IMAGE_SHORT_SIDE = 768
MAX_IMAGE_PIXELS = 64_000_000
JPEG_QUALITY = 85
# Extraction stops once the text passes this; far more than any model's context, it bounds the work.
MAX_TEXT_CHARS = 2_000_000
MAX_ROWS_PER_SHEET = 5_000
# Zip bombs: what an Office file may unpack to, and how much smaller than that it may be.
MAX_UNPACKED_BYTES = 200 * 1024 * 1024
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_FROM_BYTES = 10 * 1024 * 1024  # small files may compress very well and harm no one
MAX_ZIP_MEMBERS = 10_000
BINARY_SNIFF_BYTES = 8192

# What the metadata claims or the bytes show a file to be; finer than a Kind.
_Format = Literal[
    "png",
    "jpeg",
    "gif",
    "webp",
    "pdf",
    "docx",
    "xlsx",
    "pptx",
    "html",
    "text",
    "audio",
    "video",
    "archive",
    "zip",
    "ole",
    "old-office",
    "other-image",
]
_IMAGES: frozenset[_Format] = frozenset({"png", "jpeg", "gif", "webp"})
_KIND: dict[_Format, Kind] = {
    "png": "image",
    "jpeg": "image",
    "gif": "image",
    "webp": "image",
    "pdf": "document",
    "docx": "document",
    "xlsx": "document",
    "pptx": "document",
    "html": "document",
    "text": "text",
    "audio": "audio",
}
_NOT_READABLE: dict[_Format, str] = {
    "pdf": "not a readable PDF",
    "docx": "not a readable Word document",
    "xlsx": "not a readable spreadsheet",
    "pptx": "not a readable presentation",
}
_WHAT_IT_IS: dict[_Format, str] = {
    "audio": "an audio file",
    "video": "a video",
    "archive": "an archive, which I can't open",
    "zip": "an archive, which I can't open",
    "ole": "an old-format or password-protected Office file",
    "old-office": "an old-format Office file: .doc, .xls or .ppt, not .docx, .xlsx or .pptx",
    "other-image": "an image format I can't read; PNG, JPEG, GIF and WebP I can",
}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_SOURCE_CODE = _words(
    """
python javascript typescript shell sql go java c cpp csharp rust ruby php kotlin swift scala
perl r lua haskell clojure coffeescript css sass dart diff dockerfile erlang elixir fortran
fsharp groovy lisp matlab objc ocaml pascal powershell puppet scheme smalltalk vb vbscript
verilog vhdl latex handlebars velocity applescript d haxe cfm mumps pig julia
    """
)
# Slack's `filetype` values. "text", "auto" and "binary" say little and are looked at last.
_FILETYPES: dict[str, _Format] = {
    "png": "png",
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "gif": "gif",
    "webp": "webp",
    "pdf": "pdf",
    "docx": "docx",
    "docm": "docx",
    "xlsx": "xlsx",
    "xlsm": "xlsx",
    "pptx": "pptx",
    "html": "html",
    "csv": "text",
    "tsv": "text",
    "json": "text",
    "yaml": "text",
    "markdown": "text",
    "xml": "text",
    "svg": "text",
    **dict.fromkeys(_SOURCE_CODE, "text"),
    **dict.fromkeys(("m4a", "mp3", "wav", "ogg", "flac", "mpga", "aac", "opus"), "audio"),
    **dict.fromkeys(("mp4", "mov", "mkv", "avi", "wmv", "flv", "mpg", "ogv", "webm", "m4v", "3gp"), "video"),
    **dict.fromkeys(("zip", "gzip", "tar", "7z", "rar", "bz2", "xz", "apk", "jar"), "archive"),
    **dict.fromkeys(("doc", "xls", "ppt", "dotx", "xltx"), "old-office"),
    **dict.fromkeys(
        ("bmp", "tiff", "psd", "heic", "heif", "avif", "eps", "ai", "sketch", "ico"), "other-image"
    ),
}
_GENERIC_FILETYPES = frozenset({"", "text", "auto", "binary"})
_MIMETYPES: dict[str, _Format] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
    "application/pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "application/vnd.ms-excel.sheet.macroenabled.12": "xlsx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": "pptx",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "image/svg+xml": "text",
    **dict.fromkeys(
        (
            "application/json",
            "application/x-ndjson",
            "application/xml",
            "application/yaml",
            "application/x-yaml",
            "application/toml",
            "application/javascript",
            "application/x-javascript",
            "application/typescript",
            "application/x-sh",
            "application/x-shellscript",
            "application/sql",
            "application/x-python",
            "application/x-httpd-php",
        ),
        "text",
    ),
    **dict.fromkeys(
        (
            "application/zip",
            "application/x-zip-compressed",
            "application/gzip",
            "application/x-gzip",
            "application/x-tar",
            "application/x-7z-compressed",
            "application/vnd.rar",
            "application/x-rar-compressed",
            "application/x-bzip2",
            "application/x-xz",
        ),
        "archive",
    ),
    **dict.fromkeys(
        ("application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint"), "old-office"
    ),
}
_GENERIC_MIMETYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_MIME_PREFIXES: tuple[tuple[str, _Format], ...] = (
    ("text/", "text"),
    ("video/", "video"),
    ("image/", "other-image"),
)
_RIFF: dict[bytes, _Format] = {b"WEBP": "webp", b"WAVE": "audio", b"AVI ": "video"}
_EXTENSIONS: dict[str, _Format] = {
    "png": "png",
    **dict.fromkeys(("jpg", "jpeg", "jpe", "jfif"), "jpeg"),
    "gif": "gif",
    "webp": "webp",
    "pdf": "pdf",
    **dict.fromkeys(("docx", "docm"), "docx"),
    **dict.fromkeys(("xlsx", "xlsm"), "xlsx"),
    "pptx": "pptx",
    **dict.fromkeys(("html", "htm", "xhtml"), "html"),
    **dict.fromkeys(
        _words(
            """
txt text csv tsv json jsonl ndjson yaml yml md markdown xml svg log ini cfg conf toml properties
env py pyi js mjs cjs ts tsx jsx vue svelte sh bash zsh fish sql go java c h cpp cc cxx hpp hh
cs rs rb php kt kts swift scala pl pm r lua hs clj ex exs erl dart css scss sass less diff patch
tex bib rst adoc org graphql gql proto tf hcl gradle groovy m mm ps1 bat cmd vb vbs fs fsx ml
mli lisp el scm rkt jl nim zig srt vtt
    """
        ),
        "text",
    ),
    **dict.fromkeys(_words("mp3 m4a wav ogg oga opus flac aac mpga weba"), "audio"),
    **dict.fromkeys(_words("mp4 mov m4v mkv avi wmv flv mpg mpeg ogv 3gp webm"), "video"),
    **dict.fromkeys(_words("zip gz tgz tar 7z rar bz2 xz zst jar apk"), "archive"),
    **dict.fromkeys(_words("doc xls ppt"), "old-office"),
    **dict.fromkeys(_words("bmp tif tiff psd heic heif avif ico eps ai"), "other-image"),
}


@dataclass(frozen=True, slots=True)
class Converted:
    """What a file became: text, an image for the model, or the reason it could not be read."""

    kind: Literal["text", "image", "unreadable"]
    text: str = ""  # "text": the extracted text, whole (the caller cuts it to a token limit)
    detail: str = ""  # for the header the model sees: "12 pages", "2 sheets", an image's size
    reason: str = ""  # "unreadable": why, in words a Slack user reads after the file name
    image: bytes = b""  # "image": the image scaled down, encoded
    mime: str = ""  # "image": "image/png" or "image/jpeg"
    width: int = 0  # "image": the size of `image`, after scaling
    height: int = 0


class _Unreadable(Exception):
    """Ends a conversion from deep inside a parser with a reason a person reads."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _unreadable(reason: str) -> Converted:
    return Converted(kind="unreadable", reason=reason)


# Classifying ---------------------------------------------------------------------------------------------


def classify(name: str, mimetype: str, filetype: str) -> Kind:
    """What a file is, from Slack's metadata alone (nothing downloaded)."""
    claimed = _claimed(name, mimetype, filetype)
    return _KIND.get(claimed, "unsupported") if claimed else "unsupported"


def unsupported_reason(name: str, mimetype: str, filetype: str) -> str:
    """Why a file ``classify`` calls unsupported cannot be read, in words for the person who shared it."""
    claimed = _claimed(name, mimetype, filetype)
    return _WHAT_IT_IS.get(claimed, "an unsupported file type") if claimed else "an unsupported file type"


def _claimed(name: str, mimetype: str, filetype: str) -> _Format | None:
    """The format the metadata names: Slack's filetype, then the mimetype, then the name's extension."""
    mime = mimetype.split(";", 1)[0].strip().lower()
    filetype = filetype.strip().lower()
    if mime.startswith("audio/"):
        return "audio"  # Slack's voice clips are "mp4" or "webm" files with an audio mimetype
    if filetype not in _GENERIC_FILETYPES and filetype in _FILETYPES:
        return _FILETYPES[filetype]
    if mime not in _GENERIC_MIMETYPES:
        if mime in _MIMETYPES:
            return _MIMETYPES[mime]
        for prefix, format_ in _MIME_PREFIXES:
            if mime.startswith(prefix):
                return format_
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if extension in _EXTENSIONS:
        return _EXTENSIONS[extension]
    return "text" if filetype == "text" else None


def _sniff(data: bytes) -> _Format | None:
    """The format the bytes' magic numbers show, or None (text, or nothing known)."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] in _RIFF:
        return _RIFF[head[8:12]]
    if data[:1024].lstrip(b"\xef\xbb\xbf\r\n\t ").startswith(b"%PDF-"):
        return "pdf"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "ole"  # .doc/.xls/.ppt, and also a password-protected .docx/.xlsx/.pptx
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B ", b"M4P "):
            return "audio"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
            return "other-image"
        return "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video"  # Matroska or WebM; an audio-only WebM is told apart by its metadata
    if head.startswith((b"OggS", b"fLaC", b"ID3")):
        return "audio"
    if head.startswith((b"II*\x00", b"MM\x00*", b"8BPS")):
        return "other-image"
    if head.startswith((b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\xfd7zXZ\x00")) or (
        data[257:262] == b"ustar"
    ):
        return "archive"
    return None


# Converting ----------------------------------------------------------------------------------------------


def convert(data: bytes, *, name: str, mimetype: str, filetype: str) -> Converted:
    """``data`` as text or a scaled image for the model, or why it cannot be read. Never raises for bad
    input. CPU heavy: run it in a child (``convert_in_child``), never on the event loop."""
    try:
        converted = _convert(data, _claimed(name, mimetype, filetype))
    except _Unreadable as problem:
        return _unreadable(problem.reason)
    except MemoryError:
        return _unreadable("too large to read")
    except Exception:
        # Parsers raise anything at all on hostile input; their messages may quote the file, so DEBUG only.
        log.debug("could not convert %s", name, exc_info=True)
        return _unreadable("could not be read")
    if converted.kind == "text":
        return Converted(kind="text", text=valid_text(converted.text), detail=converted.detail)
    return converted


def _convert(data: bytes, claimed: _Format | None) -> Converted:
    if not data:
        return _unreadable("an empty file")
    sniffed = _sniff(data)
    if sniffed in _IMAGES:
        return _image(data, sniffed)
    if sniffed == "pdf":
        return _pdf(data)
    if sniffed == "zip":
        return _zip(data, claimed)
    if sniffed is not None:
        if claimed == "audio" and sniffed in ("audio", "video"):
            sniffed = "audio"
        return _unreadable(_WHAT_IT_IS.get(sniffed, "an unsupported file type"))
    if claimed in _IMAGES:
        return _unreadable("not a readable image")
    if claimed in _NOT_READABLE:
        return _unreadable(_NOT_READABLE[claimed])
    if claimed == "html":
        return _html(_decode(data))
    if claimed == "text":
        return _text(_decode(data))
    return _unreadable(
        _WHAT_IT_IS.get(claimed, "an unsupported file type") if claimed else "an unsupported file type"
    )


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _line_count(text: str) -> int:
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def _capped(text: str) -> str:
    """``text`` cut at ``MAX_TEXT_CHARS``, saying so."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    kept = text[:MAX_TEXT_CHARS]
    return f"{kept}\n(… {_count(_line_count(text) - _line_count(kept), 'more line')} not read)"


# Text ----------------------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    """Text in UTF-8 (BOM or not), UTF-16 or UTF-32 with a BOM, else Windows-1252 or Latin-1."""
    # UTF-32's little-endian BOM begins with UTF-16's, so it is looked for first.
    for bom, codec in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(codec, "replace")
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", "replace")
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise _Unreadable("a binary file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # cp1252 leaves five bytes undefined; Latin-1 takes every byte


def _text(text: str) -> Converted:
    return Converted(kind="text", text=_capped(text), detail=_count(_line_count(text), "line"))


def _html(markup: str) -> Converted:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    lines: list[str] = []
    for line in soup.get_text("\n").splitlines():
        line = line.strip()
        if line or (lines and lines[-1]):
            lines.append(line)
    text = "\n".join(lines).strip()
    if not text:
        return _unreadable("a web page without text")
    return Converted(kind="text", text=_capped(text), detail=_count(_line_count(text), "line"))


# Images --------------------------------------------------------------------------------------------------

_PILLOW_FORMATS: dict[_Format, str] = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP"}


def scaled_size(width: int, height: int) -> tuple[int, int]:
    """The size an image is scaled to for the model: within the square, then the short side capped;
    never larger. (OpenAI scales so for detail "high", and counts tokens on the result.)"""
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height), MAX_IMAGE_SHORT_SIDE / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _image(data: bytes, format_: _Format) -> Converted:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are too large here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[format_]]) as image:
                return _scaled(image, format_, lossless=data[12:16] == b"VP8L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _unreadable("too large to read")
    except MemoryError:
        raise
    except Exception:
        return _unreadable("not a readable image")


def _scaled(image: Image.Image, format_: _Format, *, lossless: bool) -> Converted:
    from PIL import Image, ImageOps

    stored = image.size
    if format_ == "jpeg":
        # The JPEG decoder can scale by 1/2, 1/4 or 1/8 as it reads: a 48-megapixel photo never
        # needs its full size in memory. It keeps at least the size asked for.
        target = scaled_size(*stored)
        if target != stored:
            image.draft(None, target)
    decoded = image.size
    image.load()
    try:
        oriented = ImageOps.exif_transpose(image)
    except (MemoryError, Image.DecompressionBombError):
        raise
    except Exception:
        oriented = image  # a broken EXIF block; the picture itself is fine
    swapped = oriented.size != decoded
    original = (stored[1], stored[0]) if swapped else stored
    alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    png = format_ in ("png", "gif") or (format_ == "webp" and (alpha or lossless))
    # Resizing a palette image would fall back to nearest-neighbour; JPEG takes no alpha.
    if png:
        mode = "RGBA" if alpha else ("L" if oriented.mode in ("1", "L") else "RGB")
    else:
        mode = "L" if oriented.mode == "L" else "RGB"
    out = oriented if oriented.mode == mode else oriented.convert(mode)
    size = scaled_size(*original)
    if out.size != size:
        out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    if png:
        out.save(buffer, "PNG")
    else:
        out.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return Converted(
        kind="image",
        image=buffer.getvalue(),
        mime="image/png" if png else "image/jpeg",
        width=out.width,
        height=out.height,
        detail=f"{original[0]}x{original[1]}",
    )


# PDF -----------------------------------------------------------------------------------------------------


def _pdf(data: bytes) -> Converted:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise _Unreadable("an encrypted PDF")
        total = len(reader.pages)
    except _Unreadable:
        raise
    except DependencyError as exc:
        # AES needs the `cryptography` package, even when the user password is empty.
        raise _Unreadable("an encrypted PDF") from exc
    except Exception as exc:
        raise _Unreadable("not a readable PDF") from exc
    blocks: list[str] = []
    chars = 0
    found_text = False
    for number in range(1, total + 1):
        if chars > MAX_TEXT_CHARS:
            blocks.append(f"(… {_count(total - number + 1, 'more page')} not read)")
            break
        try:
            text = reader.pages[number - 1].extract_text().strip()
        except DependencyError as exc:
            raise _Unreadable("an encrypted PDF") from exc
        except MemoryError:
            raise
        except Exception:
            text = ""  # one broken page must not cost the others
        found_text = found_text or bool(text)
        blocks.append(f"--- page {number} ---\n{text or '(no text on this page)'}")
        chars += len(blocks[-1])
    if not found_text:
        return _unreadable("a PDF without a text layer, perhaps a scan")
    return Converted(kind="text", text="\n\n".join(blocks), detail=_count(total, "page"))


# Office files --------------------------------------------------------------------------------------------


def _zip(data: bytes, claimed: _Format | None) -> Converted:
    """An Office file by its contents, after making sure it unpacks to a sane size."""
    not_readable = _NOT_READABLE.get(claimed, _WHAT_IT_IS["zip"]) if claimed else _WHAT_IT_IS["zip"]
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            unpacked = sum(member.file_size for member in members)
            packed = sum(member.compress_size for member in members)
            # zipfile stops reading a member at its declared size, so the declared sizes are a true bound.
            if (
                len(members) > MAX_ZIP_MEMBERS
                or unpacked > MAX_UNPACKED_BYTES
                or (unpacked > RATIO_CHECK_FROM_BYTES and unpacked > MAX_COMPRESSION_RATIO * max(packed, 1))
            ):
                return _unreadable("too large once unpacked")
            names = {member.filename for member in members}
            opendocument = "mimetype" in names and archive.getinfo("mimetype").file_size < 200
            mimetype = archive.read("mimetype") if opendocument else b""
    except zipfile.BadZipFile as exc:
        raise _Unreadable(not_readable) from exc
    if "word/document.xml" in names:
        return _office(_docx, data, "docx")
    if "xl/workbook.xml" in names:
        return _office(_xlsx, data, "xlsx")
    if "ppt/presentation.xml" in names:
        return _office(_pptx, data, "pptx")
    if mimetype.startswith(b"application/vnd.oasis.opendocument"):
        return _unreadable("an OpenDocument file; saved as .docx, .xlsx or .pptx I could read it")
    return _unreadable(not_readable)


def _office(parse: Callable[[bytes], Converted], data: bytes, format_: _Format) -> Converted:
    try:
        converted = parse(data)
    except (_Unreadable, MemoryError):
        raise
    except Exception as exc:
        raise _Unreadable(_NOT_READABLE[format_]) from exc
    return converted


def _cell(text: str) -> str:
    """A table cell on one Markdown row."""
    return " ".join(text.split()).replace("|", "\\|")


def _markdown_table(rows: list[list[str]]) -> str:
    width = max((len(row) for row in rows), default=0)
    if not width:
        return ""
    lines = [f"| {' | '.join(row + [''] * (width - len(row)))} |" for row in rows]
    lines.insert(1, f"|{' --- |' * width}")
    return "\n".join(lines)


def _docx(data: bytes) -> Converted:
    import docx
    from docx.text.paragraph import Paragraph

    document = docx.Document(io.BytesIO(data))
    blocks: list[str] = []
    chars = paragraphs = tables = 0
    for block in document.iter_inner_content():
        if chars > MAX_TEXT_CHARS:
            blocks.append("(… the rest of the document not read)")
            break
        if isinstance(block, Paragraph):
            text = block.text.strip()
            if not text:
                continue
            paragraphs += 1
            blocks.append(_heading_mark(block) + text)
        else:
            table = _markdown_table([[_cell(cell.text) for cell in row.cells] for row in block.rows])
            if not table:
                continue
            tables += 1
            blocks.append(table)
        chars += len(blocks[-1])
    if not blocks:
        return _unreadable("a Word document without text")
    detail = _count(paragraphs, "paragraph") + (f", {_count(tables, 'table')}" if tables else "")
    return Converted(kind="text", text="\n\n".join(blocks), detail=detail)


def _heading_mark(paragraph: Paragraph) -> str:
    """ "# " for a title or heading, as many as its level; "" otherwise."""
    try:
        style = paragraph.style.name if paragraph.style is not None else ""
    except Exception:
        return ""  # a style the document names but does not define
    if style == "Title":
        return "# "
    level = style.removeprefix("Heading ")
    return "#" * int(level) + " " if level != style and level.isdigit() and 0 < int(level) < 7 else ""


def _xlsx(data: bytes) -> Converted:
    import openpyxl

    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        sheets = list(workbook.worksheets)
        parts: list[str] = []
        chars = 0
        for index, sheet in enumerate(sheets):
            if chars > MAX_TEXT_CHARS:
                parts.append(f"(… {_count(len(sheets) - index, 'more sheet')} not read)")
                break
            parts.append(_sheet(str(sheet.title), sheet.iter_rows(values_only=True)))
            chars += len(parts[-1])
    finally:
        workbook.close()  # read-only mode keeps the archive open until told
    if not sheets:
        return _unreadable("a spreadsheet without sheets")
    return Converted(kind="text", text="\n\n".join(parts), detail=_count(len(sheets), "sheet"))


def _sheet(title: str, rows: Iterable[tuple[Any, ...]]) -> str:
    """A sheet as "## title" and its non-empty rows as CSV, the first ``MAX_ROWS_PER_SHEET`` of them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    written = more = 0
    for row in rows:
        cells = [_cell_value(value) for value in row]
        while cells and not cells[-1]:
            cells.pop()
        if not cells:
            continue
        if written >= MAX_ROWS_PER_SHEET or out.tell() > MAX_TEXT_CHARS:
            more += 1
            continue
        writer.writerow(cells)
        written += 1
    body = out.getvalue().rstrip("\n") or "(empty)"
    if more:
        body += f"\n(… {_count(more, 'more row')})"
    return f"## {title}\n{body}"


def _cell_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        return value.date().isoformat() if value.time() == datetime.time() else value.isoformat(sep=" ")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def _pptx(data: bytes) -> Converted:
    from pptx import Presentation

    presentation = Presentation(io.BytesIO(data))
    blocks: list[str] = []
    chars = 0
    found_text = False
    slides = list(presentation.slides)
    for number, slide in enumerate(slides, 1):
        if chars > MAX_TEXT_CHARS:
            blocks.append(f"(… {_count(len(slides) - number + 1, 'more slide')} not read)")
            break
        texts = [text for shape in _flattened(slide.shapes) for text in _shape_texts(shape)]
        if slide.has_notes_slide and slide.notes_slide.notes_text_frame is not None:
            notes = slide.notes_slide.notes_text_frame.text.strip()
            if notes:
                texts.append(f"Notes: {notes}")
        found_text = found_text or bool(texts)
        blocks.append("\n".join([f"--- slide {number} ---", *texts]))
        chars += len(blocks[-1])
    if not found_text:
        return _unreadable("a presentation without text")
    return Converted(kind="text", text="\n\n".join(blocks), detail=_count(len(slides), "slide"))


def _flattened(shapes: Iterable[BaseShape]) -> Iterator[BaseShape]:
    from pptx.shapes.group import GroupShape

    for shape in shapes:
        if isinstance(shape, GroupShape):
            yield from _flattened(shape.shapes)
        else:
            yield shape


def _shape_texts(shape: BaseShape) -> list[str]:
    from pptx.shapes.autoshape import Shape
    from pptx.shapes.graphfrm import GraphicFrame

    if isinstance(shape, Shape) and shape.has_text_frame:
        text = str(shape.text_frame.text).strip()
        return [text] if text else []
    if isinstance(shape, GraphicFrame) and shape.has_table:
        rows = [[_cell(cell.text) for cell in row.cells] for row in shape.table.rows]
        table = _markdown_table(rows)
        return [table] if table else []
    return []


# The child process ---------------------------------------------------------------------------------------

# The directory holding the `bot` package: the child runs there, so it imports this very code.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_MAX_HEADER_BYTES = 64 * 1024


async def convert_in_child(
    data: bytes,
    *,
    name: str,
    mimetype: str,
    filetype: str,
    timeout_seconds: float,
    memory_bytes: int,
) -> Converted:
    """``convert`` in a child process limited to ``memory_bytes`` of address space, killed after
    ``timeout_seconds``. Never raises for bad input; a child that fails is an unreadable result."""
    header = {
        "name": name,
        "mimetype": mimetype,
        "filetype": filetype,
        "size": len(data),
        "memory": memory_bytes,
    }
    log.debug("converting %s (%d bytes) in a child process", name, len(data))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.convert",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=_PACKAGE_ROOT,
        )
    except OSError as exc:
        log.warning("could not start a file conversion process: %s", exc)
        return _unreadable("could not be read")
    try:
        async with asyncio.timeout(timeout_seconds):
            out, err = await process.communicate(json.dumps(header).encode() + b"\n" + data)
    except TimeoutError:
        log.warning("a file conversion took longer than %g s; its process was killed", timeout_seconds)
        return _unreadable("took too long to read")
    finally:
        # Also when the caller is cancelled: no child outlives its request.
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    result = _decode_result(out) if process.returncode == 0 else None
    if result is None:
        log.warning("a file conversion process failed (exit status %s)", process.returncode)
        log.debug("its last words: %s", err[-2000:].decode("utf-8", "replace"))
        return _unreadable("could not be read")
    return result


def _encode_result(result: Converted) -> bytes:
    header = {
        "kind": result.kind,
        "text": result.text,
        "detail": result.detail,
        "reason": result.reason,
        "mime": result.mime,
        "width": result.width,
        "height": result.height,
        "image": len(result.image),
    }
    return json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n" + result.image


def _decode_result(out: bytes) -> Converted | None:
    """The child's answer, or None when it is not one."""
    line, newline, image = out.partition(b"\n")
    try:
        header = json.loads(line) if newline else None
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    strings = [header.get(key) for key in ("text", "detail", "reason", "mime")]
    numbers = [header.get(key) for key in ("width", "height", "image")]
    kind = header.get("kind")
    if (
        kind not in ("text", "image", "unreadable")
        or not all(isinstance(value, str) for value in strings)
        or not all(type(value) is int for value in numbers)
        or header["image"] != len(image)
    ):
        return None
    return Converted(
        kind=kind,
        text=header["text"],
        detail=header["detail"],
        reason=header["reason"],
        image=image,
        mime=header["mime"],
        width=header["width"],
        height=header["height"],
    )


def _limit_memory(memory_bytes: int) -> None:
    """Cap this process's address space, where the platform lets it (not on macOS or Windows)."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, AttributeError, ValueError, OSError):
        pass


def _child() -> int:
    """The child's side: one request on stdin, one result on stdout."""
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the result
    request = sys.stdin.buffer
    header = json.loads(request.readline(_MAX_HEADER_BYTES))
    _limit_memory(int(header["memory"]))
    try:
        data = request.read(int(header["size"]))
        result = convert(
            data, name=str(header["name"]), mimetype=str(header["mimetype"]), filetype=str(header["filetype"])
        )
    except MemoryError:
        result = _unreadable("too large to read")
    results.write(_encode_result(result))
    results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
