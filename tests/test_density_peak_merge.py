"""density_peak_merge (SparseVLM v1's DPC-kNN cluster merge): reference, kernels, ties, edges, errors, compile."""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import INPUT_DTYPES, kernel_backends, padded

OP = "density_peak_merge"
KERNELS = kernel_backends(OP)


def call(impl: str, x, lengths, clusters, neighbors=None):
    if impl == "brute":
        return brute_batch(x, lengths, clusters, neighbors)
    if impl == "reference":
        return reference.density_peak_merge(x.double(), lengths, clusters, neighbors)
    assert impl in backends.available(OP, x.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.density_peak_merge(x, lengths, clusters, neighbors)


def brute_batch(x, lengths, clusters, neighbors=None):
    batch, tokens, dim = x.shape
    merged = torch.zeros(batch, clusters, dim, dtype=torch.float64)
    assignment = torch.full((batch, tokens), -1, dtype=torch.int64)
    centers = torch.full((batch, clusters), -1, dtype=torch.int64)
    for b in range(batch):
        n = int(lengths[b])
        c = min(clusters, n)
        if c == 0:
            continue
        v = x[b, :n].double().tolist()
        d = [
            [
                math.sqrt(math.fsum((p - q) ** 2 for p, q in zip(v[i], v[j], strict=True))) / math.sqrt(dim)
                for j in range(n)
            ]
            for i in range(n)
        ]
        m = max(1, min(clusters if neighbors is None else neighbors, n))
        rho = [math.exp(-math.fsum(t * t for t in sorted(d[i])[:m]) / m) for i in range(n)]
        dmax = max(max(row) for row in d)
        delta = []
        for i in range(n):
            higher = [d[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
            delta.append(min(higher) if higher else dmax)
        score = [rho[i] * delta[i] for i in range(n)]
        center = sorted(range(n), key=lambda i: (-score[i], i))[:c]
        slot = []
        for i in range(n):
            if i in center:
                slot.append(center.index(i))
            else:
                slot.append(min(range(c), key=lambda t: (d[i][center[t]], t)))
        for t in range(c):
            members = [i for i in range(n) if slot[i] == t]
            for e in range(dim):
                merged[b, t, e] = math.fsum(v[i][e] for i in members) / len(members)
        assignment[b, :n] = torch.tensor(slot)
        centers[b, :c] = torch.tensor(center)
    return merged, assignment, centers


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 12, (1,), generator=g))
    x = torch.randn(3, tokens, 3, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, tokens + 1, (3,), generator=g)
    lengths[0] = tokens
    for clusters in sorted({0, 1, 3, tokens}):
        for neighbors in (None, 2):
            got = reference.density_peak_merge(x, lengths, clusters, neighbors)
            want = brute_batch(x, lengths, clusters, neighbors)
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), f"clusters={clusters}"
            torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_two_blobs(impl):
    """Two tight, well separated blobs: two centres, one per blob, each blob merged into its mean."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(6, 4, generator=g) * 0.01, torch.randn(5, 4, generator=g) * 0.01 + 5])[None]
    merged, assignment, centers = call(impl, x, torch.tensor([11]), 2, 3)
    groups = assignment[0].tolist()
    assert len(set(groups[:6])) == 1 and len(set(groups[6:])) == 1 and groups[0] != groups[6]
    torch.testing.assert_close(merged[0, groups[0]].double(), x[0, :6].double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[0, groups[6]].double(), x[0, 6:].double().mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_duplicates_and_clusters_at_least_length(impl):
    """Duplicate tokens tie in density (the lower position counts as denser); clusters >= n: every token its own
    centre, merged == x."""
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 3.0]]])
    merged, assignment, centers = call(impl, x, torch.tensor([4]), 4)
    assert sorted(centers[0].tolist()) == [0, 1, 2, 3]
    assert torch.equal(merged[0, assignment[0]].to(x.dtype), x[0])


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("seed", range(4))
def test_exact_density_ties(impl, seed):
    """Tokens drawn with repetition from a few small-integer points: duplicates tie exactly in density (the lower
    position counts as denser) and in distance (the lower slot); every implementation equals the brute force."""
    g = torch.Generator().manual_seed(300 + seed)
    pool = torch.randint(-3, 4, (4, 3), generator=g).double()
    items = [pool[torch.randint(0, 4, (n,), generator=g)] for n in (12, 7, 1)]
    x, lengths = padded(items)
    for clusters, neighbors in ((3, None), (2, 4), (5, 2)):
        want = brute_batch(x, lengths, clusters, neighbors)
        got = call(impl, x.float(), lengths, clusters, neighbors)
        assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1]), f"clusters={clusters}"
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(7)
    x, lengths = padded([torch.randn(n, 16, generator=g) * 2 for n in (60, 0, 23)])
    x = x.to(dtype)
    for clusters, neighbors in ((7, None), (3, 5)):
        got = call(backend, x, lengths, clusters, neighbors)
        want = call("reference", x, lengths, clusters, neighbors)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(got[0].double(), want[0].to(dtype).double(), rtol=tol, atol=tol)


def _bad_cases():
    x = torch.randn(2, 6, 3)
    lengths = torch.tensor([6, 3])
    return {
        "rank2": ((x[0], lengths, 2), ValueError, "x must be 3-D"),
        "clusters_above_N": ((x, lengths, 7), ValueError, "clusters must lie in"),
        "clusters_float": ((x, lengths, 2.0), TypeError, "clusters must be an int"),
        "neighbors_zero": ((x, lengths, 2, 0), ValueError, "neighbors must be >= 1"),
        "lengths_above_N": ((x, torch.tensor([7, 1]), 2), ValueError, "lengths must lie in"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.density_peak_merge: {fragment}"):
        ops.density_peak_merge(*args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(1)
    x, lengths = padded([torch.randn(n, 4, generator=g) for n in (11, 0, 6)])
    for args in ((x, lengths, 3, None), (x.half(), lengths, 8, 2)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.density_peak_merge.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def merge(x, lengths):
        return ops.density_peak_merge(x, lengths, 3)

    compiled = torch.compile(merge, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 12)):
        x, lengths = padded([torch.randn(n, 4, generator=g) for n in sizes])
        with backends.use_backend(backend):
            got, want = compiled(x, lengths), merge(x, lengths)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"sizes {sizes}"
