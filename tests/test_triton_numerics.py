"""Numerical building blocks of the triton backend: overflow-free row norms, the power-of-two row
scaling of the GEMM operands, the saved softmax statistics in cosine units, and extreme norms in
the IDID kernels (the cross-backend contract is tests/test_numerics.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); the interpreter's 16-wide d tiles make the d = 37 rows below span three tiles.
"""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import reference as ref

pytest.importorskip("idid_kernels.triton.cm_margin", reason="triton is not installed")

from idid_kernels.triton import _idid_common, _rows  # noqa: E402
from idid_kernels.triton import cm_margin as tcm  # noqa: E402
from idid_kernels.reference.margins import resolve_margin  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
F32, F64 = torch.float32, torch.float64
INF, NAN = float("inf"), float("nan")


def _extreme_rows(d: int = 37) -> torch.Tensor:
    """float32 rows whose squares overflow or underflow, with special values in different d tiles."""
    g = make_gen(0)
    base = torch.randn(14, d, generator=g, dtype=F64)
    scales = torch.tensor([1.0, 1e20, 1e-21, 1e-30, 1e30, 1e-40, 3e18, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                          dtype=F64)
    x = (base * scales[:, None]).to(F32)
    x[7] = 0.0                                  # a zero row
    x[8, 3] = NAN                               # NaN in the first tile
    x[9, d - 1] = NAN                           # NaN in the last tile
    x[10, 20] = INF                             # inf in a later tile
    x[11, 0], x[11, 30] = INF, NAN              # inf and NaN
    x[12, 1:] = 1e-30                           # tiny everywhere but a large element in the first tile
    x[12, 0] = 1e30
    x[13, :] = 1e-30                            # the scale grows at the last element
    x[13, d - 1] = 1e30
    return x


@pytest.mark.parametrize("which", ["rows", "idid_common"])
def test_row_norms_have_nrm2_semantics(which):
    x = _extreme_rows()
    norm = _rows.row_norms if which == "rows" else _idid_common.row_norms
    got = norm(x.to(DEV).contiguous()).cpu().double()
    exact = torch.linalg.vector_norm(x.double(), dim=1)
    assert torch.equal(torch.isnan(got), torch.isnan(exact))
    assert torch.equal(torch.isinf(got), torch.isinf(exact))
    fin = torch.isfinite(exact)
    assert torch.equal(got[7], torch.zeros((), dtype=F64))
    assert (rel_err(got[fin], exact[fin]) <= 1e-6 and
            ((got[fin] - exact[fin]).abs() <= 1e-6 * exact[fin]).all())
    # the checker has teeth: float32 sums of squares lose these rows
    naive = torch.sqrt((x * x).sum(1)).double()
    assert not torch.allclose(naive[fin], exact[fin], rtol=1e-3)


def test_row_norms_float64_and_strided():
    scales = torch.tensor([1e200, 1e-200, 1e300, 1e-310, 1.0], dtype=F64)  # squares over/underflow float64
    x = torch.randn(5, 37, generator=make_gen(7), dtype=F64) * scales[:, None]
    x = x.t().contiguous().t()  # column-major
    got = _rows.row_norms(x.to(DEV)).cpu()
    big = x.abs().amax(1, keepdim=True)
    exact = big.squeeze(1) * torch.linalg.vector_norm(x / big, dim=1)
    assert ((got - exact).abs() <= 1e-14 * exact).all()
    assert not torch.isfinite(torch.sqrt((x * x).sum(1))[[0, 2]]).any()  # (the checker has teeth)


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
def test_scaled_rows_are_exact_powers_of_two(dtype):
    acc = _rows.acc_dtype(dtype)
    values = [0.0, 1e-21, 1e-12, 0.3, 0.5, 1.0, 3.0, 1e20, 3e38, INF, NAN]
    if dtype != torch.bfloat16:  # (the interpreter widens subnormal bfloat16 wrongly)
        values += [1e-45, 1e-40] if acc == F32 else [4e-320, 1e-310, 1e-200, 1e200, 1.7e308]
    r = torch.tensor(values, dtype=acc)
    x = (r[:, None] * torch.tensor([1.0, -0.5, 0.25], dtype=acc)).to(dtype)
    xs, xs_norm = _rows.scaled_rows(x.to(DEV), r.to(DEV))
    _, e = torch.frexp(r)
    lim = 125 if acc == F32 else 1021
    e = torch.where(torch.isfinite(r), e, torch.zeros_like(e)).clamp(-lim, lim)
    scale = torch.pow(torch.tensor(2.0, dtype=F64), -e.double()).to(acc)
    torch.testing.assert_close(xs_norm.cpu(), torch.clamp_min(r, 1e-12) * scale, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(xs.cpu(), (x.to(acc) * scale[:, None]).to(dtype), rtol=0, atol=0, equal_nan=True)
    normal = (r >= 1e-12) & (r < 1e30)  # above the floor, inside the clamp
    assert ((xs_norm.cpu()[normal] >= 0.5) & (xs_norm.cpu()[normal] < 1.0)).all()


def test_scaled_rows_pass_float16_through():
    x = torch.randn(4, 5, generator=make_gen(1)).half().to(DEV)
    r = _rows.row_norms(x)
    xs, xs_norm = _rows.scaled_rows(x, r)
    assert xs is x and torch.equal(xs_norm, torch.clamp_min(r, 1e-12))


def test_saved_statistics_in_cosine_units():
    """row_stats = (||x||, c_y, m, log_sum, P, S): lse = a m + log_sum and loss = t + log_sum or
    log1p(P) (module docstring of triton/cm_margin.py), checked against float64 logits."""
    g = make_gen(2)
    n, c, d = 9, 7, 37
    x, w = torch.randn(n, d, generator=g, dtype=F64), torch.randn(c, d, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)
    params = resolve_margin("cosface", 0.2, 1.0, 0.0, 0.0, 0.0, False)
    cfg = tcm.config_args(params, s=20.0, contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0,
                          detach_norm=False, margin_grad="exact", ignore_index=-100)
    loss, stats, _ = torch.ops.idid_triton.cm_margin_forward(x.to(DEV), w.to(DEV), y.to(DEV), *cfg)
    loss, stats = loss.cpu(), stats.cpu()
    assert stats.shape == (6, n)
    z = ref.cm_margin.cm_logits(x, w, y, params, s=20.0, contraction="sigmoid")
    a = 20.0 * torch.sigmoid(torch.linalg.vector_norm(x, dim=1))
    torch.testing.assert_close(stats[0], torch.linalg.vector_norm(x, dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(a * stats[2] + stats[3], torch.logsumexp(z, 1), rtol=1e-12, atol=0)
    # the shift is the row max in cosine units
    torch.testing.assert_close(a * stats[2], z.max(1).values, rtol=1e-12, atol=0)
    p = torch.softmax(z, 1)
    off = torch.ones_like(p, dtype=torch.bool).scatter_(1, y[:, None], False)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).t()
    torch.testing.assert_close(stats[4], (p * off).sum(1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(stats[5], (p * off * cos).sum(1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1), rtol=1e-10,
                               atol=0)


@pytest.mark.parametrize("s", [1e10, 1e12])
def test_very_large_scale_several_d_tiles(s):
    """s = 1e10..1e12 with d spanning several tiles: p = exp(a (c - m) - log_sum) stays exact."""
    g = make_gen(3)
    x, w = torch.randn(6, 37, generator=g, dtype=F64), torch.randn(5, 37, generator=g, dtype=F64)
    y = torch.randint(0, 5, (6,), generator=g)
    kw = dict(s=s, margin="none", contraction="none", reduction="sum")
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    exact = ref.cm_margin_loss(xr, wr, y, **kw)
    gx, gw = torch.autograd.grad(exact, [xr, wr])
    xt, wt = x.float().to(DEV).requires_grad_(), w.float().to(DEV).requires_grad_()
    got = ik.cm_margin_loss(xt, wt, y.to(DEV), backend="triton", **kw)
    tx, tw = torch.autograd.grad(got, [xt, wt])
    assert rel_err(got.detach().cpu(), exact) <= 1e-5
    assert rel_err(tx.cpu(), gx) <= 1e-4 and rel_err(tw.cpu(), gw) <= 1e-4
