"""Benchmark the direct path (`hipt-prep coords` + `hipt-extract --slides --coords`) against
region shards (`hipt-prep regions` + `hipt-extract --shards`) on the embedded real slide.

    python benchmarks/bench_direct.py [--model full|tiny] [--region 4096] [--repeat 3] [--readers 4]

In one process, with one compiled Extractor shared by both paths (warmed up first):
  shard  : extraction throughput (regions/s) from JPEG q90 region shards (decode in a thread)
  direct : extraction throughput reading each region from the slide (threaded OpenSlide reads)
  jpeg vs lossless : max / mean |CLS-4K difference| between the JPEG-shard bag and the direct bag,
           and the same for PNG shards (lossless: expected 0)
  sizes  : bytes of the region shards with --codec jpeg (q90) and --codec png
Weights are random (`full` = the paper's ViT-256/ViT-4K sizes; official weights are not
available here), so the feature difference is indicative of the size of the JPEG effect only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import bags, shards  # noqa: E402
from data_prep.runner import prepare_coords, prepare_regions  # noqa: E402
from data_prep.synth import REAL_SLIDE  # noqa: E402
from hipt_jax import extraction  # noqa: E402
from hipt_jax.models.hipt4k import HIPT4K  # noqa: E402

SID = os.path.splitext(os.path.basename(REAL_SLIDE))[0]


def _image_bytes(prep: str) -> tuple[int, int]:
    """(bytes of the stored region images, bytes of the shard files) of a hipt-prep output."""
    folder = os.path.join(prep, "regions")
    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    images = sum(len(r["image_jpeg"]) for f in files for r in shards.read_records(f, shards.REGION))
    return images, sum(os.path.getsize(f) for f in files)


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("full", "tiny"), default="full")
    ap.add_argument("--region", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--batch-per-device", type=int, default=1)
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_direct_")
    slides = os.path.join(work, "slides")
    os.makedirs(slides)
    os.symlink(REAL_SLIDE, os.path.join(slides, os.path.basename(REAL_SLIDE)))
    sel = dict(region_px=args.region, min_tissue_fraction=0.1)
    for name, extra in (("jpeg", {}), ("png", dict(codec="png"))):
        m = prepare_regions(slides, os.path.join(work, name), **sel, **extra)
        assert m["items"][SID]["status"] == "done", m["items"][SID]
    m = prepare_coords(slides, os.path.join(work, "coords"), **sel)
    assert m["items"][SID]["status"] == "done", m["items"][SID]

    model = HIPT4K.random_init(seed=0, tiny=args.model == "tiny")
    ex = extraction.Extractor(model, batch_per_device=args.batch_per_device)
    n = m["items"][SID]["n_regions"]

    def shard(codec):
        out = tempfile.mkdtemp(dir=work)
        extraction.extract_cohort(model, os.path.join(work, codec), out, show_progress=False, extractor=ex)
        return bags.read_bag(out, SID)

    def direct():
        out = tempfile.mkdtemp(dir=work)
        extraction.extract_cohort_direct(model, {SID: REAL_SLIDE}, os.path.join(work, "coords"), out,
                                         region_px=args.region, readers=args.readers,
                                         show_progress=False, extractor=ex)
        return bags.read_bag(out, SID)

    shard("jpeg")  # warm-up: compile
    t_shard, b_jpeg = _timed(lambda: shard("jpeg"), args.repeat)
    t_direct, b_direct = _timed(direct, args.repeat)
    b_png = shard("png")
    d_jpeg = np.abs(b_jpeg["features_cls4k"] - b_direct["features_cls4k"])
    d_png = np.abs(b_png["features_cls4k"] - b_direct["features_cls4k"])
    scale = np.abs(b_direct["features_cls4k"]).mean()
    (s_jpeg, f_jpeg), (s_png, f_png) = _image_bytes(os.path.join(work, "jpeg")), _image_bytes(os.path.join(work, "png"))
    print(f"slide {SID}: {n} regions of {args.region} px, model {args.model}, batch {ex.batch}, "
          f"readers {args.readers}, best of {args.repeat}")
    print(f"throughput shard (JPEG q90) : {n / t_shard:.3f} regions/s ({t_shard:.2f} s)")
    print(f"throughput direct           : {n / t_direct:.3f} regions/s ({t_direct:.2f} s); "
          f"direct/shard = {t_shard / t_direct:.2f}")
    print(f"CLS-4K |JPEG q90 - direct|  : max {d_jpeg.max():.3g}, mean {d_jpeg.mean():.3g} "
          f"(mean |CLS-4K| {scale:.3g})")
    print(f"CLS-4K |PNG - direct|       : max {d_png.max():.3g}, mean {d_png.mean():.3g}")
    print(f"region image bytes          : jpeg q90 {s_jpeg}, png {s_png} (png/jpeg = {s_png / s_jpeg:.2f}); "
          f"shard files {f_jpeg} / {f_png}")


if __name__ == "__main__":
    main()
