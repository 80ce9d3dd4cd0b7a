"""Does hipt-profile report the same HIPT4K speed as benchmarks/bench_inference.py?

    python benchmarks/bench_profiler.py [--reps 2] [--region 4096]

One process, full-size models, one 4096 px region. Measured alternately (A, B, A, B, ...):
  A = hipt-profile's HIPT4K section (the program profiler.profile_hipt4k times: jitted
      region_forward on a device-resident region, compiled once by profiler.compile_and_time;
      best of N) and its matmul peak probe;
  B = bench_inference.py's JAX measurement (HIPT4K.__call__ on a host numpy region, best of N,
      same-size matmul peak probe), imported from that script.
Prints both s/region, GFLOP/s and share of peak, and their ratios (acceptance: within 10%).
GFLOP/s and share of peak use each side's EXECUTED FLOPs (XLA's cost analysis of the program
that side runs), not one analytic count for both; the analytic count is printed beside them.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="alternating rounds (each: 1 timed pass per side)")
    p.add_argument("--region", type=int, default=4096)
    p.add_argument("--patch-batch", type=int, default=None,
                   help="ViT-256 minibatch (default: chosen for this machine, as hipt-profile does)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bench_inference as bench
    from configs import profile as profile_config
    from hipt_jax import profiler

    cfg = profile_config.get_config("")
    cfg.hipt4k.update(region_px=args.region, patch_batch=args.patch_batch or 0)  # 0: auto
    bench.REGION = args.region

    # A: the program hipt-profile times (profiler.profile_hipt4k = hipt4k_forward + compile_and_time).
    fn, (p256, p4k), c256, c4k, _ = profiler.hipt4k_forward(cfg)
    flops = profiler.hipt4k_region_flops(c256, c4k, args.region, args.region)
    regions = jax.device_put(np.random.default_rng(0).integers(0, 256, (1, args.region, args.region, 3), np.uint8))
    first = profiler.compile_and_time(fn, (p256, p4k, regions), 1)
    compiled = first["compiled"]
    # B: bench_inference.py's JAX measurement (HIPT4K.__call__ on a host numpy region).
    _, ours = bench.build_models(args.patch_batch)
    region = bench.test_region()
    ours(region)  # compile (bench's first call)

    def run_a():
        jax.block_until_ready(compiled(p256, p4k, regions))

    prof_s, prof_peak, bench_s, bench_peak = [first["step_s"]], [], [], []
    for r in range(args.reps):  # alternate single passes so both see the same machine load
        prof_peak.append(profiler.matmul_peak(2048, jnp.float32, 3))
        bench_peak.append(bench.matmul_peaks(3)[0] * 1e9)
        bench_s.append(bench.best_time(lambda: ours(region), 1))
        if r:
            prof_s.append(bench.best_time(run_a, 1))
        print(f"round {r}: hipt-profile {prof_s[-1]:.2f} s/region (peak {prof_peak[-1] / 1e9:.0f} GFLOP/s); "
              f"bench_inference {bench_s[-1]:.2f} s/region (peak {bench_peak[-1] / 1e9:.0f} GFLOP/s)", flush=True)

    ps, bs = min(prof_s), min(bench_s)
    pp, bp = max(prof_peak), max(bench_peak)
    from benchmarks.machine import machine_tag
    print(f"\nmachine: {machine_tag()}")
    print(f"HIPT4K {args.region} px region, {flops / 1e9:.0f} GFLOP analytic (the figures on this count):")
    print(f"  hipt-profile    {ps:7.2f} s/region  {flops / ps / 1e9:6.1f} GFLOP/s  MFU {flops / ps / pp:.0%}")
    print(f"  bench_inference {bs:7.2f} s/region  {flops / bs / 1e9:6.1f} GFLOP/s  share of peak {flops / bs / bp:.0%}")
    ratio = ps / bs
    # Both programs run the same arithmetic (one region, ViT-256 minibatches in a loop whose body
    # XLA's cost analysis counts once): count it without the loop.
    f_a = f_b = profiler.region_xla_flops(p256, p4k, c256, c4k, args.region) or flops
    print(f"  executed (XLA cost analysis): hipt-profile {f_a / 1e9:.0f} GFLOP, bench_inference "
          f"{f_b / 1e9:.0f} GFLOP per region")
    print(f"  hipt-profile    {f_a / ps / 1e9:6.1f} GFLOP/s executed  MFU {f_a / ps / pp:.0%}")
    print(f"  bench_inference {f_b / bs / 1e9:6.1f} GFLOP/s executed  share of peak {f_b / bs / bp:.0%}")
    print(f"  ratio profile/bench: time {ratio:.3f}, MFU (executed FLOPs) {(f_a / ps / pp) / (f_b / bs / bp):.3f} "
          f"-> {'agree' if abs(ratio - 1) <= 0.10 else 'DISAGREE'} within 10%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
