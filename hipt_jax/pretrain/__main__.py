"""``python -m hipt_jax.pretrain --config configs/pretrain_vit256.py:runlocal --workdir DIR``."""
from hipt_jax.pretrain.main import main

if __name__ == "__main__":
    main()
