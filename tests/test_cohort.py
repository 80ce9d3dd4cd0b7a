"""Cohort tables: labels CSV parsing, CLAM split files, seeded stratified k-fold."""
import os

import numpy as np
import pytest

from hipt_jax.evaluation import cohort
from tests.synthetic_cohort import write_labels


def test_labels_csv_string_classes_cases_and_survival(tmp_path):
    path = write_labels(str(tmp_path / "l.csv"), [
        {"slide_id": "a", "label": "LUSC", "case_id": "p1", "survival_months": "10.5", "censorship": "1"},
        {"slide_id": "b", "label": "LUAD", "case_id": "p1", "survival_months": "10.5", "censorship": "1"},
        {"slide_id": "c", "label": "LUAD", "case_id": "p2", "survival_months": "3", "censorship": "0"},
    ])
    c = cohort.read_labels_csv(path, require_survival=True)
    assert c.class_names == ["LUAD", "LUSC"] and c.labels.tolist() == [1, 0, 0]
    assert c.case_ids == ["p1", "p1", "p2"]
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


def test_generated_folds_without_case_ids_say_they_are_slide_level(tmp_path):
    """Plant: no warning (a patient's slides split across train and test without a word) -> fails.
    The plan carries the warning; the commands print it once (the folds are planned twice)."""
    rows = [{"slide_id": f"s{i}", "label": "AB"[i % 2]} for i in range(8)]
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "l.csv"), rows))
    plan = cohort.plan_folds(coh, "kfold:2", coh.slide_ids, coh.labels)
    assert any("l.csv: no case_id column, so the generated folds are slide-level" in w for w in plan.warnings)
    assert "slide-level (patients unknown" in plan.describe()
    rows = [dict(r, case_id=f"p{i}") for i, r in enumerate(rows)]
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "c.csv"), rows))
    plan = cohort.plan_folds(coh, "kfold:2", coh.slide_ids, coh.labels)
    assert not plan.warnings and "patient-level (grouped by case_id)" in plan.describe()


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
    # A set numbered from 1, or with a file missing: its folds would be named and recorded
    # under other numbers (splits_2.csv's leak reported as splits_1.csv's). Plant: no check.
    os.remove(tmp_path / "splits_1.csv")
    with pytest.raises(cohort.CohortError, match=r"numbered \[0, 2\], but splits_1.csv is missing"):
        cohort.read_clam_splits(str(tmp_path))
    os.remove(tmp_path / "splits_0.csv")
    with pytest.raises(cohort.CohortError, match=r"numbered \[2\], but splits_0.csv is missing"):
        cohort.read_clam_splits(str(tmp_path))


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


TCGA = ["TCGA-A1-A0SB-01Z-00-DX1.8B9C", "TCGA-A1-A0SB-01Z-00-DX2.11AA", "TCGA-A2-A0CM-01Z-00-DX1.AAAA",
        "TCGA-B6-A0RE-01Z-00-DX1.CCCC", "TCGA-B6-A0RG-01Z-00-DX1.DDDD", "TCGA-E2-A14N-01Z-00-DX1.EEEE"]


def _split(folder, train, test):
    folder.mkdir(exist_ok=True)
    rows = [f"{i},{train[i] if i < len(train) else ''},,{test[i] if i < len(test) else ''}"
            for i in range(max(len(train), len(test)))]
    (folder / "splits_0.csv").write_text(",train,val,test\n" + "\n".join(rows) + "\n")
    return str(folder)


def test_split_files_without_case_ids_group_tcga_barcodes_and_say_when_patients_are_unknown(tmp_path):
    """A split file putting DX1 in train and DX2 of one TCGA patient in test ran with exit 0 and
    `leaky_patients: {}` when the labels had no case_id column. Plants: no barcode patients (the
    leak passes, plan made) -> fails; no split-file warning for unknown patients -> fails."""
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": s + ".svs", "label": "AABBAB"[i]}
                                                    for i, s in enumerate(TCGA)])
    coh = cohort.read_labels_csv(labels)
    assert coh.patients_from == cohort.PATIENTS_FROM_TCGA and coh.case_ids[:2] == ["TCGA-A1-A0SB"] * 2
    leak = _split(tmp_path / "leak", [TCGA[0], TCGA[2], TCGA[3]], [TCGA[1], TCGA[4]])
    with pytest.raises(cohort.CohortError, match=r"leak/splits_0.csv: patient\(s\) \['TCGA-A1-A0SB'\]"):
        cohort.plan_folds(coh, leak, coh.slide_ids, coh.labels)
    plan = cohort.plan_folds(coh, leak, coh.slide_ids, coh.labels, allow_leaks=True)
    assert plan.leaky_patients == {0: ["TCGA-A1-A0SB"]} and not plan.warnings
    assert "patients from TCGA barcodes" in plan.describe()
    assert "patient-level (patients from TCGA barcodes)" in cohort.plan_folds(
        coh, "kfold:2", coh.slide_ids, coh.labels).describe()
    # Not barcodes, no case_id: the leak cannot be seen, and the plan says so, as kfold does.
    plain = cohort.read_labels_csv(write_labels(str(tmp_path / "p.csv"), [
        {"slide_id": f"s{i}", "label": "AB"[i % 2]} for i in range(4)]))
    plan = cohort.plan_folds(plain, _split(tmp_path / "plain", ["s0", "s1"], ["s2", "s3"]),
                             plain.slide_ids, plain.labels)
    assert any("p.csv: no case_id column" in w and "cannot be checked" in w for w in plan.warnings)
    assert "patients unknown" in plan.describe()


def test_case_ids_written_two_ways_or_missing_are_refused(tmp_path):
    """'TCGA-AA-0000' and 'tcga-aa-0000' were two patients (and an empty cell its slide's own
    patient) under "patient-level (grouped by case_id)". Plants: no spelling check -> 3
    patients, no error; no empty-cell check -> the row falls back to its slide id, no error."""
    rows = [{"slide_id": f"s{i}", "case_id": c, "label": "AB"[i % 2]}
            for i, c in enumerate(["TCGA-AA-0000", "p1", "tcga-aa-0000", "p2"])]
    with pytest.raises(cohort.CohortError, match=r"two.csv: column 'case_id' has 'TCGA-AA-0000' \(row 2\) "
                                                 r"and 'tcga-aa-0000' \(row 4\)"):
        cohort.read_labels_csv(write_labels(str(tmp_path / "two.csv"), rows))
    rows[2]["case_id"], rows[3]["case_id"] = "", "NA"
    with pytest.raises(cohort.CohortError, match=r"empty.csv: row\(s\) 4, 5: empty 'case_id' \(2 such"):
        cohort.read_labels_csv(write_labels(str(tmp_path / "empty.csv"), rows))
    # A row the class list drops needs no patient.
    rows = [dict(r, label="C") if not r["case_id"] else r for r in rows[:3]] + [dict(rows[1], slide_id="s9")]
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "drop.csv"), rows), classes=["A", "B"])
    assert coh.case_ids == ["TCGA-AA-0000", "p1", "p1"]


def test_decimal_comma_survival_read_in_semicolon_and_tab_files_named_in_comma_files(tmp_path):
    """A ';' or tab labels file from a decimal-comma locale ('22,5' months) was refused: 'must be
    a finite number >= 0'. There the comma is the decimal point; in a comma CSV a quoted '22,5'
    could be 225 with a thousands separator, so it is refused naming the fix.
    Plant: _decimal_point returning the cell unchanged -> fails."""
    for name, sep in (("semi.csv", ";"), ("tab.tsv", "\t")):
        path = tmp_path / name
        path.write_text(sep.join(["slide_id", "survival_months", "censorship"]) + "\n"
                        + sep.join(["a", "22,5", "1"]) + "\n" + sep.join(["b", "3", "0,0"]) + "\n")
        coh = cohort.read_labels_csv(str(path), require_survival=True)
        assert coh.times.tolist() == [22.5, 3.0] and coh.censored.tolist() == [True, False], name
    comma = tmp_path / "comma.csv"
    comma.write_text('slide_id,survival_months,censorship\na,"22,5",1\nb,3,0\n')
    with pytest.raises(cohort.CohortError, match=r"comma.csv: row 2: survival_months '22,5': decimal comma: "
                                                 r"write 22.5$"):
        cohort.read_labels_csv(str(comma), require_survival=True)


def test_label_ids_are_named_like_slide_files_and_semicolon_csvs_are_read(tmp_path):
    """'my slide.svs' (slide file id my_slide) and NFD 'café' (macOS) never met their bags;
    a ';'-separated CSV was one column. Plants: normalize_id without safe_slide_id -> 'my slide';
    no NFC in safe_slide_id -> 'cafe'; no delimiter sniffing -> missing columns; list_bags keyed
    by raw file stems -> 'my slide'; no renamed-bag lookup in find_bag -> bag_file is None."""
    import unicodedata

    from data_prep import bags
    from data_prep.shards import safe_slide_id

    nfd = unicodedata.normalize("NFD", "café")
    path = tmp_path / "semi.csv"
    path.write_text(f"slide_id;label\nmy slide.svs;A\n{nfd}.svs;B\n", encoding="utf-8")
    coh = cohort.read_labels_csv(str(path))
    assert coh.slide_ids == ["my_slide", "café"] and coh.class_names == ["A", "B"]
    assert coh.slide_ids == [safe_slide_id("my slide"), safe_slide_id(nfd)]  # the slide side
    # A foreign bag folder named after the slide files (TRIDENT: "my slide.h5") meets them too.
    emb = tmp_path / "emb"
    emb.mkdir()
    bags.write_bag_file(str(emb / "my slide.npz"), {"features_cls4k": np.ones((2, 192), np.float32)})
    assert list(bags.list_bags(str(emb))) == ["my_slide"]
    assert cohort.bag_file(str(emb), "my_slide") == str(emb / "my slide.npz")


def test_split_ids_that_are_not_slide_ids_and_case_ids_as_slide_ids_are_named(tmp_path):
    """A split file of patient ids against labels without case_id said only 'no extracted item
    in its train or test part'; labels keyed by TCGA case ids said 'none of its slides are in'.
    Plants: no _refuse_unknown_part_ids -> the old message; no hint -> empty string."""
    coh = cohort.read_labels_csv(write_labels(str(tmp_path / "l.csv"), [
        {"slide_id": f"slide_{i}", "label": "AB"[i % 2]} for i in range(4)]))
    splits = _split(tmp_path / "byp", ["patient_0", "patient_1"], ["patient_2"])
    with pytest.raises(cohort.CohortError, match=r"byp/splits_0.csv: none of the 2 id\(s\) of its train part "
                                                 r"\(e.g. 'patient_0'\) are slide ids of .*l.csv; if they are "
                                                 "patient .* case_id column"):
        cohort.plan_folds(coh, splits, coh.slide_ids, coh.labels)
    assert "look like TCGA case (patient) ids" in cohort.case_ids_as_slide_ids_hint(["TCGA-A1-A0SB", "TCGA-A2-A0CM"])
    assert cohort.case_ids_as_slide_ids_hint(TCGA) == ""


def test_an_id_with_nul_bytes_is_refused_for_what_it_is(tmp_path):
    """A labels row '\\x00\\x00\\x00' (a damaged or binary file) was refused as "is a path".
    Plant: normalize_id without the control-character check -> the path message."""
    (tmp_path / "nul.csv").write_bytes(b"slide_id,label\n\x00\x00\x00,a\n")
    with pytest.raises(cohort.CohortError, match=r"nul.csv.*contains control characters"):
        cohort.read_labels_csv(str(tmp_path / "nul.csv"))
    with pytest.raises(cohort.CohortError, match="is a path"):
        cohort.normalize_id("a/b", "x.csv: row 2")
