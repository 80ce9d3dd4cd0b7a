"""`python -m data_prep` moved: the `hipt-prep` command is `python -m hipt_jax.cli.prep`.

(data_prep imports nothing from hipt_jax, and `hipt-prep features` runs a model, so the command
lives with the other commands in hipt_jax/cli/.)
"""
import sys

if __name__ == "__main__":
    print("python -m data_prep is now `hipt-prep` or `python -m hipt_jax.cli.prep` "
          "(same subcommands and flags)", file=sys.stderr)
    sys.exit(2)
