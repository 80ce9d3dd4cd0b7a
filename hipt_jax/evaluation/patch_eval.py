"""Patch-level evaluation of a ViT-256 backbone on a labelled tile dataset (`hipt-patch-eval`).

    features (patch_features.cached_features) ->
      knn_dino   DINO's weighted KNN: k=20, cosine on L2-normalized features, votes exp(cos/0.07)
      knn5       plain KNN: k=5, Euclidean, uniform votes (scikit-learn KNeighborsClassifier(5))
      probe      linear probe (hipt_jax.evaluation.linear_probe)
    -> accuracy, balanced accuracy, macro AUC (binary: class 1), weighted F1 on every evaluated
       split (test, and val when the dataset has one; the KNNs and the probe fit on train).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from hipt_jax.evaluation import knn, metrics
from hipt_jax.evaluation.linear_probe import C_GRID, linear_probe

METHODS = ("knn_dino", "knn5", "probe")
METRICS = ("acc", "balanced_acc", "auc", "weighted_f1")


def scores_of(probs: np.ndarray, y: np.ndarray) -> dict:
    """Scores of one method on one split. A class with no tile in the split (a one-tile class
    stays in train under the seeded split) has no one-vs-rest AUC: the macro AUC averages the
    classes present (metrics.auc, the policy of every command) and ``auc_classes`` says how many
    those were (NaN only when fewer than two classes are present, where no AUC exists)."""
    pred = probs.argmax(1)
    return {"acc": metrics.accuracy(y, pred), "balanced_acc": metrics.balanced_accuracy(y, pred),
            "auc": metrics.auc(y, probs), "auc_classes": int(len(np.unique(y))),
            "weighted_f1": metrics.weighted_f1(y, pred), "n": int(len(y))}


def absent_classes(y: np.ndarray, class_names: list[str]) -> list[str]:
    return [name for k, name in enumerate(class_names) if not (y == k).any()]


def knn_probs(x_tr, y_tr, x_ev, n_classes: int, *, k_dino: int = 20, temperature: float = 0.07,
              k_plain: int = 5) -> dict[str, np.ndarray]:
    return {"knn_dino": knn.knn_cosine_weighted(x_tr, y_tr, x_ev, k=k_dino, temperature=temperature,
                                                n_classes=n_classes),
            "knn5": knn.knn_euclidean(x_tr, y_tr, x_ev, k=k_plain, n_classes=n_classes)}


def evaluate_features(features: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                      class_names: list[str], *, seed: int = 0, methods=METHODS,
                      val_fraction: float = 0.2, c_grid=C_GRID) -> dict:
    """Every method on every evaluated split -> {"results": {split: {method: scores}},
    "predictions": {split: {method: pred}}, "probe_C": ..., "probe_search": ...}."""
    n_classes = len(class_names)
    tr = splits == "train"
    x_tr, y_tr = features[tr], labels[tr]
    eval_splits = [s for s in ("test", "val") if (splits == s).any()]
    has_val = "val" in eval_splits
    # KNN uses at most all training tiles: the k actually used is recorded and printed.
    ks = {"knn_dino": min(20, int(tr.sum())), "knn5": min(5, int(tr.sum()))}
    out = {"results": {}, "predictions": {}, "class_names": class_names,
           "n_train": int(tr.sum()), "k": ks}
    if ks["knn_dino"] < 20:
        print(f"hipt-patch-eval: only {int(tr.sum())} training tiles: KNN DINO uses k={ks['knn_dino']} "
              f"(not 20), KNN k={ks['knn5']}", file=sys.stderr)
    untrained = absent_classes(y_tr, class_names)
    if untrained:
        out["untrained_classes"] = untrained
        print(f"hipt-patch-eval: no training tile of class(es) {', '.join(untrained)}: no method can "
              "predict them, and their test tiles count as errors", file=sys.stderr)
    probe = None
    if "probe" in methods:
        # The regularization search uses the dataset's own val split when it has one.
        x_val = features[splits == "val"] if has_val else None
        y_val = labels[splits == "val"] if has_val else None
        probe = {s: linear_probe(x_tr, y_tr, features[splits == s], n_classes=n_classes, seed=seed,
                                 val_fraction=val_fraction, x_val=x_val, y_val=y_val,
                                 c_grid=c_grid)
                 for s in eval_splits}
        first = probe[eval_splits[0]]
        out["probe_C"] = first.C
        out["probe_search"] = {f"{c:g}": v for c, v in first.val_scores.items()}
    for s in eval_splits:
        x_ev, y_ev = features[splits == s], labels[splits == s]
        missing = absent_classes(y_ev, class_names)
        if missing:
            out.setdefault("absent_classes", {})[s] = missing
            print(f"hipt-patch-eval: the {s} split has no tile of class(es) {', '.join(missing)}: "
                  f"its macro AUC averages the {n_classes - len(missing)} classes present",
                  file=sys.stderr)
        probs = knn_probs(x_tr, y_tr, x_ev, n_classes, k_dino=ks["knn_dino"], k_plain=ks["knn5"])
        if probe is not None:
            probs["probe"] = probe[s].probs
        out["results"][s] = {m: scores_of(probs[m], y_ev) for m in methods}
        out["predictions"][s] = {m: probs[m].argmax(1).tolist() for m in methods}
        out["predictions"][s]["true"] = y_ev.tolist()
    return out


METHOD_NAMES = {"knn_dino": "KNN DINO (k=20, cosine, T=0.07)", "knn5": "KNN (k=5, Euclidean)",
                "probe": "linear probe"}


def method_name(method: str, result: dict) -> str:
    """The table's name of a method, with the k it really used."""
    name = METHOD_NAMES[method]
    k = (result.get("k") or {}).get(method)
    default = {"knn_dino": 20, "knn5": 5}.get(method)
    return name.replace(f"k={default}", f"k={k}") if k is not None and k != default else name


def format_table(result: dict) -> str:
    lines = ["| split | method | acc | balanced acc | macro AUC | weighted F1 | n |",
             "|---|---|---|---|---|---|---|"]
    for split, rows in result["results"].items():
        for m, s in rows.items():
            name = method_name(m, result) + (f" (C={result['probe_C']:g})" if m == "probe" else "")
            auc = f"{s['auc']:.4f}"
            if s.get("auc_classes", len(result["class_names"])) < len(result["class_names"]):
                auc += f" ({s['auc_classes']} of {len(result['class_names'])} classes)"
            lines.append(f"| {split} | {name} | {s['acc']:.4f} | {s['balanced_acc']:.4f} | "
                         f"{auc} | {s['weighted_f1']:.4f} | {s['n']} |")
    return "\n".join(lines)


def write_plots(result: dict, features: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                out_dir: str, seed: int = 0) -> list[str]:
    """embedding_map.png (all tiles) + confusion_<split>_<method>.png."""
    from hipt_jax.evaluation import plots

    names = result["class_names"]
    written = [plots.plot_embedding(features, labels, names, os.path.join(out_dir, "embedding_map.png"),
                                    "CLS-256 features", seed)]
    for split, preds in result["predictions"].items():
        for m in METHODS:
            if m in preds:
                cm = metrics.confusion_matrix(preds["true"], preds[m], len(names))
                written.append(plots.plot_confusion(
                    cm, names, os.path.join(out_dir, f"confusion_{split}_{m}.png"),
                    f"{method_name(m, result)}, {split}"))
    return written
