"""The CPU kernels' kept scratch block (csrc/cpu/scratch.h).

The fused ``cm_margin_loss`` on a CPU works in a chunk of logits of up to the chunk budget
(``IDID_KERNELS_CHUNK_MB``, 256 MiB by default). A fresh buffer of that size is a fresh memory
mapping that the kernel faults in page by page on every call, so one block is kept between calls,
as GPU libraries keep their workspaces. :func:`empty_cache` frees it; :func:`keep_scratch` (or
``IDID_KERNELS_KEEP_SCRATCH=0`` in the environment) turns the keeping off.
"""
from __future__ import annotations

from ._backends import extension as _ext


def empty_cache() -> int:
    """Free the CPU scratch block kept between calls; returns the bytes freed (0 without the extension,
    and 0 while a call or a ``reduction="none"`` graph of ``cm_margin_loss``, whose kept logit
    gradients live on the block until its backward, holds it)."""
    ext = _ext()
    return 0 if ext is None else int(ext.scratch_release())


def scratch_bytes() -> int:
    """Bytes of the CPU scratch block kept between calls (0 when none)."""
    ext = _ext()
    return 0 if ext is None else int(ext.scratch_bytes())


def keep_scratch(keep: bool | None = None) -> bool:
    """Whether the CPU kernels keep their scratch block between calls; ``keep`` sets it (False frees
    the block, or, while something holds it, lets it go when that ends). Returns the setting in
    force. Without the extension there is nothing to keep: False."""
    ext = _ext()
    if ext is None:
        return False
    if keep is None:
        return bool(ext.scratch_keep())
    if not isinstance(keep, bool):
        raise TypeError(f"keep must be a bool or None, got {type(keep).__name__}")
    return bool(ext.scratch_keep(keep))
