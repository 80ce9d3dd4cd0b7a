"""DINO's training pieces in PyTorch (facebookresearch/dino main_dino.py + utils.py, as HIPT
used them), the parity oracle for hipt_jax.pretrain and the torch side of bench_pretrain.py.

Kept in DINO's own code shape: DINOHead (weight-normalized last layer, g frozen at 1),
MultiCropWrapper (backbone once per resolution), DINOLoss (teacher-temp schedule, center),
cosine_scheduler, clip_gradients, cancel_gradients_last_layer, get_params_groups, and
``train_step``, one iteration of DINO's train_one_epoch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone once per run of same-resolution crops, then the head on all CLS features."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, None
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            output = _out if output is None else torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def clip_gradients(model, clip):
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def train_step(student, teacher, dino_loss, optimizer, images, it, epoch, lr_schedule, wd_schedule,
               momentum_schedule, clip_grad=3.0, freeze_last_layer=1):
    """One iteration of DINO's train_one_epoch (fp32, single process). images: list of crops."""
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr_schedule[it]
        if i == 0:
            param_group["weight_decay"] = wd_schedule[it]
    teacher_output = teacher(images[:2])
    student_output = student(images)
    loss = dino_loss(student_output, teacher_output, epoch)
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        clip_gradients(student, clip_grad)
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    with torch.no_grad():
        m = momentum_schedule[it]
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    return loss.item()


def head_state_to_jax(head: DINOHead) -> dict:
    """A torch DINOHead's weights as our head tree (mlp_{0,2,4}, last_layer/weight_v)."""
    sd = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    tree = {f"mlp_{i}": {"kernel": sd[f"mlp.{i}.weight"].T.copy(), "bias": sd[f"mlp.{i}.bias"]}
            for i in (0, 2, 4)}
    tree["last_layer"] = {"weight_v": sd["last_layer.weight_v"].T.copy()}
    return tree


def student_to_jax(student: MultiCropWrapper) -> dict:
    """A torch student's weights as our student tree {"vit": ..., "head": ...}."""
    from hipt_jax.models import torch_io

    sd = {k: v.detach().numpy() for k, v in student.state_dict().items()}
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {"vit": torch_io.reference_to_variables(backbone)["params"], "head": head_state_to_jax(student.head)}


def tiny_run_schedules(config, lr_warmup_epochs: int) -> tuple:
    """DINO's lr / weight-decay / teacher-momentum schedules of a 4-epoch run with one
    iteration per epoch, for a pretraining config (peak lr scaled by batch / 256)."""
    peak = config.optim.lr * config.global_batch / 256
    return (cosine_scheduler(peak, config.optim.min_lr, 4, 1, lr_warmup_epochs),
            cosine_scheduler(0.04, 0.4, 4, 1), cosine_scheduler(0.996, 1.0, 4, 1))
