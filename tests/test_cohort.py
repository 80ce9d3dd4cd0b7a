"""Cohort tables: labels CSV parsing, CLAM split files, seeded stratified k-fold."""
import numpy as np
import pytest

from hipt_jax.evaluation import cohort
from tests.synthetic_cohort import write_labels


def test_labels_csv_string_classes_cases_and_survival(tmp_path):
    path = write_labels(str(tmp_path / "l.csv"), [
        {"slide_id": "a", "label": "LUSC", "case_id": "p1", "survival_months": "10.5", "censorship": "1"},
        {"slide_id": "b", "label": "LUAD", "case_id": "p1", "survival_months": "10.5", "censorship": "1"},
        {"slide_id": "c", "label": "LUAD", "case_id": "", "survival_months": "3", "censorship": "0"},
    ])
    c = cohort.read_labels_csv(path, require_survival=True)
    assert c.class_names == ["LUAD", "LUSC"] and c.labels.tolist() == [1, 0, 0]
    assert c.case_ids == ["p1", "p1", "c"]
    assert c.censored.tolist() == [True, True, False] and c.times.tolist() == [10.5, 10.5, 3.0]


def test_labels_csv_errors_name_the_file(tmp_path):
    path = write_labels(str(tmp_path / "bad.csv"), [{"slide_id": "a", "klass": 1}])
    with pytest.raises(cohort.CohortError, match=r"bad.csv: missing column\(s\) \['label'\]"):
        cohort.read_labels_csv(path)
    dup = write_labels(str(tmp_path / "dup.csv"), [{"slide_id": "a", "label": 1}, {"slide_id": "a", "label": 0}])
    with pytest.raises(cohort.CohortError, match="duplicate"):
        cohort.read_labels_csv(dup)


def test_labels_csv_refuses_two_outcomes_for_one_patient_and_flags_case_clashes(tmp_path, capsys):
    """Plants: no outcome check (the first row's survival silently wins) -> no error, fails;
    no case-clash warning ('idc' next to 'IDC' became a third class unannounced) -> fails."""
    rows = [{"slide_id": "a", "label": "IDC", "case_id": "p1", "survival_months": "110.3", "censorship": "0"},
            {"slide_id": "b", "label": "IDC", "case_id": "p1", "survival_months": "20", "censorship": "1"}]
    path = write_labels(str(tmp_path / "surv.csv"), rows)
    with pytest.raises(cohort.CohortError, match=r"surv.csv: case 'p1' has survival 110.3/censored=0 on row 2 "
                                                 r"but 20/censored=1 on row 3"):
        cohort.read_labels_csv(path, require_survival=True)
    labels = write_labels(str(tmp_path / "case.csv"), [
        {"slide_id": "a", "label": "IDC"}, {"slide_id": "b", "label": "idc"}, {"slide_id": "c", "label": "ILC"}])
    coh = cohort.read_labels_csv(labels)
    assert coh.class_names == ["IDC", "ILC", "idc"]
    assert "differ only by case: [['IDC', 'idc']]" in capsys.readouterr().err
    cohort.read_labels_csv(labels, classes=["IDC", "ILC"])  # an explicit class list: no warning
    assert "differ only by case" not in capsys.readouterr().err


def test_generated_folds_without_case_ids_say_they_are_slide_level(tmp_path, capsys):
    """Plant: no warning (a patient's slides split across train and test without a word) -> fails."""
    rows = [{"slide_id": f"s{i}", "label": "AB"[i % 2]} for i in range(8)]
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "l.csv"), rows))
    cohort.plan_folds(coh, "kfold:2", coh.slide_ids, coh.labels)
    assert "l.csv: no case_id column, so the generated folds are slide-level" in capsys.readouterr().err
    rows = [dict(r, case_id=f"p{i}") for i, r in enumerate(rows)]
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "c.csv"), rows))
    cohort.plan_folds(coh, "kfold:2", coh.slide_ids, coh.labels)
    assert "slide-level" not in capsys.readouterr().err


def test_clam_split_files_with_uneven_columns_and_leak_check(tmp_path):
    (tmp_path / "splits_0.csv").write_text(",train,val,test\n0,a,b,c\n1,d,,e\n2,f,,\n")
    (tmp_path / "splits_1.csv").write_text(",train,val,test\n0,c,e,a\n")
    folds = cohort.read_clam_splits(str(tmp_path))
    assert folds[0] == {"train": ["a", "d", "f"], "val": ["b"], "test": ["c", "e"]}
    assert folds[1] == {"train": ["c"], "val": ["e"], "test": ["a"]}
    ids = list("abcdef")
    assert cohort.resolve_splits(str(tmp_path), ids, [0] * 6) == folds
    with pytest.raises(cohort.CohortError, match="not in the cohort"):
        cohort.resolve_splits(str(tmp_path), ["a", "b"], [0, 0])
    (tmp_path / "splits_2.csv").write_text(",train,val,test\n0,a,,a\n")
    with pytest.raises(cohort.CohortError, match="both train and test"):
        cohort.resolve_splits(str(tmp_path), ids, [0] * 6)


def test_stratified_kfold_is_seeded_disjoint_and_stratified():
    ids = [f"s{i}" for i in range(40)]
    labels = np.array([0] * 30 + [1] * 10)
    folds = cohort.resolve_splits("kfold:5", ids, labels, seed=3)
    assert folds == cohort.resolve_splits("kfold:5", ids, labels, seed=3)
    assert folds != cohort.resolve_splits("kfold:5", ids, labels, seed=4)
    tests = [s for f in folds for s in f["test"]]
    assert sorted(tests) == sorted(ids)  # every slide tested exactly once
    for f in folds:
        assert not set(f["train"]) & set(f["test"])
        assert sum(labels[ids.index(s)] for s in f["test"]) == 2  # 10 positives / 5 folds


def test_too_small_class_is_named_with_the_labels_file(tmp_path):
    """Plant: the old message ("a class/stratum has only 1 member(s)") -> no file, no class."""
    rows = [{"slide_id": f"s{i}", "label": "A", "case_id": f"p{i}"} for i in range(6)]
    rows.append({"slide_id": "m", "label": "MDLC", "case_id": "pm"})
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "l.csv"), rows))
    with pytest.raises(cohort.CohortError, match=r"l.csv: stratum 1 has 1 patient\(s\): fewer than the 3 folds "
                                                 r"\(class index -> name: \{0: 'A', 1: 'MDLC'\}\)"):
        cohort.plan_folds(coh, "kfold:3", coh.slide_ids, coh.labels)


def test_missing_value_markers_and_numbers_written_two_ways(tmp_path):
    """'NA' / '[Not Available]' cells are empty cells, not a third class; '1' beside '1.0' is
    refused, not two classes; a class list drops rows without a value, also in a survival file.
    Plants: no is_missing -> class_names ['IDC','ILC','NA'], fails; no spelling check -> four
    classes, fails; survival with an empty cell skipping the class list -> MDLC kept, fails."""
    def write(name, rows, header="slide_id,label"):
        path = tmp_path / name
        path.write_text(header + "\n" + "\n".join(rows) + "\n")
        return str(path)

    na = write("na.csv", [f"s{i},{['IDC', 'ILC'][i % 2]}" for i in range(6)] + ["s6,NA", "s7,[Not Available]"])
    with pytest.raises(cohort.CohortError, match=r"row 8: 'label' is 'NA', a missing value \(2 such row"):
        cohort.read_labels_csv(na)
    kept = cohort.read_labels_csv(na, classes=["IDC", "ILC"])
    assert kept.class_names == ["IDC", "ILC"] and len(kept.slide_ids) == 6
    assert kept.dropped == {"NA": 1, "[Not Available]": 1}
    mixed = write("mixed.csv", [f"s{i},{i % 2}" for i in range(4)] + [f"t{i},{i % 2}.0" for i in range(4)])
    with pytest.raises(cohort.CohortError, match=r"'0' \(row 2\) and '0.0' \(row 6\)"):
        cohort.read_labels_csv(mixed)
    surv = write("surv.csv", [f"s{i},c{i},{['IDC', 'ILC', 'MDLC'][i % 3]},{10 + i},{i % 2}" for i in range(9)]
                 + ["s9,c9,,5,0"], header="slide_id,case_id,oncotree_code,survival_months,censorship")
    surv_cohort = cohort.read_labels_csv(surv, require_survival=True, label_column="oncotree_code", classes=["IDC", "ILC"])
    assert surv_cohort.class_names == ["IDC", "ILC"] and len(surv_cohort.slide_ids) == 6
    assert surv_cohort.dropped == {"MDLC": 3, "(empty)": 1}


def test_trailing_empty_spreadsheet_rows_and_the_all_censored_hint(tmp_path):
    """Excel's trailing ',,' rows were refused as 'empty id'; an all-censored cohort (a 0/1
    column coded the other way round) now says how censorship is coded. Plants: no trailing-row
    strip -> CohortError; the old message -> no hint, fails."""
    from hipt_jax.finetune import survival

    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,x\nb,y\n,\n,\n")
    assert cohort.read_labels_csv(str(path)).slide_ids == ["a", "b"]
    with pytest.raises(ValueError, match=r"got 0 of 5 \(censorship is 1 for a censored patient"):
        survival.quartile_bins(np.arange(5.0), np.ones(5, bool))
