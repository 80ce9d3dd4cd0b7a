"""PyTorch reference of HIPT-LGP (the reference's HIPT_LGP_FC and Attn_Net_Gated),
written after the official code, for parity tests. Importable without pytest.

Module and parameter names follow the reference so its state dicts load unchanged:
local_vit.*, global_phi.0.*, global_transformer.layers.{i}.*, global_attn_pool.attention_{a,b}.0.*,
global_attn_pool.attention_c.*, global_rho.0.*, classifier.*.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference_torch import build_reference


class Attn_Net_Gated(nn.Module):  # noqa: N801 (reference name)
    def __init__(self, L=192, D=192, dropout=True, n_classes=1):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), *([nn.Dropout(0.25)] if dropout else []))
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), *([nn.Dropout(0.25)] if dropout else []))
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        a = self.attention_a(x)
        b = self.attention_b(x)
        return self.attention_c(a.mul(b)), x  # [M,1], [M,D]


class HIPT_LGP_FC(nn.Module):  # noqa: N801 (reference name)
    """local ViT-4K -> phi -> 2 post-norm encoder layers -> gated attention pool -> rho -> classifier."""

    def __init__(self, n_classes=4, local_arch="vit4k", dropout=0.25):
        super().__init__()
        self.local_vit = build_reference(local_arch)
        self.global_phi = nn.Sequential(nn.Linear(192, 192), nn.ReLU(), nn.Dropout(dropout))
        self.global_transformer = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model=192, nhead=3, dim_feedforward=192, dropout=dropout,
                                       activation="relu"),
            num_layers=2,
        )
        self.global_attn_pool = Attn_Net_Gated(L=192, D=192, dropout=True, n_classes=1)
        self.global_rho = nn.Sequential(nn.Linear(192, 192), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(192, n_classes)

    def forward(self, x_256):
        """x_256 [M,256,384] -> (logits [1,n_classes], probs, Y_hat, attention [1,M])."""
        # [M,256,384] -> [M,16,384,16] -> [M,384,16,16]: the reference's unfold/transpose.
        h_4096 = self.local_vit(x_256.unfold(1, 16, 16).transpose(1, 2))
        h_4096 = self.global_phi(h_4096)
        h_4096 = self.global_transformer(h_4096.unsqueeze(1)).squeeze(1)  # seq M, batch 1
        A_4096, h_4096 = self.global_attn_pool(h_4096)
        A_4096 = F.softmax(torch.transpose(A_4096, 1, 0), dim=1)  # [1,M]
        h_path = torch.mm(A_4096, h_4096)
        h_wsi = self.global_rho(h_path)
        logits = self.classifier(h_wsi)
        return logits, F.softmax(logits, dim=1), torch.topk(logits, 1, dim=1)[1], A_4096


def random_lgp(n_classes=4, local_arch="vit4k_tiny", seed=0) -> HIPT_LGP_FC:
    """Eval-mode HIPT_LGP_FC with non-trivial random weights (LayerNorms and biases too)."""
    g = torch.Generator().manual_seed(seed)
    model = HIPT_LGP_FC(n_classes, local_arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("pos_embed", "cls_token")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                scale = 1.0 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.05
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()
