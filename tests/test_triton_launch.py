"""How the Triton backend launches its kernels, independent of what they compute: autotune config
trimming (IDID_KERNELS_TRITON_MAX_CONFIGS), the device every launch runs on, the shape of every
launch grid, the scalar arguments and the memory ordering of the atomics.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the
launch spies below wrap the interpreter's (or, natively, the JIT's) ``run``, so they see every
launch of every op whichever way it runs.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from idid_kernels.triton import _rows  # noqa: E402

ENV = _rows.MAX_CONFIGS_ENV


# ------------------------------------------------------------------ IDID_KERNELS_TRITON_MAX_CONFIGS
def test_max_configs_unset_or_empty_keeps_every_config(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert _rows.max_configs() is None
    assert _rows.trim_configs([1, 2, 3]) == [1, 2, 3]
    monkeypatch.setenv(ENV, "  ")
    assert _rows.max_configs() is None


@pytest.mark.parametrize("raw,kept", [("1", [1]), (" 2 ", [1, 2]), ("3", [1, 2, 3]), ("10", [1, 2, 3])])
def test_max_configs_keeps_the_first_n(monkeypatch, raw, kept):
    monkeypatch.setenv(ENV, raw)
    assert _rows.trim_configs([1, 2, 3]) == kept


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "1.5", "2x"])
def test_max_configs_rejects_what_is_not_a_positive_int(monkeypatch, raw):
    monkeypatch.setenv(ENV, raw)
    with pytest.raises(ValueError, match=rf"{ENV} must be a positive integer.*got {raw!r}"):
        _rows.max_configs()


_COUNT_CONFIGS = textwrap.dedent("""
    import torch, triton
    from idid_kernels.triton import _idid_common, class_density, cm_margin, idid_loss, pairwise_cosine
    counts = {}
    for module in (_idid_common, class_density, cm_margin, idid_loss, pairwise_cosine):
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner):
                for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                    # configs tagged per dtype (_rows.per_dtype) are tuned per dtype; untagged ones for all
                    mine = [c for c in obj.configs if dtype in getattr(c, "dtypes", (dtype,))]
                    counts[module.__name__ + "." + name + ":" + str(dtype)] = len(mine)
    print(repr(counts))
""")


def _config_counts(max_configs: str | None) -> dict[str, int]:
    """{kernel:dtype: number of autotune configs the autotuner tries for that input dtype} in a fresh
    interpreter, on the GPU config lists (no TRITON_INTERPRET: importing the kernels needs no GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV)}
    if max_configs is not None:
        env[ENV] = max_configs
    proc = subprocess.run([sys.executable, "-c", _COUNT_CONFIGS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr of a dict of ints)


def test_max_configs_trims_every_autotuned_kernel_at_import():
    full = _config_counts(None)
    assert len(full) >= 4 * 9 and all(n >= 1 for n in full.values()), full
    assert any(n >= 2 for n in full.values())
    assert _config_counts("1") == {k: 1 for k in full}
    assert _config_counts("2") == {k: min(2, n) for k, n in full.items()}


def test_max_configs_invalid_value_fails_the_import_naming_the_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[ENV] = "zero"
    proc = subprocess.run([sys.executable, "-c", "import idid_kernels.triton.pairwise_cosine"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"ValueError: {ENV} must be a positive integer" in proc.stderr


# ------------------------------------------------------------------------------------ atomics
def _atomic_calls():
    """(file, line, keywords) of every ``tl.atomic_*`` call in the Triton kernels."""
    import ast
    import pathlib

    import idid_kernels.triton as pkg
    calls = []
    for path in sorted(pathlib.Path(pkg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.startswith("atomic_")):
                kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
                calls.append((path.name, node.lineno, node.func.attr, kw))
    return calls


def test_float_atomics_are_relaxed():
    # Every atomic in the kernels is a float add into a buffer that only a later launch reads: no
    # program depends on the order of the adds, so the default acq_rel fences are pure cost.
    calls = _atomic_calls()
    assert calls, "no atomics found: the scan is broken"
    for name, line, op, kw in calls:
        assert op == "atomic_add", (name, line, op)
        assert kw.get("sem") == "relaxed", f"{name}:{line} tl.{op} without sem='relaxed'"


# ------------------------------------------------------------- host transfers and synchronisation
# aten ops that move a Python value into a tensor (torch.tensor(v), t[i] = v: a host-to-device copy
# per call on a GPU, and a small launch) or read a device value on the host (a synchronisation).
_HOST_OPS = {"aten::lift_fresh", "aten::lift", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
             "aten::nonzero", "aten::equal"}


def _every_op(dev, n=10, c=4, d=6):
    """{name: forward -> scalar} for every Triton op (fresh leaves; call .backward() on the result)."""
    import idid_kernels as ik
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, torch.float32).requires_grad_(True)

    x, w, s = leaf(n, d), leaf(c, d), leaf(c, c)
    yc = (torch.arange(n) * 7 % c).to(dev)
    y = yc.clone()
    y[n // 2] = -100
    cw = torch.rand(c, generator=g).to(dev)
    return {
        "cm_margin_loss": lambda: ik.cm_margin_loss(x, w, y, class_weight=cw, backend="triton"),
        "cm_margin_loss_arcface": lambda: ik.cm_margin_loss(x, w, y, margin="arcface", reduction="sum",
                                                            backend="triton"),
        "idid_loss": lambda: ik.idid_loss(x, w, s, y, backend="triton"),
        "pairwise_cosine": lambda: ik.pairwise_cosine(x, w, backend="triton").sum(),
        "pairwise_cosine_self": lambda: ik.pairwise_cosine(x, backend="triton").sum(),
        "class_density": lambda: ik.class_density(x, yc, c, backend="triton").sum(),
        "norm_contraction": lambda: ik.norm_contraction(x, offset=0.3, temperature=1.7, backend="triton").sum(),
    }


@pytest.mark.parametrize("op", list(_every_op("cpu")))
def test_ops_copy_no_python_values_to_the_device_and_read_nothing_back(monkeypatch, op):
    # Forward + backward of every op, seen by the profiler (which records the aten ops inside the
    # custom ops too). The label range check reads the labels on the host by design; it is off here,
    # as under torch.compile or graph capture.
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fn = _every_op(dev)[op]
    fn().backward()  # compilation, autotuning, lazy initialisation
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn().backward()
    names = [e.name for e in prof.events()]
    assert any(n.startswith("idid_triton::") or n.startswith("idid_kernels::triton") for n in names), names
    assert sorted(n for n in names if n in _HOST_OPS) == []


# ------------------------------------------------------------------------ launches, spied on
class Launch:
    def __init__(self, kernel, device, guard, grid):
        self.kernel, self.device, self.guard, self.grid = kernel, device, guard, grid

    def __repr__(self):
        return f"{self.kernel}(grid={self.grid}, tensors on {self.device}, inside on_device({self.guard}))"


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch from here on, as a :class:`Launch`: the kernel, the device of its tensor
    arguments, the device of the innermost ``_rows.on_device`` block around the launch (None outside
    any) and the grid (resolved, padded to 3 axes)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    guards = []
    real_on_device = _rows.on_device

    @contextlib.contextmanager
    def on_device(t):
        guards.append(t.device)
        try:
            with real_on_device(t):
                yield
        finally:
            guards.pop()

    monkeypatch.setattr(_rows, "on_device", on_device)
    record = []
    cls = InterpretedFunction if _rows.interpreted() else JITFunction
    real_run = cls.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            assert len(devices) == 1, (self.fn.__name__, devices)
            meta = {**dict(zip(self.arg_names, args)), **kwargs}
            shape = tuple(grid(meta) if callable(grid) else grid)
            record.append(Launch(self.fn.__name__, devices.pop(), guards[-1] if guards else None,
                                 shape + (1,) * (3 - len(shape))))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return record


@pytest.mark.parametrize("op", list(_every_op("cpu")))
def test_every_launch_runs_on_the_tensors_device(monkeypatch, launches, op):
    # Triton launches on the current CUDA device: each launch must sit inside on_device(t) for a
    # tensor t of its own device, or tensors on cuda:1 while cuda:0 is current are read through
    # cuda:0 (an illegal memory access). The interpreter shows the structure; test_triton_gpu.py
    # runs the ops on a second GPU.
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _every_op(dev)[op]().backward()
    assert launches, "no launch seen: the spy is broken"
    bad = [launch for launch in launches if launch.guard != launch.device]
    assert not bad, bad


@pytest.mark.parametrize("op", list(_every_op("cpu")))
def test_launch_grids_do_not_grow_along_axes_1_and_2(monkeypatch, launches, op):
    # Axes 1 and 2 of a grid stop at 65,535 programs (axis 0 at 2^31 - 1): a grid whose axis 1
    # counts column tiles fails for pairwise_cosine with M > ~2.1M, one counting feature chunks at
    # d > ~2M. Every tile count is folded onto axis 0; the one 2-D grid left, cm_margin_loss's
    # (row blocks, class groups), is bounded by _rows.parallel_programs whatever the shapes. The
    # shapes here span more than 4 tiles along every dimension (interpreter blocks: 8 to 32).
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _every_op(dev, n=41, c=37, d=135)[op]().backward()
    bound = _rows.parallel_programs(torch.device(dev))
    assert launches
    wide = [launch for launch in launches if launch.grid[1] > bound or launch.grid[2] > 1]
    assert not wide, wide


# --------------------------------------------------------------- idid_loss / class_density layout
# The row layout of _idid_common.bucket_rows: what keeps the kernels in bounds whatever the labels.
_LAYOUT_C = 5
_LAYOUT_BASE = [0, 1, 0, 2, 1, 0, -100, 3, 0, 1, 4, 2, 2, 0, 1, 3, 0, 1, 0]


def _layout_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", [-5, -1, _LAYOUT_C, _LAYOUT_C + 7])
def test_layout_never_puts_an_out_of_range_label_in_a_class(bad):
    # Every position the kernels index through (those before offsets[C]) holds a key in [0, C);
    # ignored rows follow with the key C, a label out of range last with C + 1.
    from idid_kernels.triton._idid_common import bucket_rows
    labels = torch.tensor(_LAYOUT_BASE)
    labels[4] = bad
    layout, offsets = bucket_rows(labels.to(_layout_device()), _LAYOUT_C, -100)
    perm, keys = layout.cpu()
    taking_part = int(offsets[_LAYOUT_C])
    assert taking_part == len(_LAYOUT_BASE) - 2
    assert bool(((keys[:taking_part] >= 0) & (keys[:taking_part] < _LAYOUT_C)).all())
    assert keys[taking_part:].tolist() == [_LAYOUT_C, _LAYOUT_C + 1]
    assert perm[-1] == 4 and perm[-2] == _LAYOUT_BASE.index(-100)
    assert sorted(perm.tolist()) == list(range(len(_LAYOUT_BASE)))


def test_layout_without_bad_labels_is_unchanged():
    from idid_kernels.triton._idid_common import bucket_rows
    layout, offsets = bucket_rows(torch.tensor(_LAYOUT_BASE, device=_layout_device()), _LAYOUT_C, -100)
    assert int(layout[1, -1]) == _LAYOUT_C  # the ignored row: no C + 1 anywhere
    counts = [_LAYOUT_BASE.count(k) for k in range(_LAYOUT_C)]
    assert offsets.cpu().tolist() == [sum(counts[:k]) for k in range(_LAYOUT_C + 1)]


# ------------------------------------------------------------- idid_loss launches and their flags
class _KernelSpy:
    """Wraps one Triton kernel of a module and records the keyword arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


def _idid_leaves(b, c, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = _layout_device()
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, torch.float32).requires_grad_(True)
              for shape in ((b, d), (c, d), (c, c))]
    labels = (torch.arange(b) * 7 % c).to(dev)
    labels[1] = -100
    return leaves, labels


def test_idid_similarity_gradient_kernel_runs_only_when_needed(monkeypatch):
    # The (C, C) dTheta is formed only with distillation and a similarity that requires grad.
    import idid_kernels as ik
    from idid_kernels.triton import idid_loss as mod
    spy = _KernelSpy(mod._dtheta_kernel)
    monkeypatch.setattr(mod, "_dtheta_kernel", spy)
    (x, proxies, sim), labels = _idid_leaves(5, 3, 4)
    for distillation, needs in ((True, True), (True, False), (False, True)):
        inputs = [x.detach().requires_grad_(True), proxies.detach().requires_grad_(True),
                  sim.detach().requires_grad_(needs)]
        ik.idid_loss(*inputs, labels, backend="triton", distillation=distillation).backward()
        assert (inputs[2].grad is not None) == (distillation and needs)
    assert len(spy.calls) == 1


def test_idid_dw_reduction_is_atomic_unless_deterministic(monkeypatch):
    # With several row splits, the default adds dW's splits with atomics; under
    # torch.use_deterministic_algorithms(True), per-split buffers summed in a fixed order.
    import idid_kernels as ik
    from idid_kernels.triton import idid_loss as mod
    b, c, d = (19, 5, 16) if not torch.cuda.is_available() else (257, 129, 96)
    assert mod._column_splits(b, c, d, _layout_device())[0] > 1
    spy = _KernelSpy(mod._grad_cols_kernel)
    monkeypatch.setattr(mod, "_grad_cols_kernel", spy)
    leaves, labels = _idid_leaves(b, c, d)
    saved = torch.are_deterministic_algorithms_enabled()
    for on in (False, True):
        torch.use_deterministic_algorithms(on)
        try:
            ik.idid_loss(*leaves, labels, backend="triton").backward()
        finally:
            torch.use_deterministic_algorithms(saved)
    assert [call["ATOMIC"] for call in spy.calls] == [True, False]


def test_idid_tf32_only_on_request(monkeypatch):
    # float32 dots are exact-precision unless IDID_KERNELS_TRITON_TF32=1; TF32 rounds the cosines'
    # inputs to 10 mantissa bits (~1e-3), the loss stays close.
    import idid_kernels as ik
    from idid_kernels.triton import idid_loss as mod
    from idid_kernels.triton._idid_common import dot_precision
    monkeypatch.delenv("IDID_KERNELS_TRITON_TF32", raising=False)
    assert dot_precision(torch.float32) == "ieee"
    spy = _KernelSpy(mod._ic_forward_kernel)
    monkeypatch.setattr(mod, "_ic_forward_kernel", spy)
    leaves, labels = _idid_leaves(5, 3, 8)
    exact = ik.idid_loss(*leaves, labels, backend="triton").item()
    monkeypatch.setenv("IDID_KERNELS_TRITON_TF32", "1")
    assert dot_precision(torch.float32) == "tf32"
    tf32 = ik.idid_loss(*leaves, labels, backend="triton").item()
    assert [call["DOT_PREC"] for call in spy.calls] == ["ieee", "tf32"]
    truth = ik.idid_loss(*[t.detach().double().cpu() for t in leaves], labels.cpu(), backend="reference").item()
    assert abs(exact - truth) <= 1e-5 * abs(truth)
    assert abs(tf32 - truth) <= 1e-2 * abs(truth)
