"""CSV files as users save them: one reader for every table the commands take (slide lists,
labels, split files, tile lists).

Spreadsheets write a BOM, pad header names with spaces ("slide_id, path"), leave ",,," rows
after the last line (and blank lines or Excel's "sep=;" line above the header), and in locales with a decimal comma save "CSV" with ';' (or tabs). A header
is read with the separator that splits it into the most columns (``separator``).
"""
from __future__ import annotations

import csv
import io
import os
import re
from typing import Type


SEPARATORS = (",", ";", "\t")
EXTENSIONS = (".csv", ".tsv", ".txt")  # what spreadsheets and clinical exports name a table


def is_table(path: str) -> bool:
    """An existing file named like a table (.csv, .tsv, .txt): read by ``read_rows``."""
    return os.path.isfile(path) and path.lower().endswith(EXTENSIONS)


# Excel's first line naming the separator ("sep=;"), written for Excel to open the file right.
EXCEL_SEP_LINE = re.compile(r"sep=(.)(\r\n?|\n)")


def _table_text(text: str) -> tuple[str, str | None]:
    """(the text from the header line on, the separator an Excel "sep=" line names or None):
    blank lines above the header and the "sep=" line are not the header."""
    text = text.lstrip("\r\n")
    m = EXCEL_SEP_LINE.match(text)
    return (text[m.end():].lstrip("\r\n"), m.group(1)) if m else (text, None)


def separator(text: str) -> str:
    """The separator that splits the header line into the most fields (quotes respected; ties go
    to ','): a tab or ';' file whose column names hold commas ("note, free text") is not a
    comma file. An Excel "sep=X" first line decides it."""
    text, named = _table_text(text)
    if named:
        return named
    header = re.split(r"\r\n?|\n", text, maxsplit=1)[0]  # "\r" alone: Excel's old Mac CSV
    fields = {d: len(next(csv.reader([header], delimiter=d), [])) for d in SEPARATORS}
    return max(SEPARATORS, key=lambda d: (fields[d], d == ","))


def separator_of(path: str) -> str:
    """``separator`` of a CSV file's first line (',' when it cannot be read as UTF-8)."""
    with open(path, "rb") as f:
        head = f.read(65536)
    return separator(head.decode("utf-8-sig", errors="replace"))


def read_rows(path: str, what: str = "CSV", error: Type[Exception] = ValueError) -> tuple[list[str], list[dict]]:
    """(header names, rows as dicts) of a UTF-8 CSV; header names are stripped, trailing empty
    rows dropped. Another encoding raises ``error`` naming the file and the byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
    reader = csv.DictReader(io.StringIO(_table_text(text)[0], newline=""), delimiter=separator(text))
    try:
        if reader.fieldnames:
            reader.fieldnames = [(f or "").strip() for f in reader.fieldnames]
        rows = list(reader)
    except csv.Error as e:  # e.g. a cell over the csv module's field size limit
        raise error(f"{path}: not a readable {what} ({e})") from None
    names = [f for f in reader.fieldnames or [] if f]
    twice = sorted({f for f in names if names.count(f) > 1})
    if twice:  # a dict row keeps the last of them: which one a command read would go unsaid
        raise error(f"{path}: column(s) {twice} appear more than once in the header; "
                    f"rename or remove the copies")
    while rows and not any(isinstance(v, str) and v.strip() for v in rows[-1].values()):
        rows.pop()  # trailing ",,," rows a spreadsheet leaves after its last line
    return list(reader.fieldnames or []), rows
