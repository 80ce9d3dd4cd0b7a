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


def test_no_progress_is_accepted_and_cohort_warnings_are_said_once(tmp_path, capsys, monkeypatch):
    """The README lists --no-progress among the shared flags; hipt-knn refused it (exit 2). And
    with several --embedding names the slide-level-folds warning was printed once per name.
    Plants: no add_progress_flag -> exit 2; no flags.progress -> TQDM_DISABLE unset during the
    run; warnings printed by plan_folds -> twice."""
    from hipt_jax.evaluation import knn_eval

    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 8, grid=2, regions=(1, 2))
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": f"slide_{i:04d}", "label": "ab"[c]}
                                                     for i, c in enumerate(classes)])
    seen = []
    real_run = knn_eval.run
    monkeypatch.setattr(knn_eval, "run", lambda *a, **k: seen.append(os.environ.get("TQDM_DISABLE")) or real_run(*a, **k))
    argv = ["--embeddings", emb, "--labels", labels, "--splits", "kfold:2", "--k", "1", "--k-dino", "1",
            "--embedding", "cls4k_mean,cls256_mean", "--out", str(tmp_path / "k.json"), "--no-progress"]
    assert knn_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert seen == ["1", "1"] and err.count("no case_id column, so the generated folds are slide-level") == 1
    result = json.load(open(tmp_path / "k.json"))
    assert result["patients_from"] == "unknown" and len(result["fold_warnings"]) == 1


def test_labels_keyed_by_tcga_case_ids_get_a_hint(tmp_path, capsys):
    """'none of its slides are in EMB' gave no clue that the slide_id column held patient ids.
    Plant: the hint left out of knn_eval.run's error -> fails."""
    emb = str(tmp_path / "emb")
    make_feature_cohort(emb, 2, grid=2, regions=(1, 1))
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": "TCGA-A1-A0SB", "label": "a"},
                                                     {"slide_id": "TCGA-A2-A0CM", "label": "b"}])
    assert knn_cli.main(["--embeddings", emb, "--labels", labels, "--out", str(tmp_path / "k.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none of its slides are in" in err and "look like TCGA case (patient) ids" in err
    assert len(err.splitlines()) == 1


def _small_cohort(tmp_path):
    """8 extracted slides (marked as hipt-extract's folder by a manifest) and their labels."""
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 8, grid=2, regions=(1, 2))
    with open(os.path.join(emb, "manifest.json"), "w") as f:
        json.dump({"schema": "hipt.embeddings.v1", "slides": {}}, f)
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": f"slide_{i:04d}", "label": "ab"[c]}
                                                     for i, c in enumerate(classes)])
    return emb, labels, ["--embeddings", emb, "--labels", labels, "--splits", "kfold:2", "--k", "1", "--k-dino", "1"]


def test_default_k_is_capped_at_a_small_training_set_and_said(tmp_path, capsys):
    """--label-frac on a small cohort leaves training sets of a few slides: the run was refused
    with '--k 5: must be between 1 and the smallest training set', naming a flag never given.
    A default k is capped and said (stderr and k_note); a --k given too large is still refused.
    Plant: cli --k default=5 again -> refused, fails."""
    emb, labels, argv = _small_cohort(tmp_path)
    base = argv[:-4] + ["--label-frac", "0.5", "--out", str(tmp_path / "k.json")]  # 2 training slides
    assert knn_cli.main(base) == 0
    err = capsys.readouterr().err
    result = json.load(open(tmp_path / "k.json"))
    note = "the smallest training set has 2 slides (fold 0): using --k 2 (default 5), --k-dino 2 (default 20)"
    assert f"hipt-knn: {note}\n" in err and result["k_note"] == note
    assert (result["params"]["k_paper"], result["params"]["k_dino"]) == (2, 2)
    assert knn_cli.main(base + ["--k", "5"]) == 2
    assert "--k 5: must be between 1 and the smallest training set (2 slides" in capsys.readouterr().err


def test_out_never_replaces_an_input_or_another_commands_file(tmp_path, capsys):
    """--out replaced anything, exit 0: the labels CSV, a split file it read, a fine-tuning run's
    results.json (hipt-predict then failed on the run), the embeddings manifest, and a JSON named
    .npz among the bags (every later command: "corrupt bag"). Each is refused in one line naming
    the path, nothing is written; a rerun with the same --out (and the default one) still works.
    Plant: no _check_targets -> exit 0 and the file replaced."""
    emb, labels, argv = _small_cohort(tmp_path)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "splits_0.csv").write_text(",train,val,test\n" + "".join(
        f"{i},slide_{i:04d},,slide_{i + 4:04d}\n" for i in range(4)))
    run_dir = tmp_path / "ft"
    (run_dir / "fold_0").mkdir(parents=True)
    (run_dir / "results.json").write_text('{"task": "subtyping", "folds": []}')
    (run_dir / "provenance.json").write_text('{"fingerprint": {}, "details": {"kind": "fine-tuning workdir"}}')
    cases = [(["--out", labels], f"{labels}: is an input of this command (--labels"),
             (["--splits", str(splits), "--out", str(splits / "splits_0.csv")],
              "is an input of this command (--splits"),
             (["--out", str(run_dir / "results.json")], "is the results.json of"),
             (["--out", os.path.join(emb, "manifest.json")], "is the manifest.json of"),
             (["--out", os.path.join(emb, "slides", "x.npz")], "lies inside"),
             (["--out", str(tmp_path / "other.json")], "exists and is not an earlier hipt-knn output")]
    (tmp_path / "other.json").write_text('{"someone": "else"}')
    for extra, needle in cases:
        target = extra[-1]
        before = open(target, "rb").read() if os.path.exists(target) else None
        assert knn_cli.main(argv + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and target in err and len(err.splitlines()) == 1, (extra, err)
        assert (open(target, "rb").read() if os.path.exists(target) else None) == before
    # A folder of the user's own inside the embeddings folder is not one of its item folders,
    # nor is one named like another kind's (EMB/splits/; plants: refuse everything below a
    # managed folder, or one list of item folders for every kind -> exit 2); another tool's
    # manifest.json with an "items" list does not make a hipt-prep folder (plant: the old
    # "items" rule -> "is the results.json of").
    other_tool = tmp_path / "other_tool"
    other_tool.mkdir()
    (other_tool / "manifest.json").write_text('{"version": 1, "items": ["a.svs"]}')
    for out in (["--out", str(tmp_path / "k.json")], [], ["--out", os.path.join(emb, "eval", "k.json")],
                ["--out", str(tmp_path / "k2.json"), "--save-splits", os.path.join(emb, "splits")],
                ["--out", str(other_tool / "results.json")]):
        for _ in range(2):  # a rerun replaces its own results
            assert knn_cli.main(argv + out) == 0
    assert json.load(open(os.path.join(emb, "knn_results.json")))["written_by"] == "hipt-knn"


def test_save_splits_never_mixes_with_another_set(tmp_path, capsys):
    """--save-splits overwrote a folder of published split files (and left a file of theirs
    beside, read with the new ones as one set), exit 0. A folder whose split files differ is
    refused, untouched; the same folds again (a rerun) are fine. Plant: write_clam_splits
    straight into the folder -> exit 0, files replaced."""
    emb, labels, argv = _small_cohort(tmp_path)
    spl = tmp_path / "spl"
    assert knn_cli.main(argv + ["--save-splits", str(spl), "--out", str(tmp_path / "a.json")]) == 0
    saved = {p.name: p.read_bytes() for p in spl.iterdir()}
    assert sorted(saved) == ["splits_0.csv", "splits_1.csv"]
    assert knn_cli.main(argv + ["--save-splits", str(spl), "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    assert knn_cli.main(argv + ["--seed", "3", "--save-splits", str(spl),
                                "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{spl}: already holds a different splits_" in err and len(err.splitlines()) == 1
    (spl / "splits_2.csv").write_text("x\n")  # a third fold of a published 3-fold set
    assert knn_cli.main(argv + ["--save-splits", str(spl), "--out", str(tmp_path / "a.json")]) == 2
    assert "already holds splits_2.csv, which this run would not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in spl.iterdir() if p.name != "splits_2.csv"} == saved
    assert not (tmp_path / "b.json").exists()


def test_a_k_refusal_names_the_unreadable_bags(tmp_path, capsys):
    """3 of 8 bags damaged: the refusal said only "--k 5: must be between 1 and the smallest
    training set", steering the user to change --k; the damaged bags (the reason the training
    sets are small) were never named. Plant: knn_eval.run without its CohortError note -> fails."""
    emb, labels, argv = _small_cohort(tmp_path)
    slides = os.path.join(emb, "slides")
    with open(os.path.join(slides, "slide_0001.npz"), "r+b") as f:
        f.truncate(100)
    open(os.path.join(slides, "slide_0004.npz"), "w").close()
    with open(os.path.join(slides, "slide_0007.npz.sha256"), "w") as f:
        f.write("garbage\n")
    argv = argv[:-4] + ["--k", "4", "--out", str(tmp_path / "k.json")]  # 8 slides, 2 folds: 4 would fit
    assert knn_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--k 4: must be between 1 and the smallest training set" in err[0]
    assert "3 slide file(s)" in err[0] and "slide_0001, slide_0004, slide_0007" in err[0], err[0]


def _split_file(path, train, val, test):
    parts = (train, val, test)
    rows = [",train,val,test"] + [f"{j}," + ",".join(p[j] if j < len(p) else "" for p in parts)
                                  for j in range(max(map(len, parts)))]
    path.write_text("\n".join(rows) + "\n")


def test_label_fraction_with_fit_on_train_and_val_is_a_fraction_of_both(tmp_path, capsys):
    """--fit-on train+val --label-frac 0.25 fitted on 25% of train plus ALL of val (about half
    the labels) while results.json said 0.25. Per class: train 10 + val 4 = 14 slides ->
    ceil(0.25 * 14) = 4, 8 in all (train alone: ceil(2.5) = 3 per class, 6).
    Plant: the fraction applied to train only (label_frac_parts=("train",)) -> 6 + 8 = 14, fails."""
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 40, grid=2, regions=(1, 2), classes=np.arange(40) % 2)
    ids = [f"slide_{i:04d}" for i in range(40)]
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": s, "label": "ab"[c]} for s, c in zip(ids, classes)])
    (tmp_path / "splits").mkdir()
    _split_file(tmp_path / "splits" / "splits_0.csv", ids[:20], ids[20:28], ids[28:])
    n_fit = {}
    for fit_on in ("train+val", "train"):
        out = str(tmp_path / f"{fit_on}.json")
        assert knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", str(tmp_path / "splits"),
                             "--fit-on", fit_on, "--label-frac", "0.25", "--k-dino", "3", "--out", out]) == 0
        result = json.load(open(out))
        assert result["params"]["label_fraction"] == 0.25
        n_fit[fit_on] = {r["n_train"] for p in ("paper", "dino") for r in result["folds"][p]}
    assert n_fit == {"train+val": {8}, "train": {6}}


def test_a_class_absent_from_a_test_part_is_named_and_its_auc_kept(tmp_path, capsys):
    """A 3-class fold whose test part has no slide of one class: the macro AUC averages the two
    present (as hipt-patch-eval and CLAM's summary do), the fold names the absent class, and
    the fold counts in the mean. Plants: metrics.auc over every class -> fold AUC NaN (null),
    dropped from the mean, fails; the fold line without its 'hipt-knn:' -> fails."""
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 30, n_classes=3, signal=2.0, grid=2, regions=(1, 2),
                                  classes=np.arange(30) % 3)
    ids = [f"slide_{i:04d}" for i in range(30)]
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": s, "label": "abc"[c]} for s, c in zip(ids, classes)])
    test = [s for s, c in zip(ids, classes) if c != 2][:8]
    (tmp_path / "splits").mkdir()
    _split_file(tmp_path / "splits" / "splits_0.csv", [s for s in ids if s not in test], [], test)
    out = str(tmp_path / "k.json")
    assert knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", str(tmp_path / "splits"),
                         "--out", out]) == 0
    err = capsys.readouterr().err
    fold = json.load(open(out))["folds"]["paper"][0]
    assert fold["auc_absent_classes"] == ["c"] and fold["auc"] > 0.9
    assert "hipt-knn: fold 0: no test slide of class(es) c" in err  # named like every hipt-knn line
    assert json.load(open(out))["summary"]["paper"]["auc"]["n"] == 1


def test_numeric_ids_that_lost_their_leading_zeros_are_refused(tmp_path, capsys):
    """Labels saved through a spreadsheet turn slide ids 001..009 into 1..9: those slides were
    skipped as "not extracted" (and their bags as "unlabelled") and the KNN ran, exit 0, on the
    rest. Plant: no cohort.check_leading_zeros call -> exit 0."""
    from tests.synthetic_cohort import zero_padded_cohort

    emb = str(tmp_path / "emb")
    rows = zero_padded_cohort(emb, 16)
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    assert knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", "kfold:2",
                         "--out", str(tmp_path / "k.json")]) == 2
    assert ("labels.csv: slide_id '1' has no bag but '001' in " in capsys.readouterr().err
            and not os.path.exists(tmp_path / "k.json"))


def test_split_ids_that_lost_their_leading_zeros_are_refused(tmp_path, capsys):
    """A split file saved through a spreadsheet lists slides 001..003 as 1..3 beside correct
    ids: those were skipped as "not in the labels CSV" and the KNN ran, exit 0, on the rest.
    An id that is simply unknown is still skipped. Plant: no check_split_leading_zeros call in
    plan_folds -> exit 0."""
    from tests.synthetic_cohort import padded_id_cohort

    emb, ids, labels = padded_id_cohort(tmp_path, 12)

    def run(train_ids, name):
        splits = tmp_path / name
        splits.mkdir()
        test = ids[8:]
        rows = [",train,val,test"] + [f"{j},{s},,{test[j] if j < len(test) else ''}" for j, s in enumerate(train_ids)]
        (splits / "splits_0.csv").write_text("\n".join(rows) + "\n")
        out = tmp_path / f"{name}.json"
        return knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", str(splits), "--k", "1",
                             "--out", str(out)]), capsys.readouterr().err, out

    code, err, out = run(["1", "2", "3", *ids[3:8]], "stripped")
    assert code == 2 and not out.exists()
    assert (f"{tmp_path / 'stripped' / 'splits_0.csv'}: id '1' is not in {labels}, which has '001' (3 such id(s)): "
            "the ids lost their leading zeros") in err
    code, err, out = run([*ids[:8], "0999"], "unknown")
    assert code == 0 and "1 split id(s) not in the labels CSV (skipped): ['0999']" in err


def test_a_save_splits_folder_named_like_a_bag_among_the_bags_is_refused(tmp_path, capsys):
    """--save-splits EMB/folds.h5 beside the bags of a folder of bags: the next run read that
    folder as the bag of slide 'folds' and failed on it ("truncated or corrupt bag", exit 1).
    Other outputs beside the bags (the default EMB/knn_results.json, --save-splits EMB) are
    never read as bags and stay allowed. Plant: no check_not_among_bags for --save-splits ->
    exit 0 and a folds.h5 folder."""
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 8, grid=2, regions=(1, 2))
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": f"slide_{i:04d}", "label": "ab"[c]}
                                                     for i, c in enumerate(classes)])
    held = os.path.join(emb, "slides") if os.path.isdir(os.path.join(emb, "slides")) else emb
    args = ["--embeddings", emb, "--labels", labels, "--splits", "kfold:2", "--k", "1", "--save-splits"]
    assert knn_cli.main([*args, os.path.join(held, "folds.h5")]) == 2
    assert "folds.h5: would sit among the bags of" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(held, "folds.h5"))
    for _ in range(2):  # the rerun reads none of the first run's outputs as a bag
        assert knn_cli.main([*args, held]) == 0
    assert os.path.isfile(os.path.join(held, "splits_0.csv"))


def test_bags_of_two_feature_widths_are_named_for_every_embedding(tmp_path, capsys):
    """A folder holding bags of two models (ViT-256 features of 384 and of 512 values, the
    same slide_embedding width): --embedding cls256_mean stopped on numpy's "all input arrays
    must have the same shape", naming no file. Plant: no width check in
    slide_embeddings.read -> that message."""
    from tests.synthetic_cohort import write_embedding

    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 8, grid=2, regions=(1, 2))
    write_embedding(emb, "slide_0003", np.random.default_rng(0).normal(size=(2, 4, 512)).astype(np.float32))
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": f"slide_{i:04d}", "label": "ab"[c]}
                                                     for i, c in enumerate(classes)])
    for name in ("cls256_mean", "mean256_cls4k"):
        code = knn_cli.main(["--embeddings", emb, "--labels", labels, "--splits", "kfold:2",
                             "--embedding", name, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "slide_0003.npz: --embedding " + name in err and "one cohort needs one kind of bag" in err
