"""Result figures of hipt-finetune / hipt-knn: ROC curves per fold and Kaplan-Meier by risk group."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hipt_jax.finetune.survival import kaplan_meier  # noqa: E402


def _roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold (ties move together)."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order].astype(bool), score[order]
    last = np.r_[np.flatnonzero(score[1:] != score[:-1]), len(score) - 1]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def plot_roc(folds: list[dict], class_names: list[str], path: str, title: str = "") -> None:
    """One ROC curve per fold (binary: class 1; multi-class: micro-averaged one-vs-rest).

    ``folds``: [{"labels": int [N], "probs": [N,K], "auc": float}, ...].
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, f in enumerate(folds):
        labels, probs = np.asarray(f["labels"]), np.asarray(f["probs"])
        if probs.shape[1] == 2:
            fpr, tpr = _roc_curve(labels == 1, probs[:, 1])
        else:  # stack the one-vs-rest problems
            onehot = labels[:, None] == np.arange(probs.shape[1])[None]
            fpr, tpr = _roc_curve(onehot.ravel(), probs.ravel())
        ax.plot(fpr, tpr, lw=1, alpha=0.8, label=f"fold {i} (AUC {f['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=title or ("ROC, class " + class_names[1] if len(class_names) == 2 else "ROC (OvR)"))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_km(times: np.ndarray, censored: np.ndarray, risk: np.ndarray, path: str,
            title: str = "Kaplan-Meier by predicted risk (test folds pooled)") -> None:
    """Kaplan-Meier curves of the low- and high-risk halves (split at the median risk)."""
    times, risk = np.asarray(times), np.asarray(risk)
    events = ~np.asarray(censored).astype(bool)
    high = risk > np.median(risk)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, sel, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if sel.any():
            t, s = kaplan_meier(times[sel], events[sel])
            ax.step(np.r_[t, times[sel].max()], np.r_[s, s[-1]], where="post", color=color,
                    label=f"{name} (n={int(sel.sum())})")
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
