"""``python -m hipt_jax.pretrain ...`` is ``hipt-pretrain ...`` (hipt_jax/cli/pretrain.py)."""
from hipt_jax.cli.pretrain import main

if __name__ == "__main__":
    main()
