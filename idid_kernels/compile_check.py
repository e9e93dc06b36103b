"""Ahead-of-time compile check of the Triton kernels, for NVIDIA targets, without a GPU.

``python -m idid_kernels compile-check --arch 80 --arch 90`` compiles every Triton kernel of
``idid_kernels/triton`` x every autotune config the autotuner could pick on a GPU (the ``gpu=`` lists
of the kernel modules, never the single interpreter config) x every dtype the ops take x every
target, down to a cubin, and prints per compile: shared memory, registers per thread, the bytes
ptxas spills to local memory, and OK/FAIL. Exit status 1 when any of them fails.

How. Each compile is ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32), options={"num_warps", "num_stages"})``, which needs no driver.
The signature is derived from a *representative call* of each kernel (:data:`SPECS`: the values the
host launcher passes, per dtype, at a typical shape) through the same specialization the JIT applies
at launch: a pointer becomes ``*fp32`` etc. with 16-byte alignment, an int ``i32``/``i64`` with
divisibility 16 when it is a multiple of 16 and the constant 1 when it is 1 (so a unit stride is
compiled as the launch compiles it: that decides vector loads and register pressure). Where the
installed triton exposes its binder, it does the specialization itself; otherwise the rules above
are applied here (the tests check that both agree).

What is compiled. Autotuned kernels: each config of their list, as the autotuner would prune it for
a launch with that dtype (``prune_configs_by``). Kernels launched with fixed block sizes: those of
their launcher at d = 512. Each in every launch variant its host code uses (a constexpr flag or a
stride its launcher sets differently: atomic or deterministic reductions, a transposed operand,
TF32 dots for float32 under ``IDID_KERNELS_TRITON_TF32=1``); ``--variants default`` keeps only
the first (the default launch).

Failure means: the compile raises (a front-end, lowering or ptxas error), or the kernel could not be
loaded on the target: shared memory above the arch's per-block opt-in limit (163 KB on sm_80, 227 KB
on sm_90; Triton checks this only when loading, and the autotuner then silently drops the config), or
more than 1024 threads. ``--max-spill BYTES`` also fails a compile whose spill stores exceed BYTES.

Registers and spills come from ptxas' own ``-v`` log of the compile (``TRITON_DUMP_PTXAS_LOG``), or,
where that is unavailable, from running the same ptxas with ``-v`` on the compiled PTX. The ptxas
is the one triton uses for the arch (``--ptxas`` points it elsewhere, e.g. to the CUDA 12.x ptxas an
older triton bundles).

Compiles run in worker subprocesses (``--jobs``), started with ``TRITON_INTERPRET`` and
``IDID_KERNELS_TRITON_TF32`` removed from their environment: the kernel modules pick their configs
when imported, and the interpreter's config is not what a GPU runs. Results are cached under
``$IDID_KERNELS_CACHE/compile_check`` (default ``~/.cache/idid_kernels/compile_check``), keyed by
triton's own hash of the kernel source and its dependencies, the signature, constexprs, the parsed
compile options, the target, the ptxas version, the triton version and the environment variables
triton treats as cache-invalidating; ``--no-cache`` compiles everything again.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import queue
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch

# Per-block shared memory a kernel may use (the opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_THREADS = 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# Environment variables that would change what the workers compile (see the module docstring).
_DROP_ENV = ("TRITON_INTERPRET", "IDID_KERNELS_TRITON_TF32")
_PKG = "idid_kernels"

# Representative sizes of a call: multiples of 16 (the common case, and the one the JIT specializes for).
N, C, D = 1024, 4096, 512


# ------------------------------------------------------------------------------------ the kernel table
@dataclasses.dataclass(frozen=True)
class Variant:
    """A launch variant: argument values that differ from the spec's default call."""
    name: str
    overrides: Callable[[Any], dict] | dict = dataclasses.field(default_factory=dict)
    dtypes: tuple[str, ...] | None = None  # None: every dtype of the spec

    def values(self, dt) -> dict:
        return self.overrides(dt) if callable(self.overrides) else dict(self.overrides)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel: where it lives and the arguments its launcher passes (every parameter but the
    autotuned ones). ``fixed``: the block sizes of a kernel launched without autotuning, with
    triton's default num_warps=4, num_stages=3. ``dtypes=None``: the kernel takes no input-dtype
    tensor (compiled once per arch)."""
    module: str
    attr: str
    args: Callable[[Any], dict]
    fixed: Callable[[Any], dict] | None = None
    variants: tuple[Variant, ...] = (Variant("default"),)
    dtypes: tuple[str, ...] | None = tuple(DTYPES)

    @property
    def key(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.attr}"


class _T:
    """What a launcher derives from the input dtype (evaluated in a worker, where the helpers of
    idid_kernels.triton._rows give their GPU answers)."""

    def __init__(self, dt):
        from .triton import _idid_common, _rows
        self.dt = dt
        self.acc = _rows.acc_dtype(dt) if dt is not None else torch.float32
        self.tl_in = _rows.tl_dtype(dt) if dt is not None else None
        self.tl_acc = _rows.tl_acc(dt) if dt is not None else None
        self.dot = _rows.dot_dtype(dt) if dt is not None else None
        self.prec = _rows.dot_precision(dt) if dt is not None else None        # cm_margin, pairwise_cosine
        self.idid_prec = _idid_common.dot_precision(dt) if dt is not None else None  # idid_loss, class_density


def _p(dtype) -> torch.Tensor:
    """A pointer argument: a one-element CPU tensor of ``dtype`` (its dtype and alignment are all the
    specialization reads)."""
    return torch.empty(1, dtype=dtype)


def _ptrs(dtype, *names) -> dict:
    return {n: _p(dtype) for n in names}


_I64 = torch.int64
_SPLIT = (16.0, 0.0, 0.0)  # split_f64 parts of a float parameter: fp32 scalars, never specialized


def _floats(*prefixes) -> dict:
    return {f"{p}_{part}": v for p in prefixes for part, v in zip(("hi", "mid", "lo"), _SPLIT)}


def _row_block(limit=256):
    def fixed(t):
        from .triton import _rows
        bn, bd = _rows.row_block(D, limit, dtype=t.dt)
        return dict(BLOCK_N=bn, BLOCK_D=bd)
    return fixed


# cm_margin ------------------------------------------------------------------------------------------
def _cm_common(t: _T) -> dict:
    return dict(x_ptr=_p(t.dt), w_ptr=_p(t.dt), labels_ptr=_p(_I64), N=N, C=C, D=D,
                stride_xn=D, stride_xd=1, stride_wc=D, stride_wd=1, PREC=t.prec, DOT_DT=t.dot, ACC=t.tl_acc)


def _cm_forward(t):
    return dict(_cm_common(t), **_ptrs(t.acc, "x_norm_ptr", "w_norm_ptr", "scale_ptr", "target_ptr", "loss_ptr",
                                       "shift_ptr", "log_sum_ptr", "mass_ptr", "mass_cos_ptr"), ignore_index=-100)


def _cm_backward(t, out_ptrs):
    return dict(_cm_common(t), **_ptrs(t.acc, "x_norm_ptr", "w_norm_ptr", "scale_ptr", "shift_ptr", "log_sum_ptr",
                                       "ag_ptr", "g_target_ptr", *out_ptrs), IN_DT=t.tl_in)


def _cm_target_cos(t):
    d = _cm_common(t)
    for k in ("PREC", "DOT_DT"):
        d.pop(k)
    return dict(d, **_ptrs(t.acc, "w_norm_ptr", "x_norm_ptr", "cos_ptr"), ignore_index=-100)


_TF32 = Variant("tf32", dict(PREC="tf32"), dtypes=("float32",))
_TF32_IDID = Variant("tf32", dict(DOT_PREC="tf32"), dtypes=("float32",))


# pairwise_cosine -------------------------------------------------------------------------------------
def _pc_forward(t):
    return dict(x_ptr=_p(t.dt), y_ptr=_p(t.dt), **_ptrs(t.acc, "norm_x_ptr", "norm_y_ptr"), out_ptr=_p(t.dt),
                N=N, M=N, D=D, stride_xn=D, stride_xd=1, stride_yn=D, stride_yd=1, PREC=t.prec, DOT_DT=t.dot,
                ACC=t.tl_acc)


def _pc_grad(t):
    # dx = project(G V): G (N, M) row-major read row-wise
    return dict(g_ptr=_p(t.dt), stride_gi=N, stride_gk=1, v_ptr=_p(t.dt), stride_vk=D, stride_vd=1,
                norm_v_ptr=_p(t.acc), out_ptr=_p(t.acc), N=N, K=N, D=D, SYM=False, PREC=t.prec, IN_DT=t.tl_in,
                DOT_DT=t.dot, ACC=t.tl_acc)


# norm_contraction and the _rows kernels ---------------------------------------------------------------
# the offset and 1/T travel as float64 bit patterns (int64 arguments, _rows.f64_bits)
_F64_BITS = dict(offset_bits=4607182418800017408, inv_t_bits=4607182418800017408)


def _nc_forward(t):
    return dict(x_ptr=_p(t.dt), out_ptr=_p(t.dt), norm_ptr=_p(t.acc), **_F64_BITS, N=N, D=D, stride_n=D,
                stride_d=1, ACC=t.tl_acc)


def _nc_backward(t):
    return dict(grad_ptr=_p(t.dt), x_ptr=_p(t.dt), norm_ptr=_p(t.acc), **_F64_BITS, dx_ptr=_p(t.dt), N=N,
                D=D, stride_n=D, stride_d=1, ACC=t.tl_acc)


def _row_norms(t):
    return dict(x_ptr=_p(t.dt), norm_ptr=_p(t.acc), N=N, D=D, stride_n=D, stride_d=1, ACC=t.tl_acc)


def _scale_rows(t):
    return dict(x_ptr=_p(t.dt), norm_ptr=_p(t.acc), out_ptr=_p(t.dt), out_norm_ptr=_p(t.acc), N=N, D=D,
                stride_n=D, stride_d=1, F64=t.dt == torch.float64, ACC=t.tl_acc)


def _project_rows(t):
    return dict(b_ptr=_p(t.acc), x_ptr=_p(t.dt), norm_ptr=_p(t.acc), radial_ptr=_p(t.acc), out_ptr=_p(t.dt), N=N,
                D=D, stride_xn=D, stride_xd=1, HAS_RADIAL=True, ACC=t.tl_acc)


# idid_loss, class_density, _idid_common ---------------------------------------------------------------
def _idid_rows(t):
    """What the row-bucketed kernels read: the scaled rows, their norm floors, layout, offsets."""
    return dict(x_ptr=_p(t.dt), xn_ptr=_p(t.acc), lay_ptr=_p(_I64), offs_ptr=_p(_I64), B=N, C=C, D=D, ACC=t.tl_acc,
                DOT_PREC=t.idid_prec)


def _ic_forward(t):
    return dict(_idid_rows(t), w_ptr=_p(t.dt), wn_ptr=_p(t.acc), cls_ptr=_p(_I64), lr_ptr=_p(t.acc),
                rs_ptr=_p(t.acc), **_floats("alpha", "itau"), DISTILL=True, UNIT_TAU=True, BALANCED=True)


def _grad_rows(t):
    return dict(_idid_rows(t), w_ptr=_p(t.dt), wn_ptr=_p(t.acc), **_ptrs(t.acc, "rs_ptr", "lr_ptr", "gic_ptr",
                                                                        "gid_ptr", "du_ptr"),
                **_floats("alpha", "itau", "t"), DISTILL=True, DIVERSITY=True)


def _grad_cols(t):
    return dict(_idid_rows(t), w_ptr=_p(t.dt), wn_ptr=_p(t.acc), **_ptrs(t.acc, "rs_ptr", "lr_ptr", "gic_ptr",
                                                                        "dv_ptr"),
                rows_per_split=512, **_floats("alpha", "itau"), DISTILL=True, ATOMIC=True)


def _pair_row_sums(t):
    return dict(_idid_rows(t), out_ptr=_p(t.acc), **_floats("t"))


def _pull_rows(t):
    return dict(_idid_rows(t), g_ptr=_p(t.acc), du_ptr=_p(t.acc), **_floats("t"))


def _drop(d: dict, *names) -> dict:
    return {k: v for k, v in d.items() if k not in names}


def _class_sums(t):
    return dict(_drop(_idid_rows(t), "DOT_PREC"), rs_ptr=_p(t.acc), m_ptr=_p(t.acc), ab_ptr=_p(t.acc))


def _dtheta(t):
    # DOT_PREC as idid_loss's launcher sets it: "ieee" for exact float32, else "tf32" (operands are ACC)
    prec = "ieee" if t.tl_acc.primitive_bitwidth == 32 and t.idid_prec == "ieee" else "tf32"
    return dict(**_ptrs(t.acc, "m_ptr", "ab_ptr"), w_ptr=_p(t.dt), **_ptrs(t.acc, "wn_ptr", "lr_ptr", "gic_ptr"),
                lay_ptr=_p(_I64), out_ptr=_p(t.dt), B=N, C=C, D=D, **_floats("alpha", "itau"), ACC=t.tl_acc,
                DOT_PREC=prec)


def _teacher(t):
    return dict(th_ptr=_p(t.dt), lr_ptr=_p(t.acc), C=C, ACC=t.tl_acc)


def _finalize(t):
    return dict(rs_ptr=_p(t.acc), offs_ptr=_p(_I64), cls_ptr=_p(_I64), lay_ptr=_p(_I64),
                **_ptrs(t.dt, "loss_ptr", "lic_ptr", "lid_ptr", "lam_ptr"),
                B=N, C=C, **_floats("eps", "dw"), DIVERSITY=True, ADAPTIVE=True, ACC=t.tl_acc)


def _idid_row_norms(t):
    return dict(x_ptr=_p(t.dt), out_ptr=_p(t.acc), N=N, D=D, ACC=t.tl_acc)


def _normalize_backward(t):
    return dict(g_ptr=_p(t.acc), x_ptr=_p(t.dt), xn_ptr=_p(t.acc), out_ptr=_p(t.dt), N=N, D=D, NSPLIT=1,
                split_stride=N * D, ACC=t.tl_acc)


def _class_sum(t):
    return dict(rowsum_ptr=_p(t.acc), offs_ptr=_p(_I64), lay_ptr=_p(_I64), out_ptr=_p(t.dt), B=N, C=C,
                ACC=t.tl_acc)


_M = f"{_PKG}.triton."
SPECS: tuple[KernelSpec, ...] = (
    # autotuned (config lists in the kernel modules)
    KernelSpec(_M + "cm_margin", "_forward_kernel", _cm_forward, variants=(Variant("default"), _TF32)),
    KernelSpec(_M + "cm_margin", "_backward_rows_kernel",
               lambda t: dict(_cm_backward(t, ("bx_ptr", "bw_ptr")), NEED_X=True, NEED_W=True, ATOMIC=True),
               variants=(Variant("atomic"), Variant("deterministic", dict(NEED_W=False, ATOMIC=False)), _TF32)),
    KernelSpec(_M + "cm_margin", "_backward_classes_kernel", lambda t: _cm_backward(t, ("bw_ptr",)),
               variants=(Variant("default"), _TF32)),
    KernelSpec(_M + "pairwise_cosine", "_forward_kernel", _pc_forward, variants=(Variant("default"), _TF32)),
    KernelSpec(_M + "pairwise_cosine", "_grad_matmul_kernel", _pc_grad,
               variants=(Variant("dx"), Variant("dy", dict(stride_gi=1, stride_gk=N)), Variant("sym", dict(SYM=True)),
                         _TF32)),
    KernelSpec(_M + "idid_loss", "_ic_forward_kernel", _ic_forward,
               variants=(Variant("default"), Variant("tau", dict(UNIT_TAU=False)), _TF32_IDID)),
    KernelSpec(_M + "idid_loss", "_grad_rows_kernel", _grad_rows, variants=(Variant("default"), _TF32_IDID)),
    KernelSpec(_M + "idid_loss", "_grad_cols_kernel", _grad_cols,
               variants=(Variant("atomic"), Variant("splits", dict(ATOMIC=False)), _TF32_IDID)),
    KernelSpec(_M + "_idid_common", "pair_row_sums_kernel", _pair_row_sums, variants=(Variant("default"), _TF32_IDID)),
    KernelSpec(_M + "class_density", "_pull_rows_kernel", _pull_rows, variants=(Variant("default"), _TF32_IDID)),
    # launched with fixed block sizes (the values of their launchers at d = D)
    KernelSpec(_M + "cm_margin", "_target_cos_kernel", _cm_target_cos, fixed=_row_block()),
    KernelSpec(_M + "_rows", "_row_norms_kernel", _row_norms, fixed=_row_block()),
    KernelSpec(_M + "_rows", "_scale_rows_kernel", _scale_rows, fixed=_row_block(),
               dtypes=("float32", "bfloat16", "float64")),  # float16 rows are passed through unscaled
    KernelSpec(_M + "_rows", "_project_rows_kernel", _project_rows, fixed=_row_block(128)),
    KernelSpec(_M + "norm_contraction", "_forward_kernel", _nc_forward, fixed=_row_block()),
    KernelSpec(_M + "norm_contraction", "_backward_kernel", _nc_backward, fixed=_row_block()),
    KernelSpec(_M + "idid_loss", "_class_stats_kernel", lambda t: dict(offs_ptr=_p(_I64), out_ptr=_p(_I64), C=C),
               fixed=lambda t: dict(BLOCK=1024), dtypes=None),
    KernelSpec(_M + "idid_loss", "_teacher_kernel", _teacher, fixed=lambda t: dict(BLOCK_R=8, BLOCK_C=128)),
    KernelSpec(_M + "idid_loss", "_finalize_kernel", _finalize, fixed=lambda t: dict(BLOCK=1024)),
    KernelSpec(_M + "idid_loss", "_class_sums_kernel", _class_sums, fixed=lambda t: dict(BLOCK_M=32, BLOCK_D=128)),
    KernelSpec(_M + "idid_loss", "_dtheta_kernel", _dtheta, fixed=lambda t: dict(BLOCK_T=32, BLOCK_K=16)),
    KernelSpec(_M + "_idid_common", "row_norms_kernel", _idid_row_norms, fixed=lambda t: dict(BLOCK_R=8 if t.dt == torch.float64 else 32, BLOCK_K=128)),
    KernelSpec(_M + "_idid_common", "normalize_backward_kernel", _normalize_backward,
               fixed=lambda t: dict(BLOCK_R=16, BLOCK_K=128)),
    KernelSpec(_M + "class_density", "_class_sum_kernel", _class_sum, fixed=lambda t: dict(BLOCK=256)),
)
SPECS_BY_KEY = {s.key: s for s in SPECS}


# ---------------------------------------------------------------------------------------- jobs, results
@dataclasses.dataclass
class Job:
    kernel: str          # KernelSpec.key
    variant: str
    dtype: str           # a DTYPES key, or "-" for a dtype-free kernel
    arch: int
    meta: dict           # the config's constexprs (block sizes)
    num_warps: int
    num_stages: int
    extra_options: dict = dataclasses.field(default_factory=dict)  # num_ctas, maxnreg when a config sets them
    autotuned: bool = True

    def config_label(self) -> str:
        blocks = "x".join(str(v) for v in self.meta.values())
        names = ",".join(k.replace("BLOCK_", "") for k in self.meta)
        extra = "".join(f" {k}={v}" for k, v in self.extra_options.items())
        return f"{names}={blocks} w{self.num_warps} s{self.num_stages}{extra}"


@dataclasses.dataclass
class Result:
    job: Job
    status: str = "FAIL"          # OK | FAIL
    shared: int | None = None     # bytes (dynamic + static, Triton's metadata.shared)
    registers: int | None = None  # per thread
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None      # stack frame bytes (local memory per thread)
    seconds: float = 0.0
    cached: bool = False
    error: str = ""

    def reason(self) -> str:
        lines = [ln.strip() for ln in self.error.strip().splitlines() if ln.strip()]
        return lines[-1][:160] if lines else ""


def _unwrap(kernel):
    """The JITFunction under Autotuner / Heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _kernel_object(spec: KernelSpec):
    return getattr(importlib.import_module(spec.module), spec.attr)


def _dtype_of(name: str):
    return None if name == "-" else DTYPES[name]


def call_values(spec: KernelSpec, dtype: str, variant: str) -> dict:
    """Every argument but the autotuned ones, of the representative call of ``spec`` (in a worker)."""
    t = _T(_dtype_of(dtype))
    values = spec.args(t)
    var = next(v for v in spec.variants if v.name == variant)
    values.update(var.values(t))
    if spec.fixed is not None:
        values.update(spec.fixed(t))
    return values


def autotune_configs(kernel, named_args: dict) -> list:
    """The configs the autotuner could pick for a launch with ``named_args``: its list, pruned by its
    ``early_config_prune`` when it has one (as ``Autotuner.prune_configs`` does)."""
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        configs = list(prune(configs, named_args))
    return configs


def plan(archs, dtypes, kernels=None, variants="all") -> list[Job]:
    """Every (kernel, variant, dtype, config, arch) to compile (in a worker: imports the kernels)."""
    _assert_native()
    jobs = []
    for spec in SPECS:
        if kernels and not any(k == spec.key or k == spec.attr or spec.key.startswith(k + ".") for k in kernels):
            continue
        kernel = _kernel_object(spec)
        for dtype in (["-"] if spec.dtypes is None else [d for d in spec.dtypes if d in dtypes]):
            for var in spec.variants[:1] if variants == "default" else spec.variants:
                if var.dtypes is not None and dtype not in var.dtypes:
                    continue
                if spec.fixed is not None:
                    fixed = spec.fixed(_T(_dtype_of(dtype)))
                    configs = [(fixed, 4, 3, {})]
                else:
                    named = call_values(spec, dtype, var.name)
                    configs = [(dict(c.kwargs), c.num_warps, c.num_stages, _config_options(c))
                               for c in autotune_configs(kernel, named)]
                for meta, warps, stages, extra in configs:
                    for arch in archs:
                        jobs.append(Job(spec.key, var.name, dtype, int(arch), meta, warps, stages, extra,
                                        autotuned=spec.fixed is None))
    return jobs


def _is_kernel(attr: str, obj) -> bool:
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction
    return isinstance(obj, (Autotuner, Heuristics)) or (isinstance(obj, JITFunction) and attr.endswith("_kernel"))


def table_problems(specs=SPECS) -> list[str]:
    """What makes :data:`SPECS` out of date (in a worker): a Triton kernel of idid_kernels/triton (an
    autotuned one, or a @triton.jit function named ``*_kernel``) without an entry, an entry naming
    nothing, or a representative call whose arguments are not the kernel's parameters; and where
    the installed triton has a binder, a signature derived here that differs from a launch's."""
    import pkgutil

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    _assert_native()
    problems = []
    listed = {(s.module, s.attr) for s in specs}
    pkg = importlib.import_module(f"{_PKG}.triton")
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for attr, obj in vars(mod).items():
            own = _is_kernel(attr, obj) and _unwrap(obj).fn.__module__ == mod.__name__
            if own and (mod.__name__, attr) not in listed:
                problems.append(f"{mod.__name__}.{attr}: a Triton kernel without an entry in compile_check.SPECS")
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for spec in specs:
        try:
            kernel = _kernel_object(spec)
        except (ImportError, AttributeError) as e:
            problems.append(f"{spec.key}: listed in compile_check.SPECS but not found ({e})")
            continue
        if (spec.fixed is None) != isinstance(kernel, Autotuner):
            problems.append(f"{spec.key}: {'autotuned' if spec.fixed is None else 'fixed'} in compile_check.SPECS, "
                            f"but the kernel is {'not ' if spec.fixed is None else ''}autotuned")
            continue
        fn = _unwrap(kernel)
        for dtype in ["-"] if spec.dtypes is None else spec.dtypes:
            for var in spec.variants:
                if var.dtypes is not None and dtype not in var.dtypes:
                    continue
                values = call_values(spec, dtype, var.name)
                metas = [{}] if spec.fixed is not None else [c.kwargs for c in autotune_configs(kernel, values)]
                for meta in metas:
                    full = dict(values, **meta)
                    if set(full) != set(fn.arg_names):
                        problems.append(f"{spec.key} [{var.name}, {dtype}]: the call passes "
                                        f"{sorted(set(full) - set(fn.arg_names))} unknown, misses "
                                        f"{sorted(set(fn.arg_names) - set(full))} of {fn.arg_names}")
                        break
                    ours = specialize_here(fn, full)
                    theirs = specialize_with_triton(fn, full, backend, dict(num_warps=4, num_stages=3))
                    if theirs is not None and _canon(ours) != _canon(theirs):
                        problems.append(f"{spec.key} [{var.name}, {dtype}]: signature {ours} here, {theirs} "
                                        f"from triton's binder")
                        break
    return problems


def _canon(spec_t):
    signature, constexprs, attrs = spec_t
    return (dict(signature), {k: repr(v) for k, v in constexprs.items()},
            {k: v for k, v in attrs.items() if v})


def _config_options(cfg) -> dict:
    out = {}
    if getattr(cfg, "num_ctas", 1) not in (None, 1):
        out["num_ctas"] = cfg.num_ctas
    if getattr(cfg, "maxnreg", None) is not None:
        out["maxnreg"] = cfg.maxnreg
    return out


def _assert_native():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check workers must run without TRITON_INTERPRET=1 (the interpreter's "
                           "autotune config is not what a GPU runs)")


# ------------------------------------------------------------------------------------- specialization
def _type_name(dtype) -> str:
    import triton.language as tl
    from .triton._rows import _TL_DTYPES
    tl_dt = _TL_DTYPES.get(dtype) or {torch.int64: tl.int64, torch.int32: tl.int32, torch.int8: tl.int8,
                                      torch.uint8: tl.uint8, torch.bool: tl.int1}[dtype]
    return tl_dt.name if hasattr(tl_dt, "name") else str(tl_dt)


def specialize_here(fn, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch with ``values``, by the JIT's rules (module docstring)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _short(_type_name(v.dtype))
            attrs[(i,)] = [["tt.divisibility", 16]] if v.data_ptr() % 16 == 0 else []
        elif isinstance(v, bool):
            signature[name], attrs[(i,)] = "u1", []
        elif isinstance(v, int):
            if v == 1 and not param.do_not_specialize:
                signature[name], constexprs[(i,)] = "constexpr", 1
                continue
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else ("i64" if -2 ** 63 <= v < 2 ** 63 else "u64")
            attrs[(i,)] = [["tt.divisibility", 16]] if v % 16 == 0 and not param.do_not_specialize else []
        elif isinstance(v, float):
            signature[name], attrs[(i,)] = "fp32", []
        else:
            raise TypeError(f"{fn.__name__}: no rule for argument {name}={v!r}")
    return signature, constexprs, attrs


def _short(tl_name: str) -> str:
    return {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
            "fp64": "fp64", "float64": "fp64", "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8",
            "int1": "i1"}.get(tl_name, tl_name)


def specialize_with_triton(fn, values: dict, backend, options: dict):
    """The same through triton's own binder (what a launch does), or None where this triton has no
    such internals."""
    try:
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(**values, **options)
        _, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, spec, opts)
    except (ImportError, AttributeError, TypeError):
        return None
    return dict(signature), dict(constexprs), dict(attrs)


def _ast_source(fn, signature, constexprs, attrs):
    import inspect

    from triton.compiler import ASTSource
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs, attrs)
    return ASTSource(fn, signature, constants=constexprs, attrs=attrs)  # older spelling


# ------------------------------------------------------------------------------------------- compiling
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict | None:
    """registers, spill stores/loads and stack frame from ``ptxas -v`` output (the largest figures
    where the log holds several functions); None without a register line."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    if not regs:
        return None
    props = [tuple(map(int, m)) for m in _PTXAS_PROPS.findall(log)] or [(0, 0, 0)]
    return dict(registers=max(regs), stack=max(p[0] for p in props), spill_stores=max(p[1] for p in props),
                spill_loads=max(p[2] for p in props))


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv
    if hasattr(nv, "get_ptxas"):
        return nv.get_ptxas(arch).path
    return nv.path_to_ptxas()[0]  # older triton


def _ptxas_again(ptx: str, arch: int) -> dict | None:
    """ptxas -v on the compiled PTX (where triton's own log of the compile is not available)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas_path(arch), "-v", "-lineinfo", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
        return parse_ptxas_log(out.stderr + out.stdout)


def _cache_dir() -> str:
    root = os.environ.get("IDID_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "idid_kernels")
    return os.path.join(root, "compile_check")


def _env_key() -> str:
    """The environment variables triton itself treats as invalidating its cache, as a string."""
    from triton.compiler import compiler
    env = getattr(compiler, "get_cache_invalidating_env_vars", dict)()
    return json.dumps(env, sort_keys=True, default=str)


def compile_job(job: Job, cache_dir: str | None) -> Result:
    """Compile one job for its target and measure it (in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    res = Result(job)
    start = time.perf_counter()
    spec = SPECS_BY_KEY[job.kernel]
    try:
        fn = _unwrap(_kernel_object(spec))
        values = call_values(spec, job.dtype, job.variant)
        values.update(job.meta)
        missing = [n for n in fn.arg_names if n not in values]
        extra = [n for n in values if n not in fn.arg_names]
        if missing or extra:
            raise KeyError(f"the compile_check table is out of date for {job.kernel}: "
                           f"missing {missing}, unknown {extra}")
        target = GPUTarget("cuda", job.arch, 32)
        backend = make_backend(target)
        options = dict(num_warps=job.num_warps, num_stages=job.num_stages, **job.extra_options)
        spec_t = specialize_with_triton(fn, values, backend, options) or specialize_here(fn, values)
        src = _ast_source(fn, *spec_t)
        key = hashlib.sha256("|".join([src.hash(), backend.parse_options(dict(options)).hash(), str(job.arch),
                                       backend.hash(), triton.__version__, _env_key()]).encode()).hexdigest()
        path = os.path.join(cache_dir, key[:2], key + ".json") if cache_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            res = Result(job, **cached)
            res.cached = True
            res.seconds = time.perf_counter() - start
            return res
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v's log here
                compiled = triton.compile(src, target=target, options=options)
        except Exception as e:  # noqa: BLE001 - any compile error is this config's FAIL
            res.error = f"{type(e).__name__}: {e}"
        else:
            usage = parse_ptxas_log(log.getvalue()) or _ptxas_again(compiled.asm["ptx"], job.arch)
            res.shared = int(compiled.metadata.shared)
            if usage:
                res.registers, res.stack = usage["registers"], usage["stack"]
                res.spill_stores, res.spill_loads = usage["spill_stores"], usage["spill_loads"]
            limit = SHARED_LIMIT.get(job.arch)
            threads = job.num_warps * 32 * job.extra_options.get("num_ctas", 1)
            if limit is not None and res.shared > limit:
                res.error = f"shared memory {res.shared} B > {limit} B, the sm_{job.arch} per-block limit"
            elif threads > MAX_THREADS:
                res.error = f"{threads} threads per block > {MAX_THREADS}"
            else:
                res.status = "OK"
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fields = {k: v for k, v in dataclasses.asdict(res).items() if k not in ("job", "cached", "seconds")}
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(fields, f)
            os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - a table or setup error: reported, not raised
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - start
    return res


# ----------------------------------------------------------------------------------------- the workers
def _worker_main() -> None:
    """Read JSON requests on stdin, answer one JSON line each on the original stdout (anything else
    the compile prints goes to stderr)."""
    import warnings
    warnings.filterwarnings("ignore")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "plan":
                jobs = plan(req["archs"], req["dtypes"], req.get("kernels"), req.get("variants", "all"))
                reply = {"jobs": [dataclasses.asdict(j) for j in jobs], "problems": table_problems()}
            else:
                res = compile_job(Job(**req["job"]), req.get("cache_dir"))
                reply = {"result": {k: v for k, v in dataclasses.asdict(res).items() if k != "job"}}
        except Exception as e:  # noqa: BLE001
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    def __init__(self, env: dict):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", f"{_PKG}.compile_check", "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)

    def ask(self, req: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.close(kill=True)
                raise TimeoutError(f"no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise RuntimeError(f"worker exited with status {self.proc.returncode}\n{tail}")
        return json.loads(line)

    def close(self, kill=False):
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def worker_env(ptxas: str | None = None, triton_cache: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    if triton_cache:
        env["TRITON_CACHE_DIR"] = triton_cache
    if ptxas:
        env["TRITON_PTXAS_PATH"] = env["TRITON_PTXAS_BLACKWELL_PATH"] = os.path.abspath(ptxas)
    return env


def plan_in_worker(archs, dtypes, kernels=None, variants="all", env=None) -> tuple[list[Job], list[str]]:
    """(jobs, problems of the kernel table), from a worker."""
    w = _Worker(env or worker_env())
    try:
        reply = w.ask({"op": "plan", "archs": list(archs), "dtypes": list(dtypes), "kernels": kernels,
                       "variants": variants}, timeout=600)
    finally:
        w.close()
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return [Job(**j) for j in reply["jobs"]], reply["problems"]


def compile_jobs(jobs: list[Job], workers: int = 2, cache_dir: str | None = None, timeout: float = 900,
                 env: dict | None = None, progress=None) -> list[Result]:
    """Compile ``jobs`` on ``workers`` subprocesses (results in the order of ``jobs``)."""
    env = env or worker_env()
    todo: queue.Queue = queue.Queue()
    for i, j in enumerate(jobs):
        todo.put((i, j))
    results: list[Result | None] = [None] * len(jobs)
    lock = threading.Lock()

    def run():
        w = None
        while True:
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                break
            try:
                w = w or _Worker(env)
                reply = w.ask({"op": "compile", "job": dataclasses.asdict(job), "cache_dir": cache_dir}, timeout)
                if "error" in reply:
                    res = Result(job, error=reply["error"])
                else:
                    res = Result(job, **reply["result"])
            except Exception as e:  # noqa: BLE001 - a crashed or hung compile fails that job only
                res = Result(job, error=f"{type(e).__name__}: {e}")
                if w is not None:
                    w.close(kill=True)
                w = None
            results[i] = res
            if progress is not None:
                with lock:
                    progress(res)
        if w is not None:
            w.close()

    threads = [threading.Thread(target=run) for _ in range(max(1, min(workers, len(jobs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ------------------------------------------------------------------------------------------- reporting
def format_table(results: list[Result]) -> str:
    head = ("kernel", "variant", "config", "dtype", "arch", "shared", "regs", "spill st/ld", "stack", "s", "status")
    rows = []
    for r in results:
        j = r.job
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((j.kernel + ("" if j.autotuned else " (fixed)"), j.variant, j.config_label(), j.dtype,
                     f"sm_{j.arch}", "-" if r.shared is None else str(r.shared),
                     "-" if r.registers is None else str(r.registers), spill,
                     "-" if r.stack is None else str(r.stack), "cache" if r.cached else f"{r.seconds:.1f}",
                     r.status + (f"  {r.reason()}" if r.status != "OK" else "")))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows])


def worst_spills(results: list[Result], autotuned: bool = True) -> dict:
    """{(arch, dtype): (spill stores, kernel, variant, config)}: the largest spill of the autotuned
    compiles (or of the fixed launches) per target and dtype."""
    worst: dict = {}
    for r in results:
        if r.spill_stores is None or r.job.autotuned != autotuned:
            continue
        k = (r.job.arch, r.job.dtype)
        if k not in worst or r.spill_stores > worst[k][0]:
            worst[k] = (r.spill_stores, r.job.kernel, r.job.variant, r.job.config_label())
    return worst


def summary(results: list[Result], elapsed: float) -> str:
    fails = [r for r in results if r.status != "OK"]
    spilling = [r for r in results if r.spill_stores]
    lines = [f"{len(results)} compiles, {len(results) - len(fails)} OK, {len(fails)} FAIL, "
             f"{len(spilling)} spilling, {sum(r.cached for r in results)} from the cache, {elapsed:.0f} s"]
    for autotuned, what in ((True, "autotune configs"), (False, "fixed launches")):
        for (arch, dtype), (b, kernel, variant, cfg) in sorted(worst_spills(results, autotuned).items()):
            where = f"{kernel} [{variant}] {cfg}" if b else "(none spills)"
            lines.append(f"  worst spill, {what:<16} sm_{arch} {dtype:<8}: {b:>6} B  {where}")
    return "\n".join(lines)


def exit_status(results: list[Result]) -> int:
    return 1 if any(r.status != "OK" for r in results) else 0


def run_compile_check(archs=(90,), dtypes=tuple(DTYPES), jobs: int = 2, kernels=None, variants: str = "all",
                      json_path: str | None = None, cache: bool = True, ptxas: str | None = None,
                      max_spill: int | None = None, extra_jobs: list[Job] = (), timeout: float = 900,
                      out=None, quiet: bool = False) -> int:
    """The command: plan, compile, print the table and summary, write JSON; returns the exit status.

    ``extra_jobs`` are compiled besides the planned ones (and count towards the exit status)."""
    out = out or sys.stdout
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idid_cc_triton_") as triton_cache:
        env = worker_env(ptxas, triton_cache)
        planned, problems = plan_in_worker(archs, dtypes, kernels, variants, env) if kernels != [] else ([], [])
        for p in problems:
            print(f"FAIL  {p}", file=out)
        all_jobs = planned + list(extra_jobs)
        print(f"compile-check: {len(all_jobs)} compiles ({', '.join(f'sm_{a}' for a in archs)}; "
              f"{', '.join(dtypes)}) on {jobs} worker(s)", file=out, flush=True)
        done = [0]

        def progress(r: Result):
            done[0] += 1
            if not quiet and (r.status != "OK" or done[0] % 25 == 0 or done[0] == len(all_jobs)):
                print(f"  [{done[0]}/{len(all_jobs)}] {r.job.kernel} {r.job.dtype} sm_{r.job.arch} "
                      f"{r.job.config_label()}: {r.status} {r.reason()}", file=out, flush=True)

        results = compile_jobs(all_jobs, jobs, _cache_dir() if cache else None, timeout, env, progress)
    if max_spill is not None:
        for r in results:
            if r.status == "OK" and r.spill_stores is not None and r.spill_stores > max_spill:
                r.status, r.error = "FAIL", f"spill stores {r.spill_stores} B > --max-spill {max_spill} B"
    elapsed = time.perf_counter() - start
    print(format_table(results), file=out)
    print(summary(results, elapsed), file=out, flush=True)
    if json_path:
        import triton
        with open(json_path, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "seconds": elapsed,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 1 if problems else exit_status(results)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                   help="compute capability to compile for (repeatable; default 80 and 90)")
    p.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="input dtype (repeatable; default all)")
    p.add_argument("--kernel", action="append", help="only these kernels (module.name, name, or module; repeatable)")
    p.add_argument("--variants", choices=("all", "default"), default="all",
                   help="every launch variant of a kernel (default), or only its default launch")
    p.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile workers (default 2)")
    p.add_argument("--json", help="write every result to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not fill the result cache")
    p.add_argument("--ptxas", help="ptxas binary to assemble with (default: the one triton uses for the arch)")
    p.add_argument("--max-spill", type=int, help="also FAIL a compile whose spill stores exceed this many bytes")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per compile (default 900)")


def main(args: argparse.Namespace) -> int:
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile-check: triton is not installed", file=sys.stderr)
        return 2
    return run_compile_check(archs=args.arch or [80, 90], dtypes=args.dtype or list(DTYPES), jobs=args.jobs,
                             kernels=args.kernel, variants=args.variants, json_path=args.json,
                             cache=not args.no_cache, ptxas=args.ptxas, max_spill=args.max_spill,
                             timeout=args.timeout)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        parser = argparse.ArgumentParser(prog="python -m idid_kernels.compile_check")
        add_arguments(parser)
        sys.exit(main(parser.parse_args()))
