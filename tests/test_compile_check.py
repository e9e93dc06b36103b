"""The ahead-of-time compile check (idid_kernels/compile_check.py, ``python -m idid_kernels compile-check``).

Everything that imports the kernels for their GPU configs runs in a subprocess without
TRITON_INTERPRET (the suite sets it when no GPU is visible, and the kernel modules pick their
autotune configs when imported). The real compiles need no GPU: triton compiles for a given target.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from idid_kernels import compile_check as cc  # noqa: E402


def _native(code: str) -> str:
    """Run ``code`` in a fresh interpreter with the compile check's worker environment; its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=cc.worker_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_table_covers_every_kernel_and_matches_their_parameters():
    """Every Triton kernel has an entry, each representative call passes exactly the kernel's
    parameters (with every autotune config), and the signatures derived from them are those of
    triton's own binder."""
    problems = json.loads(_native("""
        import json
        from idid_kernels import compile_check as cc
        print(json.dumps(cc.table_problems()))
    """))
    assert problems == []


def test_table_check_catches_a_missing_entry_and_a_changed_parameter_list():
    """Negative control: a table without one kernel, and a call with a renamed and a missing
    argument, are both reported."""
    problems = json.loads(_native("""
        import dataclasses, json
        from idid_kernels import compile_check as cc
        specs = [s for s in cc.SPECS if s.key != "cm_margin._forward_kernel"]
        i = next(i for i, s in enumerate(specs) if s.key == "idid_loss._grad_cols_kernel")
        def changed(t, old=specs[i].args):
            d = old(t)
            d["rows_per_chunk"] = d.pop("rows_per_split")
            del d["dv_ptr"]
            return d
        specs[i] = dataclasses.replace(specs[i], args=changed)
        print(json.dumps(cc.table_problems(specs)))
    """))
    assert any("cm_margin._forward_kernel: a Triton kernel without an entry" in p for p in problems), problems
    bad = [p for p in problems if p.startswith("idid_loss._grad_cols_kernel")]
    assert bad and "rows_per_chunk" in bad[0] and "dv_ptr" in bad[0] and "rows_per_split" in bad[0], problems
    assert len(problems) == 1 + len(bad), problems


def test_plan_uses_the_gpu_configs_pruned_per_dtype():
    """The plan holds the GPU config lists (not the interpreter's single config), and for each dtype
    exactly the configs the autotuner's pruning keeps for a launch with that dtype."""
    got = json.loads(_native("""
        import json
        from idid_kernels import compile_check as cc
        jobs = cc.plan([90], list(cc.DTYPES), kernels=["cm_margin._forward_kernel"], variants="default")
        spec = cc.SPECS_BY_KEY["cm_margin._forward_kernel"]
        kernel = cc._kernel_object(spec)
        want = {d: sorted(json.dumps([c.kwargs, c.num_warps, c.num_stages], sort_keys=True)
                          for c in cc.autotune_configs(kernel, cc.call_values(spec, d, "default")))
                for d in cc.DTYPES}
        have = {d: sorted(json.dumps([j.meta, j.num_warps, j.num_stages], sort_keys=True)
                          for j in jobs if j.dtype == d) for d in cc.DTYPES}
        print(json.dumps({"want": want, "have": have, "all": len(kernel.configs)}))
    """))
    assert got["have"] == got["want"]
    for dtype, configs in got["have"].items():
        assert configs, dtype
        assert all(json.loads(c)[0]["BLOCK_N"] >= 32 for c in configs), configs  # not the interpreter's 16


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    536 bytes stack frame, 860 bytes spill stores, 792 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 536 bytes cumulative stack size\n")
    assert cc.parse_ptxas_log(log) == dict(registers=255, stack=536, spill_stores=860, spill_loads=792)
    assert cc.parse_ptxas_log("ptxas info    : Used 40 registers, used 0 barriers") == dict(
        registers=40, stack=0, spill_stores=0, spill_loads=0)
    assert cc.parse_ptxas_log("garbage") is None


def _job(kernel, dtype, meta, warps, stages, arch=90, variant="default"):
    return cc.Job(kernel, variant, dtype, arch, meta, warps, stages)


def test_one_real_compile_for_sm90_and_its_cached_result(tmp_path):
    """One autotune config of one kernel compiled to a cubin for sm_90 (a few seconds); compiled
    again, the result comes from the cache, unchanged."""
    job = _job("pairwise_cosine._forward_kernel", "bfloat16", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32), 4, 2)
    res, again = cc.compile_jobs([job, job], workers=1, cache_dir=str(tmp_path), timeout=300)
    assert res.status == "OK", res.error
    assert res.registers > 0 and res.shared > 0
    assert res.spill_stores == 0 and res.spill_loads == 0 and res.stack is not None
    assert not res.cached and again.cached
    assert (again.status, again.registers, again.shared, again.spill_stores) == (
        res.status, res.registers, res.shared, res.spill_stores)


def test_a_broken_config_fails_with_exit_status_1(tmp_path):
    """Negative control: a config whose shared memory exceeds sm_80's 163 KB, and one with an
    invalid num_warps, are reported as FAIL, and the command's core function returns 1."""
    too_big = _job("pairwise_cosine._forward_kernel", "bfloat16", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=512), 4, 4,
                   arch=80)
    bad_warps = _job("pairwise_cosine._forward_kernel", "bfloat16", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32), 3, 2,
                     arch=80)
    path = tmp_path / "cc.json"
    status = cc.run_compile_check(archs=[80], kernels=[], extra_jobs=[too_big, bad_warps], jobs=2, cache=False,
                                  json_path=str(path), quiet=True, out=open(tmp_path / "out.txt", "w"))
    assert status == 1
    results = json.loads(path.read_text())["results"]
    assert [r["status"] for r in results] == ["FAIL", "FAIL"]
    assert "shared memory" in results[0]["error"] and results[0]["shared"] > cc.SHARED_LIMIT[80]
    assert "num_warps" in results[1]["error"]
    table = (tmp_path / "out.txt").read_text()
    assert table.count("FAIL") >= 2


def test_spills_above_max_spill_fail(tmp_path):
    """--max-spill turns a compile that spills more than the bound into a FAIL (a config that
    spills on purpose: fp64 operands in a large tile)."""
    job = _job("cm_margin._forward_kernel", "float64", dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=32), 8, 3)
    status = cc.run_compile_check(archs=[90], kernels=[], extra_jobs=[job], jobs=1, cache=False, max_spill=0,
                                  json_path=str(tmp_path / "cc.json"), quiet=True, out=open(tmp_path / "o", "w"))
    (res,) = json.loads((tmp_path / "cc.json").read_text())["results"]
    assert res["spill_stores"] > 0, res
    assert status == 1 and res["status"] == "FAIL" and "--max-spill" in res["error"]
