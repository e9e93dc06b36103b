"""The memory budget of one chunk of logits, shared by the fused ``cm_margin_loss`` and ``idid_loss``.

The C++/CUDA kernels never hold the full (N, C) logits: they process them a chunk of rows at a time,
in a buffer of at most ``IDID_KERNELS_CHUNK_MB`` MiB (accumulation-dtype values). The default, 256 MiB on
both, holds enough rows that the GEMMs run at full rate: each chunk streams all of W (C x d) through
its three GEMMs again, so at C = 50000, d = 256 the 32 MiB of an earlier default (167 rows) cost a
two-core CPU 1.3x the time of one 1024-row chunk. On a CPU the buffer is the kept scratch block
(:mod:`idid_kernels._scratch`).

The variable is read and validated once, on first use; :func:`reload` reads it again now and
:func:`reset` at the next use (tests that change the variable call one of them). The old
``IDID_KERNELS_CHUNK_ROWS`` (rows of the IDID op) was replaced by this budget: setting it is an error
rather than silently ignored.
"""
from __future__ import annotations

import math
import os

ENV = "IDID_KERNELS_CHUNK_MB"
REMOVED_ENV = "IDID_KERNELS_CHUNK_ROWS"
DEFAULT_MB = 256.0  # every device

_UNREAD = object()
_budget_mb = _UNREAD  # float MiB from the environment, None for the per-device default


def _parse() -> float | None:
    if REMOVED_ENV in os.environ:
        raise ValueError(f"{REMOVED_ENV}={os.environ[REMOVED_ENV]!r} is no longer read: it was replaced by {ENV} "
                         f"(MiB of one chunk of logits, for cm_margin_loss and idid_loss alike); unset {REMOVED_ENV} "
                         f"and set {ENV} instead")
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return None
    try:
        mb = float(raw)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{ENV} must be a finite number of MiB > 0, got {raw!r}")
    return mb


def reset() -> None:
    """Forget the value read: the next use reads the environment again."""
    global _budget_mb
    _budget_mb = _UNREAD


def reload() -> None:
    """Read and validate the environment variables again now (ValueError for a bad value)."""
    global _budget_mb
    reset()
    _budget_mb = _parse()


def budget_mb(device_type: str) -> float:
    """MiB of one chunk of logits on a ``device_type`` ("cpu", "cuda") device (the same on every device)."""
    global _budget_mb
    if _budget_mb is _UNREAD:
        _budget_mb = _parse()
    return DEFAULT_MB if _budget_mb is None else _budget_mb


def rows_for(row_values: int, itemsize: int, device_type: str) -> int:
    """Rows of ``row_values`` values of ``itemsize`` bytes each that fit the budget (at least 1)."""
    return max(1, int(budget_mb(device_type) * 2**20) // max(1, row_values * itemsize))
