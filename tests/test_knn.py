"""JAX KNN protocols vs scikit-learn and a numpy DINO-KNN."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from hipt_jax.evaluation import knn, metrics


@pytest.mark.parametrize("n_classes", [2, 3])
def test_euclidean_knn_matches_sklearn_predictions_probs_and_auc(n_classes):
    rng = np.random.default_rng(n_classes)
    train_x, test_x = rng.normal(size=(120, 16)), rng.normal(size=(70, 16))
    train_y = rng.integers(0, n_classes, 120)
    test_y = rng.integers(0, n_classes, 70)
    ref = KNeighborsClassifier(n_neighbors=5).fit(train_x, train_y)
    probs = knn.knn_euclidean(train_x, train_y, test_x, k=5, n_classes=n_classes)
    np.testing.assert_allclose(probs, ref.predict_proba(test_x), atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(1), ref.predict(test_x))
    want = (roc_auc_score(test_y, ref.predict_proba(test_x)[:, 1]) if n_classes == 2 else
            roc_auc_score(test_y, ref.predict_proba(test_x), multi_class="ovr"))
    assert metrics.auc(test_y, probs) == pytest.approx(want, abs=1e-9)


def test_cosine_weighted_knn_matches_numpy_dino_formula():
    rng = np.random.default_rng(7)
    train_x, test_x = rng.normal(size=(300, 32)), rng.normal(size=(2100, 32))  # > one query chunk
    train_y = rng.integers(0, 4, 300)
    got = knn.knn_cosine_weighted(train_x, train_y, test_x, k=20, temperature=0.07, n_classes=4)
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = te @ tr.T
    idx = np.argsort(-sim, axis=1)[:, :20]
    w = np.exp(np.take_along_axis(sim, idx, 1) / 0.07)
    votes = np.zeros((len(te), 4))
    for c in range(4):
        votes[:, c] = (w * (train_y[idx] == c)).sum(1)
    np.testing.assert_allclose(got, votes / votes.sum(1, keepdims=True), atol=2e-4)
    np.testing.assert_array_equal(got.argmax(1), votes.argmax(1))


def test_k_larger_than_the_train_set_is_refused():
    """A k above the training-set size is an error naming both, never a silently smaller k
    reported under the k asked for. Plant: k = min(k, len(train_x)) -> no error, fails."""
    with pytest.raises(ValueError, match=r"k=5: .*\(3\)"):
        knn.knn_euclidean(np.eye(3), [0, 1, 1], np.eye(3), k=5, n_classes=2)
    with pytest.raises(ValueError, match="k=0"):
        knn.knn_cosine_weighted(np.eye(3), [0, 1, 1], np.eye(3), k=0, n_classes=2)


def _dino_float64(train_x, train_y, test_x, k, temperature, n_classes):
    """DINO's vote in float64 with the row maximum subtracted (stable neighbour order)."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = te @ tr.T
    out = np.zeros((len(te), n_classes))
    for q in range(len(te)):
        i = np.argsort(-sim[q], kind="stable")[:k]
        np.add.at(out[q], train_y[i], np.exp((sim[q, i] - sim[q, i].max()) / temperature))
    return out / out.sum(1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.001, 0.005, 0.012])
def test_dino_vote_at_small_temperatures_matches_a_float64_reference(temperature):
    """exp(sim / T) overflows float32 below T ~ 0.011 (NaN scores) and, just above, float32
    rounds the vote shares to exactly 0 / 1 (tied scores, another AUC).
    Plants: exp(top_sim / T) in float32 as before -> NaN at 0.005, AUC differs at 0.012;
    the row maximum not subtracted (float64 votes kept) -> NaN at 0.001 -> fails."""
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(40, 8)), rng.normal(size=(30, 8))
    train_y, test_y = np.arange(40) % 2, np.arange(30) % 2
    got = knn.knn_cosine_weighted(train_x, train_y, test_x, k=20, temperature=temperature, n_classes=2)
    want = _dino_float64(train_x, train_y, test_x, 20, temperature, 2)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)
    assert metrics.auc(test_y, got) == roc_auc_score(test_y, want[:, 1])


def test_euclidean_neighbours_match_sklearn_with_a_large_common_offset():
    """Embeddings 100x further from the origin than from each other (a common offset, as CLS
    features have): the float32 expansion 2 q.t - |t|^2 cancels the digits that order the
    neighbours unless the inputs are centred first (measured: 2.8% of rows voted wrong).
    Plant: the centring on the train mean removed -> fails."""
    rng = np.random.default_rng(1)
    d = 192
    for _ in range(3):
        base = rng.normal(size=(1, d))
        base *= 100 / np.linalg.norm(base)
        train_x = (base + rng.normal(size=(300, d)) / np.sqrt(d)).astype(np.float32)
        test_x = (base + rng.normal(size=(100, d)) / np.sqrt(d)).astype(np.float32)
        train_y = rng.integers(0, 2, 300)
        ref = KNeighborsClassifier(5).fit(train_x.astype(np.float64), train_y)
        np.testing.assert_array_equal(knn.knn_euclidean(train_x, train_y, test_x, k=5, n_classes=2),
                                      ref.predict_proba(test_x.astype(np.float64)))


def test_cosine_knn_is_not_centred():
    """Cosine similarity is not translation invariant: the Euclidean centring must not reach
    it. Plant: the train-mean centring applied to cosine too -> fails."""
    rng = np.random.default_rng(2)
    offset = 3.0 * rng.normal(size=(1, 16))
    train_x, test_x = offset + rng.normal(size=(60, 16)), offset + rng.normal(size=(40, 16))
    train_y = rng.integers(0, 3, 60)
    got = knn.knn_cosine_weighted(train_x, train_y, test_x, k=10, temperature=0.07, n_classes=3)
    np.testing.assert_allclose(got, _dino_float64(train_x, train_y, test_x, 10, 0.07, 3), atol=1e-5)


def test_similarity_matmuls_run_at_highest_precision():
    """At JAX's default precision a TPU multiplies in bfloat16 (a GPU in TF32), which reorders
    near neighbours; CPU results cannot show it, the compiled program can.
    Plant: precision=HIGHEST dropped from the similarity matmul -> fails."""
    import jax

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    x = np.zeros((4, 8), np.float32)
    for metric in ("euclidean", "cosine"):
        found = list(dots(jax.make_jaxpr(lambda a, b: knn._knn_chunk(a, b, k=2, metric=metric))(x, x).jaxpr))
        assert found, metric
        for eqn in found:
            assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, (metric, eqn.params)
