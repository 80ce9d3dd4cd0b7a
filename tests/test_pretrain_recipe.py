"""DINO recipe parity: loss + center, head, schedules at every step, optimizer, a full update.

The oracle is DINO's own code re-written in torch (tests/reference_torch_dino.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.pretrain_vit4k import get_config as get_config_4k
from hipt_jax.models import torch_io
from hipt_jax.pretrain import optimizer, schedules
from hipt_jax.pretrain.head import DINOHead
from hipt_jax.pretrain.loss import dino_loss, update_center
from tests import reference_torch as ref
from tests import reference_torch_dino as ref_dino


@pytest.mark.parametrize("n_local", [8, 0])
def test_dino_loss_and_center_match_torch(n_local):
    rng = np.random.default_rng(0)
    batch, k, n_views = 3, 1000, 2 + n_local
    student = rng.normal(size=(n_views * batch, k)).astype(np.float32) * 3
    teacher = rng.normal(size=(2 * batch, k)).astype(np.float32) * 3
    center = rng.normal(size=(1, k)).astype(np.float32) * 0.5
    torch_loss = ref_dino.DINOLoss(k, n_views, 0.04, 0.07, 3, 10)
    torch_loss.center = torch.from_numpy(center.copy())
    epoch = 1  # inside the teacher-temperature warm-up: temp 0.055
    expected = torch_loss(torch.from_numpy(student), torch.from_numpy(teacher), epoch).item()
    ours = dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), n_global=2,
                     teacher_temp=float(torch_loss.teacher_temp_schedule[epoch]))
    np.testing.assert_allclose(float(ours), expected, rtol=1e-5, atol=1e-5)
    new_center = update_center(jnp.asarray(center), jnp.asarray(teacher), 0.9)
    np.testing.assert_allclose(np.asarray(new_center), torch_loss.center.numpy(), atol=1e-6)


def test_dino_head_matches_torch():
    torch.manual_seed(0)
    head = ref_dino.DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    x = np.random.default_rng(1).normal(size=(5, 48)).astype(np.float32)
    expected = head(torch.from_numpy(x)).detach().numpy()
    ours = DINOHead(out_dim=300, hidden_dim=64, bottleneck_dim=16).apply(
        {"params": ref_dino.head_state_to_jax(head)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def _schedule_config(total=40, warmup=7, temp_warmup_epochs=3):
    c = get_config_4k("runlocal")
    c.total_steps, c.global_batch = total, 64
    c.optim.warmup_steps = warmup
    c.teacher.update(warmup_temp=0.02, temp=0.05, warmup_temp_epochs=temp_warmup_epochs)
    return c


def test_schedules_match_dino_at_every_step():
    """4 iterations per epoch, so per-epoch and per-step schedules differ.

    Plant: index the teacher temperature by step instead of epoch (the old per-step warm-up):
    fails on teacher_temp. Plant: per-step temperature fails on teacher_temp (checked).
    """
    c = _schedule_config()
    per_epoch, epochs = 4, c.total_steps // 4
    steps = np.arange(c.total_steps)
    got = jax.vmap(lambda s: schedules.all_schedules(s, c, per_epoch))(jnp.asarray(steps))
    peak = c.optim.lr * c.global_batch / 256
    # DINO: cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs) is per iteration
    # (our warm-up counts iterations: warmup_steps = warmup_epochs * niter_per_ep, here 7
    # iterations = 1.75 epochs, expressed with niter_per_ep=1 over total_steps "epochs").
    temp_by_epoch = ref_dino.DINOLoss(8, 2, 0.02, 0.05, 3, epochs).teacher_temp_schedule
    expected = {
        "lr": ref_dino.cosine_scheduler(peak, c.optim.min_lr, c.total_steps, 1, c.optim.warmup_steps),
        "wd": ref_dino.cosine_scheduler(c.optim.weight_decay, c.optim.weight_decay_end, epochs, per_epoch),
        "momentum": ref_dino.cosine_scheduler(c.teacher.momentum, 1.0, epochs, per_epoch),
        "teacher_temp": temp_by_epoch[steps // per_epoch],
    }
    for name, want in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=2e-6, atol=1e-9, err_msg=name)
    # The temperature is constant within an epoch and moves only at epoch boundaries.
    assert np.ptp(np.asarray(got["teacher_temp"])[4:8]) == 0.0
    # DINO's closed form of the teacher momentum (cosine 0.996 -> 1).
    m = 1 - (1 - 0.996) * (np.cos(np.pi * steps / c.total_steps) + 1) / 2
    np.testing.assert_allclose(np.asarray(got["momentum"]), m, atol=1e-7)


@pytest.mark.parametrize("temp_epochs,lr_warmup", [(0, 0), (1, 1), (2, 1), (10, 40)])
def test_one_step_or_epoch_warmups_match_dino(temp_epochs, lr_warmup):
    """np.linspace(a, b, 1) == [a]: with warmup_temp_epochs=1 DINO's epoch 0 uses the warm-up
    temperature, ours used the final one. Same edge for the lr's 1-step warm-up, and warm-ups
    as long as the run. Plant: linear_then_constant's `if warmup_steps <= 1: return end`
    -> fails at (1, 1) on teacher_temp."""
    c = _schedule_config(total=40, warmup=lr_warmup, temp_warmup_epochs=temp_epochs)
    per_epoch, epochs = 4, 10
    steps = np.arange(c.total_steps)
    got = jax.vmap(lambda s: schedules.all_schedules(s, c, per_epoch))(jnp.asarray(steps))
    peak = c.optim.lr * c.global_batch / 256
    temp = ref_dino.DINOLoss(8, 2, 0.02, 0.05, temp_epochs, epochs).teacher_temp_schedule
    np.testing.assert_allclose(np.asarray(got["teacher_temp"]), temp[steps // per_epoch], rtol=1e-6)
    lr = ref_dino.cosine_scheduler(peak, c.optim.min_lr, c.total_steps, 1, lr_warmup)
    np.testing.assert_allclose(np.asarray(got["lr"]), lr, rtol=2e-6, atol=1e-9)


def test_warmups_longer_than_the_run_are_refused_and_long_epoch_phases_noted():
    """A warm-up longer than the run was clamped silently (lr still rising at the last step, no
    cosine; DINO's scheduler fails its length assert). Refused naming both fields and values.
    An epoch defaulting to the dataset size can freeze the last layer for most of the run: a
    note names the share and data.samples_per_epoch. Plant: check_lengths returning [] at
    once -> fails."""
    c = _schedule_config(total=40, warmup=41, temp_warmup_epochs=0)
    with pytest.raises(ValueError, match=r"config.optim.warmup_steps=41 .*config.total_steps=40"):
        schedules.check_lengths(c, 4)
    c.optim.warmup_steps = 40  # as long as the run: DINO's cosine is then empty, allowed
    c.teacher.warmup_temp_epochs = 11  # 40 steps at 4 per epoch = 10 epochs
    with pytest.raises(ValueError, match=r"warmup_temp_epochs=11 .*10 epoch\(s\) \(config.total_steps=40 at 4"):
        schedules.check_lengths(c, 4)
    c.teacher.warmup_temp_epochs, c.optim.freeze_last_layer_epochs = 0, 1
    assert schedules.check_lengths(c, 4) == []  # 4 of 40 steps: 10%
    (note,) = schedules.check_lengths(c, 39)  # ~ the paper's 390,625 of 400,000
    assert note.startswith("the last layer is frozen for 39 of 40 steps (98%")
    assert "config.optim.freeze_last_layer_epochs=1" in note and "config.data.samples_per_epoch" in note


class _Params(torch.nn.Module):
    def __init__(self, tree):
        super().__init__()
        for name, value in tree.items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value.copy())))


def test_adamw_clipping_decay_mask_and_frozen_last_layer_match_torch():
    rng = np.random.default_rng(0)
    # Flat names so torch and ours share them ("last_layer" marks the frozen tensor).
    tree = {"kernel": rng.normal(size=(4, 5)), "bias": rng.normal(size=(5,)),
            "pos_embed": rng.normal(size=(1, 3, 4)), "last_layer": rng.normal(size=(6, 7))}
    tree = {k: v.astype(np.float32) for k, v in tree.items()}
    model = _Params(tree)
    opt = torch.optim.AdamW(ref_dino.get_params_groups(model), lr=0.0)
    params = {k: jnp.asarray(v) for k, v in tree.items()}
    state = optimizer.init(params)
    lrs, wds, freeze_epochs = [0.1, 0.05, 0.02, 0.01], [0.04, 0.1, 0.2, 0.4], 2
    for it in range(4):
        grads = {k: (rng.normal(size=v.shape) * (5.0 if k != "bias" else 0.1)).astype(np.float32)
                 for k, v in tree.items()}
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[name].copy())
        ref_dino.clip_gradients(model, 3.0)
        ref_dino.cancel_gradients_last_layer(it, model, freeze_epochs)  # 1 iteration per epoch
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lrs[it]
        opt.param_groups[0]["weight_decay"] = wds[it]
        opt.step()
        params, state = optimizer.update(
            {k: jnp.asarray(v) for k, v in grads.items()}, state, params, lr=lrs[it],
            weight_decay=wds[it], freeze_last_layer=it < freeze_epochs, clip_grad=3.0)
        for name, p in model.named_parameters():
            np.testing.assert_allclose(np.asarray(params[name]), p.detach().numpy(), atol=2e-6, rtol=1e-5,
                                       err_msg=f"{name} at iteration {it}")
    assert int(state["count"]["last_layer"]) == 2 and int(state["count"]["kernel"]) == 4


def test_full_update_matches_torch_dino_steps():
    """Three whole DINO iterations (stage 2 shapes, tiny model, no stochastic depth): losses
    and the EMA teacher match DINO's train loop."""
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    c = get_config_4k("runlocal")
    c.drop_path_rate = 0.0
    c.head.update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    c.total_steps, c.global_batch, c.optim.warmup_steps, c.optim.lr = 4, 3, 2, 0.05
    torch.manual_seed(0)
    backbone = ref.build_reference("vit4k_tiny").train()
    ref.random_init_(backbone, seed=0)
    student = ref_dino.MultiCropWrapper(backbone, ref_dino.DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16))
    teacher = ref_dino.MultiCropWrapper(ref.build_reference("vit4k_tiny"), ref_dino.DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    opt = torch.optim.AdamW(ref_dino.get_params_groups(student))
    n_views = 2 + c.crops.n_local
    loss_fn = ref_dino.DINOLoss(64, n_views, 0.04, 0.04, 0, 4)
    lr_s, wd_s, mom_s = ref_dino.tiny_run_schedules(c, lr_warmup_epochs=2)

    params = ref_dino.student_to_jax(student)
    state = trainer.create_state(c, jax.random.key(0))
    assert jax.tree.structure(state["student"]) == jax.tree.structure(params)
    state["student"] = jax.tree.map(jnp.asarray, params)
    state["teacher"] = jax.tree.map(jnp.asarray, params)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    sh = shd.param_shardings(state, mesh)
    # Placed as the trainer places it: an unplaced state would make the second step (whose
    # input is the first step's placed output) compile the update a second time.
    state = jax.device_put(state, sh)
    update = trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=2)

    rng = np.random.default_rng(0)
    for it in range(3):
        batch = trainer.dummy_batch(c, c.global_batch)
        batch["global"] = rng.normal(size=batch["global"].shape).astype(np.float32)
        batch["local"] = rng.normal(size=batch["local"].shape).astype(np.float32)
        # ours [B,V,R,C,F] -> torch list of V crops [B,F,R,C]
        crops = [torch.from_numpy(np.ascontiguousarray(batch[k][:, v].transpose(0, 3, 1, 2)))
                 for k in ("global", "local") for v in range(batch[k].shape[1])]
        epoch = 0 if it < 2 else 1  # "epoch" of 2 iterations: the last layer is frozen in it
        want = ref_dino.train_step(student, teacher, loss_fn, opt, crops, it, epoch, lr_s, wd_s, mom_s,
                                   clip_grad=3.0, freeze_last_layer=1)
        state, metrics = update(state, batch, jax.random.key(1))
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5, err_msg=f"step {it}")
    np.testing.assert_allclose(np.asarray(state["center"]), loss_fn.center.numpy(), atol=1e-5)
    # The teacher moves by only ~(1 - m) x the student's steps (a few 1e-6 here), so compare its
    # DISPLACEMENT from the shared start, to 3% of the largest move (float32 rounding of the
    # EMA is ~0.5%): an absolute 1e-5 on the weights would pass with a teacher that never moved.
    # Plants: a frozen teacher, or EMA toward the pre-update student, fail (checked; the step-1
    # loss already catches both, this check bounds the teacher itself).
    t_sd = {k: v.detach().numpy() for k, v in teacher.state_dict().items()}
    ours_t = jax.device_get(state["teacher"])
    for ours_w, key, start in (
            (ours_t["head"]["last_layer"]["weight_v"], "head.last_layer.weight_v",
             params["head"]["last_layer"]["weight_v"]),
            (ours_t["vit"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"], "backbone.blocks.0.attn.qkv.weight",
             params["vit"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])):
        want = t_sd[key].T.astype(np.float64) - np.asarray(start, np.float64)
        have = np.asarray(ours_w, np.float64) - np.asarray(start, np.float64)
        assert np.abs(want).max() > 1e-7, key
        np.testing.assert_allclose(have, want, atol=0.03 * np.abs(want).max(), err_msg=key)
    ours_s = jax.device_get(state["student"])
    np.testing.assert_allclose(ours_s["vit"]["pos_embed"], student.backbone.pos_embed.detach().numpy(), atol=1e-5)


@pytest.mark.slow  # ~30 s; make test keeps bf16 covered: test_accelerator_ready (bf16 activations,
# fp32 params and Adam state) and test_vit (bf16 forward close to fp32)
def test_bf16_compute_keeps_fp32_params_and_finite_loss():
    from configs.pretrain_vit256 import get_config
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    c = get_config("runlocal,bf16")
    c.model.depth = 1
    assert c.compute_dtype == "bfloat16"
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    state, sh = trainer.init_sharded_state(c, mesh, jax.random.key(0))
    update = trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=0)
    batch = trainer.dummy_batch(c, c.global_batch)
    batch["global"] = np.random.default_rng(0).integers(0, 256, batch["global"].shape).astype(np.uint8)
    batch["local"] = np.random.default_rng(1).integers(0, 256, batch["local"].shape).astype(np.uint8)
    before = np.asarray(state["student"]["vit"]["norm"]["bias"])
    for _ in range(2):
        state, metrics = update(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    dtypes = {x.dtype for x in jax.tree.leaves((state["student"], state["teacher"], state["opt"]["mu"]))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert np.abs(np.asarray(state["student"]["vit"]["norm"]["bias"]) - before).max() > 0


def test_microbatched_loss_and_gradients_equal_the_whole_batch():
    """The fast guard of microbatching (the whole update over 3 steps is the slow test below):
    loss, every student gradient and the teacher logits of 2 strided chunks (gradients summed
    in a lax.scan, the head's last layer once over both) equal one whole-batch pass.
    Plants that fail it: the mean over chunks left out (scale 1), only the last chunk's
    gradients kept, the last layer's weight gradient from one chunk's rows."""
    from hipt_jax.pretrain import trainer
    from hipt_jax.pretrain.schedules import all_schedules

    c = get_config_4k("runlocal")
    c.model.depth, c.drop_path_rate, c.global_batch = 1, 0.0, 4  # no stochastic depth draws
    c.crops.n_local = 0  # global crops only: a third less to compile; the chunking is the same
    state = trainer.create_state(c, jax.random.key(0))
    b = trainer.dummy_batch(c, c.global_batch)
    rng = np.random.default_rng(0)
    b = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in b.items()}
    views = trainer._prepare_views(b, c)
    sched = all_schedules(jnp.asarray(3), c, 1)
    out = {n: jax.jit(trainer.make_loss_and_grads(c, n))(state, views, sched, jax.random.key(1))
           for n in (1, 2)}
    (loss1, grads1, t1), (loss2, grads2, t2) = out[1], out[2]
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-6)
    # teacher logits come back per chunk, [2, B/2, G, K]; chunk i holds samples i, i+2, ...
    np.testing.assert_allclose(np.swapaxes(np.asarray(t2), 0, 1).reshape(np.shape(t1)), t1,
                               rtol=1e-5, atol=1e-6)
    flat1 = jax.tree_util.tree_flatten_with_path(grads1)[0]
    assert len(flat1) == len(jax.tree.leaves(grads2)) > 10
    for (path, want), have in zip(flat1, jax.tree.leaves(grads2)):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5 * scale + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
    last = grads1["head"]["last_layer"]["weight_v"]
    assert np.abs(np.asarray(last)).max() > 0


@pytest.mark.slow  # ~45 s (two compiled updates); make test runs the loss-and-gradients guard
# above. In `make test-all`, with test_parity_drop_path's microbatched update against torch.
def test_microbatched_update_equals_whole_batch_update():
    """config.microbatches=4 (strided chunks, gradients averaged in a lax.scan) is the same
    update as the whole batch at once: losses, center, Adam moments and parameters."""
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    def run(microbatches):
        c = get_config_4k("runlocal")
        c.model.depth, c.drop_path_rate, c.global_batch = 1, 0.0, 8  # no stochastic depth
        c.microbatches = microbatches
        mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
        state, sh = trainer.init_sharded_state(c, mesh, jax.random.key(0))
        update = trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=1)
        rng, losses = np.random.default_rng(0), []
        for _ in range(3):
            b = trainer.dummy_batch(c, c.global_batch)
            b["global"] = rng.normal(size=b["global"].shape).astype(np.float32)
            b["local"] = rng.normal(size=b["local"].shape).astype(np.float32)
            state, metrics = update(state, b, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        return losses, jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]

    whole_losses, whole = run(1)
    micro_losses, micro = run(4)
    np.testing.assert_allclose(micro_losses, whole_losses, rtol=1e-5)
    assert len(set(whole_losses)) == 3
    width = 192
    for (path, want), (_, have) in zip(whole, micro):
        name = jax.tree_util.keystr(path)
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        if name.endswith("['qkv']['bias']"):
            # The key bias has an exactly-zero gradient (softmax shift invariance): rounding
            # noise that Adam turns into +-lr steps. q and v parts are compared.
            want, have = np.delete(want, np.s_[width:2 * width]), np.delete(have, np.s_[width:2 * width])
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow  # ~60 s; make test keeps it covered: the full update below runs the default
# last_block_cls_only=True and matches DINO's torch loop, which runs every token.
def test_last_block_on_cls_only_gives_the_same_logits_and_gradients():
    """The default (the last block computes the CLS token only, the only one the head reads)
    gives the logits and student gradients of running every token through it, as DINO does."""
    from hipt_jax.pretrain import trainer
    from hipt_jax.pretrain.head import build_model

    c = get_config_4k("runlocal")
    c.drop_path_rate = 0.0
    rng = np.random.default_rng(0)
    b = trainer.dummy_batch(c, 3)
    g = jnp.asarray(rng.normal(size=b["global"].shape).astype(np.float32))
    loc = jnp.asarray(rng.normal(size=b["local"].shape).astype(np.float32))
    params = trainer.create_state(c, jax.random.key(0))["student"]
    outs = {}
    for cls_only in (True, False):
        c.last_block_cls_only = cls_only
        model = build_model(c, student=True)

        def f(p):
            logits = model.apply({"params": p}, g, loc, train=True)
            return jnp.sum(jnp.sin(logits)), logits
        (_, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
        outs[cls_only] = (logits, grads)
    np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-6)
    flat_true = jax.tree_util.tree_flatten_with_path(outs[True][1])[0]
    for (path, have), want in zip(flat_true, jax.tree.leaves(outs[False][1])):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # The last block's MLP sees one token per crop instead of all of them: fewer FLOPs.
    depth = c.model.depth
    fc1 = outs[True][1]["vit"]["encoder"][f"blocks_{depth - 1}"]["mlp"]["fc1"]["kernel"]
    assert np.abs(np.asarray(fc1)).max() > 0


def test_microbatches_auto_and_bad_counts():
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    c = get_config_4k("")
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    assert c.microbatches == -1  # auto by default
    c.global_batch = 64
    # Samples per microbatch come from the machine (hipt_jax.models.minibatch); pinned to 4 here.
    from hipt_jax.models import minibatch
    mp = pytest.MonkeyPatch()
    mp.setattr(minibatch, "samples_per_microbatch", lambda config, per_device, info=None: min(4, per_device))
    assert trainer.resolve_microbatches(c, mesh) == 64 // 4
    c.global_batch = 6  # 6 // 4 = 1 chunk
    assert trainer.resolve_microbatches(c, mesh) == 1
    c.global_batch = 40  # 40 // 4 = 10 chunks of 4
    assert trainer.resolve_microbatches(c, mesh) == 10
    c.microbatches = 3
    with pytest.raises(ValueError, match="microbatches=3"):
        trainer.resolve_microbatches(c, mesh)
    c.microbatches = 8
    assert trainer.resolve_microbatches(c, mesh) == 8
    mp.undo()


def test_update_compiles_with_the_calibrated_dot_backend(tmp_path, monkeypatch):
    """jit_update hands jax.jit the XLA:CPU dot backend calibrated for its model (a stored
    "eigen" calibration here), XLA's default ({}) without one. That jax.jit's compiler_options
    reach the compiled program (no YNNPACK fusion left) is checked on the region program
    (test_hipt4k); here a spy on jax.jit sees what the update is built with, no compile needed.
    Plant: drop compiler_options from jit_update -> the spy sees none and the check fails."""
    from hipt_jax import sharding as shd
    from hipt_jax.models import minibatch
    from hipt_jax.pretrain import trainer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    c = get_config_4k("runlocal")
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    abstract = jax.eval_shape(lambda r: trainer.create_state(c, r), jax.random.key(0))
    sh = shd.param_shardings(abstract, mesh, tuple(tuple(r) for r in c.sharding_rules))
    seen, real_jit = [], jax.jit

    def spy(fn, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(trainer.jax, "jit", spy)
    trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=0)
    minibatch.calibrate(minibatch.microbatch_key(c), [1], lambda b, backend: {"ynnpack": 2.0, "eigen": 1.0}[backend],
                        dot_backends=["ynnpack", "eigen"])
    trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=0)
    trainer.jit_update(c, mesh, sh, freeze_last_layer_steps=0, dot_backend="ynnpack")
    assert seen == [{}, {"xla_cpu_experimental_ynn_fusion_type": ""}, {}]


@pytest.mark.parametrize("name", ["pretrain_vit256", "pretrain_vit4k", "pretrain_vitwsi"])
def test_runlocal_runs_freeze_the_last_layer_for_one_short_first_epoch(name):
    """runlocal (and the demo, which runs it for 8 steps) trained with the last layer frozen for
    most of the run (19 of 20 steps on 80 patches: an epoch was the whole small dataset). Its
    epoch is now one step, and at one step per epoch the long-phase note stays quiet. Plants:
    the runlocal samples_per_epoch removed -> 20 steps per epoch, note; the note's one-step
    exception removed -> a note at 1 of 6 steps."""
    import importlib

    from hipt_jax.pretrain import trainer

    c = importlib.import_module(f"configs.{name}").get_config("runlocal")
    c.data.path = "data"
    spe = trainer._steps_per_epoch(c, list(range(80)))
    assert spe == 1
    for total in (c.total_steps, 8, 20):  # runlocal's own, the demo's, a longer local run
        c.total_steps = total
        assert schedules.check_lengths(c, spe) == []
    full = importlib.import_module(f"configs.{name}").get_config()
    assert full.data.samples_per_epoch == -1  # the full configs keep an epoch = the dataset
