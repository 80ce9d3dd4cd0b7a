"""Attention sub-layer: the explicit einsum/softmax path vs jax.nn.dot_product_attention.

    python benchmarks/bench_attention.py                       # ViT-256 and ViT-4K block shapes
    python benchmarks/bench_attention.py --batch 4 --repeats 3 # a quick look

Times ``hipt_jax.models.vit.Attention`` (qkv projection, attention, output projection) at the
shapes of a ViT-256 block (257 tokens, width 384, 6 heads) and a ViT-4K block (257 tokens,
width 192, 3 heads), jitted, forward alone (inference) and forward + backward (training), once
with the weights requested (explicit path) and once without (fused ``dot_product_attention``).
Repeats are interleaved (explicit, fused, explicit, ...) and the best time counts, which is
fairest on a machine shared with other jobs. Prints the CPU model and the XLA flags.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {"vit256 block": (257, 384, 6), "vit4k block": (257, 192, 3)}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def build(tokens: int, width: int, heads: int, batch: int):
    """(forward(need_weights), train_step(need_weights), params, x) for one Attention layer."""
    import jax
    import jax.numpy as jnp

    from hipt_jax.models.vit import Attention

    layer = Attention(num_heads=heads)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens, width), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)

    def forward(need_weights: bool):
        return jax.jit(lambda p, x: layer.apply(p, x, need_weights=need_weights)[0])

    def train_step(need_weights: bool):
        def loss(p, x):  # training: deterministic=False, no dropout -> fused when not need_weights
            return jnp.sum(layer.apply(p, x, deterministic=False, need_weights=need_weights)[0] ** 2)
        return jax.jit(jax.grad(loss))

    return forward, train_step, params, x


def best_times(fns: dict, args, repeats: int) -> dict:
    import jax

    for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn(*args))
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="sequences per call (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, best counts")
    args = p.parse_args(argv)

    import jax

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; JAX {jax.__version__} backend "
          f"{jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"batch {args.batch}, best of {args.repeats}")
    print(f"{'shape':<14} {'pass':<10} {'explicit ms':>12} {'fused ms':>10} {'fused/explicit':>15}")
    for name, (tokens, width, heads) in SHAPES.items():
        forward, train_step, params, x = build(tokens, width, heads, args.batch)
        for label, make in (("forward", forward), ("fwd+bwd", train_step)):
            t = best_times({"explicit": make(True), "fused": make(False)}, (params, x), args.repeats)
            print(f"{name:<14} {label:<10} {t['explicit'] * 1e3:>12.2f} {t['fused'] * 1e3:>10.2f} "
                  f"{t['fused'] / t['explicit']:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
