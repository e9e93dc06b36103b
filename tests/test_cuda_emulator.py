"""The CUDA-execution emulator (csrc/emu) itself: its semantics on small probe kernels, and negative
controls showing that the emulated runs catch real bugs planted in copies of the CUDA kernels.

The probes and mutants are compiled here with the host C++ compiler (the launch rewrite of
csrc/emu/launch_rewrite.py, then g++ against the emulator's headers), loaded with ctypes, and
judged against the package's float64 reference, as the conformance suite judges the real build.
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from idid_kernels import reference
from idid_kernels.reference.primitives import row_norm

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX = shutil.which("g++") or shutil.which("c++")
ORDERS = ("forward", "reverse", "random:1", "random:2")
LAUNCH_FAILURE, INVALID_CONFIGURATION = 719, 9

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++) to build the emulator's probes")


def _rewrite_module():
    spec = importlib.util.spec_from_file_location("_idid_launch_rewrite", CSRC / "emu" / "launch_rewrite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(src: Path, obj: Path) -> Path:
    cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-Wall", "-Wno-unknown-pragmas", f"-I{CSRC / 'emu' / 'include'}",
           f"-I{CSRC / 'cuda'}", f"-I{CSRC}", "-c", str(src), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"compile failed: {' '.join(cmd)}\n{proc.stderr}"
    return obj


class Builder:
    """Compiles CUDA sources (optionally mutated) with the emulator into shared libraries."""

    def __init__(self, root: Path):
        self.root = root
        self.rewrite = _rewrite_module()
        self.emu_obj = _compile(CSRC / "emu" / "idid_emu.cpp", root / "idid_emu.o")
        self._objects: dict[tuple, Path] = {}

    def cuda_object(self, path: Path, mutation: tuple[str, str] | None = None) -> Path:
        key = (str(path), mutation)
        if key in self._objects:
            return self._objects[key]
        text = path.read_text()
        if mutation is not None:
            old, new = mutation
            # The mutation must apply exactly once: a kernel edit that removes its target makes the
            # control fail loudly instead of silently testing the unmutated kernel.
            assert text.count(old) == 1, f"mutation target occurs {text.count(old)} times in {path.name}: {old!r}"
            text = text.replace(old, new)
        tag = f"{path.stem}_{len(self._objects)}"
        src = self.root / f"{tag}.cu.cpp"
        src.write_text(self.rewrite.rewrite(text, origin=str(path)))
        self._objects[key] = _compile(src, self.root / f"{tag}.o")
        return self._objects[key]

    def library(self, name: str, objects: list[Path]) -> ctypes.CDLL:
        out = self.root / f"{name}.so"
        cmd = [CXX, "-shared", "-o", str(out), *map(str, objects), str(self.emu_obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return ctypes.CDLL(str(out))


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return Builder(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture(scope="module")
def probes(builder):
    lib = builder.library("probes", [builder.cuda_object(ROOT / "tests" / "emu" / "probe_kernels.cu")])
    lib.probe_error_string.restype = ctypes.c_char_p
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _message(lib, fn: str, err: int) -> str:
    return getattr(lib, fn)(err).decode()


@pytest.fixture
def order(monkeypatch):
    def set_order(value: str):
        monkeypatch.setenv("IDID_KERNELS_CUDA_EMULATE_ORDER", value)
    return set_order


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ORDERS)
def test_warp_shuffles_follow_cuda_semantics(probes, order, mode):
    order(mode)
    out = torch.zeros(64 * 4, dtype=torch.int32)
    assert probes.probe_shuffles(_ptr(out)) == 0
    got = out.view(64, 4).tolist()
    for t in range(64):
        lane, base = t % 32, t - t % 32
        v = lambda src_lane: 100 * (base + src_lane)  # noqa: E731
        up_src = lane - 2 if (lane % 16) >= 2 else lane  # width 16: segments of 16 lanes
        down_src = lane + 3 if lane + 3 < 32 else lane
        assert got[t] == [v(lane ^ 5), v(down_src), v(up_src), v((lane * 7) % 32)], t


def test_block_reduce_result_only_in_thread_zero(probes):
    out = torch.zeros(129, dtype=torch.float64)
    assert probes.probe_block_sum(_ptr(out)) == 0
    assert out[0].item() == 128 * 129 / 2
    # cub leaves the other threads' result unspecified; the emulator makes it a NaN.
    assert out[1].item() == 0.0 and bool((out[2:] == 1.0).all())


def test_block_reduce_sized_for_another_block_is_an_error(probes):
    out = torch.zeros(129, dtype=torch.float64)
    err = probes.probe_block_sum_wrong_size(_ptr(out))
    assert err == LAUNCH_FAILURE
    assert "BlockReduce used in a block whose size differs" in _message(probes, "probe_error_string", err)


@pytest.mark.parametrize("mode", ORDERS)
def test_barrier_after_a_thread_returned_names_block_and_thread(probes, order, mode):
    order(mode)
    out = torch.zeros(3 * 64, dtype=torch.int32)
    err = probes.probe_divergent_barrier(17, _ptr(out))
    assert err == LAUNCH_FAILURE
    msg = _message(probes, "probe_error_string", err)
    assert "block (1, 0, 0)" in msg and "__syncthreads()" in msg and "17" in msg, msg
    assert "divergent_barrier_kernel" in msg, msg


def test_uniform_barrier_is_fine(probes):
    out = torch.zeros(3 * 64, dtype=torch.int32)
    assert probes.probe_divergent_barrier(-1, _ptr(out)) == 0
    assert bool((out == 1).all())


@pytest.mark.parametrize("mode", ORDERS)
def test_lane_missing_from_full_mask_shuffle_is_an_error(probes, order, mode):
    order(mode)
    out = torch.zeros(64, dtype=torch.int32)
    err = probes.probe_lane_leaves(9, _ptr(out))
    assert err == LAUNCH_FAILURE
    msg = _message(probes, "probe_error_string", err)
    assert "lane 9" in msg and "__shfl_xor_sync" in msg and "returned" in msg, msg


def test_lanes_at_different_collectives_is_an_error(probes):
    out = torch.zeros(32, dtype=torch.int32)
    err = probes.probe_mismatched_collectives(_ptr(out))
    assert err == LAUNCH_FAILURE
    assert "same collective" in _message(probes, "probe_error_string", err)


def test_missing_barrier_shows_up_when_the_order_changes(probes, order):
    """Thread 0 publishes a shared value the others read: with the barrier every order reads it; without
    it the forward order happens to work and the reverse order reads the previous block's stale value."""
    results = {}
    for barrier in (1, 0):
        for mode in ("forward", "reverse"):
            order(mode)
            out = torch.zeros(4 * 64, dtype=torch.int32)
            assert probes.probe_publish(barrier, _ptr(out)) == 0
            results[barrier, mode] = out.view(4, 64)
    expected = (7 + torch.arange(4, dtype=torch.int32)).unsqueeze(1).expand(4, 64)
    assert torch.equal(results[1, "forward"], expected) and torch.equal(results[1, "reverse"], expected)
    assert torch.equal(results[0, "forward"], expected)
    assert not torch.equal(results[0, "reverse"], expected)


def test_orders_are_as_selected_and_random_is_seeded(probes, order):
    def run(mode):
        order(mode)
        out = torch.zeros(6 + 64, dtype=torch.int32)
        assert probes.probe_order(6, 64, _ptr(out)) == 0
        return out[:6].tolist(), out[6:].tolist()

    blocks, threads = run("forward")
    assert blocks == list(range(6)) and threads == list(range(64))
    blocks, threads = run("reverse")
    assert blocks == list(range(6))[::-1] and threads == list(range(64))[::-1]
    first, second, other = run("random:5"), run("random:5"), run("random:6")
    assert first == second
    assert first != other
    assert sorted(first[0]) == list(range(6)) and sorted(first[1]) == list(range(64))
    assert first[1] != list(range(64))


def test_bad_order_value_fails_the_launch(probes, order):
    order("sideways")
    err = probes.probe_launch(1, 1, 32)
    assert err == LAUNCH_FAILURE
    assert "IDID_KERNELS_CUDA_EMULATE_ORDER" in _message(probes, "probe_error_string", err)


@pytest.mark.parametrize("grid_x,grid_y,block,ok", [
    (1, 1, 1024, True), (1, 1, 1025, False), (0, 1, 32, False), (1, 65535, 1, True), (1, 65536, 1, False),
])
def test_launch_limits_are_cudas(probes, grid_x, grid_y, block, ok):
    err = probes.probe_launch(grid_x, grid_y, block)
    assert (err == 0) == ok
    if not ok:
        assert err == INVALID_CONFIGURATION


# ---------------------------------------------------------------------------------------------
# Negative controls: mutated copies of the real kernels must be caught
# ---------------------------------------------------------------------------------------------

CLASS_DENSITY = CSRC / "cuda" / "class_density.cu"
NORM_CONTRACTION = CSRC / "cuda" / "norm_contraction.cu"
CM_MARGIN = CSRC / "cuda" / "cm_margin.cu"

# name -> (file, (old text, new text)): each a plausible bug.
MUTANTS = {
    "pull: barrier after the chunk weights removed": (
        CLASS_DENSITY, ("    __syncthreads();  // weights visible to every thread\n", "")),
    "pull: barrier before the next chunk's weights removed": (
        CLASS_DENSITY, ("    __syncthreads();  // every thread done reading `weight` before the next chunk rewrites it\n",
                        "")),
    "backward: barrier before reading the block's radial sum removed": (
        CLASS_DENSITY, ("  if (tid == 0) radial_shared = radial_sum;\n  __syncthreads();\n",
                        "  if (tid == 0) radial_shared = radial_sum;\n")),
    "backward: the block reduction's result read outside thread 0": (
        CLASS_DENSITY, ("  const A radial = radial_shared;\n", "  const A radial = radial_sum;\n")),
    "warp_sum: shuffle tree starts at offset 8 (changed constant)": (
        CLASS_DENSITY, ("  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync",
                        "  for (int offset = kWarp / 4; offset > 0; offset /= 2) v += __shfl_xor_sync")),
    "backward: pair factor 2 dropped (changed constant)": (
        CLASS_DENSITY, ("  const A scale = A(2) * grad[c] * pair_weight<A>(nc);\n  const A inv",
                        "  const A scale = A(1) * grad[c] * pair_weight<A>(nc);\n  const A inv")),
    "cm partial: barrier before reading the block's max removed": (
        CM_MARGIN, ("  if (tid == 0) shared_max = m;\n  __syncthreads();  // the max visible to every thread; the reduction's "
                    "storage free again\n", "  if (tid == 0) shared_max = m;\n")),
    "cm gradient: barrier between the two block reductions removed": (
        CM_MARGIN, ("  __syncthreads();  // the storage is reused at once\n", "")),
    "cm: split width rounded down, the last classes of a row dropped (changed constant)": (
        CM_MARGIN, ("  const int64_t width = (c + splits - 1) / splits;", "  const int64_t width = c / splits;")),
    "norm_contraction: lane 31 leaves before the shuffle reduction": (
        NORM_CONTRACTION, ("  if (row >= n) return;\n  const T* xr = x + row * d;\n",
                           "  if (row >= n || lane == kWarp - 1) return;\n  const T* xr = x + row * d;\n")),
}


def _shim(builder, mutant: str | None):
    objs = [builder.cuda_object(ROOT / "tests" / "emu" / "kernel_shim.cpp")]
    mutated_file, mutation = MUTANTS[mutant] if mutant else (None, None)
    for path in (CLASS_DENSITY, NORM_CONTRACTION, CM_MARGIN):
        objs.append(builder.cuda_object(path, mutation if path == mutated_file else None))
    lib = builder.library("shim_" + str(abs(hash(mutant))), objs)
    lib.shim_error_string.restype = ctypes.c_char_p
    return lib


def _density_inputs():
    g = torch.Generator().manual_seed(3)
    # Classes of 40 rows (two 32-row pull chunks), 25, 10 and a singleton; d > 32 so lanes stride.
    labels = torch.tensor([0] * 40 + [1] * 25 + [2] * 10 + [3])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    n, d, c = labels.numel(), 45, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    grad = torch.randn(c, generator=g, dtype=torch.float64)
    return x, labels, c, grad


def _run_density(lib, x, labels, c, grad, t=2.0):
    """(density, dx, error message or None) from the emulated kernels."""
    n, d = x.shape
    sorted_labels, order = torch.sort(labels, stable=True)
    offsets = torch.searchsorted(sorted_labels, torch.arange(c + 1))
    norm, us, row_sum, density = (torch.empty(n, dtype=x.dtype), torch.empty(n, d, dtype=x.dtype),
                                  torch.empty(n, dtype=x.dtype), torch.empty(c, dtype=x.dtype))
    args = [_ptr(x), _ptr(order), _ptr(sorted_labels), _ptr(offsets), ctypes.c_int64(n), ctypes.c_int64(d),
            ctypes.c_int64(c), ctypes.c_double(t)]
    err = lib.shim_class_density_forward(*args, _ptr(norm), _ptr(us), _ptr(row_sum), _ptr(density))
    if err:
        return None, None, lib.shim_error_string(err).decode()
    pull, dx = torch.empty(n, d, dtype=x.dtype), torch.empty(n, d, dtype=x.dtype)
    err = lib.shim_class_density_backward(_ptr(grad), _ptr(x), _ptr(order), _ptr(sorted_labels), _ptr(offsets),
                                          _ptr(norm), ctypes.c_int64(n), ctypes.c_int64(d), ctypes.c_int64(c),
                                          ctypes.c_double(t), _ptr(us), _ptr(pull), _ptr(dx))
    if err:
        return None, None, lib.shim_error_string(err).decode()
    return density, dx, None


def _run_norm(lib, x):
    n, d = x.shape
    out, norm = torch.empty(n, dtype=x.dtype), torch.empty(n, dtype=x.dtype)
    err = lib.shim_norm_contraction_forward(_ptr(x), _ptr(out), _ptr(norm), ctypes.c_int64(n), ctypes.c_int64(d),
                                            ctypes.c_double(0.5), ctypes.c_double(1.0 / 1.5))
    return out, norm, (lib.shim_error_string(err).decode() if err else None)


CM_SCALE, CM_M3, CM_SPLITS = 30.0, 0.35, 3


def _cm_inputs():
    g = torch.Generator().manual_seed(5)
    n, c, d = 7, 701, 12  # 701 classes in 3 splits: the last split is narrower
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[1] = -100  # ignored
    weight = torch.rand(n, generator=g, dtype=torch.float64)
    weight[2] = 0.0  # a zero row weight: statistics but no gradient
    return x, w, y, weight


def _run_cm(lib, x, w, y, weight):
    """(loss rows, G' rows, radial, error message or None) of the fused epilogue."""
    n, c = x.shape[0], w.shape[0]
    r = row_norm(x)
    dots = ((x / r[:, None]) @ w.T).contiguous()
    inv_wn = 1.0 / row_norm(w)
    loss, shift, log_sum, radial = (torch.zeros(n, dtype=x.dtype) for _ in range(4))
    scratch = torch.empty(n * CM_SPLITS * 2, dtype=x.dtype)
    lib.shim_cm_fused.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                                                          ctypes.c_double, ctypes.c_int64, ctypes.c_void_p]
    err = lib.shim_cm_fused(_ptr(dots), _ptr(inv_wn), _ptr(r), _ptr(y), _ptr(weight), _ptr(loss), _ptr(shift),
                            _ptr(log_sum), _ptr(radial), n, c, CM_SCALE, CM_M3, CM_SPLITS, _ptr(scratch))
    if err:
        return None, None, None, lib.shim_error_string(err).decode()
    return loss, dots, radial, None


def _cm_reference(x, w, y, weight):
    """Per-row CosFace losses with the contraction scale, G' = (dL/dcos) / ||w_j|| and the radial
    coefficient dL/d||x|| (through the scale), by autograd in float64."""
    r = row_norm(x)
    inv_wn = 1.0 / row_norm(w)
    cos = (((x / r[:, None]) @ w.T) * inv_wn).requires_grad_(True)
    rr = r.clone().requires_grad_(True)
    valid = y != -100
    safe = torch.where(valid, y, 0)
    a = CM_SCALE * torch.sigmoid(rr)
    onehot = torch.nn.functional.one_hot(safe, w.shape[0]).to(x.dtype)
    logits = a[:, None] * (cos - CM_M3 * onehot)
    rows = torch.logsumexp(logits, dim=1) - (logits * onehot).sum(1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    dcos, dr = torch.autograd.grad((weight * rows).sum(), (cos, rr))
    return rows.detach(), dcos * inv_wn, dr


def _density_reference(x, labels, c, grad, t=2.0):
    xr = x.clone().requires_grad_(True)
    density = reference.class_density(xr, labels, c, t=t)
    (dx,) = torch.autograd.grad(density, xr, grad)
    return density.detach(), dx


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _verdicts(lib, order):
    """Per order: None when the emulated kernels match the float64 reference (1e-10), else why not."""
    x, labels, c, grad = _density_inputs()
    ref_density, ref_dx = _density_reference(x, labels, c, grad)
    xn = torch.randn(21, 70, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_norm = row_norm(xn)
    ref_out = reference.norm_contraction(xn, offset=0.5, temperature=1.5)
    cm_in = _cm_inputs()
    ref_cm = _cm_reference(*cm_in)
    verdicts, outputs = {}, {}
    for mode in ORDERS:
        order(mode)
        density, dx, error = _run_density(lib, x, labels, c, grad)
        out, norm, nerror = _run_norm(lib, xn)
        cm_loss, cm_grad, cm_radial, cerror = _run_cm(lib, *cm_in)
        if error or nerror or cerror:
            verdicts[mode] = f"emulator error: {error or nerror or cerror}"
            continue
        errs = {"density": _rel(density, ref_density), "dx": _rel(dx, ref_dx), "norm": _rel(norm, ref_norm),
                "contraction": _rel(out, ref_out), "cm loss": _rel(cm_loss, ref_cm[0]),
                "cm G'": _rel(cm_grad, ref_cm[1]), "cm radial": _rel(cm_radial, ref_cm[2])}
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}  # NaN counts as bad
        verdicts[mode] = f"mismatch vs reference: {bad}" if bad else None
        outputs[mode] = (density, dx, out, norm, cm_loss, cm_grad, cm_radial)
    return verdicts, outputs


def test_unmutated_kernels_match_reference_bitwise_in_every_order(builder, order):
    """The positive control: the real kernels pass in every order, with bitwise-equal results (the
    kernels' determinism claim holds whatever order the blocks and threads run in)."""
    verdicts, outputs = _verdicts(_shim(builder, None), order)
    assert all(v is None for v in verdicts.values()), verdicts
    first = outputs[ORDERS[0]]
    for mode in ORDERS[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, outputs[mode])), mode


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(builder, order, mutant):
    verdicts, _ = _verdicts(_shim(builder, mutant), order)
    caught = {mode: why for mode, why in verdicts.items() if why is not None}
    assert caught, f"mutant survived every order: {mutant}"
    print(f"{mutant}: caught in {sorted(caught)}; e.g. {next(iter(caught.values()))[:160]}")


@pytest.mark.parametrize("rows,num_classes,sms", [(64, 1_000_000, 132), (67, 1_000_000, 132), (8, 100_000, 114),
                                                  (1, 3_000_000, 132)])
def test_cm_epilogue_fills_the_gpu_when_a_chunk_has_few_rows(builder, rows, num_classes, sms):
    """A 256 MiB chunk holds only 64 rows at C = 1M: one block per row would leave an H100/H200 with
    64 of 528 block slots busy. The epilogue splits each row's classes so the grid reaches four
    blocks per multiprocessor, each block sweeping at least 2048 classes."""
    lib = _shim(builder, None)
    lib.shim_cm_epilogue_splits.restype = ctypes.c_int64
    target = 4 * sms
    splits = lib.shim_cm_epilogue_splits(ctypes.c_int64(rows), ctypes.c_int64(num_classes), ctypes.c_int64(target),
                                         ctypes.c_int64(2048))
    # Four blocks per multiprocessor, unless the rows are too short to give every block 2048 classes.
    assert rows * splits >= min(target, rows * (num_classes // 2048))
    assert num_classes // splits >= 2048 and splits <= 65535


@pytest.mark.parametrize("rows,num_classes,expected", [(528, 1_000_000, 1), (10_000, 100, 1), (4, 3000, 1), (4, 5000, 2),
                                                       (4, 100, 1)])
def test_cm_epilogue_splits_only_where_it_pays(builder, rows, num_classes, expected):
    lib = _shim(builder, None)
    lib.shim_cm_epilogue_splits.restype = ctypes.c_int64
    assert lib.shim_cm_epilogue_splits(ctypes.c_int64(rows), ctypes.c_int64(num_classes), ctypes.c_int64(528),
                                       ctypes.c_int64(2048)) == expected


def test_emulated_backend_runs_the_same_kernels(order):
    """The installed extension's emulated cuda backend is bitwise stable across orders too (end to end
    through the driver), and equals the reference in float64."""
    import idid_kernels as ik
    if "cuda" not in ik.available_backends() or torch.cuda.is_available():
        pytest.skip("needs the emulated cuda backend (IDID_KERNELS_CUDA_EMULATE=1, a CPU build with the emulator)")
    x, labels, c, _ = _density_inputs()
    results = []
    for mode in ORDERS:
        order(mode)
        xr = x.clone().requires_grad_(True)
        density = ik.class_density(xr, labels, c, backend="cuda")
        (dx,) = torch.autograd.grad(density.sum(), xr)
        results.append((density.detach(), dx))
    for density, dx in results[1:]:
        assert torch.equal(density, results[0][0]) and torch.equal(dx, results[0][1])
    ref = reference.class_density(x, labels, c)
    assert _rel(results[0][0], ref) <= 1e-12


def test_env_switch_controls_availability(monkeypatch):
    import idid_kernels as ik
    from idid_kernels import _backends
    ext = _backends.extension()
    if ext is None or not getattr(ext, "with_cuda_emulator", 0) or torch.cuda.is_available():
        pytest.skip("needs a CPU build with the CUDA emulator")
    monkeypatch.setenv("IDID_KERNELS_CUDA_EMULATE", "0")
    assert "cuda" not in ik.available_backends()
    with pytest.raises(_backends.BackendUnavailableError, match="IDID_KERNELS_CUDA_EMULATE=1"):
        ik.norm_contraction(torch.randn(3, 4), backend="cuda")
    monkeypatch.setenv("IDID_KERNELS_CUDA_EMULATE", "1")
    assert "cuda" in ik.available_backends()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(ik.norm_contraction(x, backend="cuda"), reference.norm_contraction(x), rtol=1e-12)
    # auto never picks the emulator on the CPU
    assert _backends.select_backend("norm_contraction", "auto", torch.device("cpu")) == "cpp"
