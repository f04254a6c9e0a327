"""The op benchmarks for pytest-benchmark users:

    python -m pytest benchmarks/ --benchmark-only [--benchmark-save=NAME] [-k "cpp and forward"]

Same cases, inputs and implementations as ``python -m benchmarks.run --quick`` (CPU). Every test
first checks the implementation's forward output and gradients against the reference on the same
inputs, so a benchmark of a wrong backend fails instead of reporting a speed. The project's test
run (``pytest -q tests``) does not collect this directory.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.cases import MODES, op_cases
from benchmarks.run import _check, _leaves, _pool, _Runner

DEVICE = torch.device("cpu")


def _params():
    out = []
    for case in op_cases():
        for size in case.sizes("quick"):
            for name in ("reference", "cpp", "naive", "dense"):
                for mode in MODES:
                    sid = "-".join(f"{k}{v}" for k, v in size.items())
                    out.append(pytest.param(case, size, name, mode, id=f"{case.key}-{sid}-{name}-{mode}"))
    return out


_REF_CACHE: dict = {}


@pytest.mark.parametrize("case,size,impl_name,mode", _params())
def test_op(benchmark, case, size, impl_name, mode):
    why = case.unavailable()
    if why:
        pytest.skip(why)
    dtype = torch.float32
    pool = _pool(case, size, dtype, DEVICE)
    impls = {i.name: i for i in case.impls(size, dtype, DEVICE, pool[0])}
    impl = impls.get(impl_name)
    if impl is None:
        pytest.skip(f"{impl_name} is not an implementation of {case.key} here "
                    f"(available: {', '.join(impls)})")
    if impl.skip or impl.fn is None:
        pytest.skip(impl.skip or "no implementation")
    runner = _Runner(case, pool, DEVICE)
    stash: dict = {}
    fwd, bwd, both = runner.steps(impl.fn, False, stash)
    both(0)  # warm-up and the stashed output/gradients on input set 0
    if impl_name != "reference":
        key = (case.key, tuple(sorted(size.items())))
        if key not in _REF_CACHE:
            ref_stash: dict = {}
            _Runner(case, pool, DEVICE).steps(impls["reference"].fn, False, ref_stash)[2](0)
            _REF_CACHE[key] = ref_stash
        why = _check(case, stash, _REF_CACHE[key], None)
        assert why is None, why
    counter = iter(range(1, 1 << 30))
    if mode == "forward":
        def target():
            with torch.no_grad():
                impl.fn(pool[next(counter) % len(pool)])
        benchmark(target)
    elif mode == "backward":
        def setup():
            inp = pool[next(counter) % len(pool)]
            out = impl.fn(inp)
            return (out, _leaves(case, inp), runner.gout(0, out)), {}
        benchmark.pedantic(lambda out, leaves, g: torch.autograd.grad(out, leaves, g), setup=setup, rounds=10,
                           warmup_rounds=1)
    else:
        def target():
            inp = pool[next(counter) % len(pool)]
            out = impl.fn(inp)
            torch.autograd.grad(out, _leaves(case, inp), runner.gout(0, out))
        benchmark(target)
