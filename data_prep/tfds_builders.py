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
"""
from __future__ import annotations

import os

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


def build_tfds(kind: str, shards_dir: str, data_dir: str, splits=None, beam_runner=None):
    """Build (or reuse) the TFDS dataset of `kind` from hipt-prep shards; returns the builder."""
    builder = BUILDERS[kind](shards_dir=shards_dir, splits=splits, data_dir=data_dir)
    config = tfds.download.DownloadConfig(beam_runner=beam_runner) if beam_runner else None
    builder.download_and_prepare(download_config=config)
    return builder

