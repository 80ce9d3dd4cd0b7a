"""hipt_jax.evaluation.metrics vs scikit-learn and brute-force definitions."""
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from hipt_jax.evaluation import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.normal(size=200) + y, 1)  # rounding creates many ties
    assert metrics.binary_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_auc_binary_uses_class1_and_multiclass_is_macro_ovr():
    rng = np.random.default_rng(3)
    probs2 = rng.dirichlet(np.ones(2), 150)
    y2 = rng.integers(0, 2, 150)
    assert metrics.auc(y2, probs2) == pytest.approx(roc_auc_score(y2, probs2[:, 1]), abs=1e-12)
    probs4 = rng.dirichlet(np.ones(4), 150)
    y4 = rng.integers(0, 4, 150)
    want = roc_auc_score(y4, probs4, multi_class="ovr", average="macro")
    assert metrics.auc(y4, probs4) == pytest.approx(want, abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(metrics.binary_auc(np.ones(5), np.arange(5.0)))


def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(4)
    y, p = rng.integers(0, 3, 90), rng.integers(0, 3, 90)
    assert metrics.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)


def _brute_force_cindex(times, events, risks):
    num = den = 0.0
    for i in range(len(times)):
        for j in range(len(times)):
            if i == j or not events[i]:
                continue
            if times[i] < times[j] or (times[i] == times[j] and not events[j]):
                den += 1
                num += 1.0 if risks[i] > risks[j] else 0.5 if risks[i] == risks[j] else 0.0
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cindex_equals_brute_force_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    times = rng.integers(1, 15, n).astype(float)  # integer times -> tied times
    events = rng.random(n) < 0.6
    risks = rng.integers(0, 6, n).astype(float)  # few values -> tied risks
    assert metrics.concordance_index(times, events, risks) == pytest.approx(
        _brute_force_cindex(times, events, risks), abs=1e-12)


def test_cindex_perfect_and_reversed():
    times = np.arange(1.0, 11.0)
    events = np.ones(10, bool)
    assert metrics.concordance_index(times, events, -times) == 1.0
    assert metrics.concordance_index(times, events, times) == 0.0


def test_fold_summary_says_when_folds_have_no_value():
    """A fold whose test part holds one class has no AUC: the mean is over the other folds, and
    that is said (stderr line naming the fold; "n of K folds" in the table cell). Plant: the old
    silent NaN drop (no warning, no n/of) -> fails."""
    import io

    from hipt_jax.evaluation.metrics import fold_summary, format_mean_std

    err = io.StringIO()
    s = fold_summary([0.8, float("nan"), 0.6], "test auc", warn_to=err)
    assert (s["n"], s["of"]) == (2, 3) and abs(s["mean"] - 0.7) < 1e-12
    assert "fold(s) [1]" in err.getvalue() and "2 of 3 folds" in err.getvalue()
    assert format_mean_std(s).endswith("(2 of 3 folds)")
    full = fold_summary([0.8, 0.6], warn_to=err)
    assert "folds" not in format_mean_std(full) and err.getvalue().count("\n") == 1
