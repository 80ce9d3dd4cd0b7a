"""Compute precision: the one place a dtype name ("auto", "float32", "bfloat16") becomes a dtype.

``auto`` picks what fits the device: bfloat16 matmuls on GPU and TPU (tensor cores / MXU run
bf16 at several times the fp32 rate), float32 on CPU (XLA:CPU has no fast bf16 matmul, and
bf16 there only adds casts). An explicit name always wins.

Whatever the compute dtype, the models keep their parameters in float32 (Flax's
``param_dtype`` default; so the optimizer state, which follows the parameters, is float32 too),
and the numerically delicate parts run in float32: attention softmax, the LayerNorm
statistics, and every loss (the model outputs are cast to float32 before the loss).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtype(name: Any = "auto", backend: Optional[str] = None):
    """``name`` ("auto", "float32", "bfloat16", or a dtype) -> jnp.float32 or jnp.bfloat16.

    ``backend`` is the JAX platform name ("cpu", "gpu", "tpu"); default: ``jax.default_backend()``
    (only looked up for "auto", so an explicit dtype never initializes a backend)."""
    if not isinstance(name, str):
        dtype = jnp.dtype(name)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"compute dtype {dtype.name}: expected one of {', '.join(COMPUTE_DTYPES)}")
        return jnp.float32 if dtype == jnp.float32 else jnp.bfloat16
    if name == "float32":
        return jnp.float32
    if name == "bfloat16":
        return jnp.bfloat16
    if name != "auto":
        raise ValueError(f"compute dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    backend = (backend or jax.default_backend()).lower()
    return jnp.bfloat16 if backend in ACCELERATOR_BACKENDS else jnp.float32


def dtype_name(name: Any = "auto", backend: Optional[str] = None) -> str:
    """The resolved dtype's name ("float32" / "bfloat16"): what manifests and fingerprints record."""
    return jnp.dtype(resolve_dtype(name, backend)).name
