"""The evaluation protocol's cohort side: official dataset CSVs and split files as the field
ships them, patient-level folds, label fractions, and the input rules hipt-knn and
hipt-finetune share (ids are names, labels/survival/split validation, CSV encodings).

Fixture (tests/fixtures/cohort/): an official-format BRCA-like table (index column, case_id,
slide_id with ``.svs``, oncotree_code IDC/ILC/MDLC, survival columns, extra columns), 18
patients with 1-3 slides each; CLAM subtyping splits (train,val,test slide ids; fold 1's test
ids carry the extension; one id with no row) and MCAT survival splits (train,val case ids).
Every test docstring names the bug planted once to see it fail.
"""
import json
import os
import shutil

import numpy as np
import pytest

from hipt_jax.cli import knn as knn_cli
from hipt_jax.evaluation import cohort
from hipt_jax.evaluation.cohort import CohortError
from tests.synthetic_cohort import write_embedding, write_labels

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cohort")
LABELS = os.path.join(FIX, "brca_labels.csv")
SUBTYPE = os.path.join(FIX, "splits_subtype")
SURV = os.path.join(FIX, "splits_survival")
UNKNOWN = "TCGA-ZZ-9999-01Z-00-DX1"


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """Embeddings (EMB/slides/<stem>.npz) of every fixture slide, class-shifted features."""
    out = str(tmp_path_factory.mktemp("emb"))
    coh = cohort.read_labels_csv(LABELS, label_column="oncotree_code")
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(len(coh.class_names), 384)).astype(np.float32)
    for sid, c in zip(coh.slide_ids, coh.labels):
        write_embedding(out, sid, rng.normal(size=(2, 4, 384)).astype(np.float32) + 2.0 * directions[c])
    return out


def _brca(**kw):
    return cohort.read_labels_csv(LABELS, label_column="oncotree_code", **kw)


def _case_parts(fold, case_of):
    return {p: {case_of.get(i, i) for i in fold[p]} for p in cohort.PARTS}


def test_official_csv_stems_label_column_and_class_filter():
    """Plants: no extension stripping (ids end in .svs); class filter ignored (MDLC kept);
    classes sorted instead of in the given order."""
    coh = _brca(classes=["ILC", "IDC"])
    assert coh.class_names == ["ILC", "IDC"] and coh.has_case_ids
    assert all(not s.endswith(".svs") for s in coh.slide_ids)
    assert coh.dropped == {"MDLC": 3} and len(coh.slide_ids) == 30
    raw = open(LABELS).read().splitlines()[1:]
    by_slide = {r.split(",")[2][:-4]: r.split(",")[4] for r in raw}
    assert [coh.class_names[c] for c in coh.labels] == [by_slide[s] for s in coh.slide_ids]
    assert len(set(coh.case_ids)) == 16 and coh.times is not None  # survival read from the same CSV
    with pytest.raises(CohortError, match="class\\(es\\) \\['LUAD'\\] not found in column 'oncotree_code'"):
        _brca(classes=["IDC", "LUAD"])


def test_generated_folds_are_patient_level_and_carve_val():
    """Plant: stratified_kfold called without groups (slide-level folds: one patient's slides
    land in train and test)."""
    coh = _brca(classes=["IDC", "ILC"])
    for spec in ("kfold:4", "kfold:4:val=0.25"):
        plan = cohort.plan_folds(coh, spec, coh.slide_ids, coh.labels, seed=1)
        assert plan.grouped and "patient-level" in plan.describe()
        case_of = coh.case_of()
        assert sorted(s for f in plan.folds for s in f["test"]) == sorted(coh.slide_ids)
        for f in plan.folds:
            parts = _case_parts(f, case_of)
            assert not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
            assert not (parts["train"] & parts["val"])
            assert bool(f["val"]) == spec.endswith("val=0.25")
            cohort.check_no_patient_leak([f], case_of, "x")


def test_official_split_files_both_formats_unknown_ids_listed_once():
    """Plants: survival files' val column kept as val (no test part); case ids not expanded
    to their slides; unknown ids fatal or listed once per fold."""
    coh = _brca(classes=["IDC", "ILC"])
    plan = cohort.plan_folds(coh, SUBTYPE, coh.slide_ids, coh.labels)
    assert plan.skipped_ids == [UNKNOWN]  # listed in both folds, reported once
    assert all(f["train"] and f["val"] and f["test"] for f in plan.folds)
    assert all(s in coh.slide_ids for s in plan.folds[1]["test"])  # ".svs" ids matched by stem
    surv = cohort.read_labels_csv(LABELS, require_survival=True)
    cases = sorted(set(surv.case_ids))
    plan = cohort.plan_folds(surv, SURV, cases, [0] * len(cases), unit="case")
    assert [sorted(f["train"] + f["test"]) for f in plan.folds] == [cases, cases]
    assert all(not f["val"] for f in plan.folds) and not plan.skipped_ids
    # As slides: a case id selects all that patient's slides.
    plan = cohort.plan_folds(surv, SURV, surv.slide_ids, [0] * len(surv.slide_ids))
    assert sorted(plan.folds[0]["train"] + plan.folds[0]["test"]) == sorted(surv.slide_ids)


def test_split_file_leaking_a_patient_is_refused_naming_it(tmp_path):
    """Plant: check_no_patient_leak skipped (or comparing slide ids instead of patients)."""
    coh = _brca(classes=["IDC", "ILC"])
    # Two slides of one patient split between train and test (slide ids all distinct).
    (tmp_path / "splits_0.csv").write_text(
        ",train,val,test\n0,TCGA-ID-0001-01Z-00-DX1,,TCGA-ID-0001-01Z-00-DX2\n"
        "1,TCGA-IL-0000-01Z-00-DX1,,TCGA-IL-0003-01Z-00-DX1\n")
    with pytest.raises(CohortError, match=r"splits_0.csv: patient\(s\) \['TCGA-ID-0001'\]"):
        cohort.plan_folds(coh, str(tmp_path), coh.slide_ids, coh.labels)


def test_label_fraction_nested_per_class_test_unchanged():
    """Plants: a fresh permutation per fraction (not nested); slide-level sampling (a patient's
    slides split); test or val subsampled too."""
    coh = _brca(classes=["IDC", "ILC"])
    case_of = coh.case_of()
    plans = {f: cohort.plan_folds(coh, "kfold:4:val=0.25", coh.slide_ids, coh.labels, seed=3,
                                  label_frac=f) for f in (0.25, 0.5, 1.0)}
    for k in range(4):
        folds = {f: p.folds[k] for f, p in plans.items()}
        assert folds[0.25]["test"] == folds[0.5]["test"] == folds[1.0]["test"]
        assert folds[0.25]["val"] == folds[0.5]["val"] == folds[1.0]["val"]
        assert set(folds[0.25]["train"]) <= set(folds[0.5]["train"]) <= set(folds[1.0]["train"])
        full = _case_parts(folds[1.0], case_of)["train"]
        for f in (0.25, 0.5):
            kept = _case_parts(folds[f], case_of)["train"]
            # whole patients only
            assert set(folds[f]["train"]) == {s for s in folds[1.0]["train"] if case_of[s] in kept}
            for c in range(2):
                cls_cases = {case_of[s] for s in folds[1.0]["train"] if coh.labels[coh.slide_ids.index(s)] == c}
                assert len(kept & cls_cases) == max(1, int(np.ceil(f * len(cls_cases))))
        assert full
    again = cohort.plan_folds(coh, "kfold:4:val=0.25", coh.slide_ids, coh.labels, seed=3, label_frac=0.25)
    assert again.folds == plans[0.25].folds


def test_ids_are_names_and_duplicates_after_normalization(tmp_path):
    """Plants: no path-separator check (``../x`` read outside EMB); duplicates compared as raw
    strings (``a.svs`` vs ``a``); no realpath check (a symlink escaping the folder)."""
    for bad in ("../slides/s0", "sub/s0", "..", "C:\\s0"):
        path = write_labels(str(tmp_path / "p.csv"), [{"slide_id": "ok", "label": "a"},
                                                      {"slide_id": bad, "label": "b"}])
        with pytest.raises(CohortError, match=r"p.csv: row 3: id .* is a path"):
            cohort.read_labels_csv(path)
    path = write_labels(str(tmp_path / "d.csv"), [{"slide_id": "s1.svs", "label": "a"},
                                                  {"slide_id": "s1", "label": "b"}])
    with pytest.raises(CohortError, match=r"d.csv: rows 2 and 3: duplicate slide_id 's1'"):
        cohort.read_labels_csv(path)
    path = write_labels(str(tmp_path / "c.csv"), [{"slide_id": "S1", "label": "a"}, {"slide_id": "s1", "label": "b"}])
    assert len(cohort.read_labels_csv(path, case_insensitive=False).slide_ids) == 2
    with pytest.raises(CohortError, match="ignoring case"):
        cohort.read_labels_csv(path, case_insensitive=True)
    emb = tmp_path / "emb"
    (emb / "slides").mkdir(parents=True)
    (tmp_path / "outside.npz").write_bytes(b"x")
    os.symlink(tmp_path / "outside.npz", emb / "slides" / "esc.npz")
    with pytest.raises(CohortError, match="resolves outside"):
        cohort.bag_file(str(emb), "esc", "labels.csv: row 2")


def test_label_and_survival_values_validated(tmp_path):
    """Plants: integer labels as 0..max (an empty class 0); single class accepted; censorship 2
    or negative/NaN months accepted; a class missing from a training part accepted."""
    rows = lambda vals: [{"slide_id": f"s{i}", "label": v} for i, v in enumerate(vals)]  # noqa: E731
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "i.csv"), rows(["1", "2", "2", "10"])))
    assert coh.class_names == ["1", "2", "10"] and coh.labels.tolist() == [0, 1, 1, 2]
    with pytest.raises(CohortError, match=r"one.csv: column 'label' has 1 class"):
        cohort.read_labels_csv(write_labels(str(tmp_path / "one.csv"), rows(["x", "x"])))
    for months, cens, msg in (("-1", "0", "survival_months '-1'"), ("nan", "0", "survival_months 'nan'"),
                              ("3", "2", "censorship '2'"), ("", "1", "survival_months ''")):
        path = write_labels(str(tmp_path / "s.csv"), [
            {"slide_id": "a", "survival_months": "4", "censorship": "1"},
            {"slide_id": "b", "survival_months": months, "censorship": cens}])
        with pytest.raises(CohortError, match=f"s.csv: row 3: {msg}"):
            cohort.read_labels_csv(path, require_survival=True)
    folds = [{"train": ["a", "b"], "val": [], "test": ["c"]}]
    with pytest.raises(CohortError, match=r"f0: class\(es\) \['z'\] have no slide"):
        cohort.check_training_classes(folds, {"a": 0, "b": 0, "c": 1}, ["y", "z"], "f{k}")


def test_csv_encodings(tmp_path):
    """Plants: reading with encoding="utf-8" (the BOM glues to the first header: "missing
    column slide_id"); latin-1 decoded silently."""
    text = "slide_id,label\nsé1,IDC\ns2,ILC\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert cohort.read_labels_csv(str(tmp_path / "bom.csv")).slide_ids == ["sé1", "s2"]
    (tmp_path / "latin.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(CohortError, match=r"latin.csv: not UTF-8"):
        cohort.read_labels_csv(str(tmp_path / "latin.csv"))


def test_write_clam_splits_round_trip(tmp_path):
    """Plant: columns written in another order (val and test swapped)."""
    folds = [{"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]}, {"train": ["e"], "val": [], "test": ["a"]}]
    cohort.write_clam_splits(folds, str(tmp_path / "s"))
    assert cohort.read_clam_splits(str(tmp_path / "s")) == folds
    assert open(tmp_path / "s" / "splits_0.csv").readline().strip() == ",train,val,test"


def test_knn_cli_official_cohort_save_splits_and_bad_splits(emb, tmp_path, capsys):
    """hipt-knn on the official-format table and split files. Plants: --save-splits ignored;
    dropped rows not reported; a leaking split file accepted (exit 0)."""
    out, saved = str(tmp_path / "k.json"), str(tmp_path / "saved")
    argv = ["--embeddings", emb, "--labels", LABELS, "--splits", SUBTYPE, "--label-column", "oncotree_code",
            "--classes", "IDC,ILC", "--save-splits", saved, "--out", out, "--k", "3", "--k-dino", "3"]
    assert knn_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "dropped 3 row(s) of class 'MDLC'" in err and err.count(UNKNOWN) == 1
    res = json.load(open(out))
    assert res["class_names"] == ["IDC", "ILC"] and res["skipped_split_ids"] == [UNKNOWN]
    assert res["summary"]["paper"]["auc"]["mean"] > 0.9
    saved_folds = cohort.read_clam_splits(saved)
    assert [len(f["test"]) for f in saved_folds] == [r["n_test"] for r in res["folds"]["paper"]]
    # Generated patient-level folds + label fraction; the saved files reload as the same folds
    # (another folder: one that holds other split files is refused, tests/test_knn_cli.py).
    saved = str(tmp_path / "saved_kfold")
    assert knn_cli.main(argv[:5] + ["kfold:3:val=0.2", "--label-frac", "0.5"] + argv[6:]
                        + ["--save-splits", saved]) == 0
    coh = _brca(classes=["IDC", "ILC"])
    reloaded = cohort.plan_folds(coh, saved, coh.slide_ids, coh.labels)
    assert reloaded.folds == cohort.read_clam_splits(saved)
    leak = tmp_path / "leak"
    shutil.copytree(SUBTYPE, leak)
    with open(leak / "splits_1.csv", "a") as f:
        f.write("99,TCGA-ID-0001-01Z-00-DX1,,\n")  # patient 0001 is in fold 1's test part
    capsys.readouterr()
    assert knn_cli.main(argv[:5] + [str(leak)] + argv[6:10]) == 2
    err = capsys.readouterr().err.strip()
    assert "splits_1.csv: patient(s) ['TCGA-ID-0001']" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def _lgp_config(task, emb, splits, **data):
    from configs import lgp_subtyping, lgp_survival

    c = (lgp_subtyping if task == "subtyping" else lgp_survival).get_config("runlocal")
    c.data.embeddings, c.data.labels, c.data.splits = emb, LABELS, splits
    c.data.update(data)
    c.optim.epochs = 1
    c.model.freeze_local = False  # items keep raw features: no ViT-4K encoding in these tests
    return c


class _InstantTrainer:
    """Stands in for the LGP trainer: these tests check which items reach each fold, not
    learning (tests/test_finetune.py trains for real), and compiling the LGP per fold would
    cost minutes on a 2-core machine."""

    def __init__(self, model, cfg):
        self.cfg = cfg

    def fit(self, variables, items, desc=None):
        return {"n_train": len(items)}

    def train(self, variables, items, val_items=None, desc=None, log=None):
        from hipt_jax.finetune.trainer import FitResult

        return FitResult(final={}, selected={}, selected_epoch=0, last_epoch=0, stopped_early=False,
                         selected_by="final_epoch")

    def evaluate(self, params, items):
        if self.cfg.task == "survival":
            preds = {"times": [it.time for it in items], "censored": [it.censored for it in items],
                     "risk": list(np.linspace(0, 1, len(items)))}
            return {"c_index": 0.5}, preds
        probs = [[0.5, 0.5] for _ in items]
        return {"auc": 0.5}, {"labels": [it.label for it in items], "probs": probs}


@pytest.fixture
def instant_finetune(monkeypatch):
    from hipt_jax.finetune import main as finetune

    monkeypatch.setattr(finetune, "LGPTrainer", _InstantTrainer)
    monkeypatch.setattr(finetune, "_init_variables", lambda *args, **kwargs: {"params": {}})
    monkeypatch.setattr(finetune, "_save_checkpoint", lambda *a, **k: None)
    return finetune


def test_finetune_reads_the_same_cohort_and_writes_its_splits(emb, tmp_path, capsys, instant_finetune):
    """hipt-finetune on the official table: class filter, label column, label fraction, CLAM
    subtyping splits (unknown id skipped and listed as hipt-knn does) and MCAT survival splits;
    the folds used are written to WORKDIR/splits/. Plants: splits not written; label_frac
    ignored; survival val column not used as the test part."""
    finetune = instant_finetune
    cfg = _lgp_config("subtyping", emb, SUBTYPE, label_column="oncotree_code", classes="IDC,ILC",
                      label_frac=0.5)
    res = finetune.run(cfg, str(tmp_path / "sub"), show_progress=False)
    assert res["skipped_split_ids"] == [UNKNOWN] and res["dropped_by_class"] == {"MDLC": 3}
    assert res["class_names"] == ["IDC", "ILC"]
    written = cohort.read_clam_splits(str(tmp_path / "sub" / "splits"))
    full = cohort.plan_folds(_brca(classes=["IDC", "ILC"]), SUBTYPE, _brca(classes=["IDC", "ILC"]).slide_ids,
                             _brca(classes=["IDC", "ILC"]).labels).folds
    for k, (w, f) in enumerate(zip(written, full)):
        assert w["test"] == f["test"] and w["val"] == f["val"] and set(w["train"]) < set(f["train"])
        assert json.load(open(tmp_path / "sub" / f"fold_{k}" / "result.json"))["n_train"] == len(w["train"])
    assert UNKNOWN in capsys.readouterr().err
    surv = finetune.run(_lgp_config("survival", emb, SURV), str(tmp_path / "surv"), show_progress=False)
    written = cohort.read_clam_splits(str(tmp_path / "surv" / "splits"))
    assert [len(f["test"]) for f in written] == [9, 9] and surv["n_items"] == 18


def test_finetune_bad_cohort_stops_before_any_work(emb, tmp_path, monkeypatch):
    """Plants: the workdir created before the labels are read (bad input leaves an output
    folder behind); folds checked only after every slide's features were read."""
    from hipt_jax.finetune import main as finetune

    def no_work(*a, **k):
        raise AssertionError("features read before the cohort was validated")

    bad = write_labels(str(tmp_path / "bad.csv"), [{"slide_id": "../emb/slides/x", "label": "a"},
                                                   {"slide_id": "y", "label": "b"}])
    cfg = _lgp_config("subtyping", emb, "kfold:2")
    cfg.data.labels = bad
    with pytest.raises(CohortError, match=r"bad.csv: row 2: id '../emb/slides/x' is a path"):
        finetune.run(cfg, str(tmp_path / "run"), show_progress=False)
    assert not os.path.exists(tmp_path / "run")
    monkeypatch.setattr(finetune, "load_items", no_work)
    leak = tmp_path / "leak"
    shutil.copytree(SUBTYPE, leak)
    with open(leak / "splits_0.csv", "a") as f:
        f.write("99,TCGA-IL-0002-01Z-00-DX1,,\n")  # patient IL-0002 is in fold 0's train part
    cfg = _lgp_config("subtyping", emb, str(leak), label_column="oncotree_code", classes="IDC,ILC")
    with pytest.raises(CohortError, match=r"splits_0.csv: patient\(s\) \['TCGA-IL-0002'\]"):
        finetune.run(cfg, str(tmp_path / "run2"), show_progress=False)
    one_class = tmp_path / "one_class"
    one_class.mkdir()
    (one_class / "splits_0.csv").write_text(",train,val,test\n0,TCGA-ID-0000-01Z-00-DX1,,TCGA-IL-0000-01Z-00-DX1\n")
    cfg = _lgp_config("subtyping", emb, str(one_class), label_column="oncotree_code", classes="IDC,ILC")
    with pytest.raises(CohortError, match=r"one_class/splits_0.csv: class\(es\) \['ILC'\] have no slide"):
        finetune.run(cfg, str(tmp_path / "run3"), show_progress=False)
    assert not os.path.exists(tmp_path / "run2") and not os.path.exists(tmp_path / "run3")


def test_leaky_split_files_need_an_explicit_opt_in(tmp_path):
    """The official HIPT BRCA subtyping splits are slide-level (1-10 patients per fold in train
    and test); rerunning them needs allow_leaks, which records the patients. Plant: allow_leaks
    ignored (still refused) or leaks not recorded."""
    coh = _brca(classes=["IDC", "ILC"])
    (tmp_path / "splits_0.csv").write_text(
        ",train,val,test\n0,TCGA-ID-0001-01Z-00-DX1,,TCGA-ID-0001-01Z-00-DX2\n"
        "1,TCGA-IL-0000-01Z-00-DX1,,TCGA-IL-0003-01Z-00-DX1\n")
    plan = cohort.plan_folds(coh, str(tmp_path), coh.slide_ids, coh.labels, allow_leaks=True)
    assert plan.leaky_patients == {0: ["TCGA-ID-0001"]}
    # The same slide in train and test is not a patient leak: refused even with the opt-in
    # (plant: no _check_no_item_in_two_parts -> the plan is made, fails).
    (tmp_path / "splits_0.csv").write_text(
        ",train,val,test\n0,TCGA-ID-0001-01Z-00-DX1,,TCGA-ID-0001-01Z-00-DX1\n"
        "1,TCGA-IL-0000-01Z-00-DX1,,TCGA-IL-0003-01Z-00-DX1\n")
    with pytest.raises(CohortError, match=r"'TCGA-ID-0001-01Z-00-DX1' is in both train and test"):
        cohort.plan_folds(coh, str(tmp_path), coh.slide_ids, coh.labels, allow_leaks=True)
    # A CLAM boolean split saved under the ids file's name says so (plant: no hint -> fails).
    (tmp_path / "splits_0.csv").write_text(
        ",train,val,test\nTCGA-ID-0001-01Z-00-DX1,True,False,False\nTCGA-IL-0000-01Z-00-DX1,False,False,True\n")
    with pytest.raises(CohortError, match=r"no extracted item in its train or test part; its cells are True/False"):
        cohort.plan_folds(coh, str(tmp_path), coh.slide_ids, coh.labels)


def test_finetune_survival_without_case_ids_warns_once(tmp_path, capsys, instant_finetune):
    """The slide-level-folds warning of a survival run without case_id was printed twice (the
    folds are planned before any work and again for the run). Plant: _splits printing the
    plan's warnings also when quiet -> twice."""
    from tests.synthetic_cohort import make_feature_cohort

    emb = str(tmp_path / "emb")
    make_feature_cohort(emb, 8, grid=2, regions=(1, 1))
    labels = write_labels(str(tmp_path / "surv.csv"), [
        {"slide_id": f"slide_{i:04d}", "survival_months": 5 + i, "censorship": int(i % 3 == 0)} for i in range(8)])
    cfg = _lgp_config("survival", emb, "kfold:2", labels=labels)
    res = instant_finetune.run(cfg, str(tmp_path / "run"), show_progress=False)
    err = capsys.readouterr().err
    assert err.count("no case_id column, so the generated folds are slide-level") == 1, err
    assert res["patients_from"] == "unknown" and "slide-level" in res["folds_source"]


def test_ids_that_differ_only_by_leading_zeros_are_refused_either_way(tmp_path):
    """Split ids written with fewer or more leading zeros than the labels' ids ('1' or '0001'
    for '001', case ids too), and labels written with more zeros than the bags ('007' for
    7.npz), are refused naming both spellings; an id that is simply unknown is skipped.
    Plants: check_split_leading_zeros not called -> no error; zero_padding_twins comparing
    only the id stripped -> the '0001' and '007' cases pass."""
    ids = [f"{i:03d}" for i in range(1, 9)]
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "l.csv"),
                                              [{"slide_id": s, "case_id": f"0{100 + i}", "label": "ab"[i % 2]}
                                               for i, s in enumerate(ids)]))
    for name, odd, meant, cause in (("fewer", "1", "001", "lost their leading zeros"),
                                    ("more", "0001", "001", "have leading zeros that the labels' ids lack"),
                                    ("case", "101", "0101", "lost their leading zeros")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "splits_0.csv").write_text(",train,val,test\n0,002,,004\n1,003,,005\n")
        (folder / "splits_1.csv").write_text(f",train,val,test\n0,{odd},,002\n1,004,,003\n2,005,,\n")
        with pytest.raises(CohortError, match=rf"splits_1\.csv: id '{odd}' is not in .*l\.csv, which has "
                                              rf"'{meant}' \(1 such id\(s\)\): the ids {cause}"):
            cohort.plan_folds(coh, str(folder), ids, [0, 1] * 4)
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "splits_0.csv").write_text(",train,val,test\n0,002,,004\n1,9,,005\n")
    assert cohort.plan_folds(coh, str(tmp_path / "unknown"), ids, [0, 1] * 4).skipped_ids == ["9"]
    with pytest.raises(CohortError, match=r"slide_id '007' has no bag but '7' in EMB .*leading zeros that the bags'"):
        cohort.check_leading_zeros(coh, [*ids[:6], "7", "008"], "EMB")
