"""``hipt-embed``: one region -> HIPT_4K embeddings in an .npz (same keys as the Python API).

    hipt-embed --vit256 ckpt/vit256 --vit4k ckpt/vit4k --image region.png --out region.npz
    hipt-embed --vit256 ckpt/vit256 --vit4k ckpt/vit4k --slide S.svs --x 12000 --y 8000 --out r.npz

Checkpoints are converted directories (hipt-convert) or the released .pth files. A slide
region is read as ``--size`` px (default 4096) at ``--mpp`` (default 0.5 um/px, i.e. 20x)
whose top-left corner is the level-0 pixel (--x, --y); a 40x slide is read over twice the
level-0 extent and downsampled (data_prep.slide_io.read_region_at_mpp).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from hipt_jax.models.hipt4k import DEFAULT_PATCH_BATCH

OUTPUT_KEYS = ("features_cls256", "features_mean256", "features_cls4k", "features_mean256_cls4k")


class EmbedError(Exception):
    """Bad input for hipt-embed; one line naming the file and the problem."""


def read_image(path: str) -> np.ndarray:
    """An RGB image file -> uint8 [H,W,3] (alpha dropped, grayscale expanded)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise EmbedError(f"{path}: no such file")
    Image.MAX_IMAGE_PIXELS = None  # regions are large on purpose; the size check is ours
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise EmbedError(f"{path}: not an image file PIL can read") from None
    except (OSError, ValueError) as e:
        raise EmbedError(f"{path}: unreadable image ({e})") from None
    if min(rgb.shape[:2]) < 256:
        raise EmbedError(f"{path}: image is {rgb.shape[0]}x{rgb.shape[1]} px; a region needs >= 256 px per side")
    return rgb


def read_slide_region(path: str, x: int, y: int, size: int, mpp: float, assume_mpp) -> np.ndarray:
    """A region of ``size`` px at ``mpp`` um/px from a slide -> uint8 [size,size,3]."""
    from data_prep.slide_io import SlideError, open_slide, read_region_at_mpp

    try:
        slide = open_slide(path)
        return read_region_at_mpp(slide, x, y, size_px=size, target_mpp=mpp, assume_mpp=assume_mpp)
    except SlideError as e:
        raise EmbedError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hipt-embed", description="Embed one region with HIPT_4K (ViT-256 + ViT-4K).")
    p.add_argument("--vit256", required=True, help="ViT-256 checkpoint: converted directory or released .pth")
    p.add_argument("--vit4k", help="ViT-4K checkpoint (omit for ViT-256 features only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="region image file (PNG/JPEG/TIFF), any size >= 256 px")
    src.add_argument("--slide", help="whole-slide image (any OpenSlide format)")
    p.add_argument("--x", type=int, help="level-0 x of the region's top-left corner (with --slide)")
    p.add_argument("--y", type=int, help="level-0 y of the region's top-left corner (with --slide)")
    p.add_argument("--size", type=int, default=4096, help="region side in px at --mpp (default 4096)")
    p.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5 = 20x)")
    p.add_argument("--assume-mpp", type=float, help="level-0 mpp to use when the slide has none in its metadata")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--patch-batch", type=int, default=DEFAULT_PATCH_BATCH,
                   help="ViT-256 patches per minibatch (8 was fastest on a 2-core CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--attention", action="store_true", help="also save last-block attention maps")
    return p


def embed(args) -> dict[str, np.ndarray]:
    import jax.numpy as jnp

    from hipt_jax.models.checkpoint import CheckpointError
    from hipt_jax.models.hipt4k import HIPT4K

    if args.slide is not None:
        if args.x is None or args.y is None:
            raise EmbedError("--slide needs --x and --y (level-0 top-left of the region)")
        region = read_slide_region(args.slide, args.x, args.y, args.size, args.mpp, args.assume_mpp)
    else:
        region = read_image(args.image)
    try:
        model = HIPT4K.from_checkpoints(vit256=args.vit256, vit4k=args.vit4k, patch_batch=args.patch_batch,
                                        dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    except CheckpointError as e:
        raise EmbedError(str(e)) from None
    out = model(region, return_attention=args.attention)
    out["region_shape"] = np.asarray(region.shape[:2])
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.patch_batch < 1:
        print("hipt-embed: error: --patch-batch must be >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        out = embed(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez(args.out, **out)
    except EmbedError as e:
        print(f"hipt-embed: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"hipt-embed: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    h, w = (int(v) for v in out["region_shape"])
    print(f"region {h}x{w} px -> {out['features_cls256'].shape[0]} patches of 256 px "
          f"({time.perf_counter() - start:.1f} s)")
    for key in OUTPUT_KEYS:
        if key in out:
            v = out[key]
            print(f"  {key:<24} {str(list(v.shape)):<11} mean {v.mean():+.4f}  std {v.std():.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
