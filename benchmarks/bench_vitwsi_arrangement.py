"""Does stage 3 earn its place? KNN AUC on the arrangement cohort (hipt_jax/evaluation/arrangement.py):
the class is only in WHERE two region types lie, so the mean CLS-4K cannot separate it.

    python benchmarks/bench_vitwsi_arrangement.py [--per-class 40] [--steps 300] [--seed 0]

Writes the cohort as hipt-extract bags, trains ViT-WSI (configs/pretrain_vitwsi.py, no labels)
with hipt-pretrain, adds slide_embedding_wsi with hipt-extract --vitwsi, then runs the slide
KNN (hipt-knn's protocol: 5-fold, paper k=5 Euclidean and DINO k=20 cosine) on
  cls4k_mean       the mean of the region embeddings (HIPT's slide embedding)
  wsi (random)     an untrained ViT-WSI (same architecture, init seed --seed)
  wsi (trained)    the stage-3 teacher after --steps steps
and prints one row each (AUC mean +/- std over folds). Everything is seeded by --seed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cli(*args) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, args[:2]))} failed:\n{proc.stderr[-3000:]}")


def _auc(emb_dir, labels, embedding, seed):
    from hipt_jax.evaluation import knn_eval
    res = knn_eval.run(emb_dir, labels, "kfold:5", seed=seed, embedding=embedding)
    return {p: (v["auc"]["mean"], v["auc"]["std"]) for p, v in res["summary"].items()}


def _random_wsi(emb_dir, seed):
    """slide_embedding_wsi of an untrained ViT-WSI, written into the bags (the control)."""
    import jax
    import jax.numpy as jnp

    from data_prep import bags
    from hipt_jax.models.archs import build_vit, get_arch
    from hipt_jax.models.vitwsi import embed_slide
    from hipt_jax.wsi import WSI_KEY, slide_inputs

    module = build_vit(get_arch("vitwsi"))
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, 192)))["params"]
    for path in bags.list_bags(emb_dir).values():
        feats, cells = slide_inputs(path, 192)
        arrays = bags.read_bag_file(path)
        arrays[WSI_KEY] = embed_slide(module, params, feats, cells)[0]
        bags.write_bag_file(path, arrays, bags.read_coords_attrs(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3, help="config.optim.lr (peak = lr * batch / 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="extra config override for the stage-3 run, e.g. --set head.out_dim=256")
    a = ap.parse_args()
    from hipt_jax.evaluation.arrangement import write_cohort

    root = a.workdir or tempfile.mkdtemp(prefix="bench_vitwsi_")
    emb = os.path.join(root, "emb")
    labels = write_cohort(emb, n_per_class=a.per_class, seed=a.seed)
    rows = {"cls4k_mean": _auc(emb, labels, "cls4k_mean", a.seed)}
    print("cls4k_mean", rows["cls4k_mean"], flush=True)
    _random_wsi(emb, a.seed)
    rows["wsi (random init)"] = _auc(emb, labels, "wsi", a.seed)
    print("wsi (random init)", rows["wsi (random init)"], flush=True)
    t0 = time.time()
    _cli("hipt_jax.cli.pretrain", "--config", "configs/pretrain_vitwsi.py", f"--workdir={root}/run",
         f"--config.data.path={emb}", f"--config.seed={a.seed}", f"--config.total_steps={a.steps}",
         f"--config.global_batch={a.batch}", f"--config.optim.lr={a.lr}",
         f"--config.optim.warmup_steps={max(1, a.steps // 10)}", "--config.teacher.momentum=0.99",
         "--config.head.out_dim=1024", "--config.data.num_workers=0",
         f"--config.checkpoint.every_steps={a.steps}", f"--config.log_every={max(1, a.steps // 10)}",
         *(f"--config.{kv}" for kv in a.set))
    train_s = time.time() - t0
    _cli("hipt_jax.cli.extract", "--vitwsi", f"{root}/run/export", "--out", emb, "--no-progress")
    rows[f"wsi (stage 3, {a.steps} steps)"] = _auc(emb, labels, "wsi", a.seed)
    print(f"arrangement cohort: {2 * a.per_class} slides, seed {a.seed}; stage 3: {a.steps} steps "
          f"at batch {a.batch}, lr {a.lr} {' '.join(a.set)}, {train_s:.0f} s (start-up and compilation included)")
    print(f"{'embedding':<28} " + "  ".join(f"{p:>22}" for p in next(iter(rows.values()))))
    for name, by_proto in rows.items():
        print(f"{name:<28} " + "  ".join(f"AUC {m:.3f} +/- {s:.3f}".rjust(22) for m, s in by_proto.values()))


if __name__ == "__main__":
    main()
