"""Survival pieces: NLL loss vs a direct numpy evaluation, quartile bins, risk, Kaplan-Meier."""
import jax.numpy as jnp
import numpy as np
import pytest

from hipt_jax.finetune import survival


def _numpy_nll(logits, y, c, alpha, eps=1e-7):
    """The formula written out per patient with python loops (MCAT's NLL survival loss)."""
    total = 0.0
    for lg, yi, ci in zip(logits, y, c):
        h = 1.0 / (1.0 + np.exp(-lg.astype(np.float64)))
        s = np.cumprod(1.0 - h)
        s_prev = 1.0 if yi == 0 else s[yi - 1]
        unc = -(np.log(max(s_prev, eps)) + np.log(max(h[yi], eps)))
        cen = -np.log(max(s[yi], eps))
        l_unc, l_cen = (0.0, cen) if ci else (unc, 0.0)
        total += (1 - alpha) * (l_unc + l_cen) + alpha * l_unc
    return total / len(y)


@pytest.mark.parametrize("alpha", [0.0, 0.15, 1.0])
def test_nll_loss_equals_numpy_formula(alpha):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(64, 4)).astype(np.float32)
    logits[0] = [30, 30, 30, 30]  # saturated hazards exercise the eps clamp
    y = rng.integers(0, 4, 64)
    c = rng.random(64) < 0.4
    got = survival.nll_survival_loss(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(c), alpha)
    assert float(got) == pytest.approx(_numpy_nll(logits, y, c, alpha), rel=1e-5)


def test_quartile_bins_from_uncensored_with_widened_edges():
    rng = np.random.default_rng(1)
    times = rng.exponential(30.0, 200)
    cens = rng.random(200) < 0.5
    bins, edges = survival.quartile_bins(times, cens, 4)
    inner = np.quantile(times[~cens], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(edges[1:4], inner)
    assert edges[0] < times.min() and edges[-1] > times.max()
    for t, b in zip(times, bins):
        assert edges[b] <= t < edges[b + 1]
    counts = np.bincount(bins[~cens], minlength=4)  # uncensored patients split ~evenly
    assert counts.min() >= 20


def test_risk_is_minus_sum_of_survival_and_orders_hazards():
    logits = jnp.array([[-3.0, -3.0, -3.0, -3.0], [3.0, 3.0, 3.0, 3.0]])
    h = 1 / (1 + np.exp(-np.asarray(logits)))
    want = -np.cumprod(1 - h, axis=1).sum(1)
    np.testing.assert_allclose(np.asarray(survival.risk_score(logits)), want, rtol=1e-6)
    assert want[1] > want[0]  # high hazard = high risk


def test_kaplan_meier_hand_example():
    times = np.array([1, 2, 2, 3, 4, 5.0])
    events = np.array([1, 1, 0, 1, 0, 1], bool)
    t, s = survival.kaplan_meier(times, events)
    np.testing.assert_allclose(t, [0, 1, 2, 3, 5])
    np.testing.assert_allclose(s, [1, 5 / 6, 5 / 6 * 4 / 5, 5 / 6 * 4 / 5 * 2 / 3, 0.0])
