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

Autotuning. ``IDID_KERNELS_TRITON_MAX_CONFIGS=N`` keeps only the first N GPU configs of every
autotuned kernel (N = 1: no tuning at all), for a quick validation run on a new GPU. It is read when
the kernel modules are imported (the config lists are built then), so set it before the first
``import idid_kernels.triton.<op>``; a value that is not a positive integer is a ValueError.

Row kernels and helpers.
- :func:`row_norms`: r_n = ||x_n|| in the accumulation dtype, with BLAS nrm2 semantics: the squares
  never overflow or underflow (:func:`nrm2_step`, one pass with an online rescale), a zero row gives
  0, a NaN anywhere in the row gives NaN, an infinite element (and no NaN) gives inf.
- :func:`scaled_rows`: the GEMM operand x_n 2^k_n with 2^k_n an exact power of two close to
  1 / ||x_n|| (frexp of the norm, from its exponent bits), and the matching norm floor
  max(r_n, eps) 2^k_n. A kernel that takes the pair in place of (x, r) computes <x_n 2^k_n, w> / (max(r_n, eps) 2^k_n), which is
  <x_n, w> / max(r_n, eps) with every product and partial sum O(||w||): no overflow when both rows
  are huge (two rows of norm 1e20 have a dot of 1e40, above float32's max), no underflow when both
  are tiny. The scaling is exact (a power of two, clamped inside the normal range), so the rounding
  of bf16 and float32 operands is unchanged; float16 rows (|x| <= 65504) need none and are passed
  through.
- :func:`project_rows`: the backward of u = x / max(||x||, eps) plus an optional radial term,
  dx_n = (B_n - <B_n, u_n> u_n [r_n > eps]) / max(r_n, eps) + rho_n u_n  with u_n = x_n / r_n
  (0 where r_n = 0), given B_n = dL/du_n accumulated in float32 by a GEMM kernel and rho_n =
  dL/d||x_n||. ``F.normalize`` drops the radial projection below the floor; d||x||/dx = u with
  autograd's 0 at x = 0. Written with u (|u| <= 1) rather than x / r^2 or <B, x> x / r^3, which
  overflow or underflow for rows of norm 1e20 or 1e-21.

NaN. The norm floor max(r, eps) is written ``tl.where(r < eps, eps, r)``: ``tl.maximum`` drops a NaN
(it lowers to maxnum), which would turn a NaN row into finite garbage; NaN must flow where the
reference's does.
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct

import torch
import triton
import triton.language as tl

from .._autograd import no_double_backward  # noqa: F401  (re-exported: one refusal for every backend)

# F.normalize's floor on the norm: u = x / max(||x||, NORM_EPS).
NORM_EPS = 1e-12
TF32_ENV = "IDID_KERNELS_TRITON_TF32"
MAX_CONFIGS_ENV = "IDID_KERNELS_TRITON_MAX_CONFIGS"

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


def max_configs() -> int | None:
    """The value of ``IDID_KERNELS_TRITON_MAX_CONFIGS`` (a positive int), or None when unset or empty.

    With it set to N, every autotuned kernel keeps only the first N of its GPU configs
    (:func:`trim_configs`): a quick validation run tunes over fewer candidates, or over none with N = 1.
    The config lists are built when the kernel modules are imported, so the variable must be set
    before ``idid_kernels.triton.*`` is first imported; changing it later has no effect."""
    raw = os.environ.get(MAX_CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_CONFIGS_ENV} must be a positive integer (the number of autotune configs to keep "
                         f"per Triton kernel), got {raw!r}")
    return value


def trim_configs(gpu: list) -> list:
    """The first :func:`max_configs` entries of a kernel's GPU config list (all of them when unset)."""
    limit = max_configs()
    return list(gpu) if limit is None else list(gpu)[:limit]


def configs(gpu: list[dict] | dict, interpreter: dict) -> list[triton.Config]:
    """Autotune configs: ``gpu`` as (meta, num_warps, num_stages) dicts, or the one interpreter config;
    each list trimmed by ``IDID_KERNELS_TRITON_MAX_CONFIGS`` (:func:`max_configs`).

    ``gpu`` may also map input dtypes (a torch dtype, or a tuple of them) to such lists: the configs
    are then tagged with their dtypes (:func:`per_dtype`), and a kernel autotuned with
    ``prune_configs_by=by_dtype(arg)`` tunes each dtype over its own list."""
    if interpreted():
        return [triton.Config(dict(interpreter), num_warps=1, num_stages=1)]

    def make(cfg):
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        return triton.Config(cfg, num_warps=warps, num_stages=stages)

    if isinstance(gpu, dict):
        return per_dtype({dtypes: [make(c) for c in trim_configs(cfgs)] for dtypes, cfgs in gpu.items()})
    return [make(c) for c in trim_configs(gpu)]


def per_dtype(lists: dict) -> list[triton.Config]:
    """One list of the configs of ``lists`` ({dtype or tuple of dtypes: [triton.Config]}), each tagged
    with the set ``dtypes`` it is for (a config listed for several dtypes appears once).

    Why per dtype: registers, not shared memory, bound these tiles. A float32 tile multiplied with
    exact products (``input_precision="ieee"``, FMA, no tensor cores) or a float64 tile (two
    registers per element) spills at sizes a bf16/fp16 tile on the tensor cores holds easily, so
    one list either spills for float32/float64 or gives up bf16's large tiles."""
    merged: dict = {}
    for key, cfgs in lists.items():
        dtypes = key if isinstance(key, tuple) else (key,)
        for cfg in cfgs:
            ident = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages, getattr(cfg, "num_ctas", 1),
                     getattr(cfg, "maxnreg", None))
            if ident in merged:
                merged[ident].dtypes |= set(dtypes)
            else:
                cfg.dtypes = set(dtypes)
                merged[ident] = cfg
    return list(merged.values())


def by_dtype(arg: str) -> dict:
    """``prune_configs_by`` for triton.autotune: keep the configs tagged (:func:`per_dtype`) with the
    dtype of the tensor argument ``arg``, or all of them when none is (an untagged list, or a dtype
    with no list). The autotuner's cache key holds the dtype of every tensor argument besides the
    ``key`` arguments, so each dtype is tuned, and remembered, separately."""
    def prune(configs, named_args, **kwargs):
        dtype = getattr(named_args.get(arg), "dtype", None)
        mine = [c for c in configs if dtype in getattr(c, "dtypes", ())]
        return mine or list(configs)
    return {"early_config_prune": prune}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy (host-side query only, no sync)."""
    if device.type != "cuda":
        return 4  # the interpreter: enough to exercise the multi-program paths in tests
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def f64_bits(value: float) -> int:
    """The IEEE-754 bit pattern of ``value`` as a float64, as a signed 64-bit Python int.

    Kernel scalars travel this way, not as float arguments: Triton passes a Python float as a float32
    (rounding it for float64 inputs, and to inf above float32's range). A kernel rebuilds the value
    with :func:`f64_value`: exact in float64, and rounded once (correctly, to inf or 0 at the ends of
    the range) in float32, as a float32 tensor holding the value would be.
    Mark such arguments ``do_not_specialize`` so that a value that happens to be 1 or a multiple of
    16 does not compile another kernel. A plain launch argument: no allocation, no host-to-device
    copy and no fill on the device, so calls can be captured in a CUDA graph."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def f64_value(bits, ACC: tl.constexpr):
    """The float a :func:`f64_bits` argument holds, in the accumulation dtype."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def row_block(d: int, limit: int = 256, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the memory-bound row kernels: d tiles of up to ``limit`` columns, 4096
    elements a tile (1024 for float64, whose 4096-element tiles spill registers on sm_90 once the
    norm's rescaling temporaries are live: 520-732 B per thread)."""
    if interpreted():
        return 16, 16
    block_d = min(triton.next_power_of_2(max(d, 16)), limit)
    elements = 1024 if dtype == torch.float64 else 4096
    return max(1, elements // block_d), block_d


@triton.jit
def dot_operand(t, IN_DT: tl.constexpr, DOT_DT: tl.constexpr):
    """``t`` rounded to the input dtype, as tl.dot takes it (see the module docstring)."""
    return t.to(IN_DT).to(DOT_DT)


@triton.jit
def log1p(v):
    """log(1 + v) for v >= 0 to a few ulps, as log(w) v / (w - 1) with w = 1 + v (v where w rounds
    to 1); written out because Triton's interpreter has no libdevice log1p."""
    w = 1.0 + v
    tiny = w == 1.0
    return tl.where(tiny, v, tl.log(w) * v / tl.where(tiny, 1.0, w - 1.0))


@triton.jit
def nrm2_step(scale, ssq, v):
    """One (BLOCK_N, BLOCK_D) tile of the overflow-free norm (BLAS nrm2 with an online rescale).

    ``scale`` (BLOCK_N,): max |x| over the tiles so far; ``ssq`` (BLOCK_N, BLOCK_D): per lane the sum
    of (x / scale)^2, so that ||x|| = scale sqrt(sum(ssq)) (:func:`nrm2_finish`). When a tile raises
    the scale, the lanes so far are rescaled by (old / new)^2. Each quotient is 1 where the operands
    are equal, which keeps a zero scale (0 / 0) and an infinite one (inf / inf) out of NaN: a zero
    row ends with scale 0 (norm 0 whatever ssq holds, and a later scale rescales it by 0), an
    infinite element gives scale inf and ssq >= 1. A NaN element is dropped by the max (maxnum)
    but makes its quotient NaN, so the norm is NaN."""
    a = tl.abs(v)
    new = tl.maximum(scale, tl.max(a, 1))
    den = tl.where(new == 0.0, 1.0, new)  # (the where above covers 0 / 0; this keeps it unevaluated)
    ratio = tl.where(new == scale, 1.0, scale / den)
    q = tl.where(a == new[:, None], 1.0, a / den[:, None])
    return new, ssq * (ratio * ratio)[:, None] + q * q


@triton.jit
def nrm2_finish(scale, ssq):
    """||x|| from the state of :func:`nrm2_step`."""
    return scale * tl.sqrt(tl.sum(ssq, 1))


@triton.jit
def _row_norms_kernel(x_ptr, norm_ptr, N, D, stride_n, stride_d,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_n
    scale = tl.zeros([BLOCK_N], ACC)
    ssq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(base + cols[None, :] * stride_d, mask=rmask[:, None] & (cols[None, :] < D), other=0.0).to(ACC)
        scale, ssq = nrm2_step(scale, ssq, v)
    tl.store(norm_ptr + rows, nrm2_finish(scale, ssq), mask=rmask)


def row_norms(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """||x_n||, shape (N,), in the accumulation dtype (nrm2 semantics, see the module docstring);
    written into ``out`` (a contiguous (N,) tensor) when given."""
    n, d = x.shape
    if out is None:
        out = torch.empty(n, dtype=acc_dtype(x.dtype), device=x.device)
    block_n, block_d = row_block(d, dtype=x.dtype)
    with on_device(x):
        _row_norms_kernel[(triton.cdiv(n, block_n),)](x, out, n, d, x.stride(0), x.stride(1), BLOCK_N=block_n,
                                                      BLOCK_D=block_d, ACC=tl_acc(x.dtype))
    return out


@triton.jit
def _scale_rows_kernel(x_ptr, norm_ptr, out_ptr, out_norm_ptr, N, D, stride_n, stride_d,
                       F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out_n = x_n 2^k_n and out_norm_n = max(r_n, eps) 2^k_n, 2^k_n = 2^-e_n with r_n = m 2^e_n,
    m in [0.5, 1) (frexp), built from the exponent bits of r_n: exact, and kept inside the normal
    range. 2^k = 1 for a zero, infinite or NaN norm."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    r = tl.load(norm_ptr + rows, mask=rmask, other=0.0)
    # e: frexp's exponent of a normal r (biased exponent - (bias - 1)), clamped to [-LIM, LIM];
    # -LIM for a subnormal r, 0 (2^k = 1) for zero, inf and NaN. LIM = 125 (float32), 1021 (float64).
    if F64:
        biased = (r.to(tl.int64, bitcast=True) >> 52) & 2047
        e = tl.minimum(tl.maximum(biased - 1022, -1021), 1021)
        e = tl.where(biased == 0, tl.where(r == 0, 0, -1021), e)
        e = tl.where(biased == 2047, 0, e)
        scale = ((1023 - e) << 52).to(tl.float64, bitcast=True)
    else:
        biased = (r.to(tl.int32, bitcast=True) >> 23) & 255
        e = tl.minimum(tl.maximum(biased - 126, -125), 125)
        e = tl.where(biased == 0, tl.where(r == 0, 0, -125), e)
        e = tl.where(biased == 255, 0, e)
        scale = ((127 - e) << 23).to(tl.float32, bitcast=True)
    eps = tl.full([BLOCK_N], 1e-12, ACC)
    tl.store(out_norm_ptr + rows, tl.where(r < eps, eps, r) * scale, mask=rmask)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        v = tl.load(x_ptr + r64[:, None] * stride_n + cols[None, :] * stride_d, mask=m, other=0.0).to(ACC)
        tl.store(out_ptr + r64[:, None] * D + cols[None, :], (v * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def scaled_rows(x: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_n 2^k_n, max(r_n, eps) 2^k_n): the GEMM operand and its norm floor (module docstring).

    ``norm`` is :func:`row_norms` of x. The first has x's shape and dtype (contiguous; x itself for
    float16, with the plain floor: kernels take its strides); the second is in the accumulation
    dtype and >= eps, so a kernel's own floor max(., eps) leaves it unchanged (NaN stays NaN). One
    O(N d) pass, no host sync."""
    if x.dtype == torch.float16:
        return x, torch.clamp_min(norm, NORM_EPS)
    n, d = x.shape
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    out_norm = torch.empty_like(norm)
    block_n, block_d = row_block(d, dtype=x.dtype)
    with on_device(x):
        _scale_rows_kernel[(triton.cdiv(n, block_n),)](x, norm, out, out_norm, n, d, x.stride(0), x.stride(1),
                                                       F64=x.dtype == torch.float64, BLOCK_N=block_n,
                                                       BLOCK_D=block_d, ACC=tl_acc(x.dtype))
    return out, out_norm


@triton.jit
def _project_rows_kernel(b_ptr, x_ptr, norm_ptr, radial_ptr, out_ptr, N, D, stride_xn, stride_xd,
                         HAS_RADIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    r = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    eps = tl.full([BLOCK_N], 1e-12, ACC)  # an ACC constant: a float literal would be rounded to float32
    inv = 1.0 / tl.where(r < eps, eps, r)  # 1 / max(r, eps), NaN kept
    # u = x / r: the quotient is <= 1 whatever the scale of the row; 0 for a zero row
    r_div = tl.where(r == 0, 1.0, r)
    # pass 1: <B_n, u_n>
    bu = tl.zeros([BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        b = tl.load(b_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0)
        x = tl.load(x_ptr + r64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0).to(ACC)
        bu += tl.sum(b * (x / r_div[:, None]), 1)
    # the radial projection, above the floor only (NaN r: NaN through inv)
    proj = tl.where(r > eps, bu, 0.0)
    rho = tl.zeros([BLOCK_N], ACC)
    if HAS_RADIAL:
        rho = tl.load(radial_ptr + rows, mask=rmask, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        b = tl.load(b_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0)
        x = tl.load(x_ptr + r64[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0).to(ACC)
        u = x / r_div[:, None]
        out = (b - proj[:, None] * u) * inv[:, None] + rho[:, None] * u
        tl.store(out_ptr + r64[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


def project_rows(b: torch.Tensor, x: torch.Tensor, norm: torch.Tensor,
                 radial: torch.Tensor | None = None) -> torch.Tensor:
    """dx from B = dL/du (contiguous, accumulation dtype) and an optional radial rho = dL/d||x|| (N,).

    Returns a contiguous tensor of x's shape and dtype (formula in the module docstring)."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    block_n, block_d = row_block(d, limit=128, dtype=x.dtype)
    with on_device(x):
        _project_rows_kernel[(triton.cdiv(n, block_n),)](
            b, x, norm, radial if radial is not None else norm, out, n, d, x.stride(0), x.stride(1),
            HAS_RADIAL=radial is not None, BLOCK_N=block_n, BLOCK_D=block_d, ACC=tl_acc(x.dtype))
    return out
