"""idid_loss forward + backward: every backend, the eager reference and torch.compile of it, over B and C."""
SUITE = "idid"


def test_idid_loss(benchmark, bench_impl, case, impl):
    bench_impl(benchmark, case, impl)
