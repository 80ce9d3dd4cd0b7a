"""Every command on every class of bad input: exit code, one line naming the file or field, no
traceback, and nothing left behind that a later command would accept.

Classes: numeric parameters out of range (flags and config fields), unknown config fields,
output locations that are files / not writable, outputs reused after the inputs changed
(weights, precomputed features, labels, config), a second run in a locked workdir, damaged
checkpoints (fallback to an older one; flipped bytes), a full disk during a run, Ctrl-C.
argparse commands run in-process; the absl ones (pretrain, finetune) as subprocesses, because
absl keeps its flags in one global registry. Each test names the bug planted once to see it fail.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep import bags
from hipt_jax import provenance, workdir_lock
from tests.cli_helpers import ENV, call_main, run_module
from tests.synthetic_cohort import (make_feature_cohort, make_tissue_cohort, small_labelled_feature_cohort,
                                     write_feature_grids, write_labels)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_one_line(code, err, prog, *needles, exit_code=2):
    """Exit code, exactly one line from ``prog`` (other lines: absl/XLA logging), no traceback."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    ours = [line for line in err.strip().splitlines() if line.startswith(prog)]
    assert len(ours) == 1, err
    for needle in needles:
        assert needle in ours[0], ours[0]


_in_process = call_main
_subprocess = run_module


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """4 slides of one 256 px region each, in hipt-prep's layout."""
    root = tmp_path_factory.mktemp("prep")
    prep_dir, rows = make_tissue_cohort(str(root), n_per_class=2, regions=(1, 1), size=256, seed=0)
    return prep_dir


@pytest.fixture(scope="module")
def feature_cohort(tmp_path_factory):
    """6 extracted slides and their labels (hipt-knn / hipt-finetune input)."""
    return small_labelled_feature_cohort(tmp_path_factory.mktemp("features"))


# ------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("command, argv, needle", [
    ("prep", ["regions", "--slides", "S", "--out", "{out}", "--target-mpp", "0"], "--target-mpp"),
    ("prep", ["regions", "--slides", "S", "--out", "{out}", "--target-mpp", "nan"], "--target-mpp"),
    ("prep", ["regions", "--slides", "S", "--out", "{out}", "--assume-mpp", "-0.25"], "--assume-mpp"),
    ("prep", ["regions", "--slides", "S", "--out", "{out}", "--min-tissue", "1.5"], "--min-tissue"),
    ("prep", ["regions", "--slides", "S", "--out", "{out}", "--workers", "0"], "--workers"),
    ("prep", ["coords", "--slides", "S", "--out", "{out}", "--region", "512", "--mask-px", "512"],
     "--mask-px 512: tissue-mask pixels of 512 px leave 512 px regions 1 mask px a side"),
    ("prep", ["patches", "--regions", "R", "--out", "{out}", "--jpeg-quality", "0"], "--jpeg-quality"),
    ("embed", ["--random-init", "tiny", "--image", "x.png", "--out", "{out}/o.npz", "--patch-batch", "0"], "--patch-batch"),
    ("extract", ["--random-init", "tiny", "--shards", "S", "--out", "{out}", "--batch-per-device", "0"], "--batch-per-device"),
    ("extract", ["--random-init", "tiny", "--shards", "S", "--out", "{out}", "--seed", "-1"], "--seed"),
    ("knn", ["--embeddings", "E", "--labels", "L", "--k", "0", "--out", "{out}/r.json"], "--k"),
    ("knn", ["--embeddings", "E", "--labels", "L", "--temperature", "0", "--out", "{out}/r.json"], "--temperature"),
    ("knn", ["--embeddings", "E", "--labels", "L", "--k-dino", "-3", "--out", "{out}/r.json"], "--k-dino"),
    ("heatmap", ["--random-init", "tiny", "--image", "x.png", "--out", "{out}", "--scale", "0"], "--scale"),
    ("heatmap", ["--random-init", "tiny", "--image", "x.png", "--out", "{out}", "--size", "10"], "--size"),
])
def test_numeric_flags_out_of_range_exit_2_before_any_work(command, argv, needle, tmp_path, capsys):
    """Plant: --target-mpp parsed with type=float (0 reached the reader: ZeroDivisionError per
    slide); --k with type=int (k=0 gave NaN metrics)."""
    import importlib

    out = tmp_path / "out"
    main = importlib.import_module(f"hipt_jax.cli.{command}").main
    code, _, err = _in_process(main, [a.format(out=out) for a in argv], capsys)
    assert_one_line(code, err, "hipt-", needle)
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("module, argv, needles", [
    ("hipt_jax.cli.finetune", ["--config", "configs/lgp_subtyping.py:runlocal", "--config.optim.lrr=1"],
     ("unknown config field config.optim.lrr", "config.optim.lr?")),
    ("hipt_jax.cli.finetune", ["--config", "configs/lgp_subtyping.py:runlocal", "--config.optim.epochs=-1"],
     ("config.optim.epochs",)),
    ("hipt_jax.cli.pretrain", ["--config", "configs/pretrain_vit256.py:runlocal", "--config.checkpoint.every_steps=0"],
     ("config.checkpoint.every_steps",)),
    ("hipt_jax.cli.pretrain", ["--config", "configs/pretrain_vit256.py:runlocal", "--config.data.norm=halfs"],
     ("config.data.norm='halfs'",)),
])
def test_config_fields_range_checked_and_unknown_ones_name_the_closest(module, argv, needles, tmp_path):
    """Plant: no check_config call (epochs=-1 trained nothing and reported exit 0); the raw
    ml_collections KeyError (a traceback) instead of config_override_error."""
    workdir = tmp_path / "run"
    code, _, err = _subprocess(module, *argv, f"--workdir={workdir}")
    assert_one_line(code, err, module.replace("hipt_jax.cli.", "hipt-"), *needles)
    assert not workdir.exists()


@pytest.mark.parametrize("module, argv, needle", [
    ("hipt_jax.cli.pretrain", ["--config", "configs/lgp_subtyping.py:runlocal", "--workdir={workdir}"],
     "configs/lgp_subtyping.py:runlocal: has no field config.global_batch"),
    ("hipt_jax.cli.profile", ["--config", "configs/pretrain_vit256.py:runlocal"],
     "configs/pretrain_vit256.py:runlocal: has no field config.repeats"),
])
def test_a_config_file_of_another_command_is_named_not_a_traceback(module, argv, needle, tmp_path):
    """Plant: check_config indexing the config without looking (a KeyError traceback, exit 1)."""
    workdir = tmp_path / "run"
    code, _, err = _subprocess(module, *(a.format(workdir=workdir) for a in argv))
    assert_one_line(code, err, module.replace("hipt_jax.cli.", "hipt-"), needle, "another command")
    assert not workdir.exists()


def test_finetune_splits_spec_takes_the_documented_val_form():
    """kfold:K:val=F (README, patient-level protocol) is accepted; K < 2, a val fraction >= 1
    or junk is refused before any work. Plant: the old check (everything after "kfold:" must
    be an integer) -> kfold:3:val=0.3 refused, fails."""
    from hipt_jax.cli.finetune import check_splits_spec
    from hipt_jax.cli.flags import UsageError

    for good in ("kfold:3", "kfold:3:val=0.3", "splits/brca"):
        check_splits_spec(good)
    for bad, needle in (("kfold:1", "K >= 2"), ("kfold:3:val=1.5", "val fraction"), ("kfold:x", "kfold:K")):
        with pytest.raises(UsageError, match=needle):
            check_splits_spec(bad)


def test_closest_config_field_is_named_even_when_far_off():
    """Plant: difflib cutoff left at its default 0.6 (no suggestion for a far-off name)."""
    from configs.lgp_subtyping import get_config
    from hipt_jax.cli.flags import UsageError, _closest_field, check_config, int_at_least

    config = get_config("runlocal")
    assert "did you mean config.optim." in _closest_field(config, "optim.zzzz")
    assert _closest_field(config, "optim.lr") == ""
    config.optim.epochs = 0
    with pytest.raises(UsageError, match="config.optim.epochs"):
        check_config(config, {"optim.epochs": int_at_least(1)})


def test_knn_k_larger_than_a_training_set_is_refused(feature_cohort, tmp_path, capsys):
    """Plant: no _check_k (k=5 on 4 training slides was accepted and gave a meaningless AUC)."""
    from hipt_jax.cli.knn import main

    emb, labels = feature_cohort
    out = tmp_path / "r.json"
    code, _, err = _in_process(main, ["--embeddings", emb, "--labels", labels, "--splits", "kfold:3",
                                      "--k", "5", "--out", out], capsys)
    assert_one_line(code, err, "hipt-knn", "--k 5", "smallest training set")
    assert not out.exists()


# ------------------------------------------------------------------------------ output locations
def test_output_locations_checked_before_work(prep, feature_cohort, tmp_path, capsys):
    """Plant: no flags.check_output_dir / check_output_file at the start of hipt-extract and
    hipt-knn (an --out that is a file gave a traceback after the computing was done)."""
    from hipt_jax.cli import extract, knn

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = _in_process(extract.main, ["--random-init", "tiny", "--shards", prep, "--out", a_file], capsys)
    assert_one_line(code, err, "hipt-extract", str(a_file), "not a folder")
    emb, labels = feature_cohort
    code, _, err = _in_process(knn.main, ["--embeddings", emb, "--labels", labels, "--out", tmp_path], capsys)
    assert_one_line(code, err, "hipt-knn", str(tmp_path), "is a folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            code, _, err = _in_process(knn.main, ["--embeddings", emb, "--labels", labels,
                                                  "--out", ro / "r.json"], capsys)
            assert_one_line(code, err, "hipt-knn", str(ro), "not writable")
        finally:
            ro.chmod(0o755)


# ------------------------------------------------------------------------------ provenance
def test_extract_rerun_with_other_weights_stops_with_a_diff(prep, tmp_path, capsys):
    """Plant: extract_cohort without provenance.check (a rerun with other weights kept the old
    bags, added new ones, and exited 0)."""
    from hipt_jax.cli.extract import main

    out = tmp_path / "emb"
    base = ["--random-init", "tiny", "--shards", prep, "--out", out, "--no-progress"]
    code, _, err = _in_process(main, base + ["--seed", "0"], capsys)
    assert code == 0, err
    first = bags.read_bag(str(out), "c0_s000")["slide_embedding"]
    mtimes = {p: os.path.getmtime(p) for p in bags.list_bags(str(out)).values()}
    code, _, err = _in_process(main, base + ["--seed", "1"], capsys)
    assert_one_line(code, err, "hipt-extract", str(out), "vit256: random:tiny:seed0 -> random:tiny:seed1",
                    "--overwrite")
    assert {p: os.path.getmtime(p) for p in bags.list_bags(str(out)).values()} == mtimes
    assert bags.read_bag(str(out), "c0_s000")["slide_embedding"].shape == first.shape
    # --overwrite: the old bags and manifest go, the new fingerprint is recorded (the run
    # itself is the one above; here only what --overwrite does to the folder).
    fp = dict(provenance.read(str(out)), vit256="random:tiny:seed1")
    assert provenance.check(str(out), fp, outputs=("slides", "manifest.json"), overwrite=True) == "overwritten"
    assert not bags.list_bags(str(out)) and provenance.read(str(out))["vit256"] == "random:tiny:seed1"


def test_precomputed_features_must_come_from_the_requested_vit256(prep, tmp_path, capsys):
    """Plant: no check_feature_model (features of another ViT-256 silently overrode --vit256)."""
    from hipt_jax.cli.extract import main

    feats = tmp_path / "feats"
    (feats / "features").mkdir(parents=True)
    (feats / "features" / "c0_s000.array_record").write_bytes(b"")
    argv = ["--random-init", "tiny", "--shards", prep, "--features", feats, "--out", tmp_path / "emb"]
    code, _, err = _in_process(main, argv, capsys)
    assert_one_line(code, err, "hipt-extract", str(feats), "do not record which ViT-256")
    (feats / "manifest.json").write_text(json.dumps({"params": {"vit256_id": "0123abcd" * 8}}))
    code, _, err = _in_process(main, argv, capsys)
    assert_one_line(code, err, "hipt-extract", str(feats), "another ViT-256")
    assert not bags.list_bags(str(tmp_path / "emb"))


def test_finetune_reuses_no_fold_after_labels_or_config_changed(feature_cohort, tmp_path):
    """Plant: run() without provenance.check (fold_0/result.json of the old labels was reported
    under the new ones)."""
    from configs.lgp_subtyping import get_config
    from hipt_jax.finetune.main import fingerprint, run

    emb, labels = feature_cohort
    # Two classes of 3 slides: a cohort the fold rules accept (each class in every training part).
    rows = open(labels).read().splitlines()
    two_classes = "\n".join([rows[0]] + [r.replace(",t2", ",t0") for r in rows[1:]]) + "\n"
    my_labels = tmp_path / "labels.csv"
    my_labels.write_text(two_classes)
    config = get_config("runlocal")
    config.data.embeddings, config.data.labels = emb, str(my_labels)
    config.data.splits = "kfold:2"
    workdir = tmp_path / "run"
    provenance.check(str(workdir), fingerprint(config))
    (workdir / "fold_0").mkdir()
    (workdir / "fold_0" / "result.json").write_text("{}")
    # The same cohort, rows in another order: the labels file changed.
    my_labels.write_text("\n".join([rows[0]] + two_classes.splitlines()[1:][::-1]) + "\n")
    with pytest.raises(provenance.ProvenanceError, match="labels: "):
        run(config, str(workdir), show_progress=False)
    my_labels.write_text(two_classes)
    config.optim.lr = 1e-3
    with pytest.raises(provenance.ProvenanceError, match="config: "):
        run(config, str(workdir), show_progress=False)
    assert (workdir / "fold_0" / "result.json").exists()  # kept for the user to decide
    assert provenance.check(str(workdir), fingerprint(config), outputs=["fold_0"], overwrite=True) == "overwritten"
    assert not (workdir / "fold_0").exists()


# ------------------------------------------------------------------------------ locks
def test_workdir_lock_names_the_holder_and_takes_over_dead_ones(tmp_path):
    """Plant: acquire() without O_EXCL (two runs shared one workdir); no liveness check (a
    SIGKILLed run's lock blocked every later run)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / workdir_lock.LOCK
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(workdir_lock.LockedError, match=f"pid {sleeper.pid} on host {socket.gethostname()}"):
            workdir_lock.acquire(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    path = workdir_lock.acquire(str(tmp_path))  # the holder is dead now
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    workdir_lock.release(path)
    assert not lock.exists()


@pytest.mark.parametrize("content", ["", '{"pid": 12', "[1, 2]", '{"pid": "7", "host": 3}', "ours"])
def test_a_corrupt_lock_or_our_own_pid_is_taken_over(tmp_path, capsys, monkeypatch, content):
    """A lock file left empty or half written (killed between its O_EXCL create and its write, a
    full disk) named "pid None on host None" and refused every later run; one naming our own pid
    on this host (a container restarted in a new pid namespace) was refused as "another run".
    Both are stale. Plant: acquire() refusing unless the holder is a dead pid -> LockedError."""
    monkeypatch.setattr(workdir_lock, "CORRUPT_WAIT_S", 0.1)
    lock = tmp_path / workdir_lock.LOCK
    if content == "ours":
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    lock.write_text(content)
    path = workdir_lock.acquire(str(tmp_path))
    assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert f"note: {lock}: taking over the lock: " in capsys.readouterr().err
    workdir_lock.release(path)
    assert not lock.exists()


def test_a_lock_being_written_is_not_taken_over(tmp_path):
    """A run that has just created the lock (empty for a moment) keeps it: the file is read again
    for CORRUPT_WAIT_S before it counts as corrupt (plant: no wait -> the lock is stolen)."""
    import threading

    lock = tmp_path / workdir_lock.LOCK
    lock.write_text("")
    holder = {"pid": 1, "host": socket.gethostname()}  # pid 1 is always alive
    timer = threading.Timer(0.2, lambda: lock.write_text(json.dumps(holder)))
    timer.start()
    with pytest.raises(workdir_lock.LockedError, match=f"pid 1 on host {socket.gethostname()}"):
        workdir_lock.acquire(str(tmp_path))
    timer.join()


@pytest.mark.parametrize("stage, field, value, needle", [
    (1, "data.norm", "halfs", "config.data.norm='halfs': expected one of ['half', 'imagenet']"),
    (1, "crops.global_size", 8, "config.crops.global_size=8: must be a multiple of the patch size"),
    (1, "crops.local_scale", (0.4, 0.05), "config.crops.local_scale=(0.4, 0.05): expected (low, high)"),
    (2, "crops.global_size", 20, "config.crops.global_size=20: a window of the 16x16 feature grid"),
    (1, "model.num_heads", 5, "config.model.num_heads=5: must divide"),
    (1, "model.depth", 0, "config.model.depth=0"),
    (2, "data.samples_per_epoch", 0, "config.data.samples_per_epoch=0: expected -1 (auto) or an integer >= 1"),
    (1, "microbatches", 0, "config.microbatches=0"),
    # a mesh axis of 0 devices was a ZeroDivisionError traceback in sharding.make_mesh
    (1, "mesh.fsdp", 0, "config.mesh.fsdp=0: expected -1 (auto) or an integer >= 1"),
    # model.arch labels the export: a pixel ViT labelled vit4k failed in hipt-embed (Flax shapes)
    (1, "model.arch", "vit4k", "config.model.arch='vit4k': stage 1 trains a vit256 (model.arch='vit256', "
                               "model.stem='pixels', model.in_features=3 (RGB))"),
    (2, "model.stem", "pixels", "config.model.stem='pixels': stage 2 trains a vit4k"),
    (1, "model.in_features", 384, "config.model.in_features=384: stage 1 trains a vit256"),
    # --config.data.grid=4 (one number for a pair) became (4,): an IndexError traceback
    (2, "data.grid", (4,), "config.data.grid=(4,): expected a pair (rows, cols), e.g. --config.data.grid='(4,4)'"),
    (1, "crops.global_scale", (0.5,), "config.crops.global_scale=(0.5,): expected a pair (low, high)"),
])
def test_pretrain_config_values_that_cannot_work_are_refused_before_any_work(stage, field, value, needle):
    """Without these checks: a KeyError traceback for the norm, ZeroDivisionError for 8 px
    crops, "high - low < 0" after the build for a reversed scale, a blockless model exported
    with exit 0. Plants seen failing: the scale check removed; model.depth dropped from the
    ranges; samples_per_epoch back to int_at_least(-1). (The CLI's call is checked by the
    data.norm case of test_config_fields_range_checked_and_unknown_ones_name_the_closest.)"""
    from configs import pretrain_vit256, pretrain_vit4k
    from hipt_jax.cli import flags, pretrain

    config = (pretrain_vit256 if stage == 1 else pretrain_vit4k).get_config()
    node, _, leaf = ("." + field).rpartition(".")
    (config if not node else config[node[1:]])[leaf] = value
    with pytest.raises(flags.UsageError) as e:
        flags.check_config(config, pretrain.CONFIG_RANGES)
        pretrain.check_views_and_model(config)
    assert needle in str(e.value)
    pretrain.check_views_and_model((pretrain_vit256 if stage == 1 else pretrain_vit4k).get_config())  # defaults pass


def _resume(workdir, config):
    """What hipt-pretrain does with a run directory before it trains: -> provenance.check's word."""
    from hipt_jax import provenance
    from hipt_jax.pretrain import trainer

    now = trainer.fingerprint(config)
    details = {"config": trainer.hashed_config(config), "data": now["data"]}
    trainer.reconcile_record(workdir, config, now, details)
    return provenance.check(workdir, now, outputs=trainer.RUN_OUTPUTS, details=details)


def test_pretrain_resumes_on_moved_or_edited_data_and_refuses_other_data(tmp_path):
    """A run directory records its data both where it resolves and by what it holds; a resume
    goes on when either matches. A copy of the data elsewhere (staged to a node's local disk)
    was refused until --resume-anyway (the path was the record); the same folder with an image
    deleted goes on (the checkpoint's data record then warns); other data is refused, also
    behind the same relative path typed from another folder. Plants: the path alone decides ->
    the copy is refused; the content alone -> the edited folder is refused; the path as typed ->
    the other folder's data resumes."""
    import shutil

    from configs import pretrain_vit256
    from hipt_jax import provenance

    def dataset(folder, *images):
        folder.mkdir(parents=True)
        for i, content in enumerate(images):
            (folder / f"p{i}.png").write_bytes(content)
        return folder

    data = dataset(tmp_path / "data", b"image 0", b"image 1")
    config = pretrain_vit256.get_config()
    config.data.path = str(data)
    workdir = str(tmp_path / "run")
    assert _resume(workdir, config) == "new"
    os.makedirs(os.path.join(workdir, "checkpoints"))
    shutil.copytree(data, tmp_path / "scratch" / "copy")
    config.data.path = str(tmp_path / "scratch" / "copy")
    assert _resume(workdir, config) == "match"  # the copy
    (tmp_path / "scratch" / "copy" / "p1.png").unlink()
    assert _resume(workdir, config) == "match"  # the same folder, an image deleted
    config.data.path = str(dataset(tmp_path / "other", b"other image"))
    with pytest.raises(provenance.ProvenanceError, match="made with other inputs"):
        _resume(workdir, config)  # another path and other content

    # The same relative path typed from another folder, a link to other data there.
    for name, content in (("a", b"image a"), ("b", b"image b")):
        dataset(tmp_path / f"data_{name}", content)
        (tmp_path / name).mkdir()
        os.symlink(tmp_path / f"data_{name}", tmp_path / name / "pp")
    config.data.path = "pp"
    here = os.getcwd()
    try:
        os.chdir(tmp_path / "a")
        assert _resume(str(tmp_path / "run2"), config) == "new"
        os.makedirs(tmp_path / "run2" / "checkpoints")
        os.chdir(tmp_path / "b")
        with pytest.raises(provenance.ProvenanceError, match="made with other inputs"):
            _resume(str(tmp_path / "run2"), config)
    finally:
        os.chdir(here)


def test_a_run_recorded_by_data_path_resumes_and_is_rewritten(tmp_path):
    """Run directories recorded before the data entered by content hold the config hash with
    data.path in it and data_path: the same run resumes (its record rewritten in today's form),
    a run on data at another path is still refused. Plant: reconcile_record without its
    data_path branch -> the same run is refused."""
    from configs import pretrain_vit256
    from hipt_jax import provenance
    from hipt_jax.pretrain import trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / "p0.png").write_bytes(b"image")
    config = pretrain_vit256.get_config()
    config.data.path = str(data)
    workdir = str(tmp_path / "run")
    old = trainer._recorded_by_path(config)
    provenance.write(workdir, old, {"config": trainer.hashed_config(config)})
    os.makedirs(os.path.join(workdir, "checkpoints"))
    assert _resume(workdir, config) == "match"
    assert "data" in provenance.read(workdir)  # rewritten
    provenance.write(workdir, old, {"config": trainer.hashed_config(config)})
    other = tmp_path / "other"
    other.mkdir()
    (other / "p0.png").write_bytes(b"other image")
    config.data.path = str(other)
    with pytest.raises(provenance.ProvenanceError, match="made with other inputs"):
        _resume(workdir, config)


def test_a_dataset_smaller_than_one_batch_is_noted(capsys):
    """Three images and a batch of four trained with no word (plant: no note -> fails)."""
    from configs import pretrain_vit256
    from hipt_jax.pretrain import trainer

    config = pretrain_vit256.get_config("runlocal")
    config.data.path = "tiny_folder"
    assert trainer._steps_per_epoch(config, [0] * 3) == 1
    assert "tiny_folder holds 3 sample(s), fewer than one global batch of 4" in capsys.readouterr().err
    trainer._steps_per_epoch(config, [0] * 4)
    assert "note" not in capsys.readouterr().err


def test_refused_run_leaves_no_provenance_behind(tmp_path, capsys):
    """A run refused after its workdir's provenance was recorded (the data folder is checked
    when the run starts) must not keep it: the corrected rerun was refused as "made with other
    inputs". Outputs already written keep theirs. Plant: no forget_new_records on exit 2."""
    from hipt_jax.cli import flags

    work = tmp_path / "w"

    def refused():
        provenance.check(str(work), {"data": "typo"}, outputs=("checkpoints",))
        raise FileNotFoundError(f"{tmp_path}/typo: not a folder")

    assert flags.run_command("prog", refused, devices_at_start=False) == flags.EXIT_BAD_INPUT
    assert not (work / provenance.FILE).exists()
    # once the run has written outputs, the record stays with them

    def refused_after_work():
        provenance.check(str(work), {"data": "x"}, outputs=("checkpoints",))
        (work / "checkpoints").mkdir()
        raise FileNotFoundError("late")

    assert flags.run_command("prog", refused_after_work, devices_at_start=False) == flags.EXIT_BAD_INPUT
    assert (work / provenance.FILE).exists()


def test_second_pretrain_in_a_locked_workdir_fails_at_once(tmp_path):
    """Plant: train() without workdir_lock.hold (the second run started and the two crashed
    one another)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = {"pid": 1, "host": socket.gethostname()}  # pid 1 is always alive
    (workdir / workdir_lock.LOCK).write_text(json.dumps(holder))
    t0 = time.time()
    code, _, err = _subprocess("hipt_jax.cli.pretrain", "--config", "configs/pretrain_vit4k.py:runlocal",
                               f"--workdir={workdir}", f"--config.data.path={tmp_path}")
    assert_one_line(code, err, "hipt-pretrain", "pid 1 on host")
    assert not (workdir / "checkpoints").exists()
    assert time.time() - t0 < 120


# ------------------------------------------------------------------------------ corruption
@pytest.mark.slow  # a whole runlocal pretraining: `make test-all`
def test_pretrain_falls_back_to_the_newest_checkpoint_that_restores(tmp_path, capsys):
    """Plant: _restore_newest restoring only manager.latest_step() (a damaged last checkpoint
    stopped the run); _truncate_metrics not called (metrics.jsonl repeated steps 3-5)."""
    from configs.pretrain_vit4k import get_config
    from hipt_jax.pretrain import trainer

    data = write_feature_grids(tmp_path / "feats", 8)
    config = get_config("runlocal")
    config.data.path = str(data)
    config.checkpoint.use_async = False
    workdir = str(tmp_path / "run")
    trainer.train(config, workdir)
    ckpt = os.path.join(workdir, "checkpoints", "6")
    damaged = max((os.path.join(r, f) for r, _, fs in os.walk(ckpt) for f in fs), key=os.path.getsize)
    with open(damaged, "r+b") as f:
        f.seek(os.path.getsize(damaged) // 2)
        f.write(bytes(100))
    capsys.readouterr()
    trainer.train(config, workdir)
    out = capsys.readouterr()
    assert f"{ckpt} (checksum mismatch)" in out.err
    assert "resumed from" in out.out and "checkpoints/3 (newest checkpoint that restores)" in out.out
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(6))


def test_resuming_anyway_with_another_model_width_names_the_arrays(tmp_path):
    """--resume-anyway after a change of model.width said "checkpoints/3 (ValueError)", naming no
    array. Plant: _model_changes returning "" -> that line: fails."""
    from configs.pretrain_vit4k import get_config
    from hipt_jax.pretrain import trainer

    config = get_config("runlocal")
    config.data.path = str(write_feature_grids(tmp_path / "feats", 4))
    config.checkpoint.use_async, config.stop_at_step = False, 3
    workdir = str(tmp_path / "run")
    trainer.train(config, workdir)
    config.model.update(width=96, mlp_dim=96)
    with pytest.raises(trainer.CheckpointRestoreError) as e:
        trainer.train(config, workdir, resume_anyway=True)
    assert "checkpoints/3 (made for another model: " in str(e.value), str(e.value)
    assert "vit.cls_token saved (1, 1, 192), now (1, 1, 96)" in str(e.value), str(e.value)
    # The refused attempt leaves the run's record as it was: the run's own config resumes it
    # without --resume-anyway. Plant: no _write_record -> "made with other inputs": fails.
    config.model.update(width=192, mlp_dim=192)
    config.stop_at_step = 4
    trainer.train(config, workdir)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_flipped_bytes_in_a_saved_model_are_detected(tmp_path):
    """Plant: load() without verify_state (100 zeroed bytes loaded as weights)."""
    import jax

    from hipt_jax.models import checkpoint
    from hipt_jax.models.archs import build_vit, get_arch

    arch = get_arch("vit4k_tiny")
    params = build_vit(arch).init(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 384), np.float32))["params"]
    path = checkpoint.save(str(tmp_path / "m"), params, "vit", arch)
    checkpoint.load(path)
    state = os.path.join(path, "state")
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs), key=os.path.getsize)
    with open(biggest, "r+b") as f:
        data = bytearray(f.read())
        for i in range(100):
            data[(i * 7919) % len(data)] ^= 0xFF
        f.seek(0)
        f.write(data)
    with pytest.raises(checkpoint.CheckpointError, match="damaged checkpoint"):
        checkpoint.load(path)


# ------------------------------------------------------------------------------ environment
def test_full_disk_during_extract_is_a_clean_per_slide_failure(prep, tmp_path, monkeypatch):
    """Plant: write_bag without the temp-file cleanup, extract_cohort without the OSError
    branch (a traceback, *.tmp-* files left, no final manifest)."""
    from hipt_jax import extraction
    from hipt_jax.models.hipt4k import HIPT4K

    def full_disk(path, arrays, attrs=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setitem(bags.FORMATS, "npz", bags.BagFormat(".npz", full_disk, bags.NPZ.read, bags.NPZ.keys, bags.NPZ.attrs))
    out = tmp_path / "emb"
    manifest = extraction.extract_cohort(HIPT4K.random_init(seed=0, tiny=True), prep, str(out),
                                         show_progress=False)
    statuses = {v["status"] for v in manifest["slides"].values()}
    assert statuses == {"failed"}
    assert all("No space left" in v["error"] for v in manifest["slides"].values())
    assert not [f for f in os.listdir(out / "slides") if ".tmp-" in f]
    with open(out / "manifest.json") as f:
        assert {v["status"] for v in json.load(f)["slides"].values()} == {"failed"}


def test_ctrl_c_during_a_run_exits_130_with_one_line(prep, tmp_path):
    """Plant: run_command without the KeyboardInterrupt branch (a traceback and exit 1).
    Each slide's embedding waits in Python first (a wrapper around the entry point), so the
    signal always lands mid-run: with a plain run a fast CPU finished before the signal arrived
    and the test could only skip."""
    out = tmp_path / "emb"
    slow_main = ("import sys, time; from hipt_jax import extraction as e; f = e.Extractor.embed_slide_bag; "
                 "e.Extractor.embed_slide_bag = lambda *a, **k: (time.sleep(60), f(*a, **k))[1]; "
                 "from hipt_jax.cli.extract import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", slow_main, "--random-init", "tiny",
                             "--shards", prep, "--out", out, "--no-progress"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / workdir_lock.LOCK).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the lock appears once the model is loaded, right before compiling
    time.sleep(0.5)  # into the run (the first slide's wait), past start-up
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert_one_line(proc.returncode, err, "hipt-extract", "interrupted", exit_code=130)
    assert not [f for f in os.listdir(out / "slides") if ".tmp-" in f] if (out / "slides").exists() else True


@pytest.mark.parametrize("field, value, needle", [
    ("model.name", "abmill", "config.model.name='abmill'"),
    ("model.local_arch", "vit4k_tiyn", "config.model.local_arch='vit4k_tiyn'"),
    ("selection.metric", "aucc", "config.selection.metric='aucc'"),
])
def test_finetune_config_typos_stop_before_the_workdir_records_anything(feature_cohort, tmp_path, field,
                                                                        value, needle):
    """A typo must not leave provenance.json behind (the corrected run was then refused as
    "made with other inputs"). Plant: the model/selection checks only in _run_folds, after
    provenance.check -> provenance.json exists, fails."""
    from configs.lgp_subtyping import get_config
    from hipt_jax.finetune.main import FinetuneError, run

    emb, labels = feature_cohort
    config = get_config("runlocal")
    config.data.embeddings, config.data.labels, config.data.splits = emb, labels, "kfold:2"
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(FinetuneError, match=needle.replace("(", "\\(")):
        run(config, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run" / "provenance.json").exists()


def test_extract_shards_folder_and_region_flags_are_checked(prep, tmp_path, capsys):
    """--shards given the regions/ subfolder, or a --target-mpp other than the one the shards
    were cut at, is exit 2 naming the fix (both were silently taken: the first as a feature
    folder, the second ignored). A refused run leaves no empty --out behind (folders it
    made are removed, a folder that existed stays). Plants: no _check_shards_folder -> no such
    line, fails; no remove_empty_created_dirs -> emb/run exists, fails; explicit flags told
    by comparing to the default -> --size=4096 passes, fails."""
    from hipt_jax.cli.extract import main

    out = tmp_path / "emb" / "run"
    code, _, err = _in_process(main, ["--random-init", "tiny", "--shards", os.path.join(prep, "regions"),
                                      "--out", out], capsys)
    assert_one_line(code, err, "hipt-extract", "holds the shards themselves", prep)
    assert not (tmp_path / "emb").exists()
    out.mkdir(parents=True)
    import shutil

    mine = str(tmp_path / "prep")
    shutil.copytree(prep, mine)
    with open(os.path.join(mine, "manifest.json"), "w") as f:  # as hipt-prep records its parameters
        json.dump({"schema": "hipt.prep-manifest.v1", "params": {"region_px": 256, "target_mpp": 0.5},
                   "items": {}}, f)
    code, _, err = _in_process(main, ["--random-init", "tiny", "--shards", mine, "--target-mpp", "0.25",
                                      "--out", out], capsys)
    assert_one_line(code, err, "hipt-extract", "--target-mpp 0.25", "target_mpp=0.5")
    assert out.is_dir()
    # Asked for explicitly, the default value counts too (compared to the default, it passed).
    code, _, err = _in_process(main, ["--random-init", "tiny", "--shards", mine, "--size=4096",
                                      "--out", out], capsys)
    assert_one_line(code, err, "hipt-extract", "--size 4096", "region_px=256")
    # hipt-prep's folder as --out (it keeps no provenance file): refused, --overwrite or not,
    # and its manifest stays (plant: no _unrecorded_kind -> manifest.json deleted, exit 0).
    for extra in ([], ["--overwrite"]):
        code, _, err = _in_process(main, ["--random-init", "tiny", "--shards", prep, "--out", mine,
                                          "--no-progress", *extra], capsys)
        assert_one_line(code, err, "hipt-extract", "is a hipt-prep output folder, not an embeddings folder")
        assert json.load(open(os.path.join(mine, "manifest.json")))["params"]["region_px"] == 256


def test_provenance_refusal_names_the_changed_field_and_another_commands_folder(tmp_path):
    """Plants: diff without details (only "config: 1a2b... -> 3c4d..."); no kind check (a
    fine-tuning workdir given to pretraining read as "made with other inputs") -> fails."""
    folder = str(tmp_path / "run")
    old = {"optim": {"lr": 2e-4, "epochs": 3}, "seed": 0}
    new = {"optim": {"lr": 1e-3, "epochs": 3}, "seed": 0}
    provenance.check(folder, {"config": provenance.config_hash(old)}, what="fine-tuning workdir",
                     details={"config": old})
    with pytest.raises(provenance.ProvenanceError, match=r"\(config: optim.lr 0.0002 -> 0.001\)"):
        provenance.check(folder, {"config": provenance.config_hash(new)}, what="fine-tuning workdir",
                         details={"config": new})
    with pytest.raises(provenance.ProvenanceError,
                       match="is a fine-tuning workdir, not a pretraining run directory"):
        provenance.check(folder, {"config": provenance.config_hash(new)}, what="pretraining run directory")
    # Not even --overwrite clears another command's folder (plant: kind checked after the
    # overwrite branch -> the fine-tuning provenance is deleted, fails).
    with pytest.raises(provenance.ProvenanceError, match="only clears a folder of this command's own"):
        provenance.check(folder, {"config": "x"}, outputs=("checkpoints",), overwrite=True,
                         what="pretraining run directory")
    assert provenance.read_details(folder)["kind"] == "fine-tuning workdir"


def test_warm_start_head_of_other_sizes_names_both_and_the_fields_to_set():
    """Was "DINO head layout/shapes differ from the config's model". Plant: check_head_dims
    skipped -> the generic line from _checked_replace."""
    from configs import pretrain_vit256
    from hipt_jax.pretrain import trainer

    config = pretrain_vit256.get_config("runlocal")  # head 64 / 32 / 512
    config.warm_start = "conv/teacher"
    head = {"mlp_0": {"kernel": np.zeros((384, 2048))}, "mlp_2": {"kernel": np.zeros((2048, 2048))},
            "mlp_4": {"kernel": np.zeros((2048, 256))}, "last_layer": {"weight_v": np.zeros((256, 512))}}
    with pytest.raises(ValueError, match=r"conv/teacher: its DINO head is hidden_dim 2048, bottleneck_dim 256, "
                                         r"out_dim 512, the config's is hidden_dim 64, bottleneck_dim 32, out_dim 512: "
                                         r"set --config.head.hidden_dim=2048 --config.head.bottleneck_dim=256$"):
        trainer.check_head_dims(head, config)
    config.head.update(hidden_dim=2048, bottleneck_dim=256)
    trainer.check_head_dims(head, config)


def test_a_pretraining_run_or_its_training_checkpoint_given_as_a_model_points_to_its_export(tmp_path):
    """hipt-embed/extract/convert read_arch: was "(bare Orbax params from an older hipt-finetune:
    re-run it)" for WORKDIR/checkpoints/STEP, nothing for WORKDIR. Plant: pretrain_run_of
    returning None -> the finetune hint again."""
    from hipt_jax.models import checkpoint

    run = tmp_path / "run"
    (run / "checkpoints" / "30" / "state").mkdir(parents=True)
    (run / "checkpoints" / "30" / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "checkpoint_checksums.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match=r"a hipt-pretrain training checkpoint: its model is "
                                                         r"the run's export, .*run/export, written when the run finishes\)$"):
        checkpoint.read_arch(str(run / "checkpoints" / "30"))
    (run / "export").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=r"a hipt-pretrain run directory: its model is the "
                                                         r"run's export, .*run/export\)$"):
        checkpoint.read_arch(str(run))
    other = tmp_path / "orbax"
    other.mkdir()
    (other / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="older hipt-finetune"):
        checkpoint.read_arch(str(other))


def test_a_student_only_dino_file_suggests_which_student():
    """A --to-torch file of a --which student conversion holds {"student": ...}. Plant: the
    hint dropped -> only "has no 'teacher' entry"."""
    from hipt_jax.models import torch_io

    with pytest.raises(torch_io.CheckpointError, match=r"s.pth: has no 'teacher' entry \(keys: student\): it "
                                                       r"holds the student network; take it with hipt-convert --which student"):
        torch_io.split_reference_state({"student": {"module.backbone.cls_token": np.zeros((1, 1, 4))}},
                                       "teacher", "s.pth")


def test_a_config_file_given_without_config_flag_says_to_use_it():
    """`hipt-pretrain configs/x.py:runlocal --config.a=b` was "Unknown command line flag
    'config.a'". Plant: _positional_config returning "" -> absl's line (checked end to end)."""
    cmd = [sys.executable, "-m", "hipt_jax.cli.pretrain", "configs/pretrain_vit256.py:runlocal",
           "--workdir=/nonexistent/w", "--config.data.kind=patch_shards"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "hipt-pretrain: error: configs/pretrain_vit256.py:runlocal: a config file is given with --config: "
        "--config configs/pretrain_vit256.py:runlocal (then --config.FIELD=VALUE overrides)")
