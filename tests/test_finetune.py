"""End to end on small synthetic cohorts with a learnable signal: tissue images -> extraction ->
KNN and HIPT-LGP subtyping (AUC > 0.9); survival with class-dependent times (c-index > 0.7); and
shuffled labels giving chance-level results (a leak between folds would not)."""
import json
import os

import numpy as np
import pytest

from configs import lgp_subtyping, lgp_survival
from hipt_jax.evaluation import extract, knn_cli
from hipt_jax.finetune import main as finetune
from hipt_jax.models.hipt4k import HIPT4K
from tests.synthetic_cohort import make_feature_cohort, make_tissue_cohort, write_labels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tissue_embeddings(tmp_path_factory):
    """24 slides of stain-perturbed real tissue (2 classes), extracted with a tiny random HIPT."""
    root = str(tmp_path_factory.mktemp("tissue"))
    prep, rows = make_tissue_cohort(root, n_per_class=12, regions=(1, 2), size=512, seed=1)
    emb = os.path.join(root, "emb")
    extract.extract_cohort(HIPT4K.random_init(seed=0, tiny=True), prep, emb, batch_per_device=2,
                           show_progress=False)
    return emb, write_labels(os.path.join(root, "labels.csv"), rows), rows


def _subtyping_config(emb, labels, splits="kfold:3", epochs=3):
    c = lgp_subtyping.get_config("runlocal")
    c.data.embeddings, c.data.labels, c.data.splits = emb, labels, splits
    c.optim.epochs = epochs
    return c


def test_knn_and_lgp_subtyping_learn_stain_classes_from_tissue(tissue_embeddings, tmp_path):
    emb, labels, rows = tissue_embeddings
    result = knn_cli.run(emb, labels, "kfold:3", seed=0)
    assert result["n_slides"] == 24
    assert result["summary"]["paper"]["auc"]["mean"] > 0.9, result["summary"]
    assert result["summary"]["dino"]["auc"]["mean"] > 0.9, result["summary"]
    res = finetune.run(_subtyping_config(emb, labels, epochs=4), str(tmp_path / "run"), show_progress=False)
    assert res["summary"]["auc"]["mean"] > 0.9, res["folds"]
    assert os.path.isfile(tmp_path / "run" / "roc.png")
    assert os.path.isdir(tmp_path / "run" / "fold_0" / "checkpoint")
    assert "mean +/- std" in (tmp_path / "run" / "results.md").read_text()


def test_shuffled_labels_give_chance_level(tmp_path):
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 180, signal=0.5, seed=3)
    rng = np.random.default_rng(0)
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"slide_{i:04d}", "label": int(c)} for i, c in enumerate(classes)])
    shuffled = write_labels(str(tmp_path / "shuffled.csv"),
                            [{"slide_id": f"slide_{i:04d}", "label": int(c)}
                             for i, c in enumerate(rng.permutation(classes))])
    real = knn_cli.run(emb, labels, "kfold:3", seed=0)["summary"]
    fake = knn_cli.run(emb, shuffled, "kfold:3", seed=0)["summary"]
    assert real["paper"]["auc"]["mean"] > 0.9
    assert abs(fake["paper"]["auc"]["mean"] - 0.5) < 0.12 and abs(fake["dino"]["auc"]["mean"] - 0.5) < 0.12
    lgp_real = finetune.run(_subtyping_config(emb, labels, epochs=2), str(tmp_path / "r"), show_progress=False)
    lgp_fake = finetune.run(_subtyping_config(emb, shuffled, epochs=2), str(tmp_path / "f"), show_progress=False)
    assert lgp_real["summary"]["auc"]["mean"] > 0.9
    assert abs(lgp_fake["summary"]["auc"]["mean"] - 0.5) < 0.12, lgp_fake["folds"]


def _survival_rows(classes, rng, shuffle=False):
    """Class 1 dies early, class 0 late; ~30 % censored; 2 slides for some patients."""
    times = np.where(classes == 1, rng.uniform(2, 20, len(classes)), rng.uniform(15, 60, len(classes)))
    cens = rng.random(len(classes)) < 0.3
    if shuffle:
        order = rng.permutation(len(classes))
        times, cens = times[order], cens[order]
    # Slides 2k and 2k+1 of the same class share a patient when both are even-indexed pairs.
    return [{"slide_id": f"slide_{i:04d}", "case_id": f"case_{i // 2 if i < 40 else i:04d}",
             "survival_months": f"{times[i - i % 2 if i < 40 else i]:.3f}",
             "censorship": int(cens[i - i % 2 if i < 40 else i])} for i in range(len(classes))]


def test_survival_cindex_learns_class_dependent_times_and_not_shuffled(tmp_path):
    emb = str(tmp_path / "emb")
    n = 160
    classes = make_feature_cohort(emb, n, signal=0.5, seed=4)
    # Patients of the first 40 slides own 2 slides of the same class: make pairs share a class.
    classes[1:40:2] = classes[0:40:2]
    make_feature_cohort_pairs = {f"slide_{i:04d}" for i in range(40)}  # noqa: F841 (documentation)
    from tests.synthetic_cohort import write_embedding

    rng = np.random.default_rng(5)
    directions = np.random.default_rng(4).normal(size=(2, 384)).astype(np.float32)
    for i in range(1, 40, 2):  # rewrite odd slides so their features match their (new) class
        write_embedding(emb, f"slide_{i:04d}",
                        rng.normal(size=(3, 4, 384)).astype(np.float32) + 0.5 * directions[classes[i]])
    results = {}
    for name, shuffle in (("real", False), ("shuffled", True)):
        rows = _survival_rows(classes, np.random.default_rng(6), shuffle)
        labels = write_labels(str(tmp_path / f"{name}.csv"), rows)
        c = lgp_survival.get_config("runlocal")
        c.data.embeddings, c.data.labels, c.data.splits = emb, labels, "kfold:3"
        c.optim.epochs = 4
        results[name] = finetune.run(c, str(tmp_path / name), show_progress=False)
    assert results["real"]["n_items"] == n - 20  # 20 patients with 2 slides each
    assert results["real"]["summary"]["c_index"]["mean"] > 0.7, results["real"]["folds"]
    assert abs(results["shuffled"]["summary"]["c_index"]["mean"] - 0.5) < 0.12, results["shuffled"]["folds"]
    assert os.path.isfile(tmp_path / "real" / "km.png")
    fold = json.load(open(tmp_path / "real" / "fold_0" / "result.json"))
    assert len(fold["predictions"]["risk"]) == fold["n_test"]
