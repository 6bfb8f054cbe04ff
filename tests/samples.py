"""Files the tests share with the bot, made inside the tests (never downloaded): images with Pillow,
PDFs with reportlab, Word documents with python-docx, spreadsheets with openpyxl, slides with
python-pptx, archives with zipfile."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import docx
import openpyxl
import pptx
from PIL import Image
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas


def image(width: int, height: int, fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A plain image in ``fmt`` (PNG, JPEG, GIF, WEBP)."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


def pdf(pages: Sequence[str]) -> bytes:
    """A PDF with a text layer: one page per string."""
    out = io.BytesIO()
    document = canvas.Canvas(out, pagesize=A4)
    for text in pages:
        document.drawString(72, 750, text)
        document.showPage()
    document.save()
    return out.getvalue()


def scanned_pdf(pages: int = 1) -> bytes:
    """A PDF of images only, as a scanner makes it: no text layer."""
    out = io.BytesIO()
    document = canvas.Canvas(out, pagesize=A4)
    picture = Image.new("RGB", (200, 100), (10, 10, 10))
    for _ in range(pages):
        document.drawInlineImage(picture, 72, 600, width=200, height=100)
        document.showPage()
    document.save()
    return out.getvalue()


def word(paragraphs: Sequence[str], table: Sequence[Sequence[str]] = ()) -> bytes:
    """A DOCX with ``paragraphs`` and, after them, ``table`` (rows of cells)."""
    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for row, cells in zip(grid.rows, table, strict=True):
            for cell, value in zip(row.cells, cells, strict=True):
                cell.text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def workbook(sheets: dict[str, Sequence[Sequence[object]]]) -> bytes:
    """An XLSX with a sheet per name, rows of values."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(list(row))
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def slides(texts: Sequence[tuple[str, str]]) -> bytes:
    """A PPTX with a (title, body) slide each."""
    deck = pptx.Presentation()
    for title, body in texts:
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def archive(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return out.getvalue()
