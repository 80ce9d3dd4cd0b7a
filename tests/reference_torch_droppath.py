"""DINO's stochastic depth in PyTorch, with the per-sample keep masks supplied by the caller.

DINO's ``drop_path`` draws ``floor(keep + U[0,1))`` per sample, divides the branch by ``keep``
and multiplies by that 0/1 draw; its ``VisionTransformer`` gives block i the rate
``torch.linspace(0, drop_path_rate, depth)[i]`` and applies the drop to both residual branches
(attention, then MLP). Here the 0/1 draws come from a ``MaskFeed`` instead of ``torch.rand``,
so a JAX run and this oracle can be compared under the SAME draws (parity of stochastic depth
itself: rates, scaling, per-sample shape, which branches).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn as nn

from tests import reference_torch as ref


class MaskFeed:
    """A queue of 0/1 masks [N, 1, 1], consumed in the order the drop-path sites run."""

    def __init__(self):
        self.queue: deque = deque()

    def push(self, masks) -> None:
        self.queue.extend(torch.as_tensor(m, dtype=torch.float32) for m in masks)

    def pop(self, batch: int) -> torch.Tensor:
        if not self.queue:
            raise RuntimeError("MaskFeed: a drop-path site ran with no mask left")
        mask = self.queue.popleft()
        if mask.shape[0] != batch:
            raise RuntimeError(f"MaskFeed: mask for {mask.shape[0]} samples, branch has {batch}")
        return mask


def drop_path(x: torch.Tensor, rate: float, training: bool, feed: MaskFeed) -> torch.Tensor:
    """DINO's drop_path with the uniform draw replaced by a supplied 0/1 mask."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = feed.pop(x.shape[0]).reshape((x.shape[0],) + (1,) * (x.ndim - 1)).to(x.dtype)
    return x.div(keep) * mask


class DropPathBlock(ref.Block):
    def __init__(self, dim, num_heads, mlp_ratio, rate: float, feed: MaskFeed):
        super().__init__(dim, num_heads, mlp_ratio)
        self.rate, self.feed = rate, feed

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + drop_path(y, self.rate, self.training, self.feed)
        return x + drop_path(self.mlp(self.norm2(x)), self.rate, self.training, self.feed)


def with_drop_path(model: nn.Module, drop_path_rate: float, feed: MaskFeed) -> nn.Module:
    """Replace a reference ViT's blocks by drop-path blocks with DINO's linear rate schedule
    (same parameter names, so state dicts load unchanged)."""
    depth = len(model.blocks)
    rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
    old = model.blocks
    dim, heads = model.embed_dim, old[0].attn.num_heads
    mlp_ratio = old[0].mlp.fc1.out_features / dim
    model.blocks = nn.ModuleList([DropPathBlock(dim, heads, mlp_ratio, r, feed) for r in rates])
    model.blocks.load_state_dict(old.state_dict())
    return model
