"""The whole HIPT pipeline on the embedded slide, on CPU, in minutes (`make demo`).

    python -m hipt_jax.demo --out demo_out [--steps synth,prep,...] [--slides 8]

Steps (each runs the project's own command-line tool, exactly as a user would, and prints it):
  synth       a cohort of synthetic Aperio slides grown from the real tissue of
              data_prep/testdata/cmu_small_region.svs, two "classes" that differ by stain
  prep        hipt-prep regions (tissue masks, 4096 px regions at 20x) and patches (256 px)
  pretrain256 stage-1 DINO pretraining of ViT-256 on the patch shards (runlocal: tiny model)
  features    hipt-prep features: [256,384] ViT-256 features of every region, stage-1 weights
  pretrain4k  stage-2 DINO pretraining of ViT-4K on the feature grids (runlocal)
  extract     hipt-extract: CLS-4K of every region and the slide embeddings
  knn         hipt-knn: the paper's KNN and DINO's weighted KNN, k-fold cross-validation
  lgp         hipt-finetune: HIPT-LGP subtyping (runlocal: tiny, 3 epochs, 3 folds) on top of
              the stage-2 ViT-4K
  heatmap     hipt-heatmap: hierarchical attention heatmaps of a 2048 px region of the real
              slide with both pretrained stages, and the slide map of HIPT-LGP's attention
  wsi         (optional: only when named in --steps, e.g. --steps wsi after a full run) stage 3:
              hipt-pretrain of ViT-WSI on the slide bags (runlocal, no labels), hipt-extract
              --vitwsi (slide_embedding_wsi), hipt-knn --embedding wsi
The models are tiny and trained for seconds: the point is that every stage runs and feeds the
next, not the numbers. A `steps` subset reuses the outputs earlier steps left in --out.

Runs from an installed package (`pip install .`, then from any folder): the configs (the
top-level `configs` package) and the embedded slide (`data_prep` package data) are found with
importlib.resources, and every command runs as `python -m MODULE` with the same import path as
this process.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import resources

import numpy as np

# The command-line tools the demo runs, by module (`python -m MODULE`): the one place to change
# when a command moves.
COMMANDS = {
    "prep": "hipt_jax.cli.prep",            # hipt-prep
    "pretrain": "hipt_jax.cli.pretrain",    # hipt-pretrain
    "extract": "hipt_jax.cli.extract",      # hipt-extract
    "knn": "hipt_jax.cli.knn",              # hipt-knn
    "finetune": "hipt_jax.cli.finetune",    # hipt-finetune
    "heatmap": "hipt_jax.cli.heatmap",      # hipt-heatmap
}
STEPS = ("synth", "prep", "pretrain256", "features", "pretrain4k", "extract", "knn", "lgp", "heatmap")
# Run only when named in --steps (after extract): stage 3 adds ~47 s of CPU to the demo's minute.
OPTIONAL_STEPS = ("wsi",)
# The folder this process imports hipt_jax from (site-packages, a --target folder or a checkout);
# the commands get it first on PYTHONPATH so they run the same code whatever their cwd.
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_STAINS = {"a": None, "b": (1.35, 0.8, 1.0)}  # optical-density gains per class
REGION_PX = 4096  # --region-px; each synthetic slide is one region, except the first: 2 x 2
# regions, 3 with tissue, so that its slide-level map has something to show.
FIRST_SLIDE_TISSUE = np.array([[1, 1], [1, 0]], bool)
# Heatmaps are drawn on the real tissue: (x, y, size) of a 2048 px region of the embedded slide
# (20x) with tissue on the right and glass on the left.
REAL_REGION = (172, 900, 2048)


class DemoError(Exception):
    """A step failed; the message says which and where its log is."""


def config_file(name: str) -> str:
    """Path of configs/NAME in the installed `configs` package (ml-collections loads it by path)."""
    path = resources.files("configs").joinpath(name)
    if not path.is_file():
        raise DemoError(f"configs/{name}: not found in the installed configs package")
    return str(path)


def embedded_slide() -> str:
    """Path of the embedded real slide, shipped as data_prep package data."""
    path = resources.files("data_prep").joinpath("testdata", "cmu_small_region.svs")
    if not path.is_file():
        raise DemoError("data_prep/testdata/cmu_small_region.svs: not found in the installed data_prep package")
    return str(path)


class Paths:
    """Where every step reads and writes, under --out."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.slides = os.path.join(self.out, "slides")
        self.labels = os.path.join(self.out, "labels.csv")
        self.prep = os.path.join(self.out, "prep")                 # regions (+ qc, status)
        self.patches = os.path.join(self.out, "prep_patches")      # each hipt-prep kind has its
        self.features = os.path.join(self.out, "prep_features")    # own --out (own status files)
        self.stage1 = os.path.join(self.out, "pretrain_vit256")
        self.stage2 = os.path.join(self.out, "pretrain_vit4k")
        self.stage3 = os.path.join(self.out, "pretrain_vitwsi")
        self.embeddings = os.path.join(self.out, "embeddings")
        self.lgp = os.path.join(self.out, "lgp")
        self.heatmaps = os.path.join(self.out, "heatmaps")
        self.logs = os.path.join(self.out, "logs")


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run_tool(name: str, command: str, args: list[str], log_dir: str, *, show: int = 12,
             env: dict | None = None, echo: bool = True) -> str:
    """Run ``python -m COMMANDS[command] args`` (one of our CLIs), log everything, echo the tail.

    Progress lines are echoed live (lines with "step", "%", "regions", "fold" or "AUC");
    the full output goes to LOG_DIR/<name>.log. Raises DemoError on a non-zero exit.
    """
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    cmd = [sys.executable, "-m", COMMANDS[command], *args]
    print("$ " + " ".join(_short(a) for a in cmd[2:]), flush=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, os.environ.get("PYTHONPATH")) if p)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    lines, last_shown = [], None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=log_dir, env=full_env, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            if echo and _is_progress(line) and line != last_shown:
                print("  " + line.rstrip()[:160], flush=True)
                last_shown = line
        code = proc.wait()
    if code != 0:
        tail = "\n".join("  " + x for x in lines[-show:])
        raise DemoError(f"step {name} failed (exit {code}); log: {log_path}\n{tail}")
    return "\n".join(lines)


def _short(arg: str) -> str:
    """A path as the user typed it: relative to the current folder when inside it."""
    return arg.replace(os.getcwd() + os.sep, "")


def _is_progress(line: str) -> bool:
    if line.startswith(("I1", "W1", "E1", "I0", "W0", "E0")):  # absl/orbax info logs stay in the log
        return False
    keys = ("step ", "slides", "regions", "patches", "features", "AUC", "fold", "exported", "wrote", "files in",
            "mean", "paper", "dino", "error", "Error")
    if "%|" in line and "100%|" not in line:  # tqdm redraws (no terminal): keep only the end
        return False
    return any(k in line for k in keys)


# ------------------------------------------------------------------------------ steps
def _make_slide(args) -> str:
    from data_prep.synth import make_aperio_slide

    path, seed, stain, first, region_px = args
    if first:
        return make_aperio_slide(path, (2 * region_px, 2 * region_px), mag=20, levels=(1, 4, 16), seed=seed,
                                 stain=stain, tissue=FIRST_SLIDE_TISSUE, tissue_cell_px=region_px)
    return make_aperio_slide(path, (region_px, region_px), mag=20, levels=(1, 4, 16), seed=seed, stain=stain)


def step_synth(p: Paths, opts) -> dict:
    """Synthetic cohort: N slides, half of each class, from the real tissue."""
    os.makedirs(p.slides, exist_ok=True)
    jobs, rows = [], []
    for i in range(opts.slides):
        cls = "a" if i % 2 == 0 else "b"
        slide_id = f"slide{i:02d}_{cls}"
        path = os.path.join(p.slides, slide_id + ".svs")
        rows.append((slide_id, cls))
        if not os.path.exists(path):
            jobs.append((path, 1000 + i, CLASS_STAINS[cls], i == 0, opts.region_px))
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=opts.workers) as pool:
        for _ in tqdm(pool.map(_make_slide, jobs), total=len(jobs), desc="synthetic slides", unit="slide"):
            pass
    with open(p.labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label"])
        w.writerows(rows)
    print(f"  {opts.slides} slides of {opts.region_px}x{opts.region_px} px at 20x (the first {2 * opts.region_px} "
          f"px, 3 regions of tissue) in {_short(p.slides)}; "
          f"classes a (original stain) and b (stain gains {CLASS_STAINS['b']}); labels {_short(p.labels)}")
    return {"slides": p.slides, "labels": p.labels}


def step_prep(p: Paths, opts) -> dict:
    """Tissue masks, 4096 px region shards at 20x, and 256 px patch shards."""
    run_tool("prep_regions", "prep", ["regions", "--slides", p.slides, "--out", p.prep,
                                      "--region", str(opts.region_px), "--workers", str(opts.workers)], p.logs)
    run_tool("prep_patches", "prep", ["patches", "--regions", p.prep, "--out", p.patches,
                                      "--workers", str(opts.workers)], p.logs)
    regions = _count_files(os.path.join(p.prep, "regions"), ".array_record")
    print(f"  region shards: {regions} slides; QC pictures in {_short(os.path.join(p.prep, 'qc'))}")
    return {"regions": os.path.join(p.prep, "regions"), "patches": os.path.join(p.patches, "patches"),
            "qc": os.path.join(p.prep, "qc")}


def _pretrain_args(config: str, workdir: str, data_kind: str, data_path: str, steps: int) -> list[str]:
    return ["--config", config_file(config) + ":runlocal", "--workdir", workdir,
            f"--config.data.kind={data_kind}", f"--config.data.path={data_path}",
            f"--config.total_steps={steps}", f"--config.checkpoint.every_steps={steps}",
            f"--config.log_every={max(1, steps // 5)}"]


def step_pretrain256(p: Paths, opts) -> dict:
    """Stage-1 DINO pretraining of ViT-256 on the patch shards (runlocal, tiny model)."""
    run_tool("pretrain_vit256", "pretrain",
             _pretrain_args("pretrain_vit256.py", p.stage1, "patch_shards", os.path.join(p.patches, "patches"),
                            opts.pretrain_steps), p.logs)
    return {"vit256_export": os.path.join(p.stage1, "export"), "tensorboard": p.stage1}


def step_features(p: Paths, opts) -> dict:
    """[256,384] ViT-256 features of every region with the stage-1 teacher."""
    run_tool("prep_features", "prep", ["features", "--regions", p.prep, "--out", p.features,
                                      "--vit256", os.path.join(p.stage1, "export")], p.logs)
    return {"features": os.path.join(p.features, "features")}


def step_pretrain4k(p: Paths, opts) -> dict:
    """Stage-2 DINO pretraining of ViT-4K on the feature grids (runlocal)."""
    run_tool("pretrain_vit4k", "pretrain",
             _pretrain_args("pretrain_vit4k.py", p.stage2, "feature_shards", os.path.join(p.features, "features"),
                            opts.pretrain_steps), p.logs)
    return {"vit4k_export": os.path.join(p.stage2, "export")}


def step_extract(p: Paths, opts) -> dict:
    """CLS-4K of every region and the slide embeddings (mean CLS-4K)."""
    run_tool("extract", "extract",
             ["--vit256", os.path.join(p.stage1, "export"), "--vit4k", os.path.join(p.stage2, "export"),
              "--shards", p.prep, "--features", os.path.join(p.features, "features"), "--out", p.embeddings,
              "--no-progress"], p.logs)
    n = _count_files(os.path.join(p.embeddings, "slides"), ".npz")
    print(f"  {n} slide embeddings [192] in {_short(os.path.join(p.embeddings, 'slides'))}")
    return {"embeddings": os.path.join(p.embeddings, "slides")}


def _run_knn(p: Paths, opts, name: str, out: str, extra: tuple[str, ...] = ()) -> None:
    folds = max(2, min(5, opts.slides // 2))
    text = run_tool(name, "knn",
                    ["--embeddings", p.embeddings, "--labels", p.labels, "--splits", f"kfold:{folds}",
                     "--k", str(min(5, opts.slides - opts.slides // folds - 1)), "--out", out, *extra], p.logs,
                    show=30, echo=False)
    print("\n".join("  " + line for line in text.splitlines() if line.strip() and not line.startswith(("I1", "W1"))))


def step_knn(p: Paths, opts) -> dict:
    """Slide KNN evaluation: the paper's k=5 Euclidean and DINO's weighted cosine KNN."""
    out = os.path.join(p.embeddings, "knn_results.json")
    _run_knn(p, opts, "knn", out)
    return {"knn_results": out}


def step_wsi(p: Paths, opts) -> dict:
    """Stage 3: ViT-WSI pretrained on the slide bags (no labels), its slide embeddings, their KNN."""
    run_tool("pretrain_vitwsi", "pretrain",
             _pretrain_args("pretrain_vitwsi.py", p.stage3, "slide_bags", p.embeddings, opts.pretrain_steps),
             p.logs)
    export = os.path.join(p.stage3, "export")
    run_tool("extract_vitwsi", "extract", ["--vitwsi", export, "--out", p.embeddings, "--no-progress"], p.logs)
    out = os.path.join(p.embeddings, "knn_results_wsi.json")
    _run_knn(p, opts, "knn_wsi", out, ("--embedding", "wsi"))
    return {"vitwsi_export": export, "knn_results_wsi": out}


def step_lgp(p: Paths, opts) -> dict:
    """HIPT-LGP subtyping with k-fold CV on the extracted features (runlocal config)."""
    text = run_tool("lgp", "finetune",
                    ["--config", config_file("lgp_subtyping.py") + ":runlocal", "--workdir", p.lgp,
                     f"--config.data.embeddings={p.embeddings}", f"--config.data.labels={p.labels}",
                     f"--config.model.pretrained_vit4k={os.path.join(p.stage2, 'export')}"], p.logs,
                    show=30, echo=False)
    print("\n".join("  " + line for line in text.splitlines() if line.startswith("|") or "->" in line))
    return {"lgp_results": os.path.join(p.lgp, "results.md"), "lgp_roc": os.path.join(p.lgp, "roc.png"),
            "lgp_checkpoint": os.path.join(p.lgp, "fold_0", "checkpoint")}


def step_heatmap(p: Paths, opts) -> dict:
    """Hierarchical heatmaps of a 2048 px region of the REAL slide, and slide 0's region map."""
    run_tool("heatmap", "heatmap",
             ["--vit256", os.path.join(p.stage1, "export"), "--vit4k", os.path.join(p.stage2, "export"),
              "--slide", embedded_slide(), "--x", str(REAL_REGION[0]), "--y", str(REAL_REGION[1]),
              "--size", str(REAL_REGION[2]), "--out", p.heatmaps, "--name", "region", "--scale", "4",
              "--blends", "diagonal", "--patch-batch", "64"], p.logs)
    result = {"heatmaps": p.heatmaps, "contact_sheet": os.path.join(p.heatmaps, "region_contact_sheet.png"),
              "demo_picture": demo_picture(p.heatmaps)}
    first = sorted(f for f in os.listdir(p.slides) if f.endswith(".svs"))[0]
    slide_path = os.path.join(p.slides, first)
    lgp_ckpt = os.path.join(p.lgp, "fold_0", "checkpoint")
    npz = os.path.join(p.embeddings, "slides", first[:-4] + ".npz")
    if os.path.isdir(lgp_ckpt):
        # Slide-level map: HIPT-LGP's attention-pooling weight of every region of the slide.
        run_tool("heatmap_slide", "heatmap",
                 ["--slide", slide_path, "--lgp", lgp_ckpt, "--embeddings", p.embeddings, "--out", p.heatmaps,
                  "--thumb-px", "512", "--size", str(opts.region_px)], p.logs)
        result["slide_map"] = os.path.join(p.heatmaps, first[:-4] + "_slide_attention.png")
    elif os.path.exists(npz):
        # Without the lgp step: score regions by their CLS-4K norm (any per-region score works).
        with np.load(npz) as z:
            scores = np.linalg.norm(z["features_cls4k"], axis=-1)
            coords = z["coords"]
        scores_path = os.path.join(p.heatmaps, "region_scores.npz")
        np.savez(scores_path, coords=coords, scores=scores, region_px=opts.region_px)
        run_tool("heatmap_slide", "heatmap",
                 ["--slide", slide_path, "--region-scores", scores_path, "--out", p.heatmaps, "--thumb-px", "512"],
                 p.logs)
        result["slide_map"] = os.path.join(p.heatmaps, first[:-4] + "_slide_attention.png")
    return result


def demo_picture(heatmap_dir: str, head: int = 0, side: int = 256) -> str:
    """One small PNG for the README: region | 4K head | 256 head | their blend (palette PNG)."""
    from PIL import Image

    names = ["region_region.png", f"region_4k_head{head}.png", f"region_256_head{head}.png",
             f"region_blend_4k_head{head}_256_head{head}.png"]
    tiles = [Image.open(os.path.join(heatmap_dir, n)).convert("RGB").resize((side, side), Image.LANCZOS)
             for n in names if os.path.exists(os.path.join(heatmap_dir, n))]
    sheet = Image.new("RGB", (side * len(tiles) + 4 * (len(tiles) - 1), side), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * (side + 4), 0))
    path = os.path.join(heatmap_dir, "demo_heatmap.png")
    sheet.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


STEP_FUNCS = {"synth": step_synth, "prep": step_prep, "pretrain256": step_pretrain256,
              "features": step_features, "pretrain4k": step_pretrain4k, "extract": step_extract,
              "knn": step_knn, "wsi": step_wsi, "lgp": step_lgp, "heatmap": step_heatmap}


# ------------------------------------------------------------------------------ summary
def _count_files(folder: str, ext: str) -> int:
    return sum(f.endswith(ext) for f in os.listdir(folder)) if os.path.isdir(folder) else 0


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def summarize(p: Paths, outputs: dict, timings: dict, total: float) -> str:
    lines = ["", "=== HIPT-JAX demo: summary", f"{'step':<12} {'seconds':>8}"]
    lines += [f"{name:<12} {sec:>8.1f}" for name, sec in timings.items()]
    lines += [f"{'total':<12} {total:>8.1f}", "", "outputs:"]
    for step, items in outputs.items():
        for key, path in items.items():
            if os.path.exists(path):
                lines.append(f"  {key:<15} {_short(path):<60} {_size(path) / 2**20:8.1f} MB")
    knn = outputs.get("knn", {}).get("knn_results")
    if knn and os.path.exists(knn):
        lines.append("")
        lines.append(_knn_line(knn))
    lines.append(f"\nlogs of every step: {_short(p.logs)}; this summary: {_short(os.path.join(p.out, 'summary.json'))}")
    return "\n".join(lines)


def _knn_line(path: str) -> str:
    from hipt_jax.evaluation import metrics

    with open(path) as f:
        res = json.load(f)
    summary = res.get("summary", res)
    parts = []
    for proto in ("paper", "dino"):
        s = summary.get(proto) if isinstance(summary, dict) else None
        if isinstance(s, dict) and "auc" in s:
            auc = s["auc"]
            if isinstance(auc, dict):
                parts.append(f"{proto} KNN AUC {metrics.format_mean_std(auc)}")
            else:
                parts.append(f"{proto} KNN AUC {auc}")
    return "slide KNN (class a vs b): " + ("; ".join(parts) if parts else f"see {_short(path)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hipt_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from hipt_jax.cli.flags import path_arg

    parser.add_argument("--out", default="demo_out", type=path_arg, help="output folder")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)} (optional: {','.join(OPTIONAL_STEPS)})")
    parser.add_argument("--slides", type=int, default=8, help="synthetic slides (half per class)")
    parser.add_argument("--steps-per-stage", dest="pretrain_steps", type=int, default=8, help="pretraining steps per stage")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for slide synthesis and prep")
    parser.add_argument("--region-px", type=int, default=REGION_PX,
                        help="region side (4096 = HIPT; smaller only for smoke tests of the first steps)")
    parser.add_argument("--clean", action="store_true", help="delete --out first")
    opts = parser.parse_args(argv)
    steps = [s.strip() for s in opts.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_FUNCS]
    if unknown:
        print(f"hipt_jax.demo: error: unknown step(s) {unknown}; steps are {','.join(STEPS + OPTIONAL_STEPS)}",
              file=sys.stderr)
        return 2
    if opts.slides < 4:
        print("hipt_jax.demo: error: --slides must be >= 4 (two per class for cross-validation)", file=sys.stderr)
        return 2
    if opts.clean and os.path.isdir(opts.out):
        shutil.rmtree(opts.out)
    p = Paths(opts.out)
    os.makedirs(p.out, exist_ok=True)
    outputs, timings = {}, {}
    t_start = time.perf_counter()
    for i, name in enumerate(steps, 1):
        _banner(f"[{i}/{len(steps)}] {name}: {STEP_FUNCS[name].__doc__.splitlines()[0] if STEP_FUNCS[name].__doc__ else ''}".rstrip(": "))
        t0 = time.perf_counter()
        try:
            outputs[name] = STEP_FUNCS[name](p, opts)
        except DemoError as e:
            print(f"\nhipt_jax.demo: error: {e}", file=sys.stderr)
            return 1
        timings[name] = time.perf_counter() - t0
        print(f"  done in {timings[name]:.1f} s", flush=True)
    total = time.perf_counter() - t_start
    print(summarize(p, outputs, timings, total))
    with open(os.path.join(p.out, "summary.json"), "w") as f:
        json.dump({"steps": steps, "seconds": timings, "total_seconds": total, "outputs": outputs,
                   "slides": opts.slides, "pretrain_steps_per_stage": opts.pretrain_steps}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
