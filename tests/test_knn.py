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


def test_k_larger_than_train_set_is_clamped():
    probs = knn.knn_euclidean(np.eye(3), [0, 1, 1], np.eye(3), k=5, n_classes=2)
    np.testing.assert_allclose(probs, np.tile([1 / 3, 2 / 3], (3, 1)), atol=1e-6)
