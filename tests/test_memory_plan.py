"""hipt-profile --plan: per-device memory plans from compiles only (tiny archs here)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hipt_jax import memory_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_bytes():
    assert memory_plan.parse_bytes("80GB") == 80 * 2**30
    assert memory_plan.parse_bytes("16GiB") == 16 * 2**30
    assert memory_plan.parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="--hbm"):
        memory_plan.parse_bytes("lots")
    # A bare number read as bytes planned every row "NO"; 0 was accepted. Plant: unit optional
    # and no size check (the old parse) -> both parse: fails.
    with pytest.raises(ValueError, match=r"--hbm '80': no unit \(80GB\?\)"):
        memory_plan.parse_bytes("80")
    with pytest.raises(ValueError, match="more than 0 bytes"):
        memory_plan.parse_bytes("0GB")
    assert memory_plan.parse_bytes("1024B") == 1024


def test_plan_batch_is_one_the_trainer_runs():
    """256 over 3 devices: the plan said 85/device "fits" for a run the trainer refuses (256 is
    not divisible by 3), without a word. It plans the nearest global batch that splits, labelled;
    the microbatch count it advises divides the per-device batch, i.e. the trainer's condition
    global % (n * devices) == 0. Plant: per-device = global // devices with no note -> fails."""
    assert memory_plan.split_global_batch(256, 8) == (32, "")
    per_device, note = memory_plan.split_global_batch(256, 3)
    assert per_device == 85 and "256 does not split over 3 devices (the trainer refuses it)" in note
    assert "planned 255 = 3 x 85" in note and "config.global_batch=255" in note
    assert memory_plan.split_global_batch(256, 512)[0] == 1  # 512 x 1, said
    assert "planned 512" in memory_plan.split_global_batch(256, 512)[1]
    n = memory_plan.microbatches_needed(per_device, 20)
    assert (per_device * 3) % (n * 3) == 0 and per_device // n <= 20
    plan = dict.fromkeys(("params", "optimizer", "inputs", "temp", "total"), 0)
    row = {"name": "stage2", "devices": 3, "mesh": {"data": 3, "fsdp": 1}, "hbm": 1, "target_per_device": 85,
           "plan": plan, "fits": True, "note": note}
    text = memory_plan.format_plan([row, dict(row, hbm=2)])
    assert "3 (data 3 x fsdp 1)" in text and text.count("note: stage2: the configured global batch 256") == 1


def test_plan_params_and_optimizer_bytes_match_a_hand_count():
    """Params = student + teacher in fp32, optimizer = Adam's mu and nu in fp32 plus one int32
    step count per tensor, counted here from a concrete init (not through the plan's shardings).
    Plant: count only the student in the plan -> the params check fails by 2x."""
    from configs.pretrain_vit4k import get_config
    from hipt_jax import sharding as shd
    from hipt_jax.pretrain import trainer

    config = get_config("runlocal")
    mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    plan = memory_plan.pretrain_plan(config, mesh, per_device_batch=2)
    student = trainer.create_state(config, jax.random.key(0))["student"]
    leaves = jax.tree.leaves(student)
    n_params = sum(int(np.size(x)) for x in leaves)
    assert plan["params"] == 2 * 4 * n_params
    assert plan["optimizer"] == 2 * 4 * n_params + 4 * len(leaves)
    # stage-2 inputs: index int64 + 2 global and 2 local float32 feature crops per sample
    c = config.crops
    per_sample = 8 + 4 * 384 * (2 * c.global_size ** 2 + c.n_local * c.local_size ** 2)
    assert plan["inputs"] == 2 * per_sample
    assert plan["arguments"] >= plan["params"] + plan["optimizer"] + plan["inputs"]
    assert plan["temp"] > 0 and plan["total"] >= plan["arguments"]


def test_largest_fitting_and_microbatches():
    """Plant: return the first batch that does not fit -> 9 instead of 8 fails."""
    plan_at = lambda b: {"total": 100 * b}  # noqa: E731
    assert memory_plan.largest_fitting(plan_at, 850)[0] == 8
    assert memory_plan.largest_fitting(plan_at, 50)[0] == 0
    assert memory_plan.largest_fitting(plan_at, 10**9, limit=64)[0] == 64
    assert memory_plan.microbatches_needed(32, 8) == 4
    assert memory_plan.microbatches_needed(24, 5) == 6  # 24 / 6 = 4 <= 5
    assert memory_plan.microbatches_needed(32, 0) is None


def test_largest_fitting_predicts_instead_of_bisecting():
    """Each probe is a full compile (~30 s to minutes at full size). A curve shaped like the
    full-size stage-2 plan on 8 devices (0.54 GiB + 0.11 GiB per sample, a step of +19 GiB from
    b = 420 on) must be bracketed to 1/8 in a handful of probes for either HBM size.
    Plants: bisecting after a prediction that does not fit and crawling up by b/16 after one
    that fits (the search before this one) -> 11 probes for 80 GiB; no cap after a failed
    probe (plain regula falsi, which stalls on one side) -> 7; both fail."""
    gib = 2**30

    def curve(b):
        return int((0.54 + 0.11 * b + (19 if b >= 420 else 0)) * gib)

    for hbm in (80 * gib, 40 * gib):
        probes = []

        def plan_at(b):
            probes.append(b)
            return {"total": curve(b)}

        best, plan = memory_plan.largest_fitting(plan_at, hbm)
        exact = max(b for b in range(1, 4097) if curve(b) <= hbm)
        assert plan["total"] <= hbm and exact - exact // 8 <= best <= exact, (hbm, best, exact)
        assert len(set(probes)) <= 6, (hbm, probes)


@pytest.mark.slow  # a fresh process that re-executes itself and compiles: ~20 s of CPU idle
def test_cli_plan_on_two_fake_devices_with_fsdp(tmp_path):
    """The command re-executes itself with 2 fake CPU devices; with fsdp=2 each device holds
    about half of the parameters. Plant: drop the re-exec -> 'JAX sees 1 device(s)', exit 2."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "-m", "hipt_jax.cli.profile", "--plan", "--devices", "2",
                          "--hbm", "1GB,1MB", "--fsdp", "2", "--sections", "stage2", "--tiny", "--nosearch",
                          f"--plan_json={out}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "total GiB" in res.stdout and "fits" in res.stdout
    rows = json.load(open(out))
    assert [r["fits"] for r in rows] == [True, False]
    assert rows[0]["devices"] == 2 and rows[0]["mesh"] == {"data": 1, "fsdp": 2}
    # The hand count of the full (unsharded) params, from the single-device plan above.
    from configs.pretrain_vit4k import get_config
    from hipt_jax.pretrain import trainer
    n = sum(int(np.size(x)) for x in jax.tree.leaves(trainer.create_state(get_config("runlocal"),
                                                                             jax.random.key(0))["student"]))
    assert 0.5 * 8 * n <= rows[0]["plan"]["params"] < 0.75 * 8 * n


def test_cli_plan_bad_input_is_one_line_exit_2(capsys):
    """In-process (each refusal comes before anything is compiled; the `python -m` path of the
    command is test_cli's). Plant: parse_bytes returns 0 for text it cannot read -> the plan
    runs, exit 0, fails. The calls share this process's absl flags, as a notebook's calls do.
    Plant: no FLAGS.unparse_flags() before parsing (cli.flags.absl_main) -> the third call keeps
    the first calls' --plan and gives a device-count error, not the mode mix: fails."""
    from hipt_jax.cli import profile

    from tests.cli_helpers import call_main

    code, _, err = call_main(profile.main, ["hipt-profile", "--plan", "--devices", "1", "--hbm", "lots"], capsys)
    assert code == 2 and "--hbm 'lots'" in err and "Traceback" not in err, err[-500:]
    # --fsdp 0 was a ZeroDivisionError traceback, -1 a numpy message. Plant: no lower_bound -> fails.
    code, _, err = call_main(profile.main, ["hipt-profile", "--plan", "--devices", "1", "--fsdp", "0"], capsys)
    assert code == 2 and "--fsdp=0: 0 is not a positive integer" in err, err[-500:]
    # Flags of one mode given to another were ignored with exit 0 (plant: no _check_plan_flags /
    # no --calibrate check / no _plan_sizes -> exit 0 or a plan: fails).
    for argv, needle in ((["--config", "configs/profile.py:runlocal", "--devices", "8", "--hbm", "40GB"],
                          "--devices, --hbm: options of --plan"),
                         (["--plan", "--calibrate", "--devices", "1", "--tiny"], "--plan and --calibrate: give one"),
                         (["--plan", "--devices", "1", "--tiny", "--config", "configs/profile.py"],
                          "--tiny and --config: give one")):
        code, _, err = call_main(profile.main, ["hipt-profile"] + [a.replace("configs/", os.path.join(ROOT, "configs", ""))
                                                for a in argv], capsys)
        assert code == 2 and needle in err, (argv, err[-500:])


def test_plan_takes_the_region_size_and_says_what_it_planned():
    """--config.hipt4k.region_px=2048 was ignored (the plan was of 4096 px regions, unsaid).
    run_plan takes region_px / archs / stage_args and each row says its setup. Plant: plan_section
    called with the tiny default region instead of region_px -> the inputs bytes differ: fails."""
    rows = memory_plan.run_plan(1, [2**30], sections=["hipt4k"], search=False, region_px=768,
                                archs=dict(arch256="vit256_tiny", arch4k="vit4k_tiny"))
    assert rows[0]["plan"]["inputs"] == 768 * 768 * 3
    assert rows[0]["setup"] == "768 px regions, vit256_tiny + vit4k_tiny"
    assert "planned hipt4k: 768 px regions" in memory_plan.format_plan(rows)


def test_plans_compile_the_attention_accelerators_run(monkeypatch):
    """A plan for GPUs/TPUs compiled on this CPU must hold their program: attention through
    jax.nn.dot_product_attention, not the heads-first CPU lowering.
    Plant: hipt4k_plan without `with accelerator_attention()` -> the CPU lowering is traced, fails."""
    from hipt_jax import sharding as shd
    from hipt_jax.models import vit

    calls = {"dpa": 0, "cpu": 0}

    def counting(name, real):
        def fn(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return fn

    monkeypatch.setattr(vit, "_xla_dot_product_attention", counting("dpa", vit._xla_dot_product_attention))
    monkeypatch.setattr(vit, "_cpu_attention", counting("cpu", vit._cpu_attention))
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    memory_plan.hipt4k_plan(mesh, 1, region_px=512, patch_batch=8, arch256="vit256_tiny", arch4k="vit4k_tiny")
    assert calls["dpa"] > 0 and calls["cpu"] == 0, calls
    # Outside a plan, this CPU lowers its own form again.
    calls.update(dpa=0, cpu=0)
    x = jnp.zeros((1, 5, 2, 4))
    jax.jit(vit.fused_attention).lower(x, x, x)
    assert calls["cpu"] == 1, calls
