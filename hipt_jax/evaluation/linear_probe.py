"""Linear probe: multinomial logistic regression on standardized frozen features.

Recipe (seeded, deterministic):
1. Standardize with the training features' per-dimension mean and std (std 0 -> 1).
2. Regularization search: a stratified ``val_fraction`` (default 20%) of the training tiles,
   drawn with ``seed``, is held out (or the dataset's own val split when it has one); for each
   inverse regularization strength C in ``C_GRID`` (10^-4 .. 10^2, 7 values) fit on the rest
   and score balanced accuracy on the held-out part; the best C wins (ties: the smaller C, the
   stronger regularization).
3. Refit on ALL training tiles at the chosen C (re-standardized on them) and predict.

The solver is scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial softmax loss, L2
penalty 1/(2C) ||W||^2 on the weights, not the bias), max_iter 1000.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hipt_jax.evaluation import metrics
from hipt_jax.evaluation.tiles import split_tiles

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
MAX_ITER = 1000


@dataclasses.dataclass
class ProbeResult:
    C: float
    val_scores: dict          # C -> balanced accuracy on the held-out part
    probs: np.ndarray         # [N_test, K]
    mean: np.ndarray
    std: np.ndarray


def standardize_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def fit_predict(x_tr, y_tr, x_te, C: float, n_classes: int) -> tuple[np.ndarray, tuple]:
    """Standardize on x_tr, fit at C, -> (probs [N_test, n_classes], (mean, std))."""
    from sklearn.linear_model import LogisticRegression

    mean, std = standardize_fit(x_tr)
    clf = LogisticRegression(C=C, max_iter=MAX_ITER)
    clf.fit((x_tr - mean) / std, y_tr)
    probs = np.zeros((len(x_te), n_classes))
    probs[:, clf.classes_] = clf.predict_proba((x_te - mean) / std)
    return probs, (mean, std)


def linear_probe(x_tr, y_tr, x_te, *, n_classes: int, seed: int = 0, val_fraction: float = 0.2,
                 x_val=None, y_val=None, c_grid=C_GRID) -> ProbeResult:
    """The recipe in the module docstring -> ProbeResult (test probabilities at the chosen C)."""
    x_tr, x_te = np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64)
    y_tr = np.asarray(y_tr)
    if x_val is None:
        part = split_tiles(y_tr, val_fraction, seed)
        fit, held = np.flatnonzero(part == "train"), np.flatnonzero(part == "test")
        search = (x_tr[fit], y_tr[fit], x_tr[held], y_tr[held])
    else:
        search = (x_tr, y_tr, np.asarray(x_val, np.float64), np.asarray(y_val))
    scores = {}
    if len(search[2]) and len(np.unique(search[1])) > 1:
        for C in c_grid:
            probs, _ = fit_predict(search[0], search[1], search[2], C, n_classes)
            scores[C] = metrics.balanced_accuracy(search[3], probs.argmax(1))
        best = max(scores.values())
        chosen = min(C for C, s in scores.items() if s == best)
    else:  # too few tiles to hold any out: the middle of the grid
        chosen = c_grid[len(c_grid) // 2]
    probs, (mean, std) = fit_predict(x_tr, y_tr, x_te, chosen, n_classes)
    return ProbeResult(chosen, scores, probs, mean, std)
