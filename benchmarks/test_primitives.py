"""pairwise_cosine, class_density and norm_contraction forward + backward: every backend, the eager
reference and torch.compile of it."""
SUITE = "primitives"


def test_primitive(benchmark, bench_impl, case, impl):
    bench_impl(benchmark, case, impl)
