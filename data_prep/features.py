"""`hipt-prep features`: region shards -> ViT-256 CLS feature shards ([R*C, 384] per region).

The features come from the same code path as inference (`hipt_jax.HIPT4K.embed_batch`), so a
region's stored features equal `HIPT4K(...)(region)["features_cls256"]` up to the storage dtype.
One feature shard per region shard (OUT/features/<slide_id>.array_record), same record order.
Runs in one process: JAX already spreads each batch over all cores / local accelerators.
"""
from __future__ import annotations


import numpy as np

from data_prep import records
from data_prep.patches import derive_shard

PATCH = 256


class FeatureExtractor:
    """Lazily built HIPT4K (ViT-256 only) + batching of decoded regions."""

    def __init__(self, vit256: str | None = None, random_init: bool = False, tiny: bool = False,
                 batch: int = 1, dtype: str = "float16", seed: int = 0, model=None):
        if model is None and not vit256 and not random_init:
            raise ValueError("give a ViT-256 checkpoint (vit256=...) or random_init=True")
        self.vit256, self.random_init, self.tiny, self.seed = vit256, random_init, tiny, seed
        self.batch, self.dtype = max(1, int(batch)), dtype
        self._model = model

    @property
    def model(self):
        if self._model is None:
            from hipt_jax import HIPT4K

            if self.random_init:
                self._model = HIPT4K.random_init(seed=self.seed, tiny=self.tiny, with_vit4k=False)
            else:
                self._model = HIPT4K.from_checkpoints(vit256=self.vit256, vit4k=None)
        return self._model

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """[B] uint8 [H,W,3] regions of one size -> float32 [B, R*C, 384] CLS-256 features."""
        out = self.model.embed_batch(np.stack(images))  # [B,H,W,3] -> dict of [B,...]
        return np.asarray(out["features_cls256"], np.float32)


def _flush(writer, extractor: FeatureExtractor, pending: list[dict]) -> int:
    images = [records.decode_jpeg(r["image_jpeg"]) for r in pending]
    feats = extractor.embed(images)  # [B, R*C, 384]
    for rec, img, f in zip(pending, images, feats):
        grid = (img.shape[0] // PATCH, img.shape[1] // PATCH)  # the model center-crops to this grid
        writer.write(records.feature_record(f, grid=grid, slide_id=rec["slide_id"], x=rec["x"],
                                            y=rec["y"], mpp=rec["mpp"], region_px=rec["region_px"],
                                            dtype=extractor.dtype))
    return len(pending)


def process_region_shard_features(slide_id: str, regions_dir: str, out_dir: str,
                                  extractor: FeatureExtractor) -> dict:
    """Region shard of one slide -> feature shard."""

    def write_features(regions, writer) -> dict:
        n, pending = 0, []
        for rec in regions:
            # Regions of different sizes cannot share a batch.
            if pending and rec["region_px"] != pending[0]["region_px"]:
                n += _flush(writer, extractor, pending)
                pending = []
            pending.append(rec)
            if len(pending) == extractor.batch:
                n += _flush(writer, extractor, pending)
                pending = []
        if pending:
            n += _flush(writer, extractor, pending)
        return dict(n_records=n)

    return derive_shard(slide_id, regions_dir, out_dir, "features", write_features)
