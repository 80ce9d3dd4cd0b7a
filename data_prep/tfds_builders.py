"""TFDS datasets over hipt-prep shards: `hipt_regions`, `hipt_patches`, `hipt_features`.

Each builder is a `tfds.core.GeneratorBasedBuilder` with file_format="array_record" that reads
the shards of the matching `hipt-prep` command and writes a regular TFDS dataset (features spec,
splits, dataset_info.json). Users then open it with Grain-ready random access:

    import data_prep.tfds_builders  # registers the names
    src = tfds.data_source("hipt_regions", data_dir=DATA_DIR, split="train")
    # or, without importing this module:
    src = tfds.builder_from_directory(f"{DATA_DIR}/hipt_regions/1.0.0").as_data_source()["train"]

Neither generation nor reading needs TensorFlow (checked with tensorflow-datasets 4.9.10 and no
TensorFlow installed), and generation can run on Beam (`beam_runner=...`, checked with the
DirectRunner). The TFDS copy duplicates the data; hipt_jax.data's sources read the hipt-prep
shards in place.

Splits: everything goes to "train" unless `splits={"train": [slide ids], "test": [...]}` is given.

Which shards built a dataset is recorded beside it (DATA_DIR/hipt_<kind>/1.0.0/hipt_shards.json:
the shards folder, and per shard its size, mtime and the SHA-256 hipt-prep recorded): TFDS reuses
an existing dataset without looking at its sources, so a rerun with other or changed shards got
the old dataset and its counts with exit 0. ``build_tfds`` reuses a dataset only when its shards
are the same; otherwise it refuses (``ShardsChanged``) unless ``redo=True`` rebuilds it.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import shards

_CITATION = """@inproceedings{chen2022scaling,
  title={Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised Learning},
  author={Chen, Richard J. and Chen, Chengkuan and Li, Yicong and Chen, Tiffany Y. and Trister,
          Andrew D. and Krishnan, Rahul G. and Mahmood, Faisal},
  booktitle={CVPR}, year={2022}}"""


def _shard_examples(path: str, kind: str):
    """All (key, example) pairs of one shard (top level: picklable for Beam)."""
    record_kind = shards.kind_of(kind)
    for rec in shards.iter_records(path, record_kind):
        yield f"{rec['slide_id']}/{rec['x']}/{rec['y']}", record_kind.example(rec, decode=False)


def _tfds_feature(field: shards.Field, feature_dtype):
    """The TFDS feature of one record field (by its storage type)."""
    t = field.type
    if t is shards.JPEG:
        return tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
    if t is shards.STR:
        return tfds.features.Text()
    if t is shards.PAIR:
        return tfds.features.Tensor(shape=(2,), dtype=np.int32)
    if t is shards.FEATURES:
        return tfds.features.Tensor(shape=(None, 384), dtype=feature_dtype)
    return {shards.INT64: np.int64, shards.INT32: np.int32, shards.FLOAT32: np.float32}[t]


def features_dict(kind: str, feature_dtype=np.float16) -> tfds.features.FeaturesDict:
    """TFDS features of a record kind: every example field of its table in data_prep.shards."""
    return tfds.features.FeaturesDict({f.example_key: _tfds_feature(f, feature_dtype)
                                       for f in shards.kind_of(kind).example_fields})


class _HiptShardBuilder(tfds.core.GeneratorBasedBuilder):
    """Common part: find shards, assign them to splits, generate with or without Beam."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release (record schema v1)."}
    KIND = ""

    # TFDS derives a builder's code path via `importlib_resources` (not installed here, and not a
    # declared TFDS dependency on Python >= 3.9); this module's own file is the right answer.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(os.path.abspath(__file__))

    def __init__(self, *, shards_dir: str | None = None, splits: dict[str, list[str]] | None = None,
                 **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self._shards_dir = shards_dir
        self._splits = splits
        super().__init__(**kwargs)

    def _slide_shards(self) -> dict[str, str]:
        if not self._shards_dir:
            raise ValueError(f"{type(self).__name__}: pass shards_dir= (a hipt-prep output folder)")
        return shards.list_slide_shards(self._shards_dir, self.KIND)

    def _feature_dtype(self):
        return np.float16  # only feature shards have a stored dtype

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, homepage="https://github.com/mahmoodlab/HIPT", citation=_CITATION,
            description=f"HIPT {self.KIND} from hipt-prep (record schema in data_prep.shards).",
            features=features_dict(self.KIND, self._feature_dtype()))

    def _split_generators(self, dl_manager):
        by_id = self._slide_shards()
        if self._splits is None:
            return {"train": self._generate_examples(list(by_id.values()))}
        out = {}
        for name, ids in self._splits.items():
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise FileNotFoundError(f"split {name!r}: no {self.KIND} shard for {missing[:5]}")
            out[name] = self._generate_examples([by_id[i] for i in ids])
        return out

    def _generate_examples(self, paths):
        if self._beam_runner is not None or self._beam_options is not None:
            import apache_beam as beam

            return (beam.Create(paths) | beam.Reshuffle()
                    | beam.FlatMap(_shard_examples, kind=self.KIND))
        return (ex for p in paths for ex in _shard_examples(p, self.KIND))

    @property
    def _beam_runner(self):
        return getattr(self, "_hipt_beam_runner", None)

    @property
    def _beam_options(self):
        return getattr(self, "_hipt_beam_options", None)

    def download_and_prepare(self, *args, download_config=None, **kwargs):
        if download_config is not None:
            self._hipt_beam_runner = download_config.beam_runner
            self._hipt_beam_options = download_config.beam_options
        return super().download_and_prepare(*args, download_config=download_config, **kwargs)


class HiptRegions(_HiptShardBuilder):
    """Regions (4096 px at 0.5 um/px by default) as JPEG images plus slide coordinates."""

    KIND = "regions"


class HiptPatches(_HiptShardBuilder):
    """256 px patches for stage-1 (ViT-256) pretraining."""

    KIND = "patches"


class HiptFeatures(_HiptShardBuilder):
    """[R*C, 384] ViT-256 CLS features per region (stage-2 pretraining, slide models)."""

    KIND = "features"

    def _feature_dtype(self):
        if self._shards_dir is None:  # reading an existing dataset: take the dtype it was built with
            spec = os.path.join(self.data_dir, "features.json")
            if os.path.exists(spec):
                with open(spec) as f:
                    return np.float32 if "float32" in f.read() else np.float16
            return np.float16
        first = next(iter(self._slide_shards().values()))
        for rec in shards.iter_records(first, shards.FEATURE):
            return np.dtype(rec["dtype"]).type
        return np.float16


BUILDERS = {"regions": HiptRegions, "patches": HiptPatches, "features": HiptFeatures}


SOURCE_RECORD = "hipt_shards.json"  # in the dataset's version folder: which shards built it


class ShardsChanged(ValueError):
    """DATA_DIR already holds the dataset, built from other shards (or with no record of them)."""


def _shard_identity(path: str) -> dict:
    """Size and mtime of a shard, and its SHA-256 as hipt-prep's status file recorded it. The
    record is trusted as is while size and mtime match it (cheap); when only the mtime moved (a
    `touch`, `cp -r`, a restore), the shard is hashed once: equal bytes keep the recorded SHA-256
    and the new mtime is recorded (as hipt-prep does for its outputs), other bytes give their own
    SHA-256, so the comparison says "changed"."""
    st = os.stat(path)
    status_path = shards.shard_status_path(path)
    try:
        with open(status_path) as f:
            status = json.load(f)
        recorded, size = status.get("sha256"), status.get("shard_bytes")
    except (OSError, ValueError, AttributeError):
        status, recorded, size = None, None, None
    digest = shards.current_sha256(path, status_path, status) if recorded and size == st.st_size else None
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def shards_record(kind: str, shards_dir: str, splits=None) -> dict:
    """What identifies the input of a build: the shards folder, splits, and every shard's identity
    (FileNotFoundError naming the folder when it holds no shards of ``kind``)."""
    by_id = shards.list_slide_shards(shards_dir, kind)
    return {"kind": kind, "shards_dir": os.path.abspath(shards_dir), "splits": splits,
            "shards": {sid: _shard_identity(p) for sid, p in by_id.items()}}


def _same_shard(a: dict, b: dict) -> bool:
    """Same bytes: by the SHA-256 when both have one (a copied or touched folder keeps
    matching: _shard_identity hashes a shard whose mtime moved), else by size and mtime."""
    if a.get("bytes") != b.get("bytes"):
        return False
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a.get("mtime_ns") == b.get("mtime_ns")


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two shards records, in words (empty: the same input)."""
    out = []
    if old.get("splits") != new.get("splits"):
        out.append("other splits")
    gone = sorted(set(old["shards"]) - set(new["shards"]))
    added = sorted(set(new["shards"]) - set(old["shards"]))
    changed = sorted(s for s in set(old["shards"]) & set(new["shards"])
                     if not _same_shard(old["shards"][s], new["shards"][s]))
    for label, ids in (("shards added", added), ("shards gone", gone), ("shards changed", changed)):
        if ids:
            out.append(f"{len(ids)} {label} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})")
    return out


def _check_existing(dataset_dir: str, record: dict) -> bool:
    """True when ``dataset_dir`` holds a finished dataset built from the same shards (reuse it);
    False when there is none; ShardsChanged naming both inputs otherwise."""
    if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
        return False
    redo = "rebuild it with --redo (build_tfds(..., redo=True)) or use another --data-dir"
    try:
        with open(os.path.join(dataset_dir, SOURCE_RECORD)) as f:
            old = json.load(f)
        old["shards"].items()
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        raise ShardsChanged(f"{dataset_dir}: already holds a dataset with no record of the shards it was "
                            f"built from (made before {SOURCE_RECORD}); {redo}") from None
    diff = _differences(old, record)
    if diff:
        raise ShardsChanged(f"{dataset_dir}: already holds a dataset built from {old.get('shards_dir')}, "
                            f"not from the shards in {record['shards_dir']} ({'; '.join(diff)}); {redo}")
    return True


def build_tfds(kind: str, shards_dir: str, data_dir: str, splits=None, beam_runner=None,
               redo: bool = False):
    """Build the TFDS dataset of `kind` from hipt-prep shards, or reuse the one in ``data_dir``
    when it was built from the same shards (``ShardsChanged`` when it was not; ``redo``: rebuild
    it). Returns the builder; ``builder.hipt_reused`` says whether it was reused."""
    record = shards_record(kind, shards_dir, splits)  # before TFDS creates any folder
    builder = BUILDERS[kind](shards_dir=shards_dir, splits=splits, data_dir=data_dir)
    dataset_dir = str(builder.data_dir)
    if redo and os.path.isdir(dataset_dir):
        shutil.rmtree(dataset_dir)  # this version's folder only: TFDS's own layout
        builder = BUILDERS[kind](shards_dir=shards_dir, splits=splits, data_dir=data_dir)
    builder.hipt_reused = _check_existing(dataset_dir, record)
    if builder.hipt_reused:
        return builder
    config = tfds.download.DownloadConfig(beam_runner=beam_runner) if beam_runner else None
    builder.download_and_prepare(download_config=config)
    tmp = os.path.join(dataset_dir, SOURCE_RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(dataset_dir, SOURCE_RECORD))
    return builder

