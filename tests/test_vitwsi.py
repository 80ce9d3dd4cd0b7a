"""Stage 3 (ViT-WSI): the region-token ViT, region views, the trainer on slides of regions, the
export and its use (hipt-extract --vitwsi, hipt-knn --embedding wsi, HIPT-LGP's global part)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hipt_jax.evaluation.arrangement import make_slide, write_cohort
from hipt_jax.models.archs import build_vit, get_arch
from hipt_jax.models.vitwsi import embed_slide, grid_cells, pad_slide
from hipt_jax.pretrain.augment import region_views
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def tiny_wsi():
    config = get_arch("vitwsi")  # 2 post-norm layers: padding must not leak through either
    module = build_vit(config)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 192)))["params"]
    return module, params


def _slide(seed=0, label=0):
    rng = np.random.default_rng(seed)
    a = make_slide(rng, rng.standard_normal((2, 192)).astype(np.float32), label, grid_range=(3, 5))
    return a["features_cls4k"], grid_cells(a["coords"])


def test_padded_equals_unpadded(tiny_wsi):
    """Plant: drop the key mask in VisionTransformer._regions (padded keys then get weight)."""
    module, params = tiny_wsi
    apply = jax.jit(lambda x, c, k: module.apply({"params": params}, x[None], coords=c[None],
                                                 key_mask=None if k is None else k[None]))
    feats, cells = _slide()
    m = len(feats)
    cls, aux = apply(feats, cells, None)
    cls_p, aux_p = apply(*pad_slide(feats, cells, 64))
    np.testing.assert_allclose(cls_p, cls, atol=1e-5)
    np.testing.assert_allclose(aux_p["attention"][0, :, 0, 1 + m:], 0.0, atol=1e-7)
    emb, attn = embed_slide(module, params, feats, cells)  # bucket padding (16 -> 32 here)
    np.testing.assert_allclose(emb, cls[0], atol=1e-5)
    assert attn.shape == (m,) and attn.sum() == pytest.approx(1.0, abs=1e-5)
    # Positions matter: a slide with its cells permuted is another slide.
    moved, _ = apply(feats, cells[::-1].copy(), None)
    assert np.abs(np.asarray(moved - cls)).max() > 1e-4


def test_region_views_follow_the_window_rules_and_are_pure():
    """Plants: global_window returning one region; region_dropout ignoring keep_at_least;
    region_views seeding from the index only (seed ignored)."""
    feats, cells = _slide(1)
    m = len(feats)
    kw = dict(global_tokens=32, n_local=4, local_size=3, dropout=0.5, noise_std=0.05)
    for index in range(12):
        v = region_views(feats, cells, 7, index, **kw)
        assert v["global"].shape == (2, 32, 192) and v["local"].shape == (4, 9, 192)
        for kind, least, side in (("global", -(-m // 2), None), ("local", 1, 3)):
            for mask, pos, x in zip(v[f"{kind}_mask"], v[f"{kind}_coords"], v[kind]):
                n = int(mask.sum())
                assert mask[:n].all() and not mask[n:].any() and n >= least
                assert (x[n:] == 0).all() and (pos[n:] == 0).all()
                assert pos[:n].min() == 0  # re-origined; a flip/rotation of a window
                if side:  # a side x side window (in some rotation)
                    assert pos[:n].max() <= side - 1
                # Every kept region is one of the slide's, up to the small noise.
                d = np.abs(x[:n, None, :] - feats[None]).max(-1).min(-1)
                assert d.max() < 1.0
    a = region_views(feats, cells, 7, 3, **kw)
    b = region_views(feats, cells, 7, 3, **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["global_mask"], region_views(feats, cells, 7, 4, **kw)["global_mask"]) or \
        not np.array_equal(a["global"], region_views(feats, cells, 7, 4, **kw)["global"])
    assert not np.array_equal(a["global"], region_views(feats, cells, 8, 3, **kw)["global"])


_EQUIVALENCE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from configs.pretrain_vitwsi import get_config
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer
    c = get_config("runlocal")
    c.global_batch, c.microbatches, c.crops.global_tokens = 8, 1, 16
    rng = np.random.default_rng(0)
    b = trainer.dummy_batch(c, c.global_batch)
    for k in ("global", "local"):
        b[k] = rng.standard_normal(b[k].shape).astype(np.float32)
        b[k + "_coords"] = rng.integers(0, 6, b[k + "_coords"].shape).astype(np.float32)
        b[k + "_mask"] = rng.random(b[k + "_mask"].shape) < 0.7
        b[k + "_mask"][..., 0] = True
    out = {}
    for spec in sys.argv[1:]:
        mesh = shd.make_mesh({"data": int(spec), "fsdp": 1}, jax.devices()[:int(spec)])
        state, sh = trainer.init_sharded_state(c, mesh, jax.random.key(0))
        update = trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=0)
        state, m = update(state, shd.global_batch(b, shd.batch_sharding(mesh)), jax.random.key(1))
        out[spec] = {"loss": float(m["loss"]),
                     "params": [float(np.asarray(x).sum()) for x in jax.tree.leaves(state["student"])]}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # a fresh 8-device process (~40 s); test_pretrain_sharding checks the shared trainer on 8 devices in make test
def test_one_update_same_on_1_and_8_devices():
    """Plant: in the 8-device run, shift the batch by one sample (b[k][1:] + b[k][:1])."""
    env = dict(ENV, XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-c", _EQUIVALENCE, "1", "8"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert res["1"]["loss"] == pytest.approx(res["8"]["loss"], abs=1e-5)
    np.testing.assert_allclose(res["8"]["params"], res["1"]["params"], atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ one runlocal run, reused
def _cli(module, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _runlocal_config(emb, **overrides):
    from configs.pretrain_vitwsi import get_config
    c = get_config("runlocal")
    c.data.path = str(emb)
    c.checkpoint.update(every_steps=100, use_async=False)  # one save, at the end
    c.log_every = 100
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def stage3_run(tmp_path_factory):
    """Arrangement cohort bags (hipt-extract layout) + a runlocal stage-3 run through the trainer
    (in this process: no second start-up)."""
    from hipt_jax.pretrain.trainer import train
    root = tmp_path_factory.mktemp("vitwsi")
    labels = write_cohort(str(root / "emb"), n_per_class=4, seed=0, grid_range=(3, 6))
    metrics = train(_runlocal_config(root / "emb"), str(root / "run"))
    assert np.isfinite(metrics["loss"])
    return root, labels


def test_region_pipeline_state_restores_the_same_batches(stage3_run):
    """What stage 3 adds to the trainer's exact resume: its source + views are restored by the
    Grain iterator state saved in the checkpoint (the whole-CLI kill/resume: the slow test below).
    Plant: RegionMultiCrop drawing from np.random instead of (seed, index)."""
    from hipt_jax.pretrain import data as data_lib
    root, _ = stage3_run
    from hipt_jax.models.lgp import bucket_length
    source = data_lib.make_source(_runlocal_config(root / "emb").data)
    c = data_lib.resolve_config(_runlocal_config(root / "emb"), source)
    assert c.crops.global_tokens == bucket_length(source.max_regions())  # -1: the largest slide fits

    def iterator():
        return data_lib.make_iterator(c, data_lib.make_source(c.data), process_index=0,
                                      process_count=1, num_steps=6)
    it = iterator()
    for _ in range(2):
        next(it)
    state = it.get_state()
    want = next(it)
    it2 = iterator()
    it2.set_state(state)
    got = next(it2)
    assert set(got) == {"index", "global", "global_coords", "global_mask", "local", "local_coords",
                        "local_mask"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_runlocal_export_reloads_and_feeds_extract_knn_and_lgp(stage3_run, tmp_path):
    """Plants: export under kind "hipt_lgp" (load(kind="vit") fails); embed_slide without the
    key mask (slide_embedding_wsi then differs from the unpadded forward); register "wsi" on the
    wrong bag key (hipt-knn --embedding wsi exits 2)."""
    from data_prep import bags
    from hipt_jax.cli import extract, knn
    from hipt_jax.models import checkpoint, lgp

    root, labels = stage3_run
    loaded = checkpoint.load(str(root / "run" / "export"), kind="vit")  # the common loader
    assert loaded.config.stem == "regions" and loaded.head is not None
    assert extract.main(["--vitwsi", str(root / "run" / "export"), "--out", str(root / "emb"),
                         "--no-progress"]) == 0
    bag = bags.list_bags(str(root / "emb"))["arr_0000"]
    a = bags.read_bag_file(bag)
    assert a["slide_embedding_wsi"].shape == (192,) and a["attention_wsi"].shape == (len(a["coords"]),)
    want, _ = loaded.module().apply({"params": loaded.params}, a["features_cls4k"][None],
                                    coords=grid_cells(a["coords"], 4096)[None])
    np.testing.assert_allclose(a["slide_embedding_wsi"], want[0], atol=1e-5)
    from hipt_jax.wsi import wsi_attention  # what hipt-heatmap --vitwsi paints
    coords, stored = wsi_attention(bag)
    np.testing.assert_allclose(wsi_attention(bag, str(root / "run" / "export"))[1], stored, atol=1e-6)
    assert len(coords) == len(stored) and stored.sum() == pytest.approx(1.0, abs=1e-5)
    assert knn.main(["--embeddings", str(root / "emb"), "--labels", labels, "--splits", "kfold:2", "--k", "3",
                     "--embedding", "wsi,cls4k_mean", "--out", str(tmp_path / "knn.json")]) == 0
    assert "wsi" in json.dumps(json.load(open(tmp_path / "knn.json")))
    # HIPT-LGP's global part from a stage-3 export (full-depth ViT-WSI: 2 layers like LGP's).
    variables = lgp.init_lgp(lgp.HIPTLGP(n_classes=2, local_arch="vit4k_tiny"))
    full = build_vit(get_arch("vitwsi")).init(jax.random.PRNGKey(3), jnp.zeros((1, 4, 192)))["params"]
    started = lgp.with_pretrained_global(variables, full)
    np.testing.assert_array_equal(started["params"]["global_transformer"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  full["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(started["params"]["global_phi"]["kernel"],
                                  full["region_embed"]["dense"]["kernel"])
    with pytest.raises(ValueError, match="ViT-WSI"):
        lgp.with_pretrained_global(variables, loaded.params)  # the tiny export has 1 layer


@pytest.mark.slow
def test_cli_stop_then_resume_gives_identical_losses(tmp_path):
    """hipt-pretrain stopped after its step-3 checkpoint (what a kill right after it leaves),
    then re-run: steps 3-5 equal an uninterrupted run's. Plant: as the pipeline-state test."""
    write_cohort(str(tmp_path / "emb"), n_per_class=4, seed=0, grid_range=(3, 6))
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    try:
        def run(name, *extra):
            code, out, err = _cli("hipt_jax.cli.pretrain", "--config", "configs/pretrain_vitwsi.py:runlocal",
                                  f"--workdir={tmp_path / name}", f"--config.data.path={tmp_path / 'emb'}", *extra)
            assert code == 0, err[-3000:]
            return out
        run("ref")
        run("res", "--config.stop_at_step=3")
        assert "checkpoints/3" in run("res")
    finally:
        ENV.pop("JAX_COMPILATION_CACHE_DIR")
    ref, res = _losses(tmp_path / "ref"), _losses(tmp_path / "res")
    assert sorted(res) == list(range(6))
    for step in range(3, 6):
        assert res[step] == pytest.approx(ref[step], abs=1e-6), step


def test_a_bag_of_another_width_is_named_before_training(tmp_path):
    """One bag made by another ViT-4K (CLS-4K 384 wide instead of 192) failed in Grain's
    batching ("Expected all input elements to have the same structure"), naming no bag. Now
    resolve_config refuses before training, naming the bag, its width and the model's.
    Plant: no check_width call in resolve_config -> no error (fails)."""
    from data_prep import bags
    from hipt_jax.pretrain import data as data_lib

    emb = tmp_path / "emb"
    write_cohort(str(emb), n_per_class=2, seed=0, grid_range=(3, 4))
    path = bags.list_bags(str(emb))["arr_0001"]
    a = bags.read_bag_file(path)
    a["features_cls4k"] = np.zeros((len(a["coords"]), 384), np.float32)
    bags.write_bag_file(path, a, bags.read_coords_attrs(path))
    c = _runlocal_config(emb)
    with pytest.raises(ValueError) as err:
        data_lib.resolve_config(c, data_lib.make_source(c.data))
    message = str(err.value)
    assert message.startswith("1 of 4 bags have CLS-4K region embeddings of another width than the model's 192")
    assert f"{path} (384)" in message
    os.remove(path)
    data_lib.resolve_config(c, data_lib.make_source(c.data))  # the others fit


def test_mean256_cls4k_with_a_model_of_another_width_names_the_width_to_set(tmp_path):
    """data.feature=mean256_cls4k with the default 192-wide model said "... the model's -192
    (+ 384 CLS-256 = 192)" about bags that were right. When every bag agrees the model is off:
    the message names the feature's width and the field to set. Plant: no all-bags-agree
    branch in check_width -> the old message, fails."""
    from hipt_jax.pretrain import data as data_lib

    emb = tmp_path / "emb"
    write_cohort(str(emb), n_per_class=1, seed=0, grid_range=(3, 4))
    c = _runlocal_config(emb)
    c.data.feature = "mean256_cls4k"
    with pytest.raises(ValueError) as err:
        data_lib.resolve_config(c, data_lib.make_source(c.data))
    assert str(err.value).endswith("gives region embeddings 384 (CLS-256) + 192 (CLS-4K) = 576 wide, the "
                                   "model takes 192: set --config.model.in_features=576")
    c.model.in_features = 576
    data_lib.resolve_config(c, data_lib.make_source(c.data))
