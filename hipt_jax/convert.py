"""The released PyTorch weights <-> our Orbax checkpoints (the library of ``hipt-convert``,
whose command line is hipt_jax/cli/convert.py).

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

import os

import numpy as np

from hipt_jax.models import checkpoint, torch_io
from hipt_jax.outputs import atomic_path
from hipt_jax.models.checkpoint import CheckpointError


def to_orbax(src: str, dst: str, which: str = "teacher", arch: str = "auto", keep_head: bool = False) -> dict:
    """Convert a reference .pth into DST (arch.json + Orbax state). Returns a summary dict."""
    variables, config, head, layout = torch_io.load_reference_backbone(src, which=which, arch=arch,
                                                                       keep_head=keep_head)
    meta = {"source": os.path.abspath(src), "which": which, **layout}
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"{dst}: already exists and is not an empty directory")
    with atomic_path(dst) as tmp:  # a full disk leaves no half-written checkpoint directory
        checkpoint.save(tmp, variables["params"], "vit", config, meta=meta, head=head)
    n_params = sum(int(np.prod(np.shape(a))) for a in torch_io.variables_to_reference(variables).values())
    return {"arch": config.arch, "params": n_params, "head": head is not None, "dst": os.path.abspath(dst),
            "cast_from": layout.get("cast_from", []), "container": layout.get("container"),
            "ignored": layout.get("ignored", []), "which": layout.get("which"),
            "not_converted": layout.get("not_converted")}


def to_torch(src: str, dst: str) -> dict:
    """Write a saved ViT directory back as a .pth in the reference key layout (and container /
    prefix it was converted from; the released teacher layout otherwise)."""
    import torch

    if os.path.exists(dst) and os.path.isdir(dst):
        raise CheckpointError(f"{dst}: is a directory; --to-torch writes a .pth file")
    loaded = checkpoint.load(src, kind="vit")
    out = torch_io.reference_state(loaded.variables, loaded.head, loaded.meta)
    with atomic_path(dst) as tmp:
        torch.save(out, tmp)
    n_tensors = sum(len(v) for v in out.values()) if loaded.meta.get("container", "teacher") else len(out)
    return {"arch": loaded.config.arch, "tensors": n_tensors, "dst": os.path.abspath(dst)}
