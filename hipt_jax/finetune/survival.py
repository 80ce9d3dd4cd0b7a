"""Discrete-time survival for HIPT-LGP, as in MCAT / PORPOISE (the recipe HIPT reports).

Time is cut into ``n_bins`` intervals whose inner edges are the quartiles of the UNCENSORED
patients' survival times; the outer edges are widened to the whole cohort's range (min - eps,
max + eps), so every patient falls in a bin. The model outputs one logit per bin:

    hazards h_k = sigmoid(logit_k)          P(event in bin k | survived to bin k)
    S_k = prod_{j<=k} (1 - h_j)             P(surviving past bin k)
    risk = -sum_k S_k                       higher = earlier expected event (for the c-index)

NLL for a patient in bin y (S_{-1} = 1; logs clamped at eps = 1e-7):
    uncensored (event observed in bin y):   l_unc = -(log S_{y-1} + log h_y)
    censored (alive at the end of bin y's start):  l_cen = -log S_y
    loss = (1 - alpha) * (l_unc + l_cen) + alpha * l_unc

``alpha`` (MCAT's ``alpha_surv``) up-weights uncensored patients: alpha = 0 is the plain
likelihood; alpha = 1 ignores censored patients entirely. MCAT's command-line default, and
ours, is 0.0 (its NLLSurvLoss class default of 0.15 is not what its scripts run).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-7


def quartile_bins(times: np.ndarray, censored: np.ndarray, n_bins: int = 4,
                  eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(bin index [N] in 0..n_bins-1, edges [n_bins+1]) as MCAT builds them.

    Inner edges: quantiles (linear interpolation, pandas.qcut's rule) of the uncensored times;
    outer edges: min(times) - eps and max(times) + eps over all patients. Bins are [lo, hi).
    Duplicate quantiles (tied event times) are a ValueError, as pandas.qcut's.
    """
    times = np.asarray(times, np.float64)
    censored = np.asarray(censored).astype(bool)
    uncensored = times[~censored]
    if len(uncensored) < n_bins:
        raise ValueError(f"need at least {n_bins} uncensored patients to make {n_bins} bins, "
                         f"got {len(uncensored)} of {len(times)} (censorship is 1 for a censored "
                         "patient, 0 for an event: a column coded the other way round reads as "
                         "all censored)")
    edges = np.quantile(uncensored, np.linspace(0.0, 1.0, n_bins + 1))
    if np.any(np.diff(edges) <= 0):
        # Tied event times make two quantiles equal: a bin no event falls in. MCAT's pd.qcut
        # refuses these ("Bin edges must be unique"); so do we rather than train on it.
        raise ValueError(f"the {n_bins} time bins cut at the quantiles of the {len(uncensored)} event times have "
                         f"duplicate edges {np.round(edges, 4).tolist()} (tied survival times): use fewer bins "
                         f"(config.train.n_bins, now {n_bins})")
    edges[0], edges[-1] = times.min() - eps, times.max() + eps
    labels = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, n_bins - 1)
    return labels.astype(np.int32), edges


def hazards_and_survival(logits: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits [..., K] -> (hazards [..., K], S [..., K])."""
    hazards = jax.nn.sigmoid(logits)
    return hazards, jnp.cumprod(1.0 - hazards, axis=-1)


def risk_score(logits: jnp.ndarray) -> jnp.ndarray:
    """-sum_k S_k: [..., K] -> [...]."""
    return -hazards_and_survival(logits)[1].sum(axis=-1)


def nll_survival_loss(logits: jnp.ndarray, y: jnp.ndarray, censored: jnp.ndarray,
                      alpha: float = 0.0, eps: float = EPS) -> jnp.ndarray:
    """Mean NLL over a batch: logits [B,K], y int [B] (bin), censored [B] (1 = censored)."""
    hazards, surv = hazards_and_survival(logits.astype(jnp.float32))
    c = censored.astype(jnp.float32)
    s_padded = jnp.concatenate([jnp.ones_like(surv[:, :1]), surv], axis=1)  # [B,K+1], S_{-1} = 1
    y = y.astype(jnp.int32)[:, None]
    s_prev = jnp.take_along_axis(s_padded, y, axis=1)[:, 0]       # S_{y-1}
    s_this = jnp.take_along_axis(s_padded, y + 1, axis=1)[:, 0]   # S_y
    h_this = jnp.take_along_axis(hazards, y, axis=1)[:, 0]
    uncensored = -(1.0 - c) * (jnp.log(jnp.maximum(s_prev, eps)) + jnp.log(jnp.maximum(h_this, eps)))
    censored_l = -c * jnp.log(jnp.maximum(s_this, eps))
    loss = (1.0 - alpha) * (censored_l + uncensored) + alpha * uncensored
    return loss.mean()


def kaplan_meier(times: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: (step times [T+1] starting at 0, survival [T+1] starting at 1)."""
    times = np.asarray(times, np.float64)
    events = np.asarray(events).astype(bool)
    event_times = np.unique(times[events])
    surv, s = [1.0], 1.0
    for t in event_times:
        at_risk = np.sum(times >= t)
        s *= 1.0 - np.sum((times == t) & events) / at_risk
        surv.append(s)
    return np.concatenate([[0.0], event_times]), np.asarray(surv)
