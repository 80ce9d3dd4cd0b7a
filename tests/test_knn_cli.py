"""hipt-knn command line: CLAM split files, table + JSON output, clear errors."""
import json
import os

import numpy as np

from hipt_jax.cli import knn as knn_cli
from tests.synthetic_cohort import make_feature_cohort, write_labels


def test_cli_with_clam_splits_writes_table_and_json(tmp_path, capsys):
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 30, n_classes=3, signal=2.0, seed=0)
    ids = [f"slide_{i:04d}" for i in range(30)]
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": s, "label": "abc"[c]} for s, c in zip(ids, classes)]
                          + [{"slide_id": "not_extracted", "label": "a"}])
    splits = tmp_path / "splits"
    splits.mkdir()
    for k in range(2):
        test = ids[k * 10:(k + 1) * 10]
        train = [s for s in ids if s not in test]
        rows = [",train,val,test"] + [f"{i},{train[i]},,{test[i] if i < len(test) else ''}" for i in range(len(train))]
        (splits / f"splits_{k}.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "knn.json")
    assert knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", str(splits), "--out", out]) == 0
    printed = capsys.readouterr()
    assert "paper (k=5, Euclidean)" in printed.out and "+/-" in printed.out
    assert "not_extracted" in printed.err
    result = json.load(open(out))
    assert [r["n_test"] for r in result["folds"]["paper"]] == [10, 10]
    assert result["class_names"] == ["a", "b", "c"]
    assert result["summary"]["paper"]["auc"]["mean"] > 0.9
    assert np.isclose(result["summary"]["dino"]["acc"]["mean"],
                      np.mean([r["acc"] for r in result["folds"]["dino"]]))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert knn_cli.main(["--embeddings", str(tmp_path), "--labels", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "x.csv: labels file not found" in err and len(err.strip().splitlines()) == 1
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": "a", "label": 0}, {"slide_id": "b", "label": 1}])
    assert knn_cli.main(["--embeddings", str(tmp_path), "--labels", labels]) == 2
    assert "run hipt-extract first" in capsys.readouterr().err
    assert os.path.exists(labels)
