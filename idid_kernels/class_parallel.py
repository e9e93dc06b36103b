"""Class-parallel ``cm_margin_loss``: the classifier's classes split into shards, one per process.

For heads too large for one device (face recognition with 1M identities), each rank holds the
classes ``[class_offset, class_offset + C_k)`` of the weight and the *whole* batch of features
(typically all-gathered). The C++/CUDA ops then work on one shard and leave per-row partial
statistics that combine across shards with a few O(N) all-reduces (spec/cm_margin.md, Backward):

forward, per shard k (``cm_margin_shard_forward``)
    ``row_max_k = max_j z_nj``, ``sum_exp_k = sum_{j != y_n} exp(z_nj - row_max_k)`` (the target left
    out), ``target_k = z_{n,y_n}`` when y_n is in shard k, else 0. Then M = max_k row_max_k
    (all-reduce MAX), P = sum_k sum_exp_k exp(row_max_k - M) and z_y = sum_k target_k (all-reduce
    SUM), t = M - z_y >= 0: lse = M + log(P + exp(-t)) and loss_n = t + log(P + exp(-t)), written
    log1p(P) when t = 0, so small losses keep their digits (lse - z_y would cancel in float32).
backward, per shard k (``cm_margin_shard_backward``, from the global lse)
    du_k = sum_{j in k} G_nj w^_j (N, d), the radial part s g'(r_n) R_n of shard k, Q_n = <du_k, u_n>,
    and the shard's complete dW_k. Then du, R summed over shards (all-reduce SUM) and
    dx_n = s g'(r_n) R_n u_n + (du_n - Q_n u_n) / max(r_n, 1e-12) with Q_n = <du_n, u_n>.

Extra memory per rank: one chunk of (rows x C_k) logits and O(N d) for du; never N x C.
The target's p_y - 1 is ``expm1(z_y - lse)`` here (the other shards' mass is not visible to the
shard that holds the target), so for rows whose loss is below float32 resolution the target
gradient is less accurate than the single-device op's off-target-mass form.

:func:`cm_margin_loss_class_parallel` is the differentiable loss over a ``torch.distributed`` group
(or a single process when no group is initialised); :func:`shard_stats` and :func:`shard_grads`
expose the per-shard statistics for custom communication schemes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backends
from ._validation import check_bool, check_class_weight, check_int, check_labels, check_matrix, check_same
from .functional import validate_cm_config

__all__ = ["ShardStats", "ShardGrads", "shard_stats", "shard_grads", "combine_stats", "combine_grads",
           "cm_margin_loss_class_parallel"]


class ShardStats(NamedTuple):
    """Per-row partial statistics of one class shard (accumulation dtype)."""
    row_max: torch.Tensor       # (N,) max_j z_nj over the shard (0 for ignored rows)
    sum_exp: torch.Tensor       # (N,) sum_{j != y_n} exp(z_nj - row_max) over the shard (target left out)
    target_logit: torch.Tensor  # (N,) z_{n, y_n} where y_n is in the shard, else 0
    x_norm: torch.Tensor        # (N,) ||x_n||
    w_norm: torch.Tensor        # (C_k,) ||w_j|| of the shard


class ShardGrads(NamedTuple):
    """One shard's part of the backward pass (accumulation dtype; dweight in the weight's dtype)."""
    du: torch.Tensor       # (N, d) sum_{j in shard} G_nj w^_j
    radial: torch.Tensor   # (N,) the shard's part of s g'(r_n) R_n
    q: torch.Tensor        # (N,) Q_n = <du_n, u_n> of the shard
    dweight: torch.Tensor  # (C_k, d) dL/dW of the shard's classes, complete


def _config(weight_shard, x, *, s, margin, m, m1, m2, m3, sphere_lambda, easy_margin, contraction, norm_offset,
            norm_temperature, detach_norm, margin_grad, ignore_index):
    from .ops.cm_margin import config_args
    params = validate_cm_config(s=s, margin=margin, m=m, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda,
                                easy_margin=easy_margin, contraction=contraction, norm_offset=norm_offset,
                                norm_temperature=norm_temperature, margin_grad=margin_grad, reduction="none",
                                ignore_index=ignore_index)
    if params.per_row:
        raise NotImplementedError("per-row (tensor) m2/m3 are not supported by the class-parallel heads; pass "
                                  "scalar margins, or use cm_margin_loss on one device")
    check_bool("detach_norm", detach_norm)
    return config_args(params, s=s, contraction=contraction, norm_offset=norm_offset,
                       norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                       ignore_index=ignore_index, num_classes=weight_shard.shape[0],
                       acc_itemsize=8 if x.dtype == torch.float64 else 4, device_type=x.device.type)


def _require_extension(device: torch.device) -> None:
    backend = "cuda" if device.type == "cuda" else "cpp"
    why = _backends.missing(backend)
    if why is not None:
        raise _backends.BackendUnavailableError(f"class-parallel cm_margin needs the {backend!r} backend: {why}")


def _check_shard(x, weight_shard, labels, class_offset, num_classes, ignore_index):
    check_matrix("x", x)
    n, d = x.shape
    check_matrix("weight_shard", weight_shard, cols=d, cols_of="the feature dimension of x")
    check_same("x", x, weight_shard=weight_shard)
    check_int("num_classes", num_classes, minimum=2)
    check_int("class_offset", class_offset, minimum=0)
    if class_offset + weight_shard.shape[0] > num_classes:
        raise ValueError(f"the shard's classes [{class_offset}, {class_offset + weight_shard.shape[0]}) exceed "
                         f"num_classes={num_classes}")
    check_int("ignore_index", ignore_index)
    _require_extension(x.device)
    return check_labels(labels, n, num_classes, x.device, ignore_index)


_CM_DEFAULTS = dict(s=30.0, margin="cosface", m=None, m1=1.0, m2=0.0, m3=0.0, sphere_lambda=0.0, easy_margin=False,
                    contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0, detach_norm=False,
                    margin_grad="exact", ignore_index=-100)


def shard_stats(x, weight_shard, labels, *, class_offset, num_classes, **cm_kwargs) -> ShardStats:
    """Forward statistics of the classes ``[class_offset, class_offset + C_k)`` (no autograd).

    ``cm_kwargs`` are :func:`idid_kernels.cm_margin_loss`'s margin and contraction keywords.
    """
    kw = {**_CM_DEFAULTS, **cm_kwargs}
    labels = _check_shard(x, weight_shard, labels, class_offset, num_classes, kw["ignore_index"])
    cfg = _config(weight_shard, x, **kw)
    with torch.no_grad():
        return ShardStats(*torch.ops.idid_kernels.cm_margin_shard_forward(x, weight_shard, labels, class_offset,
                                                                           *cfg))


def _lse_and_loss(big, off, target, valid):
    """(lse, loss) per row from the global max M, the off-target mass P relative to M and z_y
    (module docstring); 0 on ignored rows."""
    t = big - target
    log_sum = torch.where(t > 0, torch.log(off + torch.exp(-t)), torch.log1p(off))
    zero = torch.zeros_like(big)
    return torch.where(valid, big + log_sum, zero), torch.where(valid, t + log_sum, zero)


def combine_stats(stats: list[ShardStats], labels: torch.Tensor, ignore_index: int = -100):
    """Per-row (lse, loss) from every shard's statistics (what the all-reduces compute); 0 on ignored rows."""
    row_max = torch.stack([s.row_max for s in stats])
    big = row_max.max(0).values
    off = sum(s.sum_exp * torch.exp(s.row_max - big) for s in stats)
    target = sum(s.target_logit for s in stats)
    return _lse_and_loss(big, off, target, labels != ignore_index)


def shard_grads(grad_rows, x, weight_shard, labels, lse, x_norm, w_norm, *, class_offset, num_classes,
                **cm_kwargs) -> ShardGrads:
    """One shard's backward from the global per-row ``lse`` and upstream per-row gradient ``grad_rows``."""
    kw = {**_CM_DEFAULTS, **cm_kwargs}
    labels = _check_shard(x, weight_shard, labels, class_offset, num_classes, kw["ignore_index"])
    cfg = _config(weight_shard, x, **kw)
    with torch.no_grad():
        return ShardGrads(*torch.ops.idid_kernels.cm_margin_shard_backward(
            grad_rows, x, weight_shard, labels, class_offset, lse, x_norm, w_norm, *cfg))


def combine_grads(x, x_norm, du, radial):
    """dx from the shard-summed ``du`` (N, d) and ``radial`` (N,) (spec/cm_margin.md, dL/dx_n)."""
    acc = du.dtype
    norm = x_norm.to(acc)
    u = x.to(acc) / norm.clamp_min(1e-12).unsqueeze(1)
    q = torch.where(norm > 1e-12, (du * u).sum(1), torch.zeros_like(norm))
    return (radial.unsqueeze(1) * u + (du - q.unsqueeze(1) * u) / norm.clamp_min(1e-12).unsqueeze(1)).to(x.dtype)


def _world(group):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist, group
    return None, None


class _ClassParallelCM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_shard, labels, valid, row_weight, class_offset, cfg, group):
        dist, group = _world(group)
        row_max, sum_exp, target, x_norm, w_norm = torch.ops.idid_kernels.cm_margin_shard_forward(
            x, weight_shard, labels, class_offset, *cfg)
        big = row_max.clone()
        if dist is not None:
            dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
        partial = torch.stack([sum_exp * torch.exp(row_max - big), target])
        if dist is not None:
            dist.all_reduce(partial, group=group)
        lse, loss_rows = _lse_and_loss(big, partial[0], partial[1], valid)
        ctx.save_for_backward(x, weight_shard, labels, valid, row_weight, lse, x_norm, w_norm)
        ctx.class_offset, ctx.cfg, ctx.group = class_offset, cfg, group
        return (loss_rows * row_weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_shard, labels, valid, row_weight, lse, x_norm, w_norm = ctx.saved_tensors
        dist, group = _world(ctx.group)
        # Ignored rows get no gradient whatever the upstream holds (a mean over no rows sends 1 / 0).
        g = torch.where(valid, grad_out.to(lse.dtype) * row_weight, torch.zeros_like(row_weight))
        du, radial, _, dweight = torch.ops.idid_kernels.cm_margin_shard_backward(
            g, x, weight_shard, labels, ctx.class_offset, lse, x_norm, w_norm, *ctx.cfg)
        if dist is not None:
            packed = torch.cat([du, radial.unsqueeze(1)], 1)
            dist.all_reduce(packed, group=group)
            du, radial = packed[:, :-1], packed[:, -1]
        dx = combine_grads(x, x_norm, du, radial) if ctx.needs_input_grad[0] else None
        return dx, dweight if ctx.needs_input_grad[1] else None, None, None, None, None, None, None


def cm_margin_loss_class_parallel(x, weight_shard, labels, *, class_offset, num_classes, class_weight=None,
                                  reduction="mean", group=None, **cm_kwargs):
    """:func:`idid_kernels.cm_margin_loss` with the classes split across the ranks of ``group``.

    Args:
        x: (N, d) features, the same on every rank (e.g. all-gathered); its gradient is the full dL/dx
            on every rank (each rank backpropagates it to its own part if the features were gathered).
        weight_shard: (C_k, d) this rank's classes ``[class_offset, class_offset + C_k)``; the shards of
            all ranks tile ``[0, num_classes)``.
        labels: (N,) global class indices or ``ignore_index``; the same on every rank.
        class_weight: optional (num_classes,) global class weights, the same on every rank.
        reduction: "mean" | "sum" | "none", as in F.cross_entropy.
        group: a ``torch.distributed`` process group; None uses the default group when one is
            initialised, and a single process (one shard holding every class) otherwise.
        cm_kwargs: the margin and contraction keywords of :func:`idid_kernels.cm_margin_loss`.

    Returns the loss, identical on every rank. Runs on the C++ (CPU) or CUDA kernels.
    """
    kw = {**_CM_DEFAULTS, **cm_kwargs}
    unknown = set(kw) - set(_CM_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected keyword(s) {sorted(unknown)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    labels = _check_shard(x, weight_shard, labels, class_offset, num_classes, kw["ignore_index"])
    dist, _ = _world(group)
    if dist is None and weight_shard.shape[0] != num_classes:
        raise ValueError(f"without an initialised torch.distributed group the shard must hold all {num_classes} "
                         f"classes, got {weight_shard.shape[0]}")
    check_class_weight(class_weight, num_classes, x.device)
    cfg = _config(weight_shard, x, **kw)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = labels != kw["ignore_index"]
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    w_rows = torch.ones(labels.shape, dtype=acc, device=x.device) if class_weight is None else \
        class_weight.to(acc)[safe]
    w_rows = torch.where(valid, w_rows, torch.zeros_like(w_rows))
    rows = _ClassParallelCM.apply(x, weight_shard, labels, valid, w_rows, class_offset, cfg, group)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # F.cross_entropy's mean: sum_n w_n loss_n / sum_n w_n for any nonzero total (negative too); an
    # all-ignored batch is 0 / 0 = NaN, and its gradients are 0 (ignored rows get none, see backward).
    return (rows.to(acc).sum() / w_rows.sum()).to(x.dtype)
