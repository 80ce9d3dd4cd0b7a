"""DINO self-supervised pretraining of HIPT's two trainable scales.

Stage 1 trains ViT-256 on 256 px image patches (multi-crop of images); stage 2 trains ViT-4K
on [16,16,384] grids of ViT-256 features (multi-crop of feature grids). Both stages share one
recipe (DINO as HIPT ran it) and one trainer: ``hipt_jax.pretrain.trainer.train(config, workdir)``.

Modules, in reading order: head (DINO head + multi-crop model), loss, schedules, optimizer,
augment (crops), data (sources + Grain pipeline), trainer; the command line is
hipt_jax/cli/pretrain.py.
"""
