"""Weakly supervised slide models (HIPT-LGP): subtyping and survival training with k-fold CV."""
