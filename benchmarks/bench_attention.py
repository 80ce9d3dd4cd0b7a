"""Attention on CPU: `jax.nn.dot_product_attention` vs the heads-first lowering we use on CPUs.

    python benchmarks/bench_attention.py                        # block shapes, batch 8
    python benchmarks/bench_attention.py --batch 4 --repeats 5  # a quick look

``hipt_jax.models.vit.fused_attention`` is ``jax.nn.dot_product_attention`` when a program is
lowered for a GPU or TPU and the same arithmetic with the heads in front of the tokens when it
is lowered for a CPU (``lax.platform_dependent``). This script times one ``Attention`` layer
(qkv projection, attention, output projection), jitted, fp32, forward (inference) and
forward + backward (training), with each of the two lowerings forced on this CPU, and the
in-tree PyTorch reference's attention (the official code's qkv reshape, q @ k^T, softmax, @ v)
on the same weights. Shapes: a ViT-256 block (257 tokens, width 384, 6 heads), a ViT-4K block on
a 14 x 14 global crop (197 tokens, width 192, 6 heads) and on a full 16 x 16 region (257 tokens).
Repeats alternate the variants and the median counts; the ratios are the figure. Prints the
CPU model and the XLA flags.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.machine import machine_tag  # noqa: E402

SHAPES = {"vit256 block": (257, 384, 6), "vit4k global crop": (197, 192, 6), "vit4k region": (257, 192, 6)}


def jax_variants(tokens: int, width: int, heads: int, batch: int):
    """{lowering: (forward, fwd+bwd)} jitted on one Attention layer, params, x."""
    import contextlib
    import functools

    import jax
    import jax.numpy as jnp

    from hipt_jax.models import vit

    layer = vit.Attention(num_heads=heads)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens, width), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    out = {}
    for name, lowering in (("dot_product_attention", vit.accelerator_attention), ("heads-first", contextlib.nullcontext)):
        def apply(p, x):
            return layer.apply(p, x, need_weights=False)[0]
        fwd = jax.jit(apply)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2)))
        with lowering():  # traced (and so lowered) here: the CPU's own form, or the GPU/TPU one
            fwd = fwd.lower(params, x).compile()
            grad = grad.lower(params, x).compile()
        out[name] = (functools.partial(fwd, params, x), functools.partial(grad, params, x))
    return out, params, x


def torch_variant(params, x, heads: int):
    """The reference's attention (timm/official layout) on the same weights: (forward, fwd+bwd)."""
    import numpy as np
    import torch

    w = {k: torch.tensor(np.asarray(v)) for k, v in (("qkv_w", params["params"]["qkv"]["kernel"]),
                                                      ("qkv_b", params["params"]["qkv"]["bias"]),
                                                      ("proj_w", params["params"]["proj"]["kernel"]),
                                                      ("proj_b", params["params"]["proj"]["bias"]))}
    xt = torch.tensor(np.asarray(x))
    B, N, C = xt.shape

    def attn(inp):
        qkv = (inp @ w["qkv_w"] + w["qkv_b"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        return (a @ v).transpose(1, 2).reshape(B, N, C) @ w["proj_w"] + w["proj_b"]

    def forward():
        with torch.no_grad():
            return attn(xt)

    def train():
        for t in w.values():
            t.requires_grad_(True)
            t.grad = None
        (attn(xt) ** 2).sum().backward()

    return forward, train


def median_times(fns: dict, repeats: int) -> dict:
    import statistics

    import jax

    for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="sequences per call (default 8)")
    p.add_argument("--repeats", type=int, default=15, help="alternated timed runs per variant, median counts")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: one per core)")
    args = p.parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    print(f"machine: {machine_tag()}")
    print(f"JAX {jax.__version__} backend {jax.default_backend()}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {args.batch}, median of {args.repeats} alternated runs")
    print(f"{'shape':<18} {'pass':<8} {'dot_product_attention ms':>25} {'heads-first ms':>15} {'torch ms':>9} "
          f"{'dpa/heads-first':>16} {'torch/heads-first':>18}")
    for name, (tokens, width, heads) in SHAPES.items():
        variants, params, x = jax_variants(tokens, width, heads, args.batch)
        t_fwd, t_train = torch_variant(params, x, heads)
        for i, (label, t_fn) in enumerate((("forward", t_fwd), ("fwd+bwd", t_train))):
            fns = {k: v[i] for k, v in variants.items()}
            fns["torch"] = t_fn
            t = median_times(fns, args.repeats)
            dpa, ours, ref = t["dot_product_attention"], t["heads-first"], t["torch"]
            print(f"{name:<18} {label:<8} {dpa * 1e3:>25.2f} {ours * 1e3:>15.2f} {ref * 1e3:>9.2f} "
                  f"{dpa / ours:>16.2f} {ref / ours:>18.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
