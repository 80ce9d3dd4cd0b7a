"""Fields shared by the two HIPT-LGP configs; every one is overridable from the
command line (``--config.optim.lr=1e-4``). Defaults are the paper's recipe."""
from __future__ import annotations

import ml_collections

from configs.config_args import parse_config_arg


def base_config(task: str, arg: str = "") -> ml_collections.ConfigDict:
    flags = parse_config_arg(arg, {"runlocal"})
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        embeddings="",            # hipt-extract output folder (slides/<id>.npz)
        labels="",                # CSV: slide_id,label | slide_id,case_id,survival_months,censorship
        splits="kfold:10" if task == "subtyping" else "kfold:5",  # or a folder of splits_{i}.csv
        label_column="label",     # CSV column of the class (e.g. oncotree_code)
        classes="",               # "IDC,ILC": keep and order these classes ("" = all)
        label_frac=1.0,           # per-class patient-level fraction of each training part
        allow_leaky_splits=False,  # accept split files with a patient in two parts (warned, recorded)
    ))
    c.model = ml_collections.ConfigDict(dict(
        name="hipt_lgp",          # hipt_lgp | abmil | clam_sb | mean_pool (hipt_jax.models.mil)
        bag="region",             # baselines: region ([M,192] features_cls4k) | patch ([M*256,384])
        embed=512,                # abmil / clam_sb: width of the instance embedding
        attn_hidden=256,          # abmil / clam_sb: width of the gated attention
        k_sample=8,               # clam_sb: instances per side of the instance loss
        bag_weight=0.7,           # clam_sb: bag loss weight (1 - it: instance loss)
        local_arch="vit4k",       # the ViT-4K inside the LGP
        pretrained_vit4k="",      # ViT-4K checkpoint (Orbax dir or .pth); "" = random init
        pretrained_global="",     # stage-3 ViT-WSI export: starts global_phi + the global layers
        # The reference's freeze_4k, whose default (class and command line) is off: the ViT-4K
        # is fine-tuned. Its README runs both ways; True precomputes the ViT-4K once (faster).
        freeze_local=False,
        dropout=0.25,
        n_classes=-1,             # -1: number of classes in the labels (4 time bins for survival)
    ))
    c.compute_dtype = "auto"       # HIPT-LGP matmuls: auto = bfloat16 on GPU/TPU, float32 on CPU
    c.optim = ml_collections.ConfigDict(dict(lr=2e-4, weight_decay=1e-5, epochs=20))
    c.train = ml_collections.ConfigDict(dict(
        balanced_sampling=task == "subtyping",
        accumulate_steps=1 if task == "subtyping" else 32,   # MCAT's gc: 32 patients per step
        alpha_surv=0.0,           # survival NLL weight on uncensored patients (see finetune/survival.py)
        n_bins=4,
        buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    ))
    c.selection = ml_collections.ConfigDict(dict(
        metric="loss",            # on the fold's val part: loss (lowest) or auc/balanced_acc/c_index (highest)
        evaluate="best",          # model evaluated on test when the fold has val: best | final
        early_stopping=False,     # CLAM's rule: stop after `patience` epochs without improvement...
        patience=20,
        min_epochs=50,            # ...but only at an epoch index (0-based) above this
    ))
    if "runlocal" in flags:       # CPU-seconds: tiny ViT-4K, few epochs, 3 folds
        c.model.local_arch = "vit4k_tiny"
        c.model.freeze_local = True   # ViT-4K computed once per slide: CPU seconds
        c.optim.epochs = 3
        c.data.splits = "kfold:3"
        c.train.accumulate_steps = min(c.train.accumulate_steps, 4)
    return c
