"""Self-supervised slide KNN evaluation on mean CLS-4K embeddings; the
command line is `hipt-knn` (hipt_jax/cli/knn.py).

    hipt-knn --embeddings EMB --labels labels.csv --splits DIR_OR_kfold:10 [--out results.json]

For every fold: fit on the train slides (``--fit-on train+val`` to include val), predict the test
slides with
  (a) "paper":  k=5 Euclidean uniform KNN (scikit-learn KNeighborsClassifier equivalent),
  (b) "dino":   k=20 cosine KNN with exp(sim / 0.07) weights on L2-normalized embeddings,
and report AUC (binary: class 1; multi-class: macro one-vs-rest), balanced accuracy and
accuracy; then mean +/- std over folds as a table and a JSON file.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from data_prep.bags import BagError, read_slide_embeddings
from hipt_jax.evaluation import cohort as cohort_lib
from hipt_jax.evaluation import knn, metrics

PROTOCOLS = ("paper", "dino")


def evaluate_folds(embeddings: dict[str, np.ndarray], coh: cohort_lib.Cohort, folds: list[dict],
                   *, k_paper: int = 5, k_dino: Optional[int] = None, temperature: float = 0.07,
                   fit_on: str = "train") -> dict:
    """Per-fold metrics of both protocols + mean/std summary. ``k_dino=None``: DINO's 20,
    capped at the smallest training set; a k given explicitly must fit in every training set
    (CohortError before any work otherwise), as must k_paper."""
    label_of = dict(zip(coh.slide_ids, coh.labels))
    n_classes = len(coh.class_names)
    k_paper, k_dino = _check_k(embeddings, folds, fit_on, k_paper, k_dino, temperature)
    rows = {p: [] for p in PROTOCOLS}
    for i, fold in enumerate(folds):
        fit_ids = fold["train"] + (fold.get("val", []) if fit_on == "train+val" else [])
        fit_ids = [s for s in fit_ids if s in embeddings]
        test_ids = [s for s in fold["test"] if s in embeddings]
        if not fit_ids or not test_ids:
            raise cohort_lib.CohortError(f"fold {i}: no extracted slides in train or test")
        x_tr = np.stack([embeddings[s] for s in fit_ids])
        y_tr = np.array([label_of[s] for s in fit_ids])
        x_te = np.stack([embeddings[s] for s in test_ids])
        y_te = np.array([label_of[s] for s in test_ids])
        scores = {
            "paper": knn.knn_euclidean(x_tr, y_tr, x_te, k=k_paper, n_classes=n_classes),
            "dino": knn.knn_cosine_weighted(x_tr, y_tr, x_te, k=k_dino, temperature=temperature,
                                            n_classes=n_classes),
        }
        for p, probs in scores.items():
            pred = probs.argmax(1)
            rows[p].append({"fold": i, "n_train": len(fit_ids), "n_test": len(test_ids),
                            "auc": metrics.auc(y_te, probs),
                            "balanced_acc": metrics.balanced_accuracy(y_te, pred),
                            "acc": metrics.accuracy(y_te, pred)})
    summary = {}
    for p in PROTOCOLS:
        summary[p] = {}
        for m in ("auc", "balanced_acc", "acc"):
            vals = np.array([r[m] for r in rows[p] if r[m] == r[m]])
            summary[p][m] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                             "std": float(vals.std()) if len(vals) else float("nan")}
    return {"folds": rows, "summary": summary, "class_names": coh.class_names,
            "params": {"k_paper": k_paper, "k_dino": k_dino, "temperature": temperature, "fit_on": fit_on}}


def _check_k(embeddings, folds, fit_on, k_paper, k_dino, temperature) -> tuple[int, int]:
    if not temperature > 0:
        raise cohort_lib.CohortError(f"--temperature {temperature}: must be > 0")
    sizes = []
    for fold in folds:
        fit = fold["train"] + (fold.get("val", []) if fit_on == "train+val" else [])
        sizes.append(len([s for s in fit if s in embeddings]))
    smallest = min(sizes) if sizes else 0
    if smallest == 0:  # an empty training set: the fold loop names it
        return k_paper, k_dino if k_dino is not None else 20
    for flag, k in (("--k", k_paper), ("--k-dino", k_dino)):
        if k is not None and not 1 <= k <= smallest:
            raise cohort_lib.CohortError(f"{flag} {k}: must be between 1 and the smallest training "
                                         f"set ({smallest} slides, fold {sizes.index(smallest)})")
    return k_paper, k_dino if k_dino is not None else max(1, min(20, smallest))


def format_table(result: dict) -> str:
    lines = ["| protocol | AUC | balanced acc | acc | folds |", "|---|---|---|---|---|"]
    names = {"paper": f"paper (k={result['params']['k_paper']}, Euclidean)",
             "dino": f"DINO (k={result['params']['k_dino']}, cosine, T={result['params']['temperature']})"}
    for p in PROTOCOLS:
        s = result["summary"][p]
        cells = [f"{s[m]['mean']:.4f} +/- {s[m]['std']:.4f}" for m in ("auc", "balanced_acc", "acc")]
        lines.append(f"| {names[p]} | " + " | ".join(cells) + f" | {len(result['folds'][p])} |")
    return "\n".join(lines)


def run(embeddings_dir: str, labels: str, splits: str, *, seed: int = 0, **kwargs) -> dict:
    coh = cohort_lib.read_labels_csv(labels)
    if (coh.labels < 0).any():
        raise cohort_lib.CohortError(f"{labels}: every slide needs a label")
    failed: dict[str, str] = {}
    emb = read_slide_embeddings(embeddings_dir, failed=failed)  # unreadable slide files -> failed
    keep = [i for i, s in enumerate(coh.slide_ids) if s in emb]
    if not keep:
        raise cohort_lib.CohortError(f"{labels}: none of its slides are in {embeddings_dir}")
    ids = [coh.slide_ids[i] for i in keep]
    folds = cohort_lib.resolve_splits(splits, ids if splits.startswith("kfold:") else coh.slide_ids,
                                      coh.labels[keep] if splits.startswith("kfold:") else coh.labels, seed)
    result = evaluate_folds(emb, coh, folds, **kwargs)
    result["n_slides"] = len(ids)
    result["missing_slides"] = [s for s in coh.slide_ids if s not in emb and s not in failed]
    result["failed_slides"] = failed
    return result
