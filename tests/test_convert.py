"""hipt-convert, hipt_jax.models.torch_io and .checkpoint: released layout -> Orbax -> released layout, errors."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from hipt_jax.cli import convert
from hipt_jax.models import checkpoint, torch_io
from hipt_jax.models.archs import build_vit
from tests import reference_torch as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_HEAD = 512  # head out_dim for test files (65536 in the released ones; same layout)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Full-size random vit256 and vit4k files in the released DINO layout (small head)."""
    d = tmp_path_factory.mktemp("released")
    files = {}
    for arch, seed in (("vit256", 0), ("vit4k", 10)):
        files[arch] = str(d / f"{arch}_dino.pth")
        ref.write_released_checkpoint(files[arch], arch, seed=seed, head_out_dim=SMALL_HEAD, optimizer_state=False)
    return files


def run_cli(capsys, *argv):
    code = convert.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hipt-convert: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_released_layout_is_the_reference_layout(released):
    ckpt = ref.torch_load_trusted(released["vit256"])
    assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "fp16_scaler"}
    teacher = ckpt["teacher"]
    assert sum(k.startswith("backbone.") for k in teacher) == 150
    assert sorted(k for k in teacher if k.startswith("head.")) == sorted(
        f"head.{k}" for k in ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                              "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"))
    assert all(k.startswith("module.") for k in ckpt["student"])
    assert ckpt["teacher"]["backbone.patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert ckpt["dino_loss"]["center"].shape == (1, SMALL_HEAD)
    four_k = ref.torch_load_trusted(released["vit4k"])["teacher"]
    assert sum(k.startswith("backbone.") for k in four_k) == 78
    assert four_k["backbone.phi.0.weight"].shape == (192, 384)
    # A plain weights_only load refuses the Namespace: the reason the allow-list exists.
    # (Plant: loading with weights_only=False here, as if the allow-list were not needed,
    # fails the raises. The old pytest.raises(Exception) also passed on unrelated errors.)
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights.only"):
        torch.load(released["vit256"], map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", ["vit256", "vit4k"])
def test_roundtrip_bit_exact_with_head(released, tmp_path, capsys, arch):
    src = released[arch]
    code, out, err = run_cli(capsys, src, tmp_path / "ckpt", "--keep-head")
    assert code == 0, err
    assert f"{arch} teacher backbone" in out
    info = checkpoint.read_arch(str(tmp_path / "ckpt"))
    assert info["arch"] == arch and info["has_head"]
    code, out, err = run_cli(capsys, "--to-torch", tmp_path / "ckpt", tmp_path / "back.pth")
    assert code == 0, err
    original = ref.torch_load_trusted(src)["teacher"]
    back = torch.load(tmp_path / "back.pth", map_location="cpu", weights_only=True)["teacher"]
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        # Bit for bit: compare the raw bytes, not values.
        assert torch.equal(back[key].view(torch.int32), tensor.view(torch.int32)), key
    # The reference loader takes it with no missing or unexpected keys (strict).
    ref.load_reference_weights(ref.build_reference(arch), str(tmp_path / "back.pth"))
    if arch == "vit256":  # refusals of the reverse direction, on the files this test made
        _to_torch_refusals(tmp_path, src, capsys)


def _to_torch_refusals(tmp_path, released_pth, capsys):
    """--to-torch never overwrites (it replaced the user's original checkpoint, student,
    optimizer and head, with one network and exit 0), names a .pth given as its source, and
    refuses the forward direction's options it used to ignore. Plant: no _check_to_torch ->
    exit 0 and the file replaced."""
    import shutil

    original = tmp_path / "original.pth"
    shutil.copy(released_pth, original)
    before = original.read_bytes()
    for argv, needle in [
        ([tmp_path / "ckpt", original], "already exists; --to-torch does not overwrite"),
        ([released_pth, tmp_path / "new.pth"], "is a file; --to-torch converts a converted directory"),
        ([tmp_path / "ckpt", tmp_path / "new.pth", "--which", "student"], "--which: options of the forward"),
        ([tmp_path / "ckpt", tmp_path / "new.pth", "--keep-head"], "--keep-head: options of the forward"),
    ]:
        code, _, err = run_cli(capsys, "--to-torch", *argv)
        assert code == 2 and needle in err, err
    assert original.read_bytes() == before and not (tmp_path / "new.pth").exists()


def test_head_layout_for_pretraining(released, tmp_path):
    """--keep-head stores the DINO head as kernels [in,out] (documented in torch_io.py)."""
    variables, config, head, _ = torch_io.load_reference_backbone(released["vit4k"], keep_head=True)
    assert head["mlp_0"]["kernel"].shape == (192, 2048)
    assert head["mlp_2"]["kernel"].shape == (2048, 2048)
    assert head["mlp_4"]["kernel"].shape == (2048, 256) and head["mlp_4"]["bias"].shape == (256,)
    assert head["last_layer"]["weight_v"].shape == (256, SMALL_HEAD)
    assert head["last_layer"]["weight_g"].shape == (SMALL_HEAD,)
    original = ref.torch_load_trusted(released["vit4k"])["teacher"]
    np.testing.assert_array_equal(head["last_layer"]["weight_v"], original["head.last_layer.weight_v"].numpy().T)


def test_student_and_plain_state_dict(released, tmp_path, capsys):
    code, _, err = run_cli(capsys, released["vit4k"], tmp_path / "s", "--which", "student")
    assert code == 0, err
    variables = checkpoint.load(str(tmp_path / "s")).variables
    student = ref.torch_load_trusted(released["vit4k"])["student"]
    np.testing.assert_array_equal(variables["params"]["cls_token"], student["module.backbone.cls_token"].numpy())
    # Back to torch: written under "student" with the "module.backbone." prefix.
    code, _, err = run_cli(capsys, "--to-torch", tmp_path / "s", tmp_path / "s.pth")
    assert code == 0, err
    back = torch.load(tmp_path / "s.pth", weights_only=True)
    assert "module.backbone.blocks.5.mlp.fc2.bias" in back["student"]
    # A plain (already stripped) state dict, as many users save them.
    plain = {k[len("backbone."):]: v for k, v in ref.torch_load_trusted(released["vit4k"])["teacher"].items()
             if k.startswith("backbone.")}
    torch.save(plain, tmp_path / "plain.pth")
    variables, config = checkpoint.load_backbone(str(tmp_path / "plain.pth"))
    assert config.arch == "vit4k"
    np.testing.assert_array_equal(variables["params"]["phi"]["dense"]["kernel"], plain["phi.0.weight"].numpy().T)


def test_pth_and_converted_dir_give_the_same_model(released, tmp_path, capsys):
    assert run_cli(capsys, released["vit256"], tmp_path / "c")[0] == 0
    from_dir, cfg = checkpoint.load_backbone(str(tmp_path / "c"), expect_arch="vit256")
    from_pth, _ = checkpoint.load_backbone(released["vit256"], expect_arch="vit256")
    flat_a = torch_io.variables_to_reference(from_dir)
    flat_b = torch_io.variables_to_reference(from_pth)
    assert flat_a.keys() == flat_b.keys() and len(flat_a) == 150
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k])
    assert sum(v.size for v in flat_a.values()) == 21_665_664
    # And the converted weights compute what the reference computes.
    model = ref.load_reference_weights(ref.build_reference("vit256"), released["vit256"])
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).numpy()
    got, _ = build_vit(cfg).apply(from_dir, x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_the_same_weights_converted_twice_have_one_identity(released, tmp_path, capsys):
    """Converting the same .pth twice (a copy elsewhere, a re-run) gave other file hashes (Orbax
    records times, arch.json the source path), so every bag extracted with one conversion
    warned "other checkpoint files" against the other and a resumed hipt-extract needed
    --resume-anyway. Plant: weights_identity returning the files' content hash -> unequal."""
    from hipt_jax import provenance

    copy = tmp_path / "elsewhere" / "same.pth"
    copy.parent.mkdir()
    shutil.copy(released["vit256"], copy)
    assert run_cli(capsys, released["vit256"], tmp_path / "a")[0] == 0
    assert run_cli(capsys, copy, tmp_path / "b", "--keep-head")[0] == 0  # the head is not the backbone
    assert run_cli(capsys, released["vit4k"], tmp_path / "other")[0] == 0
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert provenance.content_hash(a) != provenance.content_hash(b)  # the files differ
    assert provenance.weights_identity(a) == provenance.weights_identity(b)
    assert provenance.weights_identity(a) != provenance.weights_identity(str(tmp_path / "other"))
    assert provenance.model_fingerprint(a, None) == provenance.model_fingerprint(b, None)
    # A .pth is identified by its bytes; a directory saved before the field existed too.
    assert provenance.weights_identity(released["vit256"]) == provenance.content_hash(released["vit256"])


def test_ambiguous_single_network_files_are_refused_or_named(released, tmp_path, capsys):
    """Converted with exit 0 and no word: --which student on a one-network file (printed as the
    student); a dict holding "backbone.X" and "X" with different values (the last one kept);
    weights beside their EMA (one container taken silently). Now: refused, refused, taken and
    named. The same tensor under two prefixes (one module saved under two names) converts.
    Plants: each check removed in turn -> fails."""
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    plain = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    torch.save(plain, tmp_path / "plain.pth")
    torch.save({**plain, **{"backbone." + k: v + 1 for k, v in plain.items()}}, tmp_path / "both.pth")
    for argv, needle in [
        ([tmp_path / "plain.pth", tmp_path / "o2", "--which", "student"], "holds one network"),
        ([tmp_path / "both.pth", tmp_path / "o3"], "name the same tensor once prefixes are stripped but hold "
                                                   "different values"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle)
    torch.save({"model." + k: v for k, v in plain.items()} | {"backbone." + k: v for k, v in plain.items()},
               tmp_path / "shared.pth")
    code, _, err = run_cli(capsys, tmp_path / "shared.pth", tmp_path / "o4")
    assert code == 0, err
    torch.save({"state_dict": plain, "state_dict_ema": plain}, tmp_path / "ema.pth")
    code, _, err = run_cli(capsys, tmp_path / "ema.pth", tmp_path / "o5")
    assert code == 0 and "converted 'state_dict'" in err and "not converted: state_dict_ema" in err, err


def test_zero_filled_hole_is_refused(released, tmp_path, capsys):
    """Zero-filled bytes inside a tensor (what an interrupted, preallocated download leaves)
    loaded with exit 0 and zeros in the weights: torch does not check the zip CRCs. Plant: no
    _check_zip_members -> exit 0, fails."""
    import struct
    import zipfile

    data = bytearray(open(released["vit4k"], "rb").read())
    with zipfile.ZipFile(released["vit4k"]) as zf:  # inside the largest tensor's bytes
        info = max(zf.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 1024] = bytes(1024)
    (tmp_path / "holed.pth").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, tmp_path / "holed.pth", tmp_path / "out")
    assert_one_line_error(code, err, "holed.pth", "do not match their checksum")
    assert not (tmp_path / "out" / "arch.json").exists()


def test_truncated_file(released, tmp_path, capsys):
    data = open(released["vit4k"], "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, tmp_path / "cut.pth", tmp_path / "out")
    assert_one_line_error(code, err, "cut.pth", "truncated or corrupt")
    assert not (tmp_path / "out" / "arch.json").exists()


def test_text_file(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are not weights\n" * 10)
    code, _, err = run_cli(capsys, tmp_path / "notes.pth", tmp_path / "out")
    assert_one_line_error(code, err, "notes.pth", "not a PyTorch checkpoint", "text file")
    # A NumPy .npz (a zip, like torch.save's) got torch's "[enforce fail at inline_container.cc:180]";
    # an HDF5 bag "an unknown binary format". Plants: no _sniff_zip, no HDF5 case -> fail.
    np.savez(tmp_path / "weights.npz", kernel=np.zeros(3))
    code, _, err = run_cli(capsys, tmp_path / "weights.npz", tmp_path / "out")
    assert_one_line_error(code, err, "weights.npz: not a PyTorch checkpoint: a NumPy .npz archive (kernel.npy)")
    import h5py

    with h5py.File(tmp_path / "bag.h5", "w") as f:
        f["features"] = np.zeros((2, 192), np.float32)
    code, _, err = run_cli(capsys, tmp_path / "bag.h5", tmp_path / "out")
    assert_one_line_error(code, err, "bag.h5: not a PyTorch checkpoint (looks like an HDF5 file")


def test_other_architecture(released, tmp_path, capsys):
    code, _, err = run_cli(capsys, released["vit4k"], tmp_path / "out", "--arch", "vit256")
    assert_one_line_error(code, err, "vit4k_dino.pth", "vit4k checkpoint", "--arch vit256")
    # Same family, other size: one line naming both (it listed every mismatched tensor; plant:
    # compare the family name only -> the long shape list, fails)
    code, _, err = run_cli(capsys, released["vit4k"], tmp_path / "out", "--arch", "vit4k_tiny")
    assert_one_line_error(code, err, "is a vit4k checkpoint (width 192, depth 6), but --arch vit4k_tiny")
    # The Python API refuses a ViT-4K file passed as ViT-256, with the same kind of message.
    from hipt_jax import HIPT4K

    with pytest.raises(checkpoint.CheckpointError, match="is a vit4k checkpoint, expected vit256"):
        HIPT4K.from_checkpoints(vit256=released["vit4k"])


def test_missing_unexpected_and_mismatched_keys(released, tmp_path, capsys):
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    broken = dict(teacher)
    del broken["backbone.blocks.2.attn.qkv.bias"]
    broken["backbone.blocks.0.attn.extra.weight"] = torch.zeros(3)
    broken["backbone.norm.weight"] = torch.ones(100)
    torch.save({"teacher": broken}, tmp_path / "broken.pth")
    code, _, err = run_cli(capsys, tmp_path / "broken.pth", tmp_path / "out")
    assert_one_line_error(code, err, "missing keys: blocks.2.attn.qkv.bias",
                          "unexpected keys: blocks.0.attn.extra.weight",
                          "shape mismatches: norm.weight (100,) != (192,)")


def test_other_bad_inputs(released, tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope.pth", tmp_path / "out")
    assert_one_line_error(code, err, "no such file")
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 384)}, "epoch": 3}, tmp_path / "t.pth")
    code, _, err = run_cli(capsys, tmp_path / "t.pth", tmp_path / "out", "--which", "student")
    assert_one_line_error(code, err, "no 'student' entry")
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = run_cli(capsys, released["vit4k"], tmp_path / "full")
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(capsys, "--to-torch", tmp_path / "full", tmp_path / "x.pth")
    assert_one_line_error(code, err, "no arch.json")
    # a DST named like a weights file became a directory of that name (plant: no extension
    # check -> exit 0 and a folder "jax.pth", fails)
    code, _, err = run_cli(capsys, released["vit4k"], tmp_path / "jax.pth")
    assert_one_line_error(code, err, "jax.pth: names a .pth file, but hipt-convert writes a directory")
    assert not (tmp_path / "jax.pth").exists()
    # hipt-convert's own output given back to it: it was "a directory without arch.json"
    # (plant: the arch.json case removed from _sniff -> that message, fails)
    assert run_cli(capsys, released["vit4k"], tmp_path / "done")[0] == 0
    code, _, err = run_cli(capsys, tmp_path / "done", tmp_path / "again")
    assert_one_line_error(code, err, "done: is a converted checkpoint already (it has arch.json)", "--to-torch")


def test_what_trainers_save_converts_and_what_cannot_work_is_named(released, tmp_path, capsys):
    """Low-precision and fp64 weights are stored as fp32 and said; wrapper prefixes
    (torch.compile's "_orig_mod.", nested "module.", Lightning's "model.") and containers are
    stripped; NaN weights, a partial DINO head and a pickled nn.Module are one-line errors.
    Plants: .numpy() on the raw tensor (bfloat16: TypeError traceback), no finite check (NaN
    converted, exit 0), no head check (a one-layer head written, exit 0)."""
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    backbone = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    want = checkpoint.load_backbone(released["vit4k"])[0]["params"]["phi"]["dense"]["kernel"]

    torch.save({k: v.to(torch.bfloat16) for k, v in backbone.items()}, tmp_path / "bf16.pth")
    code, out, err = run_cli(capsys, tmp_path / "bf16.pth", tmp_path / "bf16")
    assert code == 0 and "stored as float32; the file held bfloat16" in out, err
    got = checkpoint.load(str(tmp_path / "bf16")).params["phi"]["dense"]["kernel"]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-2 * np.abs(want).max()

    wrapped = {"state_dict": {f"model.module._orig_mod.{k}": v for k, v in backbone.items()}}
    torch.save(wrapped, tmp_path / "lightning.pth")
    code, _, err = run_cli(capsys, tmp_path / "lightning.pth", tmp_path / "lightning")
    assert code == 0, err
    np.testing.assert_array_equal(checkpoint.load(str(tmp_path / "lightning")).params["phi"]["dense"]["kernel"], want)

    nan = dict(backbone)
    nan["blocks.1.attn.qkv.weight"] = nan["blocks.1.attn.qkv.weight"].clone()
    nan["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    assert_one_line_error(*run_cli(capsys, tmp_path / "nan.pth", tmp_path / "nan")[::2],
                          "nan.pth: non-finite values (NaN/Inf) in blocks.1.attn.qkv.weight")

    partial = {k: v for k, v in teacher.items() if not k.startswith("head.") or k.startswith("head.mlp.0.")}
    torch.save({"teacher": partial}, tmp_path / "head.pth")
    assert_one_line_error(*run_cli(capsys, tmp_path / "head.pth", tmp_path / "head", "--keep-head")[::2],
                          "not a valid DINO head: missing head.mlp.2.weight")
    short = dict(teacher, **{"head.mlp.2.weight": teacher["head.mlp.2.weight"][:7]})
    torch.save({"teacher": short}, tmp_path / "short.pth")
    assert_one_line_error(*run_cli(capsys, tmp_path / "short.pth", tmp_path / "short", "--keep-head")[::2],
                          "head.mlp.2.weight has shape (7,")

    module = ref.VisionTransformer4K() if hasattr(ref, "VisionTransformer4K") else torch.nn.Linear(2, 2)
    torch.save(module, tmp_path / "module.pth")
    assert_one_line_error(*run_cli(capsys, tmp_path / "module.pth", tmp_path / "module")[::2],
                          "holds pickled Python objects", "save model.state_dict()")
    assert not any((tmp_path / d).exists() for d in ("nan", "head", "short", "module"))


def test_a_state_dict_under_a_trainers_own_key_converts(released, tmp_path, capsys):
    """{"net": state_dict, "optimizer": ..., "epoch": ...}: a trainer's own container name was
    refused as "'file' is not a state dict of tensors (keys: epoch, net, optimizer)"; the one
    entry that is a state dict is taken (and --to-torch writes it back under it). Two state
    dicts, or tensors beside an "epoch", are refused naming what is there. Plant: no search for
    the entry -> exit 2, fails."""
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    backbone = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    want = checkpoint.load_backbone(released["vit4k"])[0]["params"]["phi"]["dense"]["kernel"]
    torch.save({"net": backbone, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3},
               tmp_path / "net.pth")
    code, out, err = run_cli(capsys, tmp_path / "net.pth", tmp_path / "net")
    assert code == 0 and "vit4k backbone" in out, err
    np.testing.assert_array_equal(checkpoint.load(str(tmp_path / "net")).params["phi"]["dense"]["kernel"], want)
    code, _, err = run_cli(capsys, "--to-torch", tmp_path / "net", tmp_path / "back.pth")
    assert code == 0 and list(ref.torch_load_trusted(str(tmp_path / "back.pth"))) == ["net"], err

    torch.save({"net": backbone, "ema": backbone, "epoch": 3}, tmp_path / "two.pth")
    assert_one_line_error(*run_cli(capsys, tmp_path / "two.pth", tmp_path / "two")[::2],
                          "two.pth: holds several state dicts (ema, net)")
    torch.save({**backbone, "epoch": 3}, tmp_path / "flat.pth")
    assert_one_line_error(*run_cli(capsys, tmp_path / "flat.pth", tmp_path / "flat")[::2],
                          "flat.pth: holds epoch (int) beside its tensors")


def test_entry_point_exits_nonzero_without_traceback(tmp_path):
    (tmp_path / "weights.pth").write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "hipt_jax.cli.convert", str(tmp_path / "weights.pth"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hipt-convert: error:")


@pytest.mark.slow
def test_full_size_released_file(tmp_path, capsys):
    """The real layout at real size (65536-d head, optimizer state): ~704 MB like the release."""
    if shutil.disk_usage(tmp_path).free < 3 * 2**30:
        pytest.skip("needs ~1.5 GB of free disk for a release-sized checkpoint and its conversion")
    path = str(tmp_path / "vit256_small_dino.pth")
    ref.write_released_checkpoint(path, "vit256")
    assert abs(os.path.getsize(path) - 704_238_867) / 704_238_867 < 0.01
    code, _, err = run_cli(capsys, path, tmp_path / "ckpt", "--keep-head")
    assert code == 0, err
    head = checkpoint.load(str(tmp_path / "ckpt")).head
    assert head["last_layer"]["weight_v"].shape == (256, 65536)


def test_flat_teacher_student_dict_and_encoder_prefix(released, tmp_path, capsys):
    """A flat dict of both networks ("teacher.backbone.*" beside "student.backbone.*", as a
    whole-model state_dict of a DINO wrapper saves them) converts the network --which asks for,
    and writes back under the same keys; an "encoder." wrapper is stripped. Plant: no flat-role
    selection -> the keys read as unexpected (exit 2); the student's weights are taken -> wrong
    kernel, fails."""
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    want = checkpoint.load_backbone(released["vit4k"])[0]["params"]["phi"]["dense"]["kernel"]
    flat = {f"teacher.{k}": v for k, v in teacher.items()}
    flat.update({f"student.{k}": v + 1.0 for k, v in teacher.items()})
    torch.save(flat, tmp_path / "flat.pth")
    for which, shift in (("teacher", 0.0), ("student", 1.0)):
        code, _, err = run_cli(capsys, tmp_path / "flat.pth", tmp_path / which, "--which", which)
        assert code == 0, err
        got = checkpoint.load(str(tmp_path / which)).params["phi"]["dense"]["kernel"]
        np.testing.assert_allclose(got, want + shift, rtol=0, atol=1e-6)
    backbone, _, layout = torch_io.split_reference_state(flat, "student", "flat.pth")
    assert layout["prefix"] == "student.backbone." and layout["container"] is None
    back = torch_io.reference_state(torch_io.reference_to_variables(backbone), None, layout)
    assert set(back) == {k for k in flat if k.startswith("student.backbone.")}
    torch.save({k.replace("teacher.backbone.", "teacher.encoder."): v for k, v in flat.items()
                if k.startswith("teacher.backbone.")}, tmp_path / "encoder.pth")
    code, _, err = run_cli(capsys, tmp_path / "encoder.pth", tmp_path / "encoder")
    assert code == 0, err
    np.testing.assert_array_equal(checkpoint.load(str(tmp_path / "encoder")).params["phi"]["dense"]["kernel"], want)


def _write_safetensors(path, tensors):
    """The safetensors layout by hand (no package): u64 header length, JSON header, raw bytes."""
    import json
    import struct

    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_converts_like_the_pth(released, tmp_path, capsys):
    """A .safetensors file was called "not a PyTorch checkpoint (looks like a text file)". It
    is read directly now (F32/F16/BF16 little-endian tensors after a JSON header) and gives the
    same model as the .pth; a cut one is refused by name. Plant: read_pth without the
    safetensors branch -> "not a PyTorch checkpoint" (fails)."""
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    plain = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    torch.save(plain, tmp_path / "plain.pth")
    _write_safetensors(tmp_path / "model.safetensors",
                       {k: ("F32", v.shape, v.numpy().astype("<f4").tobytes()) for k, v in plain.items()})
    code, out, err = run_cli(capsys, tmp_path / "model.safetensors", tmp_path / "st")
    assert code == 0, err
    assert "vit4k backbone, 2,781,504 parameters" in out
    from_st = torch_io.variables_to_reference(checkpoint.load(str(tmp_path / "st")).variables)
    from_pth = torch_io.variables_to_reference(checkpoint.load_backbone(str(tmp_path / "plain.pth"))[0])
    assert from_st.keys() == from_pth.keys()
    for k in from_st:
        np.testing.assert_array_equal(from_st[k], from_pth[k])
    # Half precision: F16 as numpy reads it, BF16 widened exactly (the upper 16 bits of a float32).
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    _write_safetensors(tmp_path / "half.safetensors", {
        "a": ("F16", x.shape, x.half().numpy().astype("<f2").tobytes()),
        "b": ("BF16", x.shape, x.bfloat16().view(torch.int16).numpy().astype("<i2").tobytes())})
    got = torch_io.read_safetensors(str(tmp_path / "half.safetensors"))
    np.testing.assert_array_equal(got["a"], x.half().numpy())
    np.testing.assert_array_equal(got["b"], x.bfloat16().float().numpy())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, tmp_path / "cut.safetensors", tmp_path / "cut")
    assert_one_line_error(code, err, "cut.safetensors: truncated or corrupt safetensors file")


def test_torchscript_is_named_before_torch_reads_it(tmp_path, capsys):
    """A TorchScript .pt printed torch's jit UserWarning and a source line before our refusal.
    Named first now, with what to do, and nothing else on stderr. Plant: no _refuse_torchscript
    -> torch's warning and another message (fails)."""
    traced = torch.jit.trace(torch.nn.Linear(4, 2), torch.zeros(1, 4))
    traced.save(str(tmp_path / "model.pt"))
    code, _, err = run_cli(capsys, tmp_path / "model.pt", tmp_path / "out")
    assert_one_line_error(code, err, "model.pt: a TorchScript archive", "state_dict()")


def test_what_is_not_converted_is_named_and_a_plain_file_is_no_teacher(released, tmp_path, capsys):
    """A timm-style file's classifier head (head.weight/head.bias) and a DINO checkpoint's head
    were dropped without a word; a plain state dict was printed and recorded as the "teacher".
    Plants: no not_converted note -> nothing on stderr (fails); "which" recorded whatever the
    file -> "vit4k teacher backbone" for the plain file (fails)."""
    teacher = ref.torch_load_trusted(released["vit4k"])["teacher"]
    plain = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    torch.save({**plain, "head.weight": torch.zeros(9, 192), "head.bias": torch.zeros(9)}, tmp_path / "timm.pth")
    code, out, err = run_cli(capsys, tmp_path / "timm.pth", tmp_path / "t")
    assert code == 0 and "vit4k backbone" in out and "teacher" not in out, out + err
    assert err.strip() == ("hipt-convert: note: not converted: a classifier head (head.weight (9, 192), "
                           "head.bias; not part of the backbone)"), err
    assert checkpoint.load(str(tmp_path / "t")).meta["which"] is None
    code, out, err = run_cli(capsys, released["vit4k"], tmp_path / "d")
    assert code == 0 and "vit4k teacher backbone" in out
    assert "not converted: the DINO head (8 head.* tensors; --keep-head keeps it)" in err
    assert checkpoint.load(str(tmp_path / "d")).meta["which"] == "teacher"
    code, out, err = run_cli(capsys, released["vit4k"], tmp_path / "k", "--keep-head")
    assert code == 0 and "not converted" not in err


def test_an_unknown_architecture_names_what_it_found_and_what_is_supported(tmp_path, capsys):
    """A ViT-B/16 (width 768) was refused as "no known architecture has stem=pixels depth=12
    mlp_dim=3072". Now the width and depth found and the supported architectures are named.
    Only the tensors the recognition reads are written (a real ViT-B is 340 MB).
    Plant: the old message -> no "width 768" (fails)."""
    fake = {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    fake.update({f"blocks.{i}.mlp.fc1.weight": torch.zeros(3072, 1) for i in range(12)})
    torch.save(fake, tmp_path / "vitb.pth")
    code, _, err = run_cli(capsys, tmp_path / "vitb.pth", tmp_path / "out")
    assert_one_line_error(code, err, "vitb.pth: a ViT-256-like (patch_embed) backbone of width 768, depth 12, "
                                     "mlp 3072 is no supported architecture",
                          "supported: vit256 (width 384, depth 12, mlp 1536), vit4k (width 192, depth 6, mlp 768)")
