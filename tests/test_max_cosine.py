"""max_cosine (ResPrune's text relevance: the largest cosine of each query with the valid keys): reference, kernels,
edge cases, errors, opcheck and torch.compile.

The reference is checked against a loop-and-``math`` brute force; every kernel against the float64 reference on the
same (rounded) inputs. Values that the spec fixes exactly (0 for padded queries, -inf for an item without keys, 0 for
a zero vector) are compared exactly.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import mrprune
from mrprune import backends, reference
from mrprune.testing import llava15_features
from tests.utils import INPUT_DTYPES, assert_close, kernel_backends, oracle, padded, run

OP = "max_cosine"
KERNELS = kernel_backends(OP)
INF = math.inf


# --- independent brute force --------------------------------------------------------------------------------------


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(c * c for c in v))
    return [c / max(norm, 1e-12) for c in v]


def brute_max_cosine(
    queries: torch.Tensor, query_lengths: torch.Tensor, keys: torch.Tensor, key_lengths: torch.Tensor
) -> torch.Tensor:
    """Max over the valid keys of cos(q, k) with x / max(||x||, 1e-12), by explicit loops; -inf without keys, 0 for
    padded queries."""
    batch, max_queries = queries.shape[:2]
    out = [[0.0] * max_queries for _ in range(batch)]
    for b in range(batch):
        m, n = int(query_lengths[b]), int(key_lengths[b])
        key_units = [_unit(v) for v in keys[b, :n].double().tolist()]
        for i, q in enumerate(queries[b, :m].double().tolist()):
            q = _unit(q)
            best = -INF
            for k in key_units:
                best = max(best, math.fsum(a * c for a, c in zip(q, k, strict=True)))
            out[b][i] = best
    return torch.tensor(out, dtype=torch.float64).reshape(batch, max_queries)


def make_batch(
    query_sizes: list[int], key_sizes: list[int], dim: int, generator: torch.Generator, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random padded queries and keys (garbage padding) where some keys are exact copies of queries, so that the
    maximum is sometimes 1."""
    queries = [torch.randn(m, dim, generator=generator) for m in query_sizes]
    keys = []
    for q, n in zip(queries, key_sizes, strict=True):
        k = torch.randn(n, dim, generator=generator) + 0.5
        copies = min(len(q), n // 2)
        k[:copies] = q[:copies] * 3.0
        keys.append(k)
    q, ql = padded([t.to(dtype) for t in queries])
    k, kl = padded([t.to(dtype) for t in keys])
    return q, ql, k, kl


def assert_spec_exact(rho: torch.Tensor, query_lengths: torch.Tensor, key_lengths: torch.Tensor) -> None:
    """Padded queries are exactly 0; the valid queries of an item without keys are exactly -inf; the rest is finite
    and within [-1, 1] up to rounding."""
    for b in range(rho.shape[0]):
        m, n = int(query_lengths[b]), int(key_lengths[b])
        assert torch.equal(rho[b, m:], torch.zeros_like(rho[b, m:])), f"item {b}: padded queries are not 0"
        valid = rho[b, :m]
        if n == 0:
            assert torch.equal(valid, torch.full_like(valid, -INF)), f"item {b}: no keys must give -inf"
        else:
            assert bool(torch.isfinite(valid).all()) and bool((valid.abs() <= 1 + 1e-6).all()), f"item {b}: {valid}"


# --- 0. the kernels exist ----------------------------------------------------------------------------------------


@pytest.mark.ext
def test_cpp_kernel_registered():
    """The compiled extension serves max_cosine on the CPU (so the kernel tests below are not vacuous)."""
    assert "cpp" in KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_reference_matches_brute_force(seed):
    """The float64 reference equals the brute force on tiny padded batches (M, N <= 8, D <= 5) with garbage padding
    and items without queries or without keys."""
    g = torch.Generator().manual_seed(seed)
    dim = int(torch.randint(1, 6, (1,), generator=g))
    query_sizes = torch.randint(0, 9, (4,), generator=g).tolist()
    key_sizes = torch.randint(0, 9, (4,), generator=g).tolist()
    key_sizes[seed % 4] = 0
    queries, ql, keys, kl = make_batch(query_sizes, key_sizes, dim, g, torch.float64)
    got = reference.max_cosine(queries, ql, keys, kl)
    assert got.dtype == torch.float64
    assert_close(got, brute_max_cosine(queries, ql, keys, kl), rtol=0, atol=1e-12)
    assert_spec_exact(got, ql, kl)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_exact_values(dtype):
    """Hand-checkable cosines: parallel 1, anti-parallel -1, orthogonal 0, zero vectors 0 (both as query and key)."""
    queries = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [0.0, 0.0], [-2.0, 0.0]]], dtype=dtype)
    keys = torch.tensor([[[4.0, 0.0], [0.0, 0.0]]], dtype=dtype)
    got = reference.max_cosine(queries, torch.tensor([4]), keys, torch.tensor([2]))
    want = brute_max_cosine(queries, torch.tensor([4]), keys, torch.tensor([2]))
    assert got.tolist() == want.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    got = reference.max_cosine(queries, torch.tensor([4]), keys[:, :1], torch.tensor([1]))
    assert got.tolist() == brute_max_cosine(queries, torch.tensor([4]), keys[:, :1], torch.tensor([1])).tolist()
    assert got.tolist() == [[1.0, 0.0, 0.0, -1.0]]


# --- 2. kernels vs reference -------------------------------------------------------------------------------------

SHAPES = [
    # (query sizes, key sizes, D): odd sizes, an item without queries, an item without keys, D = 1
    ([1], [1], 1),
    ([7, 0, 3], [3, 4, 0], 5),
    ([63, 65, 1], [17, 2, 9], 33),
    ([65, 12], [1, 40], 257),
    ([5, 9], [6, 3], 1),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(("query_sizes", "key_sizes", "dim"), SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_matches_reference(backend, dtype, query_sizes, key_sizes, dim):
    """float32/float16/bfloat16 padded batches (garbage padding, empty items, odd sizes): the kernel equals the
    float64 reference on the same rounded inputs, and hits 0 / -inf / float32 output exactly as specified."""
    g = torch.Generator().manual_seed(dim + len(query_sizes))
    queries, ql, keys, kl = make_batch(query_sizes, key_sizes, dim, g, dtype)
    got = run(OP, backend, queries, ql, keys, kl)
    assert got.dtype == torch.float32 and got.shape == queries.shape[:2] and got.device == queries.device
    assert_close(got, oracle(OP, queries, ql, keys, kl))
    assert_spec_exact(got, ql, kl)


@functools.cache
def llava15_tokens() -> torch.Tensor:
    return llava15_features(128, seed=1)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_llava15_features(backend, dtype):
    """576 synthetic LLaVA-1.5 tokens against 20 text-like keys, a few of them copies of visual tokens: the kernel
    equals the reference, and the copied tokens score 1."""
    queries = llava15_tokens().to(dtype)[None]
    copied = [0, 100, 575]
    keys = torch.cat([torch.randn(17, 128, generator=torch.Generator().manual_seed(9)).to(dtype), queries[0, copied]])
    ql, kl = torch.tensor([576]), torch.tensor([20])
    got = run(OP, backend, queries, ql, keys[None], kl)
    assert_close(got, oracle(OP, queries, ql, keys[None], kl))
    assert_close(got[0, copied], torch.ones(3))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(
    ("query_dtype", "key_dtype"), [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_kernel_mixed_dtypes(backend, query_dtype, key_dtype):
    """Queries and keys of different float dtypes: float32 output equal to the reference on the rounded inputs."""
    g = torch.Generator().manual_seed(4)
    queries, ql, keys, kl = make_batch([9, 4], [5, 7], 16, g)
    queries, keys = queries.to(query_dtype), keys.to(key_dtype)
    got = run(OP, backend, queries, ql, keys, kl)
    assert got.dtype == torch.float32
    assert_close(got, oracle(OP, queries, ql, keys, kl))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_ignores_padding_and_layout(backend):
    """Other garbage in the padding, int32 lengths and non-contiguous inputs give bitwise the same output."""
    g = torch.Generator().manual_seed(6)
    queries, ql, keys, kl = make_batch([11, 0, 6], [4, 8, 0], 12, g)
    want = run(OP, backend, queries, ql, keys, kl)
    other_q, other_k = queries.clone(), keys.clone()
    for b in range(3):
        other_q[b, int(ql[b]) :] = -7.0
        other_k[b, int(kl[b]) :] = torch.randn(other_k[b, int(kl[b]) :].shape, generator=g) * 1e3
    assert torch.equal(run(OP, backend, other_q, ql, other_k, kl), want)
    strided_q = queries.transpose(1, 2).contiguous().transpose(1, 2)
    strided_k = keys.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided_q.is_contiguous() and not strided_k.is_contiguous()
    assert torch.equal(run(OP, backend, strided_q, ql.int(), strided_k, kl.int()), want)


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_scale_invariance(impl):
    """Cosines ignore positive scale: scaling every row by a power of two (exact in binary) changes nothing."""
    g = torch.Generator().manual_seed(8)
    queries, ql, keys, kl = make_batch([10, 3], [6, 5], 9, g)
    call = reference.max_cosine if impl == "reference" else lambda *a: run(OP, impl, *a)
    scale_q = 2.0 ** torch.randint(-8, 9, (2, queries.shape[1], 1), generator=g)
    scale_k = 2.0 ** torch.randint(-8, 9, (2, keys.shape[1], 1), generator=g)
    assert torch.equal(call(queries * scale_q, ql, keys * scale_k, kl), call(queries, ql, keys, kl))


# --- 3. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_empty_queries_and_keys(impl):
    """Zero-length queries or keys: items without keys are -inf on their valid queries; empty dimensions (M = 0,
    N = 0, B = 0, D = 0) give correctly shaped outputs."""
    call = reference.max_cosine if impl == "reference" else lambda *a: run(OP, impl, *a)
    queries = torch.randn(3, 4, 5)
    keys = torch.randn(3, 2, 5)
    got = call(queries, torch.tensor([0, 4, 2]), keys, torch.tensor([2, 0, 0]))
    assert got.tolist() == [[0.0] * 4, [-INF] * 4, [-INF, -INF, 0.0, 0.0]]
    got = call(queries, torch.tensor([4, 1, 0]), keys[:, :0], torch.tensor([0, 0, 0]))
    assert got.tolist() == [[-INF] * 4, [-INF, 0.0, 0.0, 0.0], [0.0] * 4]
    assert call(queries[:, :0], torch.tensor([0, 0, 0]), keys, torch.tensor([2, 1, 0])).shape == (3, 0)
    no_lengths = torch.tensor([], dtype=torch.int64)
    assert call(queries[:0], no_lengths, keys[:0], no_lengths).shape == (0, 4)
    got = call(queries[:, :, :0], torch.tensor([4, 2, 0]), keys[:, :, :0], torch.tensor([2, 2, 2]))
    assert got.tolist() == [[0.0] * 4] * 3  # every vector is zero: cosine 0


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_zero_identical_and_opposite_vectors(impl, dtype):
    """A zero key has cosine exactly 0 (so it beats negative cosines), a zero query scores exactly 0, a query equal to
    a key (up to scale) scores 1 and one opposite to every key scores -1."""
    call = reference.max_cosine if impl == "reference" else lambda *a: run(OP, impl, *a)
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 3, 24, generator=g).to(dtype)
    queries = torch.cat([q, torch.zeros(1, 1, 24, dtype=dtype)], dim=1)  # [q0, q1, q2, 0]
    ql = torch.tensor([4])
    with_zero = torch.stack([-q[0, 0], torch.zeros(24, dtype=dtype)])[None]  # keys: -q0 and a zero vector
    got = call(queries, ql, with_zero, torch.tensor([2]))
    assert float(got[0, 0]) == 0.0 and float(got[0, 3]) == 0.0  # zero key beats cos -1; zero query
    opposite = call(queries, ql, with_zero, torch.tensor([1]))
    assert abs(float(opposite[0, 0]) + 1) <= 1e-6 and float(opposite[0, 3]) == 0.0
    identical = call(queries, ql, 4 * q[:, 1:2], torch.tensor([1]))
    assert abs(float(identical[0, 1]) - 1) <= 1e-6 and float(identical[0, 3]) == 0.0


# --- 4. batch equals per item ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_batch_equals_per_item(impl):
    """Each item of a padded batch gives bitwise the same values alone, padded or trimmed to its own lengths. The
    batched eager backend ("torch", one bmm over the padded batch) is held to float32 rounding instead: BLAS picks
    its kernel by shape, and on some CPUs (AMD EPYC, MKL) a trimmed item's products round differently."""
    call = reference.max_cosine if impl == "reference" else lambda *a: run(OP, impl, *a)
    same = torch.equal if impl != "torch" else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(13)
    queries, ql, keys, kl = make_batch([40, 0, 17, 1, 40], [9, 5, 0, 3, 30], 20, g)
    batch = call(queries, ql, keys, kl)
    for b in range(5):
        m, n = int(ql[b]), int(kl[b])
        alone = call(queries[b : b + 1], ql[b : b + 1], keys[b : b + 1], kl[b : b + 1])
        assert same(alone, batch[b : b + 1]), f"item {b} (padded)"
        trimmed = call(queries[b : b + 1, :m], ql[b : b + 1], keys[b : b + 1, :n], kl[b : b + 1])
        assert same(trimmed[0], batch[b, :m]), f"item {b} (trimmed)"


# --- 5. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    q, k = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    ql, kl = torch.tensor([5, 2]), torch.tensor([4, 0])
    nan_q, inf_k = q.clone(), k.clone()
    nan_q[1, 0, 1] = math.nan
    inf_k[0, 3, 2] = math.inf
    return {
        "queries_rank2": ((q[0], ql, k, kl), ValueError, "queries must be 3-D"),
        "keys_rank4": ((q, ql, k[None], kl), ValueError, "keys must be 3-D"),
        "int_queries": ((q.int(), ql, k, kl), TypeError, "queries must be float16/bfloat16/float32/float64"),
        "int_keys": ((q, ql, k.long(), kl), TypeError, "keys must be float16/bfloat16/float32/float64"),
        "keys_other_dim": ((q, ql, torch.randn(2, 4, 4), kl), ValueError, r"keys must be \[B=2, N, D=3\]"),
        "keys_other_batch": ((q, ql, torch.randn(3, 4, 3), kl), ValueError, r"keys must be \[B=2, N, D=3\]"),
        "query_length_above_M": ((q, torch.tensor([6, 2]), k, kl), ValueError, "query_lengths must lie in"),
        "query_length_negative": ((q, torch.tensor([-1, 2]), k, kl), ValueError, "query_lengths must lie in"),
        "key_length_above_N": ((q, ql, k, torch.tensor([4, 5])), ValueError, "key_lengths must lie in"),
        "float_query_lengths": ((q, ql.double(), k, kl), TypeError, "query_lengths must be int32 or int64"),
        "float_key_lengths": ((q, ql, k, kl.float()), TypeError, "key_lengths must be int32 or int64"),
        "query_lengths_shape": ((q, ql[:1], k, kl), ValueError, "query_lengths must have shape"),
        "key_lengths_shape": ((q, ql, k, kl[None]), ValueError, "key_lengths must have shape"),
        "nan_queries": ((nan_q, ql, k, kl), ValueError, "queries contains NaN or Inf"),
        "inf_keys": ((q, ql, inf_k, kl), ValueError, "keys contains NaN or Inf"),
        "keys_on_meta": ((q, ql, k.to("meta"), kl), ValueError, "keys is on meta"),
        "key_lengths_on_meta": ((q, ql, k, kl.to("meta")), ValueError, "key_lengths is on meta"),
        "query_lengths_on_meta": ((q, ql.to("meta"), k, kl), ValueError, "query_lengths is on meta"),
        "queries_on_meta": ((q.to("meta"), ql, k, kl), ValueError, "query_lengths is on cpu but .*meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    """Invalid arguments raise a clear ValueError/TypeError naming the op and the argument, whatever the backend."""
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.max_cosine: {fragment}"):
        mrprune.max_cosine(*args)


# --- 6. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) passes for the op."""
    g = torch.Generator().manual_seed(14)
    queries, ql, keys, kl = make_batch([7, 0, 3], [2, 3, 0], 8, g)
    for args in ((queries, ql, keys, kl), (queries.half(), ql, keys.bfloat16(), kl)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.max_cosine.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the op without graph breaks and returns the eager values bitwise."""

    def relevance(queries, ql, keys, kl):
        return mrprune.max_cosine(queries, ql, keys, kl)

    compiled = torch.compile(relevance, fullgraph=True)
    g = torch.Generator().manual_seed(15)
    for sizes in (([9, 0, 4], [3, 5, 0]), ([12, 6], [7, 2])):
        args = make_batch(*sizes, 8, g)
        with backends.use_backend(backend):
            assert torch.equal(compiled(*args), relevance(*args))
