"""Run a per-slide (or per-shard) function over many inputs: process pool or Apache Beam.

Resumability lives in the per-item status files (OUT/status/<id>.json, written last and
atomically by the item function): an item whose status says "done" and whose shard exists is
skipped on a rerun; anything else (failed, never started, killed mid-way) is redone from scratch
and overwrites its shard under the same deterministic name. The manifest (OUT/manifest.json) is
an atomically rewritten summary of the status files plus the run parameters and versions.
"""
from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from data_prep import crash_record, csv_table
from data_prep.regions import SlideTask, status_path
from data_prep.shards import (MANIFEST, current_sha256, input_identity, package_versions, params_digest,
                              safe_slide_id, walk_visible, write_json_atomic, write_run_manifest)

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif",
                    ".svslide", ".dcm")


class InputError(Exception):
    """Bad command-line input (missing folder, malformed CSV, duplicate slide ids...)."""


def find_slide_files(slides: str) -> list[SlideTask]:
    """Slides from a folder (searched recursively), a CSV with a `path` and optional `slide_id`,
    or one slide file.

    DICOM slides are folders of .dcm files: one task per folder, named after the folder.
    CSV paths are relative to the CSV's folder; a leading ~ is the home folder.
    """
    if os.path.isdir(slides):
        found, dicom_dirs = [], set()
        for root, files in walk_visible(slides):  # links followed, "._x.svs" and the like skipped
            for f in files:
                ext = os.path.splitext(f)[1].lower()
                if ext == ".dcm":
                    if root not in dicom_dirs:
                        dicom_dirs.add(root)
                        found.append((os.path.basename(root), os.path.join(root, f)))
                elif ext in SLIDE_EXTENSIONS:
                    found.append((os.path.splitext(f)[0], os.path.join(root, f)))
        tasks = [SlideTask(safe_slide_id(i), p) for i, p in sorted(found, key=lambda t: t[1])]
    elif csv_table.is_table(slides):
        base = os.path.dirname(os.path.abspath(slides))
        fieldnames, rows = csv_table.read_rows(slides, "slides CSV", InputError)
        if "path" not in fieldnames:
            raise InputError(f"{slides}: CSV needs a 'path' column (and optionally 'slide_id'); "
                             f"its header has {fieldnames}")
        tasks = []
        for n, row in enumerate(rows, start=2):
            path, given_id = (row["path"] or "").strip(), (row.get("slide_id") or "").strip()
            if not path:
                raise InputError(f"{slides}: line {n} has an empty path")
            path = os.path.expanduser(path)  # "~/slides/x.svs", as a flag would take it
            p = path if os.path.isabs(path) else os.path.join(base, path)
            sid = given_id or os.path.splitext(os.path.basename(p))[0]
            if given_id and (re.search(r"[/\\]", sid) or sid.strip() in (".", "..")):
                raise InputError(f"{slides}: line {n}: slide_id {sid!r} is a path; ids must be plain names")
            if given_id and os.path.splitext(sid)[1].lower() in SLIDE_EXTENSIONS and os.path.splitext(sid)[0]:
                # CLAM's slide tables write slide_id as the file name (x.svs); the labels strip
                # the extension, so the shards and bags must be named x, not x.svs.
                sid = os.path.splitext(sid)[0]
            tasks.append(SlideTask(safe_slide_id(sid), p))
    elif os.path.isfile(slides) and os.path.splitext(slides)[1].lower() in SLIDE_EXTENSIONS:
        # one slide file (a DICOM file stands for its folder, as in a folder search)
        dicom = slides.lower().endswith(".dcm")
        name = os.path.basename(os.path.dirname(os.path.abspath(slides))) if dicom else os.path.splitext(
            os.path.basename(slides))[0]
        tasks = [SlideTask(safe_slide_id(name), slides)]
    elif not os.path.exists(slides):
        raise InputError(f"{slides}: no such file or folder")
    else:
        raise InputError(f"{slides}: not a folder, a slide file ({' '.join(SLIDE_EXTENSIONS)}) or a table of "
                         "slides (.csv, .tsv, .txt)")
    if not tasks:
        raise InputError(f"{slides}: no slides found (extensions: {' '.join(SLIDE_EXTENSIONS)})")
    seen, files = {}, {}
    for t in tasks:
        if t.slide_id in seen:
            raise InputError(f"{slides}: slide id {t.slide_id!r} used by both {seen[t.slide_id]} and "
                             f"{t.path}; give unique ids in a CSV")
        seen[t.slide_id] = t.path
        # One file under two ids would be two "slides" (and could sit in train and test).
        real = os.path.realpath(t.path)
        if real in files:
            raise InputError(f"{slides}: {t.path} is listed as slide {files[real]!r} and as {t.slide_id!r}; "
                             "list each slide file once")
        files[real] = t.slide_id
    return tasks


def versions() -> dict:
    import cv2
    import numpy
    import openslide

    return dict(package_versions(("array-record", "hipt-jax")), numpy=numpy.__version__,
                opencv=cv2.__version__, openslide_python=openslide.__version__,
                openslide=openslide.__library_version__)


def read_status(out_dir: str, item_id: str) -> dict | None:
    """An item's status record; None when absent or unreadable (the item is then redone)."""
    try:
        with open(status_path(out_dir, item_id)) as f:
            st = json.load(f)
    except (FileNotFoundError, ValueError):  # ValueError: invalid JSON or text
        return None
    return st if isinstance(st, dict) else None


def is_done(out_dir: str, item_id: str, source: dict | None = None) -> bool:
    """A finished item whose output is still whole (its recorded size) and, when ``source`` is
    given, was made from that input; a line on stderr says why an item is redone."""
    st = read_status(out_dir, item_id)
    if not (st and st.get("status") == "done"):
        return False
    product = os.path.join(out_dir, st["shard"])
    if not os.path.exists(product):
        return False
    if st.get("shard_bytes") is not None and os.path.getsize(product) != st["shard_bytes"]:
        print(f"{product}: {os.path.getsize(product)} bytes, {st['shard_bytes']} when it was written "
              "(truncated or replaced); redoing it", file=sys.stderr)
        return False
    if not _same_bytes(out_dir, item_id, st, product):
        return False
    if source is not None and st.get("source") is not None and st["source"] != source:
        print(f"{item_id}: its input is now {source}, but its output was made from "
              f"{st['source']}; redoing it", file=sys.stderr)
        return False
    return True


def _same_bytes(out_dir: str, item_id: str, st: dict, product: str) -> bool:
    """False (said on stderr) when the output's bytes differ from the SHA-256 its status
    recorded (``current_sha256``: hashed only when its mtime moved). Damage in place (a
    zero-filled block, an edited h5 row) keeps the size, so the size check above misses it."""
    if not st.get("sha256"):
        return True
    if current_sha256(product, status_path(out_dir, item_id), st) != st["sha256"]:
        print(f"{product}: its bytes changed since it was written (SHA-256 does not match "
              f"{status_path(out_dir, item_id)}); redoing it", file=sys.stderr)
        return False
    return True


def check_params(out_dir: str, kind: str, params: dict) -> None:
    """Refuse to mix shards made with different parameters in one output folder."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        _check_finished_params(out_dir, params)
        return
    try:
        with open(path) as f:
            old = json.load(f)
        problem = None if isinstance(old, dict) and isinstance(old.get("params"), dict) else "not a hipt-prep manifest"
    except (OSError, ValueError) as e:
        problem = f"unreadable ({e.strerror if isinstance(e, OSError) and e.strerror else e})"
    if problem:
        _unreadable_manifest(out_dir, path, problem)
        return
    if old.get("kind") != kind:  # status files are per item id: kinds must not share a folder
        held = (f"`hipt-prep {old['kind']}` output" if old.get("kind") else
                f"another command's output ({old.get('schema') or 'not hipt-prep'})")
        raise InputError(f"{out_dir}: holds {held}; give `hipt-prep {kind}` its own --out folder")
    if old.get("params") != params:
        before = old.get("params") or {}
        changed = [f"{k}: {before.get(k)!r} -> {params.get(k)!r}" for k in sorted(set(before) | set(params))
                   if before.get(k) != params.get(k)]
        raise InputError(f"{out_dir}: existing shards were made with different parameters "
                         f"({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}; {MANIFEST}); "
                         "use a new --out folder")


def _check_finished_params(out_dir: str, params: dict) -> None:
    """With no manifest (deleted, or only regions/ and status/ copied) the finished items were
    taken as made with this run's parameters and skipped: regions of --min-tissue 0.1 went on
    under a manifest saying 0.9. Items record a digest of their parameters; refuse when one
    differs (items without one, from older runs, cannot be checked)."""
    status_dir = os.path.join(out_dir, "status")
    if not os.path.isdir(status_dir):
        return
    want = params_digest(params)
    other = []
    for name in sorted(os.listdir(status_dir)):
        st = read_status(out_dir, name[:-len(".json")]) if name.endswith(".json") else None
        if st and st.get("status") == "done" and st.get("params_sha256") not in (None, want):
            other.append(name[:-len(".json")])
    if other:
        raise InputError(f"{out_dir}: {len(other)} finished item(s) ({', '.join(other[:3])}"
                         f"{' ...' if len(other) > 3 else ''}) were made with other parameters than this "
                         f"run's ({MANIFEST}, which named them, is missing); use a new --out folder")


def _unreadable_manifest(out_dir: str, path: str, problem: str) -> None:
    """The manifest is rebuilt from OUT/status, except for one thing only it records: the
    parameters the shards were made with. With no finished item there is nothing to mix, so it
    is rebuilt (said on stderr); with finished items this run could mix parameters, so refuse."""
    status_dir = os.path.join(out_dir, "status")
    done = [name for name in sorted(os.listdir(status_dir)) if name.endswith(".json")
            and (read_status(out_dir, name[:-len(".json")]) or {}).get("status") == "done"
            ] if os.path.isdir(status_dir) else []
    if not done:
        print(f"{path}: {problem}; rebuilding it", file=sys.stderr)
        return
    raise InputError(f"{path}: {problem}, so the parameters the {len(done)} finished item(s) in {out_dir} "
                     f"were made with are unknown; if this run uses the same parameters, remove {MANIFEST} "
                     "(it is rebuilt from status/), otherwise use a new --out folder")


def rebuild_manifest(out_dir: str, kind: str, params: dict, ids: Sequence[str],
                     results: dict[str, dict] | None = None) -> dict:
    """Rebuild OUT/manifest.json from the status files of `ids` and of every item an earlier
    run finished in this folder (same parameters, ``check_params``), so the manifest lists
    every shard the folder holds (atomic replace); ``results`` (item id -> returned result)
    stand in for status files that could not be written."""
    results = results or {}
    earlier = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(out_dir, "status"))
                     if f.endswith(".json")) if os.path.isdir(os.path.join(out_dir, "status")) else []
    current = set(ids)
    ids = list(ids) + [i for i in earlier if i not in current]
    items = {i: read_status(out_dir, i) or results.get(i) or dict(status="pending") for i in ids}
    n_records = sum(st.get("n_regions", st.get("n_records", 0)) or 0 for st in items.values())
    return write_run_manifest(out_dir, schema="hipt.prep-manifest.v1", items=items, params=params,
                              versions=versions(), extra=dict(kind=kind, n_records=n_records))


def _drop_orphans(out_dir: str, kind: str, ids: set) -> None:
    """Remove the items (shard and status) made from inputs that are gone: downstream readers
    glob the shards, so a kept one would still be trained on."""
    status_dir = os.path.join(out_dir, "status")
    for name in sorted(os.listdir(status_dir)):
        item_id = os.path.splitext(name)[0]
        if name.endswith(".json") and item_id not in ids:
            retire_output(out_dir, item_id)
            print(f"{kind}: {item_id}: its input is gone (no region shard now; failed or removed in "
                  f"hipt-prep regions): its {kind} shard is removed", file=sys.stderr)


def _say_earlier_items(out_dir: str, kind: str, ids: set) -> None:
    """Name the items an earlier run left that this run's inputs do not list. They stay (one
    folder may gather several batches of slides), but a slide deleted after QC or renamed
    since would otherwise go on to extraction and training without a word."""
    status_dir = os.path.join(out_dir, "status")
    earlier = sorted(os.path.splitext(n)[0] for n in os.listdir(status_dir) if n.endswith(".json"))
    extra = [i for i in earlier if i not in ids]
    if extra:
        print(f"{kind}: {len(extra)} item(s) of earlier runs in {out_dir} are not among this run's "
              f"inputs and are kept (downstream commands use them; a slide removed or renamed since? "
              f"delete its shard and status/<id>.json): {extra[:5]}{' ...' if len(extra) > 5 else ''}",
              file=sys.stderr)


def retire_output(out_dir: str, item_id: str) -> None:
    """Remove an item's old shard and status before it is (re)done: if the new attempt fails,
    no stale shard is left for downstream tools to read."""
    st = read_status(out_dir, item_id)
    old = [os.path.join(out_dir, st["shard"])] if st and st.get("shard") else []
    old += glob.glob(os.path.join(out_dir, "*", glob.escape(item_id) + ".array_record"))
    for path in old + [status_path(out_dir, item_id)]:
        try:
            os.remove(path)
        except (FileNotFoundError, IsADirectoryError):
            pass


def clean_stale_tmp(out_dir: str) -> None:
    """Remove temporary files left by a killed run (never read: shards are only globbed by ext)."""
    for p in glob.glob(os.path.join(out_dir, "*", "*.tmp-*")):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


_STARTED = None  # in a pool worker: the queue it announces (item index, its pid) on


def _init_worker(started=None) -> None:
    import cv2
    # One OpenCV thread per process: parallelism comes from the processes.
    cv2.setNumThreads(1)
    global _STARTED
    _STARTED = started


class _Call:
    """Picklable fn(item, *args) for the pool; ``indexed`` takes (index, item) and first says on
    the worker's queue which item this process works on (run_pool: who held a lost item)."""

    def __init__(self, fn, args, indexed: bool = False):
        self.fn, self.args, self.indexed = fn, args, indexed

    def __call__(self, item):
        if self.indexed:
            index, item = item
            if _STARTED is not None:
                _STARTED.put((index, os.getpid()))
        return self.fn(item, *self.args)


def _item_id(item) -> str | None:
    return getattr(item, "slide_id", item if isinstance(item, str) else None)


def _record_source(item) -> dict | None:
    """What ``item`` is made from, as its crash record and (by default) its finished status
    compare it: its slide file's identity (None for the items derived from region shards)."""
    return input_identity(item.path) if getattr(item, "path", None) else None


class _Watched:
    """Picklable fn(item, *args) under a crash record (data_prep.crash_record): a native crash
    while the item is read leaves OUT/status/<id>.crash, so the next run skips that slide
    instead of dying on it again."""

    def __init__(self, fn, status_dir: str):
        self.fn, self.status_dir = fn, status_dir

    def __call__(self, item, *args):
        with crash_record.watch(self.status_dir, _item_id(item), _record_source(item)):
            return self.fn(item, *args)


def _lost_item(item, status_dir: str | None = None) -> dict:
    """The failure record of an item whose worker process died under it (no status written);
    the fatal error its crash record caught, when it caught one."""
    sid = _item_id(item)
    path = getattr(item, "path", None)
    crash = crash_record.earlier(status_dir, sid, _record_source(item)) if status_dir and sid else None
    how = (f"{crash.fatal.removeprefix(crash_record.FATAL).strip()}" if crash and crash.fatal else
           "a crash in the slide reader on a damaged file, or killed for lack of memory")
    return dict(slide_id=sid, path=path, status="failed", n_regions=0,
                error=f"{path or sid}: the worker process died while processing it ({how}); the other items went on")


def _pool_results(pool, fn, items: Sequence, args: tuple, started, status_dir: str | None = None) -> Iterator:
    """fn(item, *args) of every item on ``pool``, in completion order. A worker that dies under
    an item (a segfault in OpenSlide/libtiff on a damaged slide, the OOM killer) is replaced by
    the pool, but its item's result never comes: imap_unordered waited for it forever. That
    item yields ``_lost_item`` and the others go on."""
    call = _Call(fn, args, indexed=True)
    pending = {i: pool.apply_async(call, ((i, item),)) for i, item in enumerate(items)}
    running: dict[int, int] = {}  # item index -> pid of the worker that took it
    while pending:
        while not started.empty():
            index, pid = started.get()
            running[index] = pid
        done = [i for i, r in pending.items() if r.ready()]
        for i in done:
            running.pop(i, None)
            yield pending.pop(i).get()
        # The pool's live workers (active_children reaps the dead ones, zombies included).
        alive = {p.pid for p in multiprocessing.active_children()}
        lost = [i for i, pid in running.items() if i in pending and pid not in alive]
        for i in lost:
            running.pop(i)
            if pending.pop(i).ready():  # it finished as its worker exited
                continue
            yield _lost_item(items[i], status_dir)
        if not done and not lost:
            time.sleep(0.05)


def run_pool(fn: Callable, items: Sequence, args: tuple, workers: int, desc: str,
             on_result: Callable[[dict], None] | None = None, status_dir: str | None = None) -> list[dict]:
    """fn(item, *args) over items on `workers` spawn processes (inline if workers == 1); an
    item whose worker process dies fails (``_pool_results``, naming the fatal error of its
    crash record in ``status_dir``) and the rest go on."""
    results = []
    # tqdm reads TQDM_DISABLE (set by --no-progress) when it is imported, so in this process the
    # variable is honoured here; the spawned workers import tqdm after it is set.
    bar = tqdm(total=len(items), desc=desc, unit="slide", dynamic_ncols=True,
               disable=os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"))
    if workers <= 1:
        _init_worker()
        it = map(_Call(fn, args), items)
        pool = None
    else:
        ctx = multiprocessing.get_context("spawn")
        started = ctx.SimpleQueue()
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(started,))
        it = _pool_results(pool, fn, items, args, started, status_dir)
    try:
        for res in it:
            results.append(res)
            bar.update(1)
            bar.set_postfix(failed=sum(isinstance(r, dict) and r.get("status") != "done" for r in results))
            if on_result is not None:
                on_result(res)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return results


class _BigQueryClientsNote(logging.Filter):
    """Drops the warning Beam logs at import when Google's apitools is absent: it concerns
    BigQuery clients hipt-prep never uses, and it was the one line of noise of every Beam run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


def _import_beam():
    """``apache_beam``, imported without its BigQuery note (see ``_BigQueryClientsNote``)."""
    note = _BigQueryClientsNote()
    root = logging.getLogger()
    root.addFilter(note)
    try:
        import apache_beam
        from apache_beam.options import pipeline_options  # noqa: F401  (the note's other way in)
    finally:
        root.removeFilter(note)
    return apache_beam


def unknown_beam_args(beam_args: Sequence[str]) -> list[str]:
    """The flags of ``beam_args`` that no Beam pipeline option knows, each with Beam's nearest
    option name when there is one. Beam itself only logs "Discarding unparseable args" and runs
    with its defaults, so a mistyped ``--direct_num_worker=8`` would quietly run one worker."""
    import difflib

    PipelineOptions = _import_beam().options.pipeline_options.PipelineOptions

    parsers = []  # the parser Beam builds from every registered options class, caught on its way
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    parser = parsers[0]
    _, unknown = parser.parse_known_args(list(beam_args))
    known = [opt for action in parser._actions for opt in action.option_strings]
    named = []
    for arg in unknown:
        if not arg.startswith("-"):
            continue  # the value of an unknown flag given as two tokens: its flag is named already
        name = arg.split("=", 1)[0]
        near = difflib.get_close_matches(name, known, n=1)
        named.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return named


def check_beam_args(beam_args: Sequence[str]) -> None:
    """Refuse Beam flags that no pipeline option knows (see ``unknown_beam_args``)."""
    unknown = unknown_beam_args(beam_args) if beam_args else []
    if unknown:
        raise InputError(f"Beam does not know {', '.join(unknown)}: Beam would discard "
                         f"{'it' if len(unknown) == 1 else 'them'} and run with its defaults")


def run_beam(fn: Callable, items: Sequence, args: tuple, runner: str, beam_args: Sequence[str]) -> None:
    """fn(item, *args) over items as an Apache Beam pipeline (the same function as the pool).

    The outputs are written by the workers directly into the output folder, so for a cluster
    runner that folder must be a filesystem every worker sees (NFS, Lustre, a GCS FUSE mount).
    The status files the workers write there are the results (the manifest is rebuilt from them).
    """
    beam = _import_beam()
    options = beam.options.pipeline_options.PipelineOptions(list(beam_args), runner=runner)
    # A stop inside a step is the user's Ctrl-C or a scheduler's SIGTERM, not a failure: Beam logs
    # it with a 170-line traceback and re-raises it as a RuntimeError, which the CLI took for a
    # crash (exit 1). Silence that log and raise the stop itself (one line, exit 130/143).
    quiet = _StopLogFilter()
    beam_log = logging.getLogger("apache_beam.runners.common")
    beam_log.addFilter(quiet)
    def run() -> None:
        with beam.Pipeline(options=options) as p:
            _ = (p
                 | "Items" >> beam.Create(list(items))
                 | "Spread" >> beam.Reshuffle()  # one slide per work item, spread over workers
                 | "Process" >> beam.Map(_Call(fn, args)))

    try:
        if options.get_all_options().get("direct_running_mode") == "multi_processing":
            _run_stoppable(run)
        else:
            run()
    except Exception as e:
        stop = stop_inside(e)
        if stop is None:
            raise
        raise stop.with_traceback(None) from None
    finally:
        beam_log.removeFilter(quiet)


def _run_stoppable(run: Callable[[], None]) -> None:
    """``run()`` in a thread, the main thread waiting in Python: the multi_processing DirectRunner
    blocks the main thread in its job service, where a SIGTERM's exception got lost (the run sat
    idle until the CLI's watchdog ended it 130 s later, then its SDK workers printed 90 lines of
    gRPC tracebacks). On Ctrl-C / SIGTERM the worker processes this run started are killed (each
    slide's shard is renamed into place when complete: a rerun redoes the unfinished ones) and
    the stop is raised; the pipeline thread, a daemon, ends with the process, its errors unsaid."""
    import signal
    import threading

    before = _descendants(os.getpid())
    failed: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread
            failed.append(e)

    worker = threading.Thread(target=target, name="hipt-beam-pipeline", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        previous_hook = threading.excepthook
        threading.excepthook = lambda a: None if _from_beam(a.exc_traceback) else previous_hook(a)
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL + 1)
        for pid in sorted(_descendants(os.getpid()) - before):
            try:
                os.kill(pid, signal.SIGKILL)  # stateless SDK workers; SIGTERM made them print tracebacks
            except OSError:
                pass
        raise
    if failed:
        raise failed[0]


def _from_beam(tb) -> bool:
    """Whether a traceback passes through Apache Beam's code (its threads' errors after a stop)."""
    while tb is not None:
        if "apache_beam" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _descendants(pid: int) -> set[int]:
    """Process ids of every descendant of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
            children.setdefault(ppid, []).append(int(stat.split("/")[2]))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def stop_inside(error: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or hipt_jax.interrupts.Terminated on SIGTERM, a subclass)
    an error was raised while handling: Beam re-raises a stop inside a step as
    RuntimeError("...Terminated [while running 'Process']"), chained to it. None if there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _StopLogFilter(logging.Filter):
    """Drops Beam's log record of a step stopped by Ctrl-C / SIGTERM (its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and stop_inside(record.exc_info[1]))


def _skip_crashed(out_dir: str, todo: list, redo: bool) -> list:
    """``todo`` without the slides the reader crashed on in an earlier run (crash_record): each
    is recorded failed, naming the record to delete to retry, instead of killing this run too
    where slides are read in the main process. Items an earlier run was killed on, or died on
    elsewhere, are read again (said on stderr); ``redo`` reads every one again."""
    status_dir = os.path.join(out_dir, "status")
    kept = []
    for item, item_id in todo:
        crash = crash_record.earlier(status_dir, item_id, _record_source(item))
        if crash is not None and crash.blames_slide and not redo:
            name = getattr(item, "path", None) or item_id
            write_json_atomic(status_path(out_dir, item_id), dict(
                slide_id=item_id, path=getattr(item, "path", None), status="failed", n_regions=0,
                error=crash_record.failure(name, crash)))
            continue
        if crash is not None:
            print(crash_record.retrying(item_id, crash) if not crash.blames_slide else
                  f"{item_id}: the slide reader crashed on it in an earlier run; reading it again (--redo)",
                  file=sys.stderr)
            crash_record.clear(status_dir, item_id)
        kept.append((item, item_id))
    return kept


def run_items(fn: Callable, items: Sequence, ids: Sequence[str], out_dir: str, kind: str,
              params: dict, fn_args: tuple, workers: int = 1, runner: str = "pool",
              beam_args: Sequence[str] = (), redo: bool = False,
              source_of: Callable | None = None, drop_orphans: bool = False) -> dict:
    """Skip finished items, run the rest, write the manifest; returns the manifest.
    ``source_of(item)``: what an item is made from (default: the identity of ``item.path``, a
    slide file); a finished item whose recorded source differs is redone. ``drop_orphans``
    (shards derived from region shards): an item this folder holds whose input is no longer
    among ``ids`` (its slide failed or was removed on a hipt-prep rerun) is removed, named."""
    if runner != "pool":
        check_beam_args(beam_args)  # before anything is written or retired
    status_dir = os.path.join(out_dir, "status")
    os.makedirs(status_dir, exist_ok=True)
    check_params(out_dir, kind, params)
    clean_stale_tmp(out_dir)
    if drop_orphans:
        _drop_orphans(out_dir, kind, set(ids))
    else:
        _say_earlier_items(out_dir, kind, set(ids))
    if source_of is None:
        source_of = _record_source
    todo = [(it, i) for it, i in zip(items, ids) if redo or not is_done(out_dir, i, source_of(it))]
    for _, item_id in todo:
        retire_output(out_dir, item_id)
    skipped = len(items) - len(todo)
    todo = _skip_crashed(out_dir, todo, redo)
    if skipped:
        print(f"{kind}: {skipped} of {len(items)} already done in {out_dir}, skipping them")
    rebuild_manifest(out_dir, kind, params, ids)
    todo_items = [it for it, _ in todo]
    returned: dict[str, dict] = {}  # pool results: the manifest's record when a status write failed
    if todo_items:
        if runner == "pool":
            last = [time.time()]

            def checkpoint(_res):
                # Keep the manifest current during long runs without rewriting it per slide.
                if time.time() - last[0] > 10:
                    rebuild_manifest(out_dir, kind, params, ids)
                    last[0] = time.time()

            results = run_pool(_Watched(fn, status_dir), todo_items, fn_args, workers, kind, checkpoint,
                               status_dir=status_dir)
            returned = {r.get("slide_id"): r for r in results}
        else:
            run_beam(_Watched(fn, status_dir), todo_items, fn_args, runner, beam_args)
    return rebuild_manifest(out_dir, kind, params, ids, returned)


def prepare_regions(slides: str, out_dir: str, *, workers: int = 1, runner: str = "pool",
                    beam_args: Sequence[str] = (), redo: bool = False, **params) -> dict:
    """Python API of `hipt-prep regions`: returns the manifest (raises InputError on bad input).

        manifest = prepare_regions("slides/", "out/", region_px=1024, min_tissue_fraction=0.05)
        failed = {k: v["error"] for k, v in manifest["items"].items() if v["status"] != "done"}

    `params` are RegionParams fields (target_mpp, region_px, assume_mpp, min_tissue_fraction,
    jpeg_quality, tissue=TissueParams(...), ...).
    """
    from data_prep.regions import RegionParams, process_slide

    region_params = RegionParams(**params)
    tasks = find_slide_files(slides)
    out = os.path.abspath(out_dir)
    return run_items(process_slide, tasks, [t.slide_id for t in tasks], out, "regions",
                     region_params.to_dict(), (out, region_params), workers=workers, runner=runner,
                     beam_args=beam_args, redo=redo, source_of=_slide_source(region_params))


def prepare_coords(slides: str, out_dir: str, *, workers: int = 1, runner: str = "pool",
                   beam_args: Sequence[str] = (), redo: bool = False, **params) -> dict:
    """Python API of `hipt-prep coords`: the `regions` selection written as CLAM/TRIDENT h5
    coordinate files (OUT/coords/<slide_id>_patches.h5), no pixels; returns the manifest."""
    import functools

    from data_prep.regions import RegionParams, process_slide

    region_params = RegionParams(**params)
    tasks = find_slide_files(slides)
    out = os.path.abspath(out_dir)
    fn = functools.partial(process_slide, output="coords")
    return run_items(fn, tasks, [t.slide_id for t in tasks], out, "coords",
                     region_params.to_dict(), (out, region_params), workers=workers, runner=runner,
                     beam_args=beam_args, redo=redo, source_of=_slide_source(region_params))


def _slide_source(params) -> Callable:
    """source_of for the slide items of `regions` and `coords`: the slide file and its
    annotation file (data_prep.regions.slide_source), as process_slide records it."""
    import functools

    from data_prep.regions import slide_source

    return functools.partial(slide_source, params=params)
