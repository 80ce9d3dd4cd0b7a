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


def test_multiclass_auc_averages_the_classes_present_in_the_test_part():
    """One policy everywhere (hipt-knn, hipt-finetune, hipt-patch-eval): a class absent from a
    test part has no one-vs-rest AUC, so the macro AUC averages the present ones (CLAM's
    nanmean over per-class AUCs); NaN only with fewer than two classes present.
    Plant: the mean over every class -> NaN for the fold, fails."""
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), 60)
    y = rng.choice([0, 1, 3], 60)  # class 2 absent
    per_class = [roc_auc_score(y == k, probs[:, k]) if (y == k).any() else np.nan for k in range(4)]
    assert metrics.auc(y, probs) == pytest.approx(np.nanmean(per_class), abs=1e-12)
    assert metrics.absent_classes(y, 4) == [2]
    assert np.isnan(metrics.auc(np.full(10, 3), probs[:10]))
    from hipt_jax.evaluation import patch_eval
    assert patch_eval.scores_of(probs, y)["auc"] == metrics.auc(y, probs)


def test_fold_std_is_ddof0_and_one_fold_has_no_spread():
    """The std over folds is the population std (ddof=0), as the official CLAM/HIPT code's
    np.std; one fold with a value has no spread: the mean alone, "1 of K folds", never
    "+/- 0.0000". Plants: ddof=1 -> 0.1414 != 0.1, fails; the one-fold cell printed as
    "mean +/- std" -> fails."""
    from hipt_jax.evaluation.metrics import fold_summary, format_mean_std

    assert fold_summary([0.8, 0.6])["std"] == pytest.approx(0.1, abs=1e-12)
    one = fold_summary([0.7, float("nan"), None])
    assert (one["n"], one["of"], one["mean"]) == (1, 3, 0.7) and np.isnan(one["std"])
    assert format_mean_std(one) == "0.7000 (1 of 3 folds)"
    assert format_mean_std(fold_summary([0.7])) == "0.7000 (1 of 1 folds)"


def test_cindex_risks_within_1e_8_are_tied_as_in_sksurv():
    """scikit-survival (which MCAT/HIPT call) counts risks within tied_tol=1e-8 as tied (0.5):
    float noise between two patients' risks must not decide their pair.
    Plant: exact equality for ties -> 1.0 instead of 0.5, fails."""
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    times, events = np.array([1.0, 2.0]), np.array([True, True])
    risks = np.array([0.5, 0.5 + 5e-9])  # the earlier event has the (noise-)lower risk
    assert metrics.concordance_index(times, events, risks) == 0.5
    assert sksurv_metrics.concordance_index_censored(events, times, risks)[0] == 0.5
    rng = np.random.default_rng(6)
    times, events = rng.integers(1, 20, 80).astype(float), rng.random(80) < 0.5
    risks = rng.integers(0, 5, 80) + rng.uniform(-4e-9, 4e-9, 80)
    assert metrics.concordance_index(times, events, risks) == pytest.approx(
        sksurv_metrics.concordance_index_censored(events, times, risks)[0], abs=1e-12)
