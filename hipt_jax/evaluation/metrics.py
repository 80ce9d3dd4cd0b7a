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
    the one-vs-rest AUCs of the classes PRESENT in ``y_true`` (scikit-learn's
    ``roc_auc_score(multi_class="ovr", average="macro")`` when every class is present).

    A class absent from a test part has no one-vs-rest AUC; CLAM's summary averages the others
    (nanmean over per-class AUCs), and so does every command here (``absent_classes`` names the
    left-out ones for the results). NaN only when fewer than two classes are present.

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
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([binary_auc(y_true == k, probs[:, k]) for k in present]))


def absent_classes(y_true: np.ndarray, n_classes: int) -> list[int]:
    """The classes (indices) with no item in ``y_true``: left out of its macro AUC."""
    y_true = np.asarray(y_true).astype(int)
    return [k for k in range(n_classes) if not (y_true == k).any()]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (scikit-learn's definition)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # predicted classes absent from y_true: sklearn warns, same value
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


TIED_TOL = 1e-8  # scikit-survival's and MCAT/HIPT's tied_tol


def concordance_index(times: np.ndarray, events: np.ndarray, risks: np.ndarray,
                      tied_tol: float = TIED_TOL) -> float:
    """Harrell's C: fraction of comparable pairs whose risks are ordered like their times.

    A pair (i, j) is comparable when patient i had the event (``events[i]`` true) and either
    t_i < t_j, or t_i == t_j and j is censored (scikit-survival's convention). It is concordant
    when risk_i > risk_j; risks within ``tied_tol`` of each other count as tied, 0.5 (as
    scikit-survival's ``concordance_index_censored`` and MCAT/HIPT, which call it: float noise
    in two risks of the same model output must not decide a pair). Returns NaN with no
    comparable pair.

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
        diff = risks[i] - risks[others]
        tied = np.abs(diff) <= tied_tol
        concordant += float(((diff > 0) & ~tied).sum() + 0.5 * tied.sum())
    return concordant / comparable if comparable else float("nan")


def comparable_pairs(times: np.ndarray, events: np.ndarray) -> int:
    """The number of pairs ``concordance_index`` compares (0: the C-index is undefined)."""
    times = np.asarray(times, np.float64)
    events = np.asarray(events).astype(bool)
    return int(sum(((times > times[i]) | ((times == times[i]) & ~events)).sum() for i in np.flatnonzero(events)))


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
    """Mean and std over folds of one metric, over the folds where it is defined (a test part
    with fewer than two classes has no AUC, one without a comparable pair no C-index: NaN, or
    None as read back from JSON). The std is the population std (ddof=0), as the official
    CLAM/HIPT code's np.std computes it; with fewer than two folds averaged it is undefined
    (NaN). ``n`` counts the folds averaged, ``of`` all of them; when some are left out, a line
    names them on ``warn_to`` (a file, e.g. sys.stderr), so a mean over fewer folds is never
    read as the K-fold figure."""
    values = [float("nan") if v is None else float(v) for v in values]
    kept = np.array([v for v in values if np.isfinite(v)], np.float64)
    if warn_to is not None and len(kept) < len(values):
        dropped = [k for k, v in enumerate(values) if not np.isfinite(v)]
        print(f"{metric or 'metric'}: undefined in fold(s) {dropped} ({_undefined_reason(metric)}); "
              f"the mean is over {len(kept)} of {len(values)} folds", file=warn_to)
    return {"mean": float(kept.mean()) if len(kept) else float("nan"),
            "std": float(kept.std()) if len(kept) > 1 else float("nan"),
            "n": int(len(kept)), "of": len(values)}


def _undefined_reason(metric: str) -> str:
    if "auc" in metric:
        return "fewer than two classes in the test part"
    if "c_index" in metric:
        return "no comparable pair (no event) in the test part"
    return "not a finite number"


def format_mean_std(summary: dict) -> str:
    """"0.8123 +/- 0.0456" (std over folds, ddof=0), with " (n of K folds)" when some folds had
    no value; the mean alone with "(1 of K folds)" when one fold had (no spread to give)."""
    n, of = summary.get("n", summary.get("of")), summary.get("of")
    mean = summary["mean"]
    if mean is None or not np.isfinite(mean):
        return f"nan ({n} of {of} folds)" if of else "nan"
    if n == 1:
        return f"{mean:.4f} (1 of {of} folds)"
    text = f"{mean:.4f} +/- {summary['std']:.4f}"
    if n != of:
        text += f" ({n} of {of} folds)"
    return text
