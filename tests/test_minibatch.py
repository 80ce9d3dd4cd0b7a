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


def test_calibration_reports_each_setting_as_it_is_timed(tmp_path, monkeypatch, capsys):
    """A full-size calibration ran 50 minutes on a 2-core Zen 3 with no output at all. Plant:
    time the pairs without reporting -> no per-setting line in a log (stderr not a terminal)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = minibatch.patch_batch_key(get_arch("vit256"), 4)
    minibatch.calibrate(key, [4, 8], _fake_timings, dot_backends=["ynnpack", "eigen"])
    err = capsys.readouterr().err
    for label in ("ynnpack/4", "ynnpack/8", "eigen/4", "eigen/8"):
        assert f"{key}: {label}: " in err and " s per sample" in err, err


def test_pretraining_samples_per_microbatch_from_the_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from configs.pretrain_vit4k import get_config

    c = get_config("")
    info = {"model": "x", "cores": 2, "l1d": 0, "l2": 1 << 20, "l3": 32 << 20}
    s = minibatch.samples_per_microbatch(c, 64, info)
    assert s == minibatch.fit_power_of_two(minibatch.training_bytes_per_sample(c), 33 << 20, 64)
    assert minibatch.samples_per_microbatch(c, 64, dict(info, l3=256 << 20)) > s
    assert minibatch.samples_per_microbatch(c, 1, info) == 1


def _fake_timings(b, backend):
    """A CPU where Eigen dots at 8 patches win (the pair a calibration must find)."""
    return {("ynnpack", 4): 3.0, ("ynnpack", 8): 2.0, ("eigen", 4): 2.5, ("eigen", 8): 1.5}[(backend, b)]


def test_calibration_stores_the_dot_backend_of_the_fastest_pair(tmp_path, monkeypatch):
    """Every (size, dot backend) pair is timed and the fastest pair's backend is stored beside its
    size. Plants: keep the size but store XLA's default backend -> the "eigen" check fails; time
    only the default backend -> 8 is still found but the backend check fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    key = minibatch.patch_batch_key(get_arch("vit256"), 4)
    assert minibatch.calibrated_dot_backend(key) is None
    assert minibatch.cpu_compiler_options(key) == {}  # no calibration: XLA's default
    timed = []
    best = minibatch.calibrate(key, [4, 8], lambda b, backend: timed.append((backend, b)) or _fake_timings(b, backend),
                               dot_backends=["ynnpack", "eigen"])
    assert best == 8 and sorted(timed) == sorted([("ynnpack", 4), ("ynnpack", 8), ("eigen", 4), ("eigen", 8)])
    assert minibatch.calibrated(key) == 8 and minibatch.calibrated_dot_backend(key) == "eigen"
    assert minibatch.cpu_compiler_options(key) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert minibatch.dot_backend_name(minibatch.cpu_compiler_options(key)) == "eigen"
    assert minibatch.cpu_compiler_options(key, "ynnpack") == {}  # a named backend wins
    with pytest.raises(ValueError, match="unknown dot backend"):
        minibatch.cpu_compiler_options(key, "onednn")
    # A calibration that timed only the default stores no backend; an old-format entry reads too.
    other = minibatch.patch_batch_key(get_arch("vit256"), 2)
    minibatch.calibrate(other, [4, 8], lambda b: {4: 1.0, 8: 2.0}[b])
    assert minibatch.calibrated(other) == 4 and minibatch.calibrated_dot_backend(other) is None


def test_compiler_options_leave_the_users_xla_flags_and_accelerators_alone(tmp_path, monkeypatch):
    """A dot choice in XLA_FLAGS is the user's and no calibration overrides it; GPU/TPU programs
    get no CPU option. Plants: drop either guard in cpu_compiler_options -> the eigen option
    comes back and the check fails."""
    import jax

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    key = minibatch.patch_batch_key(get_arch("vit256"), 4)
    minibatch.calibrate(key, [4, 8], _fake_timings, dot_backends=["ynnpack", "eigen"])
    # The machine key holds XLA_FLAGS, so the calibration is looked up under the flags it was
    # measured with: set them after looking it up the way a user's shell would differ.
    entry_key = minibatch.machine_key()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")
    monkeypatch.setattr(minibatch, "machine_key", lambda info=None: entry_key)
    assert minibatch.cpu_compiler_options(key) == {}
    monkeypatch.delenv("XLA_FLAGS")
    assert minibatch.cpu_compiler_options(key) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert minibatch.cpu_compiler_options(key) == {}


@pytest.mark.parametrize("bad", ["{not json", '{"KEY": {"MODEL": {"best": "abc"}}}', '{"KEY": {"MODEL": {"best": 0}}}',
                                 '{"KEY": {"MODEL": [8]}}', '{"KEY": []}'])
def test_a_damaged_calibration_file_falls_back_to_the_rule(tmp_path, monkeypatch, caplog, bad):
    """A hand-edited or truncated minibatch.json never crashes a run or gives a nonsense size:
    the rule decides and (for a readable but wrong entry) a warning names the file.
    Plant: return entries without checking "best" -> "abc" raises, 0 gives minibatch 0."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vit256 = get_arch("vit256")
    key = minibatch.patch_batch_key(vit256, 4)
    path = tmp_path / "hipt_jax" / "minibatch.json"
    path.parent.mkdir(parents=True)
    path.write_text(bad.replace("KEY", minibatch.machine_key().replace('"', '\\\\"')).replace("MODEL", key))
    info = minibatch.cpu_info()
    rule = minibatch.fit_power_of_two(minibatch.block_bytes(257, 384, 1536, 6), minibatch.cache_budget(info), 256)
    assert minibatch.calibrated(key) is None and minibatch.calibrated_dot_backend(key) is None
    assert minibatch.region_patch_batch(vit256, 4) == rule
    if "best" in bad:
        assert "minibatch.json" in caplog.text


def test_cpu_model_names_the_generation(tmp_path):
    """Two cloud CPUs both called "AMD EPYC" (Zen 4 and Zen 5) must not share a calibration or
    read the same in a benchmark line: the family/model/stepping and vector ISA are in the name.
    Plant: return the bare model name -> both generations give "AMD EPYC"."""
    def fake(family, flags):
        path = tmp_path / f"cpuinfo{family}"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 2\n"
                        f"model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu {flags}\n\n"
                        "processor\t: 1\ncpu family\t: 99\n")
        return minibatch._cpu_model(str(path))
    zen4, zen5 = fake(25, "avx2 avx512f"), fake(26, "avx2 avx512f")
    assert zen4 == "AMD EPYC (family 25 model 2 stepping 1, avx512)" and zen4 != zen5
    assert fake(6, "avx2 avx512f amx_tile").endswith("amx)")
    assert minibatch._cpu_model(str(tmp_path / "missing"))  # no /proc: still a name


def test_a_calibration_entry_of_the_wrong_types_counts_as_absent(tmp_path, monkeypatch, caplog):
    """{"best": 4, "dot_backend": ["eigen"]} passed the check of "best" and then crashed
    hipt-extract ("unhashable type: 'list'"). Plant: _entry checking only "best" -> TypeError."""
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = minibatch.patch_batch_key(get_arch("vit256"), 4)
    path = tmp_path / "hipt_jax" / "minibatch.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({minibatch.machine_key(): {key: {"best": 4, "dot_backend": ["eigen"]}}}))
    assert minibatch.calibrated_dot_backend(key) is None and minibatch.calibrated(key) is None
    assert str(path) in caplog.text


@pytest.mark.parametrize("old", ['{"KEY": [1, 2]}', "{truncated", "[]"])
def test_calibrate_stores_its_result_whatever_the_file_held(tmp_path, monkeypatch, capsys, old):
    """A machine entry that was a list made calibrate() raise after the whole timing run (minutes
    lost); an unreadable file was silently replaced, dropping other machines' calibrations. The
    result is stored (and returned) in every case, and an unreadable file is kept aside, named.
    Plants: data.setdefault(...)[model] -> TypeError; _read_cache without keep_aside -> no copy."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = minibatch.patch_batch_key(get_arch("vit256"), 4)
    path = tmp_path / "hipt_jax" / "minibatch.json"
    path.parent.mkdir(parents=True)
    path.write_text(old.replace("KEY", minibatch.machine_key().replace('"', '\\"')))
    assert minibatch.calibrate(key, [4, 16], lambda b: {4: 2.0, 16: 1.0}[b]) == 16
    assert minibatch.calibrated(key) == 16
    aside = [p for p in os.listdir(path.parent) if p.startswith("minibatch.json.unreadable-")]
    err = "".join(line for line in capsys.readouterr().err.splitlines(True)
                  if not line.startswith("calibrating "))  # the per-setting progress lines
    if old.startswith("{\""):  # readable: nothing to keep aside
        assert aside == [] and err == ""
    else:
        assert len(aside) == 1 and (path.parent / aside[0]).read_text() == old
        assert f"{path}: " in err and f"kept aside as {path.parent / aside[0]}" in err
