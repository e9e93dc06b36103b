"""Which backends exist, which are usable here, and which one runs a given op.

Backends: ``reference`` (pure PyTorch, always there), ``cpp`` (the C++ CPU kernels of the
``idid_kernels._C`` extension), ``cuda`` (its CUDA kernels, where built with CUDA; or, in a CPU
build, the same kernels on CPU tensors under the CUDA-execution emulator when
``IDID_KERNELS_CUDA_EMULATE=1``) and ``triton`` (fused Triton kernels). A backend is *available* when it can run here at all and *implements* an op
when it has kernels for it; ``backend="auto"`` takes the first backend in the device's preference
order that is available, implements the op and runs on the tensors' device.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS

# Fastest first, per device type. Neither the CUDA nor the Triton kernels have yet passed the test
# suite natively on a GPU, so on CUDA tensors "auto" stays on the reference: backend="triton" or
# backend="cuda" runs them on request (see README, Status). Once verified: ("triton", "cuda", "reference").
_PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("reference",)}
_DEVICE_TYPES = {"reference": None, "cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``), on CPU tensors.

    The interpreter is for testing kernels without a GPU: it is orders of magnitude slower than
    native code, so ``backend="auto"`` never picks it on the CPU; ``backend="triton"`` runs it.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_emulated() -> bool:
    """Whether ``backend="cuda"`` runs the CUDA kernels on CPU tensors under the emulator
    (``IDID_KERNELS_CUDA_EMULATE=1`` and an extension built with it, csrc/emu).

    Like Triton's interpreter this is for testing the kernels without a GPU: every GPU thread
    becomes a fiber on one CPU core, so ``backend="auto"`` never picks it; ``backend="cuda"`` runs it.
    The order in which the emulator runs blocks and threads is set by
    ``IDID_KERNELS_CUDA_EMULATE_ORDER`` (forward, reverse, random or random:SEED).
    """
    if os.environ.get("IDID_KERNELS_CUDA_EMULATE") != "1":
        return False
    ext = extension()
    return ext is not None and bool(getattr(ext, "with_cuda_emulator", 0))


def op_namespace(backend: str, device: torch.device) -> str:
    """The torch.ops library whose kernels run ``backend`` on ``device``: the emulated CUDA kernels
    have their own (same schemas, CPU kernels); everything else is ``idid_kernels``."""
    return "idid_kernels_emu" if backend == "cuda" and device.type == "cpu" else "idid_kernels"

# op name -> backends with kernels for it. Grows as kernels land; the reference has everything.
IMPLEMENTED: dict[str, set[str]] = {
    "cm_margin_loss": {"reference", "cpp", "cuda", "triton"},
    "idid_loss": {"reference", "cpp", "cuda", "triton"},
    "pairwise_cosine": {"reference", "cpp", "cuda", "triton"},
    "class_density": {"reference", "cpp", "cuda", "triton"},
    "norm_contraction": {"reference", "cpp", "cuda", "triton"},
    # the margin heads run on each backend's cm_margin_loss kernels
    "adaface_loss": {"reference", "cpp", "cuda", "triton"},
    "magface_loss": {"reference", "cpp", "cuda", "triton"},
    "ldam_loss": {"reference", "cpp", "cuda", "triton"},
}


class BackendUnavailableError(RuntimeError):
    """A backend that exists was asked for but cannot run here; the message says what is missing."""


_ext_state: dict[str, object] = {}


def extension():
    """The loaded ``idid_kernels._C`` module, or None (the import error is kept for messages)."""
    if "module" not in _ext_state:
        try:
            _ext_state["module"] = importlib.import_module("idid_kernels._C")
            # Registers fake kernels and autograd for the C++ ops.
            importlib.import_module("idid_kernels.ops")
        # ImportError: not built, or built against another torch. RuntimeError: a stale build whose
        # library lacks an op that ops/ registers (rebuild after pulling new kernels).
        except (ImportError, RuntimeError) as exc:
            _ext_state["module"] = None
            _ext_state["error"] = f"{type(exc).__name__}: {exc}"
    return _ext_state["module"]


@torch.compiler.assume_constant_result
def _import_error(module: str) -> str:
    """Why ``module`` cannot be imported ("" when it can). torch.compile takes the answer as a constant
    instead of tracing the import machinery, so a traced call to ``backend="triton"`` stays one graph."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _triton_missing() -> str | None:
    error = _import_error("triton")
    if error:
        return f"triton is not importable ({error}); pip install triton"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton needs a CUDA GPU, or TRITON_INTERPRET=1 (set before triton is imported) to run on the CPU"
    error = _import_error("idid_kernels.triton")
    if error:  # pragma: no cover - a broken install
        return f"the idid_kernels.triton kernels failed to import ({error})"
    return None


def missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpp", "cuda"):
        ext = extension()
        if ext is None:
            return (f"the C++ extension idid_kernels._C is not built or failed to load "
                    f"({_ext_state.get('error')}); build it with torch installed first: "
                    "`pip install --no-build-isolation -e '.[test]'`")
        if backend == "cuda":
            if getattr(ext, "with_cuda", 0) and torch.cuda.is_available():
                return None
            if cuda_emulated():
                return None
            if os.environ.get("IDID_KERNELS_CUDA_EMULATE") == "1":
                return ("IDID_KERNELS_CUDA_EMULATE=1 is set but idid_kernels._C was built without the CUDA "
                        "emulator (a CUDA build, or IDID_KERNELS_NO_CUDA_EMULATOR=1)")
            if not getattr(ext, "with_cuda", 0):
                return ("idid_kernels._C was built without CUDA (CPU torch, no nvcc, or IDID_KERNELS_NO_CUDA=1); "
                        "rebuild with a CUDA build of torch and nvcc on PATH, or set IDID_KERNELS_CUDA_EMULATE=1 "
                        "to run the CUDA kernels on CPU tensors in the emulator")
            return "no CUDA device is visible to torch"
        return None
    if backend == "triton":
        return _triton_missing()
    raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def extension_warning() -> str | None:
    """A warning to print when the C++ extension is missing (None when it loaded): without it only
    the reference runs, which materialises the (N, C) logits and has none of the fused kernels."""
    if extension() is not None:
        return None
    return ("WARNING: the C++ extension idid_kernels._C is not available "
            f"({_ext_state.get('error')}): only the pure-PyTorch reference backend runs (no fused "
            "kernels). Build it with torch installed first: pip install --no-build-isolation -e \".[test]\"")


def available_backends() -> list[str]:
    """Backends that can run on this machine, e.g. ``["reference", "cpp"]``."""
    return [b for b in BACKENDS if missing(b) is None]


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend``'s kernels take tensors on ``device`` (the reference takes any)."""
    devices = _DEVICE_TYPES[backend]
    if backend == "triton" and device.type == "cpu" and triton_interpreted():
        return True
    if backend == "cuda" and device.type == "cpu" and cuda_emulated():
        return True
    return devices is None or device.type in devices


def select_backend(op: str, backend: str, device: torch.device) -> str:
    """Resolve ``backend`` for ``op`` on ``device``; raises a clear error for an impossible choice."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    implemented = IMPLEMENTED[op]
    if backend == "auto":
        for name in _PREFERENCE.get(device.type, ("reference",)):
            if name in implemented and runs_on(name, device) and missing(name) is None:
                return name
        return "reference"
    why = missing(backend)
    if why is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available: {why}")
    if backend not in implemented:
        have = sorted(b for b in implemented if missing(b) is None)
        raise NotImplementedError(f"backend {backend!r} has no kernel for {op} yet; backends that do here: {have}")
    if not runs_on(backend, device):
        where = "/".join(_DEVICE_TYPES[backend])
        if backend == "triton":
            where += " (cpu too under TRITON_INTERPRET=1)"
        if backend == "cuda":
            where += " (cpu too under IDID_KERNELS_CUDA_EMULATE=1)"
        raise ValueError(f"backend {backend!r} runs on {where} tensors, but the inputs are on {device}")
    return backend
