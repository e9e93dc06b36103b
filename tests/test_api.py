"""Public API: names and keywords of ARCHITECTURE.md, modules, backend choice, torch.compile, the
`check` command."""
import inspect
import math
import subprocess
import sys

import pytest
import torch

import idid_kernels as ik
from idid_kernels import _backends
from idid_kernels import check as check_mod
from idid_kernels import functional, reference


def test_public_names():
    for name in ("cm_margin_loss", "idid_loss", "pairwise_cosine", "class_density", "norm_contraction",
                 "CMMarginLoss", "IDIDLoss", "available_backends"):
        assert name in ik.__all__ and callable(getattr(ik, name))
    assert ik.available_backends()[0] == "reference"


def test_keywords_match_architecture():
    cm = inspect.signature(ik.cm_margin_loss).parameters
    assert list(cm)[:3] == ["x", "weight", "labels"]
    expected = dict(s=30.0, margin="cosface", m=None, m1=1.0, m2=0.0, m3=0.0, sphere_lambda=0.0, easy_margin=False,
                    contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0, detach_norm=False,
                    margin_grad="exact", class_weight=None, ignore_index=-100, reduction="mean", backend="auto")
    assert {k: cm[k].default for k in expected} == expected
    assert all(cm[k].kind is inspect.Parameter.KEYWORD_ONLY for k in expected)
    idid = inspect.signature(ik.idid_loss).parameters
    assert list(idid)[:4] == ["x", "proxies", "similarity", "labels"]
    expected = dict(alpha=16.0, tau=1.0, t=2.0, eps=1e-8, distillation=True, diversity=True, adaptive_weight=True,
                    diversity_weight=1.0, class_balanced=True, ignore_index=-100, return_terms=False, backend="auto")
    assert {k: idid[k].default for k in expected} == expected
    assert inspect.signature(ik.class_density).parameters["t"].default == 2.0
    nc = inspect.signature(ik.norm_contraction).parameters
    assert (nc["offset"].default, nc["temperature"].default) == (0.0, 1.0)


def test_functional_equals_reference():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (9,), generator=g)
    s = torch.randn(6, 6, generator=g, dtype=torch.float64)
    kw = dict(margin="arcface", m=0.3, reduction="sum")
    assert torch.equal(ik.cm_margin_loss(x, w, y, backend="reference", **kw), reference.cm_margin_loss(x, w, y, **kw))
    assert torch.equal(ik.idid_loss(x, w, s, y, backend="reference", tau=2.0),
                       reference.idid_loss(x, w, s, y, tau=2.0))
    assert torch.equal(ik.pairwise_cosine(x, w, backend="reference"), reference.pairwise_cosine(x, w))
    assert torch.equal(ik.class_density(x, y, 6, t=3.0, backend="reference"), reference.class_density(x, y, 6, 3.0))
    torch.testing.assert_close(ik.norm_contraction(x, offset=1.0), reference.norm_contraction(x, 1.0), rtol=1e-14,
                               atol=0)


def test_cm_module_init_and_forward():
    torch.manual_seed(0)
    head = ik.CMMarginLoss(64, 1000)
    assert head.weight.shape == (1000, 64)
    bound = math.sqrt(6.0 / (64 + 1000))  # xavier-uniform
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.9 * bound
    x, y = torch.randn(8, 64), torch.randint(0, 1000, (8,))
    loss = head(x, y)
    torch.testing.assert_close(loss, ik.cm_margin_loss(x, head.weight, y))
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.shape == head.weight.shape


def test_cm_module_keywords_and_class_weight_buffer():
    cw = torch.rand(5) + 0.1
    head = ik.CMMarginLoss(4, 5, margin="arcface", m=0.2, s=16.0, reduction="none", class_weight=cw,
                           dtype=torch.float64)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 4, 2])
    expected = ik.cm_margin_loss(x, head.weight, y, margin="arcface", m=0.2, s=16.0, reduction="none",
                                 class_weight=cw.double())
    torch.testing.assert_close(head(x, y), expected)
    assert "class_weight" in dict(head.named_buffers())
    with pytest.raises(ValueError, match=r"class_weight must have shape \(5,\)"):
        ik.CMMarginLoss(4, 5, class_weight=torch.ones(4))


def test_cm_inference_helpers():
    head = ik.CMMarginLoss(6, 7, s=10.0)
    x = torch.randn(5, 6)
    cos = head.cosine(x)
    torch.testing.assert_close(cos, torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(head.weight).T)
    torch.testing.assert_close(head.logits(x), 10.0 * cos)
    torch.testing.assert_close(head.feature_norm(x), x.norm(dim=1))
    # argmax of the trained logits is unchanged by the positive row scale of the contraction
    scaled = (10.0 * torch.sigmoid(x.norm(dim=1)))[:, None] * cos
    assert torch.equal(scaled.argmax(1), head.logits(x).argmax(1))


def test_idid_module_init_forward_predict():
    torch.manual_seed(0)
    mod = ik.IDIDLoss(32, 10, return_terms=True)
    assert mod.proxies.shape == (10, 32) and mod.similarity.shape == (10, 10)
    assert torch.count_nonzero(mod.similarity) == 0
    std = mod.proxies.std().item()  # kaiming-normal, fan_in = 32: std = sqrt(2 / 32) = 0.25
    assert 0.2 < std < 0.3
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    terms = mod(x, y)
    assert isinstance(terms, ik.IDIDTerms)
    torch.testing.assert_close(terms.loss, terms.l_ic + terms.lam * terms.l_id)
    terms.loss.backward()
    assert mod.proxies.grad is not None and mod.similarity.grad is not None
    pred = mod.predict(mod.proxies.detach()[[3, 1, 4]] * 5.0)
    assert pred.tolist() == [3, 1, 4]


@pytest.mark.parametrize("which", ["cm", "idid"])
def test_losses_compile_fullgraph(which):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (12,), generator=g)
    y[0] = -100
    if which == "cm":
        fn = lambda x, w, y: ik.cm_margin_loss(x, w, y, margin="arcface", class_weight=torch.ones(5))  # noqa: E731
        args = (x, w, y)
    else:
        s = torch.zeros(5, 5, requires_grad=True)
        fn = ik.idid_loss  # noqa: E731
        args = (x, w, s, y)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    grads = torch.autograd.grad(out, [a for a in args if a.requires_grad])
    eager = fn(*args)
    eager_grads = torch.autograd.grad(eager, [a for a in args if a.requires_grad])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_check_command_all_ok():
    rows = check_mod.run_check("cpu", torch.float32)
    assert {r.op for r in rows} == set(_backends.IMPLEMENTED)
    assert all(r.status == "ok" for r in rows), check_mod.format_table(rows)
    # Every available backend that runs on CPU tensors and has a kernel for at least one op
    # (triton runs here under TRITON_INTERPRET=1, which conftest sets without a GPU).
    cpu = torch.device("cpu")
    expected = {b for b in ik.available_backends()
                if _backends.runs_on(b, cpu) and any(b in ops for ops in _backends.IMPLEMENTED.values())}
    assert {r.backend for r in rows} == expected


def test_check_command_flags_a_wrong_kernel(monkeypatch):
    wrong = {**functional._KERNELS["norm_contraction"]}
    wrong["reference"] = lambda x, offset, temperature: reference.norm_contraction(x, offset, temperature) * 1.001
    monkeypatch.setitem(functional._KERNELS, "norm_contraction", wrong)
    rows = [r for r in check_mod.run_check("cpu", torch.float32) if r.op == "norm_contraction"]
    assert [r.status for r in rows if r.backend == "reference"] == ["MISMATCH"]
    assert "MISMATCH" in check_mod.format_table(rows)


def test_cli_check_and_info_run():
    out = subprocess.run([sys.executable, "-m", "idid_kernels", "check", "--dtype", "float64"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "0 mismatched" in out.stdout and "cm_margin_loss" in out.stdout
    info = subprocess.run([sys.executable, "-m", "idid_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "reference  available" in info.stdout
