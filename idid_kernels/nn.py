"""nn.Module wrappers that own the loss parameters and call :mod:`idid_kernels.functional`.

Configuration is validated when the module is built, so a typo fails at construction rather than
at the first training step.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._backends import BACKEND_CHOICES
from ._validation import check_bool, check_choice, check_int


def _as_dtype(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The parameter in the features' dtype. Under autocast (or a bf16 backbone with fp32 loss
    parameters) the features arrive in half precision: the cast is differentiable, so the
    parameter's gradient still lands in its own (float32) dtype."""
    return param if param.dtype == x.dtype else param.to(x.dtype)


class CMMarginLoss(nn.Module):
    """Contraction-mapped margin-softmax head + loss (Liu et al. 2024, doi:10.1016/j.patrec.2024.08.016).

    Owns ``weight`` (C, d), initialised xavier-uniform as in the authors' code. ``forward(x, labels)``
    returns :func:`idid_kernels.cm_margin_loss` with the keywords given here (``margin="cosface"``,
    ``s=30``, ``m=0.4`` and sigmoid contraction are the authors' head). ``class_weight`` is kept as a
    buffer so it follows ``.to(device)``.

    Inference helpers: :meth:`cosine` (N, C) raw cosines, :meth:`logits` ``s * cosine`` (no margin,
    no contraction: argmax is unchanged by the positive row scale), :meth:`feature_norm` ||x_n||,
    a quality score.
    """

    def __init__(self, in_features: int, num_classes: int, *, s=30.0, margin="cosface", m=None, m1=1.0, m2=0.0,
                 m3=0.0, sphere_lambda=0.0, easy_margin=False, contraction="sigmoid", norm_offset=0.0,
                 norm_temperature=1.0, detach_norm=False, margin_grad="exact", class_weight=None,
                 ignore_index=-100, reduction="mean", backend="auto", device=None, dtype=None):
        super().__init__()
        in_features = check_int("in_features", in_features, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=2)
        self.config = dict(s=s, margin=margin, m=m, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda,
                           easy_margin=easy_margin, contraction=contraction, norm_offset=norm_offset,
                           norm_temperature=norm_temperature, margin_grad=margin_grad, reduction=reduction,
                           ignore_index=ignore_index)
        F.validate_cm_config(**self.config)
        check_bool("detach_norm", detach_norm)
        check_choice("backend", backend, BACKEND_CHOICES)
        self.config.update(detach_norm=detach_norm, backend=backend)
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.weight)
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.shape != (num_classes,):
                raise ValueError(f"class_weight must have shape ({num_classes},), got {tuple(class_weight.shape)}")
            class_weight = class_weight.to(device)
        self.register_buffer("class_weight", class_weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cw = None if self.class_weight is None else self.class_weight.to(x.dtype)
        return F.cm_margin_loss(x, _as_dtype(self.weight, x), labels, class_weight=cw, **self.config)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Raw cosines <x_n/||x_n||, w_j/||w_j||>, shape (N, C)."""
        return F.pairwise_cosine(x, self.weight, backend=self.config["backend"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``s * cosine(x)``, shape (N, C): inference logits without margin or contraction."""
        return self.config["s"] * self.cosine(x)

    def feature_norm(self, x: torch.Tensor) -> torch.Tensor:
        """||x_n||, shape (N,): the quality score the contraction acts on."""
        return torch.linalg.vector_norm(x, dim=1)

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k in ("s", "margin", "m", "contraction"))
        return f"in_features={self.in_features}, num_classes={self.num_classes}, {cfg}"


class IDIDLoss(nn.Module):
    """IDID-R1 loss, this package's reconstruction of Du et al.'s IDID loss (IEEE TNNLS 2024,
    doi:10.1109/tnnls.2023.3286484) from the paper's abstract.

    Owns ``proxies`` (C, d), kaiming-normal, and the learnable class ``similarity`` (C, C), zeros
    (a uniform teacher at the start). ``forward(x, labels)`` returns :func:`idid_kernels.idid_loss`
    with the keywords given here; :meth:`predict` gives the nearest proxy by cosine.
    """

    def __init__(self, in_features: int, num_classes: int, *, alpha=16.0, tau=1.0, t=2.0, eps=1e-8,
                 distillation=True, diversity=True, adaptive_weight=True, diversity_weight=1.0,
                 class_balanced=True, ignore_index=-100, return_terms=False, backend="auto", device=None,
                 dtype=None):
        super().__init__()
        in_features = check_int("in_features", in_features, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=2)
        F.validate_idid_config(alpha=alpha, tau=tau, t=t, eps=eps, diversity_weight=diversity_weight,
                               ignore_index=ignore_index, distillation=distillation, diversity=diversity,
                               adaptive_weight=adaptive_weight, class_balanced=class_balanced,
                               return_terms=return_terms)
        check_choice("backend", backend, BACKEND_CHOICES)
        self.config = dict(alpha=alpha, tau=tau, t=t, eps=eps, distillation=bool(distillation),
                           diversity=bool(diversity), adaptive_weight=bool(adaptive_weight),
                           diversity_weight=diversity_weight, class_balanced=bool(class_balanced),
                           ignore_index=ignore_index, return_terms=bool(return_terms), backend=backend)
        self.in_features, self.num_classes = in_features, num_classes
        self.proxies = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        nn.init.kaiming_normal_(self.proxies)
        self.similarity = nn.Parameter(torch.zeros(num_classes, num_classes, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        return F.idid_loss(x, _as_dtype(self.proxies, x), _as_dtype(self.similarity, x), labels, **self.config)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class of the most similar proxy, shape (N,) int64."""
        return F.pairwise_cosine(x, self.proxies, backend=self.config["backend"]).argmax(dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"alpha={self.config['alpha']}, tau={self.config['tau']}, t={self.config['t']}")
