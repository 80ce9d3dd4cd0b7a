"""hipt-patch-eval: tile layouts, KNN / linear probe on synthetic two-stain tiles cut from the
embedded slide's tissue (a tiny random ViT-256 already separates the stains), parity with
scikit-learn, the command end to end (cache, label fraction, plots, bad input)."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep.synth import stain_perturb
from hipt_jax.cli import patch_eval as cli
from hipt_jax.evaluation import knn, patch_eval
from hipt_jax.evaluation.linear_probe import standardize_fit
from hipt_jax.evaluation.patch_features import cache_key, cached_features, load_tile
from hipt_jax.evaluation.tiles import TileDatasetError, read_tiles, split_tiles
from tests.synthetic_cohort import CLASS_STAINS, tissue_crop

N_PER_CLASS = 30
SIZE = 64  # tiles are 96 px, resized + center-cropped to 64 (4x4 tokens) to keep the test fast


def make_tiles(root, n=N_PER_CLASS, seed=0):
    """DIR/<class>/*.png: tumor = the slide's stain, stroma = the bluer stain shift."""
    rng = np.random.default_rng(seed)
    for c, stain in enumerate(CLASS_STAINS):
        d = os.path.join(root, ["tumor", "stroma"][c])
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            gains = np.asarray(stain) * rng.uniform(0.93, 1.07, 3)
            Image.fromarray(stain_perturb(tissue_crop(rng, 96), gains)).save(os.path.join(d, f"t{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    return make_tiles(tmp_path_factory.mktemp("tiles"))


@pytest.fixture(scope="module")
def features(tiles_dir):
    tiles = read_tiles(tiles_dir, seed=0)
    feats, _ = cached_features(tiles.paths, checkpoint=None, random_init="tiny", size=SIZE,
                               batch_per_device=16, progress=False)
    return tiles, feats


def test_layouts_and_label_fraction(tmp_path):
    """ImageFolder gets a seeded stratified split; train/test folders and a CSV keep theirs;
    --label-fraction keeps that share of TRAIN tiles per class. (Plant: subsample_fraction
    returning all indices -> the 10% count check fails.)"""
    for split, n in (("train", 20), ("test", 5)):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "tt" / split / c)
            for i in range(n):
                Image.new("RGB", (32, 40)).save(tmp_path / "tt" / split / c / f"{i}.png")
    t = read_tiles(str(tmp_path / "tt"))
    assert t.class_names == ["a", "b"] and (t.splits == "test").sum() == 10 and (t.splits == "train").sum() == 40
    t10 = read_tiles(str(tmp_path / "tt"), label_fraction=0.1)
    assert (t10.splits == "train").sum() == 4 and (t10.splits == "test").sum() == 10
    assert read_tiles(str(tmp_path / "tt"), label_fraction=0.1, seed=1).paths != t10.paths
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([[f"tt/train/a/{i}.png", "a", "train"] for i in range(3)]
                    + [[f"tt/train/b/{i}.png", "b", "train"] for i in range(2, 4)]
                    + [[f"tt/train/b/{i}.png", "b", "test"] for i in range(2)])
    t = read_tiles(str(tmp_path / "t.csv"))
    assert list(t.splits) == ["train"] * 5 + ["test"] * 2
    # The same list saved by a decimal-comma spreadsheet (';', padded header, trailing ';;'
    # rows) reads alike (plant: the tile reader without data_prep.csv_table -> "expected a header").
    (tmp_path / "t_semicolon.csv").write_text(
        "path; label; split\n" + (tmp_path / "t.csv").read_text().split("\n", 1)[1].replace(",", ";") + ";;\n")
    t_sc = read_tiles(str(tmp_path / "t_semicolon.csv"))
    assert t_sc.paths == t.paths and list(t_sc.labels) == list(t.labels) and list(t_sc.splits) == list(t.splits)
    assert load_tile(t.paths[0], 24).shape == (24, 24, 3)  # 32x40 -> shorter side 24, center crop
    # Train of one class (b only in test): the probe could not be fitted (scikit-learn's
    # ValueError, naming no file, after every feature was computed). Plant: no check -> read.
    (tmp_path / "one_class_train.csv").write_text(
        "path,label,split\n" + "".join(f"tt/train/a/{i}.png,a,train\n" for i in range(3))
        + "".join(f"tt/train/b/{i}.png,b,test\n" for i in range(2)))
    with pytest.raises(TileDatasetError, match=r"one_class_train.csv: the train split holds only class 'a'"):
        read_tiles(str(tmp_path / "one_class_train.csv"))
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("path,label\nnope.png,a\n")
    with pytest.raises(TileDatasetError, match="bad.csv.*do not exist"):
        read_tiles(str(tmp_path / "bad.csv"))


def test_knn_and_probe_separate_stains_and_not_shuffled(features):
    """> 0.9 on the two stain classes, about chance with shuffled labels. (Plant: fitting the
    KNN on the evaluated tiles themselves, i.e. x_tr = x_ev in knn_probs, makes the shuffled
    run score ~1 and fail.)"""
    tiles, feats = features
    res = patch_eval.evaluate_features(feats, tiles.labels, tiles.splits, tiles.class_names)
    for m in patch_eval.METHODS:
        assert res["results"]["test"][m]["acc"] > 0.9, (m, res["results"]["test"][m])
        assert res["results"]["test"][m]["auc"] > 0.9
    rng = np.random.default_rng(0)
    accs = []
    for rep in range(2):
        shuffled = rng.permutation(tiles.labels)
        r = patch_eval.evaluate_features(feats, shuffled, tiles.splits, tiles.class_names, seed=rep,
                                         c_grid=(1e-2, 1.0))
        accs.append([r["results"]["test"][m]["balanced_acc"] for m in patch_eval.METHODS])
    assert abs(np.mean(accs) - 0.5) < 0.15, accs


def test_knn_with_fewer_training_tiles_than_k_says_the_k_it_used(capsys):
    """Plant: the fixed method names -> the table says k=20 with 16 training tiles, fails."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(24, 8)).astype(np.float32)
    labels = np.arange(24) % 2
    splits = np.array(["train"] * 16 + ["test"] * 8)
    res = patch_eval.evaluate_features(feats, labels, splits, ["a", "b"], methods=("knn_dino", "knn5"))
    assert res["k"] == {"knn_dino": 16, "knn5": 5}
    table = patch_eval.format_table(res)
    assert "KNN DINO (k=16, cosine" in table and "k=20" not in table
    assert "only 16 training tiles: KNN DINO uses k=16" in capsys.readouterr().err


def test_a_class_missing_from_the_test_split_gives_a_macro_auc_over_the_present_classes(capsys):
    """A one-tile class stays in train under the seeded split: its one-vs-rest AUC does not
    exist, and the macro AUC must average the classes present (and say so), not print NaN.
    Plant: metrics.auc averaging over every class -> auc NaN, fails."""
    rng = np.random.default_rng(1)
    labels = np.array([0] * 12 + [1] * 12 + [2])  # class "c" has one tile
    feats = (np.eye(3)[labels] * 3 + rng.normal(size=(25, 3))).astype(np.float32)
    splits = split_tiles(labels, 0.3, seed=0)
    assert not ((labels == 2) & (splits == "test")).any()
    res = patch_eval.evaluate_features(feats, labels, splits, ["a", "b", "c"], methods=("knn_dino", "knn5"))
    for scores in res["results"]["test"].values():
        assert np.isfinite(scores["auc"]) and scores["auc"] > 0.9 and scores["auc_classes"] == 2
    assert res["absent_classes"] == {"test": ["c"]}
    assert "(2 of 3 classes)" in patch_eval.format_table(res)
    assert "no tile of class(es) c" in capsys.readouterr().err
    # A class with tiles only in test is named too (plant: no train check -> no line, fails).
    only_test = np.where(splits == "train", labels % 2, 2)
    res2 = patch_eval.evaluate_features(feats, only_test, splits, ["a", "b", "c"], methods=("knn5",))
    assert res2["untrained_classes"] == ["c"]
    assert "no training tile of class(es) c" in capsys.readouterr().err


def test_label_fraction_keeps_the_ceiling_per_class():
    """The tile-level fraction rounds like the slide/patient level and CLAM: ceil(0.25 * 10) = 3
    per class (round() kept 2), at least one of a class. Plant: int(round(...)) -> 2, fails."""
    from hipt_jax.evaluation.tiles import subsample_fraction

    labels = np.repeat([0, 1, 2], [10, 10, 2])
    kept = labels[subsample_fraction(labels, 0.25, seed=0)]
    assert np.bincount(kept).tolist() == [3, 3, 1]
    assert np.bincount(labels[subsample_fraction(labels, 0.01, seed=0)]).tolist() == [1, 1, 1]


def test_a_tile_listed_twice_is_refused(tmp_path):
    """The same tile in train and in test would be its own nearest neighbour: every score
    inflated, exit 0. Plant: drop the uniqueness check -> read_tiles returns, fails."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(tmp_path / "b.png")
    csv_path = tmp_path / "tiles.csv"
    csv_path.write_text("path,label,split\na.png,tumor,train\nb.png,stroma,train\n./a.png,tumor,test\n")
    with pytest.raises(TileDatasetError, match=r"a\.png is listed more than once \(label 'tumor', split train; "
                                               r"label 'tumor', split test\)"):
        read_tiles(str(csv_path))
    # An empty or 'NA' label is not a class (plant: no missing-label check -> class '' or 'NA').
    csv_path.write_text("path,label,split\na.png,tumor,train\nb.png,NA,test\n")
    with pytest.raises(TileDatasetError, match=r"line 3: label 'NA' is empty or a missing value"):
        read_tiles(str(csv_path))


def test_knn_equals_sklearn(features):
    """Both KNNs give scikit-learn's predictions and accuracy (<= 1e-9) on the same features;
    vote fractions equal too (float32 similarities: 1e-5 for the exp-weighted vote).
    (Plant: temperature 0.7 instead of 0.07 in the weighted vote -> probabilities differ.)"""
    from sklearn.neighbors import KNeighborsClassifier

    tiles, feats = features
    tr, te = tiles.splits == "train", tiles.splits == "test"
    x_tr, y_tr, x_te, y_te = feats[tr], tiles.labels[tr], feats[te], tiles.labels[te]
    ours = patch_eval.knn_probs(x_tr, y_tr, x_te, 2)
    sk5 = KNeighborsClassifier(5).fit(x_tr.astype(np.float64), y_tr)
    np.testing.assert_array_equal(ours["knn5"], sk5.predict_proba(x_te.astype(np.float64)))
    skd = KNeighborsClassifier(20, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(x_tr.astype(np.float64), y_tr)
    np.testing.assert_allclose(ours["knn_dino"], skd.predict_proba(x_te.astype(np.float64)), atol=1e-5)
    for name, sk in (("knn5", sk5), ("knn_dino", skd)):
        ours_acc = patch_eval.scores_of(ours[name], y_te)["acc"]
        assert abs(ours_acc - sk.score(x_te.astype(np.float64), y_te)) <= 1e-9
        np.testing.assert_array_equal(ours[name].argmax(1), sk.predict(x_te.astype(np.float64)))
    # Non-trivial check of the weighted vote on features where classes overlap.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(80, 16)), rng.integers(0, 3, 80)
    q = rng.normal(size=(30, 16))
    skd = KNeighborsClassifier(20, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(x, y)
    np.testing.assert_allclose(knn.knn_cosine_weighted(x, y, q, n_classes=3), skd.predict_proba(q), atol=1e-5)


def test_probe_matches_sklearn_at_chosen_C(features):
    """The probe's accuracy equals scikit-learn's LogisticRegression fit independently on the
    train tiles standardized with their own statistics, at the C the search chose.
    (Plant: standardizing with the TEST features' statistics -> predictions differ.)"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tiles, feats = features
    # A harder problem than the stains (noise added) so that C matters.
    rng = np.random.default_rng(0)
    noisy = feats + rng.normal(scale=3 * feats.std(), size=feats.shape).astype(np.float32)
    res = patch_eval.evaluate_features(noisy, tiles.labels, tiles.splits, tiles.class_names, methods=("probe",))
    C = res["probe_C"]
    assert len(res["probe_search"]) == 7
    tr, te = tiles.splits == "train", tiles.splits == "test"
    scaler = StandardScaler().fit(noisy[tr].astype(np.float64))
    clf = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(noisy[tr].astype(np.float64)), tiles.labels[tr])
    sk_acc = clf.score(scaler.transform(noisy[te].astype(np.float64)), tiles.labels[te])
    assert abs(res["results"]["test"]["probe"]["acc"] - sk_acc) <= 1e-9
    assert res["predictions"]["test"]["probe"] == clf.predict(scaler.transform(noisy[te].astype(np.float64))).tolist()
    mean, std = standardize_fit(noisy[tr].astype(np.float64))
    np.testing.assert_allclose(mean, scaler.mean_)


def test_cli_end_to_end(tiles_dir, tmp_path, capsys):
    """The command writes the table, JSON and pictures; the second run loads the cached
    features; a bad dataset exits 2 with one line. (Plant: a cache key without the tile
    mtimes -> touching a tile would reuse stale features; checked via cache_hit.)"""
    out = str(tmp_path / "pe")
    argv = ["--tiles", tiles_dir, "--out", out, "--random-init", "tiny", "--size", str(SIZE),
            "--batch-per-device", "16", "--no-progress"]
    assert cli.main(argv + ["--plot", "--label-fraction", "50%"]) == 0
    res = json.load(open(os.path.join(out, "patch_eval.json")))
    # 21 training tiles per class: ceil(0.5 * 21) = 11 each
    assert res["label_fraction"] == 0.5 and res["n_train"] == 22 and not res["cache_hit"]
    assert "| test | linear probe" in open(os.path.join(out, "patch_eval.md")).read()
    for f in ("embedding_map.png", "confusion_test_knn_dino.png", "confusion_test_probe.png"):
        assert os.path.getsize(os.path.join(out, f)) > 1000
    assert cli.main(argv + ["--label-fraction", "0.5"]) == 0
    assert json.load(open(os.path.join(out, "patch_eval.json")))["cache_hit"]
    paths = read_tiles(tiles_dir).paths[:3]
    key = cache_key(paths, {"random_init": "tiny"}, {"size": SIZE})
    assert cache_key(paths, {"random_init": "tiny"}, {"size": SIZE + 1}) != key
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(paths, {"random_init": "tiny"}, {"size": SIZE}) != key
    capsys.readouterr()
    assert cli.main(["--tiles", str(tmp_path / "missing"), "--out", out, "--random-init", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing: not a tile folder" in err[0]


def test_cli_out_never_replaces_another_commands_files(tiles_dir, tmp_path, capsys):
    """OUT/patch_eval.json and .md replaced whatever had those names, and --out could be a
    subfolder of another command's folder (an embeddings folder's slides/), exit 0. Refused before
    any work, one line naming the file (test_cli_end_to_end reruns into its own --out). Plant: no
    _check_targets -> the run goes on, exit 0, the file replaced."""
    argv = ["--tiles", tiles_dir, "--random-init", "tiny", "--size", str(SIZE), "--batch-per-device", "16",
            "--no-progress"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "patch_eval.json").write_text('{"mine": true}')
    emb = tmp_path / "emb"
    (emb / "slides").mkdir(parents=True)
    (emb / "manifest.json").write_text('{"schema": "hipt.embeddings.v1", "slides": {}}')
    for out, needle in ((theirs, "exists and is not an earlier hipt-patch-eval output"),
                        (emb / "slides", "lies inside")):
        assert cli.main(argv + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and str(out) in err and len(err.splitlines()) == 1, err
    assert (theirs / "patch_eval.json").read_text() == '{"mine": true}' and os.listdir(emb / "slides") == []


def tensorboard_steps(folder, tag):
    """Steps of the scalar ``tag`` in the event files of ``folder`` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc; payload = an Event protobuf)."""
    import struct

    from tensorboardX.proto import event_pb2

    steps = []
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.mark.slow  # a whole runlocal pretraining: `make test-all`
def test_knn_monitor_in_runlocal_pretraining(tiles_dir, tmp_path):
    """eval.knn inside a runlocal stage-1 pretraining: the KNN of the teacher appears in
    metrics.jsonl and TensorBoard at steps 2 and 4, and keep_best writes export_best.
    (Plant: dropping the monitor call from the trainer loop -> no knn rows.)"""
    from configs.pretrain_vit256 import get_config
    from hipt_jax.pretrain.trainer import train

    config = get_config("runlocal")
    config.data.path = tiles_dir
    config.total_steps, config.checkpoint.every_steps = 4, 100  # the least a run needs
    config.eval.knn.update(path=tiles_dir, every_steps=2, keep_best=True, batch_per_device=16)  # = the fixture: one compile
    workdir = str(tmp_path / "run")
    train(config, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    knn_rows = [r for r in rows if "knn/acc" in r]
    assert [r["step"] for r in knn_rows] == [2, 4]
    assert all(r["knn/acc"] > 0.9 for r in knn_rows)
    assert tensorboard_steps(os.path.join(workdir, "tensorboard"), "knn/acc") == [2, 4]
    assert os.path.isfile(os.path.join(workdir, "export_best", "arch.json"))


def test_out_or_cache_inside_the_tiles_folder_is_refused(tmp_path, capsys):
    """--out inside --tiles: the run's own pictures (--plot) became a class "results" on the next
    run, which scored it, exit 0. Refused before any work, one line naming the flag; --cache the
    same. Plant: no _check_outside_tiles call -> the run goes on, exit 0 (fails)."""
    tiles = make_tiles(tmp_path / "tiles", n=3)
    argv = ["--tiles", tiles, "--random-init", "tiny", "--size", "32", "--no-progress"]
    for extra, flag in ((["--out", os.path.join(tiles, "results")], "--out"),
                        (["--out", str(tmp_path / "o"), "--cache", os.path.join(tiles, "tumor", "c")], "--cache")):
        assert cli.main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{flag} " in err and "lies inside the --tiles folder" in err, err
    assert sorted(os.listdir(tiles)) == ["stroma", "tumor"] and len(os.listdir(os.path.join(tiles, "tumor"))) == 3


def test_hidden_entries_are_neither_tiles_nor_classes_and_an_empty_class_is_said(tmp_path, capsys):
    """An unzipped macOS archive: AppleDouble "._x.png" files (not images: the run failed),
    __MACOSX/ and dot-folders (became classes). An empty class folder was dropped silently.
    Plant: _visible always True -> 4 classes and the ._ files listed (fails); plant: no note
    for the empty folder -> nothing on stderr (fails)."""
    root = make_tiles(tmp_path / "t", n=3)
    (tmp_path / "t" / "tumor" / "._t000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for hidden in ("__MACOSX/tumor", ".thumbnails"):
        os.makedirs(tmp_path / "t" / hidden)
        Image.new("RGB", (8, 8)).save(tmp_path / "t" / hidden / "x.png")
    (tmp_path / "t" / "empty").mkdir()
    tiles = read_tiles(root)
    assert tiles.class_names == ["stroma", "tumor"] and len(tiles.paths) == 6
    assert not any(os.path.basename(p).startswith(".") for p in tiles.paths)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty: class folder without tiles" in err[0], err


def test_16_bit_and_float_gray_tiles_keep_their_brightness(tmp_path):
    """PIL's convert("RGB") clips: a 16-bit gray tile came back all white (255), a float 0..1
    tile all black. Rescaled by their mode's range; values no scale fits are refused naming the
    tile and its mode. Plant: to_rgb = im.convert("RGB") -> means 255 / 0 (fails)."""
    ramp8 = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (128, 1))  # [128,128], mean 127
    for name, arr in (("g16.png", ramp8.astype(np.uint16) * 257), ("g16.tif", ramp8.astype(np.uint16) * 257),
                      ("f01.tif", ramp8.astype(np.float32) / 255), ("f255.tif", ramp8.astype(np.float32))):
        Image.fromarray(arr).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I;16", "F"), (name, im.mode)
        out = load_tile(str(tmp_path / name), size=128)
        assert out.shape == (128, 128, 3) and abs(out.mean() - ramp8.mean()) < 0.5, (name, out.mean())
        np.testing.assert_array_equal(out[..., 1], ramp8)
    Image.fromarray(np.full((32, 32), -3.0, np.float32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif: float image \(mode F\) with values -3\.\.-3"):
        load_tile(str(tmp_path / "neg.tif"), size=32)


def test_unreadable_tiles_are_all_listed_before_any_feature_is_computed(tmp_path, capsys, monkeypatch):
    """One bad tile among thousands ended the run after the features were computed (no cache
    written: all lost), naming only the first. Now every tile is checked first: exit 2, one line
    with the count and the first few, all of them in OUT/unreadable_tiles.txt, no backbone run.
    Plant: no check_tiles call in cached_features -> the extractor runs (fails)."""
    from hipt_jax.evaluation import patch_features

    root = make_tiles(tmp_path / "t", n=4)
    good = open(os.path.join(root, "tumor", "t000.png"), "rb").read()
    bad = [os.path.join(root, "tumor", "t001.png"), os.path.join(root, "stroma", "t002.png"),
           os.path.join(root, "stroma", "zz.jpg")]
    open(bad[0], "wb").write(good[: len(good) // 2])  # truncated: the header still opens
    open(bad[1], "wb").write(b"not an image")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bad[2], quality=90)
    open(bad[2], "r+b").truncate(300)
    monkeypatch.setattr(patch_features.CLSExtractor, "from_files",
                        lambda *a, **k: pytest.fail("features computed before the tiles were checked"))
    out = tmp_path / "pe"
    assert cli.main(["--tiles", root, "--out", str(out), "--random-init", "tiny", "--size", "32",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 of 9 tiles cannot be read" in err, err
    assert str(out / "unreadable_tiles.txt") in err
    listed = [line.split("\t")[0] for line in open(out / "unreadable_tiles.txt").read().splitlines()]
    assert sorted(listed) == sorted(bad)


def test_the_feature_cache_sees_a_tile_replaced_with_its_size_and_mtime(tmp_path):
    """Uncompressed tiles all have one size, and `cp -p` / rsync copy the mtime: a replaced tile
    kept its stale features. The key also takes the inode (rsync renames a new file into place)
    and the ctime (cp -p writes in place; nothing can copy a ctime). A plain rerun (the tiles
    read, not changed) keeps the key. Plant: key without st_ino/st_ctime_ns -> equal keys (fails)."""
    import shutil
    import time

    a, b, tile = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "tile.tif"
    for path, value in ((a, 10), (b, 200)):
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    shutil.copy2(a, tile)
    key = lambda: cache_key([str(tile)], {"random_init": "tiny"}, {"size": 16})  # noqa: E731
    first = key()
    load_tile(str(tile), size=16)
    assert key() == first  # reading it changes nothing
    time.sleep(0.05)  # past the filesystem's timestamp tick
    shutil.copy2(b, tile)  # cp -p writes in place: same inode
    os.utime(tile, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns))  # the old mtime, as a copy of it had
    assert os.path.getsize(tile) == os.path.getsize(a) and os.stat(tile).st_mtime_ns == os.stat(a).st_mtime_ns
    assert key() != first
    second = key()
    shutil.copy2(a, tmp_path / "new.tif")  # rsync: a new file renamed into place
    os.utime(tmp_path / "new.tif", ns=(os.stat(tile).st_atime_ns, os.stat(tile).st_mtime_ns))
    os.replace(tmp_path / "new.tif", tile)
    assert key() != second


def test_class_names_the_font_lacks_give_one_line_not_a_warning_per_glyph(tmp_path, capsys):
    """CJK class names gave ~10 matplotlib "Glyph ... missing from font" warnings per picture on
    stderr. Now one line naming the picture; other warnings are kept. Plant: no
    _glyph_warnings_as_one_line around the drawing -> Glyph warnings recorded (fails)."""
    import warnings

    from hipt_jax.evaluation import plots

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.plot_confusion(np.array([[3, 1], [0, 4]]), ["TUMÖR 腫瘍", "正常"], str(tmp_path / "cm.png"))
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cm.png: the plot font has no glyph for 4 character(s)" in err[0], err
