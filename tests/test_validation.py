"""Bad input: a clear exception (type and a message naming the argument and value) before any
compute, for every public function and module; inputs are never modified."""
import pytest
import torch

import idid_kernels as ik
from idid_kernels import _backends


def cm_inputs(n=6, c=4, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(c, d, generator=g, dtype=dtype),
            torch.randint(0, c, (n,), generator=g))


def idid_inputs(n=6, c=4, d=3, dtype=torch.float32):
    x, w, y = cm_inputs(n, c, d, dtype)
    return x, w, torch.zeros(c, c, dtype=dtype), y


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# ---------------------------------------------------------------- labels
@pytest.mark.parametrize("bad", [4, -1, 100])
def test_cm_label_out_of_range(bad):
    x, w, y = cm_inputs()
    y[2] = bad
    raises(ValueError, rf"labels\[2\] = {bad} is out of range.*\[0, 4\)", ik.cm_margin_loss, x, w, y)


def test_idid_label_out_of_range():
    x, w, s, y = idid_inputs()
    y[5] = 7
    raises(ValueError, r"labels\[5\] = 7 is out of range", ik.idid_loss, x, w, s, y)


def test_custom_ignore_index_is_accepted_and_others_rejected():
    x, w, y = cm_inputs()
    y[0] = -1
    ik.cm_margin_loss(x, w, y, ignore_index=-1)
    raises(ValueError, r"labels\[0\] = -1 .*ignore_index=-100", ik.cm_margin_loss, x, w, y)


def test_class_density_label_out_of_range_names_num_classes():
    x, _, _ = cm_inputs()
    y = torch.tensor([0, 1, 1, 0, 2, 0])
    raises(ValueError, r"labels\[4\] = 2 is out of range: labels must be in \[0, 2\)$", ik.class_density, x, y, 2)


def test_float_labels_rejected():
    x, w, y = cm_inputs()
    raises(TypeError, r"labels must be an integer tensor.*float32", ik.cm_margin_loss, x, w, y.float())


def test_int32_labels_accepted():
    x, w, y = cm_inputs()
    torch.testing.assert_close(ik.cm_margin_loss(x, w, y.int()), ik.cm_margin_loss(x, w, y))


def test_labels_wrong_length_and_dims():
    x, w, y = cm_inputs()
    raises(ValueError, r"labels has 5 entries but the batch has 6 rows", ik.cm_margin_loss, x, w, y[:5])
    raises(ValueError, r"labels must be 1-D, got shape \(6, 1\)", ik.cm_margin_loss, x, w, y[:, None])
    raises(TypeError, r"labels must be a torch.Tensor, got list", ik.cm_margin_loss, x, w, y.tolist())


def test_label_check_can_be_switched_off(monkeypatch):
    x, w, y = cm_inputs()
    y[1] = 4
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    # Without the check the reference's own bounds check (gather) still refuses the label.
    with pytest.raises((RuntimeError, IndexError)):
        ik.cm_margin_loss(x, w, y)


# ---------------------------------------------------------------- shapes, dims, dtypes, devices
def test_wrong_dims():
    x, w, y = cm_inputs()
    raises(ValueError, r"x must be 2-D, got 3-D", ik.cm_margin_loss, x[None], w, y)
    raises(ValueError, r"weight must be 2-D, got 1-D", ik.cm_margin_loss, x, w[0], y)
    raises(ValueError, r"x must be 2-D, got 1-D", ik.norm_contraction, x[0])
    raises(ValueError, r"x must be 2-D", ik.pairwise_cosine, x[0])


def test_feature_dim_mismatch():
    x, w, y = cm_inputs()
    raises(ValueError, r"weight must have 3 columns .*got shape \(4, 5\)", ik.cm_margin_loss, x, torch.randn(4, 5), y)
    raises(ValueError, r"y must have 3 columns", ik.pairwise_cosine, x, torch.randn(2, 4))
    xi, wi, s, yi = idid_inputs()
    raises(ValueError, r"proxies must have 3 columns", ik.idid_loss, xi, torch.randn(4, 2), s, yi)
    raises(ValueError, r"similarity must have 4 rows", ik.idid_loss, xi, wi, torch.zeros(3, 4), yi)
    raises(ValueError, r"similarity must have 4 columns", ik.idid_loss, xi, wi, torch.zeros(4, 3), yi)


def test_batch_size_mismatch_between_x_and_labels():
    xi, wi, s, yi = idid_inputs()
    raises(ValueError, r"labels has 6 entries but the batch has 5 rows", ik.idid_loss, xi[:5], wi, s, yi)


def test_dtype_mismatch():
    x, w, y = cm_inputs()
    raises(TypeError, r"weight has dtype torch.float64 but x has torch.float32", ik.cm_margin_loss, x, w.double(), y)
    xi, wi, s, yi = idid_inputs()
    raises(TypeError, r"similarity has dtype torch.float64", ik.idid_loss, xi, wi, s.double(), yi)


def test_non_floating_x():
    x, w, y = cm_inputs()
    raises(TypeError, r"x must be a floating tensor .* got torch.int64", ik.cm_margin_loss, x.long(), w, y)
    raises(TypeError, r"x must be a floating tensor", ik.norm_contraction, torch.ones(3, 2, dtype=torch.int32))
    raises(TypeError, r"x must be a torch.Tensor, got ndarray", ik.norm_contraction, x.numpy())


def test_device_mismatch_meta():
    # The meta device stands in for a second device on a CPU-only machine.
    x, w, y = cm_inputs()
    raises(ValueError, r"weight is on meta but x is on cpu", ik.cm_margin_loss, x, w.to("meta"), y)
    raises(ValueError, r"labels is on meta but the features are on cpu", ik.cm_margin_loss, x, w, y.to("meta"))


def test_empty_batch():
    _, w, _ = cm_inputs()
    empty = torch.empty(0, 3)
    raises(ValueError, r"x is empty: shape \(0, 3\) has no rows", ik.cm_margin_loss, empty,
           w, torch.empty(0, dtype=torch.long))
    raises(ValueError, r"x is empty", ik.idid_loss, empty, w, torch.zeros(4, 4), torch.empty(0, dtype=torch.long))
    raises(ValueError, r"x is empty", ik.norm_contraction, empty)
    raises(ValueError, r"x has no features", ik.norm_contraction, torch.empty(3, 0))


def test_fewer_than_two_classes():
    x, w, y = cm_inputs()
    raises(ValueError, r"proxies has 1 class row\(s\); IDID needs C >= 2", ik.idid_loss, x, w[:1],
           torch.zeros(1, 1), y * 0)
    raises(ValueError, r"weight has 1 class row\(s\)", ik.cm_margin_loss, x, w[:1], y * 0)
    raises(ValueError, r"num_classes must be >= 2, got 1", ik.IDIDLoss, 3, 1)
    raises(ValueError, r"num_classes must be >= 2, got 1", ik.CMMarginLoss, 3, 1)


def test_class_weight_shape_dtype_device():
    x, w, y = cm_inputs()
    raises(ValueError, r"class_weight must have shape \(4,\), got \(3,\)", ik.cm_margin_loss, x, w, y,
           class_weight=torch.ones(3))
    raises(TypeError, r"class_weight must be a floating tensor", ik.cm_margin_loss, x, w, y,
           class_weight=torch.ones(4, dtype=torch.long))
    raises(ValueError, r"class_weight is on meta", ik.cm_margin_loss, x, w, y, class_weight=torch.ones(4, device="meta"))


# ---------------------------------------------------------------- names and scalar values
@pytest.mark.parametrize("kw,match", [
    (dict(margin="cosfase"), r"margin must be one of .*'cosfase'"),
    (dict(contraction="tanh"), r"contraction must be one of .*'tanh'"),
    (dict(reduction="avg"), r"reduction must be one of .*'avg'"),
    (dict(margin_grad="approx"), r"margin_grad must be one of .*'approx'"),
    (dict(backend="gpu"), r"backend must be one of .*'gpu'"),
    (dict(s=0.0), r"s must be a finite number > 0, got 0.0"),
    (dict(s=float("nan")), r"s must be a finite number > 0"),
    (dict(norm_temperature=-1.0), r"norm_temperature must be a finite number > 0, got -1.0"),
    (dict(norm_offset=float("inf")), r"norm_offset must be a finite number, got inf"),
    (dict(margin="combined", m=0.3), r"m=0.3 is not used by margin='combined'"),
    (dict(margin="arcface", m1=2.0), r"m1/m2/m3 are read by margin='combined' only"),
    (dict(margin="sphereface", m=1.5), r"sphereface needs a positive integer m"),
    (dict(margin="cosface", easy_margin=True), r"easy_margin applies to margin='arcface' or 'combined'"),
    (dict(ignore_index=1.5), r"ignore_index must be an int, got float 1.5"),
])
def test_cm_bad_keywords(kw, match):
    x, w, y = cm_inputs()
    exc = TypeError if "ignore_index" in kw else ValueError
    raises(exc, match, ik.cm_margin_loss, x, w, y, **kw)
    kw.pop("backend", None)
    if kw:  # the module validates the same keywords at construction
        raises(exc, match, ik.CMMarginLoss, 3, 4, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=-1.0), r"alpha must be a finite number > 0, got -1.0"),
    (dict(tau=0), r"tau must be a finite number > 0, got 0"),
    (dict(t=float("inf")), r"t must be a finite number > 0, got inf"),
    (dict(eps=0.0), r"eps must be a finite number > 0"),
    (dict(diversity_weight=-0.5), r"diversity_weight must be >= 0, got -0.5"),
    (dict(backend="Reference"), r"backend must be one of"),
])
def test_idid_bad_keywords(kw, match):
    x, w, s, y = idid_inputs()
    raises(ValueError, match, ik.idid_loss, x, w, s, y, **kw)
    kw.pop("backend", None)
    if kw:
        raises(ValueError, match, ik.IDIDLoss, 3, 4, **kw)


def test_primitive_bad_keywords():
    x, _, y = cm_inputs()
    raises(ValueError, r"temperature must be a finite number > 0, got 0.0", ik.norm_contraction, x, temperature=0.0)
    raises(ValueError, r"t must be a finite number > 0, got -2.0", ik.class_density, x, y, 4, t=-2.0)
    raises(TypeError, r"num_classes must be an int, got float", ik.class_density, x, y, 4.0)
    raises(ValueError, r"num_classes must be >= 1, got 0", ik.class_density, x, y, 0)


# ---------------------------------------------------------------- backends
def test_unavailable_backend_names_what_is_missing(monkeypatch):
    x, w, y = cm_inputs()
    monkeypatch.delenv("IDID_KERNELS_CUDA_EMULATE", raising=False)  # without the emulator, no GPU means no cuda
    raises(ik.BackendUnavailableError, r"backend 'cuda' is not available: .*(CUDA|extension)",
           ik.cm_margin_loss, x, w, y, backend="cuda")
    if torch.cuda.is_available():
        return  # triton can run here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter, no GPU means no triton
    raises(ik.BackendUnavailableError, r"backend 'triton' is not available: .*triton",
           ik.cm_margin_loss, x, w, y, backend="triton")


def test_backend_without_kernel_for_op(monkeypatch):
    if "cpp" not in ik.available_backends():
        pytest.skip("needs the C++ extension")
    monkeypatch.setitem(_backends.IMPLEMENTED, "cm_margin_loss", {"reference"})
    x, w, y = cm_inputs()
    raises(NotImplementedError, r"backend 'cpp' has no kernel for cm_margin_loss yet; backends that do here: "
           r"\['reference'\]", ik.cm_margin_loss, x, w, y, backend="cpp")


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(_backends, "_ext_state", {"module": None, "error": "ImportError: no _C"})
    assert "cpp" not in _backends.available_backends() and "cuda" not in _backends.available_backends()
    raises(ik.BackendUnavailableError, r"idid_kernels._C is not built.*no _C.*pip install --no-build-isolation",
           ik.norm_contraction, torch.randn(3, 2), backend="cpp")
    # auto falls back to the reference and still works
    torch.testing.assert_close(ik.norm_contraction(torch.ones(1, 4)), torch.sigmoid(torch.tensor([2.0])))


# ---------------------------------------------------------------- nothing modified in place
def test_inputs_not_modified():
    x, w, s, y = idid_inputs()
    y[0] = -100
    x.requires_grad_(True)
    copies = [t.detach().clone() for t in (x, w, s, y)]
    ik.idid_loss(x, w, s, y).backward()
    ik.cm_margin_loss(x, w, y, class_weight=torch.rand(4))
    ik.class_density(x, y.clamp_min(0), 4)
    ik.pairwise_cosine(x)
    ik.norm_contraction(x)
    for before, after in zip(copies, (x, w, s, y)):
        assert torch.equal(before, after)


# ---------------------------------------------------------------- flags, constants, double backward
@pytest.mark.parametrize("flag", ["easy_margin", "detach_norm"])
def test_cm_bool_flags_must_be_bool(flag):
    x, w, y = cm_inputs()
    kw = {flag: "no", "margin": "arcface"}
    raises(TypeError, rf"{flag} must be True or False, got str 'no'", ik.cm_margin_loss, x, w, y, **kw)
    raises(TypeError, rf"{flag} must be True or False", ik.CMMarginLoss, 3, 4, **kw)


@pytest.mark.parametrize("flag", ["distillation", "diversity", "adaptive_weight", "class_balanced", "return_terms"])
def test_idid_bool_flags_must_be_bool(flag):
    x, w, s, y = idid_inputs()
    raises(TypeError, rf"{flag} must be True or False, got int 0", ik.idid_loss, x, w, s, y, **{flag: 0})
    raises(TypeError, rf"{flag} must be True or False", ik.IDIDLoss, 3, 4, **{flag: "False"})


def test_margin_values_must_be_numbers():
    x, w, y = cm_inputs()
    raises(ValueError, r"m must be a finite number, got '0.4'", ik.cm_margin_loss, x, w, y, m="0.4")
    raises(ValueError, r"m1 must be a finite number", ik.cm_margin_loss, x, w, y, margin="combined", m1="1")


def test_class_weight_requiring_grad_is_rejected():
    x, w, y = cm_inputs()
    raises(ValueError, r"class_weight must not require grad", ik.cm_margin_loss, x, w, y,
           class_weight=torch.ones(4, requires_grad=True))


def test_module_backend_checked_at_construction():
    raises(ValueError, r"backend must be one of .*'gpu'", ik.CMMarginLoss, 3, 4, backend="gpu")
    raises(ValueError, r"backend must be one of .*'gpu'", ik.IDIDLoss, 3, 4, backend="gpu")


@pytest.mark.parametrize("op", ["cm", "idid", "norm", "cosine", "density"])
def test_double_backward_refused_by_the_extension_ops(op):
    if "cpp" not in ik.available_backends():
        pytest.skip("needs the C++ extension")
    x, w, s, y = idid_inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = {"cm": lambda: ik.cm_margin_loss(x, w, y, backend="cpp"),
           "idid": lambda: ik.idid_loss(x, w, s, y, backend="cpp"),
           "norm": lambda: ik.norm_contraction(x, backend="cpp").sum(),
           "cosine": lambda: ik.pairwise_cosine(x, w, backend="cpp").sum(),
           "density": lambda: ik.class_density(x, y, 4, backend="cpp").sum()}[op]()
    with pytest.raises(NotImplementedError, match=r"double backward .* backend='reference'"):
        torch.autograd.grad(out, x, create_graph=True)


def test_modules_accept_half_features_with_float32_parameters():
    # autocast / a bf16 backbone: features in bf16, loss parameters in float32
    head, idid = ik.CMMarginLoss(8, 5), ik.IDIDLoss(8, 5)
    x = torch.randn(6, 8).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, 5, (6,))
    for module, param in ((head, head.weight), (idid, idid.proxies)):
        module(x, y).float().backward()
        assert param.grad is not None and param.grad.dtype == torch.float32
