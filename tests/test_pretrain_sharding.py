"""Sharding equivalence of the DINO update and the multi-process start-up.

Both tests run in subprocesses: fake CPU devices need XLA_FLAGS before jax is imported.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 3 updates of the stage-1 runlocal model (with stochastic depth) on fixed batches, on the
# meshes given in argv; prints JSON {mesh: {"loss": [...], "leaves": [sums...]}} and saves the
# final states to compare every parameter.
_EQUIVALENCE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from configs.pretrain_vit256 import get_config
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    c = get_config("runlocal")
    c.model.depth = 1  # one block (with stochastic depth) is enough, and compiles 3x faster
    c.global_batch = 8
    c.microbatches = 1  # auto would chunk 1 device's batch but not 8 devices' (other draws)
    # The recipe's lr (peak 5e-4 * 8 / 256): Adam turns gradients that are pure rounding
    # noise into +-lr steps whose sign depends on the reduction order, so a large lr would
    # make a few such elements differ by more than the tolerance on any two device layouts.
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        b = trainer.dummy_batch(c, c.global_batch)
        b["global"] = rng.integers(0, 256, b["global"].shape).astype(np.uint8)
        b["local"] = rng.integers(0, 256, b["local"].shape).astype(np.uint8)
        batches.append(b)
    out = {}
    for spec in sys.argv[2:]:
        data, fsdp = map(int, spec.split("x"))
        mesh = shd.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:data * fsdp])
        state, sh = trainer.init_sharded_state(c, mesh, jax.random.key(0))
        update = trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=1)
        bsh = shd.batch_sharding(mesh)
        losses = []
        for b in batches:
            state, m = update(state, shd.global_batch(b, bsh), jax.random.key(1))
            losses.append(float(m["loss"]))
        sharded = sum(1 for x in jax.tree.leaves(state) if not x.sharding.is_fully_replicated)
        # Pure data parallelism needs all-reduces only: an all-gather means activations of the
        # whole batch were gathered onto every device (each device computing every sample).
        # (One more compile: only for the data-parallel mesh, the one the check is about.)
        hlo = (update.lower(state, shd.global_batch(batches[0], bsh), jax.random.key(1)).compile().as_text()
               if fsdp == 1 and data > 1 else "")
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        np.savez(f"{sys.argv[1]}/{spec}.npz",
                 **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
        out[spec] = {"loss": losses, "n_sharded_leaves": sharded, "all_gathers": hlo.count(" all-gather(")}
    print("RESULT " + json.dumps(out))
""")


def _run(script, args, n_devices, env_extra=None, timeout=600):
    env = dict(os.environ, XLA_FLAGS=xla_flags(n_devices),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_update_same_on_1_device_data_parallel_and_fsdp(tmp_path):
    res = _result(_run(_EQUIVALENCE, [str(tmp_path), "1x1", "8x1", "2x4"], 8))
    assert res["1x1"]["n_sharded_leaves"] == 0 and res["8x1"]["n_sharded_leaves"] == 0
    assert res["2x4"]["n_sharded_leaves"] > 10  # FSDP really splits the big tensors
    # Plant: the DINO model's old view-major [B,V,..] -> [V*B,..] reshape of the sharded batch
    # made SPMD gather every sample's activations onto every device (3 all-gathers).
    assert res["8x1"]["all_gathers"] == 0, res["8x1"]
    ref = dict(np.load(tmp_path / "1x1.npz"))
    assert len(set(res["1x1"]["loss"])) == 3
    width = 384
    peak_lr = 5e-4 * 8 / 256
    for spec in ("8x1", "2x4"):
        np.testing.assert_allclose(res[spec]["loss"], res["1x1"]["loss"], atol=1e-5, err_msg=spec)
        got = dict(np.load(tmp_path / f"{spec}.npz"))
        assert got.keys() == ref.keys()
        for name, want in ref.items():
            have = got[name]
            is_qkv_bias = name.endswith("['qkv']['bias']")
            if is_qkv_bias and ("['student']" in name or "['teacher']" in name):
                # The key bias gets an exactly-zero gradient in exact arithmetic (softmax is
                # shift invariant), i.e. pure rounding noise that Adam's normalization turns
                # into +-lr steps whose sign depends on the reduction order. Bound it by the
                # lr instead; q and v biases are compared like everything else.
                k_part = slice(width, 2 * width)
                np.testing.assert_allclose(have[k_part], want[k_part], atol=3 * peak_lr)
                have, want = np.delete(have, np.s_[k_part]), np.delete(want, np.s_[k_part])
            elif is_qkv_bias:  # its Adam moments: noise too
                k_part = slice(width, 2 * width)
                have, want = np.delete(have, np.s_[k_part]), np.delete(want, np.s_[k_part])
            np.testing.assert_allclose(have, want, atol=1e-5, err_msg=f"{spec} {name}")
    # The parameters did move (the comparison is not between two initial states).
    assert np.abs(ref["['student']['vit']['norm']['bias']"]).max() > 1e-5
    assert np.abs(ref["['opt']['mu']['vit']['norm']['bias']"]).max() > 1e-4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_pngs(folder, n=16, size=96, seed=0):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"p{i:03d}.png")
    return folder


def _cli(workdir, pngs, *extra):
    return ["-m", "hipt_jax.pretrain", "--config", "configs/pretrain_vit256.py:runlocal",
            f"--workdir={workdir}", f"--config.data.path={pngs}", "--config.global_batch=8",
            "--config.total_steps=3", "--config.checkpoint.every_steps=100", *extra]


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    by_step = {r["step"]: r["loss"] for r in rows}
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 fake devices (jax.distributed over localhost, gloo) == 1 process x 8.

    The 2-process run also shards every large parameter over all 8 devices of both hosts
    (mesh data=1 x fsdp=8), so the export has to gather them across processes."""
    pngs = _make_pngs(tmp_path / "png")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    single = subprocess.Popen(
        [sys.executable, *_cli(tmp_path / "one", pngs)], cwd=ROOT, text=True,
        env=dict(env, XLA_FLAGS=xla_flags(8)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, *_cli(tmp_path / "two", pngs,
                               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                               "--config.distributed.num_processes=2",
                               f"--config.distributed.process_id={pid}",
                               "--config.mesh.data=1", "--config.mesh.fsdp=8")],
        cwd=ROOT, text=True, env=dict(env, XLA_FLAGS=xla_flags(4)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in range(2)]
    for p in [single, *procs]:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == 3
    np.testing.assert_allclose(two, one, atol=1e-5)
    from hipt_jax.models.checkpoint import load
    one_vars = load(str(tmp_path / "one" / "export")).params
    two_vars = load(str(tmp_path / "two" / "export")).params
    for a, b in zip(jax.tree.leaves(one_vars), jax.tree.leaves(two_vars)):
        np.testing.assert_allclose(a, b, atol=1e-5)
