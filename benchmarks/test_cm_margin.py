"""cm_margin_loss (CosFace and ArcFace with the sigmoid contraction) forward + backward: every
backend, the eager reference, torch.compile of it and pytorch-metric-learning, over a sweep of C and N."""
SUITE = "cm"


def test_cm_margin_loss(benchmark, bench_impl, case, impl):
    bench_impl(benchmark, case, impl)
