"""The machine a benchmark figure was taken on, printed with every figure: CPU model, cores,
cache sizes (hipt_jax.models.minibatch.cpu_info, from sysfs), XLA_FLAGS and LD_PRELOAD (set
when torch's MKL is steered onto its AVX-512 path, ``mkl_avx512_shim.c``)."""
from __future__ import annotations

import os


def machine_tag() -> str:
    from hipt_jax.models.minibatch import cpu_info

    info = cpu_info()
    mib = lambda b: f"{b / 2**20:g} MiB"  # noqa: E731
    preload = os.environ.get("LD_PRELOAD", "")
    return (f"[{info['model']}, {info['cores']} cores, L2 {mib(info['l2'])}, L3 {mib(info['l3'])}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
            f"{f', LD_PRELOAD={preload!r}' if preload else ''}]")


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``vendor_id`` of the first CPU ("GenuineIntel", "AuthenticAMD", ...), "" if unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the first CPU's flags include avx512f."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def torch_blas_note(vendor: str = "", mkl: bool | None = None, preload: str | None = None,
                    avx512: bool | None = None) -> str:
    """A warning line when torch's GEMMs run below the machine's peak for a reason outside both
    codebases: MKL (torch's CPU BLAS) takes its AVX2 path on non-Intel CPUs that have AVX-512.
    "" otherwise (on an AVX2-only CPU, AVX2 is the best path there is: nothing is held back)."""
    vendor = vendor or cpu_vendor()
    avx512 = cpu_has_avx512() if avx512 is None else avx512
    if not avx512:
        return ""
    if mkl is None:
        import torch
        mkl = torch.backends.mkl.is_available()
    preload = os.environ.get("LD_PRELOAD", "") if preload is None else preload
    if not mkl or vendor in ("GenuineIntel", "") or "mkl" in preload.lower():
        return ""
    return (f"note: torch's GEMMs are Intel MKL's, which runs its AVX2 kernels on this {vendor} CPU: "
            "torch's matmul peak and steps here are below what the same torch reaches on an "
            "Intel AVX-512 server. For torch on MKL's AVX-512 path, rerun with the preload shim "
            "in benchmarks/mkl_avx512_shim.c (BENCHMARKS.md, section \"torch on MKL's AVX-512 path\").")
