"""cm_margin_loss on well-separated logits (float32, N=256, C=2048, CosFace with the sigmoid
contraction), beside random features: every feature on its own class's weight row, so the
off-target probabilities are tiny and, times a g / ||w||, part of the gradient entries fall below
float32's smallest normal number (their share is printed). x86 CPUs slow down on subnormal
operands; the C++ row passes run with them flushed to zero (csrc/cpu/fp_env.h). Through the runner
of ``python -m idid_kernels bench`` (every row checked against the float64 reference first); about
a minute on 2 cores.

    python benchmarks/cm_separated_case.py benchmarks/results/cpu_cm_separated.csv
"""
import dataclasses
import sys

import torch

from idid_kernels.bench import BenchConfig, run_bench
from idid_kernels.bench.cases import _cm_case
from idid_kernels.bench.report import print_and_save

N, C = 256, 2048


def separated(d: int):
    """A head late in training, idealised: class rows of unit-scale entries and every feature of
    norm 20 exactly along its class's row (float64). The other classes' cosines spread around 0
    with sd 1/sqrt(d)."""
    def make(g: torch.Generator):
        w = torch.randn(C, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (N,), generator=g)
        return [20 * torch.nn.functional.normalize(w[y], dim=1), w], [y]
    return make


def subnormal_share(x: torch.Tensor, w: torch.Tensor, s: float) -> float:
    """Share of the mean-reduction gradient entries a g p_j / ||w_j|| that are nonzero and below
    float32's smallest normal number (float64)."""
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    a = s * torch.sigmoid(x.norm(dim=1, keepdim=True))
    g = a / x.shape[0] * torch.softmax(a * cos, 1) / w.norm(dim=1)
    return float(((g > 0) & (g < torch.finfo(torch.float32).tiny)).double().mean())


def main(csv_path: str | None) -> int:
    cases = []
    for s, d, kind in ((64.0, 64, "separated"), (64.0, 64, "random")):
        base = _cm_case("cosface", 0.4, N, d, C, s=s)
        make = separated(d) if kind == "separated" else base.make
        cases.append(dataclasses.replace(base, config=f"cosface+sigmoid s={s:g} {kind}", make=make, externals=[]))
    cfg = BenchConfig(progress=False, budget_s=1.0, min_repeats=15)
    for case in cases:
        (x, w), _ = case.make(torch.Generator().manual_seed(cfg.seed))  # the runner's inputs
        s = case.kwargs["s"]
        print(f"{case.label}: {100 * subnormal_share(x, w, s):.2f}% of the gradient entries are float32 subnormals")
    result = run_bench(cases, cfg, command="python benchmarks/cm_separated_case.py")
    return print_and_save(result, csv_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
