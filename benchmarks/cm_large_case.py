"""cm_margin_loss at the size the CPU kernels are judged by (N=1024, d=256, C=50000, float32): CosFace
and margin "none" with the sigmoid contraction, beside eager, torch.compile, pytorch-metric-learning
and torch's chunked F.linear_cross_entropy, through the same runner as ``python -m idid_kernels bench``
(every row checked against the float64 reference first). About 6 minutes on 2 cores (AMD EPYC VM).

    python benchmarks/cm_large_case.py benchmarks/results/cpu_cm_large.csv
"""
import sys

from idid_kernels.bench import BenchConfig, run_bench
from idid_kernels.bench.cases import _cm_case
from idid_kernels.bench.report import print_and_save


def main(csv_path: str | None) -> int:
    cases = [_cm_case("cosface", 0.4, 1024, 256, 50000), _cm_case("none", None, 1024, 256, 50000)]
    result = run_bench(cases, BenchConfig(progress=False, budget_s=3.0, min_repeats=5),
                       command="python benchmarks/cm_large_case.py")
    return print_and_save(result, csv_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
