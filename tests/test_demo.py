"""The end-to-end demo: a fast smoke of its first steps, and the whole pipeline (slow)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "hipt_jax.demo", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_demo_bad_arguments(tmp_path):
    res = _demo("--out", str(tmp_path), "--steps", "synth,train")
    assert res.returncode == 2 and "unknown step(s) ['train']" in res.stderr
    res = _demo("--out", str(tmp_path), "--slides", "2")
    assert res.returncode == 2 and "--slides" in res.stderr


def test_wsi_step_commands(tmp_path, monkeypatch):
    """The optional stage-3 step runs hipt-pretrain (configs/pretrain_vitwsi.py:runlocal) on the
    demo's slide bags, hipt-extract --vitwsi with its export, then hipt-knn --embedding wsi (the
    commands themselves run in test_vitwsi's runlocal test and, on the demo's slides, in the slow
    test below). Plant: data.kind=feature_shards for the stage-3 run."""
    from hipt_jax import demo

    calls = []
    monkeypatch.setattr(demo, "run_tool", lambda name, command, args, log_dir, **kw: calls.append((command, args)) or "")
    p = demo.Paths(str(tmp_path))
    out = demo.step_wsi(p, type("Opts", (), {"slides": 8, "pretrain_steps": 8})())
    assert [c for c, _ in calls] == ["pretrain", "extract", "knn"]
    pretrain, extract, knn = (args for _, args in calls)
    assert pretrain[1].endswith("pretrain_vitwsi.py:runlocal")
    assert "--config.data.kind=slide_bags" in pretrain and f"--config.data.path={p.embeddings}" in pretrain
    assert extract[:2] == ["--vitwsi", out["vitwsi_export"]] and extract[3] == p.embeddings
    assert knn[knn.index("--embedding") + 1] == "wsi" and out["knn_results_wsi"] in knn
    assert "wsi" not in demo.STEPS and "wsi" in demo.OPTIONAL_STEPS  # not in the default make demo


@pytest.mark.slow
def test_wsi_step_on_demo_slides(tmp_path):
    """Stage 3 on the demo's slides: the demo's slide generator (4 slides, 1024 px regions),
    hipt-prep coords + hipt-extract with tiny random weights (direct reads), then the demo's wsi step
    (hipt-pretrain ...pretrain_vitwsi.py:runlocal, hipt-extract --vitwsi, hipt-knn --embedding wsi)."""
    out = tmp_path / "demo_out"
    res = _demo("--out", str(out), "--steps", "synth", "--slides", "4", "--region-px", "1024")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for cmd in (["hipt_jax.cli.prep", "coords", "--slides", str(out / "slides"), "--out", str(out / "coords"),
                 "--region", "1024"],
                ["hipt_jax.cli.extract", "--random-init", "tiny", "--slides", str(out / "slides"), "--coords",
                 str(out / "coords"), "--size", "1024", "--out", str(out / "embeddings"), "--no-progress"]):
        ran = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert ran.returncode == 0, ran.stderr[-2000:]
    res = _demo("--out", str(out), "--steps", "wsi", "--slides", "4")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    from data_prep import bags
    found = bags.list_bags(str(out / "embeddings"))
    assert len(found) == 4
    for path in found.values():
        assert bags.read_bag_file(path, ("slide_embedding_wsi",))["slide_embedding_wsi"].shape == (192,)
    summary = json.load(open(out / "embeddings" / "knn_results_wsi.json"))["summary"]
    assert set(summary) == {"paper", "dino"}


# The README's claim ("KNN separates the two stain classes ... AUC 1.0"), with a margin for a
# fold that lands one slide on the wrong side of k=5 neighbours.
DEMO_MIN_KNN_AUC = 0.95


def assert_knn_separates(path, min_auc=DEMO_MIN_KNN_AUC):
    """Both KNN protocols (the paper's and DINO's) reach the README's AUC on every fold mean."""
    summary = json.load(open(path)).get("summary")
    assert isinstance(summary, dict), f"{path}: no summary"
    for proto in ("paper", "dino"):
        auc = summary[proto]["auc"]
        auc = auc["mean"] if isinstance(auc, dict) else auc
        assert auc >= min_auc, f"{proto} KNN AUC {auc:.3f} < {min_auc} ({path})"


def test_knn_separation_check_can_fail(tmp_path):
    """The check test_full_demo applies to the demo's KNN output. Plant: a chance-level result
    (what a demo whose features lost the stain difference, e.g. labels shuffled, writes)."""
    good = {"summary": {"paper": {"auc": {"mean": 1.0, "std": 0.0}}, "dino": {"auc": {"mean": 1.0, "std": 0.0}}}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert_knn_separates(tmp_path / "good.json")
    bad = {"summary": {"paper": {"auc": {"mean": 0.52, "std": 0.2}}, "dino": {"auc": {"mean": 1.0, "std": 0.0}}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(AssertionError, match="paper KNN AUC 0.520"):
        assert_knn_separates(tmp_path / "bad.json")


@pytest.mark.slow
def test_full_demo(tmp_path):
    """`make demo` as CI would run it (minutes): every step's outputs exist, KNN separates the
    two stain classes, and the whole run stays under 10 minutes."""
    res = _demo("--out", str(tmp_path / "demo_out"), timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    out = tmp_path / "demo_out"
    summary = json.load(open(out / "summary.json"))
    assert summary["total_seconds"] < 600
    for step, items in summary["outputs"].items():
        for key, path in items.items():
            assert os.path.exists(path), f"{step}: {key} missing ({path})"
    assert_knn_separates(out / "embeddings" / "knn_results.json")
    assert os.path.getsize(out / "heatmaps" / "demo_heatmap.png") < 300_000


def _install_non_editable(target):
    """`pip install --target` of a copy of the source tree (no deps, offline): a real install."""
    src = target.parent / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo_out", ".pytest_cache"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    shutil.rmtree(src)  # nothing may come from the source tree


def _tree(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
            if "__pycache__" not in d}


def test_demo_from_installed_package(tmp_path):
    """The installed package runs the demo's first steps (synth + prep on 1024 px regions) from
    any folder: configs and the embedded slide come from the installed packages, the commands
    import it, nothing is written into it, and the cohort, labels and region shards line up."""
    site = tmp_path / "site"
    _install_non_editable(site)
    before = _tree(site)
    cwd, out = tmp_path / "elsewhere", tmp_path / "demo"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import hipt_jax.demo as d; print(d.__file__); "
                            "print(d.config_file('pretrain_vit256.py')); print(d.config_file('lgp_subtyping.py')); "
                            "print(d.embedded_slide())"], cwd=cwd, env=env, capture_output=True, text=True)
    assert where.stdout.split() == [str(site / "hipt_jax" / "demo.py"), str(site / "configs" / "pretrain_vit256.py"),
                                    str(site / "configs" / "lgp_subtyping.py"),
                                    str(site / "data_prep" / "testdata" / "cmu_small_region.svs")], where.stderr
    # The first steps (slides grown from the packaged tissue, hipt-prep as a subprocess); the
    # full pipeline from a checkout is test_full_demo.
    res = subprocess.run([sys.executable, "-m", "hipt_jax.demo", "--out", str(out), "--steps", "synth,prep",
                          "--slides", "4", "--region-px", "1024"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    # The cohort, labels and region shards line up (one demo run serves both this check and the
    # installed-package one: each costs a synth + prep of four slides).
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["a", "b", "a", "b"]
    shards = sorted(os.listdir(out / "prep" / "regions"))
    assert shards == [r["slide_id"] + ".array_record" for r in rows]
    status = json.load(open(out / "prep" / "status" / "slide00_a.json"))
    assert status["status"] == "done" and status["n_regions"] == 3  # slide 0: 2x2 regions, 3 of tissue
    assert json.load(open(out / "prep" / "status" / "slide01_b.json"))["n_regions"] == 1
    assert len(os.listdir(out / "prep_patches" / "patches")) == 4
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == ["synth", "prep"] and set(summary["seconds"]) == {"synth", "prep"}
    assert "=== HIPT-JAX demo: summary" in res.stdout
    for step, items in summary["outputs"].items():
        for key, path in items.items():
            assert os.path.exists(path), f"{step}: {key} missing ({path})"
    assert len(os.listdir(out / "prep" / "regions")) == 4
    assert _tree(site) == before, "the demo wrote into the installed package"
    assert os.listdir(cwd) == []
