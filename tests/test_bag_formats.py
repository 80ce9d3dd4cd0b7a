"""Bags in every format: npz <-> h5 <-> pt round trips, TRIDENT-layout h5 written by h5py read
by hipt-knn, official-layout .pt bags training HIPT-LGP and feeding stage-2 pretraining."""
import itertools
import os
import sys

import h5py
import numpy as np
import pytest
import torch

from data_prep import bags
from tests.synthetic_cohort import write_labels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# What each format carries (the .pt official bag is only the [M,R*C,384] tensor).
CARRIES = {"npz": {"features_cls256", "features_cls4k", "slide_embedding", "coords"},
           "h5": {"features_cls256", "features_cls4k", "slide_embedding", "coords"},
           "pt": {"features_cls256"}}
ATTRS = {"patch_size": 4096, "patch_size_level0": 8192, "level0_magnification": 40.0,
         "target_magnification": 20.0, "overlap": 0, "name": "slide_a", "mpp": 0.5}
# The attributes TRIDENT writes on its coords dataset (published names).
TRIDENT_ATTRS = dict(patch_size=4096, patch_size_level0=8192, level0_magnification=40,
                     target_magnification=20, overlap=0, name="s", savetodir="/job/patches",
                     level0_width=100000, level0_height=80000)


def _bag(rng, m=3, tokens=4):
    return {"features_cls256": rng.normal(size=(m, tokens, 384)).astype(np.float32),
            "features_cls4k": rng.normal(size=(m, 192)).astype(np.float32),
            "slide_embedding": rng.normal(size=(192,)).astype(np.float32),
            "coords": rng.integers(0, 10 ** 6, size=(m, 2)).astype(np.int64)}


def test_round_trip_every_format_pair_is_exact(tmp_path):
    """Each pair a -> b -> a keeps every array both carry bit for bit (and its dtype), and the
    coords attributes between npz and h5. Plant checked: mapping an h5 `features` [M,192] to
    features_region instead of features_cls4k fails the h5 legs."""
    orig = _bag(np.random.default_rng(0))
    for a, b in itertools.product(bags.FORMATS, repeat=2):
        pa, pb, back = (str(tmp_path / f"{a}_{b}_{i}.{f}") for i, f in enumerate((a, b, a)))
        bags.write_bag_file(pa, orig, ATTRS)
        bags.convert_bag(pa, pb)
        bags.convert_bag(pb, back)
        for path, fmts in ((pb, (a, b)), (back, (a, b))):
            got = bags.read_bag_file(path)
            keys = set.intersection(*(CARRIES[f] for f in fmts))
            assert set(got) == keys, (a, b, sorted(got))
            for k in keys:
                assert got[k].dtype == orig[k].dtype and np.array_equal(got[k], orig[k]), (a, b, k)
            assert bags.num_regions(path) == 3
            if "pt" not in fmts:
                assert bags.read_coords_attrs(path) == ATTRS, (a, b)
    # Our h5 is the TRIDENT layout: features = CLS-4K [M,192], coords with the attributes.
    with h5py.File(tmp_path / "h5_h5_1.h5") as f:
        assert f["features"].shape == (3, 192) and f["coords"].dtype == np.int64
        assert f["coords"].attrs["patch_size_level0"] == 8192 and f["coords"].attrs["name"] == "slide_a"
    # The .pt file is exactly what the official code loads: one float tensor [M,R*C,384].
    t = torch.load(tmp_path / "pt_pt_1.pt", weights_only=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (3, 4, 384)


def test_float16_bag_and_bad_files_give_clear_errors(tmp_path, monkeypatch):
    """float16 ViT-256 features survive npz/h5 unchanged; a corrupt h5, a .pt that is not a
    tensor, and a request for an array the format lacks each name the file; .pt without torch
    installed is refused up front. Plant checked: dropping the missing-key check in
    read_bag_file returns {} for ("coords",) and fails."""
    orig = _bag(np.random.default_rng(1))
    orig["features_cls256"] = orig["features_cls256"].astype(np.float16)
    for fmt in ("npz", "h5"):
        path = str(tmp_path / f"half.{fmt}")
        bags.write_bag_file(path, orig)
        assert bags.read_bag_file(path)["features_cls256"].dtype == np.float16
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(bags.BagError, match="bad.h5: truncated or corrupt"):
        bags.read_bag_file(str(tmp_path / "bad.h5"))
    # A .pt whose pickle holds code: the message names the file and does not pass on torch's
    # advice to load it with weights_only=False (plant: the raw torch message).
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(bags.BagError, match="module.pt: truncated or corrupt bag") as caught:
        bags.read_bag_file(str(tmp_path / "module.pt"))
    assert "weights_only=False" not in str(caught.value) and "\n" not in str(caught.value)
    torch.save({"a": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(bags.BagError, match=r"dict.pt: expected a tensor \[M, R\*C, 384\]"):
        bags.read_bag_file(str(tmp_path / "dict.pt"))
    bags.write_bag_file(str(tmp_path / "x.pt"), orig)
    with pytest.raises(bags.BagError, match="x.pt: bag has no coords"):
        bags.read_bag_file(str(tmp_path / "x.pt"), ("coords",))
    bags.check_format("h5")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(bags.BagError, match=r"\.pt bags need PyTorch: pip install torch"):
        bags.check_format("pt")


def _trident_h5(path, feats, rng):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        coords = f.create_dataset("coords", data=rng.integers(0, 10 ** 5, size=(len(feats), 2)))
        for k, v in dict(TRIDENT_ATTRS, name=os.path.basename(path)[:-3]).items():
            coords.attrs[k] = v


def _cohort(rng, n, width):
    """n slides of 2 classes; class c shifts every feature along one random direction."""
    direction = rng.normal(size=width).astype(np.float32)
    classes = np.arange(n) % 2
    return classes, lambda c, shape: (rng.normal(size=shape) + 2.0 * c * direction).astype(np.float32)


def test_trident_h5_folder_is_read_by_hipt_knn(tmp_path, capsys):
    """A folder of TRIDENT-layout h5 files (features [M,192] = CLS-4K per region, coords with
    TRIDENT's attribute names) written by h5py is a hipt-knn input; [M,384] and [M,256,384]
    features map to 384-wide embeddings and a mixed cohort is refused. Plant checked: taking
    the first region instead of the mean over regions drops the AUC and fails the value check."""
    from hipt_jax.cli import knn as knn_cli

    rng = np.random.default_rng(0)
    folder = tmp_path / "trident"
    folder.mkdir()
    classes, sample = _cohort(rng, 20, 192)
    for i, c in enumerate(classes):
        _trident_h5(str(folder / f"s{i:02d}.h5"), sample(c, (int(rng.integers(2, 5)), 192)), rng)
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"s{i:02d}", "label": int(c)} for i, c in enumerate(classes)])
    out = str(tmp_path / "knn.json")
    assert knn_cli.main(["--embeddings", str(folder), "--labels", labels, "--splits", "kfold:2",
                         "--out", out]) == 0, capsys.readouterr().err
    emb = bags.read_slide_embeddings(str(folder))
    with h5py.File(folder / "s03.h5") as f:
        np.testing.assert_allclose(emb["s03"], f["features"][()].mean(0), rtol=1e-6)
    import json
    assert json.load(open(out))["summary"]["paper"]["auc"]["mean"] > 0.9
    # Region-level ViT-256 features: [M,384] (one vector per region) and [M,256,384] (grids).
    _trident_h5(str(tmp_path / "r384.h5"), rng.normal(size=(3, 384)).astype(np.float32), rng)
    _trident_h5(str(tmp_path / "grid.h5"), rng.normal(size=(3, 4, 384)).astype(np.float32), rng)
    assert "features_region" in bags.bag_keys(str(tmp_path / "r384.h5"))
    assert bags.read_slide_embedding(str(tmp_path / "r384.h5")).shape == (384,)
    grid = bags.read_bag_file(str(tmp_path / "grid.h5"))["features_cls256"]
    np.testing.assert_allclose(bags.read_slide_embedding(str(tmp_path / "grid.h5")), grid.mean((0, 1)), rtol=1e-6)
    os.rename(tmp_path / "r384.h5", folder / "zz.h5")
    with pytest.raises(bags.BagError, match="zz.h5: slide embedding has width 384"):
        bags.read_slide_embeddings(str(folder))
    # The odd bag is named even when it sorts first (plant: compare with the first bag read).
    os.rename(folder / "zz.h5", folder / "000.h5")
    with pytest.raises(bags.BagError, match="000.h5: slide embedding has width 384 but 20 of the 21 bags"):
        bags.read_slide_embeddings(str(folder))
    # A 1-D features dataset is a named error, not an IndexError (plant: no ndim check).
    _trident_h5(str(tmp_path / "flat.h5"), rng.normal(size=(7,)).astype(np.float32), rng)
    with pytest.raises(bags.BagError, match="flat.h5: .* has shape \\(7,\\)"):
        bags.read_slide_embedding(str(tmp_path / "flat.h5"))
    # One slide with bags in two formats: readers took different ones (list_bags the first
    # name in sort order, find_bag npz first), so every reader refuses, naming both files.
    os.remove(folder / "000.h5")
    bags.write_bag_file(str(folder / "s03.npz"), _bag(rng))
    for read in (bags.list_bags, lambda f: bags.find_bag(f, "s03")):
        with pytest.raises(bags.BagError, match=r"s03\.(h5|npz) and .*s03\.(h5|npz): slide 's03' has bags in two formats"):
            read(str(folder))
    from hipt_jax.evaluation import cohort
    with pytest.raises(cohort.CohortError, match="s03.npz and .*s03.h5: slide 's03' has bags in two formats"):
        cohort.bag_file(str(folder), "s03")
    code = knn_cli.main(["--embeddings", str(folder), "--labels", labels, "--splits", "kfold:2", "--out", out])
    assert code == 2 and "two formats" in capsys.readouterr().err


def test_clam_pt_files_are_region_features_and_a_folder_of_unreadable_bags_says_why(tmp_path):
    """CLAM's pt_files (one 2-D tensor [M, 1024] per slide) were refused as "not [M, R*C, 384]"
    bag by bag, and hipt-knn then said "FOLDER/slides: no extracted slides" (a folder that does
    not exist) without the reason. Now a 2-D .pt is named by its shape as an h5 `features` is.
    Plants: the old 3-D-only .pt reader -> not read; the old message -> no reason."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "pt_files"
    folder.mkdir()
    feats = rng.normal(size=(5, 1024)).astype(np.float32)
    torch.save(torch.from_numpy(feats), folder / "s0.pt")
    torch.save(torch.from_numpy(rng.normal(size=(3, 192)).astype(np.float32)), tmp_path / "cls4k.pt")
    assert bags.bag_keys(str(folder / "s0.pt")) == ("features_region",)
    assert bags.bag_keys(str(tmp_path / "cls4k.pt")) == ("features_cls4k",)
    assert bags.num_regions(str(folder / "s0.pt")) == 5
    np.testing.assert_allclose(bags.read_slide_embeddings(str(folder))["s0"], feats.mean(0), rtol=1e-6)
    with pytest.raises(bags.BagError, match=r"s0.pt: bag has no features_cls256 \(it holds features_region\)"):
        bags.read_bag_file(str(folder / "s0.pt"), ("features_cls256",))
    torch.save(torch.zeros(4), folder / "s0.pt")
    (folder / "s1.h5").write_bytes(b"not hdf5")
    with pytest.raises(bags.BagError, match=r"pt_files: none of its 2 bag\(s\) could be read \(s0: .*s0.pt: "
                                            r"expected a tensor"):
        bags.read_slide_embeddings(str(folder), failed={})


def test_official_pt_bags_train_lgp_and_feed_stage2(tmp_path):
    """torch.save of [M,4,384] tensors (the official layout, tiny 2x2 grid) in a plain folder
    are found, read and encoded by hipt-finetune's loader and train HIPT-LGP (one epoch, the
    classifier moves), and the stage-2 source reads the same regions from .pt, .h5 and .npz
    bags. Plant checked: finetune looking only for .npz bags (bags.bag_path) finds no slide."""
    from configs import lgp_subtyping
    from hipt_jax.evaluation import cohort as cohort_lib
    from hipt_jax.finetune import main as finetune
    from hipt_jax.finetune.trainer import LGPTrainer, TrainConfig
    from hipt_jax.pretrain.data import make_source

    rng = np.random.default_rng(0)
    folder = tmp_path / "pt_bags"
    folder.mkdir()
    classes, sample = _cohort(rng, 6, 384)
    for i, c in enumerate(classes):
        torch.save(torch.from_numpy(sample(c, (int(rng.integers(1, 4)), 4, 384))), folder / f"s{i:02d}.pt")
    labels = write_labels(str(tmp_path / "labels.csv"),
                          [{"slide_id": f"s{i:02d}", "label": int(c)} for i, c in enumerate(classes)])
    c = lgp_subtyping.get_config("runlocal")
    c.data.embeddings, c.data.labels = str(folder), labels
    coh = cohort_lib.read_labels_csv(labels)
    model = finetune._build_model(c, 2)
    variables = finetune._init_variables(model, c, seed=0, grid=finetune._bag_shape(c, coh.slide_ids)[0])
    items, _, info = finetune.load_items(c, coh, model, variables)
    assert info["n_slides"] == 6 and items[0].inputs.shape[1:] == (192,)  # frozen ViT-4K ran on them
    assert info["instance_shape"] == [4, 384]
    # A bag of another region size (3x3 patches) in the cohort fails alone, named (plant: no
    # instance-shape check -> it is encoded with the others, n_slides 6).
    odd = folder / "s05.pt"
    torch.save(torch.zeros(2, 9, 384), odd)
    failed = {}
    _, _, odd_info = finetune.load_items(c, coh, model, variables, failed)
    assert odd_info["n_slides"] == 5 and "s05.pt: instances (9, 384) while the cohort's first bag" in failed["s05"]
    torch.save(torch.from_numpy(sample(classes[5], (2, 4, 384))), odd)
    trainer = LGPTrainer(model, TrainConfig(epochs=1))
    params = trainer.fit(variables, items, desc=None)
    assert not np.array_equal(params["classifier"]["kernel"], variables["params"]["classifier"]["kernel"])
    # Stage 2 (data.kind "bags"): one record per region, same numbers in every format.
    import ml_collections

    first = torch.load(folder / "s00.pt", weights_only=True).numpy()
    for fmt in ("pt", "h5", "npz"):
        one = tmp_path / f"stage2_{fmt}"
        one.mkdir()
        bags.convert_bag(str(folder / "s00.pt"), str(one / f"s00.{fmt}"))
        src = make_source(ml_collections.ConfigDict(dict(kind="bags", path=str(one), grid=(2, 2),
                                                         in_features=384)))
        assert len(src) == len(first)
        for i in range(len(first)):
            np.testing.assert_array_equal(src[i]["features"], first[i])


def test_numpy_reads_are_serialized_across_threads(tmp_path, monkeypatch):
    """numpy parses .npy/.npz headers with ast.literal_eval, which CPython 3.11.7 cannot run in
    two threads at once (python/cpython#106905: a valid file fails with "AST constructor
    recursion depth mismatch", seen in a 2-task pretraining job whose Grain threads read feature
    files). Every numpy read in data_prep.bags holds one lock: with a slow stand-in parser that
    counts how many threads are inside it, never more than one is."""
    import ast
    import threading
    import time

    from hipt_jax.pretrain.data import FeatureFolderSource

    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(tmp_path / f"r{i}.npy", rng.normal(size=(256, 384)).astype(np.float32))
    bags.write_bag_file(str(tmp_path / "s.npz"), _bag(rng))
    inside, most, count_lock = [0], [0], threading.Lock()
    real = ast.literal_eval

    def slow_literal_eval(text):
        with count_lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.005)
        with count_lock:
            inside[0] -= 1
        return real(text)

    monkeypatch.setattr(ast, "literal_eval", slow_literal_eval)
    source = FeatureFolderSource(str(tmp_path))
    errors = []

    def reader(k):
        try:
            for i in range(8):
                assert source[(i + k) % len(source)]["features"].shape == (256, 384)
                bags.read_bag_file(str(tmp_path / "s.npz"), ("features_cls4k",))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert most[0] == 1, f"{most[0]} threads parsed numpy headers at once"


def test_a_redo_stopped_before_the_bag_is_renamed_keeps_the_old_checksum(tmp_path, monkeypatch):
    """The old bag's checksum was removed before the new bag was renamed into place: a kill in
    between left a damaged bag (the one being redone) with no checksum, read as it was by every
    reader and never redone. Now the checksum is replaced after the bag, so a stop at either
    point leaves a bag that verifies or one taken for damaged. Plant: _remove(side) before the
    bag's os.replace -> the damaged bag passes verify_bag, fails."""
    path = str(tmp_path / "s.npz")
    arrays = {"features_cls4k": np.ones((2, 192), np.float32)}
    bags.write_bag_file(path, arrays)
    with open(path, "r+b") as f:  # damaged: this is what the redo below replaces
        f.truncate(os.path.getsize(path) // 2)
    real, calls = os.replace, []

    def stopped_at(n):
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(src, dst)
        return replace

    monkeypatch.setattr(bags.os, "replace", stopped_at(1))  # before the bag's rename
    with pytest.raises(KeyboardInterrupt):
        bags.write_bag_file(path, {"features_cls4k": np.zeros((3, 192), np.float32)})
    with pytest.raises(bags.BagError, match="truncated or corrupt bag"):
        bags.verify_bag(path)
    calls.clear()
    monkeypatch.setattr(bags.os, "replace", stopped_at(2))  # between the bag's and the checksum's
    with pytest.raises(KeyboardInterrupt):
        bags.write_bag_file(path, {"features_cls4k": np.zeros((3, 192), np.float32)})
    with pytest.raises(bags.BagError, match="does not match"):
        bags.verify_bag(path)
    monkeypatch.undo()
    bags.write_bag_file(path, arrays)
    assert bags.read_bag_file(path)["features_cls4k"].shape == (2, 192)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_pt_bags_listed_by_the_manifest_are_silent_others_noted_once(tmp_path, capsys):
    """hipt-extract --format pt bags cannot record their extraction (a .pt holds one tensor): the
    folder's manifest records it and lists them, so reading them is silent (the "cannot be
    checked" note fired on every such folder); a .pt bag the manifest does not list, or a folder
    whose manifest records no extraction, gets one note per folder saying why. Plant: no
    _check_pt_listed branch -> the note fires on the listed bags."""
    import json

    rng = np.random.default_rng(0)
    out = str(tmp_path / "emb")
    made_by = {"vit256": "a" * 64, "vit4k": "b" * 64, "region_px": 4096, "target_mpp": 0.5}
    paths = [bags.write_bag(out, s, {"features_cls256": _bag(rng)["features_cls256"]}, "pt", made_by=made_by)
             for s in ("s1", "s2")]
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"params": {"extraction": made_by}, "slides": {"s1": {"file": "slides/s1.pt"}}}, f)
    capsys.readouterr()
    bags.check_extraction(out, paths[0])
    assert capsys.readouterr().err == ""
    for _ in range(2):
        bags.check_extraction(out, paths[1])  # not listed: the note, once
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "a .pt bag cannot record the extraction" in err and "does not list it" in err
