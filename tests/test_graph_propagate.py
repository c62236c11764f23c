"""Tests of ``mrprune.graph_propagate``: the reference against brute force, every kernel backend against the float64
reference, invariants, edge cases, batching, argument validation, opcheck and torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch

import mrprune
from mrprune import reference, testing
from tests.brute_force import propagate as brute_propagate
from tests.utils import INPUT_DTYPES, assert_close, clustered, kernel_backends, oracle, padded, run

OP = "graph_propagate"
BACKENDS = kernel_backends(OP)
GARBAGE = 1e4


# --- brute force (explicit loops, float64 Python floats) ------------------------------------------------------------


def _stochastic(n: int, seed: int, zeros: float = 0.5) -> torch.Tensor:
    """A random row-stochastic float64 matrix with some exact zeros (a sparse thresholded graph)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(n, n, generator=gen, dtype=torch.float64)
    p = p * (torch.rand(n, n, generator=gen, dtype=torch.float64) > zeros)
    p.fill_diagonal_(1.0)
    return p / p.sum(-1, keepdim=True)


def _tiny_case(name: str):
    gen = torch.Generator().manual_seed(len(name))
    if name == "random":
        p = _stochastic(6, 1)
    elif name == "identity":
        p = torch.eye(5, dtype=torch.float64)
    elif name == "uniform":
        p = torch.full((4, 4), 0.25, dtype=torch.float64)
    elif name == "single":
        p = torch.ones(1, 1, dtype=torch.float64)
    else:  # a real thresholded cosine graph, with a zero vector (uniform row, degree n) and duplicates (ties)
        x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        x[2] = 0.0
        x[5] = x[1]
        p, degree = reference.cosine_graph(x[None], torch.tensor([7]), 0.3, 0.1)
        return p[0], degree[0], x.norm(dim=-1)
    n = p.shape[0]
    degree = torch.randint(1, n + 1, (n,), generator=gen).double()
    weights = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    return p, degree, weights


TINY_CASES = ["random", "identity", "uniform", "single", "cosine"]


@pytest.mark.parametrize("case", TINY_CASES)
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
def test_reference_matches_brute_force(case, iterations):
    """reference.graph_propagate equals the loop implementation (with padding garbage around the item)."""
    p, degree, weights = _tiny_case(case)
    n = p.shape[0]
    want = brute_propagate(p.tolist(), degree.tolist(), weights.tolist(), iterations)
    graph = torch.full((2, n + 2, n + 2), GARBAGE, dtype=torch.float64)
    graph[1, :n, :n] = p
    deg = torch.full((2, n + 2), GARBAGE, dtype=torch.float64)
    deg[1, :n] = degree
    w = torch.full((2, n + 2), GARBAGE, dtype=torch.float64)
    w[1, :n] = weights
    scores = reference.graph_propagate(graph, deg, w, torch.tensor([0, n]), iterations)
    expected = torch.zeros(2, n + 2, dtype=torch.float64)
    expected[1, :n] = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-14)


# --- kernels against the float64 reference ------------------------------------------------------------------------


def graph_batch(items: list[torch.Tensor], threshold: float = 0.5, temperature: float = 0.03, dtype=torch.float32):
    """Reference cosine graphs of the items as a padded batch: (graph, degree, weights = norms, lengths), with large
    garbage in every padded entry, cast to ``dtype``."""
    x, lengths = padded(items)
    graph, degree = reference.cosine_graph(x.double(), lengths, threshold, temperature)
    weights = x.double().norm(dim=-1)
    tokens = x.shape[1]
    for b, n in enumerate(lengths.tolist()):
        graph[b, n:] = GARBAGE
        graph[b, :, n:] = GARBAGE
        degree[b, n:] = GARBAGE
        weights[b, n:] = GARBAGE
    assert graph.shape == (len(items), tokens, tokens)
    return graph.to(dtype), degree.to(dtype), weights.to(dtype), lengths


def check_against_oracle(backend, graph, degree, weights, lengths, iterations):
    scores = run(OP, backend, graph, degree, weights, lengths, iterations)
    want = oracle(OP, graph, degree, weights, lengths, iterations)
    assert scores.dtype == torch.float32 and scores.shape == want.shape
    assert_close(scores, want)
    return scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 33, 257])
@pytest.mark.parametrize("dim", [3, 64, 130])
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_kernel_matches_reference_clustered(backend, n, dim, threshold, temperature):
    """Graphs of clustered features of odd sizes, propagated 1..5 times, match the float64 reference."""
    gen = torch.Generator().manual_seed(n * 1000 + dim)
    graph, degree, weights, lengths = graph_batch([clustered(n, dim, generator=gen)], threshold, temperature)
    for iterations in range(1, 6):
        check_against_oracle(backend, graph, degree, weights, lengths, iterations)


@functools.cache
def _llava_small() -> torch.Tensor:
    return testing.llava_next_features(12, 12, 256, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("threshold", [0.5, 0.2])
@pytest.mark.parametrize("temperature", [0.03, 0.1])
def test_kernel_matches_reference_llava(backend, dtype, threshold, temperature):
    """The graph of synthetic LLaVA-NeXT tokens (12 x 12 grid, D = 256), given in every input dtype, propagated 1..5
    times, matches the float64 reference on the same rounded inputs; the scores are O(1)."""
    graph, degree, weights, lengths = graph_batch([_llava_small()], threshold, temperature, dtype)
    for iterations in range(1, 6):
        scores = check_against_oracle(backend, graph, degree, weights, lengths, iterations)
        assert scores.max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_kernel_matches_reference_padded_batch(backend, dtype, iterations):
    """A padded batch (garbage in every padded entry, one empty item) matches the reference; padding scores are 0."""
    gen = torch.Generator().manual_seed(7)
    items = [clustered(n, 20, generator=gen) for n in (30, 0, 9, 17)]
    graph, degree, weights, lengths = graph_batch(items, dtype=dtype)
    scores = check_against_oracle(backend, graph, degree, weights, lengths, iterations)
    assert not scores[1].any() and not scores[2, 9:].any() and not scores[3, 17:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_non_contiguous_and_int32_lengths(backend):
    """Non-contiguous graph/degree/weights views and int32 lengths give the same scores as contiguous inputs."""
    gen = torch.Generator().manual_seed(8)
    graph, degree, weights, lengths = graph_batch([clustered(25, 16, generator=gen), clustered(12, 16, generator=gen)])
    want = run(OP, backend, graph, degree, weights, lengths, 2)
    graph_t = graph.transpose(1, 2).contiguous().transpose(1, 2)
    degree_t, weights_t = degree.T.contiguous().T, weights.T.contiguous().T
    assert not graph_t.is_contiguous() and not degree_t.is_contiguous()
    got = run(OP, backend, graph_t, degree_t, weights_t, lengths.to(torch.int32), 2)
    assert torch.equal(got, want)


# --- invariants ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_mass_is_conserved(impl, iterations):
    """A row-stochastic P conserves mass: sum_j scores_j * degree_j = sum_i w_i on every item."""
    gen = torch.Generator().manual_seed(21)
    graph, degree, weights, lengths = graph_batch([clustered(n, 24, generator=gen) for n in (40, 5, 64)], 0.2, 0.1)
    scores = run(OP, impl, graph, degree, weights, lengths, iterations)
    for b, n in enumerate(lengths.tolist()):
        assert_close((scores[b, :n].double() * degree[b, :n].double()).sum(), weights[b, :n].double().sum())


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_identity_and_uniform_graphs(impl):
    """The identity graph gives w / degree for any t; the uniform graph gives mean(w) / degree."""
    n = 11
    weights = torch.rand(1, n) + 0.5
    degree = torch.randint(1, n + 1, (1, n)).float()
    lengths = torch.tensor([n])
    for iterations in (1, 4):
        eye = torch.eye(n)[None]
        assert_close(run(OP, impl, eye, degree, weights, lengths, iterations), weights / degree)
        uniform = torch.full((1, n, n), 1 / n)
        assert_close(run(OP, impl, uniform, degree, weights, lengths, iterations), weights.mean() / degree)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_linearity_degree_and_composition(impl):
    """Scores are linear in the weights, inversely proportional to the degree, and t = 2 equals two t = 1 steps."""
    gen = torch.Generator().manual_seed(22)
    graph, degree, weights, lengths = graph_batch([clustered(45, 10, generator=gen), clustered(20, 10, generator=gen)])
    other = torch.rand(weights.shape, generator=gen)
    scores = run(OP, impl, graph, degree, weights, lengths, 1)
    combined = run(OP, impl, graph, degree, 2.5 * weights + other, lengths, 1)
    assert_close(combined, 2.5 * scores + run(OP, impl, graph, degree, other, lengths, 1))
    assert_close(run(OP, impl, graph, 2 * degree, weights, lengths, 1), scores / 2)
    ones = torch.ones_like(degree)
    step = run(OP, impl, graph, ones, weights, lengths, 1)
    assert_close(run(OP, impl, graph, ones, step, lengths, 1), run(OP, impl, graph, ones, weights, lengths, 2))


# --- edge cases ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_single_token(impl):
    """N = 1: the score is w * P_00^t / degree."""
    graph, degree, weights = torch.tensor([[[0.5]]]), torch.tensor([[2.0]]), torch.tensor([[3.0]])
    for iterations in (1, 3):
        scores = run(OP, impl, graph, degree, weights, torch.tensor([1]), iterations)
        assert_close(scores, torch.tensor([[3.0 * 0.5**iterations / 2.0]]))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_identical_tokens(impl):
    """All tokens identical (uniform P, degree n): every score is mean(w) / n."""
    n = 30
    x = torch.randn(1, 1, 16).expand(1, n, 16).contiguous()
    graph, degree = mrprune.cosine_graph(x, torch.tensor([n]))
    weights = torch.rand(1, n)
    scores = run(OP, impl, graph, degree, weights, torch.tensor([n]), 3)
    assert_close(scores, torch.full((1, n), weights.mean().item() / n))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_zero_vector_tokens(impl):
    """A zero vector's uniform row spreads its mass evenly; with zero weight it only receives mass."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.9, 0.1], [0.0, 1.0]]])
    graph, degree = mrprune.cosine_graph(x, torch.tensor([4]))
    weights = torch.tensor([[0.0, 8.0, 0.0, 0.0]])
    scores = run(OP, impl, graph, degree, weights, torch.tensor([4]), 1)
    assert_close(scores * degree, torch.full((1, 4), 2.0))
    assert degree[0, 1] == 4


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_zero_lengths_and_zero_weights(impl):
    """Items of length 0 give all-zero scores; zero weights give zero scores."""
    graph, degree = torch.rand(2, 6, 6) * 50, torch.rand(2, 6) + 1
    scores = run(OP, impl, graph, degree, torch.rand(2, 6) * 50, torch.tensor([0, 0]), 2)
    assert scores.shape == (2, 6) and not scores.any()
    scores = run(OP, impl, graph, degree, torch.zeros(2, 6), torch.tensor([6, 3]), 2)
    assert not scores.any()


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_duplicate_tokens(impl):
    """Duplicated tokens (the LLaVA-NeXT newline tokens) with equal weights get equal scores."""
    x = testing.llava_next_features(4, 5, 32, seed=2)
    newlines = [576 + r * 6 + 5 for r in range(4)]
    graph, degree, weights, lengths = graph_batch([x])
    scores = run(OP, impl, graph, degree, weights, lengths, 2)
    for k in newlines[1:]:
        assert_close(scores[0, k], scores[0, newlines[0]])


# --- batching -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("iterations", [1, 4])
def test_batch_equals_per_item(impl, iterations):
    """Each item of a 3-item batch of different lengths scores as the item alone (bitwise for cpp)."""
    gen = torch.Generator().manual_seed(23)
    items = [clustered(n, 12, generator=gen) for n in (50, 2, 260)]
    graph, degree, weights, lengths = graph_batch(items, 0.2, 0.1)
    scores = run(OP, impl, graph, degree, weights, lengths, iterations)
    for b, n in enumerate(lengths.tolist()):
        g, d, w = graph[b : b + 1, :n, :n], degree[b : b + 1, :n], weights[b : b + 1, :n]
        alone = run(OP, impl, g.contiguous(), d.contiguous(), w.contiguous(), torch.tensor([n]), iterations)
        if impl in ("cpp", "reference"):
            assert torch.equal(scores[b, :n], alone[0])
        else:
            assert_close(scores[b, :n], alone[0])


# --- validation -----------------------------------------------------------------------------------------------------


def _bad_inputs():
    graph, degree, weights, lengths = torch.rand(2, 4, 4), torch.ones(2, 4), torch.rand(2, 4), torch.tensor([4, 2])
    nan, inf = graph.clone(), weights.clone()
    nan[0, 1, 2] = float("nan")
    inf[1, 0] = float("inf")
    zero_degree, padded_zero = degree.clone(), degree.clone()
    zero_degree[1, 1] = 0.0
    padded_zero[1, 3] = 0.0  # on padding: allowed (see test_bad_input_raises)
    return {
        "graph_rank2": ((graph[0], degree, weights, lengths), ValueError, "graph must be 3-D"),
        "graph_not_square": ((graph[:, :, :3], degree, weights, lengths), ValueError, "graph must be square"),
        "graph_int": ((graph.to(torch.int32), degree, weights, lengths), TypeError, "graph must be float16"),
        "degree_shape": ((graph, degree[:, :3], weights, lengths), ValueError, r"degree must have shape \(2, 4\)"),
        "degree_rank": ((graph, degree[0], weights, lengths), ValueError, "degree must be 2-D"),
        "weights_shape": ((graph, degree, weights[:1], lengths), ValueError, r"weights must have shape \(2, 4\)"),
        "weights_int": ((graph, degree, weights.to(torch.int64), lengths), TypeError, "weights must be float16"),
        "lengths_shape": ((graph, degree, weights, lengths[:1]), ValueError, r"lengths must have shape \(2,\)"),
        "lengths_float": ((graph, degree, weights, lengths.double()), TypeError, "lengths must be int32 or int64"),
        "lengths_range": ((graph, degree, weights, torch.tensor([4, 5])), ValueError, r"lengths must lie in \[0, 4\]"),
        "lengths_meta": ((graph, degree, weights, lengths.to("meta")), ValueError, "lengths is on meta"),
        "graph_meta": ((graph.to("meta"), degree, weights, lengths), ValueError, "graph is on meta"),
        "weights_meta": ((graph, degree, weights.to("meta"), lengths), ValueError, "weights is on meta"),
        "graph_nan": ((nan, degree, weights, lengths), ValueError, "graph contains NaN or Inf"),
        "weights_inf": ((graph, degree, inf, lengths), ValueError, "weights contains NaN or Inf"),
        "degree_zero": ((graph, zero_degree, weights, lengths), ValueError, "degree must be positive"),
        "iterations_zero": ((graph, degree, weights, lengths, 0), ValueError, "iterations must be >= 1"),
        "iterations_negative": ((graph, degree, weights, lengths, -2), ValueError, "iterations must be >= 1"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises(case, monkeypatch):
    """Invalid arguments raise a ValueError/TypeError naming the op and the argument, before any kernel runs."""
    monkeypatch.setenv("MRPRUNE_CHECK_FINITE", "1")
    args, error, match = _bad_inputs()[case]
    with pytest.raises(error, match=match) as info:
        mrprune.graph_propagate(*args)
    assert "mrprune.graph_propagate" in str(info.value)


def test_zero_degree_on_padding_is_accepted():
    """The positive-degree check only covers valid tokens: a 0 in the padding is fine (and ignored)."""
    graph, degree, weights = torch.rand(2, 4, 4), torch.ones(2, 4), torch.rand(2, 4)
    degree[1, 3] = 0.0
    scores = mrprune.graph_propagate(graph, degree, weights, torch.tensor([4, 2]))
    assert torch.isfinite(scores).all() and scores[1, 3] == 0 and (scores[0] > 0).all()


# --- torch.library / torch.compile ------------------------------------------------------------------------------------


def test_opcheck():
    """torch.library.opcheck passes all its default tests (schema, autograd registration, fake, AOT dynamic)."""
    graph, degree, weights, lengths = graph_batch([clustered(5, 3), clustered(3, 3)], 0.2, 0.1)
    result = torch.library.opcheck(
        torch.ops.mrprune.graph_propagate.default, (graph, degree, weights, lengths), {"iterations": 2}
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


def test_torch_compile_fullgraph():
    """The op compiles with fullgraph=True and gives the eager result."""
    torch._dynamo.reset()
    graph, degree, weights, lengths = graph_batch([clustered(9, 8), clustered(4, 8)], 0.2, 0.1)

    def fn(g, d, w, lens):
        return torch.ops.mrprune.graph_propagate(g, d, w, lens, 3)

    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(graph, degree, weights, lengths), fn(graph, degree, weights, lengths)
    torch._dynamo.reset()
    assert torch.equal(got, want) and (got[0, :9] > 0).all()
