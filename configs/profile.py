"""hipt-profile: what to measure and at which sizes.

    hipt-profile --config configs/profile.py               # full-size models (minutes on a CPU)
    hipt-profile --config configs/profile.py:runlocal      # tiny models: CPU seconds
    hipt-profile --config configs/profile.py --config.hipt4k.region_px=2048 --config.trace_dir=/tmp/tr

Every section can be switched off (``--config.pretrain_vit4k.enabled=False``).
"""
from __future__ import annotations

import ml_collections

from configs.config_args import parse_config_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    flags = parse_config_arg(arg, {"runlocal", "bf16"})
    c = ml_collections.ConfigDict()
    c.dtype = "bfloat16" if "bf16" in flags else "auto"   # compute dtype of the models (auto: bf16 on GPU/TPU)
    c.repeats = 3            # timed runs per measurement (median reported), after one warm-up
    c.seed = 0
    c.matmul = ml_collections.ConfigDict(dict(n=2048, repeats=5))   # square matmul peak probe
    # ViT-256 forward on a batch of 256 px patches.
    c.vit256 = ml_collections.ConfigDict(dict(enabled=True, arch="vit256", batch=64))
    # HIPT4K: the full region path (crop, ViT-256 over patch minibatches, ViT-4K), one region,
    # measured exactly as benchmarks/bench_inference.py does (see hipt_jax/profiler.py).
    c.hipt4k = ml_collections.ConfigDict(dict(enabled=True, arch256="vit256", arch4k="vit4k",
                                              region_px=4096, batch=1, patch_batch=0))  # 0: auto
    # One DINO update step of each stage (the configs/pretrain_*.py config + overrides).
    c.pretrain_vit256 = ml_collections.ConfigDict(dict(enabled=True, config_arg="", global_batch=16))
    c.pretrain_vit4k = ml_collections.ConfigDict(dict(enabled=True, config_arg="", global_batch=64))
    # Pretraining loaders (Grain, augmentation included) on synthetic data from the real slide.
    c.loader = ml_collections.ConfigDict(dict(enabled=True, num_records=64, batches=4, num_workers=2))
    c.trace_dir = ""         # write a jax.profiler trace (TensorBoard) of one step of each section
    c.json = ""              # also write the results here (always printed as a table)

    if "runlocal" in flags:
        c.repeats = 2
        c.matmul.update(n=1024, repeats=3)  # n=512 stays below the peak (MFU read 159%); ~10 ms more
        c.vit256.update(arch="vit256_tiny", batch=4)
        c.hipt4k.update(arch256="vit256_tiny", arch4k="vit4k_tiny", region_px=512, patch_batch=4)
        c.pretrain_vit256.update(config_arg="runlocal", global_batch=4)
        c.pretrain_vit4k.update(config_arg="runlocal", global_batch=4)
        c.loader.update(num_records=8, batches=2, num_workers=0)
    return c
