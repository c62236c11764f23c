"""pytest-benchmark suite: every op's C++ CPU kernel against its eager reference at the LLaVA-NeXT shapes.

The cases are those of ``mrprune bench`` (:func:`mrprune.bench.ops.op_cases`) on one synthetic 672 x 672 LLaVA-NeXT
image: the 2304 high-resolution tokens for the graph ops, the 576 base tokens, K = 640 of the 2880 non-newline
tokens for the greedy selection, and so on. Every kernel's output is checked against the reference before it is
timed. Not part of the main test run (``testpaths`` is ``tests/``); run it with::

    pytest benchmarks/ --benchmark-only                      # D = 4096, 3 rounds per case (minutes on 2 cores)
    MRPRUNE_BENCH_DIM=1024 MRPRUNE_BENCH_ROUNDS=5 pytest benchmarks/ --benchmark-only --benchmark-group-by=group

``--benchmark-json FILE`` saves the numbers; ``--benchmark-compare`` compares with a saved run.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from mrprune.bench import ops as bench_ops  # noqa: E402
from mrprune.bench.shapes import SHAPES  # noqa: E402

DIM = int(os.environ.get("MRPRUNE_BENCH_DIM", "4096"))
ROUNDS = int(os.environ.get("MRPRUNE_BENCH_ROUNDS", "3"))
SHAPE = SHAPES["llava_next"]
SETTINGS = bench_ops.Settings(device=torch.device("cpu"), impls=("reference", "cpp"))


@functools.cache
def cases(dim: int) -> dict[str, bench_ops.Case]:
    """The op cases at ``dim``, by id (``op label``)."""
    features, lengths, _ = SHAPE.features(1, dim)
    return {f"{c.name} {c.label}": c for c in bench_ops.op_cases(SHAPE, features, lengths, bench_ops.OPS, SETTINGS)}


@functools.cache
def reference_output(case_id: str):
    return cases(DIM)[case_id].impls["reference"]()


CASE_IDS = list(cases(8))  # the labels do not depend on D


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_op(benchmark, case_id, impl):
    case = cases(DIM)[case_id]
    if impl not in case.impls:
        pytest.skip(f"no {impl} implementation of {case.name} on this machine (is mrprune._C built?)")
    call = case.impls[impl]
    if impl != "reference":
        check = bench_ops.compare(call(), reference_output(case_id), case.outputs)
        assert check.ok, f"{impl} disagrees with the reference: max err {check.max_abs_err}, {check.agreement}"
    benchmark.group = f"{case_id} ({SHAPE.name}, D={DIM})"
    benchmark.extra_info.update(shape=SHAPE.name, tokens=case.tokens, dim=DIM, k=case.k, impl=impl,
                                threads=torch.get_num_threads())  # fmt: skip
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1 if impl != "reference" else 0)
