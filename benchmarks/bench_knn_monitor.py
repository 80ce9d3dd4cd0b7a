"""Overhead of the pretraining KNN monitor (config eval.knn): the same runlocal stage-1 run
with and without it, each in a fresh process, alternating, best of --repeats.

    python benchmarks/bench_knn_monitor.py [--steps 40] [--every 20] [--tiles-per-class 50] [--repeats 2]

Prints the wall time of both runs (start-up, compilation and export included), the monitor's
own seconds per evaluation (steady state: the first evaluation also compiles) and the overhead
in percent of the run without it. Tiles: two stain classes cut from the embedded slide.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_tiles(root: str, n: int) -> str:
    import numpy as np
    from PIL import Image

    from data_prep.synth import stain_perturb
    from tests.synthetic_cohort import CLASS_STAINS, tissue_crop

    rng = np.random.default_rng(0)
    for c, stain in enumerate(CLASS_STAINS):
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            gains = np.asarray(stain) * rng.uniform(0.93, 1.07, 3)
            Image.fromarray(stain_perturb(tissue_crop(rng, 96), gains)).save(os.path.join(d, f"{i}.png"))
    return root


def run(workdir: str, tiles: str, steps: int, every: int) -> float:
    cmd = [sys.executable, "-m", "hipt_jax.cli.pretrain", "--config", "configs/pretrain_vit256.py:runlocal",
           f"--workdir={workdir}", f"--config.data.path={tiles}", f"--config.total_steps={steps}",
           "--config.checkpoint.every_steps=100000", "--config.log_every=1000", "--no-progress"]
    if every:
        cmd += [f"--config.eval.knn.path={tiles}", f"--config.eval.knn.every_steps={every}"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--tiles-per-class", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiles = make_tiles(os.path.join(tmp, "tiles"), args.tiles_per_class)
        best = {"without": float("inf"), "with": float("inf")}
        evals = []
        for r in range(args.repeats):
            for name, every in (("without", 0), ("with", args.every)):
                wd = os.path.join(tmp, f"{name}{r}")
                best[name] = min(best[name], run(wd, tiles, args.steps, every))
                if every:
                    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
                    evals += [row["knn/seconds"] for row in rows if "knn/seconds" in row][1:]
        overhead = (best["with"] - best["without"]) / best["without"]
        steady = sorted(evals)[len(evals) // 2] if evals else float("nan")
        print(json.dumps({"steps": args.steps, "every": args.every, "tiles": 2 * args.tiles_per_class,
                          "wall_without_s": round(best["without"], 2), "wall_with_s": round(best["with"], 2),
                          "overhead_pct": round(100 * overhead, 1), "eval_s_steady": round(steady, 3),
                          "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
