"""Tests of ``mrprune.graph_scores`` (features straight to propagated graph scores): the reference against brute force,
every kernel backend against the float64 reference (up to the real LLaVA-NeXT shape), invariants, edge cases,
batching, argument validation, opcheck and torch.compile; then the Triton kernels (under TRITON_INTERPRET=1 on the
CPU, natively on a GPU) at small shapes in both variants, and a compile check for sm_90."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

import mrprune
from mrprune import reference, testing
from tests.brute_force import TINY_GRAPH_CASES as TINY_CASES
from tests.brute_force import graph_scores as brute_graph_scores
from tests.utils import (
    ATOL,
    CPU_SCREEN,
    INPUT_DTYPES,
    RTOL,
    TRITON_DEVICE,
    assert_close,
    clustered,
    kernel_backends,
    near_threshold,
    oracle,
    padded,
    quantization_worst_case,
    run,
    to_triton,
    triton_test,
)

OP = "graph_scores"
BACKENDS = kernel_backends(OP)
# Large shapes and large parametrizations leave out Triton under the CPU interpreter (see the Triton section below).
BACKENDS_LARGE = kernel_backends(OP, interpreted=False)
# Float32 kernels decide an edge whose float64 cosine lies within DELTA of the threshold either way (their rounding
# error is ~1e-6 at D = 4096): tokens whose score depends on such an edge are left out of the comparisons.
DELTA = 1e-5


# --- brute force (explicit loops, float64 Python floats) ------------------------------------------------------------


@pytest.mark.parametrize("case", list(TINY_CASES))
@pytest.mark.parametrize("iterations", [1, 2, 5])
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_reference_matches_brute_force(case, iterations, explicit_weights):
    """reference.graph_scores equals the loop implementation, with norm or explicit weights and padding garbage."""
    rows, threshold, temperature = TINY_CASES[case]
    n, dim = len(rows), len(rows[0])
    w = [0.5 + k for k in range(n)] if explicit_weights else None
    want = brute_graph_scores(rows, w, threshold, temperature, iterations)
    x = torch.full((2, n + 1, dim), 9.0, dtype=torch.float64)
    x[0, :n] = torch.tensor(rows, dtype=torch.float64)
    weights = None
    if explicit_weights:
        weights = torch.full((2, n + 1), 9.0, dtype=torch.float64)
        weights[0, :n] = torch.tensor(w, dtype=torch.float64)
    scores = reference.graph_scores(x, torch.tensor([n, 0]), weights, threshold, temperature, iterations)
    expected = torch.zeros(2, n + 1, dtype=torch.float64)
    expected[0, :n] = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-14)


def test_brute_force_tie_case():
    """The tie case: duplicated tokens score equally; the threshold-equal cosine counts (degree 5 of token 0)."""
    rows, threshold, temperature = TINY_CASES["tie_at_threshold"]
    ones = [1.0] * len(rows)
    scores = brute_graph_scores(rows, ones, threshold, temperature, 1)
    assert scores[1] == pytest.approx(scores[2], rel=1e-12) and scores[0] == pytest.approx(scores[5], rel=1e-12)
    no_tie = brute_graph_scores(rows, ones, threshold + 1e-9, temperature, 1)  # 0.6 is no longer an edge
    assert scores[0] != pytest.approx(no_tie[0], rel=1e-3)


# --- kernels against the float64 reference ------------------------------------------------------------------------


def check_against_oracle(
    backend, x, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1, max_left_out=0.1, impl=None
):
    """Kernel scores equal the float64 reference on every token whose reference score does not depend on the edges
    within DELTA of the threshold (the reference at threshold -/+ DELTA agrees there); at most 10 % are left out.
    ``impl`` (a function of the op's arguments) replaces the public op with ``backend`` forced."""
    if impl is None:
        scores = run(OP, backend, x, lengths, weights, threshold, temperature, iterations)
    else:
        scores = impl(x, lengths, weights, threshold, temperature, iterations).cpu()
    want = oracle(OP, x, lengths, weights, threshold, temperature, iterations)
    low = oracle(OP, x, lengths, weights, threshold - DELTA, temperature, iterations)
    high = oracle(OP, x, lengths, weights, threshold + DELTA, temperature, iterations)
    keep = torch.isclose(low, high, rtol=RTOL / 4, atol=ATOL / 4)
    assert (~keep).sum() <= max_left_out * max(int(lengths.sum()), 1), "inputs too close to the threshold"
    assert scores.dtype == torch.float32 and scores.shape == want.shape
    assert_close(scores[keep], want[keep])
    return scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_kernel_matches_reference_tiny(backend, case):
    """The brute-force cases (zero vectors, no edges, thresholds <= 0) through the kernels match the reference (tokens
    that depend on a cosine exactly equal to the threshold are left out: float32 may round it either way)."""
    rows, threshold, temperature = TINY_CASES[case]
    x, lengths = torch.tensor(rows)[None], torch.tensor([len(rows)])
    for iterations in (1, 3):
        check_against_oracle(backend, x, lengths, None, threshold, temperature, iterations, max_left_out=1.0)


# Odd token counts x feature sizes, with t cycling through 1..5 over the cases.
CLUSTERED_CASES = [(n, dim, i % 5 + 1) for i, (n, dim) in enumerate(itertools.product((1, 7, 33, 257), (3, 64, 130)))]


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
@pytest.mark.parametrize(("n", "dim", "iterations"), CLUSTERED_CASES)
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_kernel_matches_reference_clustered(backend, n, dim, iterations, threshold, temperature):
    """Clustered features of odd sizes match the float64 reference."""
    gen = torch.Generator().manual_seed(n * 1000 + dim)
    x = clustered(n, dim, generator=gen)[None]
    check_against_oracle(backend, x, torch.tensor([n]), None, threshold, temperature, iterations)


@functools.cache
def _llava_small() -> torch.Tensor:
    return testing.llava_next_features(12, 12, 256, seed=5)


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize(
    ("threshold", "temperature", "iterations"), [(0.5, 0.03, 1), (0.5, 0.1, 5), (0.2, 0.03, 5), (0.2, 0.1, 1)]
)
def test_kernel_matches_reference_llava(backend, dtype, threshold, temperature, iterations):
    """Synthetic LLaVA-NeXT tokens (12 x 12 grid, D = 256) in every input dtype match the float64 reference on the same
    rounded inputs (MR-Pruner's t = 1 and G-Prune's t = 5)."""
    x = _llava_small().to(dtype)[None]
    lengths = torch.tensor([x.shape[1]])
    scores = check_against_oracle(backend, x, lengths, None, threshold, temperature, iterations, max_left_out=0.25)
    assert scores.max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_kernel_matches_reference_padded_batch(backend, dtype, explicit_weights):
    """A padded batch (garbage in the padding of features and weights, one empty item) matches the reference and
    scores the padding 0."""
    gen = torch.Generator().manual_seed(6)
    x, lengths = padded([clustered(n, 40, generator=gen) for n in (29, 0, 64, 5)])
    x = x.to(dtype)
    weights = None
    if explicit_weights:
        weights = torch.rand(x.shape[:2], generator=gen).to(dtype)
        weights[0, 29:], weights[2, 64:], weights[3, 5:] = 1e4, 1e4, 1e4
    scores = check_against_oracle(backend, x, lengths, weights, 0.5, 0.03, 2)
    assert not scores[1].any() and not scores[0, 29:].any() and not scores[3, 5:].any()


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
def test_kernel_matches_reference_llava_next_full_size(backend):
    """The real LLaVA-NeXT high-res view (48 x 48 = 2304 tokens, D = 4096, MR-Pruner's t = 1, threshold 0.5, T = 0.03)
    matches the float64 reference. At this size some cosines always lie within DELTA of the threshold; at T = 0.03 such
    an edge carries probability <= exp(-0.5 / 0.03) ~ 6e-8, so only the scores of its two endpoints (degree +-1) may
    differ, and those are left out."""
    x = testing.llava_next_features(48, 48, 4096, seed=0)
    high = x[576:].reshape(48, 49, 4096)[:, :48].reshape(1, 2304, 4096)  # drop the base view and the newlines
    lengths = torch.tensor([2304])
    scores = run(OP, backend, high, lengths)
    want = oracle(OP, high, lengths)
    u = reference.normalize_rows(high[0].double())
    ambiguous = ((u @ u.T - 0.5).abs() < DELTA).any(dim=1)
    assert ambiguous.sum() <= 0.1 * 2304
    assert_close(scores[0, ~ambiguous], want[0, ~ambiguous])
    assert want.min() > 0 and want.max() > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_non_contiguous_and_int32_lengths(backend):
    """Non-contiguous features/weights and int32 lengths give the same scores as contiguous / int64 inputs."""
    gen = torch.Generator().manual_seed(7)
    x = clustered(60, 24, generator=gen).reshape(2, 30, 24)
    weights = torch.rand(2, 30, generator=gen)
    lengths = torch.tensor([30, 11])
    x_t, w_t = x.transpose(1, 2).contiguous().transpose(1, 2), weights.T.contiguous().T
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    for w, w_view in ((None, None), (weights, w_t)):
        want = run(OP, backend, x, lengths, w, 0.5, 0.03, 2)
        assert torch.equal(run(OP, backend, x_t, lengths.to(torch.int32), w_view, 0.5, 0.03, 2), want)


# --- invariants ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_equals_cosine_graph_then_propagate(impl, iterations, threshold, temperature):
    """graph_scores == graph_propagate(*cosine_graph(...), norms), with and without explicit weights (graph_propagate
    by the same backend where it has one, else by the reference: Triton has no graph_propagate)."""
    gen = torch.Generator().manual_seed(31)
    x, lengths = padded([clustered(n, 20, generator=gen) for n in (45, 13, 0)])
    graph, degree = run("cosine_graph", impl, x, lengths, threshold, temperature)
    propagate = impl if impl in mrprune.backends.available("graph_propagate", x.device) else "reference"
    norms = x.norm(dim=-1)
    fused = run(OP, impl, x, lengths, None, threshold, temperature, iterations)
    assert_close(fused, run("graph_propagate", propagate, graph, degree, norms, lengths, iterations))
    weights = torch.rand(x.shape[:2], generator=gen)
    fused = run(OP, impl, x, lengths, weights, threshold, temperature, iterations)
    assert_close(fused, run("graph_propagate", propagate, graph, degree, weights, lengths, iterations))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_explicit_weights(impl):
    """Explicit norm weights equal the default; other weights change the scores as the reference says; scores are
    linear in the weights."""
    gen = torch.Generator().manual_seed(32)
    x, lengths = padded([clustered(n, 16, generator=gen) for n in (40, 22)])
    default = run(OP, impl, x, lengths)
    assert_close(run(OP, impl, x, lengths, x.norm(dim=-1)), default)
    weights = torch.rand(x.shape[:2], generator=gen) * 4
    scores = run(OP, impl, x, lengths, weights)
    assert_close(scores, oracle(OP, x, lengths, weights))
    assert not torch.allclose(scores, default)
    assert_close(run(OP, impl, x, lengths, 3 * weights + x.norm(dim=-1)), 3 * scores + default)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("iterations", [1, 4])
def test_mass_conservation_and_scale(impl, iterations):
    """sum_j score_j * degree_j = sum_i ||x_i|| (P is row-stochastic), and scaling the features by 4 scales the
    scores by 4 (the graph only sees directions)."""
    gen = torch.Generator().manual_seed(33)
    x, lengths = padded([clustered(n, 32, generator=gen) for n in (70, 9)])
    scores = run(OP, impl, x, lengths, None, 0.2, 0.1, iterations)
    _, degree = run("cosine_graph", impl, x, lengths, 0.2, 0.1)
    for b, n in enumerate(lengths.tolist()):
        assert_close((scores[b, :n].double() * degree[b, :n]).sum(), x[b, :n].double().norm(dim=-1).sum())
    assert_close(run(OP, impl, 4 * x, lengths, None, 0.2, 0.1, iterations), 4 * scores)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_permutation_equivariance(impl):
    """Permuting the tokens of an item permutes its scores."""
    gen = torch.Generator().manual_seed(34)
    x = clustered(50, 12, generator=gen)[None]
    perm = torch.randperm(50, generator=gen)
    scores = run(OP, impl, x, torch.tensor([50]), None, 0.5, 0.03, 2)
    assert_close(run(OP, impl, x[:, perm], torch.tensor([50]), None, 0.5, 0.03, 2), scores[:, perm])


# --- edge cases ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_single_token(impl):
    """N = 1: P = [[1]], degree 1, so the score is the token's norm (or its weight) for any t."""
    x = torch.tensor([[[0.3, -1.2, 2.0, 0.4]]])
    for iterations in (1, 5):
        scores = run(OP, impl, x, torch.tensor([1]), None, 0.5, 0.03, iterations)
        assert_close(scores, x.norm(dim=-1))
        seven = torch.tensor([[7.0]])
        assert_close(run(OP, impl, x, torch.tensor([1]), seven, 0.5, 0.03, iterations), seven)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_identical_tokens(impl):
    """All tokens identical: uniform P, degree n, so every score is ||x|| / n."""
    n = 41
    x = torch.randn(1, 1, 33).expand(1, n, 33).contiguous()
    scores = run(OP, impl, x, torch.tensor([n]), None, 0.5, 0.03, 3)
    assert_close(scores, (x.norm(dim=-1) / n))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("threshold", [0.5, -0.5])
def test_zero_vectors(impl, threshold):
    """A zero vector has weight 0, a uniform row and is nobody's edge: its score is 0; given weight c instead, it
    spreads c / n to every token (score c / (n * degree) on top of the score without it)."""
    gen = torch.Generator().manual_seed(35)
    x = clustered(12, 6, generator=gen)[None]
    x[0, 4] = 0.0
    lengths = torch.tensor([12])
    scores = run(OP, impl, x, lengths, None, threshold, 0.1)
    assert scores[0, 4] == 0 and (scores[0, :4] > 0).all()
    _, degree = run("cosine_graph", impl, x, lengths, threshold, 0.1)
    assert degree[0, 4] == 12
    weights = x.norm(dim=-1)
    weights[0, 4] = 6.0
    assert_close(run(OP, impl, x, lengths, weights, threshold, 0.1), scores + 6.0 / (12 * degree))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_zero_lengths(impl):
    """Items of length 0 give all-zero scores."""
    scores = run(OP, impl, torch.randn(3, 4, 5) * 100, torch.tensor([0, 0, 0]), None, 0.5, 0.03, 2)
    assert scores.shape == (3, 4) and not scores.any()


@pytest.mark.parametrize("impl", ["reference", *BACKENDS_LARGE])
def test_duplicate_tokens(impl):
    """Duplicated tokens (the LLaVA-NeXT newline tokens) score equally."""
    x = testing.llava_next_features(5, 4, 48, seed=3)[None]
    newlines = [576 + r * 5 + 4 for r in range(5)]
    for iterations in (1, 5):
        scores = run(OP, impl, x, torch.tensor([x.shape[1]]), None, 0.5, 0.03, iterations)
        assert_close(scores[0, newlines], scores[0, newlines[:1]].expand(5))


# --- batching -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS_LARGE])
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_batch_equals_per_item(impl, explicit_weights):
    """Each item of a 3-item batch of different lengths scores as the item alone (bitwise for cpp)."""
    gen = torch.Generator().manual_seed(36)
    items = [clustered(n, 20, generator=gen) for n in (61, 4, 290)]
    x, lengths = padded(items)
    weights = torch.rand(x.shape[:2], generator=gen) if explicit_weights else None
    scores = run(OP, impl, x, lengths, weights, 0.2, 0.1, 3)
    for b, item in enumerate(items):
        n = item.shape[0]
        w = None if weights is None else weights[b : b + 1, :n].contiguous()
        alone = run(OP, impl, item[None], torch.tensor([n]), w, 0.2, 0.1, 3)
        if impl in ("cpp", "reference"):
            assert torch.equal(scores[b, :n], alone[0])
        else:
            assert_close(scores[b, :n], alone[0])


# --- the C++ kernel's screen (bfloat16 AMX products for float32 on AMX CPUs, else int8 VNNI products) ---------------


def _screen_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(features, lengths, threshold): pairs right at the threshold, real structure, duplicates and zero rows, and
    rows the screen must refuse (norms below 2^-30, where bfloat16 and AMX flush products to zero)."""
    gen = torch.Generator().manual_seed(43)
    band = [near_threshold(n, 512, 0.5, generator=gen) for n in (300, 77)]
    x, lengths = padded(band)
    llava = testing.llava_next_features(6, 7, 4096, seed=4)[None]
    dup = clustered(260, 40, generator=gen)
    dup[100], dup[7] = dup[3], 0.0
    tiny = clustered(90, 64, spread=0.2, generator=gen) * 1e-21
    spiky = clustered(200, 40, generator=gen)
    spiky[:, :3] *= 30.0  # outlier channels: int8 scales set by them, a loose screen margin
    worst, cut = quantization_worst_case(40, 512, generator=gen)
    return {
        "band": (x, lengths, 0.5),
        "band_low": (*padded([near_threshold(200, 300, -0.3, generator=gen)]), -0.3),
        "llava_next": (llava, torch.tensor([llava.shape[1]]), 0.5),
        "duplicates_zero": (dup[None], torch.tensor([260]), 0.2),
        "tiny_norms": (tiny[None], torch.tensor([90]), 0.5),
        "outlier_channels": (spiky[None], torch.tensor([200]), 0.5),
        "quantization_worst_case": (worst[None], torch.tensor([80]), cut),
    }


@pytest.mark.skipif(not CPU_SCREEN, reason="the screen runs on CPUs with AMX and AVX-512 BF16, or AVX-512 VNNI")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(_screen_cases()))
@pytest.mark.parametrize("iterations", [1, 5])
def test_cpu_screen_changes_no_bit(case, iterations, dtype, monkeypatch):
    """The screen skips only pairs whose float32 cosine lies below the threshold: the C++ scores are bit-identical with
    it forced on for any D (MRPRUNE_CPU_SCREEN=1) and off (=0), for pairs within 0.002 of the threshold too, and for
    pairs on which the int8 screen's error bound is tight, in every input precision."""
    x, lengths, threshold = _screen_cases()[case]
    x = x.to(dtype)
    scores = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("MRPRUNE_CPU_SCREEN", setting)
        scores[setting] = run(OP, "cpp", x, lengths, None, threshold, 0.03, iterations)
    assert torch.equal(scores["1"], scores["0"])
    if case.startswith("band"):  # the case exercises the screen's margin: it has edges and pairs just below
        _, degree = run("cosine_graph", "cpp", x[:1], lengths[:1].clamp(max=x.shape[1]), threshold, 0.03)
        assert 1 < degree[0, 0] < lengths[0]


# --- validation -----------------------------------------------------------------------------------------------------


def _bad_inputs():
    x, lengths, weights = torch.randn(2, 4, 3), torch.tensor([4, 1]), torch.rand(2, 4)
    nan, inf, nan_w = x.clone(), x.clone(), weights.clone()
    nan[0, 0, 1] = float("nan")
    inf[1, 2, 0] = -float("inf")
    nan_w[1, 3] = float("nan")
    return {
        "rank2": ((x[0], lengths), {}, ValueError, "features must be 3-D"),
        "int_features": ((x.to(torch.int32), lengths), {}, TypeError, "features must be float16"),
        "lengths_shape": ((x, lengths[:1]), {}, ValueError, r"lengths must have shape \(2,\)"),
        "lengths_dtype": ((x, lengths.float()), {}, TypeError, "lengths must be int32 or int64"),
        "lengths_range": ((x, torch.tensor([0, 5])), {}, ValueError, r"lengths must lie in \[0, 4\]"),
        "lengths_meta": ((x, lengths.to("meta")), {}, ValueError, "lengths is on meta"),
        "weights_meta": ((x, lengths, weights.to("meta")), {}, ValueError, "weights is on meta"),
        "features_meta": ((x.to("meta"), lengths), {}, ValueError, "features is on meta"),
        "weights_shape": ((x, lengths, weights[:, :3]), {}, ValueError, r"weights must have shape \(2, 4\)"),
        "weights_rank": ((x, lengths, weights[None]), {}, ValueError, "weights must be 2-D"),
        "weights_int": ((x, lengths, weights.to(torch.int64)), {}, TypeError, "weights must be float16"),
        "weights_nan": ((x, lengths, nan_w), {}, ValueError, "weights contains NaN or Inf"),
        "nan": ((nan, lengths), {}, ValueError, "features contains NaN or Inf"),
        "inf": ((inf, lengths), {}, ValueError, "features contains NaN or Inf"),
        "temperature_zero": ((x, lengths), {"temperature": 0.0}, ValueError, "temperature must be positive"),
        "temperature_nan": ((x, lengths), {"temperature": math.nan}, ValueError, "temperature must be positive"),
        "threshold_inf": ((x, lengths), {"threshold": math.inf}, ValueError, "threshold must be finite"),
        "iterations_zero": ((x, lengths), {"iterations": 0}, ValueError, "iterations must be >= 1"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises(case, monkeypatch):
    """Invalid arguments raise a ValueError/TypeError naming the op and the argument, before any kernel runs."""
    monkeypatch.setenv("MRPRUNE_CHECK_FINITE", "1")
    args, kwargs, error, match = _bad_inputs()[case]
    with pytest.raises(error, match=match) as info:
        mrprune.graph_scores(*args, **kwargs)
    assert "mrprune.graph_scores" in str(info.value)


# --- torch.library / torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_weights", [False, True])
def test_opcheck(explicit_weights):
    """torch.library.opcheck passes all its default tests (schema, autograd registration, fake, AOT dynamic)."""
    x, lengths = padded([clustered(6, 4), clustered(3, 4)])
    weights = torch.rand(x.shape[:2]) if explicit_weights else None
    result = torch.library.opcheck(
        torch.ops.mrprune.graph_scores.default, (x, lengths, weights), {"threshold": 0.2, "iterations": 2}
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


def test_torch_compile_fullgraph():
    """The op compiles with fullgraph=True and gives the eager result."""
    torch._dynamo.reset()
    x, lengths = padded([clustered(10, 8), clustered(3, 8)])

    def fn(features, lens):
        return torch.ops.mrprune.graph_scores(features, lens, None, 0.5, 0.03, 5)

    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(x, lengths), fn(x, lengths)
    torch._dynamo.reset()
    assert torch.equal(got, want) and (got[0, :10] > 0).all()


# --- Triton kernels (under TRITON_INTERPRET=1 on the CPU, natively on a GPU) ----------------------------------------
# Small odd shapes with forced 16-wide tiles (several token tiles, so both halves of the symmetric tile pairs and the
# partial-slot reductions run; a 16-wide feature tile, so the dot loop has a tail), both variants, every input dtype.


def _triton_scores(x, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1, **options):
    """The Triton launcher with canonical arguments (what the registered backend passes), on TRITON_DEVICE."""
    from mrprune.triton_kernels.graph_scores import graph_scores_triton

    w = None if weights is None else to_triton(weights.to(torch.float32).contiguous())
    return graph_scores_triton(
        to_triton(x.contiguous()), to_triton(lengths.to(torch.int64)), w, threshold, temperature, iterations, **options
    )


def _triton_impl(**options):
    return lambda *args: _triton_scores(*args, **options)


VARIANTS = ["stream", "sparse", "materialize"]
SMALL_SHAPES = [(n, dim, i % 5 + 1) for i, (n, dim) in enumerate(itertools.product((1, 7, 33, 70), (3, 16, 33)))]


@triton_test
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("n", "dim", "iterations"), SMALL_SHAPES)
def test_triton_small_shapes(variant, n, dim, iterations):
    """Odd token counts and feature sizes (t cycling through 1..5) match the float64 reference in both variants."""
    gen = torch.Generator().manual_seed(n * 100 + dim)
    x = clustered(n, dim, generator=gen)[None]
    threshold, temperature = ((0.5, 0.03), (0.2, 0.1))[n % 2]
    check_against_oracle(
        None,
        x,
        torch.tensor([n]),
        None,
        threshold,
        temperature,
        iterations,
        impl=_triton_impl(variant=variant, block=16, block_d=16),
    )


@triton_test
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_triton_dtypes_padded_batch(variant, dtype):
    """Every input dtype (loaded, then upcast), a padded batch with garbage padding, an empty item, and explicit
    weights (garbage in their padding too; streaming) or norms (materialising): the float64 reference on the same
    rounded inputs; padding scores 0."""
    gen = torch.Generator().manual_seed(40)
    x, lengths = padded([clustered(n, 24, generator=gen) for n in (29, 0, 40, 5)])
    x = x.to(dtype)
    weights = torch.where(torch.arange(40) < lengths[:, None], torch.rand(4, 40, generator=gen), 1e4)
    scores = check_against_oracle(
        None,
        x,
        lengths,
        weights if variant == "stream" else None,
        0.5,
        0.03,
        2,
        impl=_triton_impl(variant=variant, block=16, block_d=16),
    )
    assert not scores[1].any() and not scores[0, 29:].any() and not scores[3, 5:].any()


@triton_test
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_iterations(variant):
    """t = 1..5 on one multi-tile item, against the reference."""
    gen = torch.Generator().manual_seed(41)
    x = clustered(40, 16, spread=0.4, generator=gen)[None]
    for iterations in range(1, 6):
        check_against_oracle(
            None,
            x,
            torch.tensor([40]),
            None,
            0.2,
            0.1,
            iterations,
            impl=_triton_impl(variant=variant, block=16, block_d=16),
        )


@triton_test
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_rows_without_edges(variant):
    """All-below-threshold rows: a threshold above 1 leaves no edge at all (P uniform, degree n, every score
    mean(w) / n); zero vectors and a threshold <= 0 with a tiny temperature (edge logits far from the -5000 fill)
    match the reference."""
    gen = torch.Generator().manual_seed(42)
    x = clustered(37, 9, generator=gen)[None]
    x[0, [3, 20]] = 0.0
    lengths = torch.tensor([37])
    scores = _triton_scores(x, lengths, None, 1.5, 0.03, 3, variant=variant, block=16, block_d=16).cpu()
    norms = x[0].double().norm(dim=-1)
    assert_close(scores[0], (norms.sum() / 37 / 37).expand(37))
    for threshold, temperature in ((0.5, 0.03), (-1.0, 1e-4), (0.0, 0.1)):
        check_against_oracle(
            None,
            x,
            lengths,
            None,
            threshold,
            temperature,
            2,
            max_left_out=1.0,
            impl=_triton_impl(variant=variant, block=16, block_d=16),
        )


@triton_test
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_tiny_rows(variant):
    """Rows with norms below the 1e-12 floor have a self-similarity below 1, so their softmax maxima differ from the
    other rows': each row's probabilities must be normalised by its own maximum and sum (the sparse variant's edge
    weights use the neighbour's), against the reference."""
    gen = torch.Generator().manual_seed(44)
    x = clustered(40, 12, generator=gen)[None]
    x[0, [2, 9, 30]] *= torch.tensor([3e-13, 6e-13, 9e-13])[:, None] / x[0, [2, 9, 30]].norm(dim=-1, keepdim=True)
    check_against_oracle(
        None,
        x,
        torch.tensor([40]),
        None,
        0.05,
        0.1,
        3,
        impl=_triton_impl(variant=variant, block=16, block_d=16),
    )


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sparse_chunked_edge_pass(dtype):
    """The sparse variant's edge pass in column chunks (a GPU's 16; 2 and 4 chunks of a tile here): the same edges as
    the whole-tile pass, so the same scores up to the rounding of S in another tiling, which moves a weight by about
    ulp / T (1e-4 relative at T = 0.03 over 3 steps: far below a misplaced or dropped edge)."""
    gen = torch.Generator().manual_seed(46)
    x, lengths = padded([clustered(n, 20, generator=gen) for n in (70, 17, 45)])
    x = x.to(dtype)
    want = oracle(OP, x, lengths, None, 0.5, 0.03, 3)
    whole = _triton_scores(x, lengths, None, 0.5, 0.03, 3, variant="sparse", block=64).cpu()
    assert_close(whole, want)
    for chunk in (16, 32):
        chunked = _triton_scores(x, lengths, None, 0.5, 0.03, 3, variant="sparse", block=64, edge_chunk=chunk).cpu()
        assert_close(chunked, want, rtol=1e-4, atol=1e-5)


@triton_test
def test_triton_sparse_near_threshold_edges():
    """Many edges just above the threshold (within CLEAR_MARGIN: the slots' second part): three groups of tokens
    whose directions are 59.98 degrees apart (cosine 0.5003 between neighbouring groups, 1 within a group), in a
    chunked and a whole-tile edge pass, against the reference."""
    gen = torch.Generator().manual_seed(47)
    angles = torch.tensor([0.0, 59.98, 119.96]).deg2rad()[torch.arange(70) % 3]
    x = torch.zeros(1, 70, 8, dtype=torch.float64)
    x[0, :, 0], x[0, :, 1] = angles.cos(), angles.sin()
    x[0, :, 2:] = 1e-6 * torch.randn(70, 6, generator=gen, dtype=torch.float64)  # no exact duplicates
    x = x.float()
    lengths = torch.tensor([70])
    want = oracle(OP, x, lengths, None, 0.5, 0.1, 3)
    for chunk in (None, 16):
        got = _triton_scores(x, lengths, None, 0.5, 0.1, 3, variant="sparse", block=64, edge_chunk=chunk).cpu()
        assert_close(got, want, rtol=1e-4, atol=1e-5)


@triton_test
def test_triton_sparse_falls_back_to_streaming(monkeypatch):
    """Edge lists over the memory cap: the sparse variant streams its steps instead, bitwise as the streaming variant
    does; under the cap its lists give the same scores up to rounding."""
    from mrprune.triton_kernels import graph_scores

    gen = torch.Generator().manual_seed(45)
    x, lengths = padded([clustered(n, 20, generator=gen) for n in (50, 17, 33)])
    stream = _triton_scores(x, lengths, None, 0.2, 0.1, 3, variant="stream", block=16, block_d=16).cpu()
    ran = []
    sparse_steps = graph_scores._sparse_steps
    monkeypatch.setattr(graph_scores, "_sparse_steps", lambda *a, **k: ran.append(sparse_steps(*a, **k)) or ran[-1])
    sparse = _triton_scores(x, lengths, None, 0.2, 0.1, 3, variant="sparse", block=16, block_d=16).cpu()
    assert ran == [True]
    assert_close(sparse, stream)
    monkeypatch.setattr(graph_scores, "SPARSE_MAX_RATIO", 0.0)
    monkeypatch.setattr(graph_scores, "SPARSE_MIN_BYTES", 0)
    fallback = _triton_scores(x, lengths, None, 0.2, 0.1, 3, variant="sparse", block=16, block_d=16).cpu()
    assert ran == [True, False] and torch.equal(fallback, stream)


@triton_test
def test_triton_variants_and_splits_agree():
    """Streaming and materialising variants, with any tile size and any row split of the materialising GEMV, give
    the same scores (a padded batch of several tiles)."""
    gen = torch.Generator().manual_seed(43)
    x, lengths = padded([clustered(n, 20, generator=gen) for n in (50, 17, 33)])
    want = _triton_scores(x, lengths, None, 0.2, 0.1, 2, variant="stream", block=16, block_d=16).cpu()
    for options in (
        dict(variant="stream", block=32, block_d=32),
        dict(variant="materialize", splits=1),
        dict(variant="materialize", block=16, splits=3),
        dict(variant="sparse", block=32, block_d=32),
        dict(variant="auto"),
    ):
        assert_close(_triton_scores(x, lengths, None, 0.2, 0.1, 2, **options).cpu(), want)


def _poison_fresh_buffers(monkeypatch):
    """``torch.empty``/``torch.empty_like`` hand out NaN (floats) or all-ones bits (integers): an output slot a kernel
    leaves unwritten then shows up, instead of keeping the bits of an earlier call's buffer at the same address."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@triton_test
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_persistent_programs_change_no_bit(variant, monkeypatch):
    """Persistent programs (3, each looping over about 70 tile pairs) give the bits of one program per pair and item
    (every pair writes its own slots): a padded batch with ragged lengths, an empty item and a full last one (its last
    pair live), N = 150 (not a multiple of the 16-token tile), 10 tiles (a full band of 8 and a partial one); every
    tile-pair kernel of the variant (Gram store; statistics, propagation, edge lists). Fresh buffers are poisoned, so a
    pair no program visits shows."""
    from mrprune.triton_kernels import _common

    gen = torch.Generator().manual_seed(49)
    x, lengths = padded([clustered(n, 20, generator=gen) for n in (131, 0, 70, 150)])
    want = oracle(OP, x, lengths, None, 0.2, 0.1, 2)
    monkeypatch.setattr(_common, "persistent_programs", lambda t: 3)  # on a GPU too: loops of many work items
    _poison_fresh_buffers(monkeypatch)
    runs = [
        _triton_scores(x, lengths, None, 0.2, 0.1, 2, variant=variant, block=16, block_d=16, persistent=persistent)
        for persistent in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert_close(runs[0].cpu(), want)


def test_triton_choose_variant():
    """The cost model: materialise small graphs at large D (and for float32 from small D on), stream at small D, when
    an item's float32 S would exceed twice its features (video) or B N^2 float32 the 2 GiB cap -- through edge lists
    (sparse) when t > 1; an explicit or context choice wins."""
    pytest.importorskip("triton")
    from mrprune.triton_kernels.graph_scores import choose_variant, use_variant

    assert choose_variant(8, 2304, 4096, 5, torch.float16) == "materialize"
    assert choose_variant(8, 2304, 4096, 1, torch.float32) == "materialize"
    assert choose_variant(8, 2304, 64, 1, torch.float16) == "stream"
    assert choose_variant(1, 36864, 4096, 5, torch.float16) == "sparse"  # 5.4 GB of float32 similarities, t > 1
    assert choose_variant(1, 36864, 4096, 1, torch.float16) == "stream"
    assert choose_variant(8, 576, 4096, 1, torch.bfloat16) == "materialize"
    assert choose_variant(1, 16384, 4096, 5, torch.float32) == "sparse"  # S: 1 GiB, features: 256 MiB
    assert choose_variant(64, 4096, 8192, 5, torch.float32) == "sparse"  # 4 GiB of S in all
    assert choose_variant(8, 4096, 8192, 5, torch.float32) == "materialize"
    assert choose_variant(1, 16, 4, 1, torch.float16, variant="materialize") == "materialize"
    with use_variant("stream"):
        assert choose_variant(8, 2304, 4096, 5, torch.float16) == "stream"
    with pytest.raises(ValueError, match="unknown graph_scores variant"), use_variant("dense"):
        pass


@triton_test
@pytest.mark.parametrize(("explicit_weights", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_triton_opcheck(explicit_weights, dtype):
    """torch.library.opcheck of the private op mrprune::_graph_scores_triton (schema, autograd registration, fake,
    AOT dynamic)."""
    x, lengths = padded([clustered(6, 4), clustered(3, 4)])
    weights = to_triton(torch.rand(x.shape[:2])) if explicit_weights else None
    result = torch.library.opcheck(
        torch.ops.mrprune._graph_scores_triton.default,
        (to_triton(x.to(dtype)), to_triton(lengths), weights),
        {"threshold": 0.2, "iterations": 2},
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


@triton_test
def test_triton_public_op_and_errors(monkeypatch):
    """The "triton" backend serves the public op (float64 still goes to the reference); the private op rejects
    float64 and, outside the interpreter, CPU tensors with a clear message."""
    from mrprune.triton_kernels import _common

    x, lengths = to_triton(clustered(9, 5)[None]), to_triton(torch.tensor([9]))
    with mrprune.backends.use_backend("triton"):
        assert_close(mrprune.graph_scores(x, lengths).cpu(), oracle(OP, x.cpu(), lengths.cpu()))
    with pytest.raises(TypeError, match="float64 is served by the reference"):
        torch.ops.mrprune._graph_scores_triton(x.double(), lengths)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="the Triton backend needs CUDA tensors"):
        torch.ops.mrprune._graph_scores_triton(x.cpu(), lengths.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("iterations", [1, 5])
def test_triton_llava_next_full_size_cuda(variant, dtype, iterations, monkeypatch):
    """GPU only: the real LLaVA-NeXT high-res view (2304 tokens, D = 4096) in every input dtype and both variants
    matches the float64 reference (tokens next to a borderline edge left out, as in the full-size test above)."""
    if TRITON_DEVICE != "cuda":
        pytest.skip("needs the Triton backend on a GPU")
    monkeypatch.setenv("MRPRUNE_TRITON_AUTOTUNE", "1")  # the autotuned launch path, at the real shape
    x = testing.llava_next_features(48, 48, 4096, seed=0)
    high = x[576:].reshape(48, 49, 4096)[:, :48].reshape(1, 2304, 4096).to(dtype)
    lengths = torch.tensor([2304])
    scores = _triton_scores(high, lengths, None, 0.5, 0.03, iterations, variant=variant).cpu()
    want = oracle(OP, high, lengths, None, 0.5, 0.03, iterations)
    u = reference.normalize_rows(high[0].double())
    # a borderline edge changes its endpoints' degrees; the mass it carries (probability <= exp(-0.5 / 0.03)) is far
    # below the tolerance, also after 5 steps
    ambiguous = ((u @ u.T - 0.5).abs() < DELTA).any(dim=1)
    assert ambiguous.sum() <= 0.1 * 2304
    assert_close(scores[0, ~ambiguous], want[0, ~ambiguous])


def _gpu_benchmark_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_graph.py"
    spec = importlib.util.spec_from_file_location("mrprune_gpu_graph_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("iterations", [1, 5])
def test_benchmark_official_path_matches_reference(iterations):
    """The GPU benchmark's baseline (benchmarks/gpu_graph.py: the official code's matrix_power and (P > 0) degree,
    batched) computes the spec: equal to the reference in float64."""
    bench = _gpu_benchmark_module()
    gen = torch.Generator().manual_seed(48)
    x = torch.stack([clustered(30, 12, generator=gen) for _ in range(2)]).double()
    want = reference.graph_scores(x, torch.tensor([30, 30]), None, 0.5, 0.03, iterations)
    torch.testing.assert_close(bench.official_graph_scores(x, 0.5, 0.03, iterations), want, rtol=1e-9, atol=1e-12)
