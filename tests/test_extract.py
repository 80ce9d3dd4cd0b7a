"""hipt-extract: region shards -> per-slide embeddings (correctness, reuse of feature shards,
resume, bad input, CLI on 2 fake devices)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import bags, shards
from hipt_jax import extraction
from hipt_jax.models.hipt4k import HIPT4K
from tests.shards import write_shard
from tests.synthetic_cohort import make_tissue_cohort, write_region_shard, tissue_crop
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return HIPT4K.random_init(seed=0, tiny=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    prep, rows = make_tissue_cohort(str(root), n_per_class=2, regions=(1, 3), size=512, seed=0)
    return prep, rows


def _decoded_regions(prep, sid):
    return [shards.decode_jpeg(r["image_jpeg"])
            for r in shards.read_records(os.path.join(prep, "regions", sid + ".array_record"))]


def test_extract_matches_region_model_and_resumes(model, cohort, tmp_path):
    prep, rows = cohort
    out = str(tmp_path / "emb")
    manifest = extraction.extract_cohort(model, prep, out, batch_per_device=2, show_progress=False)
    assert all(v["status"] == "done" for v in manifest["slides"].values())
    assert set(manifest["slides"]) == {r["slide_id"] for r in rows}
    sid = rows[0]["slide_id"]
    got = bags.read_bag(out, sid)
    imgs = _decoded_regions(prep, sid)
    ref = model.embed_batch(np.stack(imgs))
    assert got["features_cls256"].shape == (len(imgs), 4, 384)
    np.testing.assert_allclose(got["features_cls256"], ref["features_cls256"], atol=1e-4)
    np.testing.assert_allclose(got["features_cls4k"], ref["features_cls4k"], atol=1e-4)
    np.testing.assert_allclose(got["slide_embedding"], ref["features_cls4k"].mean(0), atol=1e-4)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["slides"][sid]["num_regions"] == len(imgs)
    # Resume: finished slides are skipped; a deleted one is redone identically.
    os.remove(bags.bag_path(out, sid))
    again = extraction.extract_cohort(model, prep, out, batch_per_device=2, show_progress=False)
    assert again["run"]["regions"] == len(imgs)
    np.testing.assert_allclose(bags.read_bag(out, sid)["features_cls4k"], got["features_cls4k"], atol=1e-6)
    assert not [f for f in os.listdir(os.path.join(out, "slides")) if ".tmp-" in f]


def test_a_bag_is_redone_when_its_region_shard_changed(model, cohort, tmp_path, capsys):
    """hipt-prep redid a slide's shard (new regions, new checksum in its status): the bag made
    from the old shard is not "done"; slides that failed in hipt-prep are named. Plants: done =
    any intact bag -> the stale bag is kept (0 regions embedded, old features); no
    _say_prep_failures -> nothing names the lost slide: fails."""
    import shutil

    prep_src, rows = cohort
    prep = str(tmp_path / "prep")
    shutil.copytree(prep_src, prep)
    os.makedirs(os.path.join(prep, "status"), exist_ok=True)
    for r in rows:  # the checksums hipt-prep records in each slide's status
        shard = os.path.join(prep, "regions", r["slide_id"] + ".array_record")
        with open(shards.shard_status_path(shard), "w") as f:
            json.dump({"status": "done", "sha256": shards.file_sha256(shard)}, f)
    with open(os.path.join(prep, "manifest.json"), "w") as f:  # a slide hipt-prep could not cut,
        # and one it cut whose shard is gone (an incomplete copy): it fails, it does not vanish
        # (plant: the slide list without the lost ones -> "lost" absent from the manifest, exit 0)
        json.dump({"items": {"ghost": {"status": "failed", "error": "no tissue"}, "lost": {"status": "done"}}}, f)
    out = str(tmp_path / "emb")
    engine = extraction.Extractor(model, batch_per_device=2)  # compiled once for the four runs
    z = np.zeros
    bags.write_bag(out, "ghost", {"features_cls256": z((1, 4, 384), np.float32), "features_cls4k": z((1, 192), np.float32),
                                  "slide_embedding": z((192,), np.float32), "coords": z((1, 2), np.int64)})
    # (a bag made before the slide failed on a hipt-prep rerun)
    first = extraction.extract_cohort(model, prep, out, show_progress=False, extractor=engine)
    err = capsys.readouterr().err
    assert "1 slide(s) failed in hipt-prep and have no region shard" in err
    # ... is removed, named: every reader lists the bag folder (plant: no _drop_stale_bags ->
    # "ghost" stays a done slide of the manifest).
    assert "ghost: failed in hipt-prep" in err and "ghost" not in first["slides"]
    assert bags.find_bag(out, "ghost") is None
    assert first["slides"]["lost"]["status"] == "failed"
    assert "lost.array_record: region shard missing" in first["slides"]["lost"]["error"]
    sid, other = rows[0]["slide_id"], rows[-1]["slide_id"]
    # As a --redo would leave it: new regions (the other slide's, relabelled: a shard's records
    # name its slide) and their checksum in the status.
    shard = os.path.join(prep, "regions", sid + ".array_record")
    write_shard(shard, [shards.REGION.encode(**{k: v for k, v in dict(r, slide_id=sid).items() if k != "schema"})
                        for r in shards.read_records(os.path.join(prep, "regions", other + ".array_record"))])
    with open(shards.shard_status_path(shard), "w") as f:
        json.dump({"status": "done", "sha256": shards.file_sha256(shard)}, f)
    capsys.readouterr()
    again = extraction.extract_cohort(model, prep, out, show_progress=False, extractor=engine)
    assert f"redoing {sid}: its input changed" in capsys.readouterr().err
    want = bags.read_bag(out, other)["features_cls4k"]
    assert again["run"]["regions"] == len(want)
    np.testing.assert_allclose(bags.read_bag(out, sid)["features_cls4k"], want, atol=1e-5)
    # A bag an earlier run (other shards) left in the folder is in the manifest: readers use
    # every bag of slides/ (plant: manifest items of this run's slides only).
    bags.write_bag(out, "zz_earlier", bags.read_bag(out, other))
    m = extraction.extract_cohort(model, prep, out, show_progress=False, extractor=engine)
    assert m["slides"]["zz_earlier"]["status"] == "done" and m["run"]["regions"] == 0
    # Another format asked for (past the fingerprint with --resume-anyway): the npz bags were
    # reported as ok and no h5 written (plant: no _check_one_format -> returns, fails).
    with pytest.raises(extraction.ExtractError, match="holds .npz bags and this run writes .h5"):
        extraction.extract_cohort(model, prep, out, show_progress=False, extractor=engine, fmt="h5")


def test_precomputed_feature_shards_are_reused(model, cohort, tmp_path):
    prep, rows = cohort
    sid = rows[-1]["slide_id"]
    feats_dir = tmp_path / "feats" / "features"
    feats_dir.mkdir(parents=True)
    recs = list(shards.read_records(os.path.join(prep, "regions", sid + ".array_record")))
    imgs = [shards.decode_jpeg(r["image_jpeg"]) for r in recs]
    f256 = model.embed_batch(np.stack(imgs))["features_cls256"]
    # Deliberately perturbed features prove they were read instead of recomputed.
    f256 = f256 + 0.5
    write_shard(feats_dir / (sid + ".array_record"), (
        shards.encode_feature(f, grid=(2, 2), slide_id=sid, x=r["x"], y=r["y"], mpp=0.5,
                               region_px=512, dtype="float32") for r, f in zip(recs, f256)))
    out = str(tmp_path / "emb")
    extraction.extract_cohort(model, prep, out, features_dir=str(tmp_path / "feats"), show_progress=False)
    got = bags.read_bag(out, sid)
    np.testing.assert_allclose(got["features_cls256"], f256, atol=1e-6)
    want4k = np.asarray(model.embed_batch(np.stack(imgs))["features_cls4k"])
    assert np.abs(got["features_cls4k"] - want4k).max() > 1e-3  # came from the perturbed features


def test_bad_shard_is_reported_and_run_continues(model, tmp_path):
    prep = str(tmp_path / "prep")
    rng = np.random.default_rng(0)
    write_region_shard(prep, "good", [tissue_crop(rng, 256)])
    with open(os.path.join(prep, "regions", "broken.array_record"), "wb") as f:
        f.write(b"not an array record")
    manifest = extraction.extract_cohort(model, prep, str(tmp_path / "emb"), show_progress=False)
    assert manifest["slides"]["good"]["status"] == "done"
    assert manifest["slides"]["broken"]["status"] == "failed"
    assert "broken.array_record" in manifest["slides"]["broken"]["error"]


def test_cli_on_two_devices_and_clear_errors(model, cohort, tmp_path):
    prep, rows = cohort
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), PYTHONPATH=ROOT)
    # --patch-batch 2: the ViT-256 minibatch loop runs (2 of each region's 4 patches per
    # iteration) with the region axis split over the devices.
    cmd = [sys.executable, "-m", "hipt_jax.cli.extract", "--random-init", "tiny", "--patch-batch", "2",
           "--shards", prep, "--out", str(tmp_path / "emb"), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "regions/s" in res.stdout
    manifest = json.load(open(tmp_path / "emb" / "manifest.json"))
    assert manifest["params"]["batch"] == 2  # 1 region per device x 2 devices
    assert len(manifest["slides"]) == len(rows)
    # The batch split over 2 devices gives the single-device results (same seed-0 tiny weights).
    sid = rows[1]["slide_id"]
    ref = model.embed_batch(np.stack(_decoded_regions(prep, sid)))
    got = bags.read_bag(str(tmp_path / "emb"), sid)
    np.testing.assert_allclose(got["features_cls4k"], ref["features_cls4k"], atol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "hipt_jax.cli.extract", "--random-init", "tiny",
                          "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr


# The Extractor's region program on 4 fake devices, 1 region (4 patches of 256 px) per device,
# compiled (nothing runs, the weights are zeros): the all-gathers in the compiled program.
_SPLIT = """
import json, jax, numpy as np
from hipt_jax import extraction
from hipt_jax.models.archs import build_vit, dummy_input, get_arch
from hipt_jax.models.hipt4k import HIPT4K
c256, c4k = get_arch("vit256_tiny"), get_arch("vit4k_tiny")
p256, p4k = (jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),  # weights' values do not matter
                          jax.eval_shape(build_vit(c).init, jax.random.PRNGKey(0), dummy_input(c)))
             for c in (c256, c4k))
out = {}
for pb in (2, 4):  # 2 patches of each region per iteration; the whole region (the GPU default)
    ex = extraction.Extractor(HIPT4K(p256, p4k, c256, c4k, patch_batch=pb), batch_per_device=1)
    regions = jax.ShapeDtypeStruct((ex.batch, 512, 512, 3), np.uint8, sharding=ex._data)
    hlo = ex._full.lower(ex.params256, ex.params4k, regions).compile().as_text()
    out[pb] = {"devices": ex.mesh.size, "all_gathers": hlo.count(" all-gather(")}
print("RESULT " + json.dumps(out))
"""


def test_region_program_split_over_devices_runs_each_region_once():
    """With the regions split over the data axis, a device must run its own regions only.
    The ViT-256 minibatch loop used to step over whole regions (the patch axis [B*R*C] cut
    into consecutive minibatches): a loop over the device-split axis, so SPMD all-gathered
    every region's patches onto every device and each device embedded all of them (right
    results, D times the work and the input memory). Plant: that old loop -> 1+ all-gather.
    The results of the split loop are checked by test_cli_on_two_devices_and_clear_errors."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", _SPLIT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    for pb, row in out.items():
        assert row["devices"] == 4, row
        assert row["all_gathers"] == 0, (pb, row)


def test_features_of_an_older_region_shard_are_refused(tmp_path):
    """hipt-prep features skipped as done after the slide's region shard was redone would give
    the old slide's embedding with exit 0. Plant: no source check -> the stale path returned."""
    import json as _json

    from hipt_jax import extraction
    from data_prep import shards as shards_lib

    feats, regions = tmp_path / "feat", tmp_path / "prep"
    for root, kind in ((feats, "features"), (regions, "regions")):
        (root / kind).mkdir(parents=True)
        (root / "status").mkdir()
        (root / kind / "s.array_record").write_bytes(b"x")
    region_shard = str(regions / "regions" / "s.array_record")
    (regions / "status" / "s.json").write_text(_json.dumps({"sha256": "new"}))
    (feats / "status" / "s.json").write_text(_json.dumps({"source": {"sha256": "old"}}))
    with pytest.raises(extraction.ExtractError, match="made from another version of"):
        extraction._existing_feature_shard(str(feats), "s", region_shard)
    (feats / "status" / "s.json").write_text(_json.dumps({"source": {"sha256": "new"}}))
    assert extraction._existing_feature_shard(str(feats), "s", region_shard) == \
        shards_lib.find_slide_shard(str(feats), shards_lib.FEATURE, "s")


def test_a_full_disk_writing_the_run_status_is_exit_1_naming_it_and_the_rerun_finishes(model, cohort, tmp_path,
                                                                                      capsys, monkeypatch):
    """The bags were written, then OUT/status/process_00000.json could not be: it was exit 2
    ("bad input") with "[Errno 28] No space left on device", naming no file, and the folder's
    provenance record taken back. Now exit 1 naming the file, the record and the bags kept, and
    the rerun finishes without redoing them. Plant: write_process_status without _written ->
    exit 2 and no file named, fails."""
    import errno

    from hipt_jax import provenance
    from hipt_jax.cli import flags

    prep, rows = cohort
    out = tmp_path / "emb"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def extract():
        extraction.extract_cohort(model, prep, str(out), batch_per_device=2, show_progress=False,
                                  fingerprint={"vit256": "random:tiny:seed0"})
        return 0

    real_write = extraction.write_process_status

    def status_disk_full(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(shards.os, "fsync", full)
            real_write(*args, **kwargs)

    monkeypatch.setattr(extraction, "write_process_status", status_disk_full)
    assert flags.run_command("hipt-extract", extract, devices_at_start=False) == flags.EXIT_ITEMS_FAILED
    status = out / "status" / "process_00000.json"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"hipt-extract: error: {status}: write failed (No space left on device)"), last
    assert (out / provenance.FILE).is_file() and len(bags.list_bags(str(out))) == len(rows)
    monkeypatch.undo()
    assert flags.run_command("hipt-extract", extract, devices_at_start=False) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {v["status"] for v in manifest["slides"].values()} == {"done"}
    assert json.loads(status.read_text())["run"]["regions"] == 0  # nothing redone


def test_a_bag_of_ours_without_its_checksum_that_does_not_read_is_redone(model, cohort, tmp_path, capsys):
    """A bag hipt-extract wrote (it has its .source record) whose checksum is gone (a kill in an
    older release's redo) and which is cut short was kept on every rerun, and failed every
    reader. Now it is opened, and redone when it does not read; one that reads is kept. Plant:
    _intact verifying only the checksum -> kept, fails."""
    prep, rows = cohort
    out = str(tmp_path / "emb")
    extraction.extract_cohort(model, prep, out, batch_per_device=2, show_progress=False)
    bad, good = (bags.find_bag(out, r["slide_id"]) for r in rows[:2])
    for path in (bad, good):
        os.remove(bags.checksum_path(path))
    whole = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(whole[: len(whole) // 2])
    kept = os.stat(good).st_mtime_ns
    again = extraction.extract_cohort(model, prep, out, batch_per_device=2, show_progress=False)
    assert f"redoing {bad}: truncated or corrupt bag" in capsys.readouterr().err
    assert again["run"]["regions"] == len(bags.read_bag_file(bad)["coords"])  # only the damaged one
    assert os.path.exists(bags.checksum_path(bad)) and os.stat(good).st_mtime_ns == kept


def test_a_rerun_with_every_slide_done_says_so_not_zero_regions_per_second():
    """A rerun whose slides were all extracted printed '0 regions in 0.0 s (0.0 regions/s);
    3 slides ok', as if the slides held nothing. It says they were already done; a run that
    extracted or failed slides keeps its figures. Plant: summary_line without the
    nothing-done case -> fails."""
    from hipt_jax.cli.extract import summary_line

    idle = {"regions": 0, "seconds": 0.01, "regions_per_s": 0.0}
    assert summary_line(idle, 3, {}, "o/manifest.json") == \
        "hipt-extract: 3 slide(s) already done, nothing to extract -> o/manifest.json"
    assert summary_line(idle, 2, {"s": "bad"}, "o/manifest.json").startswith("hipt-extract: 0 regions in 0.0 s")
    busy = {"regions": 12, "seconds": 2.0, "regions_per_s": 6.0}
    assert summary_line(busy, 3, {}, "o/manifest.json") == \
        "hipt-extract: 12 regions in 2.0 s (6.0 regions/s); 3 slides ok, 0 failed -> o/manifest.json"


def test_a_bag_of_another_extraction_is_named_by_the_readers_and_redone_by_a_rerun(model, cohort, tmp_path, capsys):
    """Bags copied into an embeddings folder from another extraction have the same shapes and
    were scored silently. Each bag now carries its extraction's identity (weights, region size,
    resolution), the manifest the folder's: another region size is refused by the bag readers
    (hipt-finetune/predict/heatmap read_bag, hipt-knn read_slide_embeddings) naming the bag, and
    redone by a hipt-extract rerun; other checkpoint files only warn (the same weights may sit in
    two files); a bag without a record loads with a note. Plant: read_bag without
    check_extraction -> the foreign bag reads, fails."""
    import shutil

    prep_src, rows = cohort
    prep = str(tmp_path / "prep")
    shutil.copytree(prep_src, prep)
    with open(os.path.join(prep, "manifest.json"), "w") as f:  # as hipt-prep regions records them
        json.dump({"params": {"region_px": 512, "target_mpp": 0.5}, "items": {}}, f)
    out = str(tmp_path / "emb")
    engine = extraction.Extractor(model, batch_per_device=2)
    fingerprint = {"vit256": "a" * 64, "vit4k": "b" * 64}  # content hashes of checkpoint files
    extraction.extract_cohort(model, prep, out, show_progress=False, extractor=engine, fingerprint=fingerprint)
    ids = sorted(r["slide_id"] for r in rows)
    made_by = bags.extraction_of(bags.find_bag(out, ids[0]))
    assert made_by["vit4k"] == "b" * 64 and made_by["region_px"] == 512, made_by
    assert bags.folder_extraction(out) == made_by
    copied, refiled, older = (bags.find_bag(out, s) for s in ids[1:4])
    arrays = {s: bags.read_bag(out, s) for s in ids[1:4]}
    bags.write_bag(out, ids[1], arrays[ids[1]], made_by=dict(made_by, region_px=2048))
    bags.write_bag(out, ids[2], arrays[ids[2]], made_by=dict(made_by, vit4k="c" * 64))
    bags.write_bag(out, ids[3], arrays[ids[3]])  # an older version's bag: no record
    capsys.readouterr()
    with pytest.raises(bags.BagError, match=f"^{copied}: made by another extraction than {out}/manifest.json "
                                            r"records \(region_px 2048 \(expected 512\)\)"):
        bags.read_bag(out, ids[1])
    failed = {}
    assert set(bags.read_slide_embeddings(out, failed)) == set(ids) - {ids[1]} and list(failed) == [ids[1]]
    err = capsys.readouterr().err
    assert f"{refiled}: warning: extracted from other checkpoint files" in err and err.count("warning:") == 1, err
    assert f"{out}: note: bags that do not record the extraction" in err and f"e.g. {older}" in err, err
    extraction.extract_cohort(model, prep, out, show_progress=False, extractor=engine, fingerprint=fingerprint)
    assert f"redoing {copied}: made by another extraction (region_px 2048 (expected 512))" in capsys.readouterr().err
    assert bags.extraction_of(copied) == made_by and bags.extraction_of(refiled)["vit4k"] == "c" * 64


def test_a_shard_of_another_prep_run_is_failed_not_labelled_with_the_folders_regions(model, tmp_path):
    """A prep folder into which a shard of another hipt-prep run was copied (1024 px regions, or
    1 um/px, beside the folder's 512 px at 0.5 um/px): its bag was written with the folder's
    region size and resolution recorded, and the run ended with exit 0. Plant: no
    _check_cut_as_recorded -> every slide done."""
    prep = str(tmp_path / "prep")
    rng = np.random.default_rng(0)
    write_region_shard(prep, "good", [tissue_crop(rng, 512)])
    write_region_shard(prep, "bigger", [tissue_crop(rng, 1024)])
    img = tissue_crop(rng, 512)
    write_shard(os.path.join(prep, "regions", "coarser.array_record"), [shards.REGION.encode(
        image_jpeg=shards.encode_jpeg(img), slide_id="coarser", x=0, y=0, level=0, read_px=1024,
        mpp=1.0, region_px=512, tissue_fraction=1.0, index=0)])
    # 0.2527 um/px read 2026 px (not snapped, no tolerance): 0.50006 um/px is this folder's
    write_shard(os.path.join(prep, "regions", "rounded.array_record"), [shards.REGION.encode(
        image_jpeg=shards.encode_jpeg(img), slide_id="rounded", x=0, y=0, level=0, read_px=1013,
        mpp=0.2527 * 1013 / 512, region_px=512, tissue_fraction=1.0, index=0)])
    with open(os.path.join(prep, shards.MANIFEST), "w") as f:
        json.dump({"params": {"region_px": 512, "target_mpp": 0.5, "mpp_tolerance": 0.0}, "items": {}}, f)
    manifest = extraction.extract_cohort(model, prep, str(tmp_path / "emb"), show_progress=False)
    status = {s: v["status"] for s, v in manifest["slides"].items()}
    assert status == {"good": "done", "rounded": "done", "bigger": "failed", "coarser": "failed"}
    assert "bigger.array_record: regions of 1024 px, but" in manifest["slides"]["bigger"]["error"]
    assert "records 512 px" in manifest["slides"]["bigger"]["error"]
    assert "coarser.array_record: regions at 1 um/px, but" in manifest["slides"]["coarser"]["error"]
    assert "records 0.5 um/px for this folder" in manifest["slides"]["coarser"]["error"]
    assert sorted(bags.list_bags(str(tmp_path / "emb"))) == ["good", "rounded"]


def test_a_shard_copied_under_another_slide_id_is_failed_not_a_second_bag(model, tmp_path):
    """regions/a.array_record copied to regions/a_copy.array_record (records of slide 'a'): the
    run made two bags of the same slide under two ids, exit 0, and an evaluation could put one
    in train and the other in test. Plant: no _check_records_are_of -> both done."""
    prep = str(tmp_path / "prep")
    write_region_shard(prep, "a", [tissue_crop(np.random.default_rng(0), 256)])
    regions = os.path.join(prep, "regions")
    with open(os.path.join(regions, "a.array_record"), "rb") as src, \
            open(os.path.join(regions, "a_copy.array_record"), "wb") as dst:
        dst.write(src.read())
    manifest = extraction.extract_cohort(model, prep, str(tmp_path / "emb"), show_progress=False)
    assert manifest["slides"]["a"]["status"] == "done"
    assert manifest["slides"]["a_copy"]["status"] == "failed"
    assert "a_copy.array_record: its regions are of slide 'a', not 'a_copy'" in manifest["slides"]["a_copy"]["error"]
    assert sorted(bags.list_bags(str(tmp_path / "emb"))) == ["a"]
