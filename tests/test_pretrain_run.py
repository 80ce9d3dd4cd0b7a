"""Pretraining runs end to end: data pipeline, CLI, kill-and-resume, non-finite stop, and the
2-stage path (stage 1 on PNG patches -> export -> HIPT4K features -> stage 2 -> export)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs.pretrain_vit256 import get_config as get_config_256
from configs.pretrain_vit4k import get_config as get_config_4k
from hipt_jax.pretrain import data as data_lib
from hipt_jax.pretrain.augment import FeatureMultiCrop, ImageMultiCrop
from tests.synthetic_cohort import write_feature_grids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Runs of one test share compiled updates (a restart then costs no recompilation)."""
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    ENV.pop("JAX_COMPILATION_CACHE_DIR")


def _make_pngs(folder, n=16, size=96, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # Smooth-ish random images: blur/jitter have something to act on.
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        img.save(folder / f"p{i:03d}.png")
    return folder


def _pretrain(workdir, config, *flags, stage=1, wait=True, **popen):
    cfg = f"configs/pretrain_{'vit256' if stage == 1 else 'vit4k'}.py:runlocal"
    cmd = [sys.executable, "-m", "hipt_jax.cli.pretrain", "--config", cfg, f"--workdir={workdir}",
           f"--config.data.path={config}", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _losses(workdir, skip_lines=0):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f.readlines()[skip_lines:]]
    return {r["step"]: r["loss"] for r in rows}


# ----------------------------------------------------------------------------------- data
def test_image_multicrop_shapes_and_determinism(tmp_path):
    src = data_lib.PngFolderSource(str(_make_pngs(tmp_path / "png", n=2)))
    aug = ImageMultiCrop(seed=3, global_size=64, local_size=32, n_local=8)
    a = aug.map({"index": 5, **src[0]})
    b = aug.map({"index": 5, **src[0]})
    c = aug.map({"index": 6, **src[0]})
    assert a["global"].shape == (2, 64, 64, 3) and a["local"].shape == (8, 32, 32, 3)
    assert a["global"].dtype == np.uint8
    np.testing.assert_array_equal(a["global"], b["global"])  # a function of (seed, index)
    assert not np.array_equal(a["global"], c["global"])


def test_feature_crops_are_windows_of_the_grid_with_flips():
    grid = np.arange(16 * 16 * 2, dtype=np.float32).reshape(16, 16, 2)
    aug = FeatureMultiCrop(seed=0, global_size=14, local_size=6, n_local=8)
    flipped = 0
    for index in range(20):
        out = aug.map({"index": index, "features": grid.reshape(256, 2)})  # row-major [256,F]
        assert out["global"].shape == (2, 14, 14, 2) and out["local"].shape == (8, 6, 6, 2)
        for crop in list(out["global"]) + list(out["local"]):
            r0, c0 = divmod(int(crop[0, :, 0].min()) // 2, 16)
            size = crop.shape[0]
            window = grid[r0:r0 + size, c0:c0 + size]
            if np.array_equal(crop, window[:, ::-1]):
                flipped += 1
            else:
                np.testing.assert_array_equal(crop, window)
    assert 0.3 < flipped / 200 < 0.7


def test_pipeline_global_batch_is_the_same_for_any_process_split(tmp_path):
    src = data_lib.PngFolderSource(str(_make_pngs(tmp_path / "png", n=6)))
    c = get_config_256("runlocal")
    c.global_batch = 4

    states = {}

    def batches(pid, count, workers=0):
        c.data.num_workers = workers
        it = data_lib.make_iterator(c, src, process_index=pid, process_count=count, num_steps=4)
        out = [next(it) for _ in range(3)]
        states[workers] = it.get_state()
        out.append(next(it))
        it.close()
        return out

    whole = batches(0, 1)
    halves = [batches(p, 2) for p in range(2)]
    with_workers = batches(0, 1, workers=2)  # augmentation in 2 worker processes
    # The position a resume with another worker count re-derives is the one Grain saves (plant:
    # loader_state's worker w at step // n -> [2, 2] != Grain's [2, 1] after 3 batches).
    assert states == {w: data_lib.loader_state(3, w) for w in (0, 2)}
    for step in range(4):
        joined = np.concatenate([halves[0][step]["global"], halves[1][step]["global"]])
        np.testing.assert_array_equal(joined, whole[step]["global"])
        np.testing.assert_array_equal(with_workers[step]["global"], whole[step]["global"])
        np.testing.assert_array_equal(with_workers[step]["local"], whole[step]["local"])
        idx = whole[step]["index"]
        np.testing.assert_array_equal(idx, np.arange(step * 4, step * 4 + 4))


def test_a_resume_on_changed_data_warns_naming_what_moves(tmp_path):
    """After deleting a damaged image (the expected path) a resume reshuffled the epoch and
    moved the freeze without a word. Checkpoints keep the source's length, listing and steps per
    epoch; a resume on another source says old -> new samples and what moves. Plant:
    source_changes returning None -> fails."""
    folder = _make_pngs(tmp_path / "png", n=10, size=16)
    c = get_config_256("runlocal")
    c.data.path, c.global_batch = str(folder), 2
    saved = data_lib.source_record(data_lib.PngFolderSource(str(folder)), 5)
    assert data_lib.source_changes(saved, dict(saved), c) is None
    assert data_lib.source_changes(None, saved, c) is None  # checkpoints of older releases
    os.remove(folder / "p003.png")
    message = data_lib.source_changes(saved, data_lib.source_record(data_lib.PngFolderSource(str(folder)), 4), c)
    assert message.startswith(f"{folder} changed since the checkpoint: 10 -> 9 samples")
    assert "sample order" in message and "steps per epoch 5 -> 4 (last-layer freeze until step 5 -> 4" in message
    os.rename(folder / "p004.png", folder / "p003.png")  # as many files, another listing
    os.rename(folder / "p005.png", folder / "p004.png")
    saved = data_lib.source_record(data_lib.PngFolderSource(str(folder)), 4)
    os.rename(folder / "p004.png", folder / "p099.png")
    message = data_lib.source_changes(saved, data_lib.source_record(data_lib.PngFolderSource(str(folder)), 4), c)
    assert "9 samples, another listing" in message and "steps per epoch" not in message


def test_feature_folder_rejects_bad_files_clearly(tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "good.npy", np.zeros((256, 384), np.float32))
    np.save(folder / "bad.npy", np.zeros((16, 384), np.float32))
    src = data_lib.FeatureFolderSource(str(folder))
    with pytest.raises(ValueError, match=r"bad\.npy: features have shape \(16, 384\)"):
        [src[i] for i in range(len(src))]
    with pytest.raises(FileNotFoundError, match="no image files"):
        data_lib.PngFolderSource(str(folder))


def test_cli_bad_input_is_one_line_error(tmp_path):
    code, out, err = _pretrain(tmp_path / "run", tmp_path / "missing")
    assert code != 0
    assert "hipt-pretrain:" in err and "missing: not a folder" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- resume
def _finished_checkpoints(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


# Slow (about 95 s): its checks stay fast in tests/test_slurm.py::
# test_scancel_then_resubmit_equals_uninterrupted (tasks killed mid-run by the scheduler, 2 Grain
# worker processes per task, resume from the checkpoint, metrics.jsonl cut back without repeats,
# TensorBoard events, the resumed steps' losses and the export equal the uninterrupted run's).
# What only this test adds: stage 1 (PNG crops; their determinism across workers and process
# splits: test_pipeline_global_batch_is_the_same_for_any_process_split) and a one-process run.
@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path):
    pngs = _make_pngs(tmp_path / "png", n=10)
    # Two Grain worker processes: their iterator state is part of the checkpoint.
    common = ["--config.total_steps=1000", "--config.checkpoint.every_steps=2",
              "--config.data.num_workers=2", "--config.global_batch=4"]
    code, _, err = _pretrain(tmp_path / "ref", pngs, *common, "--config.stop_at_step=24")
    assert code == 0, err[-2000:]
    reference = _losses(tmp_path / "ref")

    victim = _pretrain(tmp_path / "run", pngs, *common, wait=False, start_new_session=True)
    deadline = time.time() + 300
    while not _finished_checkpoints(tmp_path / "run"):
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its loader workers
    victim.communicate()
    resume_from = _finished_checkpoints(tmp_path / "run")[-1]
    assert 2 <= resume_from <= 20, resume_from
    code, out, err = _pretrain(tmp_path / "run", pngs, *common,
                               f"--config.stop_at_step={resume_from + 4}")
    assert code == 0, err[-2000:]
    assert f"resumed from {tmp_path / 'run'}/checkpoints/{resume_from}" in out
    with open(tmp_path / "run" / "metrics.jsonl") as f:  # cut back to the checkpoint: no repeats
        assert [json.loads(line)["step"] for line in f] == list(range(resume_from + 4))
    resumed = {s: v for s, v in _losses(tmp_path / "run").items() if s >= resume_from}
    assert sorted(resumed) == list(range(resume_from, resume_from + 4))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "run" / "tensorboard"))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # Stage 2 (its tiny update compiles in a third of stage 1's time; the check is shared).
    feats = write_feature_grids(tmp_path / "feats", 8)
    # A float32-denormal teacher temperature (0 itself is refused as out of range) turns the
    # loss into NaN at the first step.
    # log_every 2 turns the step bar on; --no-progress must turn it off again (plant: the
    # trainer's bar ignores --no-progress -> "0%|" on stderr, fails).
    code, out, err = _pretrain(tmp_path / "run", feats, "--config.teacher.temp=1e-45",
                               "--config.teacher.warmup_temp=1e-45", "--config.log_every=2",
                               "--no-progress", stage=2)
    assert code != 0
    assert "non-finite loss" in err and "Traceback" not in err
    assert "0%|" not in err and "step/s" not in err, err
    assert _finished_checkpoints(tmp_path / "run") == []


class _FakeManager:
    """The part of an Orbax CheckpointManager _restore_newest uses: steps on disk, restore."""

    def __init__(self, workdir, steps):
        self.steps = steps
        for step in steps:
            folder = os.path.join(workdir, "checkpoints", str(step))
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "state"), "w") as f:
                f.write(f"state of step {step}")

    def all_steps(self):
        return list(self.steps)

    def restore(self, step, args):
        return {"state": f"restored {step}"}


@pytest.mark.parametrize("record", ["{", "[]", '{"8": 5}', '{"eight": "' + "0" * 64 + '"}'])
def test_unreadable_checkpoint_checksums_are_refused_not_ignored(tmp_path, record):
    """A checksum record that cannot be read verified nothing: a damaged checkpoint was resumed
    and exported with exit 0 (and re-hashed as good by the next save). It is refused, naming
    the file and what to do. Plant: _read_checksums returning {} on any error (resumes step 8)."""
    from hipt_jax.pretrain import trainer

    workdir = str(tmp_path)
    manager = _FakeManager(workdir, [6, 8])
    trainer._record_checksums(manager, workdir)
    with open(os.path.join(workdir, "checkpoints", "8", "state"), "a") as f:
        f.write("damage")  # a valid record catches this: resumes from 6
    assert trainer._restore_newest(manager, workdir, {}, None, True)[0] == 6
    with open(os.path.join(workdir, trainer.CHECKSUMS), "w") as f:
        f.write(record)
    with pytest.raises(trainer.CheckpointRestoreError) as e:
        trainer._restore_newest(manager, workdir, {}, None, True)
    message = str(e.value)
    assert os.path.join(workdir, trainer.CHECKSUMS) in message and "Remove the file" in message
    # with no checkpoint there is nothing to verify: the record is simply written anew
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / trainer.CHECKSUMS).write_text(record)
    trainer._record_checksums(_FakeManager(str(fresh), []), str(fresh))
    assert trainer._read_checksums(str(fresh)) == {}


def test_resuming_a_checkpoint_without_recorded_checksum_says_so(tmp_path, capsys):
    """Killed between a save and its checksum being written: the resumed checkpoint cannot be
    verified, and stderr says so (plant: no warning -> silent)."""
    from hipt_jax.pretrain import trainer

    workdir = str(tmp_path)
    trainer._record_checksums(_FakeManager(workdir, [6]), workdir)
    manager = _FakeManager(workdir, [6, 8])  # 8 saved, its checksum not recorded yet
    assert trainer._restore_newest(manager, workdir, {}, None, True)[0] == 8
    err = capsys.readouterr().err
    assert "checkpoints/8 has no recorded checksum" in err and "without verifying" in err
    trainer._record_checksums(manager, workdir)
    assert trainer._restore_newest(manager, workdir, {}, None, True)[0] == 8
    assert "no recorded checksum" not in capsys.readouterr().err


class _LoaderManager(_FakeManager):
    """A manager whose loader state (the "data" item) fails to restore, as Grain's did for a
    checkpoint saved with another data.num_workers; the train state restores. Records the items
    each restore asked for."""

    def __init__(self, workdir, steps, saved_state):
        super().__init__(workdir, steps)
        self.asked = []
        for step in steps:
            folder = os.path.join(workdir, "checkpoints", str(step), "data")
            os.makedirs(folder)
            with open(os.path.join(folder, "process_0-of-1.json"), "w") as f:
                json.dump(saved_state, f)

    def restore(self, step, args):
        self.asked.append(sorted(args.keys()))
        if "data" in args.keys():
            raise KeyError("next_index")
        return super().restore(step, args)


class _Iterator:
    def set_state(self, state):
        self.state = state


@pytest.mark.parametrize("saved_workers", [0, 2])
def test_resume_with_another_num_workers_rederives_the_loader_position(tmp_path, capsys, saved_workers):
    """data.num_workers is a run-control field, yet its change on resume was reported as every
    checkpoint damaged, with the advice --overwrite (which deletes the run). The train state
    restores and the loader position is re-derived from the step, said in one line; a loader
    state that fails to restore in the same layout is not damage either. Plant: the old
    `except Exception -> skipped` (CheckpointRestoreError "use --overwrite"), fails."""
    from hipt_jax.pretrain import trainer

    workdir = str(tmp_path)
    manager = _LoaderManager(workdir, [5, 10], data_lib.loader_state(10, saved_workers))
    trainer._record_checksums(manager, workdir)
    it = _Iterator()
    step, state = trainer._restore_newest(manager, workdir, {}, it, True, num_workers=1)
    assert (step, state) == (10, "restored 10") and it.state == data_lib.loader_state(10, 1)
    assert manager.asked == [["state"]]  # another layout: the loader state is not even tried
    err = capsys.readouterr().err
    assert f"saved with data.num_workers={saved_workers}, this run uses 1" in err
    assert "re-derived from step 10" in err and "overwrite" not in err and "skipped" not in err
    # same layout, but the loader state fails: the train state restores alone
    manager.asked = []
    step, _ = trainer._restore_newest(manager, workdir, {}, it, True, num_workers=saved_workers)
    assert step == 10 and manager.asked == [["data", "state"], ["state"]]
    assert it.state == data_lib.loader_state(10, saved_workers)
    assert "loader state does not restore (KeyError" in capsys.readouterr().err


def test_loader_workers_exit_when_the_trainer_is_killed(tmp_path):
    """kill -9 of the trainer left its Grain workers (~250 MB each) running under pid 1. The
    worker init (data.die_with_parent, make_iterator's worker_init_fn) watches the parent pid,
    also when the parent died while the worker was still importing. Plant: die_with_parent
    returning at once -> the worker outlives its killed parent, fails."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, sys, time\n"
        "from hipt_jax.pretrain.data import die_with_parent\n"
        "def worker():\n"
        "    die_with_parent(poll_s=0.05)\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    p = mp.get_context('spawn').Process(target=worker); p.start()\n"
        "    print(p.pid, flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # the child may still be importing: it must notice all the same
    parent.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not reaped (yet)
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the loader worker outlived its killed parent")


@pytest.mark.slow  # ~10 s; the SIGTERM mechanism's fast tests are in tests/test_robustness.py
def test_sigterm_stops_between_steps_and_keeps_whole_checksummed_checkpoints(tmp_path):
    """Preemption (SIGTERM) stops the run at a step boundary: the checkpoint in flight is
    finished, every kept checkpoint is whole and has its checksum, the lock is released, one
    line, exit 143. Plant: the loop without interrupts.deferred() -> Terminated raised inside
    Orbax's wait (its traceback logged), a half-deleted old checkpoint, no checksum recorded
    (failed 2 runs of 3: the signal has to land in Orbax's wait)."""
    feats = write_feature_grids(tmp_path / "feats", 8)
    workdir = tmp_path / "run"
    proc = _pretrain(workdir, feats, "--config.total_steps=300", "--config.checkpoint.every_steps=1",
                     "--config.checkpoint.keep=1", "--no-progress", stage=2, wait=False)
    deadline = time.time() + 300
    while len(_finished_checkpoints(workdir)) < 1 or _finished_checkpoints(workdir)[-1] < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "hipt-pretrain: terminated (SIGTERM)" in err, err[-2000:]
    assert not (workdir / ".hipt-lock").exists()
    kept = _finished_checkpoints(workdir)
    with open(workdir / "checkpoint_checksums.json") as f:
        assert sorted(int(k) for k in json.load(f)) == kept
    for step in kept:
        assert (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists(), step


# ------------------------------------------------------------------------------ 2 stages
@pytest.mark.slow
def test_two_stage_runlocal_end_to_end(tmp_path):
    from hipt_jax.models.checkpoint import load, load_backbone
    from hipt_jax.models.hipt4k import HIPT4K

    # Stage 1: ViT-256 (1 block) on 256 px PNG patches.
    pngs = _make_pngs(tmp_path / "png", n=8, size=256)
    code, _, err = _pretrain(tmp_path / "s1", pngs, "--config.model.depth=1")
    assert code == 0, err[-2000:]
    export = load(str(tmp_path / "s1" / "export"))
    assert export.meta["step"] == 6 and export.config.depth == 1
    assert export.head["last_layer"]["weight_g"].shape == (512,)

    # Features of two 4096 px regions with the exported ViT-256, saved as [256,384] .npy.
    model = HIPT4K.from_checkpoints(vit256=str(tmp_path / "s1" / "export"), patch_batch=64)
    rng = np.random.default_rng(0)
    feats_dir = tmp_path / "feats"
    feats_dir.mkdir()
    for i in range(2):
        small = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        region = np.asarray(Image.fromarray(small).resize((4096, 4096), Image.NEAREST))
        feats = model(region)["features_cls256"]
        assert feats.shape == (256, 384)
        np.save(feats_dir / f"region{i}.npy", feats)

    # Stage 2: ViT-4K on the feature grids, then both exports drive HIPT4K.
    code, _, err = _pretrain(tmp_path / "s2", feats_dir, stage=2)
    assert code == 0, err[-2000:]
    _, config4k = load_backbone(str(tmp_path / "s2" / "export"), expect_arch="vit4k")
    assert config4k.arch == "vit4k"
    full = HIPT4K.from_checkpoints(vit256=str(tmp_path / "s1" / "export"),
                                   vit4k=str(tmp_path / "s2" / "export"), patch_batch=64)
    out = full(np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                          .resize((1024, 1024))))
    assert out["features_cls4k"].shape == (192,) and np.isfinite(out["features_cls4k"]).all()


def test_warm_start_from_released_checkpoint_with_head(tmp_path):
    """A .pth in the released layout (teacher backbone + DINO head) seeds student and teacher."""
    import jax
    from hipt_jax.pretrain import trainer
    from tests import reference_torch as ref

    pth = str(tmp_path / "vit4k_xs_dino.pth")
    teacher = ref.write_released_checkpoint(pth, arch="vit4k_tiny", head_out_dim=512,
                                            optimizer_state=False)
    c = get_config_4k("runlocal")
    c.head.update(hidden_dim=2048, bottleneck_dim=256)  # the released head's sizes
    c.warm_start = pth
    init = lambda cfg: jax.jit(lambda r: trainer.create_state(cfg, r))(jax.random.key(0))  # noqa: E731
    state = trainer._warm_start(init(c), c)
    want_head = ref.dino_head_state(192, 512, seed=2)  # the teacher head of that file
    for net in ("student", "teacher"):
        params = jax.device_get(state[net])
        np.testing.assert_array_equal(params["vit"]["pos_embed"], teacher.pos_embed.detach().numpy())
        np.testing.assert_array_equal(params["head"]["last_layer"]["weight_v"],
                                      want_head["last_layer.weight_v"].numpy().T)
        np.testing.assert_array_equal(params["head"]["mlp_2"]["kernel"],
                                      want_head["mlp.2.weight"].numpy().T)
        assert "weight_g" not in params["head"]["last_layer"]
    c.head.update(hidden_dim=64)
    with pytest.raises(ValueError, match="its DINO head is hidden_dim 2048, .*: set --config.head.hidden_dim=2048$"):
        trainer._warm_start(init(c), c)


def test_arrayrecord_shards_drop_in_for_both_stages(tmp_path):
    """hipt-prep's patch and feature shards feed the same pipeline as the folder formats."""
    from data_prep.shards import PATCH, encode_feature, encode_jpeg
    from tests.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "patches" / "s.array_record", (
        PATCH.encode(image_jpeg=encode_jpeg(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
                             slide_id="s", x=i, y=0, region_x=0, region_y=0, row=0, col=i,
                             patch_px=256, mpp=0.5, tissue_fraction=1.0) for i in range(4)))
    grids = [rng.normal(size=(256, 384)).astype(np.float32) for _ in range(4)]
    write_shard(tmp_path / "features" / "s.array_record", (
        encode_feature(g, grid=(16, 16), slide_id="s", x=i, y=0, mpp=0.5,
                               region_px=4096, dtype="float32") for i, g in enumerate(grids)))
    for stage, kind, get in ((1, "patch_shards", get_config_256), (2, "feature_shards", get_config_4k)):
        c = get("runlocal")
        c.data.kind, c.data.path, c.global_batch = kind, str(tmp_path), 2
        src = data_lib.make_source(c.data)
        assert len(src) == 4
        batch = next(data_lib.make_iterator(c, src, process_index=0, process_count=1, num_steps=2))
        size = c.crops.global_size
        assert batch["global"].shape[:4] == (2, 2, size, size)
        if stage == 2:  # every global crop is a window of one of the stored grids
            crop = batch["global"][0, 0]
            assert any(np.isin(crop[0, 0], g).all() for g in grids)


def _patch_shard(path, px=256, n=2):
    from data_prep.shards import PATCH, encode_jpeg
    from tests.shards import write_shard

    image = encode_jpeg(np.full((px, px, 3), 128, np.uint8))
    return write_shard(path, (PATCH.encode(image_jpeg=image, slide_id="s", x=i, y=0, region_x=0,
                                           region_y=0, row=0, col=i, patch_px=px, mpp=0.5,
                                           tissue_fraction=1.0) for i in range(n)))


def _feature_shard(path, grid=(16, 16), n=2):
    from data_prep.shards import encode_feature
    from tests.shards import write_shard

    feats = np.zeros((grid[0] * grid[1], 384), np.float32)
    return write_shard(path, (encode_feature(feats, grid=grid, slide_id="s", x=i, y=0, mpp=0.5,
                                             region_px=256 * grid[0], dtype="float32") for i in range(n)))


def test_shards_of_another_kind_or_grid_are_refused_at_start_naming_the_shard(tmp_path):
    """Checked before the model is built (data.check_source): a hipt-prep folder of the other
    stage says what it holds, a shard of the other kind given directly is named with its kind,
    and feature shards of another grid name the grid found, config.data.grid and the fix."""
    patch = _patch_shard(tmp_path / "patches_out" / "patches" / "s.array_record")
    small = _feature_shard(tmp_path / "feat1024" / "features" / "s.array_record", grid=(4, 4))
    c = get_config_4k("runlocal")
    c.data.kind, c.data.path = "feature_shards", str(tmp_path / "patches_out")
    with pytest.raises(FileNotFoundError, match=r"patches_out: holds patch shards \(hipt-prep patches\); "
                                                r"feature shards expected: hipt-prep features --regions"):
        data_lib.make_source(c.data)
    c.data.path = os.path.dirname(patch)  # the shard folder itself: its first record's schema
    with pytest.raises(ValueError, match=r"patches/s.array_record: holds patch shards"):
        data_lib.check_source(c, data_lib.make_source(c.data))
    c.data.path = str(tmp_path / "feat1024")
    with pytest.raises(ValueError, match=r"features/s.array_record: its features are 4x4 grids \(regions of "
                                         r"1024 px\), config.data.grid is \(16, 16\): set --config.data.grid=\(4,4\)"):
        data_lib.check_source(c, data_lib.make_source(c.data))
    c.data.grid = (4, 4)
    assert data_lib.check_source(c, data_lib.make_source(c.data)) == []


def test_stage1_patch_shards_not_256_px_get_a_note(tmp_path, monkeypatch):
    c = get_config_256("runlocal")
    c.data.kind, c.data.path = "patch_shards", str(tmp_path / "p")
    _patch_shard(tmp_path / "p" / "patches" / "a.array_record", px=256)
    assert data_lib.check_source(c, data_lib.make_source(c.data)) == []
    _patch_shard(tmp_path / "p" / "patches" / "b.array_record", px=512)
    (note,) = data_lib.check_source(c, data_lib.make_source(c.data))
    assert "mix patch sizes: 256 px" in note and "512 px (" in note and "expects 256 px patches at 20x" in note
    # Past CHECKED_SHARDS, shards spread over the listing are read, the first and last included.
    _patch_shard(tmp_path / "p" / "patches" / "c.array_record", px=256)
    monkeypatch.setattr(data_lib, "CHECKED_SHARDS", 2)
    assert data_lib.check_source(c, data_lib.make_source(c.data)) == []  # b (512 px) not read
    _patch_shard(tmp_path / "p" / "patches" / "d.array_record", px=512)
    (note,) = data_lib.check_source(c, data_lib.make_source(c.data))
    assert "d.array_record" in note
    c.data.path = str(tmp_path / "p" / "patches" / "b.array_record")
    (note,) = data_lib.check_source(c, data_lib.make_source(c.data))
    assert note.startswith("the patch shards hold 512 px patches (")


def test_log_line_has_no_speed_or_eta_until_known(tmp_path, capsys, monkeypatch):
    """The first logged step printed "0.00 steps/s 0.0 img/s (0 crops/s) ETA nan min": no step
    had been timed yet. It prints no speed or ETA; the next logged step has both.
    Plant: the old line (speed and ETA always printed) -> fails."""
    import types

    from hipt_jax.pretrain import trainer

    clock = iter([100.0, 100.0, 100.0, 110.0])  # start, first log (its start, its rate), second log
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(time=lambda: next(clock)))
    config = types.SimpleNamespace(log_every=10, global_batch=4)
    logger = trainer._Logger(str(tmp_path), config, total_steps=101, active=True)
    metrics = dict(loss=1.0, lr=1e-4, wd=0.04, momentum=0.996, teacher_temp=0.04)
    logger.log(0, metrics, crops_per_step=40)
    logger.log(10, metrics, crops_per_step=40)
    logger.close()
    first, second = capsys.readouterr().out.splitlines()
    assert "nan" not in first and "ETA" not in first and "steps/s" not in first
    assert "1.00 steps/s  4.0 img/s (40 crops/s)  ETA 1.5 min" in second


class _FillingManager:
    """A real Orbax CheckpointManager whose save at ``step`` fails as Orbax's async save does
    when the disk fills: it leaves checkpoints/<step>.orbax-checkpoint-tmp/, the next wait
    raises Orbax's ValueError, and waits after it "Event loop is closed"."""

    def __init__(self, manager, folder, step):
        self.manager, self.folder, self.step, self.failed, self.waits = manager, folder, step, False, 0

    def save(self, step, *args, **kwargs):
        if step != self.step:
            return self.manager.save(step, *args, **kwargs)
        tmp = os.path.join(self.folder, f"{step}.orbax-checkpoint-tmp")
        os.makedirs(os.path.join(tmp, "state.orbax-checkpoint-tmp"))
        with open(os.path.join(tmp, "state.orbax-checkpoint-tmp", "d"), "wb") as f:
            f.write(b"\0" * 1000)
        self.failed = True
        return True

    def wait_until_finished(self):
        self.manager.wait_until_finished()
        if self.failed:
            self.waits += 1
            if self.waits == 1:
                raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "opt.count/0" in OCDBT database at local file '
                                 f'"{self.folder}/{self.step}.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/": '
                                 "No space left on device [os_error_code='28']")
            raise RuntimeError("Event loop is closed")

    def __getattr__(self, name):
        return getattr(self.manager, name)


def _stage2_run(tmp_path, total_steps):
    c = get_config_4k("runlocal")
    c.data.path = str(write_feature_grids(tmp_path / "feats", 8))
    c.total_steps, c.checkpoint.every_steps, c.log_every = total_steps, 2, 1
    return c


def test_a_full_disk_during_a_checkpoint_save_is_one_line_exit_1_and_the_rerun_resumes(tmp_path, capsys,
                                                                                        monkeypatch):
    """Orbax's full-disk ValueError was reported as bad input (exit 2, its provenance record
    taken back) after ~780 lines of thread tracebacks, and checkpoints/4.orbax-checkpoint-tmp
    stayed, holding the space the rerun's free-space check wants. Now: exit 1, the last line
    names checkpoints/4, the unfinished folder is gone, checkpoints/2 and the record stay, and
    the rerun resumes from step 2. Plant: no _checkpoint_writes around the loop's wait -> exit 2
    and the tmp folder left, fails."""
    from hipt_jax import provenance
    from hipt_jax.cli import flags
    from hipt_jax.pretrain import trainer

    c, work = _stage2_run(tmp_path, 6), tmp_path / "run"
    real = trainer._checkpoint_manager
    monkeypatch.setattr(trainer, "_checkpoint_manager",
                        lambda workdir, config: _FillingManager(real(workdir, config), str(work / "checkpoints"), 4))
    code = flags.run_command("hipt-pretrain", lambda: trainer.train(c, str(work)) and 0, devices_at_start=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == flags.EXIT_ITEMS_FAILED
    assert err[-1].startswith(f"hipt-pretrain: error: {work / 'checkpoints' / '4'}: write failed "
                              "(No space left on device)"), err[-1]
    assert sorted(os.listdir(work / "checkpoints")) == ["2"] and (work / provenance.FILE).is_file()
    monkeypatch.undo()
    trainer.train(c, str(work))
    assert "resumed from" in capsys.readouterr().out
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4", "6"] and (work / "export" / "arch.json").is_file()


def _events(path):
    """(step, session_log status, scalar tags) of every event in a TensorBoard event file."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out, data = [], open(path, "rb").read()
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12:12 + n])
        out.append((event.step, event.session_log.status, [v.tag for v in event.summary.value]))
        data = data[12 + n + 4:]
    return out


def test_tensorboard_is_flushed_at_checkpoints_and_purged_on_resume(tmp_path):
    """After kill -9 + resume, TensorBoard showed steps logged twice (the killed run's file held
    steps past the checkpoint) or lost (never flushed). The logger flushes at every checkpoint
    and a resumed run's event file starts with a purge at the restored step (tensorboardX's
    purge_step: TensorBoard drops the older files' steps >= it). Plant: SummaryWriter without
    purge_step -> no START session log at step 3, fails."""
    from hipt_jax.pretrain import trainer

    config = get_config_256("runlocal")
    config.log_every = 1
    killed = trainer._Logger(str(tmp_path), config, total_steps=10, active=True)
    for step in range(5):
        killed.log(step, {"loss": 1.0, "lr": 0.0, "wd": 0.0, "momentum": 0.0, "teacher_temp": 0.0}, 1)
    killed.flush()  # a checkpoint; then the run is "killed" (never closed)
    (first,) = os.listdir(tmp_path / "tensorboard")
    assert [e[0] for e in _events(tmp_path / "tensorboard" / first) if "train/loss" in e[2]] == list(range(5))
    time.sleep(1.1)  # event file names carry the second
    resumed = trainer._Logger(str(tmp_path), config, total_steps=10, active=True, resumed_step=3)
    resumed.close()
    (second,) = set(os.listdir(tmp_path / "tensorboard")) - {first}
    START = 1  # SessionLog.START
    assert (3, START, []) in _events(tmp_path / "tensorboard" / second)
    killed.close()


def test_an_export_killed_midway_is_replaced_and_a_failed_one_keeps_the_previous(tmp_path, capsys, monkeypatch):
    """SIGKILL during the final export left export/ holding only state.orbax-checkpoint-tmp/,
    and every rerun ended "export: already exists and is not an empty directory" (exit 2). The
    export is now written beside it and renamed when whole; such debris is replaced, said on
    stderr, and so is a partial export of this release; a full disk is one error naming the
    export, keeping the previous one, leaving no partial folder. Plant: export_teacher saving
    into ``path`` with the old arch.json-only check -> CheckpointError "already exists", fails."""
    import jax
    import orbax.checkpoint as ocp

    from hipt_jax.models import checkpoint
    from hipt_jax.outputs import OutputWriteError
    from hipt_jax.pretrain import trainer

    c = get_config_4k("runlocal")
    state = jax.jit(lambda r: trainer.create_state(c, r))(jax.random.key(0))
    export = tmp_path / "export"
    (export / "state.orbax-checkpoint-tmp" / "ocdbt.process_0").mkdir(parents=True)  # what the kill left
    trainer.export_teacher(state, c, str(export))
    assert f"{export}: an unfinished export" in capsys.readouterr().err
    assert checkpoint.load(str(export)).meta["source"] == "hipt-pretrain"
    partial = tmp_path / ("export" + trainer.EXPORT_PARTIAL)
    (partial / "state.orbax-checkpoint-tmp").mkdir(parents=True)  # killed while exporting now
    trainer.export_teacher(state, c, str(export))
    assert not partial.exists() and checkpoint.load(str(export)).meta["step"] == 0

    def full(self, directory, *args, **kwargs):
        os.makedirs(f"{directory}.orbax-checkpoint-tmp")
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ... No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(OutputWriteError, match=f"^{export}: write failed \\(No space left on device\\)") as e:
        trainer.export_teacher(state, c, str(export))
    assert not partial.exists() and checkpoint.load(str(export)).meta["source"] == "hipt-pretrain"
    # a folder of someone else's files is never taken for debris
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not an export of hipt-pretrain"):
        trainer.export_teacher(state, c, str(other))
    assert (other / "notes.txt").is_file()


def test_processes_agree_on_data_mounted_at_two_paths_and_refuse_other_data_or_workdir(tmp_path, monkeypatch):
    """data.path compared as written refused a run whose hosts mount one tile folder at two
    paths; it is now compared by what it holds: the same tiles at /mnt and /data agree, another
    tile set at the same path, or another workdir, is refused. The exchange is faked.
    Plant: cross_process_fields without the DATA_LOCATION_FIELDS loop -> the two mounts are
    refused (config.data.path), fails; the workdir compared by absolute path -> the symlinked
    workdir is refused, fails."""
    import shutil

    from hipt_jax import distributed
    from hipt_jax.pretrain import trainer

    _make_pngs(tmp_path / "mnt" / "tiles", n=4, size=16)
    shutil.copytree(tmp_path / "mnt" / "tiles", tmp_path / "data" / "tiles")
    _make_pngs(tmp_path / "other" / "tiles", n=4, size=16, seed=1)
    os.symlink(tmp_path / "run", tmp_path / "run_link", target_is_directory=True)
    identity, role = distributed.output_identity, []  # role: this process's index
    monkeypatch.setattr(distributed, "output_identity", lambda folder: identity(folder, process=role[-1]))

    def fields(data, workdir="run", process=1):
        c = get_config_256("runlocal")
        c.data.path = str(tmp_path / data / "tiles")
        role.append(process)
        return trainer.cross_process_fields(c, str(tmp_path / workdir))

    process0 = json.dumps(fields("mnt", process=0), sort_keys=True, default=str).encode()  # writes the token

    def check(mine):
        distributed.check_same_everywhere(mine, gather=lambda b: [process0, b])

    check(fields("data"))
    check(fields("data", workdir="run_link"))  # one workdir at two paths
    with pytest.raises(distributed.ProcessMismatchError, match="differs from process 0 in config.data.path;"):
        check(fields("other"))
    with pytest.raises(distributed.ProcessMismatchError, match="differs from process 0 in workdir;"):
        check(fields("data", workdir="run2"))


def test_multi_process_start_lists_the_data_once(tmp_path, monkeypatch):
    """Process 0 of a multi-process run listed its data folder twice at start-up (the
    cross-process check and the run record), each a walk of a folder that can hold millions of
    tiles. Several processes are faked (the exchange echoes this process's fields) and
    training itself is stubbed out. Plant: fingerprint(config) without the identities train
    took for the check -> two listings (fails)."""
    from hipt_jax import distributed, provenance
    from hipt_jax.pretrain import trainer

    _make_pngs(tmp_path / "tiles", n=4, size=16)
    c = get_config_256("runlocal")
    c.data.path = str(tmp_path / "tiles")
    listed = []
    real_identity, real_check = provenance.data_identity, distributed.check_same_everywhere
    monkeypatch.setattr(provenance, "data_identity", lambda path: listed.append(path) or real_identity(path))
    monkeypatch.setattr(distributed, "check_same_everywhere",
                        lambda fields: real_check(fields, gather=lambda mine: [mine, mine]))
    monkeypatch.setattr(trainer, "_train", lambda config, workdir, is_main: {})
    trainer.train(c, str(tmp_path / "run"))
    assert listed.count(str(tmp_path / "tiles")) == 1, listed
    record = provenance.read(str(tmp_path / "run"))
    assert record["data"]["data.path"]["content"] == real_identity(str(tmp_path / "tiles"))


def test_processes_with_different_configs_refuse_before_training(tmp_path, monkeypatch):
    """Two processes of one run, process 1 with another seed: both refuse before the workdir is
    touched, naming the field; host-local fields (process_id, loader workers) may differ. The
    exchange is faked: process 0's fields and this process's.
    Plant: drop the check_same_everywhere call in trainer.train -> no error, training starts
    (fails)."""
    from hipt_jax import distributed
    from hipt_jax.pretrain import trainer

    def config_of(process, seed):
        c = get_config_256("runlocal")
        c.data.path = str(tmp_path / "data")
        c.distributed.process_id = process
        c.data.num_workers = process
        c.seed = seed
        return c

    workdir = str(tmp_path / "run")
    monkeypatch.setattr(distributed, "output_identity", lambda folder: "one folder")  # tested above
    process0 = json.dumps(trainer.cross_process_fields(config_of(0, 0), workdir), sort_keys=True, default=str)
    real = distributed.check_same_everywhere
    monkeypatch.setattr(distributed, "check_same_everywhere",
                        lambda fields: real(fields, gather=lambda mine: [process0.encode(), mine]))
    distributed.check_same_everywhere(trainer.cross_process_fields(config_of(1, 0), workdir))  # alike
    with pytest.raises(distributed.ProcessMismatchError) as err:
        trainer.train(config_of(1, 1), workdir)
    assert "process 1 differs from process 0 in config.seed" in str(err.value)
    assert "0 (process 0) vs 1 (process 1)" in str(err.value)
    assert not os.path.exists(workdir)
