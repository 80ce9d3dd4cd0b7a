"""Pictures of an evaluation: a 2-D map of the embeddings colored by class (t-SNE from
scikit-learn, or UMAP when the ``umap-learn`` package is installed) and a confusion matrix."""
from __future__ import annotations

import contextlib
import sys
import warnings

import numpy as np


@contextlib.contextmanager
def _glyph_warnings_as_one_line(path: str):
    """Class names in a script the font lacks (CJK with matplotlib's DejaVu Sans) gave one
    "Glyph ... missing from font" warning per character and draw: ~10 lines of noise on stderr
    per picture. They become one line; other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = set()
    for w in caught:
        text = str(w.message)
        if text.startswith("Glyph ") and "missing from" in text:
            missing.add(text.split()[1])  # "Glyph 33136 (...) missing from font(s) ..."
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        print(f"{path}: the plot font has no glyph for {len(missing)} character(s) of the class names "
              "(drawn as boxes)", file=sys.stderr)


def embedding_2d(x: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """[N,D] -> ([N,2], method used). ``auto``: UMAP if importable, else t-SNE."""
    x = np.asarray(x, np.float32)
    if method in ("auto", "umap"):
        try:
            import umap  # optional

            return umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
        except ImportError:
            if method == "umap":
                raise ValueError("--plot-method umap needs the umap-learn package") from None
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    method = "exact" if len(x) <= 500 else "barnes_hut"  # exact is faster on small sets
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed, method=method,
                max_iter=500).fit_transform(x), "t-SNE"


def plot_embedding(x: np.ndarray, labels: np.ndarray, class_names: list[str], path: str,
                   title: str = "", seed: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy, method = embedding_2d(x, seed)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    with _glyph_warnings_as_one_line(path):
        for k, name in enumerate(class_names):
            m = labels == k
            ax.scatter(xy[m, 0], xy[m, 1], s=8, label=f"{name} ({int(m.sum())})", alpha=0.8)
        ax.legend(markerscale=2, fontsize=8)
        ax.set_title(f"{title} ({method})".strip())
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names: list[str], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    with _glyph_warnings_as_one_line(path):
        ax.imshow(cm, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
