"""HIPT4K region model against the reference HIPT_4K (full-size models, random weights)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hipt_jax.models import checkpoint
from hipt_jax.models.torch_io import reference_to_variables
from hipt_jax.models.archs import get_arch
from hipt_jax.models.hipt4k import HIPT4K, center_crop_box
from tests import reference_torch as ref

CLS_TOL = 2e-5
ATTN_TOL = 1e-4


def converted(model):
    return reference_to_variables({k: v.numpy() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def models():
    """Reference HIPT_4K and our HIPT4K holding the same random full-size weights."""
    m256 = ref.random_init_(ref.build_reference("vit256"), seed=3)
    m4k = ref.random_init_(ref.build_reference("vit4k"), seed=4)
    ours = HIPT4K(converted(m256), converted(m4k), get_arch("vit256"), get_arch("vit4k"))
    return ref.HIPT_4K(m256, m4k), ours


def tissue_like(height, width, seed=0):
    """Smooth random colour blobs plus noise: more realistic statistics than pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(height // 64 + 2, width // 64 + 2, 3))
    img = np.repeat(np.repeat(coarse, 64, 0), 64, 1)[:height, :width]
    return np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8)


def assert_parity(got, want):
    for key in ("features_cls256", "features_mean256", "features_cls4k", "features_mean256_cls4k"):
        assert got[key].shape == want[key].shape, key
        assert np.abs(got[key] - want[key]).max() <= CLS_TOL, (key, np.abs(got[key] - want[key]).max())
    for key in ("attention256", "attention4k"):
        assert got[key].shape == want[key].shape, key
        assert np.abs(got[key] - want[key]).max() <= ATTN_TOL, key


@pytest.mark.slow  # ~3 CPU-minutes; the cropped-region test below keeps full-size parity in `make test`
def test_full_region_4096_parity(models):
    """The full 4096 px region: 256 patches through ViT-256 (the costly test, ~1 min on 2 cores)."""
    reference, ours = models
    region = tissue_like(4096, 4096, seed=1)
    want = reference.embed_region(region, attention=True)
    got = ours(region, return_attention=True)
    assert got["features_cls256"].shape == (256, 384) and got["features_cls4k"].shape == (192,)
    assert got["attention256"].shape == (256, 6, 256) and got["attention4k"].shape == (6, 256)
    assert_parity(got, want)


def test_non_square_cropped_region_parity(models):
    """1100x1400 -> centre crop 1024x1280 (offsets 38, 60) -> a 4x5 grid (non-square pos-embed)."""
    reference, ours = models
    region = tissue_like(1100, 1400, seed=2)
    want = reference.embed_region(region, attention=True)
    got = ours(region, return_attention=True)
    assert got["features_cls256"].shape == (20, 384) and got["attention4k"].shape == (6, 20)
    assert_parity(got, want)  # the reference crops the region itself: a wrong crop fails here


@pytest.mark.parametrize("diff,offset", [(0, 0), (1, 0), (3, 2), (5, 2), (7, 4), (255, 128), (253, 126)])
def test_center_crop_uses_bankers_rounding(diff, offset):
    """Odd differences hit round-half-to-even (1.5 -> 2, 2.5 -> 2, 126.5 -> 126). The offsets
    are checked against the reference's crop of an index image, with different odd differences
    on the two sides. Plant: ``(height - crop_h) // 2`` (floor) fails 6 of the 7 cases (checked)."""
    top, left, h, w = center_crop_box(512 + diff, 256 + diff)
    assert (top, left, h, w) == (offset, offset, 512, 256)
    for height, width in ((512 + diff, 256 + diff), (512 + diff, 256 + (diff + 2) % 256)):
        index = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
        ref_crop = ref.center_crop(index, (512, 256))
        ref_top, ref_left = divmod(int(ref_crop[0, 0, 0, 0]), width)
        assert center_crop_box(height, width) == (ref_top, ref_left, 512, 256)


def test_too_small_region_is_rejected():
    with pytest.raises(ValueError, match="at least 256"):
        center_crop_box(255, 1000)


@pytest.fixture(scope="module")
def tiny():
    return HIPT4K.random_init(seed=0, tiny=True, patch_batch=256)


def test_patch_batch_does_not_change_results(tiny):
    regions = np.stack([tissue_like(768, 512, seed=s) for s in (5, 6)])
    full = tiny.embed_batch(regions)
    small = HIPT4K(tiny.params256, tiny.params4k, tiny.config256, tiny.config4k, patch_batch=4).embed_batch(regions)
    for key in full:
        np.testing.assert_allclose(small[key], full[key], atol=1e-5, rtol=0)  # fp32 summation order
    # Batched regions are embedded independently, in order.
    one = tiny(regions[1])
    np.testing.assert_allclose(full["features_cls4k"][1], one["features_cls4k"], atol=1e-5, rtol=0)
    assert full["features_mean256_cls4k"].shape == (2, 576)


@pytest.mark.parametrize("groups,shards,batch_size", [(1, 1, 4), (3, 1, 4), (3, 3, 2), (2, 1, 64), (4, 2, 1)])
def test_map_in_minibatches_keeps_order_and_pads_per_group(groups, shards, batch_size):
    """Items come back in their order whatever the chunking (chunk j of every group runs in
    iteration j, each group padded on its own). Plant: rearrange the output k-major instead of
    group-major -> the rows of different regions swap, fails."""
    from hipt_jax.models.hipt4k import _map_in_minibatches

    xs = jnp.arange(groups * 5 * 2, dtype=jnp.float32).reshape(groups * 5, 2)  # 5 items per group

    def fn(x):  # per-row, and a pytree output like the attention path's
        return x.sum(axis=1) * 3, x[:, ::-1]

    got = _map_in_minibatches(fn, xs, batch_size, groups=groups, group_shards=shards)
    want = fn(xs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_vit256_only_and_bf16(tiny):
    region = tissue_like(512, 512, seed=7)
    only256 = HIPT4K(tiny.params256, None, tiny.config256)(region)
    assert set(only256) == {"features_cls256", "features_mean256"}
    f32 = tiny(region)
    b16 = HIPT4K(tiny.params256, tiny.params4k, tiny.config256, tiny.config4k, dtype=jnp.bfloat16)(region)
    assert b16["features_cls4k"].dtype == np.float32
    err = np.abs(b16["features_cls4k"] - f32["features_cls4k"]).max()
    assert 0 < err < 0.1, err


def test_from_checkpoints_roundtrip(tiny, tmp_path):
    checkpoint.save(str(tmp_path / "v256"), tiny.params256["params"], "vit", tiny.config256)
    checkpoint.save(str(tmp_path / "v4k"), tiny.params4k["params"], "vit", tiny.config4k, meta={"step": 3})
    model = HIPT4K.from_checkpoints(vit256=str(tmp_path / "v256"), vit4k=str(tmp_path / "v4k"))
    assert model.config256.depth == 2 and model.config4k.depth == 1
    region = tissue_like(300, 700, seed=8)
    np.testing.assert_array_equal(model(region)["features_mean256_cls4k"], tiny(region)["features_mean256_cls4k"])
    with pytest.raises(checkpoint.CheckpointError, match="is a vit256 checkpoint, expected vit4k"):
        HIPT4K.from_checkpoints(vit256=str(tmp_path / "v256"), vit4k=str(tmp_path / "v256"))


def test_bad_region_input(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny.embed_batch(np.zeros((1, 256, 256, 3), np.float32))
    with pytest.raises(ValueError, match="one uint8"):
        tiny(np.zeros((256, 256), np.uint8))


def test_calibrated_dot_backend_reaches_the_compiled_region_programs(tmp_path, monkeypatch):
    """A calibration that chose Eigen dots compiles the region program, both HIPT4K's and
    hipt-extract's (Extractor), without YNNPACK fusions and with the same features; forcing
    XLA's default keeps them. Plants: drop compiler_options from HIPT4K._forward_fn or from
    Extractor._full -> YNNPACK fusions are back in that program and the check fails."""
    from hipt_jax import extraction
    from hipt_jax.models import minibatch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    c256 = get_arch("vit256_tiny")
    minibatch.calibrate(minibatch.patch_batch_key(c256, 4), [4], lambda b, backend: {"ynnpack": 2.0, "eigen": 1.0}[backend],
                        dot_backends=["ynnpack", "eigen"])
    eigen = HIPT4K.random_init(seed=0, tiny=True, dtype="float32")
    default = HIPT4K(eigen.params256, eigen.params4k, eigen.config256, eigen.config4k, dtype="float32",
                     dot_backend="ynnpack")
    region = tissue_like(512, 512)

    def compiled(model):
        return model._forward_fn(False).lower(model.params256, model.params4k, region[None]).compile()

    with_eigen, with_default = compiled(eigen), compiled(default)
    assert "ynn" in with_default.as_text() and "ynn" not in with_eigen.as_text()
    got, want = with_eigen(eigen.params256, eigen.params4k, region[None]), with_default(
        default.params256, default.params4k, region[None])
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-5, rtol=0)
    ex = extraction.Extractor(eigen, batch_per_device=1)
    text = ex._full.lower(ex.params256, ex.params4k, ex._put(region[None])).compile().as_text()
    assert "ynn" not in text


@pytest.mark.slow  # ~12 s of compiles; make test covers the logic with fake timings (test_minibatch)
def test_calibration_times_every_minibatch_with_every_dot_backend(tmp_path, monkeypatch):
    """The real calibration (tiny ViT-256, 4 patches) times each (size, backend) pair and stores
    the fastest; with a dot choice in XLA_FLAGS it times sizes only and stores no backend.
    Plant: calibrate sizes only (dot_backends=()) by default -> the pair timings are missing."""
    from hipt_jax.models import minibatch
    from hipt_jax.models.hipt4k import calibrate_patch_batch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    c256 = get_arch("vit256_tiny")
    key = minibatch.patch_batch_key(c256, 4)
    best = calibrate_patch_batch(c256, candidates=(2, 4), patches=4, repeats=1)
    timings = minibatch.calibration_timings(key)
    assert sorted(timings) == ["eigen/2", "eigen/4", "ynnpack/2", "ynnpack/4"]
    fastest = min(timings, key=timings.get)
    assert fastest == f"{minibatch.calibrated_dot_backend(key)}/{best}" and minibatch.calibrated(key) == best
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    calibrate_patch_batch(c256, candidates=(2, 4), patches=4, repeats=1)
    assert sorted(minibatch.calibration_timings(key)) == ["2", "4"] and minibatch.calibrated_dot_backend(key) is None
