"""Argument checks shared by every public function, run before any kernel launches.

Each check raises TypeError (wrong kind of thing) or ValueError (right kind, bad value) with a
message naming the argument and the offending value. Nothing is modified in place.

The label-range check reads the labels, which is a device-to-host sync on a GPU. It is skipped
while ``torch.compile`` traces and during CUDA graph capture (where a sync is impossible), and can
be switched off with the environment variable ``IDID_KERNELS_CHECK_LABELS=0``. Meta tensors have no
values to read: their labels are checked for dtype, shape and device only.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    value = check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_matrix(name: str, t, *, rows: int | None = None, cols: int | None = None,
                 rows_of: str = "", cols_of: str = "") -> None:
    """A 2-D floating tensor with at least one row, optionally with fixed row/column counts."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)} has no rows")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no features: shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows ({rows_of}), got shape {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns ({cols_of}), got shape {tuple(t.shape)}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; use one dtype")


def check_class_weight(class_weight, num_classes: int, device: torch.device, name: str = "class_weight") -> None:
    """None, or a floating (num_classes,) tensor on ``device`` that does not require grad: a constant
    per-class re-weighting, as ``F.cross_entropy``'s ``weight`` (which it does not differentiate)."""
    if class_weight is None:
        return
    if not isinstance(class_weight, torch.Tensor) or not class_weight.dtype.is_floating_point:
        what = (f"a {class_weight.dtype} tensor" if isinstance(class_weight, torch.Tensor)
                else type(class_weight).__name__)
        raise TypeError(f"{name} must be a floating tensor of shape ({num_classes},), got {what}")
    if class_weight.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"{name} is on {class_weight.device} but x is on {device}")
    if class_weight.requires_grad:
        raise ValueError(f"{name} must not require grad: it is a constant re-weighting "
                         f"(F.cross_entropy does not differentiate it either); pass {name}.detach()")


def check_row_vector(name: str, t, n: int, device: torch.device, per: str = "row of x") -> None:
    """A floating (n,) tensor on ``device``: one value per row of x (per-row margins), or per ``per``."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating tensor of shape ({n},), got {what}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per {per}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _label_check_enabled(device: torch.device) -> bool:
    if device.type == "meta":
        return False
    if os.environ.get("IDID_KERNELS_CHECK_LABELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_labels(labels, n: int, num_classes: int, device: torch.device, ignore_index: int | None = None,
                 name: str = "labels") -> torch.Tensor:
    """A 1-D integer tensor of length ``n`` on ``device`` with values in [0, num_classes) or
    ``ignore_index``; returned as int64 (a new tensor if it had another integer dtype)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the batch has {n} rows")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    if labels.dtype != torch.int64:
        labels = labels.to(torch.int64)
    if _label_check_enabled(device) and labels.numel() > 0:
        # One reduction decides the common case (every label in range); only a batch whose extremes
        # fall outside (ignored rows, or a bad label) is checked element by element.
        lo, hi = torch.aminmax(labels)
        lo, hi = (lo.item(), hi.item()) if labels.device.type == "cpu" else torch.stack((lo, hi)).tolist()
        if lo < 0 or hi >= num_classes:
            _check_label_values(labels, num_classes, ignore_index, name)
    return labels


def _check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int | None, name: str) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        allowed = f"[0, {num_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name}[{index}] = {int(labels[index])} is out of range: labels must be in {allowed}")
