"""Slide-level metrics: ROC AUC and balanced accuracy from scikit-learn, Harrell's concordance
index in numpy (equal to scikit-survival's ``concordance_index_censored``, checked in the tests;
scikit-survival is a test-only dependency), and the log-rank test from SciPy.
"""
from __future__ import annotations

import numpy as np


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary problem (positives = y_true == 1); ties in score count half.

    scikit-learn's ``roc_auc_score``; NaN (instead of an exception) when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(bool)
    score = np.asarray(score, np.float64)
    if y_true.all() or not y_true.any():
        return float("nan")
    return float(roc_auc_score(y_true, score))


def auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """HIPT's reported AUC: binary -> AUC of class 1's probability; multi-class -> macro average of
    one-vs-rest AUCs (scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")``).

    Args:
      y_true: int labels [N] in 0..K-1.
      probs: class probabilities [N, K] (K >= 2).
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true):
        raise ValueError(f"probs must be [N,K] with N={len(y_true)}, got {probs.shape}")
    if probs.shape[1] == 2:
        return binary_auc(y_true == 1, probs[:, 1])
    return float(np.mean([binary_auc(y_true == k, probs[:, k]) for k in range(probs.shape[1])]))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (scikit-learn's definition)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # predicted classes absent from y_true: sklearn warns, same value
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def concordance_index(times: np.ndarray, events: np.ndarray, risks: np.ndarray) -> float:
    """Harrell's C: fraction of comparable pairs whose risks are ordered like their times.

    A pair (i, j) is comparable when patient i had the event (``events[i]`` true) and either
    t_i < t_j, or t_i == t_j and j is censored (scikit-survival's convention). It is concordant
    when risk_i > risk_j; tied risks count 0.5. Returns NaN with no comparable pair.

    O(N^2) memory-free loop over event patients; cohorts are patients, so N is at most a few
    thousand.
    """
    times = np.asarray(times, np.float64)
    events = np.asarray(events).astype(bool)
    risks = np.asarray(risks, np.float64)
    concordant, comparable = 0.0, 0
    for i in np.flatnonzero(events):
        others = (times > times[i]) | ((times == times[i]) & ~events)
        comparable += int(others.sum())
        concordant += float((risks[i] > risks[others]).sum() + 0.5 * (risks[i] == risks[others]).sum())
    return concordant / comparable if comparable else float("nan")


def logrank_pvalue(times: np.ndarray, events: np.ndarray, groups: np.ndarray) -> float:
    """Two-sided log-rank p-value between the patients with ``groups`` true and false (SciPy's
    ``stats.logrank``); NaN when a group is empty."""
    from scipy import stats

    times = np.asarray(times, np.float64)
    events = np.asarray(events).astype(bool)
    groups = np.asarray(groups).astype(bool)
    if groups.all() or not groups.any():
        return float("nan")

    def data(sel):
        return stats.CensoredData(uncensored=times[sel & events], right=times[sel & ~events])

    return float(stats.logrank(data(groups), data(~groups)).pvalue)


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 per class present in ``y_true``, averaged with weights = class support (scikit-learn's
    ``f1_score(average="weighted")``; a class never predicted has F1 0)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    total = 0.0
    for k in np.unique(y_true):
        tp = float(np.sum((y_pred == k) & (y_true == k)))
        denom = float(np.sum(y_pred == k) + np.sum(y_true == k))
        total += (2 * tp / denom if denom else 0.0) * np.sum(y_true == k)
    return float(total / len(y_true))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [K,K]: row = true class, column = predicted class."""
    out = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(out, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return out


def fold_summary(values, metric: str = "", warn_to=None) -> dict:
    """Mean and std over folds of one metric, over the folds where it is defined: a fold whose
    test part holds one class has no AUC (NaN). ``n`` counts the folds averaged, ``of`` all of
    them; when some are left out, a line names them on ``warn_to`` (a file, e.g. sys.stderr),
    so a mean over fewer folds is never read as the K-fold figure."""
    values = [float(v) for v in values]
    kept = np.array([v for v in values if np.isfinite(v)], np.float64)
    if warn_to is not None and len(kept) < len(values):
        dropped = [k for k, v in enumerate(values) if not np.isfinite(v)]
        print(f"{metric or 'metric'}: undefined in fold(s) {dropped} (e.g. a test part with one "
              f"class); the mean is over {len(kept)} of {len(values)} folds", file=warn_to)
    return {"mean": float(kept.mean()) if len(kept) else float("nan"),
            "std": float(kept.std()) if len(kept) else float("nan"),
            "n": int(len(kept)), "of": len(values)}


def format_mean_std(summary: dict) -> str:
    """"0.8123 +/- 0.0456", with " (n of K folds)" when some folds had no value."""
    text = f"{summary['mean']:.4f} +/- {summary['std']:.4f}"
    if summary.get("n", summary.get("of")) != summary.get("of"):
        text += f" ({summary['n']} of {summary['of']} folds)"
    return text

