"""Extraction benchmark: hipt-extract vs the in-tree PyTorch reference pipeline on the same
regions, in one process.

    python benchmarks/bench_extract.py                      # 4 regions of 1024 px, 2 repeats
    python benchmarks/bench_extract.py --region-px 4096 --regions 2   # the real region size

Both sides get the same JPEG region records (real tissue of the CMU test slide, stain-jittered)
and full-size random weights (ViT-256-16 + ViT-4K-256; speed does not depend on their values):
  - reference: for each region, decode the JPEG and run HIPT_4K the reference's way
    (tests/reference_torch.py: eager torch, eval transform, minibatches of 256 patches) ->
    features_cls256 and features_cls4k, the per-slide loop of the reference's extraction;
  - ours: `extract_cohort` end to end from the shard (threaded JPEG decode one batch ahead, one
    jitted HIPT4K computation per batch sharded over the local devices, .npz write), with the
    compiled functions warmed up first (compilation happens once per run and region size).
Repeats are interleaved (ours, reference, ours, ...) and the best time counts (fairest on a
machine shared with other jobs). Also prints the max abs difference of the two CLS-4K outputs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hipt_jax.models.hipt4k import DEFAULT_PATCH_BATCH  # noqa: E402  (after the path set-up)


def build_models(patch_batch: int):
    """Reference HIPT_4K and our HIPT4K with the same random full-size weights."""
    from hipt_jax.models.torch_io import reference_to_variables
    from hipt_jax.models.archs import get_arch
    from hipt_jax.models.hipt4k import HIPT4K
    from tests import reference_torch as ref

    m256 = ref.random_init_(ref.build_reference("vit256"), seed=0)
    m4k = ref.random_init_(ref.build_reference("vit4k"), seed=1)
    conv = lambda m: reference_to_variables({k: v.numpy() for k, v in m.state_dict().items()})  # noqa: E731
    ours = HIPT4K(conv(m256), conv(m4k), get_arch("vit256"), get_arch("vit4k"), patch_batch=patch_batch)
    return ref.HIPT_4K(m256, m4k), ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--region-px", type=int, default=1024)
    ap.add_argument("--regions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--patch-batch", type=int, default=DEFAULT_PATCH_BATCH)
    ap.add_argument("--batch-per-device", type=int, default=1)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from data_prep import bags, shards
    from data_prep.synth import stain_perturb
    from hipt_jax import extraction
    from tests.synthetic_cohort import tissue_crop, write_region_shard

    rng = np.random.default_rng(0)
    regions = [stain_perturb(tissue_crop(rng, args.region_px), rng.uniform(0.9, 1.1, 3))
               for _ in range(args.regions)]
    work = tempfile.mkdtemp(prefix="hipt_bench_extract_")
    try:
        prep = os.path.join(work, "prep")
        shard = write_region_shard(prep, "slide", regions)
        warm = os.path.join(work, "warm")
        write_region_shard(warm, "warm", regions[: 1])
        reference, ours = build_models(args.patch_batch)
        extractor = extraction.Extractor(ours, args.batch_per_device)
        t0 = time.perf_counter()
        extraction.extract_cohort(ours, warm, os.path.join(work, "warm_out"), extractor=extractor,
                                  show_progress=False)
        compile_s = time.perf_counter() - t0

        def run_ours():
            out = os.path.join(work, "out")
            shutil.rmtree(out, ignore_errors=True)
            extraction.extract_cohort(ours, prep, out, extractor=extractor, show_progress=False)
            return bags.read_bag(out, "slide")["features_cls4k"]

        def run_reference():
            cls4k = []
            with torch.no_grad():
                for rec in shards.read_records(shard):
                    out = reference.embed_region(shards.decode_jpeg(rec["image_jpeg"]))
                    cls4k.append(out["features_cls4k"])
            return np.stack(cls4k)

        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t = time.perf_counter(); got = run_ours(); t_ours.append(time.perf_counter() - t)  # noqa: E702
            t = time.perf_counter(); want = run_reference(); t_ref.append(time.perf_counter() - t)  # noqa: E702
        n = args.regions
        ours_rps, ref_rps = n / min(t_ours), n / min(t_ref)
        print(f"devices: {jax.local_devices()}  torch threads: {torch.get_num_threads()}  "
              f"load avg: {os.getloadavg()}")
        print(f"regions: {n} x {args.region_px} px ({(args.region_px // 256) ** 2} patches each), "
              f"patch_batch {args.patch_batch}, batch {extractor.batch}")
        print(f"ours (hipt-extract, warm): {ours_rps:.4f} regions/s  (times {['%.2f' % t for t in t_ours]} s; "
              f"first call incl. compile {compile_s:.1f} s)")
        print(f"reference (torch HIPT_4K): {ref_rps:.4f} regions/s  (times {['%.2f' % t for t in t_ref]} s)")
        print(f"speed-up ours/reference: {ours_rps / ref_rps:.2f}x   "
              f"max |CLS-4K ours - reference|: {np.abs(got - want).max():.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
