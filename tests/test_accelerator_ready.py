"""Issue 18 items 1-3: install extras, dtype=auto, fused attention, the start-up device report.

Everything here runs on CPU with tiny models; the accelerator branches are forced by passing the
backend name in (or monkeypatching jax.default_backend where the library looks it up)."""
from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hipt_jax.cli import flags
from hipt_jax.models import precision
from hipt_jax.models.archs import build_vit, dummy_input, get_arch
from hipt_jax.models.vit import Attention, Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ 1. install extras
def _setup_kwargs() -> dict:
    """setup.py's keyword arguments, without running setuptools."""
    import setuptools

    captured = {}
    source = open(os.path.join(ROOT, "setup.py")).read()
    namespace = {"__name__": "setup_under_test"}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        exec(compile(source, "setup.py", "exec"), namespace)
    finally:
        setuptools.setup = real
    return captured


def _pins(requirements) -> dict[str, str]:
    """'name[extra]==1.2' -> {name: '==1.2'} (name lower-case, extras dropped)."""
    out = {}
    for req in requirements:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", req)
        out[m.group(1).lower()] = m.group(3).strip()
    return out


def test_extras_exist_and_pin_the_core_jax_version():
    """Plant: "cuda12": ["jax[cuda12]==0.10.1"] in setup.py -> fails (jax versions differ)."""
    kw = _setup_kwargs()
    core, extras = _pins(kw["install_requires"]), kw["extras_require"]
    assert core["jax"].startswith("==") and core["jaxlib"] == core["jax"]
    for accel, needle in (("cuda12", "jax[cuda12]"), ("tpu", "jax[tpu]")):
        assert accel in extras, f"no {accel} extra"
        assert any(r.startswith(needle) for r in extras[accel]), extras[accel]
        assert _pins(extras[accel])["jax"] == core["jax"], (accel, extras[accel], core["jax"])
    # Library hygiene: what is imported is declared, what is not is not; Beam's caps live with Beam.
    assert "scipy" in core and "einops" in core and "psutil" not in core
    beam = _pins(extras["beam"])
    for name in ("pillow", "protobuf", "pyarrow"):
        assert beam.get(name, "").startswith("=="), (name, extras["beam"])
        assert not core.get(name, "").startswith("=="), f"core still pins {name} exactly"
    assert {"convert", "beam", "test"} <= set(extras)


# ------------------------------------------------------------------------------ 1. start-up report
def test_visible_accelerators_reads_path_and_device_files(tmp_path):
    """Plant: drop the accel* pattern -> the TPU device file is not reported."""
    assert flags.visible_accelerators(str(tmp_path), which=lambda _: None) == []
    (tmp_path / "nvidia0").touch()
    (tmp_path / "accel0").touch()
    found = flags.visible_accelerators(str(tmp_path), which=lambda name: "/usr/bin/" + name)
    assert found[0] == "nvidia-smi on PATH" and any("nvidia0" in f for f in found)
    assert any("accel0" in f for f in found)


def test_report_devices_warns_when_an_accelerator_is_visible_but_jax_sees_cpu(capsys, monkeypatch):
    """Plant: drop the warning's print -> fails; warn although JAX_PLATFORMS=cpu -> fails."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert flags.report_devices("hipt-x", visible=[]) == "cpu"
    out, err = capsys.readouterr()
    assert out.startswith("hipt-x: JAX ") and "backend cpu" in out and "x cpu" in out and err == ""
    flags.report_devices("hipt-x", visible=["nvidia-smi on PATH"])
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "warning" in err and "nvidia-smi" in err and ".[cuda12]" in err
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # CPU asked for: nothing missed, no warning
    flags.report_devices("hipt-x", visible=["nvidia-smi on PATH"])
    assert capsys.readouterr().err == ""


def test_every_command_reports_devices_at_start(capsys):
    """Plant: run_command without report_devices -> fails."""
    code = flags.run_command("hipt-y", lambda: 0)
    assert code == 0 and capsys.readouterr().out.startswith("hipt-y: JAX ")
    assert flags.run_command("hipt-y", lambda: 0, devices_at_start=False) == 0
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------ 2. dtype=auto
def test_auto_dtype_resolves_per_backend_and_explicit_wins():
    """Plant: ACCELERATOR_BACKENDS without "tpu" -> fails."""
    r = precision.resolve_dtype
    assert r("auto", "cpu") == jnp.float32
    assert r("auto", "gpu") == jnp.bfloat16 and r("auto", "tpu") == jnp.bfloat16 and r("auto", "cuda") == jnp.bfloat16
    assert r("float32", "tpu") == jnp.float32 and r("bfloat16", "cpu") == jnp.bfloat16
    assert r(jnp.bfloat16) == jnp.bfloat16 and precision.dtype_name("auto", "gpu") == "bfloat16"
    assert r("auto") == jnp.float32  # this machine: CPU
    with pytest.raises(ValueError, match="float16"):
        r("float16")


@pytest.fixture
def on_accelerator(monkeypatch):
    """jax.default_backend() answers "tpu" where the resolver asks (the devices stay CPU)."""
    monkeypatch.setattr(precision.jax, "default_backend", lambda: "tpu")


def test_auto_on_accelerator_gives_bf16_activations_fp32_params_softmax_and_loss(on_accelerator):
    """The accelerator branch forced on CPU: bf16 activations, fp32 parameters, fp32 attention
    softmax, LayerNorm statistics in fp32, fp32 DINO logits/loss.
    Plant: resolve "auto" to float32 everywhere -> the activation dtype check fails."""
    import optax

    from configs.pretrain_vit256 import get_config
    from hipt_jax.pretrain import head

    arch = get_arch("vit256_tiny")
    model = build_vit(arch, dtype=precision.resolve_dtype("auto"))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), dummy_input(arch))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(optax.adamw(1e-3).init(params))
               if hasattr(s, "dtype") and s.ndim)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    apply = jax.jit(lambda p, im: model.apply(p, im, capture_intermediates=True, mutable=["intermediates"]))
    (cls, aux), inter = apply(params, x)
    assert cls.dtype == jnp.bfloat16 and aux["tokens"].dtype == jnp.bfloat16
    assert aux["attention"].dtype == jnp.float32
    fc1 = inter["intermediates"]["encoder"]["blocks_0"]["mlp"]["fc1"]["__call__"][0]
    assert fc1.dtype == jnp.bfloat16
    # The pretraining config's default is auto -> the DINO model computes in bf16, logits in fp32.
    config = get_config("runlocal")
    assert config.compute_dtype == "auto"
    dino = head.build_model(config, student=False)
    assert dino.dtype == jnp.bfloat16
    # --compute-dtype auto on the command line resolves the same way; explicit float32 wins.
    assert flags.compute_dtype(type("A", (), {"compute_dtype": "auto"})) == jnp.bfloat16
    assert flags.compute_dtype(type("A", (), {"compute_dtype": "float32"})) == jnp.float32


def test_lgp_and_profile_configs_default_to_auto():
    from configs.lgp_subtyping import get_config as lgp_config
    from configs.profile import get_config as profile_config

    assert lgp_config("runlocal").compute_dtype == "auto" and profile_config("runlocal").dtype == "auto"
    assert "auto" in flags.COMPUTE_DTYPES and flags.COMPUTE_DTYPES == precision.COMPUTE_DTYPES


# ------------------------------------------------------------------------------ 3. fused attention
def _attention_calls(monkeypatch) -> list:
    """Counts the blocks that route their attention through ``vit.fused_attention``."""
    from hipt_jax.models import vit

    calls = []
    real = vit.fused_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(vit, "fused_attention", counting)
    return calls


def test_fused_attention_equals_the_explicit_path_with_mask_and_cls_only():
    """Both lowerings of the fused path (``jax.nn.dot_product_attention``, which GPUs and TPUs
    run, and the heads-first one CPUs run) give the explicit path's values.
    Plants: scale=head_dim**-1 in the dot_product_attention call, or in the CPU branch -> fails."""
    from hipt_jax.models import vit

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 24))
    mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    attn = Attention(num_heads=3)
    params = attn.init(jax.random.PRNGKey(1), x)
    for kwargs in ({}, {"key_mask": mask}, {"cls_only": True}):
        want, weights = jax.jit(functools.partial(attn.apply, need_weights=True, **kwargs))(params, x)
        got, none = jax.jit(functools.partial(attn.apply, need_weights=False, **kwargs))(params, x)
        assert none is None and weights is not None
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)
    # The accelerator branch itself, run here on CPU, against the explicit weights.
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 7, 3, 8)) for i in (2, 3, 4))
    for key_mask in (None, mask):
        want = vit.attend(vit.attention_weights(q, k, key_mask), v)
        for branch in (vit._xla_dot_product_attention, vit._cpu_attention):
            got = jax.jit(functools.partial(branch, scale=8 ** -0.5))(q, k, v, key_mask)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0,
                                       err_msg=branch.__name__)


def test_cpu_attention_backward_equals_autodiff_of_the_explicit_path():
    """The CPU branch's hand-written backward (``vit._heads_first_core``: d logits from
    rowsum(dO * O)) gives autodiff's gradients of the explicit path, with a key mask, with
    queries from one token (cls_only) and in bfloat16.
    Plants: the rowsum term dropped, or the scale missing from d k -> fails."""
    from hipt_jax.models import vit

    mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 7, 3, 8)) for i in (3, 4))
    for n_q, key_mask, dtype, tol in ((7, None, jnp.float32, 2e-5), (7, mask, jnp.float32, 2e-5),
                                      (1, mask, jnp.float32, 2e-5), (7, mask, jnp.bfloat16, 5e-2)):
        q = jax.random.normal(jax.random.PRNGKey(2), (2, n_q, 3, 8))
        d_out = jax.random.normal(jax.random.PRNGKey(5), (2, n_q, 3, 8))
        args = tuple(t.astype(dtype) for t in (q, k, v))

        def explicit(q, k, v, key_mask=key_mask):
            return vit.attend(vit.attention_weights(q, k, key_mask, scale=8 ** -0.5), v)

        def cpu(q, k, v, key_mask=key_mask):
            return vit._cpu_attention(q, k, v, key_mask, scale=8 ** -0.5)

        for name, fn in (("explicit", explicit), ("cpu", cpu)):
            out, pullback = jax.vjp(jax.jit(fn), *args)
            grads = pullback(d_out.astype(dtype))
            if name == "explicit":
                want = [np.asarray(g, np.float32) for g in (out, *grads)]
                continue
            for label, have, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
                assert have.dtype == dtype
                np.testing.assert_allclose(np.asarray(have, np.float32), ref, rtol=tol,
                                           atol=tol * np.abs(ref).max(),
                                           err_msg=f"{label} n_q={n_q} mask={key_mask is not None} {dtype}")
        # padded keys get exactly no gradient
        if key_mask is not None:
            assert not np.asarray(grads[1], np.float32)[1, 4:].any()


def _dot_result_types(fn, args, platform) -> list:
    """The result types of the dot products in fn's program lowered for ``platform``."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return sorted(re.findall(r"stablehlo\.dot_general.*-> (tensor<[^>]*>)", text))


def test_fused_attention_is_dot_product_attention_on_gpu_and_tpu():
    """Lowered for TPU or CUDA (no such device needed), ``fused_attention`` is exactly the
    ``jax.nn.dot_product_attention`` program; for CPU, the heads-first one.
    Plant: the two branches of ``lax.platform_dependent`` swapped -> fails."""
    from hipt_jax.models import vit

    q = k = v = jnp.zeros((2, 7, 3, 8))
    fused = functools.partial(vit.fused_attention, scale=0.25)
    xla = functools.partial(vit._xla_dot_product_attention, scale=0.25)
    cpu = functools.partial(vit._cpu_attention, scale=0.25)
    assert _dot_result_types(xla, (q, k, v), "tpu") != _dot_result_types(cpu, (q, k, v), "tpu")
    for platform in ("tpu", "cuda"):
        assert _dot_result_types(fused, (q, k, v), platform) == _dot_result_types(xla, (q, k, v), platform)
    assert _dot_result_types(fused, (q, k, v), "cpu") == _dot_result_types(cpu, (q, k, v), "cpu")


def test_which_blocks_take_the_fused_path(monkeypatch):
    """Inference: every block but the last (whose map is returned); training and need_weights
    False: every block; dropout on the weights in training: none (the fused kernel has no
    dropout). Plant: need_weights passed to every block -> the inference count fails."""
    calls = _attention_calls(monkeypatch)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 12))
    enc = Encoder(depth=3, num_heads=2, mlp_dim=12)
    params = enc.init(jax.random.PRNGKey(1), x)
    calls.clear()
    _, attn = enc.apply(params, x)
    assert len(calls) == 2 and attn.shape == (1, 2, 5, 5)
    calls.clear()
    _, attn = enc.apply(params, x, deterministic=False)
    assert len(calls) == 3 and attn is None
    calls.clear()
    _, attn = enc.apply(params, x, need_weights=False)
    assert len(calls) == 3 and attn is None
    post = Encoder(depth=2, num_heads=2, mlp_dim=12, pre_norm=False, dropout_rate=0.25)
    p_post = post.init(jax.random.PRNGKey(1), x)
    calls.clear()
    post.apply(p_post, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert len(calls) == 0
    post.apply(p_post, x, need_weights=False)
    assert len(calls) == 2
