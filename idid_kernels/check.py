"""``python -m idid_kernels check``: every available backend against the float64 reference.

For each op and a few configurations, random inputs are built in float64, cast to the dtype under
test, run through each backend that has a kernel for the op on the chosen device, and compared with
the float64 reference: the output's relative error (||a - b|| / ||b||) and the worst relative error
of the input gradients under a random upstream gradient. The tolerances are ARCHITECTURE.md's:
float32 output <= 1e-5 and gradients <= 1e-4, float64 <= 1e-10; bf16/fp16 must stay within 2x the
error of the eager reference in that dtype plus 1e-2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import functional, reference
from ._backends import IMPLEMENTED, available_backends, runs_on

TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}


@dataclass
class Case:
    """One configuration of one op: ``make`` builds float64 inputs (positional tensors, of which
    the floating ones get gradients, and constant tensor keywords); ``kw`` holds fixed keywords."""

    op: str
    label: str
    make: Callable[[torch.Generator], tuple[list[torch.Tensor], dict]]
    kw: dict = field(default_factory=dict)

    def run(self, backend: str | None, args: list, tensor_kw: dict) -> torch.Tensor:
        """The op through the public dispatch (``backend``), or the reference module (None)."""
        if backend is None:
            return getattr(reference, self.op)(*args, **tensor_kw, **self.kw)
        return getattr(functional, self.op)(*args, **tensor_kw, **self.kw, backend=backend)


@dataclass
class Row:
    op: str
    label: str
    backend: str
    dtype: str
    out_err: float
    grad_err: float
    status: str


def _feats(g, n, d):
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _labels(g, n, c, ignore=0):
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignore] = -100
    return y


def cases() -> list[Case]:
    out = [
        Case("norm_contraction", "N=37 d=19 offset=0.5 T=2", lambda g: ([_feats(g, 37, 19)], {}),
             dict(offset=0.5, temperature=2.0)),
        Case("pairwise_cosine", "N=33 M=17 d=24", lambda g: ([_feats(g, 33, 24), _feats(g, 17, 24)], {})),
        Case("class_density", "B=40 C=7 d=16 t=2",
             lambda g: ([_feats(g, 40, 16), torch.randint(0, 7, (40,), generator=g), 7], {}), dict(t=2.0)),
    ]
    cm = [("cosface", {}), ("arcface", {}), ("combined", dict(m1=1.1, m2=0.2, m3=0.1)),
          ("sphereface", dict(sphere_lambda=1.0)), ("none", {})]
    for margin, kw in cm:
        out.append(Case("cm_margin_loss", f"{margin} N=29 C=53 d=32 s=30",
                        lambda g: ([_feats(g, 29, 32), _feats(g, 53, 32), _labels(g, 29, 53, ignore=3)], {}),
                        dict(margin=margin, **kw)))
    out.append(Case("cm_margin_loss", "cosface reduction=none class_weight",
                    lambda g: ([_feats(g, 23, 16), _feats(g, 11, 16), _labels(g, 23, 11, ignore=2)],
                               dict(class_weight=torch.rand(11, generator=g, dtype=torch.float64) + 0.5)),
                    dict(reduction="none")))
    out.append(Case("cm_margin_loss", "combined with per-row m2, m3 N=29 C=53 d=32",
                    lambda g: ([_feats(g, 29, 32), _feats(g, 53, 32), _labels(g, 29, 53, ignore=3)],
                               dict(m2=torch.rand(29, generator=g, dtype=torch.float64),
                                    m3=0.2 * torch.rand(29, generator=g, dtype=torch.float64))),
                    dict(margin="combined")))
    out.append(Case("adaface_loss", "N=29 C=53 d=32 m=0.4 h=0.333 s=64",
                    lambda g: ([4.0 * _feats(g, 29, 32), _feats(g, 53, 32), _labels(g, 29, 53, ignore=3)], {}),
                    dict(batch_mean=20.0, batch_std=5.0)))
    for easy in (True, False):
        out.append(Case("magface_loss", f"N=29 C=53 d=32 s=64 easy_margin={easy}",
                        lambda g: ([3.0 * _feats(g, 29, 32), _feats(g, 53, 32), _labels(g, 29, 53, ignore=3)], {}),
                        dict(easy_margin=easy)))
    out.append(Case("ldam_loss", "N=29 C=53 d=32 s=30 class_weight",
                    lambda g: ([_feats(g, 29, 32), _feats(g, 53, 32), _labels(g, 29, 53, ignore=3)],
                               dict(class_margin=0.5 * torch.rand(53, generator=g, dtype=torch.float64),
                                    class_weight=torch.rand(53, generator=g, dtype=torch.float64) + 0.5))))
    out.append(Case("idid_loss", "B=48 C=9 d=16 (singletons, ignored rows)",
                    lambda g: ([_feats(g, 48, 16), _feats(g, 9, 16), 0.5 * _feats(g, 9, 9),
                                torch.cat([torch.tensor([-100, 8]), torch.randint(0, 8, (46,), generator=g)])], {})))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = torch.linalg.vector_norm(b)
    num = torch.linalg.vector_norm(a - b)
    return float(num / den) if den > 0 else float(num)


def _evaluate(case: Case, inputs, backend: str | None, dtype: torch.dtype, device: torch.device, seed: int):
    """(output, grads) of ``case`` under ``backend`` (None: the reference module) in ``dtype``."""
    args64, kw64 = inputs

    def cast(t, grad):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        return t.to(dtype).requires_grad_(grad) if t.dtype.is_floating_point else t

    args = [cast(t, True) for t in args64]
    tensor_kw = {k: cast(t, False) for k, t in kw64.items()}
    out = case.run(backend, args, tensor_kw)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=out.dtype)
    diff = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, diff, upstream, allow_unused=True, materialize_grads=True)
    return out.detach(), [gr.detach() for gr in grads]


def run_check(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Row]:
    """Compare every available backend with the float64 reference; returns one :class:`Row` each."""
    dev = torch.device(device)
    backends = available_backends()
    rows: list[Row] = []
    for case in cases():
        g = torch.Generator().manual_seed(seed)
        inputs = case.make(g)
        truth_out, truth_grads = _evaluate(case, inputs, None, torch.float64, torch.device("cpu"), seed)
        eager_err = None
        for backend in backends:  # "reference" first: its error is the low-precision yardstick
            if backend not in IMPLEMENTED[case.op] or not runs_on(backend, dev):
                continue
            out, grads = _evaluate(case, inputs, backend, dtype, dev, seed)
            out_err = _rel(out.cpu(), truth_out)
            grad_err = max((_rel(a.cpu(), b) for a, b in zip(grads, truth_grads)), default=0.0)
            if backend == "reference":
                eager_err = (out_err, grad_err)
            if dtype in TOLERANCES:
                tol_out, tol_grad = TOLERANCES[dtype]
            else:  # low precision: relative to eager PyTorch in the same dtype
                tol_out, tol_grad = (2 * eager_err[0] + 1e-2, 2 * eager_err[1] + 1e-2)
            ok = out_err <= tol_out and grad_err <= tol_grad
            status = "ok" if ok else "MISMATCH"
            if backend == "reference" and dtype not in TOLERANCES:
                status = "baseline"  # the eager error the low-precision backends are held to
            rows.append(Row(case.op, case.label, backend, str(dtype).replace("torch.", ""), out_err, grad_err,
                            status))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("op", "case", "backend", "dtype", "out rel err", "grad rel err", "status")
    body = [(r.op, r.label, r.backend, r.dtype, f"{r.out_err:.2e}", f"{r.grad_err:.2e}", r.status) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
