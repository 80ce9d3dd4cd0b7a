"""``hipt-convert``: the released PyTorch weights <-> our Orbax checkpoints.

    hipt-convert vit256_small_dino.pth ckpt/vit256               # teacher backbone, arch auto
    hipt-convert vit4k_xs_dino.pth ckpt/vit4k --keep-head        # + DINO head (resume pretraining)
    hipt-convert --to-torch ckpt/vit256 vit256_roundtrip.pth     # back to the reference layout

The forward direction reads the full DINO training checkpoint (student, teacher, optimizer,
args = argparse.Namespace, ...) with ``torch.load(weights_only=True)`` and only the Namespace
allow-listed, so no arbitrary code from the pickle runs. It also reads plain state dicts.
The reverse direction writes ``{"teacher": {"backbone.*": ..., ["head.*": ...]}}`` (or the
student / plain layout the directory was converted from), which the reference loader accepts
with no missing keys. Tensors survive the round trip bit for bit.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from hipt_jax.models import checkpoint, torch_io
from hipt_jax.models.checkpoint import CheckpointError


def to_orbax(src: str, dst: str, which: str = "teacher", arch: str = "auto", keep_head: bool = False) -> dict:
    """Convert a reference .pth into DST (arch.json + Orbax state). Returns a summary dict."""
    variables, config, head, layout = torch_io.load_reference_backbone(src, which=which, arch=arch,
                                                                       keep_head=keep_head)
    meta = {"source": os.path.abspath(src), "which": which, **layout}
    checkpoint.save(dst, variables["params"], "vit", config, meta=meta, head=head)
    n_params = sum(int(np.prod(np.shape(a))) for a in torch_io.variables_to_reference(variables).values())
    return {"arch": config.arch, "params": n_params, "head": head is not None, "dst": os.path.abspath(dst)}


def to_torch(src: str, dst: str) -> dict:
    """Write a saved ViT directory back as a .pth in the reference key layout (and container /
    prefix it was converted from; the released teacher layout otherwise)."""
    import torch

    if os.path.exists(dst) and os.path.isdir(dst):
        raise CheckpointError(f"{dst}: is a directory; --to-torch writes a .pth file")
    loaded = checkpoint.load(src, kind="vit")
    out = torch_io.reference_state(loaded.variables, loaded.head, loaded.meta)
    torch.save(out, dst)
    n_tensors = sum(len(v) for v in out.values()) if loaded.meta.get("container", "teacher") else len(out)
    return {"arch": loaded.config.arch, "tensors": n_tensors, "dst": os.path.abspath(dst)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hipt-convert",
        description="Convert the released HIPT PyTorch checkpoints to hipt-jax Orbax directories, and back.")
    p.add_argument("src", help="SRC.pth (forward) or a converted directory (--to-torch)")
    p.add_argument("dst", help="DST_DIR (forward, must not exist or be empty) or DST.pth (--to-torch)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="which network of a DINO checkpoint to take (default: teacher, as the reference)")
    p.add_argument("--arch", choices=["auto", "vit256", "vit4k", "vit256_tiny", "vit4k_tiny"], default="auto",
                   help="expected architecture (default: detect from the tensors)")
    p.add_argument("--keep-head", action="store_true", help="also keep the DINO head (for resuming pretraining)")
    p.add_argument("--to-torch", action="store_true", help="reverse: converted directory -> reference .pth")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.to_torch:
            info = to_torch(args.src, args.dst)
            print(f"wrote {info['dst']}: {info['arch']}, {info['tensors']} tensors in the reference layout")
        else:
            info = to_orbax(args.src, args.dst, which=args.which, arch=args.arch, keep_head=args.keep_head)
            head = " + DINO head" if info["head"] else ""
            print(f"wrote {info['dst']}: {info['arch']} {args.which} backbone, {info['params']:,} parameters{head}")
    except CheckpointError as e:
        print(f"hipt-convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"hipt-convert: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
