"""The CPU kernels' GEMM engine (csrc/cpu/gemm.h).

On a CPU the fused kernels multiply float32 through oneDNN (carried by torch) where that is faster
than torch's BLAS, and through ``torch.mm``'s BLAS otherwise: MKL selects its kernels by CPU
vendor and runs AVX2 code on AMD CPUs that have AVX-512, where oneDNN's JIT-compiled GEMMs run
about twice as fast. Under ``"auto"`` (the default) the first float32 GEMM of the process times
both engines on one product and keeps oneDNN only if it is at least 10% faster. float64, small
products (under 128^3 multiply-adds) and operands oneDNN would copy always take ``torch.mm``'s
BLAS. ``IDID_KERNELS_CPU_GEMM=auto|aten|onednn`` in the environment sets the engine at start-up.
Both accumulate in float32; results differ by float32 rounding, as between two BLAS builds.
"""
from __future__ import annotations

from ._backends import extension as _ext

ENGINES = ("auto", "aten", "onednn")  # in the order of csrc/cpu/gemm.h's GemmEngine


def cpu_gemm(engine: str | None = None) -> str:
    """The engine the CPU kernels' float32 GEMMs take, ``"onednn"`` or ``"aten"`` (torch.mm's BLAS);
    ``engine`` (``"auto"``, ``"aten"`` or ``"onednn"``) sets it first. ``"onednn"`` raises
    RuntimeError where torch has no oneDNN matmul. Without the extension: ``"aten"``, and setting
    anything raises RuntimeError."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    ext = _ext()
    if ext is None:
        if engine is not None:
            raise RuntimeError("cpu_gemm: the C++ extension is not built")
        return "aten"
    return str(ext.cpu_gemm() if engine is None else ext.cpu_gemm(ENGINES.index(engine)))


def onednn_available() -> bool:
    """Whether torch's oneDNN float32 matmul is reachable from the extension."""
    ext = _ext()
    return False if ext is None else bool(ext.onednn_available())
