"""hipt-knn --embedding: the slide-KNN baselines on one cohort shaped like the demo's (8 slides,
2 classes, kfold:4), one table, label fraction, plots, and `wsi` on bags without its pass."""
import json
import os

import numpy as np

from data_prep.bags import read_bag
from hipt_jax.cli import knn as knn_cli
from hipt_jax.evaluation import slide_embeddings
from tests.synthetic_cohort import make_feature_cohort, write_labels


def _cohort(tmp_path, n=8):
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, n, n_classes=2, signal=2.0, seed=0)
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"slide_{i:04d}", "label": "ab"[c]} for i, c in enumerate(classes)])
    return emb, labels


def test_every_baseline_writes_its_row_in_one_table(tmp_path, capsys):
    """(Plant: cls256_mean averaging only the first region -> the value check fails; dropping a
    name from the registry -> the row count fails.)"""
    emb, labels = _cohort(tmp_path)
    out = str(tmp_path / "knn.json")
    argv = ["--embeddings", emb, "--labels", labels, "--splits", "kfold:4", "--k", "3", "--out", out]
    assert knn_cli.main(argv + ["--embedding", "all", "--label-fraction", "0.5"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| cls") or line.startswith("| mean")]
    assert len(rows) == 6, table  # 3 embeddings x 2 protocols
    assert {r.split("|")[1].strip() for r in rows} == {"cls4k_mean", "cls256_mean", "mean256_cls4k"}
    assert {r.split("|")[2].strip() for r in rows} == {"192", "384", "576"}
    result = json.load(open(out))
    assert result["embedding"] == "cls4k_mean" and "paper" in result["summary"]  # old layout kept
    assert set(result["baselines"]) == {"cls4k_mean", "cls256_mean", "mean256_cls4k"}
    assert result["params"]["label_fraction"] == 0.5
    assert all(r["n_train"] == 4 for r in result["folds"]["paper"])  # 6 train slides (3 per class) -> 2 per class
    assert result["baselines"]["cls256_mean"]["summary"]["paper"]["auc"]["mean"] > 0.9
    assert knn_cli.main(argv + ["--embedding", "cls256_mean", "--plot"]) == 0
    assert os.path.getsize(str(tmp_path / "knn_cls256_mean_map.png")) > 1000
    assert os.path.isfile(str(tmp_path / "knn_cls256_mean_confusion_dino.png"))
    bag = read_bag(emb, "slide_0003")
    got = slide_embeddings.read(emb, "cls256_mean")["slide_0003"]
    np.testing.assert_allclose(got, bag["features_cls256"].mean(axis=(0, 1)), rtol=1e-6)
    got = slide_embeddings.read(emb, "mean256_cls4k")["slide_0003"]
    assert got.shape == (576,)
    np.testing.assert_allclose(got[:384], bag["features_cls256"].mean(axis=1).mean(0), rtol=1e-6)


def test_wsi_without_its_pass_and_unknown_names_fail(tmp_path, capsys):
    emb, labels = _cohort(tmp_path)
    argv = ["--embeddings", emb, "--labels", labels, "--splits", "kfold:4"]
    assert knn_cli.main(argv + ["--embedding", "wsi"]) == 2  # bags without slide_embedding_wsi
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hipt-extract --vitwsi" in err[0]
    assert knn_cli.main(argv + ["--embedding", "cls4k_mean,nope"]) == 2
    assert "nope: unknown" in capsys.readouterr().err


def test_plots_use_the_evaluated_label_column_and_class_order(tmp_path, monkeypatch):
    """--plot drew from the labels re-read with defaults: --label-column failed after all the
    work (no 'label' column) and --classes b,a put class 0 under the name 'a'. Plant: the
    default re-read -> exit 2 here, fails."""
    from hipt_jax.evaluation import knn_eval

    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 8, n_classes=2, signal=2.0, seed=0)
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"slide_{i:04d}", "subtype": "ab"[c]} for i, c in enumerate(classes)])
    seen = []
    monkeypatch.setattr(knn_eval, "write_plots", lambda r, coh, *a, **k: seen.append(coh.class_names) or [])
    argv = ["--embeddings", emb, "--labels", labels, "--splits", "kfold:4", "--k", "3", "--out",
            str(tmp_path / "knn.json"), "--label-column", "subtype", "--classes", "b,a", "--plot"]
    assert knn_cli.main(argv) == 0
    assert seen == [["b", "a"]]


def test_bags_without_a_label_row_are_named(tmp_path, capsys):
    """Slides extracted but absent from the labels were left out without a word (only
    n_slides showed it). Plant: no unlabelled list -> no line, fails."""
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 8, n_classes=2, signal=2.0, seed=0)
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"slide_{i:04d}", "label": "ab"[c]} for i, c in enumerate(classes) if i < 6])
    out = str(tmp_path / "knn.json")
    assert knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", "kfold:3", "--k", "3",
                         "--out", out]) == 0
    assert "2 slide(s) in" in capsys.readouterr().err
    assert json.load(open(out))["unlabelled_slides"] == ["slide_0006", "slide_0007"]
