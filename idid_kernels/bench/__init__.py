"""``python -m idid_kernels bench``: fused backends vs eager PyTorch vs torch.compile, side by side.

- :mod:`.cases`: what is measured (ops, configurations, size presets, the GEMM floors, the
  pytorch-metric-learning column);
- :mod:`.runner`: checks every implementation against the float64 reference, then times it and
  measures its peak memory (:mod:`.measure`);
- :mod:`.report`: the printed table, CSV, JSON and plots; :mod:`.command`: the command line.

The pytest-benchmark suites in ``benchmarks/`` time the same cases.
"""
from .cases import Case, External, suite_cases
from .runner import BenchConfig, BenchResult, CaseRun, Row, run_bench, run_case

__all__ = ["BenchConfig", "BenchResult", "Case", "CaseRun", "External", "Row", "run_bench", "run_case", "suite_cases"]
