"""Fast stage-3 settings sweep on the arrangement cohort: DINO on ViT-WSI in this process, with
the slide KNN AUC of the teacher every few steps (what bench_vitwsi_arrangement.py measures once,
through the command-line tools, at the end of a run).

    python benchmarks/sweep_vitwsi_arrangement.py --steps 150 --eval-every 50 \
        --set optim.lr=8e-3 --set head.out_dim=256 --set teacher.temp=0.01 --set teacher.warmup_temp=0.01

Same cohort (hipt_jax/evaluation/arrangement.py, seed --seed), same views (region_views), same
update (hipt_jax.pretrain.trainer.make_update, one device, no microbatches) and same KNN
functions as hipt-knn (paper k=5 Euclidean, DINO k=20 cosine; 5 stratified folds drawn here,
seeded by --seed). No checkpoints, no export: an exploration tool. Each evaluation prints the
AUC of the teacher backbone's whole-slide CLS (what `hipt-knn --embedding wsi` reads), of the
teacher head's logits, the DINO loss and the training seconds per step. ``--baselines`` also
prints mean CLS-4K and an untrained ViT-WSI on the same folds.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def cohort(n_per_class: int, seed: int, grid=(6, 12)):
    """[(features [M,192], cells [M,2])] and labels [2N], as write_cohort draws them."""
    from hipt_jax.evaluation.arrangement import REGION_PX, make_slide
    from hipt_jax.models.vitwsi import grid_cells

    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((2, 192)).astype(np.float32)
    slides = []
    for i in range(2 * n_per_class):
        s = make_slide(rng, prototypes, i % 2, grid)
        slides.append((s["features_cls4k"], grid_cells(s["coords"], REGION_PX)))
    return slides, np.arange(2 * n_per_class) % 2


def knn_auc(emb: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> dict:
    """{protocol: (mean AUC, std over folds)} over stratified folds."""
    from hipt_jax.evaluation import knn, metrics

    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), int)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % folds
    out = {"paper": [], "dino": []}
    for k in range(folds):
        tr, te = fold != k, fold == k
        out["paper"].append(metrics.auc(labels[te], knn.knn_euclidean(emb[tr], labels[tr], emb[te], k=5, n_classes=2)))
        out["dino"].append(metrics.auc(labels[te], knn.knn_cosine_weighted(emb[tr], labels[tr], emb[te], k=20,
                                                                           temperature=0.07, n_classes=2)))
    return {p: (float(np.mean(v)), float(np.std(v))) for p, v in out.items()}


def _override(config, assignment: str) -> None:
    key, text = assignment.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[leaf] = ast.literal_eval(text)


def _fmt(r: dict) -> str:
    return "  ".join(f"{p} {m:.3f} +/- {s:.3f}" for p, (m, s) in r.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override (Python literal), e.g. --set teacher.temp=0.01")
    ap.add_argument("--baselines", action="store_true", help="also mean CLS-4K and an untrained ViT-WSI")
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from configs.pretrain_vitwsi import get_config
    from hipt_jax.models.archs import build_vit
    from hipt_jax.models.vitwsi import embed_slide
    from hipt_jax.pretrain.augment import region_views
    from hipt_jax.pretrain.head import DINOHead
    from hipt_jax.pretrain.trainer import create_state, make_update

    slides, labels = cohort(a.per_class, a.seed)
    c = get_config("")
    c.update(global_batch=a.batch, total_steps=a.steps, seed=a.seed)
    c.optim.warmup_steps = max(1, a.steps // 10)
    for kv in a.set:
        _override(c, kv)
    c.crops.global_tokens = max(len(f) for f, _ in slides)  # any length >= the largest slide
    module = build_vit(c.model)

    def embed(params):  # teacher backbone CLS of every whole slide [N,192]
        return np.stack([embed_slide(module, params, f, cells)[0] for f, cells in slides])

    if a.baselines:
        print("cls4k_mean          ", _fmt(knn_auc(np.stack([f.mean(0) for f, _ in slides]), labels, a.seed)))
        init = module.init(jax.random.PRNGKey(a.seed), jnp.zeros((1, 4, 192)))["params"]
        print("wsi, untrained      ", _fmt(knn_auc(embed(init), labels, a.seed)), flush=True)
    state = create_state(c, jax.random.key(a.seed))
    steps_per_epoch = max(1, len(slides) // a.batch)
    update = jax.jit(make_update(c, c.optim.freeze_last_layer_epochs * steps_per_epoch, 1, steps_per_epoch))
    head = DINOHead(c.head.out_dim, c.head.hidden_dim, c.head.bottleneck_dim)
    crops = c.crops
    kw = dict(global_tokens=crops.global_tokens, n_local=crops.n_local, local_size=crops.local_size,
              dropout=crops.region_dropout, noise_std=crops.noise_std, global_scale=tuple(crops.global_scale))
    order_rng, order, train_s = np.random.default_rng(a.seed + 1), [], 0.0
    print(f"{2 * a.per_class} slides, batch {a.batch}, {a.steps} steps, overrides: {' '.join(a.set) or 'none'}")
    for step in range(a.steps):
        if len(order) < a.batch:  # epochs of shuffled slides
            order = order + [int(i) for i in order_rng.permutation(len(slides))]
        ids, order = order[:a.batch], order[a.batch:]
        views = [region_views(*slides[i], a.seed, step * a.batch + j, **kw) for j, i in enumerate(ids)]
        batch = {k: np.stack([v[k] for v in views]) for k in views[0]}
        batch["index"] = np.arange(step * a.batch, (step + 1) * a.batch, dtype=np.int64)
        t0 = time.perf_counter()
        state, metrics = update(state, batch, jax.random.key(a.seed))
        loss = float(metrics["loss"])  # waits for the step
        train_s += (time.perf_counter() - t0) if step else 0.0  # step 0 compiles
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            teacher = jax.device_get(state["teacher"])
            emb = embed(teacher["vit"])
            logits = np.asarray(head.apply({"params": teacher["head"]}, jnp.asarray(emb)))
            print(f"step {step + 1:4d} loss {loss:.3f} (log K = {np.log(c.head.out_dim):.2f})  "
                  f"backbone CLS: {_fmt(knn_auc(emb, labels, a.seed))}  head logits: "
                  f"{_fmt(knn_auc(logits, labels, a.seed))}  [{train_s / max(step, 1):.2f} s/step]", flush=True)


if __name__ == "__main__":
    main()
