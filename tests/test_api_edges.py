"""Edges of the public API: class weights of the class-parallel loss, meta tensors, margin keywords
set to None, the chunk budget environment variable, gradients that do not flow (distillation off)
and torch.func transforms. Per-backend behaviour runs over every backend available here (the cpp
and triton backends on CPU tensors, triton under its interpreter: tiny shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import idid_kernels as ik

from conftest import backend_device, make_gen, rel_err

F64 = torch.float64


def _device(backend: str) -> str:
    return backend_device(backend).type


BACKENDS = [b for b in ("reference", "cpp", "triton", "cuda") if b in ik.available_backends()]
FUSED = [b for b in BACKENDS if b != "reference"]
needs_cpp = pytest.mark.skipif("cpp" not in ik.available_backends(), reason="needs the C++ extension")


def _inputs(n, d, c, seed, dtype=F64, device="cpu"):
    g = make_gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * 2
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return x.to(device), w.to(device), y.to(device)


# ------------------------------------------------------------------ 1. class_weight, class-parallel
def _class_parallel(x, w, y, **kw):
    from idid_kernels import class_parallel as cp
    return cp.cm_margin_loss_class_parallel(x, w, y, class_offset=0, num_classes=w.shape[0], **kw)


def _single_device(x, w, y, **kw):
    return ik.cm_margin_loss(x, w, y, backend="reference", **kw)


_BAD_CLASS_WEIGHTS = {
    # (C, 1) would broadcast to an (N, N) row weight, (C + 3,) would be read in part, (C - 1,) would
    # index out of range: each is a shape error naming the expected (C,)
    "column": (lambda c: torch.ones(c, 1, dtype=F64), ValueError,
               r"class_weight must have shape \(5,\), got \(5, 1\)"),
    "too_long": (lambda c: torch.ones(c + 3, dtype=F64), ValueError,
                 r"class_weight must have shape \(5,\), got \(8,\)"),
    "too_short": (lambda c: torch.ones(c - 1, dtype=F64), ValueError,
                  r"class_weight must have shape \(5,\), got \(4,\)"),
    "requires_grad": (lambda c: torch.ones(c, dtype=F64, requires_grad=True), ValueError,
                      r"class_weight must not require grad"),
    "int64": (lambda c: torch.ones(c, dtype=torch.int64), TypeError,
              r"class_weight must be a floating tensor of shape \(5,\), got a torch.int64 tensor"),
    "list": (lambda c: [1.0] * c, TypeError, r"class_weight must be a floating tensor of shape \(5,\), got list"),
    "meta": (lambda c: torch.ones(c, dtype=F64, device="meta"), ValueError, r"class_weight is on meta but x is on cpu"),
}


@needs_cpp
@pytest.mark.parametrize("case", list(_BAD_CLASS_WEIGHTS))
@pytest.mark.parametrize("fn", [_class_parallel, _single_device], ids=["class_parallel", "cm_margin_loss"])
def test_bad_class_weight_is_rejected_the_same_way(fn, case):
    make, exc, match = _BAD_CLASS_WEIGHTS[case]
    x, w, y = _inputs(6, 3, 5, seed=0)
    with pytest.raises(exc, match=match):
        fn(x, w, y, class_weight=make(5))


def _cross_entropy_truth(x, w, y, s, cw, reduction):
    """F.cross_entropy on the logits s * cos (margin "none", no contraction), with its gradients."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = s * F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    loss = F.cross_entropy(logits, y, weight=cw, ignore_index=-100, reduction=reduction)
    return loss, x, w


_CLASS_WEIGHT_CASES = {
    "positive": ([0.5, 2.0, 1.0, 0.25, 3.0], ()),
    "negative_total": ([-0.5, -2.0, 1.0, -0.25, -3.0], ()),
    "mixed_signs_some_ignored": ([0.5, -2.0, 1.0, 0.0, 3.0], (1, 4)),
    "all_ignored": ([0.5, 2.0, 1.0, 0.25, 3.0], tuple(range(7))),
    "none_all_ignored": (None, tuple(range(7))),
}


@needs_cpp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(_CLASS_WEIGHT_CASES))
def test_class_parallel_weighting_is_cross_entropy(case, reduction):
    weights, ignored = _CLASS_WEIGHT_CASES[case]
    x, w, y = _inputs(7, 4, 5, seed=1)
    y[list(ignored)] = -100
    cw = None if weights is None else torch.tensor(weights, dtype=F64)
    if cw is not None and not ignored:
        total = float(cw[y].sum())
        assert (total < 0) == (case == "negative_total")  # the case tests what it says
    truth, tx, tw = _cross_entropy_truth(x, w, y, 3.0, cw, reduction)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = _class_parallel(xa, wa, y, class_weight=cw, reduction=reduction, s=3.0, margin="none", contraction="none")
    assert out.shape == truth.shape and out.dtype == truth.dtype
    up = torch.randn(out.shape, generator=make_gen(2), dtype=F64)
    (out * up).sum().backward()
    (truth * up).sum().backward()
    if case.endswith("all_ignored") and reduction == "mean":
        assert torch.isnan(out) and torch.isnan(truth)
    else:
        assert torch.all((out - truth).abs() <= 1e-10 * (1 + truth.abs())), (out, truth)
    assert rel_err(xa.grad, tx.grad) <= 1e-10 and rel_err(wa.grad, tw.grad) <= 1e-10


@needs_cpp
def test_class_parallel_zero_weight_total_is_cross_entropys_value():
    # weights summing to 0 over a batch with rows: F.cross_entropy's mean is sum / 0 (+-inf here)
    x, w, y = _inputs(4, 3, 3, seed=3)
    y = torch.tensor([0, 1, 2, 0])
    cw = torch.tensor([1.0, -2.0, 0.0], dtype=F64)
    assert float(cw[y].sum()) == 0
    truth, _, _ = _cross_entropy_truth(x, w, y, 3.0, cw, "mean")
    out = _class_parallel(x, w, y, class_weight=cw, s=3.0, margin="none", contraction="none")
    assert torch.isinf(truth) and torch.equal(out, truth.detach())


# ------------------------------------------------------------------ 2. meta tensors
def _meta_cases():
    """name -> fn(x, w, s, y, cw) over the public functions, on whatever device the inputs are."""
    return {
        "cm_margin_loss": lambda x, w, s, y, cw: ik.cm_margin_loss(x, w, y, margin="arcface"),
        "cm_margin_loss_none_weighted": lambda x, w, s, y, cw: ik.cm_margin_loss(x, w, y, reduction="none",
                                                                                  class_weight=cw),
        "idid_loss": lambda x, w, s, y, cw: ik.idid_loss(x, w, s, y),
        "idid_loss_terms": lambda x, w, s, y, cw: ik.idid_loss(x, w, s, y, return_terms=True),
        "idid_loss_no_distillation": lambda x, w, s, y, cw: ik.idid_loss(x, w, s, y, distillation=False),
        "class_density": lambda x, w, s, y, cw: ik.class_density(x, y, 5),
        "pairwise_cosine": lambda x, w, s, y, cw: ik.pairwise_cosine(x, w),
        "pairwise_cosine_self": lambda x, w, s, y, cw: ik.pairwise_cosine(x),
        "norm_contraction": lambda x, w, s, y, cw: ik.norm_contraction(x, offset=1.0),
    }


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", list(_meta_cases()))
def test_public_functions_on_meta_tensors(name, dtype):
    fn = _meta_cases()[name]
    x, w, y = _inputs(6, 3, 5, seed=4, dtype=dtype)
    y[2] = -100 if name.startswith(("cm", "idid")) else y[2]
    s, cw = torch.zeros(5, 5, dtype=dtype), torch.rand(5, generator=make_gen(5), dtype=dtype)
    cpu = _flat(fn(x, w, s, y, cw))
    xm, wm, sm = (t.to("meta").requires_grad_() for t in (x, w, s))
    out = _flat(fn(xm, wm, sm, y.to("meta"), cw.to("meta")))
    assert [(o.shape, o.dtype, o.device.type) for o in out] == [(o.shape, o.dtype, "meta") for o in cpu]
    out[0].sum().backward()
    assert xm.grad is not None and xm.grad.shape == x.shape and xm.grad.device.type == "meta"


def test_out_of_range_labels_are_still_caught_off_meta():
    # the meta exemption is for tensors without values, not a way around the check
    x, w, y = _inputs(6, 3, 5, seed=4)
    y[1] = 9
    with pytest.raises(ValueError, match=r"labels\[1\] = 9 is out of range"):
        ik.cm_margin_loss(x, w, y)
    ik.cm_margin_loss(x.to("meta"), w.to("meta"), y.to("meta"))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_refuse_meta_tensors_clearly(backend):
    x, w, y = _inputs(6, 3, 5, seed=4, device="meta")
    with pytest.raises(ValueError, match=rf"backend '{backend}' runs on .* but the inputs are on meta"):
        ik.cm_margin_loss(x, w, y, backend=backend)


@needs_cpp
def test_class_parallel_on_meta_tensors():
    x, w, y = _inputs(6, 3, 5, seed=4, device="meta")
    x.requires_grad_()
    w.requires_grad_()
    loss = _class_parallel(x, w, y, class_weight=torch.ones(5, dtype=F64, device="meta"))
    assert loss.shape == () and loss.device.type == "meta" and loss.dtype == F64
    loss.backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and w.grad.device.type == "meta"


@pytest.mark.parametrize("module", ["CMMarginLoss", "IDIDLoss"])
def test_modules_on_meta_tensors(module):
    kw = dict(class_weight=torch.rand(5, generator=make_gen(6))) if module == "CMMarginLoss" else {}
    head = getattr(ik, module)(3, 5, device="meta", **kw)
    assert all(p.device.type == "meta" for p in head.parameters())
    x = torch.randn(6, 3, device="meta", requires_grad=True)
    y = torch.zeros(6, dtype=torch.int64, device="meta")
    loss = head(x, y)
    assert loss.shape == () and loss.device.type == "meta" and loss.dtype == torch.float32
    loss.backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    for p in head.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.device.type == "meta"
    assert head.predict(x).shape == (6,) if module == "IDIDLoss" else head.logits(x).shape == (6, 5)


# ------------------------------------------------------------------ 3. margin keywords set to None
@pytest.mark.parametrize("name", ["m1", "m2", "m3", "sphere_lambda"])
@pytest.mark.parametrize("where", ["functional", "module", "reference", "class_parallel"])
def test_none_for_a_numeric_margin_keyword_names_it(where, name):
    x, w, y = _inputs(4, 3, 5, seed=7)
    margin = "sphereface" if name == "sphere_lambda" else "combined"
    kw = {"margin": margin, name: None}
    call = {"functional": lambda: ik.cm_margin_loss(x, w, y, **kw),
            "module": lambda: ik.CMMarginLoss(3, 5, **kw),
            "reference": lambda: ik.reference.cm_margin_loss(x, w, y, **kw),
            "class_parallel": lambda: _class_parallel(x, w, y, **kw)}[where]
    if where == "class_parallel" and "cpp" not in ik.available_backends():
        pytest.skip("needs the C++ extension")
    with pytest.raises(TypeError, match=rf"^{name} must be a real number, got None \(None is accepted for m only"):
        call()


@pytest.mark.parametrize("margin, default", [("cosface", 0.4), ("arcface", 0.5), ("sphereface", 4)])
def test_m_none_is_the_presets_default(margin, default):
    x, w, y = _inputs(5, 3, 6, seed=8)
    got = ik.cm_margin_loss(x, w, y, margin=margin, m=None, backend="reference")
    assert torch.equal(got, ik.cm_margin_loss(x, w, y, margin=margin, m=default, backend="reference"))
    # and not the plain softmax: the default margin is really applied
    assert got > ik.cm_margin_loss(x, w, y, margin="none", backend="reference")


def test_m_none_is_accepted_by_none_and_combined_margins():
    x, w, y = _inputs(5, 3, 6, seed=8)
    plain = ik.cm_margin_loss(x, w, y, margin="none", m=None, backend="reference")
    assert torch.equal(plain, ik.cm_margin_loss(x, w, y, margin="combined", m=None, backend="reference"))


# ------------------------------------------------------------------ 4. the chunk budget variable
def _chunk_budget_users():
    """Every caller of the budget: the cpp ops of both losses and the class-parallel shards."""
    from idid_kernels import class_parallel as cp
    x, w, y = _inputs(7, 3, 4, seed=9)
    s = torch.zeros(4, 4, dtype=F64)
    return {"cm_margin_loss": lambda: ik.cm_margin_loss(x, w, y, backend="cpp"),
            "cm_margin_loss_no_grad_path": lambda: ik.cm_margin_loss(x, w, y, reduction="none", backend="cpp"),
            "idid_loss": lambda: ik.idid_loss(x, w, s, y, backend="cpp"),
            "class_parallel": lambda: cp.shard_stats(x, w, y, class_offset=0, num_classes=4)}


@needs_cpp
@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "0", "-3", "abc", "1e400", "2.5 MB"])
@pytest.mark.parametrize("user", ["cm_margin_loss", "cm_margin_loss_no_grad_path", "idid_loss", "class_parallel"])
def test_bad_chunk_budget_is_a_value_error_naming_the_variable(monkeypatch, user, raw):
    from idid_kernels import _chunks
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", raw)
    _chunks.reset()
    message = rf"^IDID_KERNELS_CHUNK_MB must be a finite number of MiB > 0, got '{raw}'$"
    with pytest.raises(ValueError, match=message):
        _chunk_budget_users()[user]()
    with pytest.raises(ValueError, match=message):  # still an error on the next call, not a cached default
        _chunk_budget_users()[user]()
    with pytest.raises(ValueError, match=message):
        _chunks.reload()


@needs_cpp
@pytest.mark.parametrize("user", ["cm_margin_loss", "idid_loss", "class_parallel"])
def test_the_old_rows_variable_is_refused_with_its_replacement(monkeypatch, user):
    from idid_kernels import _chunks
    monkeypatch.setenv("IDID_KERNELS_CHUNK_ROWS", "64")
    _chunks.reset()
    with pytest.raises(ValueError, match=r"^IDID_KERNELS_CHUNK_ROWS='64' is no longer read: it was replaced by "
                                         r"IDID_KERNELS_CHUNK_MB \(MiB of one chunk of logits"):
        _chunk_budget_users()[user]()


def test_chunk_budget_defaults_and_read_once(monkeypatch):
    from idid_kernels import _chunks
    monkeypatch.delenv("IDID_KERNELS_CHUNK_MB", raising=False)
    monkeypatch.delenv("IDID_KERNELS_CHUNK_ROWS", raising=False)
    _chunks.reload()
    assert (_chunks.budget_mb("cpu"), _chunks.budget_mb("cuda")) == (256.0, 256.0)
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", "")  # empty: unset
    _chunks.reload()
    assert _chunks.budget_mb("cpu") == 256.0
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", "0.5")
    assert _chunks.budget_mb("cpu") == 256.0  # read once: a later change needs reload()
    _chunks.reload()
    assert (_chunks.budget_mb("cpu"), _chunks.budget_mb("cuda")) == (0.5, 0.5)  # one budget for every device
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", "abc")
    assert _chunks.budget_mb("cpu") == 0.5
    assert _chunks.rows_for(1000, 4, "cpu") == (2**19) // 4000
    assert _chunks.rows_for(10**9, 8, "cpu") == 1


@needs_cpp
def test_idid_rows_come_from_the_shared_budget(monkeypatch):
    from idid_kernels import _chunks
    from idid_kernels.ops import idid_loss as op
    monkeypatch.delenv("IDID_KERNELS_CHUNK_MB", raising=False)
    _chunks.reload()
    # a row costs max(B, C) accumulators: C logits, or the CPU kernel's class-density block width n_c <= B
    assert op._rows_per_chunk(40, 7, F64, "cpu") == 256 * 2**20 // (40 * 8)
    assert op._rows_per_chunk(40, 700, torch.float32, "cpu") == 256 * 2**20 // (700 * 4)
    assert op._rows_per_chunk(40, 700, torch.bfloat16, "cuda") == 256 * 2**20 // (700 * 4)
    with op.chunk_rows(3):  # the tests' override still wins
        assert op._rows_per_chunk(40, 700, F64, "cpu") == 3
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", "0.001")  # 1048 bytes: 3 rows of 40 float64 values
    _chunks.reload()
    assert op._rows_per_chunk(40, 7, F64, "cpu") == 3


@needs_cpp
def test_idid_small_budget_equals_one_chunk_and_the_reference(monkeypatch):
    from idid_kernels import _chunks
    from idid_kernels.ops import idid_loss as op
    # one class of 40 rows: above the CPU kernel's 32-row small-class path, so its density Gram
    # matrix is built in blocks of the same row count
    x, w, _ = _inputs(48, 5, 7, seed=10)
    y = torch.cat([torch.zeros(40, dtype=torch.int64), torch.randint(1, 7, (8,), generator=make_gen(11))])
    s = torch.randn(7, 7, generator=make_gen(12), dtype=F64)

    def run(backend):
        xs, ws, ss = (t.clone().requires_grad_() for t in (x, w, s))
        loss = ik.idid_loss(xs, ws, ss, y, backend=backend)
        loss.backward()
        return [loss.detach(), xs.grad, ws.grad, ss.grad]

    monkeypatch.delenv("IDID_KERNELS_CHUNK_MB", raising=False)
    _chunks.reload()
    one_chunk, truth = run("cpp"), run("reference")
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", "0.001")  # 1048 bytes: 2 rows of 48 float64 values
    _chunks.reload()
    assert op._rows_per_chunk(48, 7, F64, "cpu") == 2
    passed = []
    real_op = torch.ops.idid_kernels.idid_loss_fused  # the loss needs a gradient: the fused op
    monkeypatch.setattr(op.torch.ops.idid_kernels, "idid_loss_fused",
                        lambda *args: passed.append(args[-1]) or real_op(*args))
    small = run("cpp")
    assert passed == [2]  # the op was handed the budget's rows
    monkeypatch.undo()
    for a, b, c in zip(small, one_chunk, truth):
        assert rel_err(a, b) <= 1e-12 and rel_err(a, c) <= 1e-10


# ------------------------------------------------------------------ 5. no gradient where none flows
def _idid_module_step(backend, distillation, seed=13):
    torch.manual_seed(seed)
    device = _device(backend)
    head = ik.IDIDLoss(4, 5, distillation=distillation, backend=backend, dtype=F64, device=device)
    with torch.no_grad():
        head.similarity.copy_(torch.randn(5, 5, generator=make_gen(seed), dtype=F64))
    x, _, y = _inputs(9, 4, 5, seed=seed, device=device)
    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)
    head(x, y).backward()
    grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in head.named_parameters()}
    opt.step()
    return before, grads, dict(head.named_parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_gets_no_gradient_without_distillation(backend):
    before, grads, params = _idid_module_step(backend, distillation=False)
    assert grads["similarity"] is None
    assert grads["proxies"] is not None
    # AdamW's weight decay skips a parameter without a gradient: the similarity stays as it was
    assert torch.equal(params["similarity"].detach(), before["similarity"])
    assert not torch.equal(params["proxies"].detach(), before["proxies"])


@pytest.mark.parametrize("distillation", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_module_step_agrees_with_the_reference(backend, distillation):
    _, ref_grads, ref_params = _idid_module_step("reference", distillation)
    _, grads, params = _idid_module_step(backend, distillation)
    assert (grads["similarity"] is None) == (not distillation) == (ref_grads["similarity"] is None)
    for name, g in ref_grads.items():
        if g is not None:
            assert rel_err(grads[name].cpu(), g) <= 1e-10, name
        assert rel_err(params[name].detach().cpu(), ref_params[name].detach()) <= 1e-10, name


# ------------------------------------------------------------------ 6. torch.func transforms
def _weighted_terms(terms):
    return terms.l_ic - 3.0 * terms.l_id + 0.5 * terms.loss


def _func_case(name, backend):
    """(fn of the differentiable tensors, those tensors) for each public function, tiny float64 inputs."""
    device = _device(backend)
    x, w, y = _inputs(5, 4, 3, seed=14, device=device)
    y[3] = -100
    s = torch.randn(3, 3, generator=make_gen(15), dtype=F64).to(device)
    b = dict(backend=backend)
    return {
        "cm_margin_loss": (lambda x, w: ik.cm_margin_loss(x, w, y, margin="arcface", **b), (x, w)),
        "cm_margin_loss_none": (lambda x, w: (ik.cm_margin_loss(x, w, y, reduction="none", **b)
                                              * torch.arange(1.0, 6.0, dtype=F64, device=device)).sum(), (x, w)),
        "idid_loss": (lambda x, w, s: ik.idid_loss(x, w, s, y, **b), (x, w, s)),
        "idid_loss_terms": (lambda x, w, s: _weighted_terms(ik.idid_loss(x, w, s, y, return_terms=True, **b)),
                            (x, w, s)),
        "pairwise_cosine": (lambda x, w: (ik.pairwise_cosine(x, w, **b) ** 2).sum(), (x, w)),
        "pairwise_cosine_self": (lambda x: (ik.pairwise_cosine(x, **b) ** 3).sum(), (x,)),
        "class_density": (lambda x: (ik.class_density(x, y.clamp_min(0), 3, **b) * torch.tensor(
            [1.0, -2.0, 3.0], dtype=F64, device=device)).sum(), (x,)),
        "norm_contraction": (lambda x: (ik.norm_contraction(x, offset=1.0, temperature=2.0, **b) ** 2).sum(), (x,)),
    }[name]


_FUNC_CASES = ["cm_margin_loss", "cm_margin_loss_none", "idid_loss", "idid_loss_terms", "pairwise_cosine",
               "pairwise_cosine_self", "class_density", "norm_contraction"]


def _autograd_grads(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves)


@pytest.mark.parametrize("name", _FUNC_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_equals_autograd(backend, name):
    fn, tensors = _func_case(name, backend)
    argnums = tuple(range(len(tensors)))
    got = torch.func.grad(fn, argnums=argnums)(*tensors)
    want = _autograd_grads(fn, tensors)
    truth = _autograd_grads(_func_case(name, "reference")[0], [t.cpu() for t in tensors])
    for g, a, r in zip(got, want, truth):
        assert rel_err(g, a) <= 1e-10 and rel_err(g.cpu(), r) <= 1e-10


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("backend", BACKENDS)
def test_func_vjp_and_jacrev(backend):
    _, (x,) = _func_case("norm_contraction", backend)
    out, vjp_fn = torch.func.vjp(lambda x: ik.norm_contraction(x, backend=backend), x)
    ct = torch.linspace(-1.0, 2.0, out.shape[0], dtype=F64, device=out.device)
    (got,) = vjp_fn(ct)  # vjp_fn builds the graph (create_graph follows grad mode): still fine
    xs = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(ik.norm_contraction(xs, backend="reference"), xs, ct)
    assert rel_err(got, want) <= 1e-10
    jac = torch.func.jacrev(lambda x: ik.pairwise_cosine(x, backend=backend))(x)
    ref = torch.func.jacrev(lambda x: ik.pairwise_cosine(x, backend="reference"))(x)
    assert jac.shape == (5, 5, 5, 4) and rel_err(jac, ref) <= 1e-10


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", ["cm_margin_loss", "idid_loss", "norm_contraction"])
@pytest.mark.parametrize("backend", FUSED)
def test_vmap_of_grad_gives_per_sample_gradients(backend, name):
    # vmap runs the fused ops through PyTorch's per-sample fallback (a loop; it warns about speed)
    fn, tensors = _func_case(name, backend)
    batch = torch.stack([tensors[0], 2 * tensors[0], -tensors[0].flip(0)])
    per_sample = torch.func.vmap(torch.func.grad(lambda x: fn(x, *tensors[1:])))(batch)
    ref_fn = _func_case(name, "reference")[0]
    rest = [t.cpu() for t in tensors[1:]]
    for got, xb in zip(per_sample, batch):
        (want,) = _autograd_grads(lambda x: ref_fn(x, *rest), [xb.cpu()])
        assert rel_err(got.cpu(), want) <= 1e-10
    forward = torch.func.vmap(lambda x: fn(x, *tensors[1:]))(batch)
    assert torch.allclose(forward, torch.stack([fn(xb, *tensors[1:]) for xb in batch]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", _FUNC_CASES)
@pytest.mark.parametrize("backend", FUSED)
def test_second_derivatives_are_refused_not_wrong(backend, name):
    fn, tensors = _func_case(name, backend)
    rest = tensors[1:]
    inner = torch.func.grad(lambda x: fn(x, *rest))
    with pytest.raises(NotImplementedError, match=r"double backward .*not supported by the fused backends; "
                                                  r"use backend='reference'"):
        torch.func.grad(lambda x: (inner(x) ** 2).sum())(tensors[0])
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .*use backend='reference'"):
        torch.func.jvp(lambda x: fn(x, *rest), (tensors[0],), (torch.ones_like(tensors[0]),))
    # a tensor from outside the transform that requires grad: the returned gradient depends on it,
    # and differentiating that dependence is refused too (rather than a silently missing term)
    leaf = tensors[0].clone().requires_grad_() if len(tensors) == 1 else rest[0].clone().requires_grad_()
    if len(tensors) == 1:
        g = torch.func.grad(lambda x: fn(x + leaf))(tensors[0])
    else:
        g = torch.func.grad(lambda x: fn(x, leaf, *rest[1:]))(tensors[0])
    assert g.requires_grad
    with pytest.raises(NotImplementedError, match=r"double backward"):
        g.sum().backward()


@pytest.mark.parametrize("backend", FUSED)
def test_plain_forward_ad_is_refused(backend):
    import torch.autograd.forward_ad as fwAD
    _, (x,) = _func_case("norm_contraction", backend)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=r"^norm_contraction: forward-mode AD .*backend='reference'"):
            ik.norm_contraction(dual, backend=backend)


def test_second_derivatives_work_on_the_reference():
    fn, tensors = _func_case("cm_margin_loss", "reference")
    hvp = torch.func.grad(lambda x: (torch.func.grad(lambda x: fn(x, tensors[1]))(x) ** 2).sum())(tensors[0])
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


@pytest.mark.parametrize("module", ["CMMarginLoss", "IDIDLoss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_over_module_parameters(backend, module):
    device = _device(backend)
    torch.manual_seed(16)
    head = getattr(ik, module)(4, 3, backend=backend, dtype=F64, device=device)
    x, _, y = _inputs(5, 4, 3, seed=17, device=device)
    params = {k: v.detach() for k, v in head.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(head, p, (x, y)))(params)
    head(x, y).backward()
    for k, p in head.named_parameters():
        assert rel_err(got[k], p.grad) <= 1e-10, k
