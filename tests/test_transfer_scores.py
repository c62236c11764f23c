"""Tests of ``mrprune.transfer_scores`` (MR-Pruner's cross-resolution transfer): the reference against brute force,
every kernel backend against the float64 reference (up to the real LLaVA-NeXT shape), invariants, edge cases,
batching, argument validation, opcheck and torch.compile; then the Triton kernels (under TRITON_INTERPRET=1 on the
CPU, natively on a GPU) at small shapes with split keys, and a compile check for sm_90."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import mrprune
from mrprune import reference, testing
from tests.brute_force import tiny_random
from tests.brute_force import transfer as brute_transfer
from tests.utils import (
    CPU_SCREEN,
    INPUT_DTYPES,
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

OP = "transfer_scores"
BACKENDS = kernel_backends(OP)
# Large shapes and large parametrizations leave out Triton under the CPU interpreter (see the Triton section below).
BACKENDS_LARGE = kernel_backends(OP, interpreted=False)
# Float32 kernels decide an edge whose float64 cosine lies within DELTA of the threshold either way (their rounding
# error is ~1e-6 at D = 4096): queries with such an entry are left out of elementwise comparisons.
DELTA = 1e-5


# --- brute force (explicit loops, float64 Python floats) ------------------------------------------------------------


# (queries, keys, key_mask, key_weights or None, threshold, temperature)
TINY_CASES = {
    "random": (tiny_random(5, 4, 1), tiny_random(7, 4, 2), [1, 0, 1, 1, 0, 1, 1], None, 0.3, 0.03),
    "random_weights": (
        tiny_random(6, 3, 3),
        tiny_random(5, 3, 4),
        [1, 1, 0, 1, 1],
        [0.5, 2.0, 9.0, 1.5, 3.0],
        0.2,
        0.1,
    ),
    "zero_vectors": ([[0.0, 0.0], [1.0, 0.1]], [[1.0, 0.0], [0.0, 0.0], [0.9, 0.2]], [1, 1, 1], None, 0.5, 0.03),
    "no_edge": ([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0], [-1.0, 0.5, 0.0]], [1, 1], [2.0, 5.0], 0.5, 0.1),
    "high_threshold": (tiny_random(3, 2, 5), tiny_random(4, 2, 6), [1, 1, 1, 1], None, 1.5, 0.03),
    "threshold_zero": ([[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [1.0, 1.0], [-1.0, 0.1]], [1, 1, 1], None, 0.0, 0.1),
    "threshold_negative": (tiny_random(4, 3, 7), tiny_random(5, 3, 8), [1, 1, 0, 1, 1], None, -0.5, 0.1),
    "empty_mask": (tiny_random(3, 3, 9), tiny_random(4, 3, 10), [0, 0, 0, 0], None, 0.5, 0.03),
    # cos([3, 4], [1, 0]) = 0.6 exactly (an edge at threshold 0.6); duplicated keys tie.
    "tie_at_threshold": (
        [[3.0, 4.0], [1.0, 0.0]],
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]],
        [1, 1, 1, 1],
        [1.0, 2.0, 3.0, 4.0],
        0.6,
        0.05,
    ),
    # The only edge logit (-0.995 / 1e-4 = -9950) is far below the non-edge's -5000 (S = 0): the mass goes there.
    "edges_below_fill": ([[1.0, 0.0]], [[-2.0, 0.2], [0.0, 1.0]], [1, 1], None, -1.0, 1e-4),
    # exp((-0.995 - 1) / 1e-3) underflows to 0, but that key is still an edge: the degree counts it.
    "underflowing_edge": ([[1.0, 0.0]], [[1.0, 0.01], [-1.0, 0.1]], [1, 1], [3.0, 4.0], -1.0, 1e-3),
    "single": ([[0.5, -1.0, 2.0]], [[1.0, -1.0, 2.5]], [1], None, 0.5, 0.03),
}


def _tiny_tensors(case: str, dtype=torch.float64):
    queries, keys, mask, weights, threshold, temperature = TINY_CASES[case]
    q = torch.tensor(queries, dtype=dtype)[None]
    k = torch.tensor(keys, dtype=dtype)[None]
    m = torch.tensor(mask, dtype=torch.bool)[None]
    w = None if weights is None else torch.tensor(weights, dtype=dtype)[None]
    return q, torch.tensor([len(queries)]), k, m, w, threshold, temperature


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_reference_matches_brute_force(case):
    """reference.transfer_scores equals the loop implementation (with padded queries and garbage padding keys)."""
    queries, keys, mask, weights, threshold, temperature = TINY_CASES[case]
    want = brute_transfer(queries, keys, mask, weights, threshold, temperature)
    m, n, dim = len(queries), len(keys), len(queries[0])
    q = torch.full((2, m + 2, dim), 5.0, dtype=torch.float64)
    q[1, :m] = torch.tensor(queries, dtype=torch.float64)
    k = torch.full((2, n + 1, dim), 5.0, dtype=torch.float64)
    k[1, :n] = torch.tensor(keys, dtype=torch.float64)
    key_mask = torch.zeros(2, n + 1, dtype=torch.bool)
    key_mask[1, :n] = torch.tensor(mask, dtype=torch.bool)
    key_mask[0, 0] = True
    w = None
    if weights is not None:
        w = torch.full((2, n + 1), 5.0, dtype=torch.float64)
        w[1, :n] = torch.tensor(weights, dtype=torch.float64)
    prop = reference.transfer_scores(q, torch.tensor([0, m]), k, key_mask, w, threshold, temperature)
    expected = torch.zeros(2, m + 2, dtype=torch.float64)
    expected[1, :m] = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(prop, expected, rtol=1e-12, atol=1e-14)


def test_brute_force_cases_exercise_the_rules():
    """The tiny cases hold what their names say: a uniform row gives mean(w) / |keys|, an exact-threshold cosine is an
    edge, ties split evenly, and edges below the fill logit lose the softmax to a non-edge."""
    assert brute_transfer(*TINY_CASES["no_edge"]) == pytest.approx([3.5 / 2, 3.5 / 2])
    assert brute_transfer(*TINY_CASES["empty_mask"]) == [0.0, 0.0, 0.0]
    tie = brute_transfer(*TINY_CASES["tie_at_threshold"])
    # query [3, 4]: keys 0 and 1 (cos 0.6, logit 12) tie, key 2 (cos 0.8, logit 16) leads, key 3 (cos 0.14) is out
    e = math.exp(-4.0)
    assert tie[0] == pytest.approx(((1.0 + 2.0) * e + 3.0) / (2 * e + 1) / 3, rel=1e-12)
    assert brute_transfer(*TINY_CASES["edges_below_fill"]) == pytest.approx([1.0])  # key 1's weight, degree 1
    assert brute_transfer(*TINY_CASES["underflowing_edge"]) == pytest.approx([3.0 / 2])  # all mass on key 0, degree 2


# --- kernels against the float64 reference ------------------------------------------------------------------------


def near_threshold_queries(queries, query_lengths, keys, key_mask, threshold) -> torch.Tensor:
    """``[B, M]`` bool: valid queries with a selected key whose float64 cosine lies within DELTA of the threshold (or
    a tiny non-zero cosine when the threshold is <= 0): float32 may decide those edges either way."""
    out = torch.zeros(queries.shape[:2], dtype=torch.bool)
    for b, m in enumerate(query_lengths.tolist()):
        selected = keys[b][key_mask[b]].double()
        s = reference.normalize_rows(queries[b, :m].double()) @ reference.normalize_rows(selected).T
        ambiguous = (s - threshold).abs() < DELTA
        if threshold <= DELTA:
            ambiguous |= s.abs() < DELTA
        out[b, :m] = (ambiguous & (s != 0)).any(dim=1)
    return out


def check_against_oracle(
    backend, queries, query_lengths, keys, key_mask, key_weights, threshold, temperature, max_left_out=0.1, impl=None
):
    """``impl`` (a function of the op's arguments) replaces the public op with ``backend`` forced."""
    args = (queries, query_lengths, keys, key_mask, key_weights, threshold, temperature)
    prop = run(OP, backend, *args) if impl is None else impl(*args).cpu()
    want = oracle(OP, queries, query_lengths, keys, key_mask, key_weights, threshold, temperature)
    assert prop.dtype == torch.float32 and prop.shape == want.shape
    keep = ~near_threshold_queries(queries, query_lengths, keys, key_mask, threshold)
    assert (~keep).sum() <= max_left_out * max(int(query_lengths.sum()), 1), "inputs too close to the threshold"
    assert_close(prop[keep], want[keep])
    return prop


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_kernel_matches_reference_tiny(backend, case):
    """The brute-force cases through the kernels match the reference (a query whose cosine equals the threshold
    exactly is left out: float32 may round it either way)."""
    check_against_oracle(backend, *_tiny_tensors(case, torch.float32), max_left_out=1.0)


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
@pytest.mark.parametrize("n", [1, 7, 33, 257])
@pytest.mark.parametrize("dim", [3, 64, 130])
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_kernel_matches_reference_clustered(backend, n, dim, threshold, temperature):
    """Clustered queries and keys (shared centres) of odd sizes, about half of the keys selected, match the reference;
    ``n`` keys against ``(n * 3) // 2 + 1`` queries."""
    gen = torch.Generator().manual_seed(n * 1000 + dim)
    m = (n * 3) // 2 + 1
    x = clustered(n + m, dim, generator=gen)
    queries, keys = x[:m][None], x[m:][None]
    key_mask = torch.rand(1, n, generator=gen) < 0.5
    key_mask[0, 0] = True
    key_weights = torch.rand(1, n, generator=gen) * 3 if dim == 64 else None
    check_against_oracle(backend, queries, torch.tensor([m]), keys, key_mask, key_weights, threshold, temperature)


@functools.cache
def _llava(rows: int, cols: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(base view [576, D], high-res grid tokens without newlines [rows * cols, D]) of one synthetic image."""
    x = testing.llava_next_features(rows, cols, dim, seed=0)
    return x[:576], x[576:].reshape(rows, cols + 1, dim)[:, :cols].reshape(rows * cols, dim)


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("threshold", [0.5, 0.2])
@pytest.mark.parametrize("temperature", [0.03, 0.1])
def test_kernel_matches_reference_llava(backend, dtype, threshold, temperature):
    """MR-Pruner's use: the 576 base tokens as queries, a random half of the 12 x 12 high-res grid (D = 256) as keys,
    in every input dtype, match the float64 reference on the same rounded inputs."""
    base, high = _llava(12, 12, 256)
    gen = torch.Generator().manual_seed(12)
    key_mask = torch.rand(1, high.shape[0], generator=gen) < 0.5
    prop = check_against_oracle(
        backend, base.to(dtype)[None], torch.tensor([576]), high.to(dtype)[None], key_mask, None, threshold, temperature
    )
    assert prop.max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_kernel_matches_reference_padded_batch(backend, dtype, explicit_weights):
    """A padded batch (garbage in padded queries, keys and key weights; an item without queries; an item whose mask
    selects nothing) matches the reference; padding and the empty-mask item are 0."""
    gen = torch.Generator().manual_seed(13)
    shared = [clustered(m + n, 24, generator=gen) for m, n in ((21, 40), (0, 9), (8, 15), (33, 3))]
    queries, query_lengths = padded([x[: x.shape[0] - n] for x, n in zip(shared, (40, 9, 15, 3), strict=True)])
    keys, key_lengths = padded([x[x.shape[0] - n :] for x, n in zip(shared, (40, 9, 15, 3), strict=True)])
    key_mask = (torch.rand(keys.shape[:2], generator=gen) < 0.6) & (torch.arange(40) < key_lengths[:, None])
    key_mask[3] = False
    key_weights = torch.where(key_mask, torch.rand(keys.shape[:2], generator=gen), 1e4) if explicit_weights else None
    if key_weights is not None:
        key_weights = key_weights.to(dtype)
    prop = check_against_oracle(
        backend, queries.to(dtype), query_lengths, keys.to(dtype), key_mask, key_weights, 0.5, 0.03
    )
    assert not prop[1].any() and not prop[3].any() and not prop[2, 8:].any()
    assert (prop[0, :21] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS_LARGE)
def test_kernel_matches_reference_llava_next_full_size(backend):
    """The real MR-Pruner shape: 576 base queries against 2304 high-res keys (D = 4096), half of them selected."""
    base, high = _llava(48, 48, 4096)
    gen = torch.Generator().manual_seed(48)
    key_mask = torch.rand(1, 2304, generator=gen) < 0.5
    prop = check_against_oracle(backend, base[None], torch.tensor([576]), high[None], key_mask, None, 0.5, 0.03)
    assert prop.min() > 0 and prop.max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_non_contiguous_and_int32_lengths(backend):
    """Non-contiguous queries/keys/mask/weights views and int32 query lengths give the same result."""
    gen = torch.Generator().manual_seed(14)
    x = clustered(2 * 50, 16, generator=gen)
    queries, keys = x[:40].reshape(2, 20, 16), x[40:].reshape(2, 30, 16)
    key_mask, weights = torch.rand(2, 30, generator=gen) < 0.5, torch.rand(2, 30, generator=gen)
    lengths = torch.tensor([20, 13])
    t3 = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    t2 = lambda t: t.T.contiguous().T  # noqa: E731
    assert not t3(queries).is_contiguous() and not t2(key_mask).is_contiguous()
    want = run(OP, backend, queries, lengths, keys, key_mask, weights)
    got = run(OP, backend, t3(queries), lengths.to(torch.int32), t3(keys), t2(key_mask), t2(weights))
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_edges_below_fill_logit(backend):
    """Threshold <= 0 with a tiny temperature: when every edge's logit S / T (here about -9950) is far below the -5000
    given to the non-edges, the spec's softmax puts the mass on the non-edges (query 0: all of it on key 1, prop =
    ||key 1|| / 1 = 1), so a kernel must not treat non-edges as probability 0. Queries 1 and 2 have positive edge
    logits and are unaffected."""
    _, _, k, m, w, threshold, temperature = _tiny_tensors("edges_below_fill", torch.float32)
    q, ql = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.05]]]), torch.tensor([3])
    want = oracle(OP, q, ql, k, m, w, threshold, temperature)
    assert_close(want[0, 0], torch.tensor(1.0))
    assert_close(run(OP, backend, q, ql, k, m, w, threshold, temperature), want)


# --- invariants ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize(("threshold", "temperature"), [(0.5, 0.03), (0.2, 0.1)])
def test_constant_key_weights_give_c_over_degree(impl, threshold, temperature):
    """With constant key weights c and an edge for every query, prop_i = c / dc_i (dc_i = #selected keys with
    cosine >= threshold), since every softmax row sums to 1."""
    gen = torch.Generator().manual_seed(15)
    keys = clustered(60, 20, spread=0.3, generator=gen)[None]
    key_mask = torch.rand(1, 60, generator=gen) < 0.7
    queries = keys[:, key_mask[0]][:, :25] + 0.05 * torch.randn(1, 25, 20, generator=gen)  # near a selected key
    s = reference.normalize_rows(queries[0].double()) @ reference.normalize_rows(keys[0][key_mask[0]].double()).T
    assert (s - threshold).abs().min() > DELTA
    degree = (s >= threshold).sum(-1)
    assert (degree > 0).all() and (degree > 1).any()
    prop = run(OP, impl, queries, torch.tensor([25]), keys, key_mask, torch.full((1, 60), 2.5), threshold, temperature)
    assert_close(prop[0], 2.5 / degree)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_self_transfer_equals_cosine_graph(impl):
    """Queries = keys with every key selected: prop = (P w) / degree for P, degree of cosine_graph."""
    gen = torch.Generator().manual_seed(16)
    x, lengths = padded([clustered(45, 12, generator=gen)])
    weights = torch.rand(1, 45, generator=gen)
    graph, degree = run("cosine_graph", impl, x, lengths, 0.2, 0.1)
    prop = run(OP, impl, x, lengths, x, torch.ones(1, 45, dtype=torch.bool), weights, 0.2, 0.1)
    assert_close(prop[0], (graph[0].double() @ weights[0].double()) / degree[0])


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_mask_selects_keys(impl):
    """Masking keys equals dropping them; unselected keys (even huge ones) and their weights do not matter; the key
    order does not matter; prop is linear in the key weights and scales with the keys' norms."""
    gen = torch.Generator().manual_seed(17)
    x = clustered(70, 10, generator=gen)
    queries, keys = x[:30][None], x[30:][None]
    key_mask = torch.rand(1, 40, generator=gen) < 0.5
    weights = torch.rand(1, 40, generator=gen)
    ql = torch.tensor([30])
    prop = run(OP, impl, queries, ql, keys, key_mask, weights)
    kept = keys[:, key_mask[0]]
    dropped = run(OP, impl, queries, ql, kept, torch.ones(kept.shape[:2], dtype=torch.bool), weights[:, key_mask[0]])
    assert_close(dropped, prop)
    noisy_keys = torch.where(key_mask[..., None], keys, 1e3 * torch.randn(1, 40, 10, generator=gen))
    noisy_weights = torch.where(key_mask, weights, 1e3)
    assert_close(run(OP, impl, queries, ql, noisy_keys, key_mask, noisy_weights), prop)
    perm = torch.randperm(40, generator=gen)
    assert_close(run(OP, impl, queries, ql, keys[:, perm], key_mask[:, perm], weights[:, perm]), prop)
    other = torch.rand(1, 40, generator=gen)
    combined = run(OP, impl, queries, ql, keys, key_mask, 3 * weights + other)
    assert_close(combined, 3 * prop + run(OP, impl, queries, ql, keys, key_mask, other))
    by_norm = run(OP, impl, queries, ql, keys, key_mask)
    assert_close(run(OP, impl, 0.5 * queries, ql, 4 * keys, key_mask), 4 * by_norm)


# --- edge cases ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_single_query_single_key(impl):
    """One query, one key: prop = w (an edge) or w / 1 (no edge, uniform over one key) either way."""
    q, k = torch.tensor([[[1.0, 0.2]]]), torch.tensor([[[0.9, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert_close(run(OP, impl, q, torch.tensor([1]), k, mask), torch.tensor([[0.9]]))
    assert_close(run(OP, impl, -q, torch.tensor([1]), k, mask), torch.tensor([[0.9]]))  # no edge


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_identical_tokens(impl):
    """All queries and keys identical: every entry is an edge, Q is uniform, dc = |keys|: prop = mean(w) / |keys|."""
    v = torch.randn(1, 1, 24)
    queries, keys = v.expand(1, 9, 24).contiguous(), (2 * v).expand(1, 31, 24).contiguous()
    key_mask = torch.ones(1, 31, dtype=torch.bool)
    key_mask[0, 5:12] = False
    weights = torch.rand(1, 31)
    prop = run(OP, impl, queries, torch.tensor([9]), keys, key_mask, weights)
    assert_close(prop, torch.full((1, 9), weights[key_mask].mean().item() / 24))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("threshold", [0.5, 0.0, -1.0])
def test_zero_vectors(impl, threshold):
    """A zero query has no edge (prop = mean(w) / |keys|); a zero key is nobody's edge, even for thresholds <= 0."""
    gen = torch.Generator().manual_seed(18)
    x = clustered(20, 8, generator=gen)
    queries, keys = x[:8].clone()[None], x[8:].clone()[None]
    queries[0, 3] = 0.0
    keys[0, 5] = 0.0
    s = reference.normalize_rows(queries[0].double()) @ reference.normalize_rows(keys[0].double()).T
    with_edge = [i for i in range(8) if ((s[i] >= threshold + DELTA) & (s[i].abs() > DELTA)).any()]
    assert 3 not in with_edge and len(with_edge) >= 5
    mask = torch.ones(1, 12, dtype=torch.bool)
    weights = torch.rand(1, 12, generator=gen) + 0.5
    prop = run(OP, impl, queries, torch.tensor([8]), keys, mask, weights, threshold, 0.03)
    assert_close(prop[0, 3], weights.mean() / 12)
    boosted = weights.clone()
    boosted[0, 5] = 100.0  # the zero key's weight only reaches the edge-less (zero) query
    prop_boosted = run(OP, impl, queries, torch.tensor([8]), keys, mask, boosted, threshold, 0.03)
    assert_close(prop_boosted[0, with_edge], prop[0, with_edge])
    assert_close(prop_boosted[0, 3], boosted.mean() / 12)


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_empty_mask_and_no_edge_queries(impl):
    """An empty key mask gives 0 (not NaN); a query with no edge to any selected key gets mean(w) / |keys| even when
    it has edges to unselected keys."""
    q = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    k = torch.tensor([[[1.0, 0.1, 0.0], [0.0, 0.9, 0.1], [-1.0, -1.0, 0.0], [0.0, -1.0, -0.3]]])
    w = torch.tensor([[4.0, 8.0, 1.0, 3.0]])
    prop = run(OP, impl, q, torch.tensor([3]), k, torch.zeros(1, 4, dtype=torch.bool), w)
    assert torch.equal(prop, torch.zeros(1, 3))
    mask = torch.tensor([[False, True, True, True]])
    prop = run(OP, impl, q, torch.tensor([3]), k, mask, w)
    assert_close(prop[0, [0, 2]], torch.full((2,), 12.0 / 3 / 3))  # query 0's only edge is the unselected key 0
    assert_close(prop[0, 1], torch.tensor(8.0))


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_zero_query_lengths(impl):
    """Items without queries give all-zero output whatever their padding and keys hold."""
    prop = run(
        OP,
        impl,
        torch.randn(2, 3, 4) * 1e3,
        torch.tensor([0, 0]),
        torch.randn(2, 5, 4),
        torch.ones(2, 5, dtype=torch.bool),
    )
    assert prop.shape == (2, 3) and not prop.any()


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
def test_duplicates(impl):
    """Duplicated queries get equal prop; duplicated keys split a query's mass evenly and both count in its degree."""
    base, high = _llava(4, 5, 32)
    queries = torch.cat([base[:10], base[3:4], base[3:4]])[None]
    prop = run(OP, impl, queries, torch.tensor([12]), high[None], torch.ones(1, 20, dtype=torch.bool))
    assert_close(prop[0, 10:], prop[0, 3:4].expand(2))
    q, k = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.1], [2.0, 0.1], [0.0, 1.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([[3.0, 5.0, 7.0]])
    assert_close(run(OP, impl, q, torch.tensor([1]), k, mask, w), torch.tensor([[(3.0 + 5.0) / 2 / 2]]))


# --- batching -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *BACKENDS])
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_batch_equals_per_item(impl, explicit_weights):
    """Each item of a 3-item batch (different query and key counts) gives the same prop as the item alone (bitwise for
    cpp)."""
    gen = torch.Generator().manual_seed(19)
    sizes = ((40, 70), (3, 5), (260, 150))
    shared = [clustered(m + n, 16, generator=gen) for m, n in sizes]
    queries, query_lengths = padded([x[:m] for x, (m, _) in zip(shared, sizes, strict=True)])
    keys, key_lengths = padded([x[m:] for x, (m, _) in zip(shared, sizes, strict=True)])
    key_mask = (torch.rand(keys.shape[:2], generator=gen) < 0.5) & (torch.arange(150) < key_lengths[:, None])
    weights = torch.rand(keys.shape[:2], generator=gen) if explicit_weights else None
    prop = run(OP, impl, queries, query_lengths, keys, key_mask, weights, 0.2, 0.1)
    for b, (m, n) in enumerate(sizes):
        w = None if weights is None else weights[b : b + 1, :n].contiguous()
        alone = run(
            OP,
            impl,
            queries[b : b + 1, :m].contiguous(),
            torch.tensor([m]),
            keys[b : b + 1, :n].contiguous(),
            key_mask[b : b + 1, :n].contiguous(),
            w,
            0.2,
            0.1,
        )
        if impl in ("cpp", "reference"):
            assert torch.equal(prop[b, :m], alone[0])
        else:
            assert_close(prop[b, :m], alone[0])


# --- the C++ kernel's screen (bfloat16 AMX products for float32 on AMX CPUs, else int8 VNNI products) ---------------


def _screen_cases() -> dict[str, tuple]:
    """(queries, query_lengths, keys, key_mask, threshold): query-key pairs right at the threshold (keys masked in
    and out, padded batch), LLaVA-NeXT base view against its high-resolution tokens, duplicates and zero rows."""
    gen = torch.Generator().manual_seed(44)
    band = near_threshold(330, 512, 0.5, generator=gen)  # token 0 is near-threshold to every other token
    queries, query_lengths = padded([band[:40], band[40:51]])
    keys, _ = padded([band[:330], band[60:200]])
    key_mask = torch.rand(keys.shape[:2], generator=gen) < 0.8
    key_mask[1, 140:] = False
    llava = testing.llava_next_features(6, 7, 4096, seed=5)
    dup = clustered(300, 40, generator=gen)
    dup[100], dup[7] = dup[3], 0.0
    high, dup_mask = llava[None, 576:], torch.rand(1, 300, generator=gen) < 0.6
    spiky = clustered(200, 40, generator=gen)
    spiky[:, :3] *= 30.0  # outlier channels: int8 scales set by them, a loose screen margin
    worst, cut = quantization_worst_case(40, 512, generator=gen)
    return {
        "band": (queries, query_lengths, keys, key_mask, 0.5),
        "llava_next": (llava[None, :576], torch.tensor([576]), high, torch.ones(high.shape[:2], dtype=torch.bool), 0.5),
        "duplicates_zero": (dup[None, :120], torch.tensor([120]), dup[None], dup_mask, 0.2),
        "outlier_channels": (spiky[None, :70], torch.tensor([70]), spiky[None], torch.ones(1, 200).bool(), 0.5),
        "quantization_worst_case": (worst[None, :40], torch.tensor([40]), worst[None], torch.ones(1, 80).bool(), cut),
    }


@pytest.mark.skipif(not CPU_SCREEN, reason="the screen runs on CPUs with AMX and AVX-512 BF16, or AVX-512 VNNI")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(_screen_cases()))
def test_cpu_screen_changes_no_bit(case, dtype, monkeypatch):
    """The screen skips only query-key pairs whose float32 cosine lies below the threshold: the C++ results are
    bit-identical with it forced on for any D (MRPRUNE_CPU_SCREEN=1) and off (=0), in every input precision."""
    queries, query_lengths, keys, key_mask, threshold = _screen_cases()[case]
    queries, keys = queries.to(dtype), keys.to(dtype)
    prop = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("MRPRUNE_CPU_SCREEN", setting)
        prop[setting] = run(OP, "cpp", queries, query_lengths, keys, key_mask, None, threshold, 0.03)
    assert torch.equal(prop["1"], prop["0"])


# --- validation -----------------------------------------------------------------------------------------------------


def _bad_inputs():
    q, ql = torch.randn(2, 3, 4), torch.tensor([3, 1])
    k, km, kw = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.rand(2, 5)
    nan_q, inf_k = q.clone(), k.clone()
    nan_q[1, 2, 0] = float("nan")
    inf_k[0, 4, 3] = float("inf")
    return {
        "queries_rank": ((q[0], ql, k, km), {}, ValueError, "queries must be 3-D"),
        "keys_rank": ((q, ql, k[0], km), {}, ValueError, "keys must be 3-D"),
        "queries_int": ((q.to(torch.int64), ql, k, km), {}, TypeError, "queries must be float16"),
        "keys_int": ((q, ql, k.to(torch.int32), km), {}, TypeError, "keys must be float16"),
        "keys_dim": ((q, ql, k[..., :3], km), {}, ValueError, r"keys must be \[B=2, N, D=4\]"),
        "keys_batch": ((q, ql, k[:1], km[:1]), {}, ValueError, r"keys must be \[B=2, N, D=4\]"),
        "lengths_shape": ((q, ql[:1], k, km), {}, ValueError, r"query_lengths must have shape \(2,\)"),
        "lengths_dtype": ((q, ql.float(), k, km), {}, TypeError, "query_lengths must be int32 or int64"),
        "lengths_range": ((q, torch.tensor([4, 1]), k, km), {}, ValueError, r"query_lengths must lie in \[0, 3\]"),
        "lengths_meta": ((q, ql.to("meta"), k, km), {}, ValueError, "query_lengths is on meta"),
        "keys_meta": ((q, ql, k.to("meta"), km), {}, ValueError, "keys is on meta"),
        "queries_meta": ((q.to("meta"), ql, k, km), {}, ValueError, "queries is on meta"),
        "mask_uint8": ((q, ql, k, km.to(torch.uint8)), {}, TypeError, "key_mask must be bool"),
        "mask_float": ((q, ql, k, km.float()), {}, TypeError, "key_mask must be bool"),
        "mask_shape": ((q, ql, k, km[:, :4]), {}, ValueError, r"key_mask must have shape \(2, 5\)"),
        "weights_shape": ((q, ql, k, km, kw[:, :4]), {}, ValueError, r"key_weights must have shape \(2, 5\)"),
        "weights_int": ((q, ql, k, km, kw.to(torch.int64)), {}, TypeError, "key_weights must be float16"),
        "nan_queries": ((nan_q, ql, k, km), {}, ValueError, "queries contains NaN or Inf"),
        "inf_keys": ((q, ql, inf_k, km), {}, ValueError, "keys contains NaN or Inf"),
        "temperature_zero": ((q, ql, k, km), {"temperature": 0.0}, ValueError, "temperature must be positive"),
        "temperature_negative": ((q, ql, k, km), {"temperature": -1.0}, ValueError, "temperature must be positive"),
        "threshold_nan": ((q, ql, k, km), {"threshold": math.nan}, ValueError, "threshold must be finite"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises(case, monkeypatch):
    """Invalid arguments raise a ValueError/TypeError naming the op and the argument, before any kernel runs."""
    monkeypatch.setenv("MRPRUNE_CHECK_FINITE", "1")
    args, kwargs, error, match = _bad_inputs()[case]
    with pytest.raises(error, match=match) as info:
        mrprune.transfer_scores(*args, **kwargs)
    assert "mrprune.transfer_scores" in str(info.value)


# --- torch.library / torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_weights", [False, True])
def test_opcheck(explicit_weights):
    """torch.library.opcheck passes all its default tests (schema, autograd registration, fake, AOT dynamic)."""
    x = clustered(13, 4)
    queries, keys = x[:6].reshape(2, 3, 4), x[6:12].reshape(2, 3, 4)
    key_mask = torch.tensor([[True, False, True], [True, True, True]])
    weights = torch.rand(2, 3) if explicit_weights else None
    result = torch.library.opcheck(
        torch.ops.mrprune.transfer_scores.default,
        (queries, torch.tensor([3, 2]), keys, key_mask, weights),
        {"threshold": 0.2, "temperature": 0.1},
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


def test_torch_compile_fullgraph():
    """The op compiles with fullgraph=True and gives the eager result."""
    torch._dynamo.reset()
    x = clustered(30, 8)
    queries, keys = x[:12].reshape(2, 6, 8), x[12:].reshape(2, 9, 8)
    key_mask = torch.rand(2, 9) < 0.6
    key_mask[:, 0] = True

    def fn(q, ql, k, km):
        return torch.ops.mrprune.transfer_scores(q, ql, k, km, None, 0.5, 0.03)

    compiled = torch.compile(fn, fullgraph=True)
    lengths = torch.tensor([6, 4])
    got, want = compiled(queries, lengths, keys, key_mask), fn(queries, lengths, keys, key_mask)
    torch._dynamo.reset()
    assert torch.equal(got, want) and (got[0] > 0).all()


# --- Triton kernels (under TRITON_INTERPRET=1 on the CPU, natively on a GPU) ----------------------------------------
# Small odd shapes with forced 16-wide tiles (several query blocks and key tiles, a feature tail in the dot loop) and
# the keys split over several programs (the flash-decoding combine), every input dtype.


def _triton_prop(queries, query_lengths, keys, key_mask, key_weights=None, threshold=0.5, temperature=0.03, **options):
    """The Triton launcher with canonical arguments (what the registered backend passes), on TRITON_DEVICE."""
    from mrprune.triton_kernels.transfer_scores import transfer_scores_triton

    w = None if key_weights is None else to_triton(key_weights.to(torch.float32).contiguous())
    return transfer_scores_triton(
        to_triton(queries.contiguous()),
        to_triton(query_lengths.to(torch.int64)),
        to_triton(keys.contiguous()),
        to_triton(key_mask.contiguous()),
        w,
        threshold,
        temperature,
        **options,
    )


def _triton_impl(**options):
    return lambda *args: _triton_prop(*args, **options)


@triton_test
@pytest.mark.parametrize("n", [1, 7, 33, 70])
@pytest.mark.parametrize("dim", [3, 16, 33])
def test_triton_small_shapes(n, dim):
    """Odd key counts and feature sizes (``(n * 3) // 2 + 1`` queries, about half of the keys selected, explicit
    weights for D = 16, key splits cycling through 1..3) match the float64 reference."""
    gen = torch.Generator().manual_seed(n * 100 + dim)
    m = (n * 3) // 2 + 1
    x = clustered(n + m, dim, generator=gen)
    queries, keys = x[:m][None], x[m:][None]
    key_mask = torch.rand(1, n, generator=gen) < 0.5
    key_mask[0, 0] = True
    key_weights = torch.rand(1, n, generator=gen) * 3 if dim == 16 else None
    threshold, temperature = ((0.5, 0.03), (0.2, 0.1))[n % 2]
    check_against_oracle(
        None,
        queries,
        torch.tensor([m]),
        keys,
        key_mask,
        key_weights,
        threshold,
        temperature,
        impl=_triton_impl(block=16, block_d=16, splits=n % 3 + 1),
    )


@triton_test
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_dtypes_padded_batch(dtype, splits):
    """Every input dtype (loaded, then upcast), a padded batch (garbage padding, an item without queries, one whose
    mask selects nothing), explicit weights (split keys) or norms: the reference on the same rounded inputs; 0 where
    it says."""
    gen = torch.Generator().manual_seed(46)
    shared = [clustered(m + n, 24, generator=gen) for m, n in ((21, 40), (0, 9), (8, 15), (33, 3))]
    queries, query_lengths = padded([x[: x.shape[0] - n] for x, n in zip(shared, (40, 9, 15, 3), strict=True)])
    keys, key_lengths = padded([x[x.shape[0] - n :] for x, n in zip(shared, (40, 9, 15, 3), strict=True)])
    key_mask = (torch.rand(keys.shape[:2], generator=gen) < 0.6) & (torch.arange(40) < key_lengths[:, None])
    key_mask[3] = False
    key_weights = torch.where(key_mask, torch.rand(keys.shape[:2], generator=gen), 1e4) if splits > 1 else None
    prop = check_against_oracle(
        None,
        queries.to(dtype),
        query_lengths,
        keys.to(dtype),
        key_mask,
        key_weights,
        0.5,
        0.03,
        impl=_triton_impl(block=16, block_d=16, splits=splits),
    )
    assert not prop[1].any() and not prop[3].any() and not prop[2, 8:].any() and (prop[0, :21] > 0).all()


@triton_test
def test_triton_mixed_dtypes():
    """float16 queries against bfloat16 keys (the dot upcasts both) match the reference on the rounded inputs."""
    gen = torch.Generator().manual_seed(47)
    x = clustered(60, 20, generator=gen)
    queries, keys = x[:25].to(torch.float16)[None], x[25:].to(torch.bfloat16)[None]
    key_mask = torch.rand(1, 35, generator=gen) < 0.7
    check_against_oracle(
        None, queries, torch.tensor([25]), keys, key_mask, None, 0.5, 0.03, impl=_triton_impl(block=16, splits=2)
    )


@triton_test
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_triton_rows_without_edges_and_fill(splits):
    """Queries without an edge to any selected key average the weights uniformly (mean(w) / |keys|); an empty mask
    gives 0; and where every edge logit lies far below the -5000 fill, the mass goes to the non-edges, also when the
    edges and the non-edge sit in different key splits (the combine must not let a split without keys, or with only
    far-below edges, decide the max)."""
    q = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.05, 0.0]]])
    # 33 keys in three 16-wide tiles: far-below edges (cosine ~ -0.995 to query 0) first, the orthogonal non-edge last
    keys = torch.cat([torch.tensor([[-2.0, 0.2, 0.0]]).expand(32, 3), torch.tensor([[0.0, 0.0, 1.0]])])[None]
    weights = torch.cat([torch.full((32,), 3.0), torch.tensor([1.0])])[None]
    mask = torch.ones(1, 33, dtype=torch.bool)
    mask[0, 16:32] = False  # the middle tile (split) selects nothing
    args = (q, torch.tensor([4]), keys, mask, weights, -1.0, 1e-4)
    want = oracle(OP, *args)
    assert_close(want[0, 0], torch.tensor(1.0 / 16))  # all of query 0's mass on the non-edge (weight 1), 16 edges
    prop = _triton_prop(*args, block=16, block_d=16, splits=splits).cpu()
    assert_close(prop, want)
    none = _triton_prop(q, torch.tensor([4]), keys, mask, weights, 1.5, 0.03, block=16, splits=splits).cpu()
    assert_close(none, (weights[mask].mean() / 17).expand(1, 4))
    empty = _triton_prop(q, torch.tensor([4]), keys, torch.zeros_like(mask), weights, block=16, splits=splits)
    assert torch.equal(empty.cpu(), torch.zeros(1, 4))


@triton_test
@pytest.mark.parametrize(("explicit_weights", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_triton_opcheck(explicit_weights, dtype):
    """torch.library.opcheck of the private op mrprune::_transfer_scores_triton."""
    x = clustered(13, 4)
    queries, keys = x[:6].reshape(2, 3, 4).to(dtype), x[6:12].reshape(2, 3, 4).to(dtype)
    key_mask = torch.tensor([[True, False, True], [True, True, True]])
    weights = torch.rand(2, 3) if explicit_weights else None
    result = torch.library.opcheck(
        torch.ops.mrprune._transfer_scores_triton.default,
        tuple(to_triton(t) for t in (queries, torch.tensor([3, 2]), keys, key_mask, weights)),
        {"threshold": 0.2, "temperature": 0.1},
    )
    assert set(result.values()) == {"SUCCESS"} and len(result) == 4


@triton_test
def test_triton_public_op_and_errors(monkeypatch):
    """The "triton" backend serves the public op; the private op rejects float64 and, outside the interpreter, CPU
    tensors with a clear message."""
    from mrprune.triton_kernels import _common

    x = clustered(20, 6)
    q, k = to_triton(x[:8][None]), to_triton(x[8:][None])
    ql, mask = to_triton(torch.tensor([8])), to_triton(torch.rand(1, 12) < 0.7)
    with mrprune.backends.use_backend("triton"):
        prop = mrprune.transfer_scores(q, ql, k, mask)
    assert_close(prop.cpu(), oracle(OP, q.cpu(), ql.cpu(), k.cpu(), mask.cpu()))
    with pytest.raises(TypeError, match="float64 is served by the reference"):
        torch.ops.mrprune._transfer_scores_triton(q.double(), ql, k.double(), mask)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="the Triton backend needs CUDA tensors"):
        torch.ops.mrprune._transfer_scores_triton(q.cpu(), ql.cpu(), k.cpu(), mask.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_triton_llava_next_full_size_cuda(dtype, monkeypatch):
    """GPU only: 576 base queries against 2304 high-res keys (D = 4096), half selected, match the reference."""
    if TRITON_DEVICE != "cuda":
        pytest.skip("needs the Triton backend on a GPU")
    monkeypatch.setenv("MRPRUNE_TRITON_AUTOTUNE", "1")  # the autotuned launch path, at the real shape
    base, high = _llava(48, 48, 4096)
    key_mask = torch.rand(1, 2304, generator=torch.Generator().manual_seed(48)) < 0.5
    check_against_oracle(
        None,
        base.to(dtype)[None],
        torch.tensor([576]),
        high.to(dtype)[None],
        key_mask,
        None,
        0.5,
        0.03,
        impl=_triton_impl(),
    )


def test_benchmark_official_path_matches_reference():
    """The GPU benchmark's baseline (benchmarks/gpu_graph.py: the official transfer, one item at a time, with the
    (Q > 0) degree) computes the spec: equal to the reference in float64."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_graph.py"
    spec = importlib.util.spec_from_file_location("mrprune_gpu_graph_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(49)
    x = clustered(2 * 50, 10, generator=gen).double()
    queries, keys = x[:40].reshape(2, 20, 10), x[40:].reshape(2, 30, 10)
    key_mask = torch.rand(2, 30, generator=gen) < 0.5
    want = reference.transfer_scores(queries, torch.tensor([20, 20]), keys, key_mask, None, 0.5, 0.03)
    got = bench.official_transfer_scores(queries, keys, key_mask, 0.5, 0.03)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
