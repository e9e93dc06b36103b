"""benchmarks/gpu_validate.sh, the one-command GPU validation: without a GPU it must refuse at once,
with a clear message and a non-zero status, and write nothing (its GPU path runs on a GPU only)."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import time

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validate.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for minutes")
def test_without_a_gpu_it_exits_at_once_with_a_message_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "no CUDA GPU here" in proc.stderr and "nothing was run" in proc.stderr
    assert time.monotonic() - start < 60
    assert not out.exists()


def test_without_arguments_it_prints_usage():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "usage:" in proc.stderr


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=60).returncode == 0


def test_the_gpu_test_files_it_names_exist():
    """A renamed test file would otherwise make the GPU step collect nothing for it."""
    import re
    text = SCRIPT.read_text()
    names = set(re.findall(r"tests/test_\w+\.py", text))
    assert len(names) >= 7
    root = SCRIPT.parents[1]
    assert not [n for n in names if not (root / n).is_file()]


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: a GPU of capability 9.0, every step passing except the backend check
case "$*" in
  *torch.cuda.is_available*) exit 0 ;;
  *get_device_capability*) echo 90 ;;
  *"idid_kernels check"*) echo "check: MISMATCH"; exit 1 ;;
  *) echo "ran: $*"; env | grep -E '^(IDID_KERNELS_CUDA_ARCH|IDID_KERNELS_TRITON_MAX_CONFIGS)='; exit 0 ;;
esac
"""


def _run_with_stand_ins(tmp_path, **extra_env):
    """The script with stand-ins for nvidia-smi and python (its orchestration only)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    (bin_dir / "python").write_text(FAKE_PYTHON)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python"), "HOME": str(tmp_path), **extra_env}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    return proc, out


def test_steps_are_recorded_and_a_failing_step_does_not_stop_the_run(tmp_path):
    proc, out = _run_with_stand_ins(tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    summary = (out / "summary.txt").read_text().splitlines()
    steps = {line.split()[0]: line.split()[1] for line in summary[:-1]}
    assert steps == {"nvidia-smi": "exit=0", "build": "exit=0", "info": "exit=0", "check": "exit=1",
                     "gpu-tests": "exit=0", "bench": "exit=0", "pytest": "exit=0"}
    assert "SOME STEP FAILED" in summary[-1]
    assert "IDID_KERNELS_CUDA_ARCH=90" in (out / "build.log").read_text()
    assert "pip install --no-build-isolation -e .[test]" in (out / "build.log").read_text()
    pytest_log = (out / "pytest.log").read_text()
    assert "IDID_KERNELS_TRITON_MAX_CONFIGS=1" in pytest_log and f"--junitxml {out}/junit.xml" in pytest_log
    bench_log = (out / "bench.log").read_text()
    assert "--suite gpu-goals --dtype bfloat16" in bench_log and f"--csv {out}/bench.csv" in bench_log
    assert "GPU 0: Stand-in" in (out / "nvidia-smi.txt").read_text()


def test_steps_past_the_time_budget_are_skipped_and_fail_the_run(tmp_path):
    proc, out = _run_with_stand_ins(tmp_path, GPU_VALIDATE_BUDGET_S="10")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary[:-1]] == [[name, "exit=skip"] for name in (
        "nvidia-smi", "build", "info", "check", "gpu-tests", "bench", "pytest")]
