"""What produced an output folder: one fingerprint per folder, checked before it is reused.

A fingerprint is a flat dict of the things that decide the numbers in a folder: content hashes
of the model checkpoints, the architecture, resolution and preprocessing parameters, the hash of
the label file, the hash of the config. It is stored as OUT/provenance.json when a command first
writes into OUT. A rerun into the same folder continues only when its fingerprint equals the
stored one; otherwise ``check`` raises ProvenanceError (exit 2) with a one-line diff of what
changed. ``overwrite=True`` (--overwrite) deletes the folder's outputs and starts over;
``resume_anyway=True`` (--resume-anyway) keeps them, records the new fingerprint and says so.

Hashes are SHA-256 of file bytes; a directory (an Orbax checkpoint) hashes its files' relative
paths and bytes in sorted order, so the same weights written twice give the same hash.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Iterable, Optional

FILE = "provenance.json"
SCHEMA = "hipt.provenance.v1"
_CHUNK = 1 << 20


class ProvenanceError(ValueError):
    """An output folder made by something else than this run (the message is the diff)."""


# ------------------------------------------------------------------------------ hashes
def _hash_file_into(h, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)


def content_hash(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a file, or of a directory's files (relative path + bytes, sorted); None for
    None. Skips our own provenance file and temporary files."""
    if not path:
        return None
    h = hashlib.sha256()
    if os.path.isfile(path):
        _hash_file_into(h, path)
        return h.hexdigest()
    if not os.path.isdir(path):
        raise ProvenanceError(f"{path}: no such file or directory")
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name == FILE or ".tmp" in name:
                continue
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            _hash_file_into(h, full)
    return h.hexdigest()


# ------------------------------------------------------------------------------ data identity
_ENDS = 1 << 20  # bytes read from each end of a sampled data file


def files_identity(files: dict[str, str]) -> str:
    """"<N> files <hash>" of input files (name as the data knows it -> path here): the hash of
    every name, and of the size and first and last MiB of the first, middle and last file in
    name order. Not a content hash of the data (a TB of tiles is not read at start-up), yet
    another dataset, a partial copy or features of another model (same names and sizes, other
    bytes) give another identity; the folder the data sits in does not enter it."""
    names = sorted(files)
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
    for name in sorted({names[0], names[len(names) // 2], names[-1]} if names else ()):
        path = files[name]
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_ENDS))
            if size > 2 * _ENDS:
                f.seek(size - _ENDS)
                h.update(f.read(_ENDS))
    return f"{len(names)} file{'s' if len(names) != 1 else ''} {h.hexdigest()}"


def data_identity(path: Optional[str]) -> Optional[str]:
    """What says two processes read the same data at ``path`` (a file, a folder, a glob)
    wherever their hosts mount it: ``files_identity`` of its files, named relative to it. A
    path that names nothing here (a dataset name, a URL) is its own identity, as written."""
    if not path:
        return None
    path = str(path)
    if glob.has_magic(path):
        roots, base = sorted(glob.glob(path)), _glob_base(path)
    else:
        roots = [path] if os.path.exists(path) else []
        base = os.path.dirname(path) if os.path.isfile(path) else path
    if not roots:
        return path
    return files_identity({os.path.relpath(f, base): f for root in roots for f in _data_files(root)})


def _data_files(root: str) -> list[str]:
    """The files of a data path. Hidden files (NFS's .nfsXXXX, a lock) and temporary files are
    not data: they come and go on one host and not on another."""
    if os.path.isfile(root):
        return [root]
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(folder, n) for n in names if not n.startswith(".") and ".tmp" not in n]
    return out


def _glob_base(pattern: str) -> str:
    """The folder of a glob pattern above its first wildcard ("/d/x/*.h5" -> "/d/x")."""
    parts = pattern.split(os.sep)
    head = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return os.sep.join(parts[:head]) or os.curdir


def config_hash(config: Any) -> str:
    """SHA-256 of a config (ConfigDict or plain dict) as canonical JSON."""
    data = config.to_dict() if hasattr(config, "to_dict") else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ fingerprints
def read(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        return dict(data["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProvenanceError(f"{path}: unreadable provenance file ({type(e).__name__}); "
                              "use --overwrite to start over") from None


def read_details(out_dir: str) -> dict:
    """What ``write`` kept beside the fingerprint to explain a mismatch ({} when nothing)."""
    try:
        with open(os.path.join(out_dir, FILE)) as f:
            details = json.load(f).get("details")
    except (OSError, ValueError, AttributeError):
        return {}
    return details if isinstance(details, dict) else {}


def write(out_dir: str, fingerprint: dict, details: Optional[dict] = None) -> None:
    """``details`` (e.g. the config's values behind its hash, the kind of folder) are kept to
    name what changed; they are not compared."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    record = {"schema": SCHEMA, "fingerprint": fingerprint, **({"details": details} if details else {})}
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def flat_fields(value: Any, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: a difference is named down to its field."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict = {}
    for k, v in value.items():
        out.update(flat_fields(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def short_value(value: Any, width: int = 60) -> str:
    """A value as a message shows it: a content hash cut to 12 hex digits, other text to ``width``."""
    text = json.dumps(value, default=str, sort_keys=True) if not isinstance(value, str) else value
    if len(text) > 16 and all(c in "0123456789abcdef" for c in text):
        return text[:12] + "..."
    return text if len(text) <= width else text[:width - 3] + "..."


def diff(old: dict, new: dict, old_details: Optional[dict] = None, new_details: Optional[dict] = None) -> str:
    """'key: old -> new; ...' for every key whose value differs ("" when equal); a key with
    values in both ``details`` names the fields that changed behind its hash instead."""
    old_details, new_details = old_details or {}, new_details or {}
    parts = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if k in old_details and k in new_details:
            a, b = flat_fields(_normalize_any(old_details[k])), flat_fields(_normalize_any(new_details[k]))
            fields = [f"{f} {short_value(a.get(f))} -> {short_value(b.get(f))}" for f in sorted(set(a) | set(b))
                      if a.get(f) != b.get(f)]
            if fields:
                parts.append(f"{k}: " + ", ".join(fields[:4]) + (" ..." if len(fields) > 4 else ""))
                continue
        parts.append(f"{k}: {short_value(old.get(k))} -> {short_value(new.get(k))}")
    return "; ".join(parts)


def _normalize_any(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _normalize(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def normalized(fingerprint: dict) -> dict:
    """A fingerprint as ``read`` would return it once written (JSON types, sorted keys)."""
    return _normalize(fingerprint)


# Provenance files ``check`` wrote in this process into folders that had none. A command that
# then refuses its input (exit 2) removes those whose folder still holds none of its outputs:
# otherwise the corrected rerun would be refused as "made with other inputs".
_NEW_RECORDS: list[tuple[str, tuple[str, ...]]] = []


def present(out_dir: str, outputs: Iterable[str]) -> list[str]:
    """The entries of ``outputs`` (names relative to ``out_dir``, or glob patterns such as
    "fold_*" for outputs whose names are known only once made) that exist in ``out_dir`` now."""
    found = []
    for o in outputs:
        if glob.has_magic(o):
            found += sorted(os.path.relpath(p, out_dir) for p in glob.glob(os.path.join(glob.escape(out_dir), o)))
        elif os.path.lexists(os.path.join(out_dir, o)):
            found.append(o)
    return found


def forget_new_records() -> None:
    """Undo this process's "new" provenance records whose folders hold no outputs yet (looked
    at now: a run refused midway keeps the record of what it finished)."""
    while _NEW_RECORDS:
        out_dir, outputs = _NEW_RECORDS.pop()
        if not present(out_dir, outputs):
            try:
                os.remove(os.path.join(out_dir, FILE))
            except OSError:
                pass


def check(out_dir: str, fingerprint: dict, *, outputs: Iterable[str] = (), overwrite: bool = False,
          resume_anyway: bool = False, what: Optional[str] = None, details: Optional[dict] = None) -> str:
    """Make ``out_dir`` safe to continue: returns "new", "match", "overwritten" or "resumed".

    ``outputs`` are the entries (relative to ``out_dir``, or glob patterns: ``present``) this
    command writes; --overwrite deletes them. A folder that has outputs but no provenance file (made before provenance
    existed, or by hand) is treated as a mismatch."""
    fingerprint = _normalize(fingerprint)
    details = dict(details or {}, **({"kind": what} if what else {}))
    what = what or "output folder"
    old = read(out_dir)
    existing = present(out_dir, outputs)
    old_details = read_details(out_dir) if old is not None else _unrecorded_kind(out_dir)
    if details.get("kind") and old_details.get("kind", what) != what:
        # Another command's folder: its files may share names with ours (manifest.json), so
        # not even --overwrite may delete them.
        raise ProvenanceError(f"{out_dir}: is {_article(old_details['kind'])}, not {_article(what)}; give this run its "
                              "own folder" + (" (--overwrite only clears a folder of this command's own)"
                                              if overwrite else ""))
    if overwrite:
        clear(out_dir, existing)
        write(out_dir, fingerprint, details)
        return "overwritten"
    if old is None and not existing:
        write(out_dir, fingerprint, details)
        _NEW_RECORDS.append((out_dir, tuple(outputs)))
        return "new"
    if old == fingerprint:
        return "match"
    change = (diff(old, fingerprint, old_details, details) if old is not None
              else "no provenance.json (made by an unknown run)")
    if resume_anyway:
        print(f"warning: {out_dir}: resuming a {what} made with other inputs ({change})", file=sys.stderr)
        write(out_dir, fingerprint, details)
        return "resumed"
    raise ProvenanceError(f"{out_dir}: {what} was made with other inputs ({change}); "
                          "use --overwrite to start over or --resume-anyway to keep it")


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _unrecorded_kind(out_dir: str) -> dict:
    """{"kind": ...} for a folder of a command that keeps no provenance file of its own: a
    hipt-prep output folder is told by its manifest (its schema; items per slide, where an
    embeddings folder's lists slides), so no other command reads it as stale output of its own and deletes
    its manifest.json on --overwrite."""
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return {}
    # Manifests from before the schema field: a kind name and per-item records (other tools'
    # manifests often have an "items" list; that alone does not make a hipt-prep folder).
    if isinstance(manifest, dict) and (str(manifest.get("schema", "")).startswith("hipt.prep-manifest")
                                       or (isinstance(manifest.get("kind"), str)
                                           and isinstance(manifest.get("items"), dict)
                                           and "slides" not in manifest)):
        return {"kind": "hipt-prep output folder"}
    return {}


def folder_kind(folder: str) -> Optional[str]:
    """What command output ``folder`` is ("embeddings folder", "fine-tuning workdir",
    "pretraining run directory", "hipt-prep output folder", ...), None for a folder no command
    manages. Told by the records ``check`` reads (the provenance file's kind, a hipt-prep
    manifest), and for folders written without a provenance record (hipt-extract without a
    fingerprint, runs from before the record existed) by an embeddings manifest or by a
    results.json beside fold_k folders."""
    if os.path.isfile(os.path.join(folder, FILE)):
        return read_details(folder).get("kind") or "output folder of another command"
    kind = _unrecorded_kind(folder).get("kind")
    if kind:
        return kind
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        if isinstance(manifest, dict) and str(manifest.get("schema", "")).startswith("hipt.embeddings"):
            return "embeddings folder"
    except (OSError, ValueError):
        pass
    if os.path.isfile(os.path.join(folder, "results.json")) and os.path.isdir(os.path.join(folder, "fold_0")):
        return "fine-tuning workdir"
    return None


def clear(out_dir: str, entries: Iterable[str]) -> None:
    """Delete ``entries`` (files or folders relative to ``out_dir``) and the provenance file."""
    for name in list(entries) + [FILE]:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def model_fingerprint(vit256: Optional[str] = None, vit4k: Optional[str] = None,
                      random_init: str = "none", seed: int = 0) -> dict:
    """The identity of the weights a command was asked for: content hashes of the checkpoints,
    or "random:<tiny|full>:seed<N>" for --random-init."""
    if random_init and random_init != "none":
        rand = f"random:{random_init}:seed{int(seed)}"
        return {"vit256": rand, "vit4k": rand}
    return {"vit256": weights_identity(vit256), "vit4k": weights_identity(vit4k)}


def weights_identity(path: Optional[str]) -> Optional[str]:
    """What a checkpoint holds, as outputs record it: a saved model directory's own hash of its
    parameter values (arch.json "params_sha256": the same .pth converted twice, or copied, is
    the same weights), else the content hash of the files (a .pth; directories saved before
    that field existed). None for None."""
    if path and os.path.isdir(path):
        try:
            with open(os.path.join(path, "arch.json")) as f:
                recorded = json.load(f).get("params_sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None  # not one of ours, or damaged: its loader says so; the bytes identify it
        if isinstance(recorded, str) and recorded:
            return recorded
    return content_hash(path)


def params_hash(manifest_path: str) -> Optional[str]:
    """Hash of the ``params`` of a run manifest (what made a shard folder), None if absent."""
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path) as f:
            return config_hash(json.load(f).get("params"))
    except (OSError, ValueError, AttributeError) as e:
        raise ProvenanceError(f"{manifest_path}: unreadable manifest ({type(e).__name__})") from None
