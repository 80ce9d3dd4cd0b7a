"""DINO update step, ours (JAX) vs DINO's torch step, on this machine, in one process.

    python benchmarks/bench_pretrain.py                  # both stages, 3 timed steps each
    python benchmarks/bench_pretrain.py --stages 2 --steps 5 --loader-workers 2

Stage 1: ViT-S/16 + DINO head (65536), batch 16 of 2 x 224 px + 8 x 96 px crops.
Stage 2: ViT-4K-XS + DINO head (65536), batch 64 of 2 x 14x14 + 8 x 6x6 feature grids.
Both sides run the full iteration: teacher forward on the global crops, student forward and
backward on all crops, DINO loss, per-tensor clipping, AdamW, EMA teacher, fp32. Ours runs as
its config says (``microbatches=-1``: auto, chunks sized for this CPU by
hipt_jax.models.minibatch: a stored calibration or the cache rule; the last block on the
CLS token only); ``--microbatches`` overrides. Timed steps alternate between the two frameworks
(ours, torch, ours, ...) so that load from other processes hits both alike; the median is reported.
Torch's whole-batch settings run in a second phase (their large frees can leave glibc's heap in a
state that slows a later step of ours in the same process); our figure is the median over both
phases, each phase's printed apart (see ``bench_step``). FLOPs are XLA's cost analysis of our
compiled update for the whole batch: "ours" counts what our program executes, "reference" the same
update with every token through the last block, which is the arithmetic of the torch step (torch's
FLOP/s use that count).
Stochastic depth: the in-tree torch reference has none, so ours runs with
``--drop-path 0.0`` by default (the same on both sides; the recipe's 0.1 is
``--drop-path 0.1``, printed as a one-sided setting).
Torch is timed as shipped (default threads, whole batch) and at its own best setting (thread
counts of ``--torch-threads`` x gradient-accumulation chunks of ``--torch-chunks``): ratios are
printed against both and the headline is the lower. Every figure line ends with the machine
(CPU model, cores, L2/L3 sizes, XLA_FLAGS).
Also measured: the Grain loader's crops/s (augmentation in worker processes) against what the
step consumes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from configs.pretrain_vit256 import get_config as get_config_256  # noqa: E402
from configs.pretrain_vit4k import get_config as get_config_4k  # noqa: E402
from hipt_jax import sharding as shd  # noqa: E402
from hipt_jax.pretrain import data as data_lib  # noqa: E402
from hipt_jax.pretrain import trainer  # noqa: E402
from hipt_jax.models import minibatch  # noqa: E402
from hipt_jax.profiler import update_flops  # noqa: E402
from tests import reference_torch as ref  # noqa: E402
from tests import reference_torch_dino as ref_dino  # noqa: E402

N_LOCAL = 8


def stage_config(stage: int, batch: int, microbatches: int = -1, drop_path: float = 0.0):
    c = (get_config_256 if stage == 1 else get_config_4k)("")
    c.drop_path_rate = drop_path
    c.global_batch = batch
    c.microbatches = microbatches
    c.data.num_workers = 0
    return c


def random_batch(c, rng):
    b = trainer.dummy_batch(c, c.global_batch)
    if c.stage == 1:
        b["global"] = rng.integers(0, 256, b["global"].shape).astype(np.uint8)
        b["local"] = rng.integers(0, 256, b["local"].shape).astype(np.uint8)
    else:
        b["global"] = rng.normal(size=b["global"].shape).astype(np.float32)
        b["local"] = rng.normal(size=b["local"].shape).astype(np.float32)
    return b


class OursStep:
    def __init__(self, c, batch):
        mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
        self.microbatches = trainer.resolve_microbatches(c, mesh)
        self.state, sh = trainer.init_sharded_state(c, mesh, jax.random.key(0))
        self.update = trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=0)
        self.compiler_options = trainer.update_compiler_options(c, mesh)  # as calibrated, else default
        self.batch = shd.global_batch(batch, shd.batch_sharding(mesh))
        self.rng = jax.random.key(1)
        t = time.perf_counter()
        self.update.lower(self.state, self.batch, self.rng).compile()
        self.compile_s = time.perf_counter() - t
        args = (self.state, self.batch, self.rng)
        self.flops = update_flops(c, mesh, sh, args) or float("nan")
        self.ref_flops = update_flops(c, mesh, sh, args, last_block_cls_only=False) or float("nan")

    def __call__(self):
        t = time.perf_counter()
        self.state, metrics = self.update(self.state, self.batch, self.rng)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t


class TorchStep:
    """DINO's train_one_epoch iteration with the in-tree reference ViTs."""

    def __init__(self, c, batch):
        torch.manual_seed(0)
        arch = "vit256" if c.stage == 1 else "vit4k"
        width = c.model.width

        def wrapper():
            return ref_dino.MultiCropWrapper(ref.build_reference(arch).train(),
                                             ref_dino.DINOHead(width, c.head.out_dim))
        self.student, self.teacher = wrapper(), wrapper()
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.opt = torch.optim.AdamW(ref_dino.get_params_groups(self.student))
        self.loss = ref_dino.DINOLoss(c.head.out_dim, 2 + N_LOCAL, 0.04, 0.04, 0, 10)
        n = 1000
        self.sched = (ref_dino.cosine_scheduler(5e-4 * c.global_batch / 256, 1e-6, n, 1, 10),
                      ref_dino.cosine_scheduler(0.04, 0.4, n, 1),
                      ref_dino.cosine_scheduler(0.996, 1.0, n, 1))
        # ours [B,V,H,W,C] -> torch: list of V NCHW crops (normalized, as DINO's loader gives)
        crops = []
        for key in ("global", "local"):
            x = batch[key]
            if c.stage == 1:
                x = (x.astype(np.float32) / 255.0 - 0.5) / 0.5
            crops += [torch.from_numpy(np.ascontiguousarray(x[:, v].transpose(0, 3, 1, 2)))
                      for v in range(x.shape[1])]
        self.crops, self.it = crops, 0

    def __call__(self, chunks: int = 1):
        """One step; ``chunks`` > 1: the batch in strided chunks with gradients accumulated
        (torch's counterpart of our microbatches, for its own best minibatch)."""
        t = time.perf_counter()
        if chunks == 1:
            ref_dino.train_step(self.student, self.teacher, self.loss, self.opt, self.crops, self.it,
                                1, *self.sched, clip_grad=3.0, freeze_last_layer=0)
        else:
            self._chunked_step(chunks)
        self.it += 1
        return time.perf_counter() - t

    def _chunked_step(self, chunks: int):
        self.opt.zero_grad()
        for j in range(chunks):
            crops = [c[j::chunks] for c in self.crops]
            loss = self.loss(self.student(crops), self.teacher(crops[:2]), 1) / chunks
            loss.backward()
        ref_dino.clip_gradients(self.student, 3.0)
        self.opt.step()
        with torch.no_grad():
            m = self.sched[2][self.it]
            for q, k in zip(self.student.parameters(), self.teacher.parameters()):
                k.data.mul_(m).add_((1 - m) * q.detach().data)


def _timed_with_threads(step, setting) -> float:
    threads, chunks = setting
    shipped = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return step(chunks)
    finally:
        torch.set_num_threads(shipped)


def bench_step(stage, batch, steps, skip_torch, microbatches=-1, drop_path=0.0,
               torch_threads=(), torch_chunks=(1,)):
    """Median s/step of ours and of torch at each (thread count, chunks) setting: thread counts
    from ``torch_threads`` (the first is the reference as shipped: torch's default) times the
    chunk counts of ``torch_chunks`` (1 = the whole batch at once, as shipped).

    Two phases, each alternating ours with torch's steps: phase 1 with torch's chunked settings,
    phase 2 with its whole-batch settings. Our figure is the median of all our timed steps (both
    phases: no phase is chosen after the fact); each phase's median is printed apart. One measurement
    found our steps 10-20% slower after a whole-batch torch step in the same process (its large
    frees move glibc's dynamic mmap threshold; docs/performance_notes.md); the next did not
    (2026-12-01: 6.10 s beside the chunked settings, 5.74 s beside the whole batch). Both
    figures are printed, so each run shows whether it matters there."""
    c = stage_config(stage, batch, microbatches, drop_path)
    b = random_batch(c, np.random.default_rng(0))
    ours = OursStep(c, b)
    ours()  # first call after compile (allocations)
    theirs = None if skip_torch else TorchStep(c, b)
    threads = [(n, k) for n in (list(torch_threads) or [torch.get_num_threads()]) for k in torch_chunks
               if batch % k == 0]
    phases = [[s for s in threads if s[1] > 1], [s for s in threads if s[1] == 1]]
    t_ours, t_ours_after, t_torch = [], [], {n: [] for n in threads}
    for phase, settings in enumerate(phases):
        if theirs is None and phase == 1:
            break
        if theirs is not None and settings:
            _timed_with_threads(theirs, settings[0])  # warm-up (this setting's allocations)
        for _ in range(steps):
            (t_ours if phase == 0 else t_ours_after).append(ours())
            for n in settings if theirs is not None else ():
                t_torch[n].append(_timed_with_threads(theirs, n))
    res = {"stage": stage, "batch": batch, "flops": ours.flops, "ref_flops": ours.ref_flops,
           "microbatches": ours.microbatches, "compile_s": ours.compile_s,
           "dots": minibatch.dot_backend_name(ours.compiler_options),
           "ours_s": statistics.median(t_ours + t_ours_after), "ours_all": t_ours + t_ours_after,
           "ours_phase1": t_ours}
    if theirs is not None:
        per = {n: statistics.median(t) for n, t in t_torch.items()}
        best = min(per, key=per.get)
        res.update(torch_s=per[threads[0]], torch_all=t_torch[threads[0]], torch_by_threads=per,
                   torch_best_threads=best, torch_best_s=per[best], ours_after_whole=t_ours_after)
    return res


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best fp32 n x n matmul FLOP/s of XLA and of torch on this machine (the ceilings)."""
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    best_jax = float("inf")
    # XLA's ceiling is the faster of its CPU dot backends (a calibrated update may use either).
    for options in [minibatch.DOT_BACKENDS[n] for n in minibatch.dot_backends_to_try()] or [{}]:
        mm = jax.jit(lambda x: x @ x, compiler_options=options or None)
        mm(a).block_until_ready()
        best_jax = min(best_jax, min(_timed(lambda: mm(a).block_until_ready()) for _ in range(repeats)))
    t = torch.from_numpy(np.asarray(a))
    t @ t
    best_torch = min(_timed(lambda: t @ t) for _ in range(repeats))
    return 2 * n**3 / best_jax, 2 * n**3 / best_torch


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_loader(stage, batch, workers, n_batches):
    """Crops/s of the real Grain pipeline (decode + multi-crop augmentation) on synthetic data."""
    c = stage_config(stage, batch)
    c.data.num_workers = workers
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(32):
            if stage == 1:
                small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(f"{tmp}/p{i:03d}.png")
            else:
                np.save(f"{tmp}/r{i:03d}.npy", rng.normal(size=(256, 384)).astype(np.float32))
        c.data.path = tmp
        source = data_lib.make_source(c.data)
        it = data_lib.make_iterator(c, source, process_index=0, process_count=1,
                                    num_steps=n_batches + 2)
        next(it)  # worker start-up
        t = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        dt = time.perf_counter() - t
        data_lib.close_iterator(it)
    return n_batches * batch * (2 + N_LOCAL) / dt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="1,2")
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=4)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--batch", type=int, default=0,
                   help="global batch of every stage (0: 16 for stage 1, 64 for stage 2)")
    p.add_argument("--torch-threads", default="1",
                   help="extra torch thread counts to time besides the shipped default "
                        "(the reference's best setting is the fastest of them)")
    p.add_argument("--torch-chunks", default="1,2,4",
                   help="chunk counts (gradient accumulation) the torch step is also timed at; 1 = "
                        "as shipped; the best (threads, chunks) is torch at its own best minibatch")
    p.add_argument("--drop-path", type=float, default=0.0,
                   help="our student's stochastic depth (the torch reference has none: 0.0 "
                        "keeps both sides the same)")
    p.add_argument("--microbatches", default="auto,auto",
                   help="config.microbatches for stage 1,2: auto (the config default, -1) or a "
                        "count (our step only; torch runs the batch whole)")
    args = p.parse_args()
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    from benchmarks.machine import machine_tag, torch_blas_note
    tag = machine_tag()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads) {tag}")
    if torch_blas_note():
        print(torch_blas_note())
    peak_jax, peak_torch = matmul_peak()
    print(f"fp32 2048^3 matmul peak: XLA {peak_jax / 1e9:.1f} GFLOP/s, torch "
          f"{peak_torch / 1e9:.1f} GFLOP/s (ceiling ratio {peak_jax / peak_torch:.2f}x) {tag}")
    targets = {1: 1.3, 2: 1.5}
    batches = {1: 16, 2: 64}
    for stage in map(int, args.stages.split(",")):
        micro = args.microbatches.split(",")[stage - 1]
        micro = -1 if micro == "auto" else int(micro)
        r = bench_step(stage, args.batch or batches[stage], args.steps, args.skip_torch, micro, args.drop_path,
                       [torch.get_num_threads()] + [int(n) for n in args.torch_threads.split(",") if n],
                       [int(k) for k in args.torch_chunks.split(",") if k])
        crops = r["batch"] * (2 + N_LOCAL)
        print(f"\nstage {stage}: stochastic depth ours {args.drop_path}, reference 0.0"
              f"{'' if args.drop_path == 0 else ' (ONE-SIDED: not a like-for-like figure)'}")
        print(f"stage {stage}: batch {r['batch']} ({crops} crops, ours in {r['microbatches']} "
              f"microbatch(es){' (auto)' if micro == -1 else ''}; dots {r['dots']}), GFLOP/step (XLA cost analysis): "
              f"ours {r['flops'] / 1e9:.1f}, reference {r['ref_flops'] / 1e9:.1f}; "
              f"compile {r['compile_s']:.1f} s {tag}")
        print(f"  ours : {r['ours_s']:.3f} s/step  {r['flops'] / r['ours_s'] / 1e9:.1f} GFLOP/s "
              f"= {r['flops'] / r['ours_s'] / peak_jax:.0%} of the XLA matmul peak  "
              f"(steps {', '.join(f'{t:.3f}' for t in r['ours_all'])}) {tag}")
        if "torch_s" in r:
            ratio = r["torch_s"] / r["ours_s"]
            best_t = r["torch_best_s"]
            print(f"  torch as shipped: {r['torch_s']:.3f} s/step  {r['ref_flops'] / r['torch_s'] / 1e9:.1f} GFLOP/s "
                  f"= {r['ref_flops'] / r['torch_s'] / peak_torch:.0%} of the torch matmul peak  "
                  f"(steps {', '.join(f'{t:.3f}' for t in r['torch_all'])}) {tag}")
            print(f"  torch at its best (threads {r['torch_best_threads'][0]}, {r['torch_best_threads'][1]} "
                  f"chunk(s)): {best_t:.3f} s/step = {r['ref_flops'] / best_t / peak_torch:.0%} of the torch "
                  f"matmul peak {tag}")
            best_ratio = best_t / r["ours_s"]
            print("  torch s/step by (threads, chunks): " + ", ".join(
                f"{n}x{k}: {t:.3f}" for (n, k), t in r["torch_by_threads"].items()))
            if r["ours_after_whole"]:
                print(f"  ours by phase: beside torch's chunked settings "
                      f"{statistics.median(r['ours_phase1']):.3f} s/step, beside its whole-batch settings "
                      f"{statistics.median(r['ours_after_whole']):.3f} s/step (the heap state a whole-batch "
                      f"torch step leaves; the figure above is the median of both) {tag}")
            print(f"  share of own matmul peak: ours {r['flops'] / r['ours_s'] / peak_jax:.0%}, torch "
                  f"{r['ref_flops'] / best_t / peak_torch:.0%} (at its best) {tag}")
            # The same work: one DINO step, counted for both sides as the reference's arithmetic
            # (ours executes less of it, the last block computing the CLS token only).
            print(f"  share of own matmul peak on the same work (reference GFLOP/step for both): ours "
                  f"{r['ref_flops'] / r['ours_s'] / peak_jax:.0%}, torch {r['ref_flops'] / best_t / peak_torch:.0%} "
                  f"(at its best) {tag}")
            print(f"  speed-up vs the reference as shipped ({torch.get_num_threads()} threads, whole batch): "
                  f"{ratio:.2f}x; best vs best: {best_ratio:.2f}x {tag}")
            headline = min(ratio, best_ratio)
            verdict = "MET" if headline >= targets[stage] else "NOT MET"
            print(f"  headline (the lower): {headline:.2f}x (target >= {targets[stage]}x: {verdict}) {tag}")
        crops_s = bench_loader(stage, r["batch"], args.loader_workers, args.loader_batches)
        need = crops / r["ours_s"]
        print(f"  loader ({args.loader_workers} workers): {crops_s:.0f} crops/s; "
              f"the step consumes {need:.0f} crops/s -> "
              f"{'loader keeps up' if crops_s >= need else 'LOADER IS THE BOTTLENECK'}")


if __name__ == "__main__":
    main()
