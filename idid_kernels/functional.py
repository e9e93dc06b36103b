"""Functional API: validate arguments once, pick a backend, call it.

Every function takes ``backend="auto" | "reference" | "cpp" | "cuda" | "triton"``. ``"auto"`` picks
the fastest backend that is available here, has a kernel for the op and runs on the inputs'
device; naming a backend that cannot run raises
:class:`~idid_kernels._backends.BackendUnavailableError` (or NotImplementedError when it exists but
has no kernel for that op yet). The math of each op is in its reference implementation
(:mod:`idid_kernels.reference`) and in spec/cm_margin.md and spec/idid.md.
"""
from __future__ import annotations

import functools

import torch

from . import reference as ref
from .reference import heads as ref_heads
from ._backends import op_namespace, select_backend
from ._validation import (
    check_bool, check_choice, check_class_weight, check_finite, check_int, check_labels, check_matrix,
    check_nonnegative, check_positive, check_row_vector, check_same,
)
from .reference.cm_margin import CONTRACTIONS, REDUCTIONS
from .reference.margins import MARGIN_GRADS, MarginParams, check_margin_numbers, resolve_row_margins


# The cpp and cuda backends share these wrappers of the C++ ops; ``ns`` is the library whose
# kernels run (_backends.op_namespace: the emulated CUDA kernels on CPU tensors have their own).
def _norm_contraction_ext(x, offset, temperature, ns="idid_kernels"):
    from .ops.norm_contraction import norm_contraction as op
    return op(x, offset, temperature, ns=ns)


def _cm_margin_loss_ext(x, weight, labels, *, params, ns="idid_kernels", **kwargs):
    from .ops.cm_margin import cm_margin_loss as op
    return op(x, weight, labels, params, ns=ns, **kwargs)


def _pairwise_cosine_ext(x, y, ns="idid_kernels"):
    from .ops.pairwise_cosine import pairwise_cosine as op
    return op(x, y, ns=ns)


def _norm_contraction_triton(x, offset, temperature):
    from .triton.norm_contraction import norm_contraction as op
    return op(x, offset, temperature)


def _cm_margin_loss_triton(x, weight, labels, *, params, **kwargs):
    from .triton.cm_margin import cm_margin_loss as op
    return op(x, weight, labels, params, **kwargs)


def _pairwise_cosine_triton(x, y):
    from .triton.pairwise_cosine import pairwise_cosine as op
    return op(x, y)


def _class_density_ext(x, labels, num_classes, t, ns="idid_kernels"):
    from .ops.class_density import class_density as op
    return op(x, labels, num_classes, t, ns=ns)


def _class_density_triton(x, labels, num_classes, t):
    from .triton.class_density import class_density as op
    return op(x, labels, num_classes, t)


def _idid_loss_ext(x, proxies, similarity, labels, ns="idid_kernels", **kw):
    from .ops.idid_loss import idid_loss as op
    return op(x, proxies, similarity, labels, ns=ns, **kw)


def _idid_loss_triton(x, proxies, similarity, labels, **kw):
    from .triton.idid_loss import idid_loss as op
    return op(x, proxies, similarity, labels, **kw)


# The margin heads on a fused backend: their per-row margins on O(N) vectors (reference.heads),
# then that backend's cm_margin_loss with the margin as per-row MarginParams (kind "given" there).
_HEAD_CM = dict(contraction="none", norm_offset=0.0, norm_temperature=1.0, detach_norm=False, margin_grad="exact")


def _adaface_fused(cm):
    def run(x, weight, labels, *, batch_mean, batch_std, m, h, s, class_weight, ignore_index, reduction, **ns):
        g_angle, g_add = ref_heads.adaface_margins(x, batch_mean, batch_std, m, h)
        return cm(x, weight, labels, params=MarginParams("adaface", "adaface", m2=g_angle, m3=g_add), s=s,
                  class_weight=class_weight, ignore_index=ignore_index, reduction=reduction, **_HEAD_CM, **ns)
    return run


def _magface_fused(cm):
    def run(x, weight, labels, *, l_a, u_a, l_m, u_m, lambda_g, s, easy_margin, class_weight, ignore_index,
            reduction, **ns):
        a = ref_heads.magface_magnitude(x, l_a, u_a)
        params = MarginParams("combined", "angular", m2=ref_heads.magface_margin(a, l_a, u_a, l_m, u_m),
                              easy_margin=easy_margin)
        ce = cm(x, weight, labels, params=params, s=s, class_weight=class_weight, ignore_index=ignore_index,
                reduction=reduction, **_HEAD_CM, **ns)
        return ce + (lambda_g * ref_heads.magface_regularizer(a, labels, u_a, ignore_index, reduction)).to(ce.dtype)
    return run


def _ldam_fused(cm):
    def run(x, weight, labels, class_margin, *, s, class_weight, ignore_index, reduction, **ns):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        safe = torch.where((labels >= 0) & (labels < weight.shape[0]), labels, torch.zeros_like(labels))
        params = MarginParams("cosface", "cosface", m3=class_margin.to(acc)[safe])
        return cm(x, weight, labels, params=params, s=s, class_weight=class_weight, ignore_index=ignore_index,
                  reduction=reduction, **_HEAD_CM, **ns)
    return run


def _head_kernels(fused, reference_fn):
    return {"reference": reference_fn, "cpp": fused(_cm_margin_loss_ext), "cuda": fused(_cm_margin_loss_ext),
            "triton": fused(_cm_margin_loss_triton)}


# op -> backend -> callable taking the validated arguments of the public function.
_KERNELS = {
    "norm_contraction": {"reference": ref.norm_contraction, "cpp": _norm_contraction_ext,
                         "cuda": _norm_contraction_ext, "triton": _norm_contraction_triton},
    "pairwise_cosine": {"reference": ref.pairwise_cosine, "cpp": _pairwise_cosine_ext, "cuda": _pairwise_cosine_ext,
                        "triton": _pairwise_cosine_triton},
    "class_density": {"reference": ref.class_density, "cpp": _class_density_ext, "cuda": _class_density_ext,
                      "triton": _class_density_triton},
    "cm_margin_loss": {"reference": ref.cm_margin_loss_params, "cpp": _cm_margin_loss_ext, "cuda": _cm_margin_loss_ext,
                       "triton": _cm_margin_loss_triton},
    "idid_loss": {"reference": ref.idid_loss, "cpp": _idid_loss_ext, "cuda": _idid_loss_ext,
                  "triton": _idid_loss_triton},
    "adaface_loss": _head_kernels(_adaface_fused, ref_heads.adaface_loss),
    "magface_loss": _head_kernels(_magface_fused, ref_heads.magface_loss),
    "ldam_loss": _head_kernels(_ldam_fused, ref_heads.ldam_loss),
}


def _kernel(op: str, backend: str, device: torch.device):
    chosen = select_backend(op, backend, device)
    kernel = _KERNELS[op][chosen]
    ns = op_namespace(chosen, device)
    if ns != "idid_kernels":
        return functools.partial(kernel, ns=ns)
    return kernel


def check_cm_inputs(x, weight) -> None:
    """x (N, d) and weight (C, d), C >= 2, same dtype and device."""
    check_matrix("x", x)
    check_matrix("weight", weight, cols=x.shape[1], cols_of="the feature dimension of x")
    check_same("x", x, weight=weight)
    if weight.shape[0] < 2:
        raise ValueError(f"weight has {weight.shape[0]} class row(s); a softmax loss needs C >= 2")


def validate_cm_config(*, s, margin, m, m1, m2, m3, sphere_lambda, easy_margin, contraction, norm_offset,
                       norm_temperature, margin_grad, reduction, ignore_index):
    """Check the scalar keywords of :func:`cm_margin_loss`; returns the resolved margin."""
    check_positive("s", s)
    check_bool("easy_margin", easy_margin)
    # per-row (tensor) m2/m3: their shape is checked by cm_margin_loss, which knows N
    numbers = {name: 0.0 if isinstance(value, torch.Tensor) else value for name, value in (("m2", m2), ("m3", m3))}
    check_margin_numbers(m=m, m1=m1, sphere_lambda=sphere_lambda, **numbers)
    for name, value in (("m", m), ("m1", m1), *numbers.items(), ("sphere_lambda", sphere_lambda)):
        if value is not None:
            check_finite(name, value)
    params = resolve_row_margins(margin, m, m1, m2, m3, sphere_lambda, easy_margin)
    check_choice("contraction", contraction, CONTRACTIONS)
    check_finite("norm_offset", norm_offset)
    check_positive("norm_temperature", norm_temperature)
    check_choice("margin_grad", margin_grad, MARGIN_GRADS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_int("ignore_index", ignore_index)
    return params


def validate_idid_config(*, alpha, tau, t, eps, diversity_weight, ignore_index, distillation=True, diversity=True,
                         adaptive_weight=True, class_balanced=True, return_terms=False):
    """Check the scalar keywords of :func:`idid_loss`."""
    for name, value in (("distillation", distillation), ("diversity", diversity),
                        ("adaptive_weight", adaptive_weight), ("class_balanced", class_balanced),
                        ("return_terms", return_terms)):
        check_bool(name, value)
    check_positive("alpha", alpha)
    check_positive("tau", tau)
    check_positive("t", t)
    check_positive("eps", eps)
    check_nonnegative("diversity_weight", diversity_weight)
    check_int("ignore_index", ignore_index)


def cm_margin_loss(x, weight, labels, *, s=30.0, margin="cosface", m=None, m1=1.0, m2=0.0, m3=0.0,
                   sphere_lambda=0.0, easy_margin=False, contraction="sigmoid", norm_offset=0.0,
                   norm_temperature=1.0, detach_norm=False, margin_grad="exact", class_weight=None,
                   ignore_index=-100, reduction="mean", backend="auto"):
    """Contraction-mapped margin-softmax loss (Liu et al. 2024, doi:10.1016/j.patrec.2024.08.016).

    Logits z_nj = s * sigmoid((||x_n|| - norm_offset) / norm_temperature) * psi_nj, where psi is the
    cosine <x_n/||x_n||, w_j/||w_j||> with the margin ``phi`` applied to the target column; then
    cross-entropy with ``F.cross_entropy``'s ``weight``/``ignore_index``/``reduction`` semantics.

    Args:
        x: (N, d) features. weight: (C, d) class weights, same dtype and device.
        labels: (N,) int64 in [0, C) or ``ignore_index``.
        s: logit scale. margin: "none" | "cosface" | "arcface" | "combined" | "sphereface".
        m: the preset's margin (cosface 0.4, arcface 0.5, sphereface 4 by default; radians).
        m1, m2, m3: cos(m1 theta + m2) - m3 for ``margin="combined"``. ``m2`` and ``m3`` may be (N,)
            floating tensors on x's device: per-row margins, differentiable (each backend returns
            d loss / d m2_n and d m3_n when they require grad). Their values are not checked (a
            NaN margin gives that row a NaN loss).
        sphere_lambda: SphereFace's blend with the plain cosine. easy_margin: keep c <= 0 unmargined
            (arcface/combined).
        contraction: "sigmoid" (the paper) or "none" (a_n = s). norm_offset, norm_temperature: the
            sigmoid's shift and temperature. detach_norm: no gradient through the norm.
        margin_grad: "exact" phi'(c) or "straight_through" (phi' = 1, InsightFace's behaviour).
        class_weight: optional (C,) per-class weight. reduction: "mean" | "sum" | "none".
        backend: see the module docstring.

    Returns:
        A scalar for "mean"/"sum", (N,) for "none". Only the CosFace head (s=30, m=0.4, sigmoid) is
        the authors' published code; the other combinations are this package's derivation.
    """
    check_cm_inputs(x, weight)
    n = x.shape[0]
    params = validate_cm_config(s=s, margin=margin, m=m, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda,
                                easy_margin=easy_margin, contraction=contraction, norm_offset=norm_offset,
                                norm_temperature=norm_temperature, margin_grad=margin_grad, reduction=reduction,
                                ignore_index=ignore_index)
    for name, value in (("m2", m2), ("m3", m3)):
        if isinstance(value, torch.Tensor):
            check_row_vector(name, value, n, x.device)
    return _cm_margin_loss_params(x, weight, labels, params, s=s, contraction=contraction, norm_offset=norm_offset,
                                  norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                                  class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                                  backend=backend)


def _cm_margin_loss_params(x, weight, labels, params: MarginParams, *, s, contraction, norm_offset, norm_temperature,
                           detach_norm, margin_grad, class_weight, ignore_index, reduction, backend):
    """:func:`cm_margin_loss` with the margin resolved (the margin heads of :mod:`idid_kernels.nn`
    call this with theirs); x, weight and the scalar keywords are already checked."""
    num_classes = weight.shape[0]
    check_bool("detach_norm", detach_norm)
    check_class_weight(class_weight, num_classes, x.device)
    labels = check_labels(labels, x.shape[0], num_classes, x.device, ignore_index)
    kernel = _kernel("cm_margin_loss", backend, x.device)
    return kernel(x, weight, labels, params=params, s=s, contraction=contraction, norm_offset=norm_offset,
                  norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                  class_weight=class_weight, ignore_index=ignore_index, reduction=reduction)


def _check_head(x, weight, labels, *, s, class_weight, ignore_index, reduction):
    """The checks every margin head shares; returns the checked labels."""
    check_cm_inputs(x, weight)
    check_positive("s", s)
    check_choice("reduction", reduction, REDUCTIONS)
    check_int("ignore_index", ignore_index)
    check_class_weight(class_weight, weight.shape[0], x.device)
    return check_labels(labels, x.shape[0], weight.shape[0], x.device, ignore_index)


def _check_statistic(name, value, device):
    """A float, or a one-element floating tensor on ``device`` (a module's running buffer)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a real number or a one-element floating tensor, "
                             f"got shape {tuple(value.shape)} {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}")
        return value.reshape(())
    return check_finite(name, value)


def adaface_loss(x, weight, labels, *, batch_mean=20.0, batch_std=100.0, m=0.4, h=0.333, s=64.0,
                 class_weight=None, ignore_index=-100, reduction="mean", backend="auto"):
    """AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality through the feature norm.

    Per row, with r_n = clip(||x_n||, 0.001, 100) (detached) and the running norm statistics
    ``batch_mean`` / ``batch_std`` (floats or one-element tensors; :class:`~idid_kernels.AdaFaceLoss`
    keeps and updates them): scaler = clip(h (r - batch_mean) / (batch_std + 1e-3), -1, 1), target
    cos(clip(theta - m scaler, 1e-3, pi - 1e-3)) - (m + m scaler), logits s * cos, cross-entropy.
    The fused backends clamp the target cosine to +-(1 - 1e-3) as the official head, but not the
    off-target ones (the reference backend, the official formula, clamps all of them).
    """
    labels = _check_head(x, weight, labels, s=s, class_weight=class_weight, ignore_index=ignore_index,
                         reduction=reduction)
    batch_mean = _check_statistic("batch_mean", batch_mean, x.device)
    batch_std = _check_statistic("batch_std", batch_std, x.device)
    if not isinstance(batch_std, torch.Tensor):  # (a tensor's value is not read: no host sync)
        check_nonnegative("batch_std", batch_std)
    m, h = check_finite("m", m), check_finite("h", h)
    return _kernel("adaface_loss", backend, x.device)(
        x, weight, labels, batch_mean=batch_mean, batch_std=batch_std, m=m, h=h, s=s, class_weight=class_weight,
        ignore_index=ignore_index, reduction=reduction)


def magface_loss(x, weight, labels, *, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, s=64.0,
                 easy_margin=True, class_weight=None, ignore_index=-100, reduction="mean", backend="auto"):
    """MagFace (Meng et al., CVPR 2021): an ArcFace margin that grows with the feature magnitude.

    a_n = clamp(||x_n||, l_a, u_a) (differentiable inside), m(a) linear from l_m to u_m, target
    cos(theta + m(a_n)) (``easy_margin``: c where c <= 0; else c - m sin(m) where theta + m > pi),
    loss = CE(s psi) + lambda_g * g(a) with g(a) = a / u_a^2 + 1 / a reduced like the loss (its mean
    over counted rows for "mean"). The margin's gradient reaches x through a_n.
    """
    labels = _check_head(x, weight, labels, s=s, class_weight=class_weight, ignore_index=ignore_index,
                         reduction=reduction)
    l_a, u_a = check_positive("l_a", l_a), check_positive("u_a", u_a)
    if not u_a > l_a:
        raise ValueError(f"u_a must exceed l_a, got l_a={l_a!r}, u_a={u_a!r}")
    l_m, u_m, lambda_g = check_finite("l_m", l_m), check_finite("u_m", u_m), check_finite("lambda_g", lambda_g)
    easy_margin = check_bool("easy_margin", easy_margin)
    return _kernel("magface_loss", backend, x.device)(
        x, weight, labels, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m, lambda_g=lambda_g, s=s, easy_margin=easy_margin,
        class_weight=class_weight, ignore_index=ignore_index, reduction=reduction)


def ldam_loss(x, weight, labels, class_margin, *, s=30.0, class_weight=None, ignore_index=-100, reduction="mean",
              backend="auto"):
    """LDAM (Cao et al., NeurIPS 2019): the target cosine minus its class's margin ``class_margin``
    (C,) (:func:`idid_kernels.reference.heads.ldam_margins` forms max_m n_j^(-1/4) / max_k n_k^(-1/4)
    from class counts; a margin that requires grad is learned), logits s * psi, cross-entropy with
    ``class_weight`` (deferred re-weighting)."""
    labels = _check_head(x, weight, labels, s=s, class_weight=class_weight, ignore_index=ignore_index,
                         reduction=reduction)
    check_row_vector("class_margin", class_margin, weight.shape[0], x.device, per="class")
    return _kernel("ldam_loss", backend, x.device)(x, weight, labels, class_margin, s=s, class_weight=class_weight,
                                                   ignore_index=ignore_index, reduction=reduction)


def idid_loss(x, proxies, similarity, labels, *, alpha=16.0, tau=1.0, t=2.0, eps=1e-8, distillation=True,
              diversity=True, adaptive_weight=True, diversity_weight=1.0, class_balanced=True,
              ignore_index=-100, return_terms=False, backend="auto"):
    """IDID-R1 loss: this package's reconstruction of Du et al.'s IDID loss (IEEE TNNLS 2024,
    doi:10.1109/tnnls.2023.3286484) from the paper's abstract (the equations are not public).

    loss = L_IC + lambda * L_ID with L_IC the class-balanced proxy softmax plus the KL distillation
    from a learnable class similarity, L_ID the mean within-class density, lambda the adaptive
    weight stopgrad(L_IC) / (stopgrad(L_ID) + eps). See :mod:`idid_kernels.reference.idid`.

    Args:
        x: (B, d) embeddings. proxies: (C, d) class proxies. similarity: (C, C) learnable class
            similarity (symmetrised; the diagonal is unused). labels: (B,) int64 or ``ignore_index``.
        alpha: logit scale. tau: distillation temperature. t: diversity-kernel sharpness.
        eps: in the adaptive weight's denominator.
        distillation, diversity, adaptive_weight, class_balanced: switch each part (ablations);
            ``adaptive_weight=False`` uses the fixed ``diversity_weight``.
        return_terms: also return L_IC, L_ID and lambda (an :class:`IDIDTerms`).
        backend: see the module docstring.
    """
    check_matrix("x", x)
    b, d = x.shape
    check_matrix("proxies", proxies, cols=d, cols_of="the feature dimension of x")
    num_classes = proxies.shape[0]
    if num_classes < 2:
        raise ValueError(f"proxies has {num_classes} class row(s); IDID needs C >= 2")
    check_matrix("similarity", similarity, rows=num_classes, cols=num_classes, rows_of="one per class",
                 cols_of="one per class")
    check_same("x", x, proxies=proxies, similarity=similarity)
    validate_idid_config(alpha=alpha, tau=tau, t=t, eps=eps, diversity_weight=diversity_weight,
                         ignore_index=ignore_index, distillation=distillation, diversity=diversity,
                         adaptive_weight=adaptive_weight, class_balanced=class_balanced, return_terms=return_terms)
    labels = check_labels(labels, b, num_classes, x.device, ignore_index)
    kernel = _kernel("idid_loss", backend, x.device)
    return kernel(x, proxies, similarity, labels, alpha=alpha, tau=tau, t=t, eps=eps, distillation=distillation,
                  diversity=diversity, adaptive_weight=adaptive_weight, diversity_weight=diversity_weight,
                  class_balanced=class_balanced, ignore_index=ignore_index, return_terms=return_terms)


def pairwise_cosine(x, y=None, *, backend="auto"):
    """Cosine similarities S_ij = <x_i/||x_i||, y_j/||y_j||>, shape (N, M); ``y=None`` means y = x."""
    check_matrix("x", x)
    if y is not None:
        check_matrix("y", y, cols=x.shape[1], cols_of="the feature dimension of x")
        check_same("x", x, y=y)
    return _kernel("pairwise_cosine", backend, x.device)(x, y)


def class_density(x, labels, num_classes, *, t=2.0, backend="auto"):
    """Per-class density D_c (C,): mean of exp(t (cos_ij - 1)) over ordered same-class pairs i != j;
    0 for classes with fewer than two rows (spec/idid.md). Labels must lie in [0, num_classes)."""
    check_matrix("x", x)
    num_classes = check_int("num_classes", num_classes, minimum=1)
    check_positive("t", t)
    labels = check_labels(labels, x.shape[0], num_classes, x.device)
    return _kernel("class_density", backend, x.device)(x, labels, num_classes, t)


def norm_contraction(x, *, offset=0.0, temperature=1.0, backend="auto"):
    """sigmoid((||x_n|| - offset) / temperature), shape (N,): the contraction of feature norms."""
    check_matrix("x", x)
    offset = check_finite("offset", offset)
    temperature = check_positive("temperature", temperature)
    return _kernel("norm_contraction", backend, x.device)(x, offset, temperature)
