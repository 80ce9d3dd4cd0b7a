"""Cohort tables: slide labels, survival columns, split files, patient-level folds, label
fractions. Read by hipt-knn and hipt-finetune alike, so both treat every input the same way.

Labels CSV (the official HIPT / CLAM / MCAT dataset CSVs as they are; extra columns ignored):
    slide_id[,case_id][,<label column>][,survival_months,censorship]
- ``slide_id`` is a NAME, never a path: ids with a path separator, ``.``/``..`` or that
  would resolve outside the embeddings folder are refused naming the CSV row. A slide-file
  extension (.svs, .tif, .ndpi, ...) is stripped and the rest mapped as hipt-prep names slide
  files (data_prep.shards.safe_slide_id: NFC, 'my slide' -> 'my_slide'), so ids match the
  embedding files by stem.
  Duplicates are detected after that normalization (and case-folded on a case-insensitive
  filesystem).
- The label comes from ``label_column`` (default ``label``; e.g. ``oncotree_code``). Classes
  are the sorted distinct values; integer labels are classes by value (``1,2`` are two
  classes, not 0..2). ``classes`` selects and orders classes: rows of other classes are
  dropped and counted (``Cohort.dropped``). At least 2 classes are required.
- Survival: ``survival_months`` finite and >= 0, ``censorship`` 0/1 (CLAM/MCAT convention:
  1 = censored, no event observed). ``case_id`` groups the slides of one patient: every used
  row needs one, written one way (letter case included). Without that column, slide ids that
  are all TCGA barcodes give their patient (the first 12 characters); otherwise patients are
  unknown, and the fold plan carries a warning saying leaks cannot be seen.
- Read as UTF-8 (a BOM is tolerated); other encodings fail naming the file. A header with ';'
  or a tab and no comma sets the separator.

Splits (``spec``):
- a folder of ``splits_{i}.csv``: CLAM/HIPT subtyping files (columns train,val,test) or
  MCAT/HIPT survival files (columns train,val only: ``val`` is the held-out fold and becomes
  the test part). Ids may be slide ids (with or without extension) or case ids (a case id
  selects all that patient's slides). Ids absent from the cohort are listed once and skipped,
  unless they are numeric and match a cohort id once leading zeros are restored or stripped
  ('7' for '007'): that is refused naming the file.
  A file that puts one patient in two parts is refused naming the patient ids.
- ``kfold:K`` (optionally ``kfold:K:val=F``): a seeded stratified K-fold; with case ids in the
  CSV it is a stratified GROUP k-fold (no patient in two parts), and ``val=F`` carves a
  patient-level validation part of about F of the training patients out of train.
Every fold list can be written back as CLAM split files (``write_clam_splits``).

Label fraction (``label_frac`` in (0, 1]): per fold, per class, a seeded subsample of the
training PATIENTS (ceil(frac * n), at least one); a fixed seed gives nested training parts as
the fraction grows, and the val and test parts never change, except that a fit on train and
val together (hipt-knn --fit-on train+val) samples the fraction from both.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import math
import os
import re
import sys
from typing import Iterable, Optional, Sequence

import numpy as np

from data_prep import csv_table


class CohortError(ValueError):
    """Bad cohort input (message names the file and the problem)."""


# Whole-slide image and bag extensions stripped from ids ("x.svs" and "x" name the same slide).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                    ".svslide", ".czi", ".dcm", ".isyntax", ".qptiff", ".npz", ".h5", ".pt")
PARTS = ("train", "val", "test")
PATIENTS_FROM_COLUMN = "grouped by case_id"
PATIENTS_FROM_TCGA = "patients from TCGA barcodes"
# A TCGA slide barcode starts with its patient's: TCGA-<site>-<participant>-<sample type>...
TCGA_SLIDE = re.compile(r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-[0-9]{2}", re.IGNORECASE)
TCGA_CASE = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)


@dataclasses.dataclass
class Cohort:
    slide_ids: list[str]
    labels: np.ndarray                 # int [N] class index (-1 when only survival is given)
    class_names: list[str]
    case_ids: list[str]                # = slide_ids when the patients are unknown
    times: Optional[np.ndarray] = None     # survival_months [N] float
    censored: Optional[np.ndarray] = None  # bool [N], True = censored
    path: str = ""
    has_case_ids: bool = False         # the patient of every slide is known (see patients_from)
    patients_from: str = ""            # PATIENTS_FROM_COLUMN, PATIENTS_FROM_TCGA or "" (unknown)
    dropped: dict = dataclasses.field(default_factory=dict)  # class -> rows dropped by `classes`
    dropped_ids: set = dataclasses.field(default_factory=set)  # slide and case ids of those rows

    def slides_of_case(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s, c in zip(self.slide_ids, self.case_ids):
            out.setdefault(c, []).append(s)
        return out

    def case_of(self) -> dict[str, str]:
        return dict(zip(self.slide_ids, self.case_ids))


# ---------------------------------------------------------------------------------- ids and files

def read_csv_rows(path: str, what: str = "CSV") -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV (data_prep.csv_table: BOM, ';' or tab separators, padded header names,
    trailing empty rows); a missing file or another encoding is a CohortError."""
    if not os.path.isfile(path):
        raise CohortError(f"{path}: {what} file not found")
    return csv_table.read_rows(path, what, CohortError)[1]


def strip_extension(name: str) -> str:
    low = name.lower()
    for ext in SLIDE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def normalize_id(raw: str, where: str) -> str:
    """A slide or case id as the file-name stem hipt-prep gives that slide (extension stripped,
    then data_prep.shards.safe_slide_id: NFC, 'my slide' -> 'my_slide'), so a row written as
    the slide file is named meets the bag made from it; ``where`` ("FILE: row N") names the
    row when the id is empty or looks like a path."""
    from data_prep.shards import safe_slide_id

    name = (raw or "").strip()
    if not name:
        raise CohortError(f"{where}: empty id")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):  # NUL bytes: a binary or damaged file
        raise CohortError(f"{where}: id {name!r} contains control characters; ids must be plain slide names")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in seps) or name in (".", ".."):
        raise CohortError(f"{where}: id {name!r} is a path; ids must be plain slide names")
    return safe_slide_id(strip_extension(name))


def case_ids_as_slide_ids_hint(slide_ids: Sequence[str]) -> str:
    """The end of a "none of the labelled slides were found" error when the slide_id column
    holds TCGA patient ids (TCGA-XX-XXXX), which no slide file is named after."""
    if slide_ids and all(TCGA_CASE.fullmatch(s) for s in slide_ids):
        return ("; the slide_id values look like TCGA case (patient) ids, TCGA-XX-XXXX: slide_id must name "
                "the slide files (TCGA-XX-XXXX-01Z-00-DX1...), with the patient in a case_id column")
    return ""


def zero_padding_twins(ids: Iterable[str], targets: Iterable[str]) -> list[tuple[str, str]]:
    """(id, target) for each numeric id that is no target but equals one once the leading zeros
    of both are stripped ('7' and '007': a column a spreadsheet read as numbers)."""
    targets = set(targets)
    by_number = {t.lstrip("0") or "0": t for t in targets if t.isdigit()}
    return [(i, by_number[i.lstrip("0") or "0"]) for i in ids
            if i.isdigit() and i not in targets and (i.lstrip("0") or "0") in by_number]


def _zeros_cause(found: str, meant: str, of: str) -> str:
    """Why ``found`` was written for ``meant``, for the end of a leading-zeros refusal."""
    if len(found) < len(meant):
        return "the ids lost their leading zeros (a spreadsheet read them as numbers?)"
    return f"the ids have leading zeros that {of} lack"


def check_leading_zeros(coh: "Cohort", bag_ids: Iterable[str], embeddings: str) -> None:
    """Refuse labels whose numeric slide ids lost the leading zeros of the bags' names ('7' for
    007.npz: a spreadsheet read the column as numbers): those slides would be left out as "not
    extracted" while their bags are left out as "unlabelled"."""
    bag_ids = set(bag_ids)
    labelled = set(coh.slide_ids) | set(coh.dropped_ids)
    lost = zero_padding_twins([s for s in coh.slide_ids if s not in bag_ids], bag_ids - labelled)
    if lost:
        s, b = lost[0]
        cause = _zeros_cause(s, b, "the bags' names")
        raise CohortError(f"{coh.path or 'labels'}: slide_id {s!r} has no bag but {b!r} in {embeddings} has no label "
                          f"row ({len(lost)} such id(s)): {cause}; write them as the bags are named")


def check_split_leading_zeros(raw: Sequence[dict], unknown: Iterable[str], coh: "Cohort", where: str) -> None:
    """Refuse split files whose numeric ids are not in the labels until leading zeros are
    restored or stripped ('7' for the labels' '007'): those slides would be skipped as "not in
    the labels CSV" and the folds run without them. ``where``: the split file, with {k}."""
    labelled = set(coh.slide_ids) | set(coh.case_ids) | set(coh.dropped_ids)
    twins = zero_padding_twins(unknown, labelled)
    if twins:
        s, t = twins[0]
        k = next(k for k, fold in enumerate(raw) if any(s in fold[p] for p in PARTS))
        cause = _zeros_cause(s, t, "the labels' ids")
        raise CohortError(f"{where.format(k=k)}: id {s!r} is not in {coh.path or 'the labels'}, which has {t!r} "
                          f"({len(twins)} such id(s)): {cause}; write them as the labels do")


def _case_insensitive(folder: str) -> bool:
    """Whether the filesystem holding ``folder`` ignores case (probe: the swapped-case name of an
    existing folder resolves to the same folder)."""
    folder = os.path.abspath(folder)
    base = os.path.basename(folder)
    swapped = base.swapcase()
    if not base or swapped == base or not os.path.isdir(folder):
        return os.path.normcase("A") == os.path.normcase("a")
    other = os.path.join(os.path.dirname(folder), swapped)
    try:
        return os.path.exists(other) and os.path.samefile(folder, other)
    except OSError:
        return False


def id_key(slide_id: str, case_insensitive: bool) -> str:
    return slide_id.lower() if case_insensitive else slide_id


def resolve_in_folder(folder: str, slide_id: str, ext: str, where: str = "") -> str:
    """FOLDER/<slide_id><ext>, refusing ids that are paths or would resolve outside FOLDER
    (symlinked escapes included). The file need not exist."""
    name = normalize_id(slide_id, where or folder)
    path = os.path.join(folder, name + ext)
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise CohortError(f"{where or folder}: id {slide_id!r} resolves outside {folder}")
    return path


def bag_file(embeddings: str, slide_id: str, where: str = "") -> Optional[str]:
    """The extracted bag of ``slide_id`` inside EMB/slides/ (or EMB itself when it has no
    slides/, e.g. a folder of TRIDENT .h5 or official .pt bags), or None when it was not
    extracted. The one place a slide id becomes a file path in evaluation."""
    from data_prep import bags

    folder = os.path.join(embeddings, bags.SLIDES)
    folder = folder if os.path.isdir(folder) else embeddings
    found = [p for p in (resolve_in_folder(folder, slide_id, fmt.ext, where) for fmt in bags.FORMATS.values())
             if os.path.isfile(p)]
    if len(found) > 1:
        raise CohortError(str(bags.two_formats_error(slide_id, found)))
    if not found:  # a bag named after its slide file ("my slide.h5" is slide my_slide)
        try:
            renamed = bags.find_bag(embeddings, normalize_id(slide_id, where or folder))
        except bags.BagError as e:
            raise CohortError(str(e)) from None
        if renamed is not None:
            root = os.path.realpath(folder)
            if os.path.commonpath([root, os.path.realpath(renamed)]) != root:
                raise CohortError(f"{where or folder}: id {slide_id!r} resolves outside {folder}")
            found = [renamed]
    return found[0] if found else None


# ---------------------------------------------------------------------------------- labels CSV

# Cells that spreadsheets, pandas and TCGA's clinical tables write for "no value": read as a
# class they would become one more class of the model, so they count as empty cells.
MISSING_VALUES = frozenset({"na", "n/a", "nan", "none", "null", "[not available]", "[not applicable]",
                            "[unknown]", "[discrepancy]", "[not evaluated]"})


def is_missing(value: str) -> bool:
    return not value.strip() or value.strip().lower() in MISSING_VALUES


def _check_one_spelling_per_number(raw: list[str], path: str, column: str, lines: list[int]) -> None:
    """'1' on one row and '1.0' on another (a column pandas wrote as floats, then edited) are
    the same label written two ways; as strings they would be two classes."""
    first: dict[float, tuple[str, int]] = {}
    for v, n in zip(raw, lines):
        try:
            number = float(v)
        except ValueError:
            continue
        seen = first.setdefault(number, (v, n))
        if seen[0] != v:
            raise CohortError(f"{path}: column {column!r} has {seen[0]!r} (row {seen[1]}) and {v!r} (row {n}): "
                              "the same number written two ways would be two classes; write it one way")


def _parse_labels(raw: list[str], classes: Optional[Sequence[str]], path: str, column: str):
    """(class index per row or -1 when dropped, class names)."""
    is_int = all(re.fullmatch(r"\s*-?\d+\s*", v) for v in raw)
    canon = [str(int(v)) if is_int else v for v in raw]
    if classes:
        names = [str(int(c)) if is_int and re.fullmatch(r"-?\d+", str(c).strip()) else str(c).strip()
                 for c in classes]
        if len(set(names)) != len(names):
            raise CohortError(f"classes {list(classes)}: a class is listed twice")
        absent = [c for c in names if c not in set(canon)]
        if absent:
            raise CohortError(f"{path}: class(es) {absent} not found in column {column!r} "
                              f"(values: {sorted(set(canon))[:10]})")
    else:
        distinct = set(canon)
        names = ([str(v) for v in sorted(int(v) for v in distinct)] if is_int else sorted(distinct))
    index = {c: i for i, c in enumerate(names)}
    return np.array([index.get(v, -1) for v in canon], np.int64), names


# "22,5": a decimal comma, the convention of the locales whose spreadsheets save "CSV" with ';'
# (or tabs), where a thousands separator is a point. In a comma CSV the same quoted cell may be
# 22.5 or a thousands-separated 225 ("1,234"): refused there rather than guessed.
DECIMAL_COMMA = re.compile(r"-?\d+,\d+")


def _decimal_point(cell: str, decimal_comma: bool, path: str, line: int, column: str) -> str:
    """``cell`` with a decimal comma read as a point where the file's separator makes it the
    convention (``decimal_comma``), else a CohortError naming it; other cells unchanged."""
    if not DECIMAL_COMMA.fullmatch(cell):
        return cell
    if decimal_comma:
        return cell.replace(",", ".")
    raise CohortError(f"{path}: row {line}: {column} {cell!r}: decimal comma: write {cell.replace(',', '.')}")


def _survival(rows, path: str, lines: list[int], decimal_comma: bool = False) -> tuple[np.ndarray, np.ndarray]:
    times, censored = [], []
    for r, line in zip(rows, lines):
        t, c = (r.get("survival_months") or "").strip(), (r.get("censorship") or "").strip()
        t = _decimal_point(t, decimal_comma, path, line, "survival_months")
        c = _decimal_point(c, decimal_comma, path, line, "censorship")
        try:
            tv = float(t)
        except ValueError:
            tv = float("nan")
        if not math.isfinite(tv) or tv < 0:
            raise CohortError(f"{path}: row {line}: survival_months {t!r} must be a finite number >= 0")
        if c not in ("0", "1", "0.0", "1.0"):
            raise CohortError(f"{path}: row {line}: censorship {c!r} must be 0 (event) or 1 (censored)")
        times.append(tv)
        censored.append(c.startswith("1"))
    return np.array(times, np.float64), np.array(censored, bool)


def _check_one_outcome_per_case(path: str, cases: list[str], times, censored, lines: list[int],
                                source: str = PATIENTS_FROM_COLUMN) -> None:
    """A patient's slides share one survival outcome; rows that disagree are an error (which
    row to believe is the user's call), named with their line numbers."""
    first: dict[str, tuple] = {}
    for case, t, c, n in zip(cases, times, censored, lines):
        seen = first.setdefault(case, (float(t), bool(c), n))
        if (seen[0], seen[1]) != (float(t), bool(c)):
            what = "case" if source == PATIENTS_FROM_COLUMN else f"patient ({source})"
            raise CohortError(f"{path}: {what} {case!r} has survival {seen[0]:g}/censored={int(seen[1])} on row "
                              f"{seen[2]} but {float(t):g}/censored={int(c)} on row {n}; one outcome per patient")


def read_labels_csv(path: str, require_survival: bool = False, label_column: str = "label",
                    classes: Optional[Sequence[str]] = None,
                    case_insensitive: Optional[bool] = None) -> Cohort:
    """Parse the labels CSV described in the module docstring. ``require_survival``: survival
    columns required and the label column optional; otherwise the label column is required."""
    rows = read_csv_rows(path, "labels")
    if not rows:
        raise CohortError(f"{path}: no rows")
    cols = {c for c in rows[0] if c is not None}
    label_column = label_column or "label"
    need = {"slide_id"} | ({"survival_months", "censorship"} if require_survival else {label_column})
    if need - cols:
        raise CohortError(f"{path}: missing column(s) {sorted(need - cols)}; has {sorted(cols)}")
    lines = list(range(2, len(rows) + 2))  # CSV line of each row (header = line 1)
    ids = [normalize_id(r["slide_id"], f"{path}: row {n}") for r, n in zip(rows, lines)]
    case_cells = [(r.get("case_id") or "").strip() for r in rows]
    has_cases = "case_id" in cols and any(not is_missing(c) for c in case_cells)
    cases = [normalize_id(c, f"{path}: row {n}") if has_cases and not is_missing(c) else s
             for c, n, s in zip(case_cells, lines, ids)]
    patients_from = PATIENTS_FROM_COLUMN if has_cases else ""
    if not has_cases and all(TCGA_SLIDE.match(s) for s in ids):
        # TCGA slide names carry their patient: grouping by it keeps DX1 and DX2 of one
        # patient in one part of a fold (the labels need no case_id column for that).
        cases = [TCGA_SLIDE.match(s).group(1).upper() for s in ids]
        patients_from = PATIENTS_FROM_TCGA
    insensitive = _case_insensitive(os.path.dirname(os.path.abspath(path))) \
        if case_insensitive is None else case_insensitive
    seen: dict[str, int] = {}
    for sid, n in zip(ids, lines):
        key = id_key(sid, insensitive)
        if key in seen:
            raise CohortError(f"{path}: rows {seen[key]} and {n}: duplicate slide_id {sid!r} "
                              "(compared without extension" + (", ignoring case)" if insensitive else ")"))
        seen[key] = n
    labels, class_names = np.full(len(rows), -1, np.int64), []
    dropped: dict[str, int] = {}
    keep = np.ones(len(rows), bool)
    if label_column in cols and (not require_survival or classes
                                 or any((r.get(label_column) or "").strip() for r in rows)):
        raw = [(r.get(label_column) or "").strip() for r in rows]
        empty = [(n, v) for v, n in zip(raw, lines) if is_missing(v)]
        if empty and not require_survival and not classes:
            n, v = empty[0]
            raise CohortError(f"{path}: row {n}: " + (f"{label_column!r} is {v!r}, a missing value" if v else
                                                      f"empty {label_column!r}")
                              + f" ({len(empty)} such row(s)); remove those rows or choose the classes to keep")
        if not empty or classes:
            # Rows without a value are dropped by a class list (they are in no class).
            present = [i for i, v in enumerate(raw) if not is_missing(v)]
            _check_one_spelling_per_number([raw[i] for i in present], path, label_column,
                                           [lines[i] for i in present])
            sub, class_names = _parse_labels([raw[i] for i in present], classes, path, label_column)
            labels[present] = sub
            keep = labels >= 0
            for v, k in zip(raw, keep):
                if not k:
                    dropped[v or "(empty)"] = dropped.get(v or "(empty)", 0) + 1
            if not require_survival and len(class_names) < 2:
                raise CohortError(f"{path}: column {label_column!r} has {len(class_names)} class(es) "
                                  f"{class_names}; classification needs at least 2")
    elif classes:
        raise CohortError(f"{path}: classes given but no column {label_column!r}")
    times = censored = None
    if {"survival_months", "censorship"} <= cols:
        kept_rows = [r for r, k in zip(rows, keep) if k]
        try:
            times, censored = _survival(kept_rows, path, [n for n, k in zip(lines, keep) if k],
                                        csv_table.separator_of(path) != ",")
        except CohortError:
            if require_survival:
                raise
            times = censored = None  # a classification run ignores unusable survival columns
    if has_cases:
        _check_case_cells(path, case_cells, cases, lines, keep)
    if times is not None and patients_from:
        _check_one_outcome_per_case(path, [cases[i] for i in np.flatnonzero(keep)], times, censored,
                                    [n for n, k in zip(lines, keep) if k], patients_from)
    if class_names and not classes:
        folded: dict[str, list[str]] = {}
        for name in class_names:
            folded.setdefault(name.casefold(), []).append(name)
        clashes = [names for names in folded.values() if len(names) > 1]
        if clashes:
            print(f"{path}: column {label_column!r} has classes that differ only by case: {clashes}; "
                  "they are kept apart (give the class list to merge or choose)", file=sys.stderr)
    dropped_ids = {x for i, s, c in zip(range(len(ids)), ids, cases) if not keep[i] for x in (s, c)}
    sel = np.flatnonzero(keep)
    return Cohort([ids[i] for i in sel], labels[sel], class_names, [cases[i] for i in sel],
                  times, censored, path=path, has_case_ids=bool(patients_from), patients_from=patients_from,
                  dropped=dropped, dropped_ids=dropped_ids - {cases[i] for i in sel})


def _check_case_cells(path: str, cells: list[str], cases: list[str], lines: list[int], keep) -> None:
    """Every used row of a case_id column names its patient, one way. An empty cell would make
    its slide a patient of its own, and 'TCGA-A1-A0SB' beside 'tcga-a1-a0sb' two patients,
    while the folds are announced as patient-level: one patient could sit in train and test."""
    empty = [n for c, n, k in zip(cells, lines, keep) if k and is_missing(c)]
    if empty:
        raise CohortError(f"{path}: row(s) {', '.join(map(str, empty[:10]))}{' ...' if len(empty) > 10 else ''}: "
                          f"empty 'case_id' ({len(empty)} such row(s)); give every slide its patient, or "
                          "remove the case_id column (slide-level folds)")
    first: dict[str, tuple[str, str, int]] = {}  # folded id -> (id, cell, row)
    for c, case, n, k in zip(cells, cases, lines, keep):
        if not k:
            continue
        seen = first.setdefault(case.casefold(), (case, c, n))
        if seen[0] != case:
            raise CohortError(f"{path}: column 'case_id' has {seen[1]!r} (row {seen[2]}) and {c!r} (row {n}): "
                              "one patient written two ways would be two patients; write it one way")


# ---------------------------------------------------------------------------------- split files

def _split_files(directory: str) -> list[str]:
    files = glob.glob(os.path.join(directory, "splits_*.csv"))
    numbered = sorted((int(m.group(1)), f) for f in files
                      if (m := re.fullmatch(r"splits_(\d+)\.csv", os.path.basename(f))))
    if not numbered:
        raise CohortError(f"{directory}: no splits_{{i}}.csv files")
    numbers = [n for n, _ in numbered]
    if numbers != list(range(len(numbers))):
        # Fold k is splits_k.csv in every message, record and output folder: a set numbered
        # from 1, or one with a file missing, would have its folds reported under other numbers.
        gaps = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise CohortError(f"{directory}: split files are numbered {numbers[:10]}{' ...' if len(numbers) > 10 else ''}, "
                          f"but splits_{gaps[0]}.csv is missing; number them splits_0.csv ... "
                          f"splits_{len(numbers) - 1}.csv (fold k is splits_k.csv)")
    return [f for _, f in numbered]


def read_clam_splits(directory: str) -> list[dict[str, list[str]]]:
    """splits_0.csv, splits_1.csv, ... -> [{"train": [...], "val": [...], "test": [...]}, ...].

    Subtyping files (train,val,test) are taken as they are; survival files (train,val only) have
    their held-out ``val`` column moved to ``test``. Ids are normalized (extension stripped,
    refused when they are paths)."""
    folds = []
    for f in _split_files(directory):
        rows = read_csv_rows(f, "split")
        cols = set(rows[0]) if rows else set()
        if "train" not in cols or not ({"test", "val"} & cols):
            raise CohortError(f"{f}: expected columns train,val,test (subtyping) or train,val (survival)")
        fold = {p: [] for p in PARTS}
        for n, r in enumerate(rows, start=2):
            for part in PARTS:
                v = (r.get(part) or "").strip()
                if v:
                    fold[part].append(normalize_id(v, f"{f}: row {n}"))
        if "test" not in cols:  # MCAT survival format: val is the held-out fold
            fold = {"train": fold["train"], "val": [], "test": fold["val"]}
        folds.append(fold)
    return folds


def write_clam_splits(folds: Sequence[dict], directory: str) -> list[str]:
    """Folds as CLAM split files DIRECTORY/splits_{i}.csv (",train,val,test", padded columns)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, fold in enumerate(folds):
        cols = [list(fold.get(p, [])) for p in PARTS]
        n = max([len(c) for c in cols] + [0])
        path = os.path.join(directory, f"splits_{i}.csv")
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["", *PARTS])
            for j in range(n):
                w.writerow([j] + [c[j] if j < len(c) else "" for c in cols])
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------- folds

def stratified_kfold(ids: Sequence[str], strata: Sequence, k: int, seed: int,
                     groups: Optional[Sequence[str]] = None) -> list[dict[str, list[str]]]:
    """Seeded stratified K-fold over ``ids`` (scikit-learn's StratifiedKFold with shuffling);
    with ``groups`` a StratifiedGroupKFold: all ids of a group land in the same part."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    ids = list(ids)
    strata = np.asarray(strata)
    n_units = len(set(groups)) if groups is not None else len(ids)
    if k < 2 or n_units < k:
        raise CohortError(f"cannot make {k} folds from {n_units} " + ("patients" if groups is not None else "items"))
    if groups is not None:
        unit_strata = {}
        for g, s in zip(groups, strata):
            unit_strata.setdefault(g, s)
        values, counts = np.unique(list(unit_strata.values()), return_counts=True)
    else:
        values, counts = np.unique(strata, return_counts=True)
    if counts.min() < k:
        unit = "patient(s)" if groups is not None else "item(s)"
        few = ", ".join(f"stratum {v} has {c} {unit}" for v, c in zip(values, counts) if c < k)
        raise CohortError(f"{few}: fewer than the {k} folds")
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(ids)), strata)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(ids)), strata, np.asarray(groups))
    return [{"train": [ids[i] for i in tr], "val": [], "test": [ids[i] for i in te]} for tr, te in parts]


def _per_class_patient_subset(ids: Sequence[str], unit_of: dict, stratum_of: dict, frac: float,
                              rng: np.random.Generator) -> set:
    """Units (patients) per stratum: a seeded permutation of each stratum's units, first
    ceil(frac * n) kept (at least 1): nested as ``frac`` grows for the same rng state."""
    by_stratum: dict = {}
    for i in ids:
        u = unit_of[i]
        by_stratum.setdefault(stratum_of[i], {})[u] = None
    keep = set()
    for s in sorted(by_stratum, key=str):
        units = sorted(by_stratum[s])
        order = rng.permutation(len(units))
        n = max(1, math.ceil(frac * len(units) - 1e-9))
        keep.update(units[j] for j in order[:n])
    return keep


def carve_val(fold: dict, unit_of: dict, stratum_of: dict, frac: float, seed: int) -> dict:
    """Move about ``frac`` of each class's training patients to ``val`` (seeded)."""
    rng = np.random.default_rng([seed, 7919])
    val_units = _per_class_patient_subset(fold["train"], unit_of, stratum_of, frac, rng)
    return {"train": [i for i in fold["train"] if unit_of[i] not in val_units],
            "val": [i for i in fold["train"] if unit_of[i] in val_units], "test": fold["test"]}


def apply_label_frac(folds: Sequence[dict], frac: float, unit_of: dict, stratum_of: dict,
                     seed: int, parts: Sequence[str] = ("train",)) -> list[dict]:
    """Each fold's training items reduced to a seeded per-class sample of ``frac`` of their
    patients (nested across fractions for one seed); test unchanged. ``parts``: the parts the
    model is fitted on, sampled together (("train", "val") when val is fitted on too, so the
    fraction is of all the labels used), each keeping its sampled items."""
    if not 0.0 < frac <= 1.0:
        raise CohortError(f"label_frac={frac}: expected a fraction in (0, 1]")
    if frac == 1.0:
        return [dict(f) for f in folds]
    out = []
    for k, fold in enumerate(folds):
        rng = np.random.default_rng([seed, k, 104729])
        fit = [i for p in parts for i in fold.get(p, [])]
        keep = _per_class_patient_subset(fit, unit_of, stratum_of, frac, rng)
        out.append({**fold, **{p: [i for i in fold.get(p, []) if unit_of[i] in keep] for p in parts}})
    return out


def parse_kfold(spec: str) -> Optional[tuple[int, float]]:
    """``kfold:K`` or ``kfold:K:val=F`` -> (K, F); None for anything else."""
    m = re.fullmatch(r"kfold:(\d+)(?::val=([0-9.]+))?", spec or "")
    if not m:
        return None
    val = float(m.group(2)) if m.group(2) else 0.0
    if not 0.0 <= val < 1.0:
        raise CohortError(f"{spec!r}: val fraction must be in [0, 1)")
    return int(m.group(1)), val


def resolve_splits(spec: str, ids: Sequence[str], strata: Sequence, seed: int = 0,
                   groups: Optional[Sequence[str]] = None) -> list[dict[str, list[str]]]:
    """Folds over ``ids``: ``spec`` = a CLAM split directory or ``kfold:K[:val=F]``
    (``groups``: one patient id per id, kept together). Split-file ids absent from ``ids``
    are an error here; ``FoldPlan``/``plan_folds`` skip and list them instead."""
    kf = parse_kfold(spec)
    if kf:
        folds = stratified_kfold(ids, strata, kf[0], seed, groups)
        if kf[1]:
            unit_of = dict(zip(ids, groups if groups is not None else ids))
            folds = [carve_val(f, unit_of, dict(zip(ids, strata)), kf[1], seed + k)
                     for k, f in enumerate(folds)]
        return folds
    if not spec or not os.path.isdir(spec):
        raise CohortError(f"{spec!r}: splits must be a directory of splits_{{i}}.csv or 'kfold:K'")
    folds = read_clam_splits(spec)
    known = set(ids)
    for i, fold in enumerate(folds):
        unknown = [s for part in fold.values() for s in part if s not in known]
        if unknown:
            raise CohortError(f"{spec}/splits_{i}.csv: ids not in the cohort: {unknown[:5]}")
        leak = set(fold["train"]) & set(fold["test"])
        if leak:
            raise CohortError(f"{spec}/splits_{i}.csv: ids in both train and test: {sorted(leak)[:5]}")
    return folds


@dataclasses.dataclass
class FoldPlan:
    """The folds a run uses, over item ids (slide ids, or case ids when ``unit == "case"``)."""
    folds: list[dict]
    unit: str                          # "slide" or "case"
    grouped: bool                      # generated folds kept each patient in one part
    skipped_ids: list[str]             # split-file ids absent from the cohort (listed once)
    source: str                        # the spec
    leaky_patients: dict = dataclasses.field(default_factory=dict)  # fold -> patients (allow_leaks)
    patients_from: str = ""            # Cohort.patients_from: how patients were known ("" = unknown)
    warnings: list = dataclasses.field(default_factory=list)  # for the caller to print once and record

    def describe(self) -> str:
        kind = "generated" if parse_kfold(self.source) else f"from {self.source}"
        if not self.patients_from:
            grp = ", slide-level (patients unknown: no case_id)"
        elif parse_kfold(self.source):
            grp = f", patient-level ({self.patients_from})"
        else:
            grp = f", checked for patients in two parts ({self.patients_from})"
        if self.leaky_patients:
            grp += f", {sum(map(len, self.leaky_patients.values()))} patient(s) in two parts (allowed)"
        return f"{len(self.folds)} folds {kind}{grp}"


def _split_to_items(fold_ids: Iterable[str], coh: Cohort, items: set, unit: str, insensitive: bool,
                    unknown: dict) -> list[str]:
    """Split-file ids (slide or case ids) -> item ids; unknown ids collected, not fatal."""
    slides_of_case = coh.slides_of_case()
    case_of = coh.case_of()
    by_key = {id_key(s, insensitive): s for s in coh.slide_ids}
    case_by_key = {id_key(c, insensitive): c for c in slides_of_case}
    dropped = {id_key(x, insensitive) for x in coh.dropped_ids}
    out: dict[str, None] = {}
    for raw in fold_ids:
        key = id_key(raw, insensitive)
        if key in by_key:
            slides = [by_key[key]]
        elif key in case_by_key:
            slides = slides_of_case[case_by_key[key]]
        else:
            if key not in dropped:  # rows removed by the class filter are already counted
                unknown.setdefault(raw, None)
            continue
        for s in slides:
            item = case_of[s] if unit == "case" else s
            if item in items:  # slides without embeddings: reported by the caller
                out[item] = None
    return list(out)


def patient_leaks(folds: Sequence[dict], case_of_item: dict) -> dict[int, list[str]]:
    """fold index -> patients found in more than one of train/val/test."""
    out = {}
    for k, fold in enumerate(folds):
        owner: dict[str, str] = {}
        leaks = set()
        for part in PARTS:
            for i in fold.get(part, []):
                c = case_of_item.get(i, i)
                if owner.setdefault(c, part) != part:
                    leaks.add(c)
        if leaks:
            out[k] = sorted(leaks)
    return out


def check_no_patient_leak(folds: Sequence[dict], case_of_item: dict, where: str) -> None:
    """Refuse folds that put one patient in two parts, naming the patients."""
    for k, leaks in patient_leaks(folds, case_of_item).items():
        raise CohortError(f"{where.format(k=k)}: patient(s) {leaks[:10]} appear in more than one of "
                          "train/val/test (a patient's slides must stay in one part)")


def check_training_classes(folds: Sequence[dict], label_of_item: dict, class_names: Sequence[str],
                           where: str) -> None:
    """Every class needs at least one item in every fold's training part."""
    for k, fold in enumerate(folds):
        present = {label_of_item[i] for i in fold["train"]}
        absent = [class_names[c] for c in range(len(class_names)) if c not in present]
        if absent:
            raise CohortError(f"{where.format(k=k)}: class(es) {absent} have no slide in the "
                              "training part; every class needs at least one")


def _check_no_item_in_two_parts(folds: Sequence[dict], where: str) -> None:
    """The same slide (or patient) id in two parts of one fold: the model would be tested on
    what it was fit on. Unlike a patient whose slides are split (the opt-in for the official
    splits' patient leaks), this is never what a split file means."""
    for k, fold in enumerate(folds):
        seen: dict[str, str] = {}
        for part in PARTS:
            for item in fold.get(part, []):
                if item in seen and seen[item] != part:
                    raise CohortError(f"{where.format(k=k)}: {item!r} is in both {seen[item]} and {part}; "
                                      "an id belongs to one part")
                seen.setdefault(item, part)


def plan_folds(coh: Cohort, spec: str, items: Sequence[str], strata: Sequence, *, unit: str = "slide",
               seed: int = 0, label_frac: float = 1.0, allow_leaks: bool = False,
               label_frac_parts: Sequence[str] = ("train",)) -> FoldPlan:
    """The one fold builder of hipt-knn and hipt-finetune.

    items: the item ids that can be used (extracted slides, or case ids of patients with an
    extracted slide when ``unit == "case"``); strata: the stratification label of each item
    (the class; for survival the time bin / censorship). Split-file ids absent from the cohort
    are skipped and listed in ``skipped_ids``; a patient in two parts is refused; generated
    folds are patient-level when the CSV has case ids; ``label_frac`` subsamples the training
    patients per class (of train and val together with ``label_frac_parts=("train", "val")``,
    for a fit on both). ``allow_leaks`` (explicit opt-in, e.g. to rerun the official HIPT BRCA
    subtyping splits, which are slide-level) records leaking patients instead of refusing."""
    items = list(items)
    strata = list(strata)
    case_of = coh.case_of()
    case_of_item = {i: (i if unit == "case" else case_of[i]) for i in items}
    stratum_of = dict(zip(items, strata))
    kf = parse_kfold(spec)
    skipped: dict[str, None] = {}
    grouped = False
    leaks: dict = {}
    warnings = []
    if kf:
        grouped = coh.has_case_ids and unit == "slide"
        if not coh.has_case_ids:
            warnings.append(f"{coh.path or 'labels'}: no case_id column, so the generated folds are slide-level: "
                            f"one patient's slides can land in both train and test (add case_id to keep them "
                            "together)")
        groups = [case_of_item[i] for i in items] if grouped else None
        try:
            folds = stratified_kfold(items, strata, kf[0], seed, groups)
        except CohortError as e:
            named = (f" (class index -> name: {dict(enumerate(coh.class_names))})"
                     if coh.class_names and unit == "slide" else "")
            raise CohortError(f"{coh.path or 'labels'}: {e}{named}") from None
        if kf[1]:
            folds = [carve_val(f, case_of_item, stratum_of, kf[1], seed + k) for k, f in enumerate(folds)]
        where = f"{spec} fold {{k}}"
    else:
        if not spec or not os.path.isdir(spec):
            raise CohortError(f"{spec!r}: splits must be a directory of splits_{{i}}.csv or "
                              "'kfold:K' / 'kfold:K:val=F'")
        raw = read_clam_splits(spec)
        insensitive = _case_insensitive(spec)
        item_set = set(items)
        folds = [{p: _split_to_items(f[p], coh, item_set, unit, insensitive, skipped) for p in PARTS}
                 for f in raw]
        where = os.path.join(spec, "splits_{k}.csv")
        check_split_leading_zeros(raw, skipped, coh, where)
        if not coh.has_case_ids:  # the same caveat as generated folds without patients
            warnings.append(f"{coh.path or 'labels'}: no case_id column (and the slide ids are not TCGA "
                            f"barcodes), so {spec} cannot be checked for one patient's slides in both "
                            "train and test (add case_id to check)")
        if allow_leaks:  # (without the opt-in the patient check below refuses it too)
            _check_no_item_in_two_parts(folds, where)  # not even --allow-leaky-splits takes this
            leaks = patient_leaks(folds, case_of_item)
        else:
            check_no_patient_leak(folds, case_of_item, where)
        for k, f in enumerate(folds):
            if not f["train"] or not f["test"]:
                ids = {x.lower() for part in PARTS for x in raw[k][part]}
                hint = ("; its cells are True/False: a CLAM boolean split (splits_{i}_bool.csv) lists "
                        "slides in its first column, use the splits_{i}.csv of ids" if ids and
                        ids <= {"true", "false", "1", "0"} else "")
                if not hint:
                    _refuse_unknown_part_ids(where.format(k=k), raw[k], f, skipped, coh)
                raise CohortError(f"{where.format(k=k)}: no extracted item in its train or test part{hint}")
    if label_frac != 1.0:
        folds = apply_label_frac(folds, label_frac, case_of_item, stratum_of, seed, label_frac_parts)
    return FoldPlan(folds, unit, grouped, list(skipped), spec, leaks, coh.patients_from, warnings)


def _refuse_unknown_part_ids(where: str, raw: dict, fold: dict, unknown: dict, coh: Cohort) -> None:
    """An empty train or test part whose ids are all absent from the labels: the split file and
    the labels name different things (often patient ids against slide ids), which "no extracted
    item" would hide."""
    for part in ("train", "test"):
        ids = raw[part]
        if not fold[part] and ids and all(x in unknown for x in ids):
            what = "slide or case ids" if coh.has_case_ids else "slide ids"
            hint = ("" if coh.has_case_ids else
                    "; if they are patient (case) ids, the labels need a case_id column naming each slide's patient")
            raise CohortError(f"{where}: none of the {len(ids)} id(s) of its {part} part (e.g. {ids[0]!r}) are "
                              f"{what} of {coh.path or 'the labels'}{hint}")
