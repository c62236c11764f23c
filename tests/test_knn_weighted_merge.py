"""knn_weighted_merge (PruMerge's k-nearest-neighbour weighted merge): reference, kernels, ties, edges, errors,
compile."""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import INPUT_DTYPES, kernel_backends, padded

OP = "knn_weighted_merge"
KERNELS = kernel_backends(OP)
GAP = 1e-5


def call(impl: str, x, metric, weights, lengths, kept, k=32):
    if impl == "brute":
        return brute_batch(x, metric, weights, lengths, kept, k)
    if impl == "reference":
        return reference.knn_weighted_merge(x.double(), metric.double(), weights.double(), lengths, kept, k)
    assert impl in backends.available(OP, x.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.knn_weighted_merge(x, metric, weights, lengths, kept, k)


def brute_batch(x, metric, weights, lengths, kept, k):
    """The official per-token loop: cosines of the kept token to every other token, top k, x_c + sum w_j x_j."""
    batch, _, dim = x.shape
    slots = kept.shape[1]
    merged = torch.zeros(batch, slots, dim, dtype=torch.float64)
    neighbors = torch.full((batch, slots, k), -1, dtype=torch.int64)
    for b in range(batch):
        n = int(lengths[b])
        units = []
        for v in metric[b, :n].double().tolist():
            norm = math.sqrt(math.fsum(c * c for c in v))
            units.append([c / max(norm, 1e-12) for c in v])
        for t in range(slots):
            c = int(kept[b, t])
            if c < 0:
                continue
            cos = {j: math.fsum(p * q for p, q in zip(units[c], units[j], strict=True)) for j in range(n) if j != c}
            near = sorted(cos, key=lambda j: (-cos[j], j))[:k]
            neighbors[b, t, : len(near)] = torch.tensor(near, dtype=torch.int64)
            for d in range(dim):
                merged[b, t, d] = float(x[b, c, d]) + math.fsum(float(weights[b, j]) * float(x[b, j, d]) for j in near)
    return merged, neighbors


def decided(metric, n, kept, k) -> bool:
    """Whether the float64 k-th / (k+1)-th neighbour cosines of every kept token are GAP apart."""
    u = metric[:n].double() / metric[:n].double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for c in kept.tolist():
        if c < 0 or n - 1 <= k:
            continue
        s = u @ u[c]
        s[c] = -math.inf
        top = s.topk(k + 1).values
        if float(top[k - 1] - top[k]) < GAP:
            return False
    return True


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 12, (1,), generator=g))
    x = torch.randn(3, tokens, 3, generator=g, dtype=torch.float64)
    metric = torch.randn(3, tokens, 4, generator=g, dtype=torch.float64)
    metric[:, ::4] = metric[:, :1].clone()  # duplicates: exact ties
    weights = torch.rand(3, tokens, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, tokens + 1, (3,), generator=g)
    kept = torch.stack([torch.randint(-1, int(n), (4,), generator=g) for n in lengths])
    for k in sorted({0, 1, 3, tokens}):
        got = reference.knn_weighted_merge(x, metric, weights, lengths, kept, k)
        want = brute_batch(x, metric, weights, lengths, kept, k)
        assert torch.equal(got[1], want[1]), f"k={k}"
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_hand_example(impl):
    """Kept token 0 (e1): its 2 nearest others are 1 (cos .99) and 3 (cos .7), not 2 (e2); 4 duplicates 0 but the
    kept token itself never counts, its duplicate does (cos 1, first)."""
    metric = torch.tensor([[[1.0, 0], [1, 0.1], [0, 1], [1, 1], [2, 0]]])
    x = torch.tensor([[[1.0], [10.0], [100.0], [1000.0], [10000.0]]])
    w = torch.tensor([[0.5, 0.25, 0.5, 0.125, 0.5]])
    merged, neighbors = call(impl, x, metric, w, torch.tensor([5]), torch.tensor([[0, -1]]), 3)
    assert neighbors.tolist() == [[[4, 1, 3], [-1, -1, -1]]]
    assert merged[0, :, 0].tolist() == [1 + 5000 + 2.5 + 125, 0.0]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(("tokens", "dim", "k"), [(40, 8, 5), (576, 16, 32)])
def test_kernel_matches_reference(backend, tokens, dim, k):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, 24, generator=g)
    metric = torch.randn(2, tokens, dim, generator=g)
    w = torch.rand(2, tokens, generator=g)
    lengths = torch.tensor([tokens, tokens - 9])
    kept = torch.stack([torch.randperm(int(n), generator=g)[:12] for n in lengths])
    kept[1, -2:] = -1
    got = call(backend, x, metric, w, lengths, kept, k)
    want = call("reference", x, metric, w, lengths, kept, k)
    checked = 0
    for b in range(2):
        n = int(lengths[b])
        u = metric[b, :n].double() / metric[b, :n].double().norm(dim=-1, keepdim=True)
        for t, c in enumerate(kept[b].tolist()):
            if c >= 0 and not decided(metric[b], n, kept[b, t : t + 1], k):
                # a near tie at the k-th neighbour: the kernel's picks must still be near-maximisers
                s = u @ u[c]
                s[c] = -math.inf
                kth = float(s.topk(k).values[-1])
                assert all(float(s[j]) >= kth - GAP for j in got[1][b, t].tolist()), f"item {b} slot {t}"
                continue
            checked += 1
            assert torch.equal(got[1][b, t], want[1][b, t]), f"item {b} slot {t}"
            torch.testing.assert_close(got[0][b, t].double(), want[0][b, t], rtol=1e-5, atol=1e-5)
    assert checked >= 18  # nearly all rows are decided


@pytest.mark.ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpp_many_scattered_kept_tokens(dtype):
    """40 kept tokens at scattered positions, D = 64: the C++ kernel reads the kept rows in place through an index,
    whole 32-row blocks included (the bfloat16 AMX path loads such blocks as tiles from contiguous rows only)."""
    g = torch.Generator().manual_seed(11)
    tokens, k = 300, 4
    metric = torch.randn(1, tokens, 64, generator=g).to(dtype)
    x = torch.randn(1, tokens, 8, generator=g)
    w = torch.rand(1, tokens, generator=g)
    kept = torch.randperm(tokens, generator=g)[:40][None]
    got = call("cpp", x, metric, w, torch.tensor([tokens]), kept, k)
    want = call("reference", x, metric.float(), w, torch.tensor([tokens]), kept, k)
    rows = [t for t in range(40) if decided(metric[0].float(), tokens, kept[0, t : t + 1], k)]
    assert len(rows) >= 30
    for t in rows:
        assert torch.equal(got[1][0, t], want[1][0, t]), f"slot {t}"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 50, 16, generator=g).to(dtype)
    metric = torch.randn(1, 50, 8, generator=g).to(dtype)
    w = torch.rand(1, 50, generator=g).to(dtype)
    kept = torch.tensor([[3, 17, 40]])
    assert decided(metric[0], 50, kept[0], 6)
    got = call(backend, x, metric, w, torch.tensor([50]), kept, 6)
    want = call("reference", x, metric, w, torch.tensor([50]), kept, 6)
    assert got[0].dtype == dtype and torch.equal(got[1], want[1])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got[0].double(), want[0].to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_k_at_least_length_and_single_token(impl):
    """k >= n_b - 1: every other token is a neighbour; a single-token item keeps its token unchanged."""
    g = torch.Generator().manual_seed(4)
    x, lengths = padded([torch.randn(n, 3, generator=g) for n in (4, 1)])
    metric, _ = padded([torch.randn(n, 2, generator=g) for n in (4, 1)])
    w = torch.rand(x.shape[:2], generator=g)
    merged, neighbors = call(impl, x, metric, w, lengths, torch.tensor([[2], [0]]), 4)
    assert sorted(neighbors[0, 0, :3].tolist()) == [0, 1, 3] and neighbors[0, 0, 3] == -1
    assert neighbors[1, 0].tolist() == [-1] * 4 and torch.equal(merged[1, 0].to(x.dtype), x[1, 0])
    expect = x[0, 2].double() + (w[0, [0, 1, 3], None].double() * x[0, [0, 1, 3]].double()).sum(0)
    torch.testing.assert_close(merged[0, 0].double(), expect)
    merged, neighbors = call(impl, x, metric, w, lengths, torch.tensor([[2], [0]]), 0)
    assert neighbors.shape == (2, 1, 0) and torch.equal(merged[:, 0].to(x.dtype), x[[0, 1], [2, 0]])


def _bad_cases():
    x = torch.randn(2, 6, 3)
    m = torch.randn(2, 6, 4)
    w = torch.rand(2, 6)
    lengths = torch.tensor([6, 3])
    kept = torch.tensor([[0, 3], [1, -1]])
    return {
        "weights_missing": ((x, m, None, lengths, kept), TypeError, "weights must be a Tensor"),
        "weights_shape": ((x, m, w[:, :5], lengths, kept), ValueError, "weights must have shape"),
        "kept_past_length": ((x, m, w, lengths, torch.tensor([[0, 3], [4, -1]])), ValueError, "kept must be -1"),
        "k_above_N": ((x, m, w, lengths, kept, 7), ValueError, "k must lie in"),
        "k_float": ((x, m, w, lengths, kept, 2.0), TypeError, "k must be an int"),
        "metric_dim": ((x, m[..., 0], w, lengths, kept), ValueError, "metric must be 3-D"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.knn_weighted_merge: {fragment}"):
        ops.knn_weighted_merge(*args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(1)
    x, lengths = padded([torch.randn(n, 4, generator=g) for n in (11, 1, 6)])
    metric, _ = padded([torch.randn(n, 3, generator=g) for n in (11, 1, 6)])
    w = torch.rand(x.shape[:2], generator=g)
    kept = torch.tensor([[0, 5, 9], [0, -1, -1], [5, 1, -1]])
    for args in ((x, metric, w, lengths, kept, 4), (x.half(), metric.half(), w.half(), lengths, kept, 11)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.knn_weighted_merge.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def merge(x, metric, w, lengths, kept):
        return ops.knn_weighted_merge(x, metric, w, lengths, kept, 3)

    compiled = torch.compile(merge, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 5, 9), (23, 12)):
        x, lengths = padded([torch.randn(n, 4, generator=g) for n in sizes])
        metric, _ = padded([torch.randn(n, 3, generator=g) for n in sizes])
        w = torch.rand(x.shape[:2], generator=g)
        kept = torch.stack([torch.arange(4) % int(n) for n in lengths])
        with backends.use_backend(backend):
            got, want = compiled(x, metric, w, lengths, kept), merge(x, metric, w, lengths, kept)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"sizes {sizes}"
