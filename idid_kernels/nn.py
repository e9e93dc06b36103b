"""nn.Module wrappers that own the loss parameters and call :mod:`idid_kernels.functional`.

Configuration is validated when the module is built, so a typo fails at construction rather than
at the first training step.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._backends import BACKEND_CHOICES
from ._validation import check_bool, check_choice, check_finite, check_int, check_positive
from .reference import heads as ref_heads
from .reference.cm_margin import REDUCTIONS


def _as_dtype(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The parameter in the features' dtype. Under autocast (or a bf16 backbone with fp32 loss
    parameters) the features arrive in half precision: the cast is differentiable, so the
    parameter's gradient still lands in its own (float32) dtype."""
    return param if param.dtype == x.dtype else param.to(x.dtype)


def _unit_rows_init(weight: torch.Tensor) -> None:
    """uniform(-1, 1), then each class row scaled to unit norm: the init of the official AdaFace,
    MagFace and LDAM heads (``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`` on their (d, C) kernel)."""
    with torch.no_grad():
        weight.uniform_(-1.0, 1.0)
        weight.div_(torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min(1e-12))


class _CosineHead(nn.Module):
    """A (C, d) cosine head: ``weight`` (initialised by ``init``), an optional ``class_weight``
    buffer (it follows ``.to(device)``), and the inference helpers :meth:`cosine`, :meth:`logits`
    and :meth:`feature_norm`."""

    def __init__(self, in_features, num_classes, *, s, backend, class_weight, init, device, dtype):
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.s = check_positive("s", s)
        check_choice("backend", backend, BACKEND_CHOICES)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        init(self.weight)
        self.register_buffer("class_weight", None)
        self.set_class_weight(class_weight)

    def set_class_weight(self, class_weight) -> None:
        """Replace the cross-entropy class weights ((C,), or None to drop them)."""
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32, device=self.weight.device)
            if class_weight.shape != (self.num_classes,):
                raise ValueError(f"class_weight must have shape ({self.num_classes},), "
                                 f"got {tuple(class_weight.shape)}")
        self.class_weight = class_weight

    def _class_weight(self, x: torch.Tensor):
        return None if self.class_weight is None else self.class_weight.to(x.dtype)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Raw cosines <x_n/||x_n||, w_j/||w_j||>, shape (N, C)."""
        return F.pairwise_cosine(x, self.weight, backend=self.backend)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``s * cosine(x)``, shape (N, C): inference logits without margin or contraction (argmax
        is unchanged by a positive row scale)."""
        return self.s * self.cosine(x)

    def feature_norm(self, x: torch.Tensor) -> torch.Tensor:
        """||x_n||, shape (N,): the quality score these heads act on."""
        return torch.linalg.vector_norm(x, dim=1)


class CMMarginLoss(_CosineHead):
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
        for name, value in (("m2", m2), ("m3", m3)):
            if isinstance(value, torch.Tensor):
                raise TypeError(f"CMMarginLoss takes a scalar {name}; per-row {name} tensors belong to one batch: "
                                f"pass them to idid_kernels.cm_margin_loss")
        self.config = dict(s=s, margin=margin, m=m, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda,
                           easy_margin=easy_margin, contraction=contraction, norm_offset=norm_offset,
                           norm_temperature=norm_temperature, margin_grad=margin_grad, reduction=reduction,
                           ignore_index=ignore_index)
        F.validate_cm_config(**self.config)
        check_bool("detach_norm", detach_norm)
        super().__init__(in_features, num_classes, s=s, backend=backend, class_weight=class_weight,
                         init=nn.init.xavier_uniform_, device=device, dtype=dtype)
        self.config.update(detach_norm=detach_norm, backend=backend)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cm_margin_loss(x, _as_dtype(self.weight, x), labels, class_weight=self._class_weight(x),
                                **self.config)

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


# ---- margin heads that read image quality from the feature norm, and LDAM ----------------------------


class _MarginHead(_CosineHead):
    """A cosine head (official init: unit rows) whose subclass calls its functional form
    (:func:`idid_kernels.adaface_loss`, ...), which every backend runs on its cm_margin_loss kernels
    with per-row margins."""

    def __init__(self, in_features, num_classes, *, s, class_weight, ignore_index, reduction, backend, device, dtype):
        super().__init__(in_features, num_classes, s=s, backend=backend, class_weight=class_weight,
                         init=_unit_rows_init, device=device, dtype=dtype)
        check_choice("reduction", reduction, REDUCTIONS)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.reduction = reduction

    def _common(self, x: torch.Tensor) -> dict:
        """The weight in x's dtype and the keywords every head passes to its functional form."""
        return dict(weight=_as_dtype(self.weight, x), s=self.s, class_weight=self._class_weight(x),
                    ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}"


class AdaFaceLoss(_MarginHead):
    """AdaFace head + loss: M. Kim, A. K. Jain, X. Liu, *AdaFace: Quality Adaptive Margin for Face
    Recognition*, CVPR 2022 (official code: mk-minchul/AdaFace, ``head.py``).

    The margin adapts to image quality through the feature norm, standardised by running batch
    statistics. Per row n, with the norm r_n = ||x_n|| clipped to [0.001, 100] and detached:

        scaler_n = clip(h (r_n - batch_mean) / (batch_std + 1e-3), -1, 1)
        g_angle = -m scaler_n,   g_add = m + m scaler_n
        target:  cos(clip(theta + g_angle, 1e-3, pi - 1e-3)) - g_add,  c clamped to +-(1 - 1e-3)
        logits = s * cos (target margined), then cross-entropy

    ``batch_mean`` and ``batch_std`` (buffers, initially 20 and 100) follow an EMA with rate
    ``t_alpha`` of the batch mean and unbiased std of the clipped norms, updated in training mode
    before the margins are formed. ``x`` is the raw feature: the head takes its norm itself.

    Departures from the official head: its cosines are clamped to +-(1 - 1e-3) in every column;
    here the target column only (an off-target cosine beyond 0.999 keeps its value, where the
    official logit saturates and has no gradient). The statistics are not updated for a batch of
    one row (the official std would be NaN) nor in eval mode.
    """

    def __init__(self, in_features: int, num_classes: int, m: float = 0.4, h: float = 0.333, s: float = 64.0,
                 t_alpha: float = 0.01, *, class_weight=None, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, num_classes, s=s, class_weight=class_weight, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, device=device, dtype=dtype)
        self.m = check_finite("m", m)
        self.h = check_finite("h", h)
        self.t_alpha = check_finite("t_alpha", t_alpha)
        if not 0.0 <= self.t_alpha <= 1.0:
            raise ValueError(f"t_alpha must lie in [0, 1], got {t_alpha!r}")
        self.register_buffer("batch_mean", torch.full((1,), 20.0, device=device))
        self.register_buffer("batch_std", torch.full((1,), 100.0, device=device))

    def margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_angle, g_add), each (N,), from the current statistics (no update)."""
        return ref_heads.adaface_margins(x, self.batch_mean, self.batch_std, self.m, self.h)

    @torch.no_grad()
    def update_statistics(self, x: torch.Tensor) -> None:
        """The EMA step of ``batch_mean``/``batch_std`` with the batch's clipped norms."""
        if x.shape[0] < 2:
            return
        norms = ref_heads.adaface_norms(x).to(self.batch_mean.dtype)
        self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * norms.mean())
        self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * norms.std())

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_statistics(x)
        return F.adaface_loss(x, labels=labels, batch_mean=self.batch_mean, batch_std=self.batch_std, m=self.m,
                              h=self.h, **self._common(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


class MagFaceLoss(_MarginHead):
    """MagFace head + loss: Q. Meng, S. Zhao, Z. Huang, F. Zhou, *MagFace: A Universal Representation
    for Face Recognition and Quality Assessment*, CVPR 2021 (official code: IrvingMeng/MagFace,
    ``MagLinear`` and ``MagLoss``).

    The feature magnitude a_n = clamp(||x_n||, l_a, u_a) (differentiable inside the range) sets an
    ArcFace margin m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a), and a regulariser rewards large
    magnitudes for confident samples:

        target:  cos(theta + m(a_n))   (easy_margin: c where c <= 0; otherwise the hard fallback
                 c - m sin(m) where theta + m > pi)
        loss = CE(s * psi) + lambda_g * mean_n (a_n / u_a^2 + 1 / a_n)

    The margin's gradient reaches x through a_n (the kernels return d loss / d m_n). The official
    code clamps every cosine to [-1, 1]; here the arccos of the target is taken at
    +-(1 - 1e-7) (the package's clamp, so that phi' stays finite), and off-target cosines are used
    as computed. ``reduction="none"`` gives the per-row CE plus lambda_g times each row's own
    regulariser; "sum" sums both over the rows. Ignored rows count in neither.
    """

    def __init__(self, in_features: int, num_classes: int, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, s: float = 64.0,
                 easy_margin: bool = True, *, class_weight=None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, num_classes, s=s, class_weight=class_weight, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, device=device, dtype=dtype)
        self.l_a, self.u_a = check_positive("l_a", l_a), check_positive("u_a", u_a)
        if not self.u_a > self.l_a:
            raise ValueError(f"u_a must exceed l_a, got l_a={l_a!r}, u_a={u_a!r}")
        self.l_m, self.u_m = check_finite("l_m", l_m), check_finite("u_m", u_m)
        self.lambda_g = check_finite("lambda_g", lambda_g)
        self.easy_margin = check_bool("easy_margin", easy_margin)

    def magnitude(self, x: torch.Tensor) -> torch.Tensor:
        """a_n = clamp(||x_n||, l_a, u_a), (N,), differentiable, in float32 (float64 for float64 x)."""
        return ref_heads.magface_magnitude(x, self.l_a, self.u_a)

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        """m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a)."""
        return ref_heads.magface_margin(a, self.l_a, self.u_a, self.l_m, self.u_m)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.magface_loss(x, labels=labels, l_a=self.l_a, u_a=self.u_a, l_m=self.l_m, u_m=self.u_m,
                              lambda_g=self.lambda_g, easy_margin=self.easy_margin, **self._common(x))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
                f"lambda_g={self.lambda_g}, easy_margin={self.easy_margin}")


class LDAMLoss(_MarginHead):
    """LDAM head + loss: K. Cao, C. Wei, A. Gaidon, N. Arechiga, T. Ma, *Learning Imbalanced Datasets
    with Label-Distribution-Aware Margin Loss*, NeurIPS 2019 (official code: kaidic/LDAM-DRW,
    ``LDAMLoss`` over a ``NormedLinear`` layer).

    Class j gets the margin m_j = max_m * n_j^(-1/4) / max_k n_k^(-1/4) (the rarest class gets
    max_m), subtracted from the target cosine: logits = s * (cos - m_y onehot), then cross-entropy
    with ``class_weight`` (the deferred re-weighting of LDAM-DRW: set it later with
    :meth:`set_class_weight`, e.g. to the effective-number weights after the first stage).

    ``class_counts``: the (C,) training-set class frequencies (all > 0), kept as a buffer; the
    margins (:meth:`class_margin`) are formed from it in the features' accumulation dtype. The
    official head takes cosines from ``NormedLinear``; here the raw feature x.
    """

    def __init__(self, in_features: int, num_classes: int, class_counts, max_m: float = 0.5, s: float = 30.0,
                 class_weight=None, *, ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_features, num_classes, s=s, class_weight=class_weight, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, device=device, dtype=dtype)
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        if counts.shape != (num_classes,):
            raise ValueError(f"class_counts must have shape ({num_classes},), got {tuple(counts.shape)}")
        if not bool((counts > 0).all()) or not bool(torch.isfinite(counts).all()):
            raise ValueError("class_counts must be finite and > 0 for every class")
        self.max_m = check_positive("max_m", max_m)
        self.register_buffer("class_counts", counts.to(torch.float32).to(device))

    def class_margin(self, dtype=torch.float32) -> torch.Tensor:
        """m_j = max_m n_j^(-1/4) / max_k n_k^(-1/4), shape (C,)."""
        return ref_heads.ldam_margins(self.class_counts, self.max_m, dtype)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.ldam_loss(x, labels=labels, class_margin=self.class_margin(acc), **self._common(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_m={self.max_m}"
