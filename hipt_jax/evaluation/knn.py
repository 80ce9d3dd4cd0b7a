"""K-nearest-neighbour slide classifiers in JAX (the paper's k=5 Euclidean KNN and DINO's weighted cosine KNN).

Two protocols on slide embeddings (mean CLS-4K per slide):
- ``knn_euclidean``: the HIPT paper's plain KNN (k=5, Euclidean, uniform votes, no feature
  normalization), identical to scikit-learn's ``KNeighborsClassifier(n_neighbors=5)``.
- ``knn_cosine_weighted``: DINO's evaluation KNN (k=20, L2-normalized features, cosine similarity,
  votes weighted by exp(sim / T), T = 0.07).

Both return class scores [N_test, K] that sum to 1 per row (vote fractions), so the same AUC code
serves both; predictions are the argmax (lowest class index on ties, like scikit-learn).
Queries are processed in fixed-size chunks by one jitted function (similarities at full float32
precision and the top k), so cohorts of any size run in bounded memory without recompiling per
chunk; the votes are then counted in float64. Asking for more neighbours than there are training
embeddings is a ValueError (callers cap k themselves and report the k they used).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_QUERY_CHUNK = 1024


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _knn_chunk(train_x, query_x, *, k, metric):
    """(similarities [Q,k], train indices [Q,k]) of the k nearest train items of one query chunk."""
    # HIGHEST: at the default precision TPUs multiply in bfloat16 and GPUs in TF32, which
    # reorders near neighbours; the vote must not depend on the accelerator.
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    if metric == "euclidean":
        # Squared distances via the expansion |q|^2 - 2 q.t + |t|^2 ([Q,N]); the neighbour order
        # only needs the relative values, so |q|^2 is dropped. The inputs are centred on the
        # train mean (_run): otherwise a large common offset makes 2 q.t and |t|^2 nearly equal
        # and their float32 difference loses the digits that order the neighbours.
        sim = 2.0 * dot(query_x, train_x.T) - jnp.sum(train_x**2, axis=1)[None, :]
    else:
        sim = dot(query_x, train_x.T)  # cosine (inputs are L2-normalized)
    return jax.lax.top_k(sim, k)  # [Q,k] each, largest similarity first


def _votes(top_sim: np.ndarray, top_idx: np.ndarray, train_y: np.ndarray, n_classes: int, metric: str,
           temperature: float) -> np.ndarray:
    """Vote fractions [Q,K] in float64: near the extremes float32 rounds 1 - 1e-9 to 1, so small
    temperatures would tie queries that the weights tell apart."""
    top_sim = top_sim.astype(np.float64)
    if metric == "euclidean":
        weights = np.ones_like(top_sim)
    else:
        # Shifted by the row's largest similarity: the same fractions, but exp(sim / T) itself
        # overflows float32 below T ~ 0.011 (NaN votes) and loses the smaller weights' share
        # near T ~ 0.02.
        weights = np.exp((top_sim - top_sim[:, :1]) / temperature)
    votes = np.zeros((len(top_sim), n_classes))
    rows = np.broadcast_to(np.arange(len(top_sim))[:, None], top_idx.shape)
    np.add.at(votes, (rows, train_y[top_idx]), weights)
    return votes / votes.sum(axis=1, keepdims=True)


def _run(train_x, train_y, test_x, k, n_classes, metric, temperature=1.0):
    train_x = np.asarray(train_x, np.float64)
    test_x = np.asarray(test_x, np.float64)
    train_y = np.asarray(train_y).astype(np.int32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"expected [N,D] train/test embeddings, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y):
        raise ValueError(f"{len(train_x)} train embeddings but {len(train_y)} labels")
    if not 1 <= k <= len(train_x):
        # A silently smaller k would be reported under the k asked for.
        raise ValueError(f"k={k}: must be between 1 and the number of training embeddings ({len(train_x)})")
    if n_classes is None:
        n_classes = int(train_y.max()) + 1
    if metric == "cosine":
        # Not centred: cosine similarity depends on where the origin is.
        train_x = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
        test_x = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    else:
        # Distances are translation invariant; centring removes the common offset before the
        # float32 expansion (in float64, before the cast).
        mean = train_x.mean(axis=0, keepdims=True)
        train_x, test_x = train_x - mean, test_x - mean
    train_x, test_x = train_x.astype(np.float32), test_x.astype(np.float32)
    n = len(test_x)
    chunk = min(_QUERY_CHUNK, max(n, 1))
    n_pad = -(-n // chunk) * chunk
    # Pad queries to a multiple of the chunk size: one compiled shape for every chunk.
    queries = np.concatenate([test_x, np.zeros((n_pad - n, test_x.shape[1]), np.float32)])
    out = []
    for i in range(0, n_pad, chunk):
        top_sim, top_idx = jax.device_get(_knn_chunk(train_x, queries[i : i + chunk], k=k, metric=metric))
        out.append(_votes(top_sim, top_idx, train_y, n_classes, metric, float(temperature)))
    return np.concatenate(out)[:n]


def knn_euclidean(train_x, train_y, test_x, k: int = 5, n_classes: int | None = None) -> np.ndarray:
    """HIPT paper protocol: uniform votes of the k nearest (Euclidean) train slides -> [N,K]."""
    return _run(train_x, train_y, test_x, k, n_classes, "euclidean")


def knn_cosine_weighted(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                        n_classes: int | None = None) -> np.ndarray:
    """DINO protocol: exp(cos / T)-weighted votes of the k most similar train slides -> [N,K]."""
    return _run(train_x, train_y, test_x, k, n_classes, "cosine", temperature)
