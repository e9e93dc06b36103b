"""What ``python -m idid_kernels bench`` measures: one :class:`Case` per (op, configuration, sizes).

A case builds float64 inputs from a seeded generator (the runner casts them to the dtype under
test), names the op's keywords, and optionally says which bare GEMMs bound it from below (the GEMM
floor) and which third-party implementation runs beside it (:class:`External`). The implementations
timed for a case are not listed here: the runner takes the eager reference, ``torch.compile`` of it,
every backend in ``_backends.IMPLEMENTED[op]`` that is available here, and the case's externals, so
new backends appear without touching this file.

Sizes come in presets: ``tiny`` (tests, seconds), ``default`` (the plain ``bench`` command: a few
minutes at most on a 2-core CPU, compile time included) and ``full`` (``--full``: the sizes the
kernels are for), per device type.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._gemm import cpu_gemm

SUITES = ("cm", "heads", "idid", "primitives")
# Named case lists outside "all": "gpu-goals" holds the sizes a GPU run is judged by.
GOAL_SUITES = ("gpu-goals",)
PRESETS = ("tiny", "default", "full")


@dataclass
class External:
    """A third-party implementation timed beside a case (e.g. pytorch-metric-learning).

    ``build(diff, const)`` takes the case's inputs, already cast and on the device, and returns
    ``(leaves, fn, to_case_grads)``: the tensors it differentiates, ``fn(*leaves)`` giving the loss,
    and a map from the gradients of ``leaves`` to the case's own input layout, so that the
    correctness check can compare them with the reference. ``truth_kwargs`` are the reference
    keywords under which the external computes the same function (it is checked against that).
    """

    name: str
    description: str
    missing: str | None
    build: Callable
    truth_kwargs: dict


@dataclass
class Case:
    suite: str
    op: str
    config: str                 # short name of the keyword configuration, e.g. "cosface+sigmoid"
    sizes: dict[str, int]       # N (rows), M (pairwise_cosine's second set), d, C
    make: Callable[[torch.Generator], tuple[list[torch.Tensor], list]]  # float64 (diff, const)
    kwargs: dict = field(default_factory=dict)
    floor_flops: float | None = None   # flops of the bare GEMMs of forward + backward
    floor: Callable[[list[torch.Tensor]], Callable[[], object]] | None = None  # closure running them
    floor_note: str = ""
    externals: list[External] = field(default_factory=list)
    out_shape: tuple[int, ...] = ()  # the op's output: () for the losses
    work_elems: int = 0         # elements of the largest (rows x something) intermediate of the reference
    with_rows: Callable[[int], "Case"] | None = None  # the same case with fewer rows (for big-size checks)

    @property
    def label(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.op} {self.config} {dims}".replace("  ", " ")


# --------------------------------------------------------------------------------------- inputs

def _randn(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _cm_make(n, d, c):
    def make(g):
        # Class weights small, as at initialisation; features of unit-scale entries.
        return [_randn(g, n, d), _randn(g, c, d, scale=0.05)], [torch.randint(0, c, (n,), generator=g)]
    return make


def _idid_make(b, d, c):
    def make(g):
        labels = torch.randint(0, c, (b,), generator=g)
        return [_randn(g, b, d), _randn(g, c, d), _randn(g, c, c, scale=0.5)], [labels]
    return make


def floor_uses_onednn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a floor on ``device`` in ``dtype`` multiplies through oneDNN (:func:`floor_mm`)."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_gemm() == "onednn"


def floor_mm(t: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``mm(a, b, out=None)`` for a floor of operands like ``t``, in the GEMM engine of the fused
    kernels, so that a floor fraction is not moved by one GEMM library being faster than another. On
    a CPU whose kernels multiply float32 through oneDNN (``idid_kernels.cpu_gemm()``, chosen where
    it is the faster engine) a float32 floor takes ``torch.ops.idid_kernels.cpu_mm`` /
    ``cpu_mm_out``; everything else (torch.mm's BLAS as the engine, float64, half dtypes, GPUs) takes
    torch.mm in the floor's dtype (the kernels multiply CPU half inputs as float32, so a half CPU
    floor stays torch.mm's)."""
    if not floor_uses_onednn(t.device, t.dtype):
        return torch.mm
    ops = torch.ops.idid_kernels

    def mm(a, b, out=None):
        if out is None:
            return ops.cpu_mm(a, b)
        ops.cpu_mm_out(a, b, out)
        return out
    return mm


def _linear_gemms(inputs):
    """X W^T, G W, G^T X: the three GEMMs of a linear layer's forward + backward (6 N d C flops), in
    the kernels' GEMM engine (:func:`floor_mm`)."""
    x, w = (t.detach() for t in inputs[:2])
    s = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    mm = floor_mm(x)

    def run():
        mm(x, w.t(), out=s)
        mm(s, w)
        mm(s.t(), x)
    return run


# ------------------------------------------------------------------------- pytorch-metric-learning

def _pml_missing() -> str | None:
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        return "pytorch-metric-learning is not installed (pip install 'idid_kernels[bench]')"
    return None


def _pml_external(margin: str, s: float, m: float) -> External:
    """PML's CosFaceLoss / ArcFaceLoss on the same (N, d, C), scale and margin.

    PML's losses have no norm contraction: they compute s * (cos - m) (CosFace) or s * cos(theta + m)
    with the fallback c - m sin m past theta = pi - m (ArcFace) on every row, then the mean
    cross-entropy. That is exactly our reference with ``contraction="none"``, which is what the
    column is checked against. PML keeps its class matrix as W of shape (d, C); its gradient is
    transposed back for the check.
    """
    name = {"cosface": "CosFaceLoss", "arcface": "ArcFaceLoss"}[margin]
    shown = f"{math.degrees(m):.4g} degrees = {m} rad" if margin == "arcface" else f"{m}"
    logit = "s * (cos - m)" if margin == "cosface" else "s * cos(theta + m)"

    def build(diff, const):
        from pytorch_metric_learning import losses

        x, w = diff
        (labels,) = const
        n_classes, d = w.shape
        # PML takes ArcFace's margin in degrees and CosFace's as a cosine offset.
        pml_m = math.degrees(m) if margin == "arcface" else m
        loss = getattr(losses, name)(num_classes=n_classes, embedding_size=d, margin=pml_m, scale=s)
        loss = loss.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            loss.W.copy_(w.detach().t())
        x = x.detach().clone().requires_grad_(True)

        def fn(xx, ww):
            return loss(xx, labels)
        return [x, loss.W], fn, lambda grads: [grads[0], grads[1].t()]

    return External(
        name="pml",
        description=(f"pytorch-metric-learning {name}(margin={shown}, scale={s:g}) on the same N, d, C: target "
                     f"logit {logit} with no norm contraction (a_n = s for every row), W stored as (d, C); "
                     f"checked against this package's reference with contraction='none'"),
        missing=_pml_missing(),
        build=build,
        truth_kwargs=dict(contraction="none"),
    )


# ------------------------------------------------------------- torch's own F.linear_cross_entropy

def _torch_lce_missing() -> str | None:
    import torch.nn.functional as F
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return (f"torch {torch.__version__} has no chunked F.linear_cross_entropy "
                "(nn.LinearCrossEntropyOptions, torch >= 2.13)")
    return None


def _torch_lce_external(s: float, contraction: str) -> External:
    """torch's chunked ``F.linear_cross_entropy`` (``options=nn.LinearCrossEntropyOptions()``): the
    first fused loss a user of torch would try. With margin "none" the loss is exactly a softmax
    cross-entropy of a_n cos(x_n, w_j), i.e. ``F.linear_cross_entropy(a * normalize(x), normalize(W), y)``
    with a_n = s sigmoid(||x_n||) (or s without the contraction); the normalisations and a_n run in
    eager PyTorch around it and are differentiated by autograd. Checked against this package's
    reference like every row."""
    from ..reference.primitives import normalize, row_norm

    def build(diff, const):
        import torch.nn.functional as F

        x, w = diff
        (labels,) = const
        options = torch.nn.LinearCrossEntropyOptions()

        def fn(xx, ww):
            a = s * torch.sigmoid(row_norm(xx)) if contraction == "sigmoid" else torch.full_like(xx[:, 0], s)
            return F.linear_cross_entropy(a[:, None] * normalize(xx), normalize(ww), labels, options=options)
        return [x, w], fn, lambda grads: grads

    a = f"{s:g} sigmoid(||x_n||)" if contraction == "sigmoid" else f"{s:g}"
    return External(
        name="torch",
        description=(f"torch's chunked F.linear_cross_entropy(a * normalize(x), normalize(W), y, "
                     f"options=nn.LinearCrossEntropyOptions()) with a_n = {a} (the cm_margin_loss of margin "
                     f"'none'); normalisations and a_n in eager PyTorch"),
        missing=_torch_lce_missing(),
        build=build,
        truth_kwargs={},
    )


# -------------------------------------------------------------------------------------- sizes
# (N, d, C) per preset and device type. Each list is a sweep of C at one N plus a sweep of N at one
# C; the default CPU sizes keep the whole run (torch.compile's compilations included) in about
# three minutes on two cores.
_CM_SIZES = {
    ("tiny", "cpu"): [(16, 8, 32), (16, 8, 64), (48, 8, 32)],
    ("default", "cpu"): [(256, 128, 2048), (256, 128, 8192), (1024, 128, 2048)],
    ("full", "cpu"): [(1024, 256, 8192), (1024, 256, 32768), (1024, 256, 131072), (256, 256, 32768),
                      (4096, 256, 32768)],
    ("tiny", "cuda"): [(64, 32, 256), (64, 32, 1024), (256, 32, 256)],
    ("default", "cuda"): [(4096, 512, 16384), (4096, 512, 65536), (16384, 512, 16384)],
    ("full", "cuda"): [(8192, 512, 65536), (8192, 512, 262144), (8192, 512, 1048576), (2048, 512, 262144),
                       (32768, 512, 262144)],
}
# (B, d, C)
_IDID_SIZES = {
    ("tiny", "cpu"): [(24, 8, 5), (48, 8, 5), (24, 8, 11)],
    ("default", "cpu"): [(256, 128, 512), (1024, 128, 512), (256, 128, 2048)],
    # C stays moderate: the (C, C) similarity and its float64 reference do not shrink with the rows
    ("full", "cpu"): [(1024, 128, 1000), (1024, 128, 4000), (1024, 128, 8000), (256, 128, 4000), (4096, 128, 4000)],
    ("tiny", "cuda"): [(128, 32, 16), (512, 32, 16), (128, 32, 64)],
    ("default", "cuda"): [(4096, 256, 4096), (16384, 256, 4096), (4096, 256, 16384)],
    ("full", "cuda"): [(8192, 512, 4096), (8192, 512, 16384), (2048, 512, 16384), (32768, 512, 16384)],
}
# pairwise_cosine (N, M, d); class_density (B, d, C); norm_contraction (N, d)
_PRIM_SIZES = {
    ("tiny", "cpu"): ((16, 12, 8), (32, 8, 4), (64, 8)),
    ("default", "cpu"): ((1024, 1024, 128), (2048, 128, 64), (16384, 256)),
    ("full", "cpu"): ((4096, 4096, 256), (8192, 256, 256), (262144, 512)),
    ("tiny", "cuda"): ((256, 128, 32), (256, 32, 8), (1024, 32)),
    ("default", "cuda"): ((8192, 8192, 512), (16384, 256, 256), (1048576, 512)),
    ("full", "cuda"): ((32768, 32768, 512), (32768, 512, 1024), (4194304, 512)),
}


def _sizes(table, preset, device_type):
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return table[(preset, "cuda" if device_type == "cuda" else "cpu")]


def _cm_case(margin: str, m: float | None, n: int, d: int, c: int, s: float = 30.0) -> Case:
    kwargs = dict(s=s, margin=margin, contraction="sigmoid")
    if m is not None:
        kwargs["m"] = m
    # margin "none" is exactly torch's linear cross-entropy of the scaled cosines; the margins are
    # what pytorch-metric-learning has.
    externals = [_torch_lce_external(s, "sigmoid")] if margin == "none" else [_pml_external(margin, s, m)]
    return Case(
        suite="cm", op="cm_margin_loss", config=f"{margin}+sigmoid", sizes=dict(N=n, d=d, C=c),
        make=_cm_make(n, d, c), kwargs=kwargs,
        floor_flops=6.0 * n * d * c, floor=_linear_gemms, floor_note="X W^T, G W, G^T X (6 N d C flops)",
        externals=externals, work_elems=n * c,
        with_rows=lambda k: _cm_case(margin, m, k, d, c, s))


def cm_cases(preset: str = "default", device_type: str = "cpu") -> list[Case]:
    """cm_margin_loss, CosFace and ArcFace with the sigmoid contraction (s=30; m=0.4 / 0.5 rad), and
    margin "none" (beside torch's F.linear_cross_entropy) where ArcFace runs.

    CosFace runs the whole sweep. In the default preset ArcFace runs only at the sweep's largest C
    (the many-class regime the kernels are for): every case costs a torch.compile, about ten seconds
    on two cores, and the default run has to stay within three minutes."""
    shapes = _sizes(_CM_SIZES, preset, device_type)
    arcface = [max(shapes, key=lambda nd_c: nd_c[2])] if preset == "default" else shapes
    return ([_cm_case("cosface", 0.4, n, d, c) for n, d, c in shapes]
            + [_cm_case("arcface", 0.5, n, d, c) for n, d, c in arcface]
            + [_cm_case("none", None, n, d, c) for n, d, c in arcface])


def _head_case(op: str, n: int, d: int, c: int) -> Case:
    """A margin head (AdaFace, MagFace) on cm_margin_loss's kernels, against the eager and compiled
    official formula (reference/heads.py). AdaFace's statistics (mean 20, std 5 for norms near
    sqrt(d)) spread its scaler over (-1, 1); MagFace runs at its defaults."""
    kwargs = dict(batch_mean=20.0, batch_std=5.0) if op == "adaface_loss" else {}
    config = {"adaface_loss": "m=0.4 h=0.333 s=64", "magface_loss": "easy s=64 lambda_g=35"}[op]
    return Case(
        suite="heads", op=op, config=config, sizes=dict(N=n, d=d, C=c), make=_cm_make(n, d, c), kwargs=kwargs,
        floor_flops=6.0 * n * d * c, floor=_linear_gemms, floor_note="X W^T, G W, G^T X (6 N d C flops)",
        work_elems=n * c, with_rows=lambda k: _head_case(op, k, d, c))


def head_cases(preset: str = "default", device_type: str = "cpu") -> list[Case]:
    """AdaFace and MagFace at the largest C of the cm sweep (every cm shape with ``full``). MagFace's
    margin differentiates through the norm, so the fused backends keep its logit gradients from
    forward to backward (cm_margin_forward_grad; AdaFace's detached margins take the fused op): 3
    GEMMs either way, 4 (the forward/backward ops) for a batch over one chunk."""
    shapes = _sizes(_CM_SIZES, preset, device_type)
    if preset == "default":
        shapes = [max(shapes, key=lambda nd_c: nd_c[2])]
    return [_head_case(op, n, d, c) for op in ("adaface_loss", "magface_loss") for n, d, c in shapes]


def _idid_floor(inputs):
    """Every kind of work idid_loss has, each once at library speed: the proxy logits' three GEMMs
    (X P^T, G P, G^T X), one exp over the (B, C) logits (their softmax), the teacher rows a batch can
    use (K = min(B, C) rows of Phi = (Theta + Theta^T) / 2 and their softmax over C), dTheta (a
    (C, C) output: zeros, then those K rows and their transpose added), and the diversity term's
    same-class Gram, forward and backward, as one GEMM pair over m rows with m^2 = E[sum_c n_c^2] =
    B + B (B - 1) / C, the expected count of same-class ordered pairs (self-pairs included) for the
    bench's uniform labels. No implementation can skip any of them."""
    x, w, theta = (t.detach() for t in inputs[:3])
    b, c = x.shape[0], w.shape[0]
    k = min(b, c)
    m = min(b, max(1, round(math.sqrt(b + b * (b - 1) / c))))
    s = torch.empty(b, c, dtype=x.dtype, device=x.device)
    gram = torch.empty(m, m, dtype=x.dtype, device=x.device)
    xm = x[:m]
    mm = floor_mm(x)

    def run():
        mm(x, w.t(), out=s)
        torch.exp_(s)
        mm(s, w)
        mm(s.t(), x)
        r = torch.softmax(theta[:k] + theta[:, :k].t(), dim=1)
        dtheta = torch.zeros(c, c, dtype=x.dtype, device=x.device)
        dtheta[:k] += r
        dtheta[:, :k] += r.t()
        mm(xm, xm.t(), out=gram)
        mm(gram, xm)
    return run


def _idid_case(b: int, d: int, c: int) -> Case:
    return Case(
        suite="idid", op="idid_loss", config="all terms", sizes=dict(N=b, d=d, C=c),
        make=_idid_make(b, d, c), kwargs=dict(alpha=16.0),
        floor_flops=6.0 * b * d * c + 4.0 * (b + b * (b - 1) / c) * d, floor=_idid_floor,
        floor_note=("the proxy GEMMs X P^T, G P, G^T X, one exp over the (B, C) logits, the softmax of the "
                    "min(B, C) teacher rows a batch can use, the (C, C) dTheta written once, the same-class diversity "
                    "Gram forward and backward at the expected pair count of uniform labels "
                    "(6 B d C + 4 (B + B (B - 1) / C) d flops)"),
        work_elems=b * c + b * b + c * c, with_rows=lambda k: _idid_case(k, d, c))


def idid_cases(preset: str = "default", device_type: str = "cpu") -> list[Case]:
    """idid_loss with every part on (distillation, diversity, adaptive weight; alpha=16)."""
    return [_idid_case(b, d, c) for b, d, c in _sizes(_IDID_SIZES, preset, device_type)]


def _pairwise_case(n: int, m: int, d: int) -> Case:
    def make(g):
        return [_randn(g, n, d), _randn(g, m, d)], []
    return Case(suite="primitives", op="pairwise_cosine", config="x vs y", sizes=dict(N=n, M=m, d=d), make=make,
                floor_flops=6.0 * n * m * d, floor=_linear_gemms, floor_note="X Y^T, G Y, G^T X (6 N M d flops)",
                out_shape=(n, m), work_elems=n * m, with_rows=lambda k: _pairwise_case(k, m, d))


def _density_case(b: int, d: int, c: int) -> Case:
    def make(g):
        return [_randn(g, b, d)], [torch.randint(0, c, (b,), generator=g), c]
    return Case(suite="primitives", op="class_density", config="t=2", sizes=dict(N=b, d=d, C=c), make=make,
                kwargs=dict(t=2.0), out_shape=(c,), work_elems=b * b, with_rows=lambda k: _density_case(k, d, c))


def _norm_case(n: int, d: int) -> Case:
    def make(g):
        return [_randn(g, n, d)], []
    return Case(suite="primitives", op="norm_contraction", config="offset=0.5 T=2", sizes=dict(N=n, d=d),
                make=make, kwargs=dict(offset=0.5, temperature=2.0), out_shape=(n,), work_elems=n * d,
                with_rows=lambda k: _norm_case(k, d))


def primitive_cases(preset: str = "default", device_type: str = "cpu") -> list[Case]:
    """pairwise_cosine, class_density and norm_contraction, forward + backward under a random
    upstream gradient."""
    (n, m, d), (b, d2, c), (n3, d3) = _sizes(_PRIM_SIZES, preset, device_type)
    return [_pairwise_case(n, m, d), _density_case(b, d2, c), _norm_case(n3, d3)]


def gpu_goal_cases(preset: str = "default", device_type: str = "cuda") -> list[Case]:
    """The GPU targets: cm_margin_loss CosFace+sigmoid at N=8192, d=512, C=100,000 (meant for
    ``--dtype bfloat16``) and idid_loss at B=4096, d=256, C=4096 and 16384, whatever the preset
    except ``tiny`` (``--quick``: the first tiny case of each, a smoke test of the suite)."""
    if preset == "tiny":
        return [_cm_case("cosface", 0.4, *_sizes(_CM_SIZES, preset, device_type)[0]),
                _idid_case(*_sizes(_IDID_SIZES, preset, device_type)[0])]
    return [_cm_case("cosface", 0.4, 8192, 512, 100_000), _idid_case(4096, 256, 4096), _idid_case(4096, 256, 16384)]


def suite_cases(suite: str = "all", preset: str = "default", device_type: str = "cpu") -> list[Case]:
    """The cases of ``suite`` ("cm" | "heads" | "idid" | "primitives" | "all", or "gpu-goals", which "all"
    leaves out) at ``preset`` sizes."""
    makers = {"cm": cm_cases, "heads": head_cases, "idid": idid_cases, "primitives": primitive_cases,
              "gpu-goals": gpu_goal_cases}
    if suite == "all":
        return [case for name in SUITES for case in makers[name](preset, device_type)]
    if suite not in makers:
        raise ValueError(f"suite must be one of {SUITES + ('all',) + GOAL_SUITES}, got {suite!r}")
    return makers[suite](preset, device_type)
