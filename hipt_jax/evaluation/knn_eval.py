"""Self-supervised slide KNN evaluation on mean CLS-4K embeddings; the
command line is `hipt-knn` (hipt_jax/cli/knn.py).

    hipt-knn --embeddings EMB --labels labels.csv --splits DIR_OR_kfold:10 [--out results.json]

For every fold: fit on the train slides (``--fit-on train+val`` to include val), predict the test
slides with
  (a) "paper":  k=5 Euclidean uniform KNN (scikit-learn KNeighborsClassifier equivalent),
  (b) "dino":   k=20 cosine KNN with exp(sim / 0.07) weights on L2-normalized embeddings,
and report AUC (binary: class 1; multi-class: macro one-vs-rest over the classes present in the
test part, the absent ones named under "auc_absent_classes"), balanced accuracy and accuracy;
then mean +/- std over folds (ddof=0) as a table and a JSON file. ``--label-frac`` samples the
fraction from the slides the KNN is fitted on (train, or train and val with --fit-on train+val).
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from data_prep.bags import BagError, read_slide_embeddings
from hipt_jax.evaluation import cohort as cohort_lib
from hipt_jax.evaluation import knn, metrics

PROTOCOLS = ("paper", "dino")


# The protocols' k when none is given: the paper's 5 (Euclidean) and DINO's 20 (cosine).
DEFAULT_K = {"paper": 5, "dino": 20}


def evaluate_folds(embeddings: dict[str, np.ndarray], coh: cohort_lib.Cohort, folds: list[dict],
                   *, k_paper: Optional[int] = None, k_dino: Optional[int] = None, temperature: float = 0.07,
                   fit_on: str = "train", label_fraction: float = 1.0, seed: int = 0) -> dict:
    """Per-fold metrics of both protocols + mean/std summary. A k of None is the protocol's
    DEFAULT_K, capped at the smallest training set (``k_note`` in the result says so); a k
    given explicitly must fit in every training set (CohortError before any work otherwise).
    ``label_fraction`` < 1 fits on a seeded per-class fraction of each fold's training slides
    (the few-label protocol)."""
    label_of = dict(zip(coh.slide_ids, coh.labels))
    n_classes = len(coh.class_names)
    if label_fraction < 1:  # before the k check: k must fit in the sampled training sets
        folds = [_label_fraction(fold, fit_on, embeddings, label_of, label_fraction, seed + i)
                 for i, fold in enumerate(folds)]
    k_paper, k_dino, k_note = _check_k(embeddings, folds, fit_on, k_paper, k_dino, temperature)
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
        absent = [coh.class_names[c] for c in metrics.absent_classes(y_te, n_classes)]
        if absent and len(absent) <= n_classes - 2:
            print(f"hipt-knn: fold {i}: no test slide of class(es) {', '.join(absent)}: its macro AUC averages the "
                  f"{n_classes - len(absent)} classes present", file=sys.stderr)
        for p, probs in scores.items():
            pred = probs.argmax(1)
            rows[p].append({"fold": i, "n_train": len(fit_ids), "n_test": len(test_ids),
                            "auc": metrics.auc(y_te, probs),
                            "balanced_acc": metrics.balanced_accuracy(y_te, pred),
                            "acc": metrics.accuracy(y_te, pred),
                            **({"auc_absent_classes": absent} if absent else {}),
                            "true": y_te.tolist(), "pred": pred.tolist()})
    summary = {}
    for p in PROTOCOLS:
        summary[p] = {}
        for m in ("auc", "balanced_acc", "acc"):
            summary[p][m] = metrics.fold_summary([r[m] for r in rows[p]], f"{p} {m}",
                                                 warn_to=sys.stderr if p == PROTOCOLS[0] else None)
    return {"folds": rows, "summary": summary, "class_names": coh.class_names,
            "params": {"k_paper": k_paper, "k_dino": k_dino, "temperature": temperature, "fit_on": fit_on,
                       "label_fraction": label_fraction}, **({"k_note": k_note} if k_note else {})}


def _label_fraction(fold: dict, fit_on: str, embeddings, label_of: dict, fraction: float, seed: int) -> dict:
    """``fold`` with a seeded per-class ``fraction`` of the slides fitted on (train, or train and
    val together) kept in their parts."""
    from hipt_jax.evaluation.tiles import subsample_fraction

    parts = ("train", "val") if fit_on == "train+val" else ("train",)
    fit_ids = [s for p in parts for s in fold.get(p, []) if s in embeddings]
    if not fit_ids:
        return fold
    keep = {fit_ids[j] for j in subsample_fraction(np.array([label_of[s] for s in fit_ids]), fraction, seed)}
    return {**fold, **{p: [s for s in fold.get(p, []) if s in keep] for p in parts}}


def _check_k(embeddings, folds, fit_on, k_paper, k_dino, temperature) -> tuple[int, int, str]:
    """(k_paper, k_dino, a note naming the defaults capped or ""). Only a k the user gave is
    refused for not fitting: a default the user never chose is capped at the smallest training
    set (2 slides with --label-frac 0.1 on a small cohort) and said."""
    if not temperature > 0:
        raise cohort_lib.CohortError(f"--temperature {temperature}: must be > 0")
    sizes = []
    for fold in folds:
        fit = fold["train"] + (fold.get("val", []) if fit_on == "train+val" else [])
        sizes.append(len([s for s in fit if s in embeddings]))
    smallest = min(sizes) if sizes else 0
    if smallest == 0:  # an empty training set: the fold loop names it
        return (k_paper if k_paper is not None else DEFAULT_K["paper"],
                k_dino if k_dino is not None else DEFAULT_K["dino"], "")
    for flag, k in (("--k", k_paper), ("--k-dino", k_dino)):
        if k is not None and not 1 <= k <= smallest:
            raise cohort_lib.CohortError(f"{flag} {k}: must be between 1 and the smallest training "
                                         f"set ({smallest} slides, fold {sizes.index(smallest)})")
    capped = [f"{flag} {min(DEFAULT_K[p], smallest)} (default {DEFAULT_K[p]})"
              for p, flag, k in (("paper", "--k", k_paper), ("dino", "--k-dino", k_dino))
              if k is None and DEFAULT_K[p] > smallest]
    note = (f"the smallest training set has {smallest} slides (fold {sizes.index(smallest)}): "
            f"using {', '.join(capped)}" if capped else "")
    return (k_paper if k_paper is not None else min(DEFAULT_K["paper"], smallest),
            k_dino if k_dino is not None else min(DEFAULT_K["dino"], smallest), note)


def format_table(result: dict) -> str:
    lines = ["| protocol | AUC | balanced acc | acc | folds |", "|---|---|---|---|---|"]
    names = {"paper": f"paper (k={result['params']['k_paper']}, Euclidean)",
             "dino": f"DINO (k={result['params']['k_dino']}, cosine, T={result['params']['temperature']})"}
    for p in PROTOCOLS:
        s = result["summary"][p]
        cells = [metrics.format_mean_std(s[m]) for m in ("auc", "balanced_acc", "acc")]
        lines.append(f"| {names[p]} | " + " | ".join(cells) + f" | {len(result['folds'][p])} |")
    return "\n".join(lines)


def save_clam_splits(folds: list[dict], directory: str) -> list[str]:
    """The folds as CLAM split files DIRECTORY/splits_{i}.csv (cohort.write_clam_splits), written
    only when the folder holds no other set: split files with other content (a published set, or
    more folds than these) would be replaced or read together with these as one set."""
    import os
    import tempfile

    from hipt_jax.outputs import write_file_set

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for path in cohort_lib.write_clam_splits(folds, tmp):
            with open(path, "rb") as f:
                files[os.path.basename(path)] = f.read()
    return write_file_set(directory, files, family=r"splits_\d+\.csv")


def _failed_note(embeddings_dir: str, failed: dict[str, str]) -> str:
    """The unreadable slide files, for an error that their absence may have caused."""
    ids = sorted(failed)
    return (f"{len(ids)} slide file(s) in {embeddings_dir} could not be read and were left out: "
            f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} ({ids[0]}: {failed[ids[0]]})")


def run(embeddings_dir: str, labels: str, splits: str, *, seed: int = 0, label_column: str = "label",
        classes=None, label_frac: float = 1.0, save_splits: str | None = None,
        allow_leaky_splits: bool = False, embedding: str = "cls4k_mean", **kwargs) -> dict:
    """Read the cohort, build the folds (hipt_jax.evaluation.cohort.plan_folds, the same rules
    as hipt-finetune), evaluate one slide embedding (hipt_jax.evaluation.slide_embeddings);
    ``save_splits``: write the folds used as CLAM split files."""
    coh = cohort_lib.read_labels_csv(labels, label_column=label_column, classes=classes)
    failed: dict[str, str] = {}
    if embedding == "cls4k_mean":
        emb = read_slide_embeddings(embeddings_dir, failed=failed)  # unreadable slide files -> failed
    else:
        from hipt_jax.evaluation import slide_embeddings
        emb = slide_embeddings.read(embeddings_dir, embedding, failed=failed)
    try:  # a refusal (too few slides for --k, a fold without a class) names the unreadable bags:
        # they are why slides are missing, and the fix is to repair them, not to change the flags
        cohort_lib.check_leading_zeros(coh, [*emb, *failed], embeddings_dir)
        present = [s for s in coh.slide_ids if cohort_lib.bag_file(embeddings_dir, s) and s in emb]
        if not present:
            raise cohort_lib.CohortError(f"{labels}: none of its slides are in {embeddings_dir}"
                                         + cohort_lib.case_ids_as_slide_ids_hint(coh.slide_ids))
        label_of = dict(zip(coh.slide_ids, coh.labels))
        fit_val = kwargs.get("fit_on") == "train+val"
        # With --fit-on train+val the fraction is of every label the KNN is fitted on: sampling
        # train alone and adding all of val would fit on far more than the stated fraction.
        plan = cohort_lib.plan_folds(coh, splits, present, [label_of[s] for s in present],
                                     seed=seed, label_frac=label_frac, allow_leaks=allow_leaky_splits,
                                     label_frac_parts=("train", "val") if fit_val else ("train",))
        check = [{**f, "train": f["train"] + (f["val"] if fit_val else [])} for f in plan.folds]
        cohort_lib.check_training_classes(check, label_of, coh.class_names,
                                          f"{splits} fold {{k}}" if splits.startswith("kfold:")
                                          else f"{splits}/splits_{{k}}.csv")
        if save_splits:
            save_clam_splits(plan.folds, save_splits)
        result = evaluate_folds(emb, coh, plan.folds, seed=seed, **kwargs)
    except cohort_lib.CohortError as e:
        if not failed:
            raise
        raise cohort_lib.CohortError(f"{e}; {_failed_note(embeddings_dir, failed)}") from None
    result["embedding"] = embedding
    result["_embeddings"] = emb  # for plots; dropped before writing JSON
    result["n_slides"] = len(present)
    result["folds_source"] = plan.describe()
    result["label_frac"] = label_frac
    result["params"]["label_fraction"] = label_frac  # applied by plan_folds (patient level)
    result["dropped_by_class"] = coh.dropped
    result["skipped_split_ids"] = plan.skipped_ids
    result["leaky_patients"] = {str(k): v for k, v in plan.leaky_patients.items()}
    result["patients_from"] = plan.patients_from or "unknown"
    result["fold_warnings"] = plan.warnings  # printed once by the command line
    result["missing_slides"] = [s for s in coh.slide_ids if s not in emb and s not in failed]
    # Bags with no row in the labels (or only a row the class list dropped): not evaluated.
    labelled = set(coh.slide_ids) | set(coh.dropped_ids)
    result["unlabelled_slides"] = sorted(s for s in emb if s not in labelled)
    result["failed_slides"] = failed
    return result


def baseline_table(results: dict[str, dict]) -> str:
    """One row per (embedding, protocol): the slide-KNN baselines side by side."""
    lines = ["| embedding | dim | protocol | AUC | balanced acc | acc | folds |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        dim = len(next(iter(result["_embeddings"].values()))) if "_embeddings" in result else ""
        for p in PROTOCOLS:
            s = result["summary"][p]
            cells = [metrics.format_mean_std(s[m]) for m in ("auc", "balanced_acc", "acc")]
            lines.append(f"| {name} | {dim} | {p} | " + " | ".join(cells) + f" | {len(result['folds'][p])} |")
    return "\n".join(lines)


def write_plots(result: dict, coh: cohort_lib.Cohort, out_dir: str, prefix: str, seed: int = 0) -> list[str]:
    """Embedding map of the slides (t-SNE/UMAP, colored by class) and the confusion matrix of
    each protocol over the pooled test folds."""
    import os

    from hipt_jax.evaluation import plots

    label_of = dict(zip(coh.slide_ids, coh.labels))
    emb = result["_embeddings"]
    ids = [s for s in emb if s in label_of]
    written = [plots.plot_embedding(np.stack([emb[s] for s in ids]), np.array([label_of[s] for s in ids]),
                                    coh.class_names, os.path.join(out_dir, f"{prefix}_map.png"),
                                    f"slide embeddings {result['embedding']}", seed)]
    for p in PROTOCOLS:
        true = np.concatenate([f["true"] for f in result["folds"][p]]).astype(int)
        pred = np.concatenate([f["pred"] for f in result["folds"][p]]).astype(int)
        cm = metrics.confusion_matrix(true, pred, len(coh.class_names))
        written.append(plots.plot_confusion(cm, coh.class_names, os.path.join(out_dir, f"{prefix}_confusion_{p}.png"),
                                            f"{result['embedding']}, {p}, test folds pooled"))
    return written
