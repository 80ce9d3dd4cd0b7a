"""Writing result files so that a failed write (disk full, quota, I/O error, Ctrl-C) leaves
nothing a later command could take for a result.

Every file (or directory) is written under a temporary name next to its place and renamed into
place when complete; on failure the temporary is removed and an OSError becomes an
``OutputWriteError`` naming the path ("PATH: write failed (No space left on device)"), which
the commands report in one line with exit code 1.

    with atomic_path("out/results.json") as tmp:   # write tmp (a file or a directory)
        ...
    write_json("out/results.json", result)         # the usual case

Where a command may write a user-named output is checked before any work (``check_target``):
never over one of its own inputs, never inside a folder another command manages (an embeddings
folder's slides/, a hipt-prep folder, a fine-tuning or pretraining workdir, or over their
manifest.json / provenance.json / results.json), never over an existing file that is not an
earlier output of the same command. A refusal is an ``OutputPathError`` (exit 2, one line).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union


class OutputWriteError(OSError):
    """An output could not be written (the message names it; no partial copy of it is left)."""


def write_failed(path: str, error: BaseException) -> OutputWriteError:
    """The OutputWriteError naming ``path``, which ``error`` (an OSError: disk full, quota, I/O)
    kept from being written. It says only what is true of that file: the other outputs of the
    run (a heatmap's other pictures, finished folds) stay, and a rerun completes them."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return OutputWriteError(f"{path}: write failed ({reason}); no partial copy of it is left, and what this "
                            "run wrote before it is kept: rerun to finish")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path`` to write to; renamed to ``path`` when the block ends
    normally (replacing an old file; an old directory is removed first), removed when it raises."""
    path = os.fspath(path)
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp-{os.getpid()}{ext}"  # the extension kept: writers that go by it still work
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, OutputWriteError):
            raise
        raise write_failed(path, e) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, obj: Any, **dump_kwargs) -> str:
    """``obj`` as JSON at ``path`` (json.dump keyword arguments: indent, default, ...).

    Non-finite numbers (an undefined AUC, a std over one fold) are written as null: Python's
    bare NaN / Infinity tokens are not JSON and break other tools' readers. Our readers of these
    files take null where a number may be undefined (``metric_or_nan``)."""
    return write_text(path, json.dumps(finite_or_null(obj), allow_nan=False, **dump_kwargs))


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN / +-inf float (numpy's too) replaced by None, through dicts, lists,
    tuples and numpy arrays."""
    import math

    import numpy as np

    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_null(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def metric_or_nan(value: Any) -> float:
    """A number read back from one of these JSON files: null (written for NaN) -> NaN."""
    return float("nan") if value is None else float(value)


# ------------------------------------------------------------------------------ where to write
# The files that make a folder another command's (hipt_jax.provenance.folder_kind): an output
# under one of these names would replace that folder's record or change what it is read as.
MARKERS = ("manifest.json", "provenance.json", "results.json")


class OutputPathError(ValueError):
    """A planned output that would replace one of the command's inputs, land in a folder another
    command manages, or replace a file the command did not write (exit 2, before any work)."""


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks included
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


# The sub-folders each kind of managed folder writes its items into (bags, shards, status
# files, checkpoints, folds, exports): a file written there is read back as one of them. Any other
# sub-folder is the user's own (EMB/eval/, EMB/splits/) and takes outputs.
ITEM_FOLDERS = {
    "embeddings folder": r"slides|status|features_cache",
    "hipt-prep output folder": r"regions|patches|features|coords|qc|status|masks|thumbnails",
    "fine-tuning workdir": r"fold_\d+|splits",
    "pretraining run directory": r"checkpoints|export(_best)?|tensorboard|knn",
}
_ANY_ITEM_FOLDER = "|".join(ITEM_FOLDERS.values())  # a managed folder of a kind not listed above


def _is_item_folder(kind: str, name: str) -> bool:
    return re.fullmatch(ITEM_FOLDERS.get(kind, _ANY_ITEM_FOLDER), name) is not None


def check_outside_managed(path: str) -> None:
    """``path`` (a file or folder to be written) may sit directly in a folder another command
    manages (hipt-knn's default is EMB/knn_results.json), but not under one of that folder's
    record names (MARKERS), nor deeper, among its items: EMB/slides/ holds the bags every later
    command reads, a workdir's fold_k/ its checkpoints."""
    from hipt_jax import provenance

    full = os.path.abspath(path)
    parent = os.path.realpath(os.path.dirname(full))
    name = os.path.basename(full)
    folder = parent
    while True:
        kind = provenance.folder_kind(folder)
        if kind and folder != parent and _is_item_folder(kind, os.path.relpath(parent, folder).split(os.sep)[0]):
            raise OutputPathError(f"{path}: lies inside {folder} ({kind}: another command's output, read by "
                                  "later commands); write it outside that folder")
        if kind and name in MARKERS:
            raise OutputPathError(f"{path}: is the {name} of {folder} ({kind}: another command's output); "
                                  "choose another name")
        up = os.path.dirname(folder)
        if up == folder:
            return
        folder = up


def check_not_among_bags(path: str, bag_folders: Iterable[Optional[str]]) -> None:
    """A file (or an output folder) named like a bag among the bags of a folder the command reads
    would be read as one by every later command (and fail as a "corrupt bag")."""
    from data_prep import bags

    path = os.path.normpath(path)
    if not path.endswith(tuple(fmt.ext for fmt in bags.FORMATS.values())):
        return
    here = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for folder in filter(None, bag_folders):
        held = os.path.join(folder, bags.SLIDES)
        held = held if os.path.isdir(held) else folder
        if os.path.realpath(held) == here:
            raise OutputPathError(f"{path}: would sit among the bags of {folder} and be read as one; "
                                  "write it elsewhere")


def check_target(path: str, *, writer: str, inputs: Optional[Mapping[str, Union[str, Iterable[str], None]]] = None,
                 is_own: Optional[Callable[[str], bool]] = None, bag_folders: Iterable[Optional[str]] = ()) -> None:
    """Before any work, for an output ``writer`` (the command, e.g. "hipt-knn") will write at the
    user-named ``path``: OutputPathError naming it when it is one of ``inputs`` (flag -> path or
    paths, compared as files, links resolved), lies in a folder another command manages
    (``check_outside_managed``) or among the bags of a folder in ``bag_folders``, or exists and
    ``is_own(path)`` does not recognise it as an earlier output of ``writer`` (so a rerun with the
    same --out keeps working, and a labels file or someone else's results are never replaced)."""
    for flag, given in (inputs or {}).items():
        for item in ([given] if isinstance(given, str) else list(given or ())):
            if item and os.path.lexists(item) and os.path.lexists(path) and _same_file(path, item):
                raise OutputPathError(f"{path}: is an input of this command ({flag} {item}); "
                                      "write the output elsewhere")
    check_outside_managed(path)
    check_not_among_bags(path, bag_folders)
    if os.path.lexists(path):
        try:
            own = bool(is_own and is_own(path))
        except Exception:  # noqa: BLE001 -- a file the recogniser cannot even read is not ours
            own = False
        if not own:
            raise OutputPathError(f"{path}: exists and is not an earlier {writer} output (it would be "
                                  "replaced); choose another name, or remove it first")


def json_written_by(writer: str, legacy_keys: Iterable[str]) -> Callable[[str], bool]:
    """An ``is_own`` for ``check_target``: a JSON object the command ``writer`` wrote (its
    "written_by" field), or one written before that field, told by ``legacy_keys`` together."""
    keys = set(legacy_keys)

    def is_own(path: str) -> bool:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return isinstance(data, dict) and (data.get("written_by") == writer or keys <= set(data))

    return is_own


def write_file_set(folder: str, files: Mapping[str, bytes], family: str) -> list[str]:
    """Write ``files`` (name -> bytes) into ``folder`` as one set, each file atomically. The
    files already there whose names match the regular expression ``family`` are read with the
    new ones as one set (split files splits_{i}.csv): OutputPathError naming the folder and the
    first such file when one holds other bytes or is not in ``files`` (a rerun that writes the
    same set again is fine). Returns the paths."""
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        if not re.fullmatch(family, name):
            continue
        path = os.path.join(folder, name)
        if name not in files:
            raise OutputPathError(f"{folder}: already holds {name}, which this run would not write (it would be "
                                  "read as part of this run's set); choose an empty folder")
        with open(path, "rb") as f:
            if f.read() != files[name]:
                raise OutputPathError(f"{folder}: already holds a different {name} (it would be replaced); "
                                      "choose an empty folder, or remove the old files first")
    paths = []
    for name, data in files.items():
        path = os.path.join(folder, name)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths
