"""Helpers shared by the ops' autograd registrations."""
from __future__ import annotations

import torch


def no_double_backward(op: str) -> None:
    """Refuse ``create_graph=True``: the kernels' backward passes are not themselves differentiable,
    and returning gradients whose own derivative is silently 0 would be wrong."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"{op}: double backward (create_graph=True) is not supported by the fused "
                                  "backends; use backend='reference'")
