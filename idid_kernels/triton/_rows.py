"""Launch settings and row-wise kernels shared by the Triton ops of cm_margin_loss,
pairwise_cosine and norm_contraction.

Precision. Statistics, norms and every reduction accumulate in float32 (float64 for float64
inputs). GEMM tiles are multiplied in the input dtype with a float32 (float64) accumulator; float32
operands use exact products (``tl.dot(..., input_precision="ieee")``), so float32 results meet
ARCHITECTURE.md's tolerances. Setting the environment variable ``IDID_KERNELS_TRITON_TF32=1``
switches the float32 dots to TF32 (faster on Ampere/Hopper tensor cores, ~1e-3 relative error in
the cosines, outside the float32 contract); it is read at every call.

Interpreter. Under ``TRITON_INTERPRET=1`` (CPU tensors, tests without a GPU) every autotuned kernel
gets a single small config, and bfloat16 dot operands are widened to float32 before ``tl.dot``
because the interpreter multiplies bfloat16 tiles as raw integers (it stores them as uint16;
triton-lang/triton#11584). The widening is exact (a product of two bfloat16 values fits in
float32), so it changes no result beyond summation order. No other arithmetic happens in a half
dtype: every load is converted to the accumulation dtype first.

Row kernels.
- :func:`row_norms`: r_n = ||x_n|| in the accumulation dtype.
- :func:`project_rows`: the backward of u = x / max(||x||, eps) plus an optional radial term,
  dx_n = (B_n - <B_n, u_n> u_n [r_n > eps]) / max(r_n, eps) + rho_n x_n / r_n  (0 where r_n = 0),
  given B_n = dL/du_n accumulated in float32 by a GEMM kernel. ``F.normalize`` drops the radial
  projection below the floor; the rho term is d||x||/dx = x / ||x|| with autograd's 0 at x = 0.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .._autograd import no_double_backward  # noqa: F401  (re-exported: one refusal for every backend)

# F.normalize's floor on the norm: u = x / max(||x||, NORM_EPS).
NORM_EPS = 1e-12
TF32_ENV = "IDID_KERNELS_TRITON_TF32"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


def interpreted() -> bool:
    """Whether kernels run in Triton's interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_dtype(op: str, **tensors: torch.Tensor) -> None:
    """A clear TypeError for a dtype the kernels have no path for (before any launch)."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op} (triton backend): {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def dot_dtype(dtype: torch.dtype):
    """The dtype tiles are multiplied in: the input's, except bfloat16 in the interpreter."""
    if dtype == torch.bfloat16 and interpreted():
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: "ieee" unless float32 inputs and IDID_KERNELS_TRITON_TF32=1."""
    if dtype == torch.float32 and os.environ.get(TF32_ENV, "0") == "1":
        return "tf32"
    return "ieee"


def configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotune configs: ``gpu`` as (meta, num_warps, num_stages) dicts, or the one interpreter config."""
    if interpreted():
        return [triton.Config(dict(interpreter), num_warps=1, num_stages=1)]
    out = []
    for cfg in gpu:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        out.append(triton.Config(cfg, num_warps=warps, num_stages=stages))
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy (host-side query only, no sync)."""
    if device.type != "cuda":
        return 4  # the interpreter: enough to exercise the multi-program paths in tests
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def scalars(like: torch.Tensor, *values: float) -> torch.Tensor:
    """``values`` as a (len,) tensor of the accumulation dtype on ``like``'s device.

    Kernels read scalars from here rather than as float arguments, which Triton passes as float32
    (rounding them for float64 inputs). Each element is set by a fill on the device: no host-to-device
    copy, so the call can be captured in a CUDA graph."""
    out = torch.empty(len(values), dtype=acc_dtype(like.dtype), device=like.device)
    for i, v in enumerate(values):
        out[i] = float(v)
    return out


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def row_block(d: int, limit: int = 256) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the memory-bound row kernels: d tiles of up to ``limit`` columns."""
    if interpreted():
        return 16, 16
    block_d = min(triton.next_power_of_2(max(d, 16)), limit)
    return max(1, 4096 // block_d), block_d


@triton.jit
def dot_operand(t, IN_DT: tl.constexpr, DOT_DT: tl.constexpr):
    """``t`` rounded to the input dtype, as tl.dot takes it (see the module docstring)."""
    return t.to(IN_DT).to(DOT_DT)


@triton.jit
def _row_norms_kernel(x_ptr, norm_ptr, N, D, stride_n, stride_d,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_n
    sq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(base + cols[None, :] * stride_d, mask=rmask[:, None] & (cols[None, :] < D), other=0.0).to(ACC)
        sq += v * v
    tl.store(norm_ptr + rows, tl.sqrt(tl.sum(sq, 1)), mask=rmask)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_n||, shape (N,), in the accumulation dtype."""
    n, d = x.shape
    out = torch.empty(n, dtype=acc_dtype(x.dtype), device=x.device)
    block_n, block_d = row_block(d)
    with on_device(x):
        _row_norms_kernel[(triton.cdiv(n, block_n),)](x, out, n, d, x.stride(0), x.stride(1), BLOCK_N=block_n,
                                                      BLOCK_D=block_d, ACC=tl_acc(x.dtype))
    return out


@triton.jit
def _project_rows_kernel(b_ptr, x_ptr, norm_ptr, radial_ptr, out_ptr, N, D, stride_xn, stride_xd,
                         HAS_RADIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    r = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    eps = tl.full([BLOCK_N], 1e-12, ACC)  # an ACC constant: a float literal would be rounded to float32
    inv = 1.0 / tl.maximum(r, eps)
    # pass 1: <B_n, x_n>
    bx = tl.zeros([BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        b = tl.load(b_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0)
        x = tl.load(x_ptr + r64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0).to(ACC)
        bx += tl.sum(b * x, 1)
    # <B, u> u / max(r, eps) = <B, x> x inv^3 (above the floor only)
    proj = tl.where(r > eps, bx * inv * inv, 0.0)
    rho = tl.zeros([BLOCK_N], ACC)
    if HAS_RADIAL:
        rad = tl.load(radial_ptr + rows, mask=rmask, other=0.0)
        rho = tl.where(r > 0, rad / tl.where(r > 0, r, 1.0), 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        b = tl.load(b_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0)
        x = tl.load(x_ptr + r64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0).to(ACC)
        out = (b - proj[:, None] * x) * inv[:, None] + rho[:, None] * x
        tl.store(out_ptr + r64[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


def project_rows(b: torch.Tensor, x: torch.Tensor, norm: torch.Tensor,
                 radial: torch.Tensor | None = None) -> torch.Tensor:
    """dx from B = dL/du (contiguous, accumulation dtype) and an optional radial dL/d||x|| (N,).

    Returns a contiguous tensor of x's shape and dtype (formula in the module docstring)."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    block_n, block_d = row_block(d, limit=128)
    with on_device(x):
        _project_rows_kernel[(triton.cdiv(n, block_n),)](
            b, x, norm, radial if radial is not None else norm, out, n, d, x.stride(0), x.stride(1),
            HAS_RADIAL=radial is not None, BLOCK_N=block_n, BLOCK_D=block_d, ACC=tl_acc(x.dtype))
    return out
