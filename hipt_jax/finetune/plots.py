"""Result figures of hipt-finetune / hipt-knn: ROC curves per fold and Kaplan-Meier by risk group."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hipt_jax.finetune.survival import kaplan_meier  # noqa: E402


def roc_curves(folds: list[dict], class_names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """The curves ``plot_roc`` draws: {legend label: (fpr, tpr, auc)} from scikit-learn's
    ``roc_curve``. Binary: one curve per fold (class 1 against class 0). Multi-class: one
    one-vs-rest curve per class on the test predictions of all folds pooled."""
    from sklearn.metrics import roc_auc_score, roc_curve

    curves = {}
    if len(class_names) <= 2:
        for i, f in enumerate(folds):
            labels, probs = np.asarray(f["labels"]), np.asarray(f["probs"])
            if len(np.unique(labels)) == 2:
                fpr, tpr, _ = roc_curve(labels == 1, probs[:, 1])
                curves[f"fold {i} (AUC {f['auc']:.3f})"] = (fpr, tpr, float(f["auc"]))
        return curves
    labels = np.concatenate([np.asarray(f["labels"]) for f in folds])
    probs = np.concatenate([np.asarray(f["probs"]) for f in folds])
    for k, name in enumerate(class_names):
        positive = labels == k
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            auc = float(roc_auc_score(positive, probs[:, k]))
            curves[f"{name} vs rest (AUC {auc:.3f})"] = (fpr, tpr, auc)
    return curves


def plot_roc(folds: list[dict], class_names: list[str], path: str, title: str = "") -> dict:
    """ROC figure (curves: ``roc_curves``). The title gives the macro AUC as reported: the mean
    over folds of each fold's AUC (macro one-vs-rest for more than two classes).

    ``folds``: [{"labels": int [N], "probs": [N,K], "auc": float}, ...]. Returns the curves drawn.
    """
    curves = roc_curves(folds, class_names)
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, _) in curves.items():
        ax.plot(fpr, tpr, lw=1, alpha=0.85, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    aucs = np.array([f["auc"] for f in folds], np.float64)
    macro = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    if not title:
        title = (f"ROC, class {class_names[1]}" if len(class_names) == 2
                 else "ROC one-vs-rest, test folds pooled") + f"\nmacro AUC (mean of folds) {macro:.3f}"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curves


def at_risk_counts(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Patients still at risk (time >= t) at each time of ``at``."""
    times = np.asarray(times, np.float64)
    return np.array([(times >= t).sum() for t in np.asarray(at, np.float64)], int)


def plot_km(times: np.ndarray, censored: np.ndarray, risk: np.ndarray, path: str,
            title: str = "Kaplan-Meier by predicted risk (test folds pooled)") -> dict:
    """Kaplan-Meier curves of the low- and high-risk halves (split at the median risk), the
    log-rank p-value between them (SciPy) and a table of patients at risk under the axis.
    Returns {"logrank_p", "ticks", "at_risk": {group: counts}}."""
    from hipt_jax.evaluation.metrics import logrank_pvalue

    times, risk = np.asarray(times, np.float64), np.asarray(risk)
    events = ~np.asarray(censored).astype(bool)
    high = risk > np.median(risk)
    p = logrank_pvalue(times, events, high)
    ticks = np.linspace(0, times.max(), 5)
    fig, ax = plt.subplots(figsize=(6, 5))
    at_risk = {}
    for name, sel, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if sel.any():
            t, s = kaplan_meier(times[sel], events[sel])
            ax.step(np.r_[t, times[sel].max()], np.r_[s, s[-1]], where="post", color=color,
                    label=f"{name} (n={int(sel.sum())})")
            at_risk[name] = at_risk_counts(times[sel], ticks).tolist()
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), xticks=ticks,
           title=f"{title}\nlog-rank p = {p:.3g}")
    ax.legend()
    rows = [f"{name:>9}: " + "  ".join(f"{c:>4d}" for c in counts) for name, counts in at_risk.items()]
    ax.text(0, -0.15, "at risk\n" + "\n".join(rows), transform=ax.transAxes, family="monospace",
            fontsize=7, va="top")
    fig.subplots_adjust(bottom=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"logrank_p": p, "ticks": ticks.tolist(), "at_risk": at_risk}
