"""K-nearest-neighbour slide classifiers in JAX (the paper's k=5 Euclidean KNN and DINO's weighted cosine KNN).

Two protocols on slide embeddings (mean CLS-4K per slide):
- ``knn_euclidean``: the HIPT paper's plain KNN (k=5, Euclidean, uniform votes, no feature
  normalization), identical to scikit-learn's ``KNeighborsClassifier(n_neighbors=5)``.
- ``knn_cosine_weighted``: DINO's evaluation KNN (k=20, L2-normalized features, cosine similarity,
  votes weighted by exp(sim / T), T = 0.07).

Both return class scores [N_test, K] that sum to 1 per row (vote fractions), so the same AUC code
serves both; predictions are the argmax (lowest class index on ties, like scikit-learn).
Queries are processed in fixed-size chunks by one jitted function, so cohorts of any size run in
bounded memory without recompiling per chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_QUERY_CHUNK = 1024


@functools.partial(jax.jit, static_argnames=("k", "n_classes", "metric", "temperature"))
def _knn_chunk(train_x, train_y, query_x, *, k, n_classes, metric, temperature):
    """Votes [Q,K] of one query chunk against the whole train set."""
    if metric == "euclidean":
        # Squared distances via the expansion |q|^2 - 2 q.t + |t|^2 ([Q,N]); the neighbour order
        # only needs the relative values, so |q|^2 is dropped.
        sim = 2.0 * query_x @ train_x.T - jnp.sum(train_x**2, axis=1)[None, :]
    else:
        sim = query_x @ train_x.T  # cosine (inputs are L2-normalized)
    top_sim, top_idx = jax.lax.top_k(sim, k)  # [Q,k], largest similarity first
    if metric == "euclidean":
        weights = jnp.ones_like(top_sim)
    else:
        weights = jnp.exp(top_sim / temperature)
    onehot = jax.nn.one_hot(train_y[top_idx], n_classes, dtype=weights.dtype)  # [Q,k,K]
    votes = jnp.einsum("qk,qkc->qc", weights, onehot)
    return votes / votes.sum(axis=1, keepdims=True)


def _run(train_x, train_y, test_x, k, n_classes, metric, temperature=1.0):
    train_x = np.asarray(train_x, np.float32)
    test_x = np.asarray(test_x, np.float32)
    train_y = np.asarray(train_y).astype(np.int32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"expected [N,D] train/test embeddings, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y):
        raise ValueError(f"{len(train_x)} train embeddings but {len(train_y)} labels")
    if n_classes is None:
        n_classes = int(train_y.max()) + 1
    k = min(k, len(train_x))
    if metric == "cosine":
        train_x = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
        test_x = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    n = len(test_x)
    chunk = min(_QUERY_CHUNK, max(n, 1))
    n_pad = -(-n // chunk) * chunk
    # Pad queries to a multiple of the chunk size: one compiled shape for every chunk.
    queries = np.concatenate([test_x, np.zeros((n_pad - n, test_x.shape[1]), np.float32)])
    out = [
        np.asarray(_knn_chunk(train_x, train_y, queries[i : i + chunk], k=k, n_classes=n_classes,
                              metric=metric, temperature=float(temperature)))
        for i in range(0, n_pad, chunk)
    ]
    return np.concatenate(out)[:n]


def knn_euclidean(train_x, train_y, test_x, k: int = 5, n_classes: int | None = None) -> np.ndarray:
    """HIPT paper protocol: uniform votes of the k nearest (Euclidean) train slides -> [N,K]."""
    return _run(train_x, train_y, test_x, k, n_classes, "euclidean")


def knn_cosine_weighted(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                        n_classes: int | None = None) -> np.ndarray:
    """DINO protocol: exp(cos / T)-weighted votes of the k most similar train slides -> [N,K]."""
    return _run(train_x, train_y, test_x, k, n_classes, "cosine", temperature)
