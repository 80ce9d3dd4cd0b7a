"""CSV files as users save them: one reader for every table the commands take (slide lists,
labels, split files, tile lists).

Spreadsheets write a BOM, pad header names with spaces ("slide_id, path"), leave ",,," rows
after the last line, and in locales with a decimal comma save "CSV" with ';' (or tabs). A header
without a comma but with one of those separators is read with it rather than as one column.
"""
from __future__ import annotations

import csv
import io
from typing import Type


def read_rows(path: str, what: str = "CSV", error: Type[Exception] = ValueError) -> tuple[list[str], list[dict]]:
    """(header names, rows as dicts) of a UTF-8 CSV; header names are stripped, trailing empty
    rows dropped. Another encoding raises ``error`` naming the file and the byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
    header = text.lstrip("\r\n").split("\n", 1)[0]
    delimiter = next((d for d in (";", "\t") if "," not in header and d in header), ",")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if reader.fieldnames:
        reader.fieldnames = [(f or "").strip() for f in reader.fieldnames]
    rows = list(reader)
    while rows and not any(isinstance(v, str) and v.strip() for v in rows[-1].values()):
        rows.pop()  # trailing ",,," rows a spreadsheet leaves after its last line
    return list(reader.fieldnames or []), rows
