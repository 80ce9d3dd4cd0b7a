"""Every console script (hipt_jax/cli): bad usage exits 2 with one line and no traceback; one bad
item among good ones exits 1 and the manifest / results file names it; a bad single input exits
2; the shared flag names are accepted and the deprecated spellings still work, with a warning.

argparse commands run in-process; the absl ones (pretrain, finetune, profile) as subprocesses,
because absl keeps its flags in one global registry."""
import json
import os

import numpy as np
import pytest

from data_prep.synth import make_aperio_slide
from hipt_jax.cli import convert, embed, extract, flags, heatmap, knn, prep
from tests.cli_helpers import call_main, run_module
from tests.synthetic_cohort import make_feature_cohort, tissue_crop, write_labels, write_region_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The argparse commands: name -> main(argv) -> exit code.
MAINS = {"hipt-convert": convert.main, "hipt-embed": embed.main, "hipt-extract": extract.main,
         "hipt-knn": knn.main, "hipt-heatmap": heatmap.main, "hipt-prep": prep.main}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Region shards (2 good + 1 corrupt), slides (1 good + 1 corrupt), bags (8 good + 1 truncated)."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    prep_dir = str(root / "prep")
    for sid in ("good_a", "good_b"):
        write_region_shard(prep_dir, sid, [tissue_crop(rng, 256)])
    (root / "prep" / "regions" / "broken.array_record").write_bytes(b"not an array record")
    slides = root / "slides"
    slides.mkdir()
    make_aperio_slide(str(slides / "good.svs"), (1024, 1024), levels=(1, 4))
    (slides / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00" * 100)  # a TIFF header, then nothing
    emb = str(root / "emb")
    classes = make_feature_cohort(emb, 8, seed=0)
    rows = [{"slide_id": f"slide_{i:04d}", "label": int(c)} for i, c in enumerate(classes)]
    whole = root / "emb" / "slides" / "slide_0000.npz"
    (root / "emb" / "slides" / "truncated.npz").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    labels = write_labels(str(root / "labels.csv"), rows + [{"slide_id": "truncated", "label": 1}])
    return {"root": root, "prep": prep_dir, "slides": str(slides), "emb": emb, "labels": labels}


_call = call_main
_cli = run_module


def _errors(err):
    """stderr without deprecation warnings and absl/XLA log lines."""
    return [line for line in err.strip().splitlines()
            if line.strip() and ": warning:" not in line and not line.startswith(("I1", "W1", "E1"))]


def assert_exit_2(code, err, *needles):
    assert code == flags.EXIT_BAD_INPUT, err
    lines = _errors(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert ": error: " in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------ bad usage -> 2
@pytest.mark.parametrize("name,argv,needle", [
    ("hipt-convert", ["only_src.pth"], "dst"),
    ("hipt-embed", ["--random-init", "huge", "--image", "x.png", "--out", "o.npz"], "invalid choice"),
    ("hipt-embed", ["--image", "x.png", "--out", "o.npz"], "--vit256"),
    ("hipt-extract", ["--random-init", "tiny", "--out", "o"], "--shards"),
    ("hipt-extract", ["--random-init", "tiny", "--vit256", "v", "--shards", "s", "--out", "o"], "not both"),
    # the ViT-4K checkpoint was silently replaced by random weights (and named in the manifest)
    ("hipt-extract", ["--random-init", "tiny", "--vit4k", "v", "--shards", "s", "--out", "o"],
     "give --vit4k or --random-init, not both"),
    ("hipt-embed", ["--random-init", "tiny", "--vit4k", "v", "--image", "x.png", "--out", "o.npz"],
     "give --vit4k or --random-init, not both"),
    ("hipt-knn", ["--embeddings", "e", "--labels", "l", "--fit-on", "all"], "--fit-on"),
    ("hipt-heatmap", ["--out", "o", "--blends", "some"], "--blends"),
    ("hipt-heatmap", ["--out", "o", "--tiny"], "--tiny needs --random-init"),
    ("hipt-prep", ["regions", "--slides", "s", "--out", "o", "--bogus"], "unrecognized arguments"),
    ("hipt-prep", ["features", "--regions", "r", "--out", "o", "--batch-per-device", "0"], "--batch-per-device"),
    # contradictions that were ignored with exit 0 (plants: no check_mode / no --image check)
    ("hipt-heatmap", ["--slide", "s.svs", "--lgp", "c", "--vitwsi", "stored", "--out", "o"],
     "--lgp and --vitwsi: slide mode paints one source"),
    ("hipt-heatmap", ["--slide", "s.svs", "--region-scores", "r.npz", "--vit256", "v", "--x", "5", "--out", "o"],
     "--vit256, --x: options of region mode"),
    ("hipt-embed", ["--random-init", "tiny", "--image", "x.png", "--x", "256", "--size", "256", "--out", "o.npz"],
     "--x, --size: choose a region of --slide"),
])
def test_bad_usage_exits_2_with_one_line(name, argv, needle, capsys):
    code, _, err = _call(MAINS[name], argv, capsys)
    assert_exit_2(code, err, name, needle)


@pytest.mark.parametrize("module,argv,needle", [
    ("hipt_jax.cli.pretrain", ["--config", "configs/pretrain_vit256.py:runlocal", "--bogus=1"], "bogus"),
    ("hipt_jax.cli.finetune", ["--config", "configs/lgp_subtyping.py:runlocal"], "--workdir"),
    ("hipt_jax.cli.profile", ["--config", "configs/profile.py:fast"], "unknown config arg"),
])
def test_absl_bad_usage_exits_2_with_one_line(module, argv, needle):
    code, _, err = _cli(module, *argv)
    assert_exit_2(code, err, needle)


# ------------------------------------------------------------------------------ bad single input -> 2
def test_single_input_commands_bad_input_exit_2(data, capsys):
    root = data["root"]
    (root / "notes.pth").write_text("not weights\n")
    code, _, err = _call(convert.main, [root / "notes.pth", root / "ckpt"], capsys)
    assert_exit_2(code, err, "hipt-convert", "notes.pth")
    code, _, err = _call(embed.main, ["--random-init", "tiny", "--image", root / "missing.png", "--out",
                                      root / "o.npz"], capsys)
    assert_exit_2(code, err, "hipt-embed", "missing.png: no such file")
    # --out dd writes dd.npz: a folder of that name is refused before the work (it failed after
    # it, exit 1; plant: check args.out as given -> fails)
    (root / "dd.npz").mkdir()
    code, _, err = _call(embed.main, ["--random-init", "tiny", "--image", root / "missing.png", "--out",
                                      root / "dd"], capsys)
    assert_exit_2(code, err, "hipt-embed", "dd.npz: output file is a folder")
    code, _, err = _call(heatmap.main, ["--random-init", "tiny", "--slide", os.path.join(data["slides"], "corrupt.svs"),
                                        "--x", 0, "--y", 0, "--out", root / "maps"], capsys)
    assert_exit_2(code, err, "hipt-heatmap", "corrupt.svs")
    code, _, err = _call(embed.main, ["--vit256", root / "notes.pth", "--image", root / "x.png", "--out",
                                      root / "o.npz"], capsys)
    assert_exit_2(code, err, "x.png")


def test_pretrain_and_profile_bad_input_exit_2_and_take_the_shared_flags(tmp_path):
    code, _, err = _cli("hipt_jax.cli.pretrain", "--config", "configs/pretrain_vit256.py:runlocal",
                        f"--workdir={tmp_path / 'run'}", f"--config.data.path={tmp_path / 'missing'}",
                        "--no-progress", "--seed=3", "--compute-dtype=bfloat16")
    assert_exit_2(code, err, "hipt-pretrain", "missing: not a folder")
    code, _, err = _cli("hipt_jax.cli.profile", "--config", tmp_path / "nope.py", "--no-progress", "--seed=1",
                        "--compute-dtype=float32")
    assert_exit_2(code, err, "hipt-profile", "nope.py")
    # A region side that is not whole 256 px patches was profiled as a smaller region, labelled
    # with the asked size (plant: region_px back to int_at_least(256) -> exit 0, fails).
    code, _, err = _cli("hipt_jax.cli.profile", "--config", "configs/profile.py:runlocal",
                        "--config.hipt4k.region_px=300", "--no-progress")
    assert_exit_2(code, err, "hipt-profile", "config.hipt4k.region_px=300", "multiple of 256")


# ------------------------------------------------------------------------------ one bad item -> 1
def _manifest(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)


def test_prep_regions_patches_features_name_the_bad_item(data, capsys):
    root = data["root"]
    code, _, err = _call(prep.main, ["regions", "--slides", data["slides"], "--out", root / "regions_out",
                                     "--region", 512, "--workers", 1, "--no-progress"], capsys)
    assert code == flags.EXIT_ITEMS_FAILED, err
    items = _manifest(root / "regions_out")["items"]
    assert items["good"]["status"] == "done" and items["corrupt"]["status"] == "failed"
    assert "FAILED corrupt" in err and "Traceback" not in err
    assert "slide/s" not in err and "it/s" not in err, err  # --no-progress: no bar (plant: bar kept)
    code, _, err = _call(prep.main, ["patches", "--regions", data["prep"], "--out", root / "patches_out",
                                     "--workers", 1, "--no-progress"], capsys)
    assert code == flags.EXIT_ITEMS_FAILED, err
    items = _manifest(root / "patches_out")["items"]
    assert items["broken"]["status"] == "failed" and items["good_a"]["status"] == "done"
    # The deprecated spellings still work, each with one warning line.
    code, _, err = _call(prep.main, ["features", "--regions", data["prep"], "--out", root / "features_out",
                                     "--random-init", "--tiny", "--dtype", "float32", "--batch", 2], capsys)
    assert code == flags.EXIT_ITEMS_FAILED, err
    items = _manifest(root / "features_out")["items"]
    assert items["broken"]["status"] == "failed" and items["good_b"]["status"] == "done"
    warnings = [line for line in err.splitlines() if "deprecated" in line]
    assert len(warnings) == 3 and any("use --store-dtype" in w for w in warnings)
    assert any("use --batch-per-device" in w for w in warnings)
    assert any("use --random-init tiny" in w for w in warnings)


def test_extract_names_the_bad_shard(data, capsys):
    out = data["root"] / "extract_out"
    code, _, err = _call(extract.main, ["--random-init", "tiny", "--seed", 0, "--shards", data["prep"], "--out", out,
                                        "--batch-per-device", 2, "--patch-batch", 4, "--compute-dtype", "float32",
                                        "--store-dtype", "float16", "--no-progress"], capsys)
    assert code == flags.EXIT_ITEMS_FAILED, err
    slides = _manifest(out)["slides"]
    assert slides["broken"]["status"] == "failed" and "broken.array_record" in slides["broken"]["error"]
    assert slides["good_a"]["status"] == "done" and "FAILED broken" in err


def test_knn_skips_and_names_a_truncated_bag(data, capsys):
    out = data["root"] / "knn.json"
    code, stdout, err = _call(knn.main, ["--embeddings", data["emb"], "--labels", data["labels"], "--splits", "kfold:2",
                                         "--k", 3, "--out", out], capsys)
    assert code == flags.EXIT_ITEMS_FAILED, err
    result = json.load(open(out))
    assert list(result["failed_slides"]) == ["truncated"] and "truncated or corrupt" in result["failed_slides"]["truncated"]
    assert result["n_slides"] == 8 and "+/-" in stdout and "FAILED truncated" in err


@pytest.mark.slow  # a ~40 s subprocess; in make test: the loader's per-slide failures (test_bag_formats),
# the shared report_failed exit 1 (hipt-knn above) and hipt-finetune's CLI (test_bad_inputs)
def test_finetune_skips_and_names_a_truncated_bag(data, tmp_path):
    code, _, err = _cli("hipt_jax.cli.finetune", "--config", "configs/lgp_subtyping.py:runlocal",
                        f"--workdir={tmp_path / 'lgp'}", f"--config.data.embeddings={data['emb']}",
                        f"--config.data.labels={data['labels']}", "--config.data.splits=kfold:2",
                        "--config.optim.epochs=1", "--no-progress", "--seed=0")
    assert code == flags.EXIT_ITEMS_FAILED, err[-2000:]
    results = json.load(open(tmp_path / "lgp" / "results.json"))
    assert list(results["failed_slides"]) == ["truncated"] and results["n_items"] == 8
    assert "FAILED truncated" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ shared flag names
def test_shared_flags_parse_the_same_everywhere(capsys):
    common = ["--random-init", "tiny", "--seed", "3", "--compute-dtype", "bfloat16", "--patch-batch", "4"]
    region = ["--target-mpp", "0.25", "--assume-mpp", "0.5", "--size", "512", "--image", "x.png"]
    for parser in (embed.build_parser(), heatmap.build_parser()):
        args = parser.parse_args(common + region + ["--out", "o"])
        assert (args.random_init, args.seed, args.compute_dtype, args.patch_batch) == ("tiny", 3, "bfloat16", 4)
        assert (args.target_mpp, args.assume_mpp, args.size) == (0.25, 0.5, 512)
    args = extract.build_parser().parse_args(common + ["--batch-per-device", "2", "--store-dtype", "float16",
                                                       "--no-progress", "--shards", "s", "--out", "o"])
    assert (args.batch_per_device, args.store_dtype, args.no_progress) == (2, "float16", True)
    p = prep.build_parser()
    args = p.parse_args(["regions", "--slides", "s", "--out", "o", "--target-mpp", "0.25", "--assume-mpp", "0.5",
                         "--region", "1024", "--no-progress"])
    assert (args.target_mpp, args.assume_mpp, args.region, args.no_progress) == (0.25, 0.5, 1024, True)
    args = p.parse_args(["features", "--regions", "r", "--out", "o", "--random-init", "full", "--seed", "2",
                         "--store-dtype", "float32", "--batch-per-device", "3", "--no-progress"])
    assert (args.random_init, args.seed, args.store_dtype, args.batch_per_device) == ("full", 2, "float32", 3)
    assert "warning" not in capsys.readouterr().err


def test_deprecated_spellings_map_to_the_new_flags_with_a_warning(capsys):
    args = embed.build_parser().parse_args(["--random-init", "tiny", "--mpp", "0.25", "--dtype", "bfloat16",
                                            "--image", "x.png", "--out", "o"])
    assert (args.target_mpp, args.compute_dtype) == (0.25, "bfloat16")
    err = capsys.readouterr().err
    assert "hipt-embed: warning: --mpp is deprecated" in err and "use --target-mpp" in err
    assert "use --compute-dtype" in err
    args = heatmap.build_parser().parse_args(["--random-init", "--image", "x.png", "--out", "o"])
    assert args.random_init == "full" and "use --random-init full" in capsys.readouterr().err
    args = extract.build_parser().parse_args(["--random-init", "tiny", "--batch", "4", "--shards", "s", "--out", "o"])
    assert args.batch_per_device == 4 and "use --batch-per-device" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the mapping itself
def test_error_table_names_real_exceptions_and_bugs_keep_their_traceback():
    import importlib

    for module, name in flags.INPUT_ERRORS + flags.FAILURE_ERRORS:
        cls = getattr(importlib.import_module(module), name)  # a rename must update the table
        assert issubclass(cls, Exception)
    from hipt_jax.extraction import ExtractError

    assert flags.run_command("t", lambda: (_ for _ in ()).throw(ExtractError("x"))) == flags.EXIT_BAD_INPUT
    with pytest.raises(ZeroDivisionError):  # a bug is not "bad input"
        flags.run_command("t", lambda: 1 // 0)


def test_a_full_disk_is_a_failed_run_not_bad_input_and_keeps_the_provenance(tmp_path, capsys):
    """A full disk shows only once something is written, so after the work started: exit 1
    naming the file, and the folder keeps its provenance record (the rerun resumes). It was
    exit 2, which also took the record back. Plant: run_command without is_disk_full -> exit 2
    and provenance.json removed, fails."""
    import errno

    from hipt_jax import provenance

    work = tmp_path / "w"

    def fills_the_disk():
        provenance.check(str(work), {"data": "x"}, outputs=("slides",))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(work / "status.json"))

    assert flags.run_command("prog", fills_the_disk, devices_at_start=False) == flags.EXIT_ITEMS_FAILED
    assert capsys.readouterr().err.strip() == f"prog: error: {work / 'status.json'}: No space left on device"
    assert (work / provenance.FILE).is_file()


# ------------------------------------------------------------------------------ paths with ~
# String flags that name no file or folder (every other one takes flags.path_arg).
NOT_PATHS = {"--label-column", "--embedding", "--include-classes", "--exclude-classes", "--beam-arg"}


def _string_options(parser, where=""):
    """(command words + flag, action) of every option that takes a free string."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _string_options(sub, f"{where}{name} ")
        elif action.nargs != 0 and not action.choices and action.dest != "help" and \
                action.type in (None, flags.path_arg) and action.default is not argparse.SUPPRESS:
            yield where + (action.option_strings[0] if action.option_strings else action.dest), action


def test_every_path_flag_expands_tilde(tmp_path, monkeypatch):
    """`--out=~/e.npz` (bash does not expand ~ after `=`) made a folder literally named `~` in the
    working directory, one `rm -rf ~` away from the user's home. Every argparse flag naming a file
    or folder expands it (flags.path_arg); the absl commands expand theirs before parsing and every
    ~ in a config field (file or --config.FIELD override) when the config is read.
    Plants: hipt-embed's --out without type=flags.path_arg; _expand_user_flags or
    expand_user_paths returning their input -> fails."""
    import ml_collections

    from hipt_jax.cli import patch_eval, predict

    home = str(tmp_path)
    monkeypatch.setenv("HOME", home)
    for module in (convert, embed, extract, heatmap, knn, patch_eval, predict, prep):
        for where, action in _string_options(module.build_parser()):
            if where.split()[-1] not in NOT_PATHS:
                assert action.type is flags.path_arg, f"{module.__name__}: {where}"
    args = embed.build_parser().parse_args(["--random-init", "tiny", "--image=~/r.png", "--out=~/e.npz"])
    assert (args.image, args.out) == (f"{home}/r.png", f"{home}/e.npz")
    argv = ["prog", "--config=~/c.py:runlocal", "--workdir=~/w", "--plan_json", "~/p.json", "--seed=1", "--",
            "--workdir=~/x"]
    assert flags._expand_user_flags(argv, flags.ABSL_PATH_FLAGS) == [
        "prog", f"--config={home}/c.py:runlocal", f"--workdir={home}/w", "--plan_json", f"{home}/p.json",
        "--seed=1", "--", "--workdir=~/x"]
    config = ml_collections.ConfigDict({"data": {"path": "~/d", "splits": "kfold:10"}, "seed": 1})
    config.lock()
    flags.expand_user_paths(config)
    assert (config.data.path, config.data.splits) == (f"{home}/d", "kfold:10")


def test_urls_are_refused_where_a_path_is_expected(capsys):
    """`--workdir gs://b/run` (as cluster guides write it) was taken as a local folder named
    `gs:`, one per host of a pod: each wrote its own checkpoints. A URL in a path flag, a config
    path field or an absl path flag is refused naming it and the mount to use instead; paths
    that merely contain ':' stay paths. Plants: path_arg, expand_user_paths or absl_config
    without the url_refusal test -> fails."""
    import ml_collections

    with pytest.raises(SystemExit) as e:
        embed.build_parser().parse_args(["--random-init", "tiny", "--image=r.png", "--out=gs://b/e.npz"])
    assert e.value.code == 2 and "gs://b/e.npz: a URL, not a path" in capsys.readouterr().err
    assert flags.path_arg("C:/data/x.png") == "C:/data/x.png"
    assert flags.path_arg("run:2/x") == "run:2/x"
    config = ml_collections.ConfigDict({"data": {"path": "s3://bucket/patches", "splits": "kfold:10"}})
    with pytest.raises(flags.UsageError, match=r"config\.data\.path=s3://bucket/patches: a URL.*mount"):
        flags.expand_user_paths(config)


def test_config_tilde_expanded_in_path_fields_only(tmp_path, monkeypatch):
    """Every config field starting with '~' was expanded: label_column '~root' became '/root',
    a class '~' the home folder. Only the fields naming files or folders are paths; the rest
    keep their '~'. Plant: expand_user_paths without its CONFIG_PATH_FIELDS test -> fails."""
    import ml_collections

    from configs import lgp_survival, pretrain_vitwsi, profile

    monkeypatch.setenv("HOME", str(tmp_path))
    config = lgp_survival.get_config()
    config.data.update(labels="~/x.csv", label_column="~root", classes="~")
    config.model.pretrained_vit4k = "~/ckpt"
    config.lock()
    flags.expand_user_paths(config)
    assert (config.data.labels, config.model.pretrained_vit4k) == (f"{tmp_path}/x.csv", f"{tmp_path}/ckpt")
    assert (config.data.label_column, config.data.classes) == ("~root", "~")
    # Every listed field is one a config has (a renamed field would silently stop expanding).
    fields = set()
    for c in (config, pretrain_vitwsi.get_config(), profile.get_config()):
        stack = [("", c)]
        while stack:
            prefix, node = stack.pop()
            for key, value in node.items():
                if isinstance(value, ml_collections.ConfigDict):
                    stack.append((f"{prefix}{key}.", value))
                else:
                    fields.add(f"{prefix}{key}")
    assert flags.CONFIG_PATH_FIELDS <= fields, flags.CONFIG_PATH_FIELDS - fields


def test_out_named_like_a_file_is_refused_not_made_a_folder(tmp_path, data, capsys):
    """`hipt-heatmap ... --out maps.png` made a folder called maps.png and wrote the maps into it,
    exit 0. Plant: drop the file-ending check in flags.check_output_dir -> exit 0, folder made."""
    from PIL import Image

    Image.fromarray(tissue_crop(np.random.default_rng(0), 256)).save(tmp_path / "region.png")
    code, _, err = _call(heatmap.main, ["--random-init", "tiny", "--image", str(tmp_path / "region.png"),
                                        "--out", str(tmp_path / "maps.png")], capsys)
    assert code == 2 and "maps.png: names a .png file, but this is an output folder" in err, err
    assert not os.path.exists(tmp_path / "maps.png")
    (tmp_path / "old.png").mkdir()  # an existing folder of that name is the user's choice
    flags.check_output_dir(str(tmp_path / "old.png"))


def test_out_with_tilde_writes_under_home_not_a_folder_named_tilde(tmp_path, monkeypatch, capsys):
    """hipt-prep coords --slides=~/slides --out=~/o with HOME set: the output is HOME/o and the
    working directory gets no `~`. Plant: prep's --out without type=flags.path_arg -> ./~/o."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    (home / "slides").mkdir(parents=True)
    make_aperio_slide(str(home / "slides" / "s.svs"), (512, 512), levels=(1,))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    code, _, err = _call(prep.main, ["coords", "--slides=~/slides", "--out=~/o", "--region", "256",
                                     "--workers", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert (home / "o" / "manifest.json").exists() and os.listdir(work) == []


# ------------------------------------------------------------------------------ the absl commands
# One subprocess runs every case below, each in a child forked after the slow imports: absl keeps
# its flags in one registry per process, and a fresh interpreter per case costs ~2 s.
_ABSL_DRIVER = r"""
import importlib, os, sys
import absl.flags, ml_collections.config_flags, hipt_jax.cli.flags
out_dir, cases = sys.argv[1], sys.argv[2:]
for i, case in enumerate(cases):
    module, *argv = case.split("\x1f")
    pid = os.fork()
    if pid == 0:
        for fd, ext in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(out_dir, f"{i}.{ext}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [module] + argv  # ml_collections reads the --config.FIELD overrides from sys.argv
        try:
            importlib.import_module(module).main(sys.argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(out_dir, f"{i}.code"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""
ABSL = ("pretrain", "finetune", "profile")


@pytest.fixture(scope="module")
def absl_runs(tmp_path_factory):
    """{(command, case): (exit code, stdout, stderr)} with HOME a temporary folder."""
    import subprocess
    import sys

    from tests.cli_helpers import ENV

    root = tmp_path_factory.mktemp("absl")
    home, out = root / "home", root / "out"
    home.mkdir()
    out.mkdir()
    cases = {(c, h): [h] for c in ABSL for h in ("--help", "-h")}
    cases.update({(c, "missing"): ["--config=~/missing.py", "--workdir=w"] for c in ABSL})
    cases[("finetune", "tilde")] = [f"--config={ROOT}/configs/lgp_subtyping.py:runlocal", "--workdir=~/wd",
                                    "--config.data.embeddings=~/emb", "--config.data.labels=~/labels.csv"]
    keys = list(cases)
    subprocess.run([sys.executable, "-c", _ABSL_DRIVER, str(out)]
                   + ["\x1f".join([f"hipt_jax.cli.{c}"] + cases[(c, h)]) for c, h in keys],
                   cwd=str(root), env=dict(ENV, HOME=str(home)), check=True, timeout=300)
    read = lambda i, ext: (out / f"{i}.{ext}").read_text()  # noqa: E731
    return {key: (int(read(i, "code")), read(i, "out"), read(i, "err")) for i, key in enumerate(keys)}, root


@pytest.mark.parametrize("command", ABSL)
def test_absl_help_exits_0_with_a_usage(absl_runs, command):
    """`--help` printed a bare "USAGE: ... Try --helpfull" and exited 1, `-h` was an unknown flag.
    Both print the command's usage, its flags (--config with its switches, --workdir) and how to
    set a config field, exit 0. Plant: absl_main without the _help_asked branch -> fails."""
    runs, _ = absl_runs
    for spelled in ("--help", "-h"):
        code, out, err = runs[(command, spelled)]
        assert code == 0, err
        assert f"hipt-{command}" in out and "--config=FILE[:SWITCHES]" in out and "runlocal" in out
        assert "--config.FIELD=VALUE" in out and "--helpfull" in out
        assert ("--plan" if command == "profile" else "--workdir=DIR") in out
        assert command == "finetune" or "bf16" in out


def test_absl_help_token_that_is_a_flag_value_is_not_help():
    """`--config.data.label_column -h` (a column named -h) was taken as a help request: the usage
    printed, exit 0, nothing run. A -h that the flag before it reads as its value is no help;
    after a boolean flag, or after another flag's value, it still is.
    Plant: _help_asked returning "short" for any -h token -> fails."""
    import absl.logging  # noqa: F401  (defines the boolean --logtostderr every absl command has)

    asked = flags._help_asked
    assert asked(["--config=c.py", "--config.data.label_column", "-h"]) is None
    assert asked(["--config.data.classes", "--help", "--workdir=w"]) is None
    assert asked(["--workdir", "-h"]) is None
    assert asked(["--config=c.py", "--logtostderr", "-h"]) == "short"
    assert asked(["--workdir", "w", "--seed", "-1", "-h"]) == "short"
    assert asked(["--config.data.label_column=-h", "--helpfull"]) == "full"


@pytest.mark.parametrize("command", ABSL)
def test_absl_missing_config_file_is_named(absl_runs, command):
    """A --config path that does not exist gave ml_collections' "Configuration is not available
    because of an earlier failure to load: ..." (hipt-profile: an unknown --workdir first). One
    line naming the path now, ~ expanded. Plant: absl_main without _missing_config_file -> fails."""
    runs, root = absl_runs
    code, _, err = runs[(command, "missing")]
    assert_exit_2(code, err, f"hipt-{command}: error: config file not found: {root}/home/missing.py")


def test_absl_config_fields_and_workdir_expand_tilde(absl_runs):
    """--config.data.labels=~/labels.csv is looked for under HOME (the config is read through
    absl_config). --workdir=~/wd is expanded before parsing (test_every_path_flag_expands_tilde:
    a refused run removes the folder it made, so nothing is left here to tell).
    Plant: absl_config without expand_user_paths -> "~/labels.csv: labels file not found"."""
    runs, root = absl_runs
    code, _, err = runs[("finetune", "tilde")]
    assert_exit_2(code, err, f"{root}/home/labels.csv: labels file not found")
    assert not (root / "~").exists()
