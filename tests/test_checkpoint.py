"""hipt_jax.models.checkpoint: one format for every saved model, loaded without shape guessing."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hipt_jax.models import checkpoint, lgp
from hipt_jax.models.archs import build_vit, dummy_input, get_arch
from hipt_jax.models.checkpoint import CheckpointError


def _tree_equal(a, b) -> bool:
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


@pytest.fixture(scope="module")
def vit4k_tiny():
    config = get_arch("vit4k_tiny")
    return config, jax.jit(build_vit(config).init)(jax.random.PRNGKey(3), dummy_input(config))["params"]


@pytest.fixture(scope="module")
def lgp_fold(tmp_path_factory):
    """A fold checkpoint written by hipt-finetune's own save path."""
    from hipt_jax.finetune.main import _save_checkpoint

    model = lgp.HIPTLGP(n_classes=3, local_arch="vit4k_tiny", freeze_local=False, dropout_rate=0.1)
    params = lgp.init_lgp(model, seed=5)["params"]
    path = str(tmp_path_factory.mktemp("lgp") / "fold_0" / "checkpoint")
    _save_checkpoint(path, params, model, "survival")
    return path, model, params


def test_lgp_fold_checkpoint_reloads_with_its_architecture(lgp_fold):
    path, model, params = lgp_fold
    loaded = checkpoint.load(path)
    assert loaded.kind == "hipt_lgp" and loaded.head is None
    assert (loaded.config.n_classes, loaded.config.local_arch, loaded.config.task) == (3, "vit4k_tiny", "survival")
    assert loaded.config.freeze_local is False and loaded.config.dropout_rate == 0.1
    assert _tree_equal(loaded.params, params)
    rebuilt = loaded.module()
    assert rebuilt == model
    feats = jnp.asarray(np.random.default_rng(0).normal(size=(5, 256, 384)), jnp.float32)
    want, want_aux = model.apply({"params": params}, feats)
    got, got_aux = rebuilt.apply(loaded.variables, feats)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The heatmap tool's --lgp path reads the same directory.
    from hipt_jax.heatmap.slide import lgp_region_attention

    np.testing.assert_array_equal(lgp_region_attention(path, np.asarray(feats)), np.asarray(want_aux["attention"]))
    # A rerun of the fold replaces the checkpoint.
    from hipt_jax.finetune.main import _save_checkpoint

    _save_checkpoint(path, jax.tree.map(jnp.zeros_like, params), model, "survival")
    assert not np.any(np.asarray(checkpoint.load(path).params["classifier"]["kernel"]))
    _save_checkpoint(path, params, model, "survival")


def test_wrong_kind_and_stored_local_architecture(lgp_fold, tmp_path):
    path, _, _ = lgp_fold
    with pytest.raises(CheckpointError, match="is a hipt_lgp checkpoint, expected vit"):
        checkpoint.load_backbone(path)
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    info = json.load(open(os.path.join(copy, "arch.json")))
    info["config"]["local"]["num_heads"] = 3  # invisible in the shapes: must still be refused
    json.dump(info, open(os.path.join(copy, "arch.json"), "w"))
    with pytest.raises(CheckpointError, match="copy: HIPT-LGP local architecture .* differs from the registered"):
        checkpoint.load(copy)


def _write_legacy_backbone(path, params, config, head=None):
    """A directory exactly as hipt-convert / hipt-pretrain wrote it before the model kinds."""
    import orbax.checkpoint as ocp

    os.makedirs(path)
    tree = {"params": params} if head is None else {"params": params, "head": head}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), tree)
    info = {"format": "hipt-jax-backbone", "version": 1, "arch": config.arch, "name": "vit4k_tiny",
            "config": config.to_dict(), "has_head": head is not None, "meta": {"source": "x.pth"}}
    with open(os.path.join(path, "arch.json"), "w") as f:
        json.dump(info, f)


def test_legacy_backbone_directory_loads(vit4k_tiny, tmp_path):
    config, params = vit4k_tiny
    head = {"last_layer": {"weight_g": np.ones((8,), np.float32)}}
    _write_legacy_backbone(str(tmp_path / "old"), params, config, head)
    loaded = checkpoint.load(str(tmp_path / "old"))
    assert loaded.kind == "vit" and loaded.config.to_dict() == config.to_dict()
    assert loaded.meta == {"source": "x.pth"} and loaded.head["last_layer"]["weight_g"].shape == (8,)
    assert _tree_equal(loaded.params, params)
    variables, cfg = checkpoint.load_backbone(str(tmp_path / "old"), expect_arch="vit4k")
    assert cfg.depth == 1 and _tree_equal(variables["params"], params)


def test_missing_keys_and_damaged_state(vit4k_tiny, tmp_path):
    config, params = vit4k_tiny
    # Params without a key, under a valid arch.json.
    _write_legacy_backbone(str(tmp_path / "cut"), {k: v for k, v in params.items() if k != "norm"}, config)
    with pytest.raises(CheckpointError, match="cut: params do not match the vit4k architecture: "
                                              "missing keys: params/norm/bias, params/norm/scale"):
        checkpoint.load(str(tmp_path / "cut"))
    # arch.json describing another architecture than the stored params.
    good = checkpoint.save(str(tmp_path / "good"), params, "vit", config, meta={"step": 1})
    info = json.load(open(os.path.join(good, "arch.json")))
    assert (info["format"], info["kind"], info["arch"], info["name"]) == ("hipt-jax-model", "vit", "vit4k", "vit4k_tiny")
    info["config"]["depth"] = 2
    json.dump(info, open(os.path.join(good, "arch.json"), "w"))
    with pytest.raises(CheckpointError, match=r"missing keys: params/encoder/blocks_1/attn/proj/bias"):
        checkpoint.load(good)
    # A state directory with its files gone; no arch.json; and the save-time check.
    good2 = checkpoint.save(str(tmp_path / "good2"), params, "vit", config)
    for name in os.listdir(os.path.join(good2, "state")):
        target = os.path.join(good2, "state", name)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    with pytest.raises(CheckpointError, match="state: damaged checkpoint"):  # checksum in arch.json
        checkpoint.load(good2)
    os.remove(os.path.join(good2, "arch.json"))
    with pytest.raises(CheckpointError, match="good2: no arch.json"):
        checkpoint.load(good2)
    with pytest.raises(CheckpointError, match=r"bad: params do not match .* shape mismatches: params/norm/scale \(7,\)"):
        checkpoint.save(str(tmp_path / "bad"), dict(params, norm={"scale": np.ones(7), "bias": np.ones(192)}),
                        "vit", config)
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_imported_reference_lgp_saves_and_computes_what_the_reference_computes(tmp_path):
    import torch

    from hipt_jax.models import torch_io
    from tests.reference_torch_lgp import random_lgp

    ref = random_lgp(n_classes=2, local_arch="vit4k_tiny", seed=4)
    variables, info = torch_io.import_lgp_state_dict(ref.state_dict())
    assert info["local_arch"] == "vit4k_tiny" and info["arch"].n_classes == 2
    path = checkpoint.save(str(tmp_path / "lgp"), variables["params"], "hipt_lgp", info["arch"])
    loaded = checkpoint.load(path, kind="hipt_lgp")
    x = torch.randn(4, 256, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)[0][0].numpy()
    got, _ = loaded.module().apply(loaded.variables, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


# Orbax's words for a full disk (it raises them as ValueError from its writer threads).
ORBAX_DISK_FULL = ('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file "{path}": '
                   "Failed to write 189 bytes to file 13: No space left on device [os_error_code='28']")


def _orbax_save_failing(monkeypatch):
    """StandardCheckpointer.save that leaves Orbax's temporary folder and raises as Orbax does
    when the disk fills."""
    import orbax.checkpoint as ocp

    def full(self, directory, *args, **kwargs):
        tmp = f"{directory}.orbax-checkpoint-tmp"
        os.makedirs(os.path.join(tmp, "ocdbt.process_0"), exist_ok=True)
        with open(os.path.join(tmp, "ocdbt.process_0", "d"), "wb") as f:
            f.write(b"\0" * 100)
        raise ValueError(ORBAX_DISK_FULL.format(path=tmp))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)


def test_a_full_disk_during_save_is_an_oserror_naming_the_folder_and_leaves_it_empty(vit4k_tiny, tmp_path,
                                                                                     monkeypatch):
    """Orbax raises a full disk as ValueError, which the commands report as bad input (exit 2)
    and which left state.orbax-checkpoint-tmp/ behind: every later save to the folder was
    refused ("already exists and is not an empty directory"). Plant: save without its except
    branch -> the ValueError and the leftover folder, fails."""
    import errno

    config, params = vit4k_tiny
    path = str(tmp_path / "model")
    _orbax_save_failing(monkeypatch)
    with pytest.raises(OSError) as e:
        checkpoint.save(path, params, "vit", config)
    assert e.value.errno == errno.ENOSPC and e.value.filename == path
    assert os.listdir(path) == []
    monkeypatch.undo()
    checkpoint.save(path, params, "vit", config)  # the empty folder takes the next save
    assert _tree_equal(checkpoint.load(path).params, params)


def test_orbax_repeats_of_a_failed_write_are_dropped_other_messages_kept(capsys):
    """A full disk during an Orbax save printed ~20 logged tracebacks of its writer threads
    and hundreds of "Event loop is closed" ones after the command's one-line error. Plant:
    quiet_write_failures doing nothing -> both printed, fails."""
    import logging
    import sys

    from types import SimpleNamespace

    logger = logging.getLogger("absl")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    saved_hook, printed = sys.unraisablehook, []
    sys.unraisablehook = lambda info: printed.append(str(info.exc_value))
    try:
        with checkpoint.quiet_write_failures():
            try:
                raise ValueError(ORBAX_DISK_FULL.format(path="/x"))
            except ValueError:
                logger.error("_SignalingThread.run() raised an exception", exc_info=True)
            logger.error("Failed to run 2 Handler Commit operations: No space left on device")
            logger.error("an unrelated error")
        for text in ("Event loop is closed", "something else"):  # they come after the block too
            sys.unraisablehook(SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(text),
                                               exc_traceback=None, err_msg=None, object=None))
    finally:
        logger.removeHandler(handler)
        sys.unraisablehook = saved_hook
    err = capsys.readouterr().err
    assert "an unrelated error" in err and "RESOURCE_EXHAUSTED" not in err and "No space left" not in err
    assert printed == ["something else"]
