"""Tests of ``mrprune.cosine_graph``: the reference against brute force, every kernel backend against the float64
reference, invariants, edge cases, batching, argument validation, opcheck and torch.compile; then the Triton kernels
(under TRITON_INTERPRET=1 on the CPU, natively on a GPU) at small shapes, the int64 offset arithmetic, and a compile
check for sm_90."""

from __future__ import annotations

import math

import pytest
import torch

import mrprune
from mrprune import reference, testing
from tests.brute_force import TINY_GRAPH_CASES as TINY_CASES
from tests.brute_force import cosine_graph as brute_cosine_graph
from tests.utils import (
    INPUT_DTYPES,
    TRITON_DEVICE,
    assert_close,
    clustered,
    kernel_backends,
    oracle,
    padded,
    run,
    to_triton,
    triton_test,
)

OP = "cosine_graph"
BACKENDS = kernel_backends(OP)
# Large parametrizations leave out Triton under the CPU interpreter (see the Triton section below).
BACKENDS_LARGE = kernel_backends(OP, interpreted=False)
# Float32 kernels decide an edge whose float64 cosine lies within DELTA of the threshold either way (their rounding
# error is ~1e-6 at D = 4096): rows with such an entry are left out of elementwise comparisons.
DELTA = 1e-5


# --- brute force (explicit loops, float64 Python floats) ------------------------------------------------------------


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_reference_matches_brute_force(case):
    """reference.cosine_graph equals the loop implementation of the spec (with padding garbage around the item)."""
    rows, threshold, temperature = TINY_CASES[case]
    want_graph, want_degree = brute_cosine_graph(rows, threshold, temperature)
    n, dim = len(rows), len(rows[0])
    x = torch.full((2, n + 2, dim), 7.0, dtype=torch.float64)
    x[1, :n] = torch.tensor(rows, dtype=torch.float64)
    graph, degree = reference.cosine_graph(x, torch.tensor([0, n]), threshold, temperature)
    expected_graph = torch.zeros(2, n + 2, n + 2, dtype=torch.float64)
    expected_graph[1, :n, :n] = torch.tensor(want_graph, dtype=torch.float64)
    expected_degree = torch.zeros(2, n + 2, dtype=torch.float64)
    expected_degree[1, :n] = torch.tensor(want_degree, dtype=torch.float64)
    torch.testing.assert_close(graph, expected_graph, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(degree, expected_degree, rtol=0, atol=0)


def test_brute_force_cases_exercise_the_rules():
    """The tiny cases really contain edge-less rows, a cosine equal to the threshold, and S = 0 non-edges."""
    _, degree = brute_cosine_graph(*TINY_CASES["high_threshold"])
    assert degree == [3.0, 3.0, 3.0]
    graph, degree = brute_cosine_graph(*TINY_CASES["tie_at_threshold"])
    assert graph[0][1] > 0 and graph[0][1] == graph[0][2] and graph[0][0] == graph[0][5] and graph[0][4] == 0.0
    assert degree[0] == 5.0  # 0, 1, 2 (cos = 0.6), 3 (0.8), 5 (1); not 4 (0.14)
    graph, degree = brute_cosine_graph(*TINY_CASES["underflowing_edge"])
    assert graph[0][1] == 0.0 and degree[0] == 3.0
    graph, degree = brute_cosine_graph(*TINY_CASES["threshold_zero"])
    assert graph[0][1] == 0.0 and degree[4] == 5.0  # orthogonal (S = 0) is no edge; the zero vector has none


# --- kernels against the float64 reference ------------------------------------------------------------------------


def near_threshold_rows(x: torch.Tensor, lengths: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, N]`` bool: valid rows with a float64 cosine within DELTA of the threshold (or a tiny non-zero cosine when
    the threshold is <= 0, for the |S / T| >= 1e-6 rule): float32 may legitimately decide those edges either way."""
    out = torch.zeros(x.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        u = x[b, :n].double()
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        s = u @ u.T
        ambiguous = (s - threshold).abs() < DELTA
        if threshold <= DELTA:
            ambiguous |= s.abs() < DELTA
        out[b, :n] = (ambiguous & (s != 0)).any(dim=1)  # an exact 0 (zero vector, orthogonal) is never an edge
    return out


def check_against_oracle(backend, x, lengths, threshold, temperature, max_ambiguous=0.1, impl=None):
    """``impl`` (a function of the op's arguments) replaces the public op with ``backend`` forced."""
    if impl is None:
        graph, degree = run(OP, backend, x, lengths, threshold, temperature)
    else:
        graph, degree = (t.cpu() for t in impl(x, lengths, threshold, temperature))
    want_graph, want_degree = oracle(OP, x, lengths, threshold, temperature)
    assert graph.dtype == degree.dtype == torch.float32
    assert graph.shape == want_graph.shape and degree.shape == want_degree.shape
    keep = ~near_threshold_rows(x, lengths, threshold)
    assert (~keep).sum() <= max_ambiguous * max(int(lengths.sum()), 1), "inputs too close to the threshold"
    assert_close(graph[keep], want_graph[keep])  # elementwise, every column of every kept row (padding included)
    assert torch.equal(degree[keep].double(), want_degree[keep])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_kernel_matches_reference_tiny(backend, case):
    """The brute-force cases (zero vectors, no edges, thresholds <= 0) through the kernels match the reference (a row
    whose cosine equals the threshold exactly is left out: float32 may round it either way)."""
    rows, threshold, temperature = TINY_CASES[case]
    check_against_oracle(backend, torch.tensor(rows)[None], torch.tensor([len(rows)]), threshold, temperature, 1.0)


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
@pytest.mark.parametrize("n", [1, 7, 33, 257])
@pytest.mark.parametrize("dim", [3, 64, 130])
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_kernel_matches_reference_clustered(backend, n, dim, threshold, temperature):
    """Odd token counts and feature sizes of clustered features (single item) match the float64 reference."""
    gen = torch.Generator().manual_seed(n * 1000 + dim)
    x = clustered(n, dim, generator=gen)[None]
    check_against_oracle(backend, x, torch.tensor([n]), threshold, temperature)


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("threshold", [0.5, 0.2])
@pytest.mark.parametrize("temperature", [0.03, 0.1])
def test_kernel_matches_reference_llava(backend, dtype, threshold, temperature):
    """Synthetic LLaVA-NeXT tokens (12 x 12 high-res grid, D = 256) in every input dtype match the float64
    reference computed on the same rounded inputs."""
    x = testing.llava_next_features(12, 12, 256, seed=3).to(dtype)[None]
    check_against_oracle(backend, x, torch.tensor([x.shape[1]]), threshold, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_matches_reference_padded_batch(backend, dtype):
    """A padded batch (large garbage in the padding, one empty item) matches the reference; padding is zero."""
    gen = torch.Generator().manual_seed(5)
    items = [clustered(n, 48, generator=gen) for n in (33, 0, 7, 20)]
    x, lengths = padded(items)
    x = x.to(dtype)
    check_against_oracle(backend, x, lengths, 0.5, 0.03)
    graph, degree = run(OP, backend, x, lengths)
    assert not graph[1].any() and not degree[1].any()
    assert not graph[2, 7:].any() and not graph[2, :, 7:].any() and not degree[2, 7:].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, -0.3])
def test_kernel_matches_reference_non_positive_threshold(backend, threshold):
    """Thresholds <= 0 (almost every pair is an edge, exact zeros are not) match the reference."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 40, 6, generator=gen)
    x[0, 3] = 0.0  # a zero vector: S = 0 exactly, never an edge
    x[0, 5, :3], x[0, 5, 3:], x[0, 6, :3], x[0, 6, 3:] = 1.0, 0.0, 0.0, 1.0  # orthogonal pair: S = 0 exactly
    check_against_oracle(backend, x, torch.tensor([40]), threshold, 0.1)
    graph, degree = run(OP, backend, x, torch.tensor([40]), threshold, 0.1)
    assert graph[0, 5, 6] == 0 and graph[0, 6, 5] == 0 and degree[0, 3] == 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_non_contiguous_and_int32_lengths(backend):
    """A non-contiguous feature view and int32 lengths give the same result as contiguous / int64 inputs."""
    gen = torch.Generator().manual_seed(11)
    base = clustered(2 * 30, 40, generator=gen).reshape(2, 30, 40)
    view = base.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    lengths = torch.tensor([30, 17])
    want = run(OP, backend, base, lengths)
    got = run(OP, backend, view, lengths.to(torch.int32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- invariants ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_graph_invariants(impl, threshold, temperature):
    """Rows sum to 1 on valid rows and 0 on padding; entries with cosine below the threshold are 0; the edge pattern is
    symmetric; degree = number of positive entries of a row (or n for an edge-less row)."""
    gen = torch.Generator().manual_seed(13)
    items = [clustered(n, 32, generator=gen) for n in (50, 21, 1)]
    items[1][4] = 0.0  # an edge-less row
    x, lengths = padded(items)
    graph, degree = run(OP, impl, x, lengths, threshold, temperature)
    for b, n in enumerate(lengths.tolist()):
        assert_close(graph[b, :n].sum(-1), torch.ones(n))
        assert not graph[b, n:].any() and not graph[b, :, n:].any() and not degree[b, n:].any()
        u = x[b, :n].double()
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        s = u @ u.T
        has_edge = (s >= threshold + DELTA).any(dim=1)
        below = s < threshold - DELTA
        assert not graph[b, :n, :n][below & has_edge[:, None]].any()
        positive = graph[b, :n, :n] > 0
        edges = positive & has_edge[:, None]  # an edge-less row is uniform: positive, but not edges
        clear = (s - threshold).abs() >= DELTA  # float32 may break the symmetry of borderline cosines only
        assert torch.equal(edges[clear], edges.T[clear])
        # an edge-less row is uniform, so "positive entries" is the edge count or n, as the degree
        assert torch.equal(degree[b, :n], positive.sum(-1).to(degree.dtype))
    assert degree[1, 4] == 21 and torch.allclose(graph[1, 4, :21], torch.full((21,), 1 / 21))


# --- edge cases ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_single_token(impl):
    """N = 1: the only entry is a self edge with probability 1 and degree 1."""
    x = torch.tensor([[[0.3, -1.0, 2.0]]])
    graph, degree = run(OP, impl, x, torch.tensor([1]))
    assert torch.equal(graph, torch.ones(1, 1, 1)) and torch.equal(degree, torch.ones(1, 1))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_identical_tokens(impl):
    """All tokens identical: every entry is an edge, P is uniform 1/n, degree n."""
    n = 37
    x = torch.randn(1, 1, 70).expand(1, n, 70).contiguous()
    graph, degree = run(OP, impl, x, torch.tensor([n]))
    assert_close(graph, torch.full((1, n, n), 1 / n))
    assert torch.equal(degree, torch.full((1, n), float(n)))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("threshold", [0.5, 0.0, -1.0])
def test_zero_vectors(impl, threshold):
    """A zero vector has no edge (uniform row, degree n) and is nobody's edge, even for thresholds <= 0."""
    gen = torch.Generator().manual_seed(17)
    x = clustered(9, 12, generator=gen)
    x[2] = 0.0
    x[6] = 0.0
    graph, degree = run(OP, impl, x[None], torch.tensor([9]), threshold, 0.03)
    for z in (2, 6):
        assert_close(graph[0, z], torch.full((9,), 1 / 9))
        assert degree[0, z] == 9
    others = [i for i in range(9) if i not in (2, 6)]
    assert not graph[0, others][:, [2, 6]].any()
    assert (degree[0, others] <= 7).all()


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_zero_lengths(impl):
    """Items of length 0 give all-zero outputs (whatever their padding holds)."""
    x = torch.randn(2, 5, 4) * 100
    graph, degree = run(OP, impl, x, torch.tensor([0, 0]))
    assert graph.shape == (2, 5, 5) and degree.shape == (2, 5)
    assert not graph.any() and not degree.any()


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_duplicate_tokens(impl):
    """A duplicated token (LLaVA-NeXT newline tokens are all the same vector) gets equal rows, equal columns and
    equal degrees."""
    x = testing.llava_next_features(4, 5, 64, seed=1)
    newlines = [576 + r * 6 + 5 for r in range(4)]
    graph, degree = run(OP, impl, x[None], torch.tensor([x.shape[0]]))
    g = graph[0]
    for k in newlines[1:]:
        assert_close(g[k], g[newlines[0]])
        assert_close(g[:, k], g[:, newlines[0]])
        assert degree[0, k] == degree[0, newlines[0]]
    assert degree[0, newlines[0]] >= len(newlines)


# --- batching -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_batch_equals_per_item(impl):
    """Each item of a 3-item batch of different lengths gives the same graph as the item alone (bitwise for cpp)."""
    gen = torch.Generator().manual_seed(19)
    items = [clustered(n, 24, generator=gen) for n in (40, 3, 300)]
    x, lengths = padded(items)
    graph, degree = run(OP, impl, x, lengths)
    for b, item in enumerate(items):
        n = item.shape[0]
        alone_graph, alone_degree = run(OP, impl, item[None], torch.tensor([n]))
        if impl in ("cpp", "reference"):
            assert torch.equal(graph[b, :n, :n], alone_graph[0]) and torch.equal(degree[b, :n], alone_degree[0])
        else:
            assert_close(graph[b, :n, :n], alone_graph[0])
            assert_close(degree[b, :n], alone_degree[0])


# --- validation -----------------------------------------------------------------------------------------------------


def _bad_inputs():
    x, lengths = torch.randn(2, 4, 3), torch.tensor([4, 2])
    nan, inf = x.clone(), x.clone()
    nan[1, 0, 0] = float("nan")
    inf[0, 3, 2] = float("inf")
    return {
        "rank2": ((x[0], lengths), ValueError, "features must be 3-D"),
        "rank4": ((x[None], lengths), ValueError, "features must be 3-D"),
        "int_features": ((x.to(torch.int64), lengths), TypeError, "features must be float16"),
        "lengths_shape": ((x, torch.tensor([4])), ValueError, r"lengths must have shape \(2,\)"),
        "lengths_2d": ((x, lengths[None]), ValueError, "lengths must have shape"),
        "lengths_float": ((x, lengths.float()), TypeError, "lengths must be int32 or int64"),
        "lengths_too_long": ((x, torch.tensor([5, 2])), ValueError, r"lengths must lie in \[0, 4\]"),
        "lengths_negative": ((x, torch.tensor([4, -1])), ValueError, r"lengths must lie in \[0, 4\]"),
        "lengths_meta": ((x, lengths.to("meta")), ValueError, "lengths is on meta"),
        "features_meta": ((x.to("meta"), lengths), ValueError, "features is on meta"),
        "nan": ((nan, lengths), ValueError, "features contains NaN or Inf"),
        "inf": ((inf, lengths), ValueError, "features contains NaN or Inf"),
        "temperature_zero": ((x, lengths, 0.5, 0.0), ValueError, "temperature must be positive"),
        "temperature_negative": ((x, lengths, 0.5, -0.03), ValueError, "temperature must be positive"),
        "temperature_inf": ((x, lengths, 0.5, math.inf), ValueError, "temperature must be positive and finite"),
        "threshold_nan": ((x, lengths, math.nan, 0.03), ValueError, "threshold must be finite"),
        "threshold_inf": ((x, lengths, -math.inf, 0.03), ValueError, "threshold must be finite"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises(case, monkeypatch):
    """Invalid arguments raise a ValueError/TypeError naming the op and the argument, before any kernel runs."""
    monkeypatch.setenv("MRPRUNE_CHECK_FINITE", "1")
    args, error, match = _bad_inputs()[case]
    with pytest.raises(error, match=match) as info:
        mrprune.cosine_graph(*args)
    assert "mrprune.cosine_graph" in str(info.value)


# --- torch.library / torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    """torch.library.opcheck passes all its default tests (schema, autograd registration, fake, AOT dynamic)."""
    x, lengths = padded([torch.randn(5, 3), torch.randn(3, 3)])
    result = torch.library.opcheck(
        torch.ops.mrprune.cosine_graph.default, (x.to(dtype), lengths), {"threshold": 0.2, "temperature": 0.1}
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


def test_torch_compile_fullgraph():
    """The op compiles with fullgraph=True and gives the eager result."""
    torch._dynamo.reset()
    x, lengths = padded([clustered(9, 8), clustered(4, 8)])

    def fn(features, lens):
        return torch.ops.mrprune.cosine_graph(features, lens, 0.5, 0.03)

    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(x, lengths), fn(x, lengths)
    torch._dynamo.reset()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][0, :9].sum(-1).allclose(torch.ones(9))


# --- Triton kernels (under TRITON_INTERPRET=1 on the CPU, natively on a GPU) ----------------------------------------
# Small odd shapes with forced 16-wide tiles: several tile pairs of the symmetric Gram (both stores of an
# off-diagonal tile), several column tiles per row in the online softmax, and a feature tail in the dot loop.


def _triton_graph(x, lengths, threshold=0.5, temperature=0.03, **options):
    """The Triton launcher with canonical arguments (what the registered backend passes), on TRITON_DEVICE."""
    from mrprune.triton_kernels.cosine_graph import cosine_graph_triton

    return cosine_graph_triton(
        to_triton(x.contiguous()), to_triton(lengths.to(torch.int64)), threshold, temperature, **options
    )


def _triton_impl(**options):
    return lambda *args: _triton_graph(*args, **options)


@triton_test
@pytest.mark.parametrize("n", [1, 7, 33, 70])
@pytest.mark.parametrize("dim", [3, 16, 33])
def test_triton_small_shapes(n, dim):
    """Odd token counts and feature sizes match the float64 reference (graph elementwise, degree exactly)."""
    gen = torch.Generator().manual_seed(n * 100 + dim)
    x = clustered(n, dim, generator=gen)[None]
    threshold, temperature = ((0.5, 0.03), (0.2, 0.1))[n % 2]
    check_against_oracle(None, x, torch.tensor([n]), threshold, temperature, impl=_triton_impl(block=16, block_d=16))


@triton_test
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_triton_dtypes_padded_batch(dtype):
    """Every input dtype (loaded, then upcast), a padded batch with garbage padding and an empty item: the reference
    on the same rounded inputs; padded rows, columns and degrees are 0."""
    gen = torch.Generator().manual_seed(44)
    x, lengths = padded([clustered(n, 24, generator=gen) for n in (33, 0, 7, 20)])
    x = x.to(dtype)
    check_against_oracle(None, x, lengths, 0.5, 0.03, impl=_triton_impl(block=16, block_d=16))
    graph, degree = (t.cpu() for t in _triton_graph(x, lengths, block=16, block_d=16))
    assert not graph[1].any() and not degree[1].any()
    assert not graph[2, 7:].any() and not graph[2, :, 7:].any() and not degree[2, 7:].any()


@triton_test
def test_triton_persistent_programs_change_no_bit(monkeypatch):
    """Persistent programs (3, each looping over about 70 tile pairs) store the bits of one program per pair and item: a
    padded batch with ragged lengths, an empty item and a full last one (its last pair live), N = 150 (not a multiple of
    the 16-token tile), 10 tiles (a full band of 8 and a partial one). The Gram store writes every valid entry and
    nothing else (the rest of a pre-filled ``S`` keeps its sentinel), then the whole graph and degrees agree."""
    from mrprune.triton_kernels import _common
    from mrprune.triton_kernels.cosine_graph import gram_store

    monkeypatch.setattr(_common, "persistent_programs", lambda t: 3)  # on a GPU too: loops of many work items
    gen = torch.Generator().manual_seed(50)
    x, lengths = padded([clustered(n, 20, generator=gen) for n in (131, 0, 70, 150)])
    x, lengths = to_triton(x), to_triton(lengths)
    _, inv = _common.row_norms(x)
    stored = []
    for persistent in (True, False):
        S = torch.full((4, 150, 150), -7.0, device=x.device)
        gram_store(x, inv, lengths, S, 16, 16, persistent)
        stored.append(S.cpu())
    assert torch.equal(stored[0], stored[1])
    valid = torch.arange(150) < lengths.cpu()[:, None]
    valid = valid[:, :, None] & valid[:, None, :]
    assert (stored[0][valid] != -7.0).all() and (stored[0][~valid] == -7.0).all()
    graphs = [_triton_graph(x, lengths, 0.2, 0.1, block=16, block_d=16, persistent=p) for p in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*graphs, strict=True))


@triton_test
def test_triton_rows_without_edges():
    """All-below-threshold rows are uniform with degree n (threshold above 1; zero vectors at any threshold); a
    threshold <= 0 with a tiny temperature (edge logits far from the -5000 fill) matches the reference; the graph is
    row-stochastic and its edge pattern symmetric."""
    gen = torch.Generator().manual_seed(45)
    x = clustered(37, 9, generator=gen)[None]
    x[0, [3, 20]] = 0.0
    lengths = torch.tensor([37])
    graph, degree = (t.cpu() for t in _triton_graph(x, lengths, 1.5, 0.03, block=16, block_d=16))
    assert_close(graph, torch.full((1, 37, 37), 1 / 37))
    assert torch.equal(degree, torch.full((1, 37), 37.0))
    for threshold, temperature in ((0.5, 0.03), (-1.0, 1e-4), (0.0, 0.1)):
        check_against_oracle(None, x, lengths, threshold, temperature, 1.0, impl=_triton_impl(block=16, block_d=16))
        graph, degree = (t.cpu() for t in _triton_graph(x, lengths, threshold, temperature, block=16, block_d=16))
        assert_close(graph[0].sum(-1), torch.ones(37))
        assert degree[0, 3] == 37 and torch.allclose(graph[0, 3], torch.full((37,), 1 / 37))


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_opcheck(dtype):
    """torch.library.opcheck of the private op mrprune::_cosine_graph_triton."""
    x, lengths = padded([torch.randn(5, 3), torch.randn(3, 3)])
    result = torch.library.opcheck(
        torch.ops.mrprune._cosine_graph_triton.default,
        (to_triton(x.to(dtype)), to_triton(lengths)),
        {"threshold": 0.2, "temperature": 0.1},
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


@triton_test
def test_triton_public_op_and_errors(monkeypatch):
    """The "triton" backend serves the public op; the private op rejects float64 and, outside the interpreter, CPU
    tensors with a clear message."""
    from mrprune.triton_kernels import _common

    x, lengths = to_triton(clustered(9, 5)[None]), to_triton(torch.tensor([9]))
    with mrprune.backends.use_backend("triton"):
        graph, degree = mrprune.cosine_graph(x, lengths)
    want_graph, want_degree = oracle(OP, x.cpu(), lengths.cpu())
    assert_close(graph.cpu(), want_graph) and assert_close(degree.cpu(), want_degree)
    with pytest.raises(TypeError, match="float64 is served by the reference"):
        torch.ops.mrprune._cosine_graph_triton(x.double(), lengths)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="the Triton backend needs CUDA tensors"):
        torch.ops.mrprune._cosine_graph_triton(x.cpu(), lengths.cpu())


@triton_test
@pytest.mark.parametrize(
    ("batch", "row0", "col0", "strides"),
    [
        (1, 65520, 65520, (65536 * 65536, 65536, 1)),  # [B, N, N] at N = 65536: offsets near 2**33
        (0, 46336, 46336, (0, 46341, 1)),  # the first N whose N * N exceeds 2**31
        (0, 48, 65520, (0, 1, 65536)),  # the transposed store of a symmetric tile (column stride N)
        (5, 65520, 8176, (65536 * 8192, 8192, 1)),  # [B, N, D] at N = 65536, D = 8192, item 5
        (3, 0, 0, (2**31 - 1, 1, 1)),  # batch offsets past 2**32
    ],
)
def test_triton_int64_tile_offsets(batch, row0, col0, strides):
    """The kernels' offset helper (tile_offsets) computes exact int64 offsets where N * N or B * N * D exceed 2**31
    (run in a kernel on a 16 x 16 output: nothing of the logical size is allocated)."""
    from mrprune.triton_kernels._common import expected_tile_offsets, probe_tile_offsets

    got = probe_tile_offsets(batch, row0, col0, strides, device=TRITON_DEVICE).cpu()
    want = torch.tensor(expected_tile_offsets(batch, row0, col0, strides), dtype=torch.int64)
    assert want.max() >= 2**31  # every case leaves the int32 range
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_triton_llava_next_full_size_cuda(dtype, monkeypatch):
    """GPU only: the LLaVA-NeXT high-res view (2304 tokens, D = 4096) matches the float64 reference."""
    if TRITON_DEVICE != "cuda":
        pytest.skip("needs the Triton backend on a GPU")
    monkeypatch.setenv("MRPRUNE_TRITON_AUTOTUNE", "1")  # the autotuned launch path, at the real shape
    x = testing.llava_next_features(48, 48, 4096, seed=0)
    high = x[576:].reshape(48, 49, 4096)[:, :48].reshape(1, 2304, 4096).to(dtype)
    check_against_oracle(None, high, torch.tensor([2304]), 0.5, 0.03, impl=_triton_impl())
