"""Fields shared by both pretraining configs; every one is overridable from the command line
(``--config.optim.lr=1e-4``). Defaults are the paper's recipe (DINO as HIPT ran both stages)."""
from __future__ import annotations

import ml_collections

from configs.config_args import parse_config_arg

from hipt_jax.models.archs import get_arch


def base_config(stage: int, arg: str = "") -> ml_collections.ConfigDict:
    flags = parse_config_arg(arg, {"runlocal", "bf16"})
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    # Architecture (a models.archs arch dict: stored beside the exported backbone).
    c.model = get_arch("vit256" if stage == 1 else "vit4k")
    c.head = ml_collections.ConfigDict(dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256))
    c.drop_path_rate = 0.1                       # student only
    # The head reads only the CLS token, so the last block skips the others' attention output
    # and MLP (same values and gradients, ~13% fewer FLOPs); False: every token, as DINO.
    c.last_block_cls_only = True
    # auto: bfloat16 on GPU/TPU, float32 on CPU (params and optimizer state float32 always).
    c.compute_dtype = "bfloat16" if "bf16" in flags else "auto"

    # Iterations: stage 1 ran 400K at batch 256, stage 2 200K at batch 256.
    c.global_batch = 256
    c.total_steps = 400_000 if stage == 1 else 200_000
    c.stop_at_step = -1                          # stop early (schedules still use total_steps)
    # Sequential chunks of the batch inside one update (gradients averaged: same math). On CPU
    # small chunks stay in cache; on accelerators they bound activation memory. -1 = auto:
    # about 4 samples per device per chunk on CPU, the whole batch on GPU/TPU. Otherwise a
    # count; global_batch / microbatches must then be a multiple of the devices.
    c.microbatches = -1

    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-4,                  # peak lr = lr * global_batch / 256
        min_lr=1e-6,
        warmup_steps=40_000 if stage == 1 else 20_000,
        weight_decay=0.04, weight_decay_end=0.4,  # cosine, tensors with ndim > 1 only
        clip_grad=3.0, global_norm=False,         # per-tensor clipping like DINO
        freeze_last_layer_epochs=1,
        b1=0.9, b2=0.999, eps=1e-8,
    ))
    c.teacher = ml_collections.ConfigDict(dict(
        # Temperature warm-up counts EPOCHS (stepped once per epoch, as DINO does).
        momentum=0.996, temp=0.04, warmup_temp=0.04, warmup_temp_epochs=0))
    c.student_temp = 0.1
    c.center_momentum = 0.9

    c.crops = ml_collections.ConfigDict(dict(
        global_size=224 if stage == 1 else 14, local_size=96 if stage == 1 else 6, n_local=8,
        global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)))  # scales: stage 1 only
    c.data = ml_collections.ConfigDict(dict(
        kind="png_folder" if stage == 1 else "feature_folder",
        path="",
        # Stage 1 normalization: "imagenet" (what the official stage-1 training used) or "half"
        # (0.5/0.5, what the official HIPT_4K inference uses). See README "Recipe fidelity".
        norm="imagenet",
        grid=(16, 16), in_features=384,   # stage 2 record layout
        num_workers=4, read_threads=2, prefetch=8,
        samples_per_epoch=-1,     # -1: the source's length (defines "epoch" for the freeze)
    ))

    # Devices and hosts.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.sharding_rules = (("batch", ("data", "fsdp")), ("params", "fsdp"))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=-1, process_id=-1))  # empty: env / auto-detect

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2000, keep=3, use_async=True))
    c.log_every = 50
    c.export_dir = ""             # default WORKDIR/export
    c.warm_start = ""             # converted checkpoint dir (backbone + DINO head) to start from

    # KNN monitor (hipt_jax/pretrain/knn_monitor.py): DINO's weighted KNN on the current teacher
    # every `every_steps` steps (0 = off). Stage 1: path = labelled tile folder/CSV; stage 2:
    # path = feature shards + labels = CSV slide_id,label. keep_best: WORKDIR/export_best too.
    c.eval = ml_collections.ConfigDict(dict(knn=ml_collections.ConfigDict(dict(
        path="", labels="", every_steps=0, size=224, k=20, temperature=0.07, test_fraction=0.3,
        batch_per_device=32, keep_best=False))))

    if "runlocal" in flags:
        c.model = get_arch("vit256_tiny" if stage == 1 else "vit4k_tiny")
        c.head.update(out_dim=512, hidden_dim=64, bottleneck_dim=32)
        c.global_batch = 4
        c.total_steps = 6
        c.optim.warmup_steps = 2
        if stage == 1:
            c.crops.update(global_size=64, local_size=32, n_local=2)
        else:
            c.crops.update(n_local=2)
        c.data.num_workers = 0
        # One step per "epoch": the first-epoch last-layer freeze is then step 0 only, a short
        # first epoch as the paper's recipe intends, not the whole small dataset (which froze
        # the last layer for 19 of 20 steps of a runlocal run on 80 patches).
        c.data.samples_per_epoch = c.global_batch
        c.checkpoint.every_steps = 3
        c.log_every = 1
        c.eval.knn.update(size=64, batch_per_device=8)
    return c
