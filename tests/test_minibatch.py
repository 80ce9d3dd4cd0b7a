"""CPU minibatch sizes from the machine: cache sizes from sysfs, the cache rule, calibration."""
import os

import pytest

from hipt_jax.models import minibatch
from hipt_jax.models.archs import get_arch


def _fake_sysfs(root, cores=2, l2="512K", l3="32768K"):
    for c in range(cores):
        for i, (level, kind, size, shared) in enumerate(
                [(1, "Data", "32K", str(c)), (1, "Instruction", "32K", str(c)), (2, "Unified", l2, str(c)),
                 (3, "Unified", l3, f"0-{cores - 1}")]):
            d = root / f"cpu{c}" / "cache" / f"index{i}"
            d.mkdir(parents=True)
            for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (d / name).write_text(f"{value}\n")
    return str(root)


def test_cpu_info_counts_private_caches_per_core_and_shared_ones_once(tmp_path, monkeypatch):
    """Plant: count the shared L3 once per core -> l3 doubles and the check fails."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    info = minibatch.cpu_info(_fake_sysfs(tmp_path))
    assert (info["l1d"], info["l2"], info["l3"], info["cores"]) == (64 << 10, 1 << 20, 32 << 20, 2)


def test_cache_rule_follows_the_cache_size():
    """The ViT-256 minibatch grows with the caches (not a constant): a 32 MiB L3 + 1 MiB L2
    gives 8 patches (4 MiB of live block activations each), 4x the cache gives 32.
    Plant: return a constant 8 -> the bigger and smaller caches fail."""
    vit256 = get_arch("vit256")
    small = {"model": "x", "cores": 2, "l1d": 0, "l2": 1 << 20, "l3": 32 << 20}
    big = dict(small, l3=128 << 20)
    tiny = dict(small, l2=0, l3=4 << 20)
    assert [minibatch.region_patch_batch(vit256, 4, info) for info in (tiny, small, big)] == [1, 8, 32]
    assert minibatch.region_patch_batch(vit256, 2, small) == 16  # bf16: half the bytes


def test_calibration_is_stored_per_machine_and_wins(tmp_path, monkeypatch):
    """Plant: ignore the stored calibration in region_patch_batch -> the rule's value comes back."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vit256 = get_arch("vit256")
    key = minibatch.patch_batch_key(vit256, 4)
    assert minibatch.calibrated(key) is None
    best = minibatch.calibrate(key, [4, 16, 64], lambda b: {4: 3.0, 16: 1.0, 64: 2.0}[b])
    assert best == 16 and minibatch.calibrated(key) == 16
    assert minibatch.region_patch_batch(vit256, 4) == 16
    assert os.path.isfile(tmp_path / "hipt_jax" / "minibatch.json")
    # A calibration belongs to the machine it was measured on: for another machine (``info``)
    # the rule decides. Plant: look calibrations up under this machine's key whatever ``info``
    # says -> 16 instead of the rule's 32 for the 128 MiB L3 machine.
    other = {"model": "x", "cores": 2, "l1d": 0, "l2": 1 << 20, "l3": 128 << 20}
    assert minibatch.region_patch_batch(vit256, 4, other) == 32


def test_pretraining_samples_per_microbatch_from_the_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from configs.pretrain_vit4k import get_config

    c = get_config("")
    info = {"model": "x", "cores": 2, "l1d": 0, "l2": 1 << 20, "l3": 32 << 20}
    s = minibatch.samples_per_microbatch(c, 64, info)
    assert s == minibatch.fit_power_of_two(minibatch.training_bytes_per_sample(c), 33 << 20, 64)
    assert minibatch.samples_per_microbatch(c, 64, dict(info, l3=256 << 20)) > s
    assert minibatch.samples_per_microbatch(c, 1, info) == 1
