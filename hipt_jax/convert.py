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

from hipt_jax.checkpoints import (
    CheckpointError, head_tree_to_reference, load_checkpoint_dir, load_reference_backbone, save_backbone,
    variables_to_reference,
)


def to_orbax(src: str, dst: str, which: str = "teacher", arch: str = "auto", keep_head: bool = False) -> dict:
    """Convert a reference .pth into DST (arch.json + Orbax state). Returns the arch.json dict."""
    variables, config, head, layout = load_reference_backbone(src, which=which, arch=arch, keep_head=keep_head)
    meta = {"source": os.path.abspath(src), "which": which, **layout}
    save_backbone(dst, variables, config, head=head, meta=meta)
    n_params = sum(int(np.prod(np.shape(a))) for a in variables_to_reference(variables).values())
    return {"arch": config.arch, "params": n_params, "head": head is not None, "dst": os.path.abspath(dst)}


def to_torch(src: str, dst: str) -> dict:
    """Write a converted directory back as a .pth in the reference key layout."""
    import torch

    if os.path.exists(dst) and os.path.isdir(dst):
        raise CheckpointError(f"{dst}: is a directory; --to-torch writes a .pth file")
    variables, config, head, info = load_checkpoint_dir(src)
    meta = info.get("meta", {})
    # Write back where the tensors came from (default: the released teacher layout).
    container = meta.get("container", "teacher")
    prefix = meta.get("prefix", "backbone.")  # "backbone.", "module.backbone." or "" (plain)
    head_prefix = prefix.replace("backbone.", "") + "head."

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))

    state = {f"{prefix}{k}": tensor(v) for k, v in variables_to_reference(variables).items()}
    if head is not None:
        state.update({f"{head_prefix}{k}": tensor(v) for k, v in head_tree_to_reference(head).items()})
    out = {container: state} if container else state
    torch.save(out, dst)
    return {"arch": config.arch, "tensors": len(state), "dst": os.path.abspath(dst)}
