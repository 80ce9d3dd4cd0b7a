"""End to end on small synthetic cohorts with a learnable signal: tissue images -> extraction ->
KNN and HIPT-LGP subtyping (AUC > 0.9); survival with class-dependent times (c-index > 0.7); and
shuffled labels giving chance-level results (a leak between folds would not)."""
import json
import os
import re

import numpy as np
import pytest

from configs import lgp_subtyping, lgp_survival
from hipt_jax import extraction
from hipt_jax.evaluation import knn_eval
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
    extraction.extract_cohort(HIPT4K.random_init(seed=0, tiny=True), prep, emb, batch_per_device=2,
                           show_progress=False)
    return emb, write_labels(os.path.join(root, "labels.csv"), rows), rows


def _subtyping_config(emb, labels, splits="kfold:3", epochs=3):
    c = lgp_subtyping.get_config("runlocal")
    c.data.embeddings, c.data.labels, c.data.splits = emb, labels, splits
    c.optim.epochs = epochs
    return c


def test_knn_and_lgp_subtyping_learn_stain_classes_from_tissue(tissue_embeddings, tmp_path):
    emb, labels, rows = tissue_embeddings
    result = knn_eval.run(emb, labels, "kfold:3", seed=0)
    assert result["n_slides"] == 24
    print({"tissue_knn": result["summary"]["paper"]["auc"], "tissue_dino": result["summary"]["dino"]["auc"]})
    assert result["summary"]["paper"]["auc"]["mean"] > 0.9, result["summary"]
    assert result["summary"]["dino"]["auc"]["mean"] > 0.9, result["summary"]
    res = finetune.run(_subtyping_config(emb, labels, epochs=4), str(tmp_path / "run"), show_progress=False)
    print({"tissue_lgp": res["summary"]["auc"]})
    assert res["summary"]["auc"]["mean"] > 0.9, res["folds"]
    assert os.path.isfile(tmp_path / "run" / "roc.png")
    assert os.path.isdir(tmp_path / "run" / "fold_0" / "checkpoint")
    assert "mean +/- std" in (tmp_path / "run" / "results.md").read_text()


def _shuffled_cohort(tmp_path):
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 180, signal=0.5, seed=3)
    rng = np.random.default_rng(0)
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"slide_{i:04d}", "label": int(c)} for i, c in enumerate(classes)])
    shuffled = write_labels(str(tmp_path / "shuffled.csv"),
                            [{"slide_id": f"slide_{i:04d}", "label": int(c)}
                             for i, c in enumerate(rng.permutation(classes))])
    return emb, labels, shuffled


def test_shuffled_labels_give_chance_level(tmp_path):
    emb, labels, shuffled = _shuffled_cohort(tmp_path)
    real = knn_eval.run(emb, labels, "kfold:3", seed=0)["summary"]
    fake = knn_eval.run(emb, shuffled, "kfold:3", seed=0)["summary"]
    print({"knn_real": real["paper"]["auc"], "knn_fake": fake["paper"]["auc"], "dino_fake": fake["dino"]["auc"]})
    assert real["paper"]["auc"]["mean"] > 0.9
    assert abs(fake["paper"]["auc"]["mean"] - 0.5) < 0.12 and abs(fake["dino"]["auc"]["mean"] - 0.5) < 0.12


@pytest.mark.slow  # ~20 s of training; HIPT-LGP learning real labels stays in make test (stain classes above)
def test_lgp_shuffled_labels_give_chance_level(tmp_path):
    emb, labels, shuffled = _shuffled_cohort(tmp_path)
    lgp_real = finetune.run(_subtyping_config(emb, labels, epochs=2), str(tmp_path / "r"), show_progress=False)
    lgp_fake = finetune.run(_subtyping_config(emb, shuffled, epochs=2), str(tmp_path / "f"), show_progress=False)
    print({"lgp_real": lgp_real["summary"]["auc"], "lgp_fake": lgp_fake["summary"]["auc"]})
    assert lgp_real["summary"]["auc"]["mean"] > 0.9
    assert abs(lgp_fake["summary"]["auc"]["mean"] - 0.5) < 0.12, lgp_fake["folds"]


def _survival_rows(classes, rng, shuffle=False):
    """Class k lives in [2 + 12k, 14 + 12k) months (class 0 dies first); ~30 % censored.
    Slides 2j and 2j+1 (j < 20) belong to one patient (same class, same time)."""
    times = 2.0 + 12.0 * classes + rng.uniform(0, 12, len(classes))
    cens = rng.random(len(classes)) < 0.3
    if shuffle:
        order = rng.permutation(len(classes))
        times, cens = times[order], cens[order]
    owner = [i - i % 2 if i < 40 else i for i in range(len(classes))]  # first slide of the patient
    return [{"slide_id": f"slide_{i:04d}", "case_id": f"case_{owner[i]:04d}",
             "survival_months": f"{times[owner[i]]:.3f}", "censorship": int(cens[owner[i]])}
            for i in range(len(classes))]


@pytest.mark.slow  # survival learning end to end (~65 s); the survival loss and LGP are checked against torch in test_parity_lgp_train
def test_survival_cindex_learns_class_dependent_times_and_not_shuffled(tmp_path):
    emb = str(tmp_path / "emb")
    n = 160
    classes = np.random.default_rng(4).permutation(np.arange(n) % 4)
    classes[1:40:2] = classes[0:40:2]  # the two slides of a patient share its class
    make_feature_cohort(emb, n, n_classes=4, signal=0.5, seed=4, classes=classes)
    results = {}
    for name, shuffle in (("real", False), ("shuffled", True)):
        rows = _survival_rows(classes, np.random.default_rng(6), shuffle)
        labels = write_labels(str(tmp_path / f"{name}.csv"), rows)
        c = lgp_survival.get_config("runlocal")
        c.data.embeddings, c.data.labels, c.data.splits = emb, labels, "kfold:3"
        c.optim.epochs = 3
        results[name] = finetune.run(c, str(tmp_path / name), show_progress=False)
    print({k: v["summary"]["c_index"] for k, v in results.items()})
    assert results["real"]["n_items"] == n - 20  # 20 patients with 2 slides each
    assert results["real"]["summary"]["c_index"]["mean"] > 0.7, results["real"]["folds"]
    # Chance level. (Under the null, cross-validation is slightly anti-conservative: the held-out
    # patients' times pull the train fold the other way, so expect a little below 0.5.)
    assert abs(results["shuffled"]["summary"]["c_index"]["mean"] - 0.5) < 0.12, results["shuffled"]["folds"]
    assert os.path.isfile(tmp_path / "real" / "km.png")
    fold = json.load(open(tmp_path / "real" / "fold_0" / "result.json"))
    assert len(fold["predictions"]["risk"]) == fold["n_test"]


def _items(n, m=3, grid=2, seed=0, width=None):
    from hipt_jax.finetune.trainer import Item

    rng = np.random.default_rng(seed)
    shape = (m, width) if width else (m, grid * grid, 384)
    return [Item(f"s{i}", rng.normal(size=shape).astype(np.float32), i % 2) for i in range(n)]


def test_pretrained_frozen_vit4k_is_loaded_and_never_updated(tmp_path):
    import jax

    from hipt_jax.models import checkpoint
    from hipt_jax.finetune.trainer import LGPTrainer, TrainConfig
    from hipt_jax.models.archs import build_vit, dummy_input, get_arch

    cfg4k = get_arch("vit4k_tiny")
    vit4k = jax.jit(build_vit(cfg4k).init)(jax.random.PRNGKey(7), dummy_input(cfg4k))
    checkpoint.save(str(tmp_path / "vit4k"), vit4k["params"], "vit", cfg4k)
    c = lgp_subtyping.get_config("runlocal")
    c.model.pretrained_vit4k = str(tmp_path / "vit4k")
    model = finetune._build_model(c, 2)
    variables = finetune._init_variables(model, c, seed=0, grid=2)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables["params"]["local_vit"], vit4k["params"])
    assert all(jax.tree.leaves(same))
    trainer = LGPTrainer(model, TrainConfig(epochs=1))  # any L2 step would move it
    params = trainer.fit(variables, _items(4, width=192), desc=None)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params["local_vit"], vit4k["params"])
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(params["classifier"]["kernel"], variables["params"]["classifier"]["kernel"])


@pytest.mark.slow  # ~27 s; in make test the unfrozen ViT-4K's training step is held to torch (test_parity_lgp_train)
def test_unfrozen_local_vit_trains_end_to_end_on_raw_features():
    from hipt_jax.finetune.trainer import LGPTrainer, TrainConfig
    from hipt_jax.models import lgp

    model = lgp.HIPTLGP(n_classes=2, local_arch="vit4k_tiny", freeze_local=False)
    variables = lgp.init_lgp(model, grid=2)
    trainer = LGPTrainer(model, TrainConfig(epochs=1, balanced_sampling=False))
    items = _items(3)
    params = trainer.fit(variables, items, desc=None)
    before = variables["params"]["local_vit"]["phi"]["dense"]["kernel"]
    assert np.abs(np.asarray(params["local_vit"]["phi"]["dense"]["kernel"]) - np.asarray(before)).max() > 0
    assert trainer.predict(params, items).shape == (3, 2)


def test_finetune_cli_reports_bad_input_without_traceback(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-m", "hipt_jax.cli.finetune", "--config", os.path.join(root, "configs", "lgp_survival.py:runlocal"),
         "--workdir", str(tmp_path / "w"), f"--config.data.embeddings={tmp_path}",
         f"--config.data.labels={tmp_path / 'missing.csv'}"],
        cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "missing.csv: labels file not found" in res.stderr and "Traceback" not in res.stderr


def test_optimizer_is_torch_adam_with_coupled_l2_and_frozen_local_untouched():
    import torch

    from hipt_jax.finetune.trainer import make_optimizer

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    frozen0 = rng.normal(size=(4,)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3)]
    params = {"classifier": {"kernel": w0}, "local_vit": {"w": frozen0}}
    tx = make_optimizer(params, lr=0.01, weight_decay=0.1, freeze_local=True)
    state = tx.init(params)
    import optax

    for g in grads:
        updates, state = tx.update({"classifier": {"kernel": g}, "local_vit": {"w": np.ones(4, np.float32)}},
                                   state, params)
        params = optax.apply_updates(params, updates)
    tw = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.Adam([tw], lr=0.01, weight_decay=0.1)
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(np.asarray(params["classifier"]["kernel"]), tw.detach().numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(params["local_vit"]["w"]), frozen0)


def test_gradient_accumulation_is_one_step_on_the_mean_gradient():
    import jax
    import jax.numpy as jnp
    import optax

    from hipt_jax.finetune import survival
    from hipt_jax.finetune.trainer import Item, LGPTrainer, TrainConfig, make_optimizer
    from hipt_jax.models import lgp

    # Items hold pre-encoded [M,192] regions: the frozen-local setting.
    model = lgp.HIPTLGP(n_classes=4, local_arch="vit4k_tiny", dropout_rate=0.0, freeze_local=True)
    variables = lgp.init_lgp(model, grid=2)
    rng = np.random.default_rng(1)
    items = [Item(f"p{i}", rng.normal(size=(3, 192)).astype(np.float32), label=i % 4, time=1.0 + i,
                  censored=bool(i % 2)) for i in range(4)]
    cfg = TrainConfig(task="survival", epochs=1, accumulate_steps=4, balanced_sampling=False)
    got = LGPTrainer(model, cfg).fit(variables, items, desc=None)

    @jax.jit
    def grad(params, x, mask, label, censored):
        def loss(p):
            logits, _ = model.apply({"params": p}, x, mask, method=lgp.HIPTLGP.aggregate)
            return survival.nll_survival_loss(logits[None], label[None], censored[None])
        return jax.grad(loss)(params)

    params = variables["params"]
    grads = [grad(params, *lgp.pad_to_bucket(it.inputs), jnp.int32(it.label), jnp.float32(it.censored))
             for it in items]
    mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    tx = make_optimizer(params, cfg.lr, cfg.weight_decay, True)
    updates, _ = tx.update(mean, tx.init(params), params)
    want = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # Adam: ~lr per step
    assert not np.allclose(got["classifier"]["kernel"], params["classifier"]["kernel"])


def _cls4k_h5_bags(emb, n: int, class_offset: bool = False):
    """n TRIDENT-style h5 bags s0..s{n-1} holding only `features` [3,192] (CLS-4K) and `coords`;
    ``class_offset``: odd slides' features shifted by 1 (a learnable class signal)."""
    import h5py

    emb.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        with h5py.File(emb / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(3, 192)).astype(np.float32) + (i % 2 if class_offset else 0)
            f["coords"] = np.arange(6, dtype=np.int64).reshape(3, 2) * 4096
    return emb


def test_bags_of_cls4k_features_alone(tmp_path):
    """A TRIDENT-style h5 with only `features` [M,192] (CLS-4K) and `coords`: the region
    baselines read exactly that; HIPT-LGP, which needs the ViT-256 grid, gets a one-line error
    naming the bag. Plants: bag_input reading features_cls256 first -> KeyError; _bag_shape
    indexing features_cls256 -> a KeyError traceback instead of FinetuneError."""
    emb = _cls4k_h5_bags(tmp_path / "h5", 6, class_offset=True)
    rows = [{"slide_id": f"s{i}", "label": "ab"[i % 2]} for i in range(6)]
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    bag = finetune.read_bag(str(emb), "s0")
    assert "features_cls256" not in bag
    np.testing.assert_array_equal(finetune.bag_input(None, None, bag, "region"), bag["features_cls4k"])
    c = _subtyping_config(str(emb), labels)
    with pytest.raises(finetune.FinetuneError, match=r"s0.h5: bag has no features_cls256, which a hipt_lgp"):
        finetune._bag_shape(c, ["s0"])
    c.model.name = "abmil"
    assert finetune._bag_shape(c, ["s0"]) == (16, 192)


def test_extracted_slides_without_a_label_row_are_named(tmp_path, capsys):
    """A bag with no row in the labels (a mistyped id, another cohort's labels file) is named on
    stderr and in the results' info, as hipt-knn does; a row dropped by the class list is not
    "unlabelled". Plants: no listing -> the stderr check fails; dropped ids counted as
    unlabelled -> the list check fails."""
    from hipt_jax.evaluation import cohort as cohort_lib

    emb = _cls4k_h5_bags(tmp_path / "h5", 8)
    # s7 has no row; s6's class is outside the class list
    rows = [{"slide_id": f"s{i}", "label": "c" if i == 6 else "ab"[i % 2]} for i in range(7)]
    (emb / "._s0.h5").write_bytes(b"\0")  # macOS metadata: not a bag
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    c = _subtyping_config(str(emb), labels)
    c.model.name = "abmil"
    coh = cohort_lib.read_labels_csv(labels, classes=["a", "b"])
    items, _, info = finetune.load_items(c, coh, None, None, failed={})
    assert len(items) == 6
    assert info["unlabelled_slides"] == ["s7"]
    err = capsys.readouterr().err
    assert "1 extracted slide(s)" in err and "['s7']" in err and "labels.csv" in err


def test_resumed_run_redoes_folds_made_on_other_slides(tmp_path, capsys):
    """A bag unreadable in the first run (that slide failed, its folds trained without it) and
    repaired before the rerun: the folds are redone on the whole cohort, not reported from the
    first run under `failed_slides {}`; an unreadable fold result is redone, named. Plants:
    _finished_fold returning any parsable result -> folds of 7 slides kept; json.load without
    the check -> a traceback."""
    emb = _cls4k_h5_bags(tmp_path / "h5", 8, class_offset=True)
    labels = write_labels(str(tmp_path / "labels.csv"), [{"slide_id": f"s{i}", "label": "ab"[i % 2]} for i in range(8)])
    c = _subtyping_config(str(emb), labels, splits="kfold:2", epochs=1)
    c.model.name = "abmil"
    good = (emb / "s3.h5").read_bytes()
    (emb / "s3.h5").write_bytes(good[:500])
    first = finetune.run(c, str(tmp_path / "run"), show_progress=False)
    assert "s3" in first["failed_slides"] and first["n_items"] == 7
    (emb / "s3.h5").write_bytes(good)
    capsys.readouterr()
    again = finetune.run(c, str(tmp_path / "run"), show_progress=False)
    assert again["n_items"] == 8 and again["failed_slides"] == {}
    assert "fold 0 was trained on other slides" in capsys.readouterr().err
    for k in range(2):
        fold = json.load(open(tmp_path / "run" / f"fold_{k}" / "result.json"))
        assert fold["n_train"] + fold["n_test"] == 8
    bad = tmp_path / "run" / "fold_1" / "result.json"
    for text in ("[1]", "{", '{"test": 1}'):
        bad.write_text(text)
        assert finetune._finished_fold(str(bad), 1, fold["items"], str(emb)) is None
        assert "fold_1/result.json: unreadable" in capsys.readouterr().err


def _tiny_survival(tmp_path, censorship, n=24, splits="kfold:3"):
    """``n`` one-slide patients with distinct times (months 1..n) and the given censorship
    column; a mean-pool baseline for one epoch (seconds)."""
    emb = str(tmp_path / "emb")
    make_feature_cohort(emb, n, grid=2, regions=(1, 2))
    labels = write_labels(str(tmp_path / "surv.csv"), [
        {"slide_id": f"slide_{i:04d}", "case_id": f"case_{i:04d}", "survival_months": float(i + 1),
         "censorship": int(censorship[i])} for i in range(n)])
    c = lgp_survival.get_config("runlocal")
    c.data.embeddings, c.data.labels, c.data.splits = emb, labels, splits
    c.model.name, c.model.embed, c.model.attn_hidden = "mean_pool", 8, 4
    c.optim.epochs, c.train.buckets = 1, (4,)
    return c


def test_survival_reports_censorship_and_warns_when_most_patients_have_an_event(tmp_path, capsys):
    """A censorship column coded 1 = event gives a plausible C-index of the reversed outcome:
    patients, events and censored fraction are printed and recorded, and under half censored
    a note names the file, the numbers and the expected coding, without claiming the coding is
    wrong (a GBM cohort is mostly events). Plants: no _censorship_report call in load_items ->
    no "survival" info, no note, fails; the note's old 'TCGA cohorts are typically 60-90%
    censored: check that the column is not coded 1 = event' -> fails."""
    cens = np.arange(24) % 4 == 0  # 6 of 24 censored: a column coded the other way round
    c = _tiny_survival(tmp_path, cens)
    res = finetune.run(c, str(tmp_path / "run"), show_progress=False)
    err = capsys.readouterr().err
    s = res["info"]["survival"]
    assert (s["n_patients"], s["n_events"], s["censored_fraction"]) == (24, 18, 0.25)
    assert "24 patients, 18 events, 25% censored" in err
    assert (f"hipt-finetune: note: {c.data.labels}: 6 of 24 patients (25%) are censored, 18 had the event "
            "(column censorship: 1 = censored, 0 = event); if most of your patients had the event this is "
            "expected; otherwise check the coding\n") in err
    assert "TCGA" not in err and "WARNING" not in err
    assert json.load(open(tmp_path / "run" / "results.json"))["info"]["survival"]["warning"] == s["warning"]
    # Mostly censored, as expected: recorded, no note.
    assert "warning" not in finetune._censorship_report(c.data.labels, ~cens)
    assert "note" not in capsys.readouterr().err


def test_a_finished_rerun_reads_no_bag_and_a_partial_one_names_the_folds_it_keeps(tmp_path, capsys, monkeypatch):
    """A rerun of a finished run loaded, checked and encoded every bag before finding each fold
    done, and said nothing of the folds it kept. Now it rebuilds the same results from the
    folds' records without reading the bags' features, saying so; a rerun with a fold left to
    do names each fold it keeps. Plants: _run_folds without the _kept_run shortcut -> load_items
    called, fails; no 'finished earlier, kept' line in the fold loop -> fails."""
    cens = np.arange(24) % 4 != 0
    c = _tiny_survival(tmp_path, cens)
    run = tmp_path / "run"
    first = finetune.run(c, str(run), show_progress=False)
    capsys.readouterr()
    # what hipt-predict checks new bags against (plant: no embedding_geometry in the info -> fails)
    assert first["info"]["embedding_geometry"] == {"region_px": 4096, "target_mpp": 0.5}

    def no_bags(*a, **k):
        raise AssertionError("bags read for a run whose every fold was finished")

    with monkeypatch.context() as m:
        m.setattr(finetune, "load_items", no_bags)
        again = finetune.run(c, str(run), show_progress=False)
    assert "all 3 folds finished earlier, kept" in capsys.readouterr().err
    for key in ("folds", "summary", "n_items", "info", "failed_slides", "folds_source"):
        assert again[key] == first[key], key
    assert json.load(open(run / "results.json"))["info"] == first["info"]
    os.remove(run / "fold_2" / "result.json")
    finetune.run(c, str(run), show_progress=False)
    err = capsys.readouterr().err
    assert "fold 0: finished earlier, kept" in err and "fold 1: finished earlier, kept" in err
    assert "fold 2: finished" not in err and (run / "fold_2" / "result.json").is_file()


def test_a_rerun_redoes_the_folds_of_a_bag_replaced_since_and_keeps_a_touched_one(tmp_path, capsys):
    """The finished-run shortcut kept every fold when a bag had been replaced since (another
    extraction's bag with its own checksum, so nothing failed to read): results of bags that no
    longer exist, exit 0. Each fold now records its bags (size, mtime, SHA-256); a rerun hashes
    only bags whose mtime moved: a replaced bag redoes the folds trained on it, named; a touched
    one (same bytes) is kept and its new mtime recorded; results of an older version get their
    bags recorded, said. Plant: _finished_fold without the _changed_bag check -> all folds kept
    on the replaced bag, fails."""
    from data_prep import bags
    from tests.synthetic_cohort import write_embedding

    c = _tiny_survival(tmp_path, np.arange(12) % 3 == 0, n=12)
    run = tmp_path / "run"
    finetune.run(c, str(run), show_progress=False)
    fold0 = json.load(open(run / "fold_0" / "result.json"))
    assert "slide_0003" in fold0["bags"] and set(fold0["bags"]["slide_0003"]) == {"sha256", "bytes", "mtime_ns"}
    path = bags.find_bag(c.data.embeddings, "slide_0003")
    old = bags.read_bag(c.data.embeddings, "slide_0003")["features_cls256"]
    write_embedding(c.data.embeddings, "slide_0003", old + 1.0)  # same shape and size, other bytes
    capsys.readouterr()
    finetune.run(c, str(run), show_progress=False)
    err = capsys.readouterr().err
    assert "finished earlier, kept" not in err, err
    assert f"fold 0 was trained on {path}: its bytes changed since it was read" in err, err
    now = bags.bag_identity(path)
    for k in range(3):
        assert json.load(open(run / f"fold_{k}" / "result.json"))["bags"]["slide_0003"] == now
    os.utime(path, ns=(now["mtime_ns"] + 10**9, now["mtime_ns"] + 10**9))  # a touch: same bytes
    finetune.run(c, str(run), show_progress=False)
    assert "all 3 folds finished earlier, kept" in capsys.readouterr().err
    assert json.load(open(run / "fold_0" / "result.json"))["bags"]["slide_0003"]["mtime_ns"] == now["mtime_ns"] + 10**9
    for k in range(3):  # results of an older version: no record of their bags
        result = json.load(open(run / f"fold_{k}" / "result.json"))
        json.dump({key: v for key, v in result.items() if key != "bags"}, open(run / f"fold_{k}" / "result.json", "w"))
    finetune.run(c, str(run), show_progress=False)
    err = capsys.readouterr().err
    assert "fold 0: finished earlier, kept" in err and "fold(s) 0, 1, 2 did not record their bags" in err, err
    assert json.load(open(run / "fold_2" / "result.json"))["bags"] == result["bags"]


def test_an_absent_class_leaving_one_class_says_the_auc_is_undefined(capsys):
    """A binary fold whose test part has one class said its macro AUC 'averages the 1 classes
    present', then 'test auc: undefined'. With one class left the AUC is undefined, and said so.
    Plant: _record_absent_classes without the two-classes guard -> fails."""
    from hipt_jax.finetune.trainer import Item

    result = {}
    finetune._record_absent_classes(result, 0, {"test": [Item("a", None, 0), Item("b", None, 0)]}, ["x", "y"])
    assert capsys.readouterr().err == ("hipt-finetune: fold 0: no test slide of class(es) y: its AUC is "
                                       "undefined with one class\n")
    assert result["auc_absent_classes"] == {"test": ["y"]}
    finetune._record_absent_classes({}, 1, {"val": [Item("a", None, 0), Item("b", None, 1)]}, ["x", "y", "z"])
    assert "fold 1: no val slide of class(es) z: its macro AUC averages the 2 classes present" in \
        capsys.readouterr().err


def test_survival_kfold_falling_back_to_censorship_strata_is_said_and_recorded(tmp_path, capsys):
    """24 patients in 4 time bins x censorship: some strata hold fewer patients than the 3
    folds, so the folds are stratified by censorship only; that was silent.
    Plant: no warning appended in _splits' fallback -> fails."""
    c = _tiny_survival(tmp_path, np.arange(24) % 3 != 0)
    res = finetune.run(c, str(tmp_path / "run"), show_progress=False)
    err = capsys.readouterr().err
    notes = [w for w in res["fold_warnings"] if "stratified by censorship only" in w]
    assert len(notes) == 1 and c.data.labels in notes[0] and "time bin" in notes[0]
    assert err.count("stratified by censorship only") == 1


def test_tied_event_times_giving_duplicate_bin_edges_are_refused_naming_the_file(tmp_path):
    """MCAT's pd.qcut refuses duplicate quantile edges; ours made an empty time bin silently.
    Plant: no duplicate-edge check in quartile_bins -> the run starts, fails."""
    c = _tiny_survival(tmp_path, np.zeros(24, bool))
    rows = open(c.data.labels).read().splitlines()
    # 13 of the 24 event times equal: the 0, 25 and 50% quantiles coincide
    fixed = [rows[0]] + [r.replace(f",{i + 1}.0,", ",1.0,") if i < 13 else r for i, r in enumerate(rows[1:])]
    open(c.data.labels, "w").write("\n".join(fixed) + "\n")
    with pytest.raises(finetune.FinetuneError, match=r"surv\.csv: the 4 time bins .* duplicate edges "
                                                    r"\[1\.0, 1\.0, 1\.0, .*config\.train\.n_bins"):
        finetune.run(c, str(tmp_path / "run"), show_progress=False)
    assert not os.path.exists(tmp_path / "run")


def _write_splits(folder, folds):
    os.makedirs(folder)
    for k, (train, val, test) in enumerate(folds):
        n = max(map(len, (train, val, test)))
        with open(os.path.join(folder, f"splits_{k}.csv"), "w") as f:
            f.write(",train,val,test\n" + "".join(
                f"{j}," + ",".join(p[j] if j < len(p) else "" for p in (train, val, test)) + "\n" for j in range(n)))


def test_an_undefined_fold_metric_is_written_as_null_and_read_back_on_resume(tmp_path, capsys):
    """A fold whose test part has no event has no C-index: result.json and results.json held
    bare NaN tokens (not JSON for other tools). They hold null now, and a resumed run reads
    the finished fold's null back as an undefined value.
    Plants: write_json without finite_or_null -> strict parse fails; _finished_fold without
    the null -> NaN conversion -> the results table fails on None."""
    cens = np.ones(24, bool)
    cens[:10] = False
    c = _tiny_survival(tmp_path, cens, splits=str(tmp_path / "splits"))
    ids = [f"case_{i:04d}" for i in range(24)]
    _write_splits(tmp_path / "splits", [(ids[:5] + ids[10:18], [], ids[5:10] + ids[18:]),
                                        (ids[:10] + ids[10:14], [], ids[14:])])  # fold 1: no event in test
    run_dir = tmp_path / "run"
    first = finetune.run(c, str(run_dir), show_progress=False)
    assert np.isnan(first["folds"][1]["c_index"])

    def strict(path):
        def refuse(token):
            raise ValueError(f"{path}: bare {token}")
        return json.loads(open(path).read(), parse_constant=refuse)

    assert strict(run_dir / "fold_1" / "result.json")["test"]["c_index"] is None
    summary = strict(run_dir / "results.json")["summary"]["c_index"]
    assert (summary["n"], summary["of"], summary["std"]) == (1, 2, None)
    capsys.readouterr()
    again = finetune.run(c, str(run_dir), show_progress=False)  # both folds read from result.json
    assert np.isnan(again["folds"][1]["c_index"]) and again["summary"]["c_index"]["n"] == 1
    assert "(1 of 2 folds)" in (run_dir / "results.md").read_text()


def test_a_selection_metric_undefined_on_a_val_part_is_refused_before_training(tmp_path):
    """selection.metric=c_index with no event in a fold's val part (or auc with one class) is
    NaN at every epoch; the epoch-0 model was then reported as selected by it, exit 0.
    Refused before any work, naming the fold and the metric and suggesting metric=loss.
    Plant: no _check_selection_metric call in _splits -> the run trains, fails."""
    cens = np.ones(24, bool)
    cens[:8] = False  # the events
    c = _tiny_survival(tmp_path, cens, splits=str(tmp_path / "splits"))
    ids = [f"case_{i:04d}" for i in range(24)]
    _write_splits(tmp_path / "splits", [(ids[:4] + ids[8:18], ids[18:21], ids[4:8] + ids[21:])])  # val: censored only
    c.selection.metric = "c_index"
    with pytest.raises(finetune.FinetuneError, match=r"splits_0\.csv: its val part has 0 event\(s\) among 3 "
                                                    r"patients.*selection\.metric=c_index.*metric=loss"):
        finetune.run(c, str(tmp_path / "run"), show_progress=False)
    assert not os.path.exists(tmp_path / "run")
    c.selection.metric = "loss"  # the same splits with the loss: runs
    assert finetune.run(c, str(tmp_path / "run"), show_progress=False)["folds"][0]["fold"] == 0


def test_a_val_metric_never_finite_falls_back_to_the_final_epoch_and_says_so(tmp_path, capsys, monkeypatch):
    """If the selection metric is still NaN at every epoch (here forced), the final epoch's
    model is evaluated, and the fold's result and stderr say why instead of "selected by".
    Plant: the note not copied into evaluated in _run_folds -> fails."""
    from hipt_jax.finetune import trainer as trainer_mod

    real = trainer_mod.LGPTrainer._metrics
    monkeypatch.setattr(trainer_mod.LGPTrainer, "_metrics",
                        lambda self, logits, items: {**real(self, logits, items), "c_index": float("nan")})
    cens = np.arange(24) % 2 == 0
    c = _tiny_survival(tmp_path, cens, splits=str(tmp_path / "splits"))
    ids = [f"case_{i:04d}" for i in range(24)]
    _write_splits(tmp_path / "splits", [(ids[:14], ids[14:18], ids[18:])])
    c.selection.metric, c.optim.epochs = "c_index", 2
    finetune.run(c, str(tmp_path / "run"), show_progress=False)
    evaluated = json.load(open(tmp_path / "run" / "fold_0" / "result.json"))["evaluated"]
    assert (evaluated["model"], evaluated["selected_by"], evaluated["epoch"]) == ("final_epoch", "final_epoch", 1)
    assert evaluated["note"] == "val c_index was not finite at any epoch: the final epoch's model is used"
    assert "fold 0: val c_index was not finite at any epoch" in capsys.readouterr().err


def test_a_class_absent_from_a_val_part_is_named_and_its_auc_kept_for_selection(tmp_path, capsys):
    """Three classes, a val part without class c: its macro AUC averages the two present (the
    policy of every command), so selection.metric=auc selects by a real number, and the fold's
    result names the absent class. Plant: no _record_absent_classes call -> fails."""
    emb = str(tmp_path / "emb")
    classes = make_feature_cohort(emb, 24, n_classes=3, grid=2, regions=(1, 2), classes=np.arange(24) % 3)
    ids = [f"slide_{i:04d}" for i in range(24)]
    labels = write_labels(str(tmp_path / "l.csv"), [{"slide_id": s, "label": "abc"[c]} for s, c in zip(ids, classes)])
    val = [s for s, c in zip(ids, classes) if c != 2][:4]
    test = [s for s in ids[12:] if s not in val]
    _write_splits(tmp_path / "splits", [([s for s in ids if s not in val + test], val, test)])
    c = _subtyping_config(emb, labels, str(tmp_path / "splits"), epochs=2)
    c.model.name, c.model.embed, c.model.attn_hidden, c.train.buckets = "mean_pool", 8, 4, (4,)
    c.selection.metric = "auc"
    finetune.run(c, str(tmp_path / "run"), show_progress=False)
    result = json.load(open(tmp_path / "run" / "fold_0" / "result.json"))
    assert result["auc_absent_classes"] == {"val": ["c"]}
    assert result["evaluated"]["selected_by"] == "val_auc" and np.isfinite(result["val"]["auc"])
    assert "fold 0: no val slide of class(es) c" in capsys.readouterr().err


def _abmil_run(tmp_path, n=8):
    """An abmil cohort of ``n`` CLS-4K h5 bags, 2 folds, 1 epoch (seconds)."""
    emb = _cls4k_h5_bags(tmp_path / "h5", n, class_offset=True)
    labels = write_labels(str(tmp_path / "labels.csv"), [{"slide_id": f"s{i}", "label": "ab"[i % 2]} for i in range(n)])
    c = _subtyping_config(str(emb), labels, splits="kfold:2", epochs=1)
    c.model.name = "abmil"
    return c


def test_a_full_disk_while_saving_a_fold_is_exit_1_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    """Orbax raises a full disk as ValueError: it was reported as bad input (exit 2), which also
    took back provenance.json although fold 0 was finished, so the plain rerun was refused as
    "made with other inputs". Now: exit 1, one line naming the fold's checkpoint, no partial
    checkpoint, and the rerun keeps fold 0. Plant: checkpoint.save without its write-failure
    branch -> exit 2, fails."""
    import orbax.checkpoint as ocp

    from hipt_jax import provenance
    from hipt_jax.cli import flags

    c = _abmil_run(tmp_path)
    real = ocp.StandardCheckpointer.save

    def fills_at_fold_1(self, directory, *args, **kwargs):
        if "fold_1" in str(directory):
            os.makedirs(f"{directory}.orbax-checkpoint-tmp", exist_ok=True)
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file '
                             f'"{directory}.orbax-checkpoint-tmp/": No space left on device [os_error_code=\'28\']')
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fills_at_fold_1)
    work = tmp_path / "run"
    code = flags.run_command("hipt-finetune", lambda: finetune.run(c, str(work), show_progress=False) and 0,
                             devices_at_start=False)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == flags.EXIT_ITEMS_FAILED
    assert last.startswith(f"hipt-finetune: error: {work / 'fold_1' / 'checkpoint'}: write failed "
                           "(No space left on device)"), last
    assert (work / provenance.FILE).is_file() and (work / "fold_0" / "result.json").is_file()
    assert not [p for p in os.listdir(work / "fold_1") if p.startswith("checkpoint")]
    fold_0 = os.stat(work / "fold_0" / "result.json").st_mtime_ns
    monkeypatch.undo()
    again = finetune.run(c, str(work), show_progress=False)
    assert len(again["folds"]) == 2 and os.stat(work / "fold_0" / "result.json").st_mtime_ns == fold_0


def test_a_run_refused_after_a_finished_fold_keeps_its_provenance(tmp_path, monkeypatch):
    """A bad-input refusal (exit 2) takes back a provenance record only while the folder holds
    none of the run's outputs, looked at when it refuses: the folds were listed when the record
    was written (none yet), so a refusal in fold 1 removed it and the rerun was refused ("no
    provenance.json"). Plant: _outputs listing the fold_* folders there at the start -> fails."""
    from hipt_jax import provenance
    from hipt_jax.cli import flags

    c = _abmil_run(tmp_path)
    real, calls = finetune.LGPTrainer.train, []

    def refused_in_fold_1(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise finetune.FinetuneError("fold 1: refused")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(finetune.LGPTrainer, "train", refused_in_fold_1)
    work = tmp_path / "run"
    code = flags.run_command("hipt-finetune", lambda: finetune.run(c, str(work), show_progress=False) and 0,
                             devices_at_start=False)
    assert code == flags.EXIT_BAD_INPUT and (work / "fold_0" / "result.json").is_file()
    assert (work / provenance.FILE).is_file()
    monkeypatch.undo()
    assert len(finetune.run(c, str(work), show_progress=False)["folds"]) == 2


def test_a_fold_whose_checkpoint_was_damaged_is_redone_by_the_rerun(tmp_path, capsys):
    """A finished fold (its result.json) was skipped on rerun without looking at its checkpoint:
    one zero-filled since stayed, and hipt-predict failed on it with no way out. The rerun now
    verifies each finished fold's checkpoint against the checksum in its arch.json and redoes a
    damaged fold, saying so; hipt-predict's error says to rerun hipt-finetune. Plant:
    _finished_fold without _damaged_checkpoint -> fold 0 kept, predict still fails, fails;
    FoldModel without the remedy -> the bare "damaged checkpoint" message, fails."""
    from hipt_jax.finetune import predict
    from hipt_jax.models import checkpoint
    from tests.synthetic_cohort import small_labelled_feature_cohort

    emb, labels = small_labelled_feature_cohort(tmp_path)
    c, work = _subtyping_config(emb, labels, splits="kfold:2", epochs=1), tmp_path / "run"
    c.model.name, c.model.embed, c.model.attn_hidden = "mean_pool", 8, 4
    finetune.run(c, str(work), show_progress=False)
    state = work / "fold_0" / "checkpoint" / checkpoint.STATE_DIR
    data = max((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.write(bytes(os.path.getsize(data)))
    with pytest.raises(checkpoint.CheckpointError, match="damaged checkpoint .*rerun hipt-finetune on the run folder"):
        predict.predict_run(str(work), c.data.embeddings, str(tmp_path / "p.csv"), show_progress=False)
    kept = os.stat(work / "fold_1" / "result.json").st_mtime_ns
    capsys.readouterr()
    finetune.run(c, str(work), show_progress=False)
    assert f"{state}: damaged checkpoint" in capsys.readouterr().err
    assert os.stat(work / "fold_1" / "result.json").st_mtime_ns == kept
    res = predict.predict_run(str(work), c.data.embeddings, str(tmp_path / "p.csv"), show_progress=False)
    assert res["failed_slides"] == {}


def test_numeric_ids_that_lost_their_leading_zeros_are_refused_before_any_work(tmp_path):
    """Slide ids 001..009 saved through a spreadsheet as 1..9: those slides were skipped as "not
    extracted" and the run went on without them. Plant: no check_leading_zeros in _extracted ->
    the run trains (here: no error raised)."""
    from hipt_jax.evaluation.cohort import CohortError
    from tests.synthetic_cohort import zero_padded_cohort

    emb = str(tmp_path / "emb")
    rows = zero_padded_cohort(emb, 12)
    c = _subtyping_config(emb, write_labels(str(tmp_path / "labels.csv"), rows), splits="kfold:2", epochs=1)
    c.model.name = "abmil"
    with pytest.raises(CohortError, match=r"slide_id '1' has no bag but '001' .* lost their leading zeros"):
        finetune.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_split_ids_that_lost_their_leading_zeros_are_refused_before_any_work(tmp_path):
    """A split file listing slides 001..003 as 1..3 beside correct ids: they were skipped as
    "not in the labels" and the folds trained without them. Plant: no check_split_leading_zeros
    call in plan_folds -> the run trains (here: no error raised)."""
    from hipt_jax.evaluation.cohort import CohortError
    from tests.synthetic_cohort import padded_id_cohort

    emb, ids, labels = padded_id_cohort(tmp_path, 12)
    _write_splits(tmp_path / "splits", [(["1", "2", "3", *ids[3:8]], [], ids[8:])])
    c = _subtyping_config(emb, labels, splits=str(tmp_path / "splits"), epochs=1)
    c.model.name = "abmil"
    with pytest.raises(CohortError, match=r"splits_0\.csv: id '1' is not in .*labels\.csv, which has '001' "
                                          r"\(3 such id\(s\)\): the ids lost their leading zeros"):
        finetune.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_an_earlier_runs_splits_in_the_workdir_are_refused_and_overwrite_clears_them(tmp_path, monkeypatch):
    """data.splits = WORKDIR/splits (an earlier run's folds, reused in its own workdir): the
    run wrote the folds it used over them (bagless slides dropped, case ids turned slide ids)
    and the next run saw other inputs. Refused, the files untouched. And --overwrite cleared
    fold_*/ and results but left splits/ and summary.csv: a run that then failed left the old
    run's folds and metrics beside the new record. Plants: the splits dropped from
    _check_workdir_apart's inputs -> the run goes on (fails); _outputs without splits and
    summary.csv -> they survive the overwrite (fails)."""
    emb = _cls4k_h5_bags(tmp_path / "h5", 8, class_offset=True)
    labels = write_labels(str(tmp_path / "labels.csv"), [{"slide_id": f"s{i}", "label": "ab"[i % 2]}
                                                         for i in range(8)])
    c = _subtyping_config(str(emb), labels, splits="kfold:2", epochs=1)
    c.model.name = "abmil"
    work = tmp_path / "w"
    finetune.run(c, str(work), show_progress=False)
    written = {f: (work / "splits" / f).read_bytes() for f in os.listdir(work / "splits")}
    c.data.splits = str(work / "splits")
    with pytest.raises(finetune.FinetuneError, match=r"splits: the split files \(config.data.splits\) lies in .*w/splits, "):
        finetune.run(c, str(work), show_progress=False)
    assert {f: (work / "splits" / f).read_bytes() for f in os.listdir(work / "splits")} == written
    c.data.splits = "kfold:2"
    assert (work / "summary.csv").is_file()
    monkeypatch.setattr(finetune, "_run_folds", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        finetune.run(c, str(work), show_progress=False, overwrite=True)
    assert sorted(os.listdir(work)) == ["provenance.json"]


def test_a_workdir_that_holds_the_input_bags_is_refused(tmp_path):
    """--workdir equal to a folder of TRIDENT h5 bags given as data.embeddings (no
    provenance.json there): the run wrote fold_*/, results.json and provenance.json among the
    bags, exit 0, and the next run read that provenance.json as the embeddings'. A symlink to
    it, and an embeddings folder that is one of the workdir's outputs (WORKDIR/fold_0), are
    refused too, and so is a workdir named like a bag among the bags (EMB/run.h5); a workdir
    inside the bag folder otherwise still runs, and its outputs are not read as
    bags. Plant: no _check_workdir_apart call in run -> the first run trains."""
    emb = _cls4k_h5_bags(tmp_path / "h5", 8, class_offset=True)
    labels = write_labels(str(tmp_path / "labels.csv"), [{"slide_id": f"s{i}", "label": "ab"[i % 2]}
                                                         for i in range(8)])
    c = _subtyping_config(str(emb), labels, splits="kfold:2", epochs=1)
    c.model.name = "abmil"
    bags_there = sorted(os.listdir(emb))
    os.symlink(emb, tmp_path / "link")
    for work in (emb, tmp_path / "link"):
        with pytest.raises(finetune.FinetuneError, match=rf"^{re.escape(str(work))}: holds the input bags \(config.data.embeddings="):
            finetune.run(c, str(work), show_progress=False)
        assert sorted(os.listdir(emb)) == bags_there
    os.makedirs(tmp_path / "w")
    os.rename(emb, tmp_path / "w" / "fold_0")
    c.data.embeddings = str(tmp_path / "w" / "fold_0")
    with pytest.raises(finetune.FinetuneError, match=r"fold_0: the embeddings folder .* lies in .*w/fold_0, which "):
        finetune.run(c, str(tmp_path / "w"), show_progress=False)
    assert sorted(os.listdir(tmp_path / "w")) == ["fold_0"]
    os.rename(tmp_path / "w" / "fold_0", emb)
    c.data.embeddings = str(emb)
    with pytest.raises(ValueError, match=r"run\.h5: would sit among the bags of "):
        finetune.run(c, str(emb / "run.h5"), show_progress=False)
    finetune.run(c, str(emb / "run"), show_progress=False)
    assert os.path.isfile(emb / "run" / "results.json")
    from data_prep import bags
    assert sorted(bags.list_bags(str(emb))) == [f"s{i}" for i in range(8)]
