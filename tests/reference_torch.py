"""The HIPT reference, re-written in PyTorch after the official code's structure (parity oracle).

This is deliberately the reference's own code shape (DINO/timm ``VisionTransformer`` with
``interpolate_pos_encoding`` called with a SCALE FACTOR, ``vit4k_xs`` with its ``phi`` stem,
``HIPT_4K`` with torchvision-style ``CenterCrop`` and ViT-256 minibatches of 256 patches), so
that tests and benchmarks compare our JAX code against what users of the reference run.

Also here:
- ``write_released_checkpoint``: random weights saved in the layout of the released
  ``vit256_small_dino.pth`` / ``vit4k_xs_dino.pth`` (full DINO training dict).
- ``load_reference_weights``: the reference's loader (strip ``module.`` and ``backbone.``,
  ignore the DINO head), strict about everything else.

Importable without pytest (benchmarks use it). Needs only torch and numpy.
"""
from __future__ import annotations

import argparse
import math
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_OUT_DIM = 65536  # DINO head output dimension of the released checkpoints


# --------------------------------------------------------------------------------------------
# ViT building blocks (DINO's vision_transformer.py)
# --------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B,D,h,w] -> [B,h*w,D]


class _ViTBase(nn.Module):
    """Shared body: CLS + pos-embed (interpolated with a scale factor), blocks, final norm."""

    stem_patch = 16

    def _init_body(self, embed_dim, depth, num_heads, mlp_ratio, num_patches=196):
        self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def interpolate_pos_encoding(self, x, w, h):
        # Verbatim logic of the reference: note "w" is the height axis of an NCHW tensor.
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.stem_patch
        h0 = h // self.stem_patch
        w0, h0 = w0 + 0.1, h0 + 0.1  # avoid floating point error in the interpolation
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def _tokens(self, x):
        """NCHW input -> [B, 1+N, D] tokens with position embedding."""
        raise NotImplementedError

    def forward_tokens(self, x):
        """All tokens after the final norm [B,1+N,D]."""
        x = self._tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.forward_tokens(x)[:, 0]

    def forward_with_attention(self, x):
        """(CLS after the final norm, last block's attention) in ONE pass (what
        forward + get_last_selfattention give, at half the cost)."""
        x = self._tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        y, attn = last.attn(last.norm1(x))
        x = x + y
        x = x + last.mlp(last.norm2(x))
        return self.norm(x)[:, 0], attn

    def get_last_selfattention(self, x):
        x = self._tokens(x)
        for i, blk in enumerate(self.blocks):
            if i < len(self.blocks) - 1:
                x = blk(x)
            else:
                return blk(x, return_attention=True)


class VisionTransformer(_ViTBase):
    """ViT-256-16 ("vit_small" with patch 16): NCHW normalized images -> CLS [B,384]."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        self.stem_patch = patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self._init_body(embed_dim, depth, num_heads, mlp_ratio)

    def _tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)


class VisionTransformer4K(_ViTBase):
    """ViT-4K-256 ("vit4k_xs"): NCHW feature grids [B,384,R,C] -> CLS [B,192]."""

    stem_patch = 1

    def __init__(self, input_embed_dim=384, output_embed_dim=192, depth=6, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(input_embed_dim, output_embed_dim), nn.GELU(), nn.Dropout(p=0.0))
        self._init_body(output_embed_dim, depth, num_heads, mlp_ratio)

    def _tokens(self, x):
        B, embed_dim, w, h = x.shape
        x = x.flatten(2, 3).transpose(1, 2)  # [B,384,R,C] -> [B,R*C,384], row-major
        x = self.phi(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)


def vit_small(depth=12, mlp_ratio=4.0):
    return VisionTransformer(16, 384, depth, 6, mlp_ratio)


def vit4k_xs(depth=6, mlp_ratio=4.0):
    return VisionTransformer4K(384, 192, depth, 6, mlp_ratio)


def build_reference(arch: str) -> nn.Module:
    """Reference module for one of our architecture names (vit256, vit4k, *_tiny)."""
    builders = {
        "vit256": lambda: vit_small(),
        "vit4k": lambda: vit4k_xs(),
        "vit256_tiny": lambda: vit_small(depth=2, mlp_ratio=1.0),
        "vit4k_tiny": lambda: vit4k_xs(depth=1, mlp_ratio=1.0),
    }
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}")
    return builders[arch]().eval()


def random_init_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Deterministic non-trivial random weights (biases and LayerNorms too, so that a bias or
    a norm parameter that is dropped or transposed shows up in parity tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name in ("pos_embed", "cls_token"):
                p.copy_(torch.randn(p.shape, generator=g))  # N(0,1): exercises the interpolation
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) * (2.5 if p.ndim > 1 else 1.0))
    return model


# --------------------------------------------------------------------------------------------
# HIPT_4K (HIPT_4K/hipt_4k.py)
# --------------------------------------------------------------------------------------------
def center_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision.transforms.CenterCrop on an NCHW tensor (size <= image): offsets use round()."""
    h, w = img.shape[-2:]
    ch, cw = size
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img[..., top : top + ch, left : left + cw]


def eval_transform(region_u8: np.ndarray) -> torch.Tensor:
    """ToTensor + Normalize(mean=0.5, std=0.5): uint8 [H,W,3] -> float [1,3,H,W]."""
    x = torch.from_numpy(np.ascontiguousarray(region_u8)).permute(2, 0, 1).float().div(255)
    return ((x - 0.5) / 0.5).unsqueeze(0)


class HIPT_4K(nn.Module):
    def __init__(self, model256: nn.Module, model4k: nn.Module):
        super().__init__()
        self.model256, self.model4k = model256.eval(), model4k.eval()
        self.patch_filter_params = None

    @staticmethod
    def prepare_img_tensor(img: torch.Tensor, patch_size=256):
        make_divisble = lambda l, patch_size: (l - (l % patch_size))  # noqa: E731
        b, c, w, h = img.shape
        load_size = make_divisble(w, patch_size), make_divisble(h, patch_size)
        w_256, h_256 = w // patch_size, h // patch_size
        return center_crop(img, load_size), w_256, h_256

    @torch.no_grad()
    def forward_asset_dict(self, x: torch.Tensor, minibatch: int = 256, attention: bool = False):
        """[1,3,H,W] normalized -> the reference's outputs (numpy, no batch dim)."""
        batch_256, w_256, h_256 = self.prepare_img_tensor(x)
        batch_256 = batch_256.unfold(2, 256, 256).unfold(3, 256, 256)  # [1,3,R,C,256,256]
        # 'b c p1 p2 w h -> (b p1 p2) c w h'
        batch_256 = batch_256.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 256, 256)
        cls256, attn256 = [], []
        for mini_bs in range(0, batch_256.shape[0], minibatch):
            mb = batch_256[mini_bs : mini_bs + minibatch]
            if attention:
                cls, attn = self.model256.forward_with_attention(mb)
                attn256.append(attn[:, :, 0, 1:].cpu())
            else:
                cls = self.model256(mb)
            cls256.append(cls.detach().cpu())
        features_cls256 = torch.vstack(cls256)  # [R*C,384]
        features_mean256 = features_cls256.mean(dim=0).unsqueeze(dim=0)
        features_grid256 = (features_cls256.reshape(w_256, h_256, 384).transpose(0, 1).transpose(0, 2)
                            .unsqueeze(dim=0))  # [1,384,R,C]
        features_cls4k = self.model4k.forward(features_grid256).detach().cpu()
        out = {
            "features_cls256": features_cls256.numpy(),
            "features_mean256": features_mean256[0].numpy(),
            "features_cls4k": features_cls4k[0].numpy(),
            "features_mean256_cls4k": torch.cat([features_mean256, features_cls4k], dim=1)[0].numpy(),
        }
        if attention:
            out["attention256"] = torch.vstack(attn256).numpy()  # [R*C,heads,256]
            out["attention4k"] = self.model4k.get_last_selfattention(features_grid256)[0, :, 0, 1:].numpy()
        return out

    def forward(self, x):
        return self.forward_asset_dict(x)["features_cls4k"]

    def embed_region(self, region_u8: np.ndarray, minibatch: int = 256, attention: bool = False):
        """uint8 [H,W,3] region -> outputs dict, the reference's way (eval transform first)."""
        return self.forward_asset_dict(eval_transform(region_u8), minibatch, attention)


# --------------------------------------------------------------------------------------------
# Released checkpoint layout and the reference loader
# --------------------------------------------------------------------------------------------
def dino_head_state(in_dim: int, out_dim: int = HEAD_OUT_DIM, seed: int = 0,
                    hidden: int = 2048, bottleneck: int = 256) -> dict[str, torch.Tensor]:
    """The 8 DINO head tensors (keys without prefix), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.02 * torch.randn(*s, generator=g)  # noqa: E731
    v = r(out_dim, bottleneck)
    return {
        "mlp.0.weight": r(hidden, in_dim), "mlp.0.bias": r(hidden),
        "mlp.2.weight": r(hidden, hidden), "mlp.2.bias": r(hidden),
        "mlp.4.weight": r(bottleneck, hidden), "mlp.4.bias": r(bottleneck),
        "last_layer.weight_g": torch.ones(out_dim, 1),  # norm_last_layer: g fixed to 1
        "last_layer.weight_v": v,
    }


def write_released_checkpoint(path: str, arch: str = "vit256", seed: int = 0,
                              head_out_dim: int = HEAD_OUT_DIM, optimizer_state: bool = True,
                              model: Optional[nn.Module] = None) -> nn.Module:
    """Write random weights in the layout of the released DINO checkpoints; return the teacher
    backbone (a reference module holding exactly the saved teacher weights).

    Keys: student ("module.backbone.*", "module.head.*"), teacher ("backbone.*", "head.*"),
    optimizer (AdamW state_dict; per-parameter exp_avg/exp_avg_sq when ``optimizer_state``),
    epoch, args (argparse.Namespace), dino_loss ({"center": [1, out_dim]}), fp16_scaler.
    With the defaults the file has the released size (~704 MB for vit256); tests pass a small
    ``head_out_dim`` and ``optimizer_state=False`` to keep it small (the layout is the same).
    """
    teacher = model if model is not None else random_init_(build_reference(arch), seed)
    student = random_init_(build_reference(arch), seed + 1)
    embed_dim = teacher.embed_dim
    t_head = dino_head_state(embed_dim, head_out_dim, seed + 2)
    s_head = dino_head_state(embed_dim, head_out_dim, seed + 3)
    teacher_sd = {f"backbone.{k}": v.clone() for k, v in teacher.state_dict().items()}
    teacher_sd.update({f"head.{k}": v for k, v in t_head.items()})
    student_sd = {f"module.backbone.{k}": v.clone() for k, v in student.state_dict().items()}
    student_sd.update({f"module.head.{k}": v for k, v in s_head.items()})
    # DINO's param groups: regularized (ndim > 1) and not regularized; last_layer.weight_g
    # has requires_grad=False so it is not in the optimizer.
    trainable = [k for k in student_sd if not k.endswith("weight_g")]
    reg = [i for i, k in enumerate(trainable) if student_sd[k].ndim > 1]
    noreg = [i for i, k in enumerate(trainable) if student_sd[k].ndim <= 1]
    group = dict(lr=0.0005, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, maximize=False,
                 foreach=None, capturable=False, differentiable=False, fused=None)
    state = {}
    if optimizer_state:
        for i, k in enumerate(trainable):
            state[i] = {"step": torch.tensor(400000.0), "exp_avg": torch.zeros_like(student_sd[k]),
                        "exp_avg_sq": torch.zeros_like(student_sd[k])}
    optimizer = {"state": state, "param_groups": [
        dict(group, weight_decay=0.4, params=reg), dict(group, weight_decay=0.0, params=noreg)]}
    args = argparse.Namespace(
        arch="vit_small" if arch.startswith("vit256") else "vit4k_xs", patch_size=16,
        out_dim=head_out_dim, norm_last_layer=True, momentum_teacher=0.996, use_bn_in_head=False,
        warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, use_fp16=True,
        weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
        freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-06, optimizer="adamw",
        drop_path_rate=0.1, global_crops_scale=(0.4, 1.0), local_crops_number=8,
        local_crops_scale=(0.05, 0.4), data_path="/data/TCGA", output_dir="./ckpts", saveckp_freq=20,
        seed=0, num_workers=10, dist_url="env://", local_rank=0, rank=0, world_size=8, gpu=0,
    )
    ckpt = {
        "student": student_sd,
        "teacher": teacher_sd,
        "optimizer": optimizer,
        "epoch": 100,
        "args": args,
        "dino_loss": {"center": 0.01 * torch.randn(1, head_out_dim, generator=torch.Generator().manual_seed(seed))},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 117},
    }
    torch.save(ckpt, path)
    return teacher


def torch_load_trusted(path: str):
    """torch.load with weights_only=True, allow-listing the argparse.Namespace in DINO files."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_reference_weights(model: nn.Module, path: str, checkpoint_key: str = "teacher"):
    """The reference loader: pick ``checkpoint_key`` if present, strip "module." and
    "backbone.", drop the DINO head; then load STRICTLY (raises on missing/unexpected keys
    or shape mismatches). Returns the model."""
    state_dict = torch_load_trusted(path)
    if checkpoint_key is not None and checkpoint_key in state_dict:
        state_dict = state_dict[checkpoint_key]
    state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
    state_dict = {k.replace("backbone.", ""): v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    model.load_state_dict(state_dict, strict=True)
    return model
