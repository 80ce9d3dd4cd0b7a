"""``hipt-embed``: one region -> HIPT_4K embeddings in an .npz (same keys as the Python API).

    hipt-embed --vit256 ckpt/vit256 --vit4k ckpt/vit4k --image region.png --out region.npz
    hipt-embed --vit256 ckpt/vit256 --vit4k ckpt/vit4k --slide S.svs --x 12000 --y 8000 --out r.npz
    hipt-embed --random-init tiny --image region.png --out region.npz      # smoke test

Checkpoints are converted directories (hipt-convert) or the released .pth files. A slide
region is read as ``--size`` px (default 4096) at ``--target-mpp`` (default 0.5 um/px, i.e.
20x) whose top-left corner is the level-0 pixel (--x, --y); a 40x slide is read over twice the
level-0 extent and downsampled (data_prep.slide_io.read_region_at_mpp). Exit codes: 0 ok,
2 bad usage or input (hipt_jax.cli.flags).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from hipt_jax.cli import flags

PROG = "hipt-embed"
OUTPUT_KEYS = ("features_cls256", "features_mean256", "features_cls4k", "features_mean256_cls4k")


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=PROG, description="Embed one region with HIPT_4K (ViT-256 + ViT-4K).")
    flags.add_model_flags(p, vit4k_help="ViT-4K checkpoint (omit for ViT-256 features only)")
    flags.add_region_source_flags(p, required=True, xy_default=None)
    flags.add_region_flags(p, deprecated_mpp=True)
    flags.add_compute_flags(p, patch_batch=True, deprecated_dtype=True)
    p.add_argument("--out", required=True, type=flags.path_arg, help="output .npz")
    p.add_argument("--attention", action="store_true", help="also save last-block attention maps")
    return p


def embed(args) -> dict[str, np.ndarray]:
    """The region and model the flags name -> the arrays written to --out."""
    region = flags.read_region(args)
    model = flags.load_hipt4k(args)
    from hipt_jax.models.hipt4k import center_crop_box

    out = model(region, return_attention=args.attention)
    out["region_shape"] = np.asarray(region.shape[:2])  # the input, before the centre crop
    # (top, left, height, width) of the centre crop that was embedded, in region_shape's pixels:
    # a 700 x 900 image embeds its 512 x 768 centre; without it the features could not be put
    # back on the image without redoing the crop rule
    out["crop_box"] = np.asarray(center_crop_box(*region.shape[:2]), np.int64)
    return out


def _own_output(path: str) -> bool:
    """An earlier hipt-embed .npz: the keys it always writes."""
    data = np.load(path)
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
        return False
    with data:
        return {"features_cls256", "region_shape"} <= set(data.files)


def _npz_path(out: str) -> str:
    """The file --out names: with ".npz" added when it has no such suffix, as np.savez would
    name it; in any letter case (r.NPZ is that file, not r.NPZ.npz)."""
    return out if out.lower().endswith(".npz") else out + ".npz"


def _run(args) -> int:
    from hipt_jax import outputs

    if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):  # DIR/ wrote DIR/.npz, DIR wrote DIR.npz
        raise flags.UsageError(f"{args.out}: is a folder; --out takes the .npz file to write "
                               f"(e.g. {os.path.join(args.out, 'region.npz')})")
    path = _npz_path(args.out)
    flags.check_output_file(path)
    outputs.check_target(path, writer=PROG,
                         inputs={"--image": args.image, "--slide": args.slide, "--vit256": args.vit256,
                                 "--vit4k": args.vit4k}, is_own=_own_output)
    start = time.perf_counter()
    out = embed(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from hipt_jax.outputs import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a full disk leaves no partial .npz
        np.savez(f, **out)
    h, w = (int(v) for v in out["region_shape"])
    top, left, ch, cw = (int(v) for v in out["crop_box"])
    crop = "" if (ch, cw) == (h, w) else f" (its {ch}x{cw} centre at ({left}, {top}); crop_box in the npz)"
    print(f"region {h}x{w} px{crop} -> {out['features_cls256'].shape[0]} patches of 256 px "
          f"({time.perf_counter() - start:.1f} s)")
    for key in OUTPUT_KEYS:
        if key in out:
            v = out[key]
            print(f"  {key:<24} {str(list(v.shape)):<11} mean {v.mean():+.4f}  std {v.std():.4f}")
    print(f"wrote {path}")
    return flags.EXIT_OK


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
