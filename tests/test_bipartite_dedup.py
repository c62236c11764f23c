"""bipartite_dedup (VisPruner's even/odd similarity de-duplication): reference, kernels, ties, edges, errors, compile.

The reference (``mrprune.reference.bipartite_dedup``) is checked against a brute force written with Python lists and
``math``; every kernel is checked against the float64 reference. Every round sorts the even-position tokens by score,
and that order decides the next round's parity split, so index comparisons are exact only on inputs whose float64
rounds have no near-tied scores (checked by the test) or on exactly representable inputs (exact ties, stable order).
"""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import CUDA, INPUT_DTYPES, clustered, kernel_backends, padded, run, to_triton, triton_test

OP = "bipartite_dedup"
KERNELS = kernel_backends(OP)
# The CUDA C++ kernel (GPU only) is one more kernel: run() copies the inputs to the GPU and the picks back.
GPU_KERNELS = [*KERNELS, CUDA]
#: Smallest float64 gap between distinct scores of a round for which float32 kernels must give the same order.
GAP = 1e-6


def call(impl: str, features, lengths, k, per_round=8) -> torch.Tensor:
    if impl == "brute":
        return brute_batch(features, lengths, k, per_round)
    if impl == "reference":
        return reference.bipartite_dedup(features.double(), lengths, k, per_round)
    if impl == "cuda":
        return run(OP, "cuda", features, lengths, k, per_round)
    assert impl in backends.available(OP, features.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.bipartite_dedup(features, lengths, k, per_round)


# --- independent brute force --------------------------------------------------------------------------------------


def cosine(u: list[float], v: list[float]) -> float:
    nu = max(math.sqrt(math.fsum(c * c for c in u)), 1e-12)
    nv = max(math.sqrt(math.fsum(c * c for c in v)), 1e-12)
    return math.fsum((a / nu) * (b / nv) for a, b in zip(u, v, strict=True))


def brute_rounds(vectors: list[list[float]], k: int, per_round: int, trace: list | None = None) -> list[int]:
    """The rounds by the letter: A = even positions, B = odd; each A token's score is its largest cosine to B; drop
    the first r of A sorted by descending score (equal scores keep their position order); order := kept A (sorted),
    then B. ``trace`` collects each round's scores."""
    order = list(range(len(vectors)))
    if k == 0:
        return []
    while len(order) > k:
        a, b = order[0::2], order[1::2]
        r = min(per_round, len(order) - k, len(a))
        scores = [max(cosine(vectors[i], vectors[j]) for j in b) for i in a]
        if trace is not None:
            trace.append(scores)
        ranked = sorted(range(len(a)), key=lambda p: -scores[p])  # Python's sort is stable
        order = [a[p] for p in ranked[r:]] + b
    return order


def brute_batch(features, lengths, k, per_round=8) -> torch.Tensor:
    out = torch.full((len(lengths), k), -1, dtype=torch.int64)
    for b in range(len(lengths)):
        kept = brute_rounds(features[b, : int(lengths[b])].double().tolist(), k, per_round)
        out[b, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return out


def min_round_gap(vectors: torch.Tensor, k: int, per_round: int) -> float:
    """The smallest float64 gap between two scores within any round of the float64 rounds (0 for an exact tie)."""
    x = vectors.double()
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = u @ u.T
    order = torch.arange(len(x))
    gap = math.inf
    while k and order.numel() > k:
        a, b = order[0::2], order[1::2]
        r = min(per_round, order.numel() - k, a.numel())
        scores = s[a][:, b].max(dim=1).values
        ordered = scores.sort().values
        if ordered.numel() > 1:
            gap = min(gap, float((ordered[1:] - ordered[:-1]).min()))
        rank = torch.sort(scores, descending=True, stable=True).indices
        order = torch.cat([a[rank[r:]], b])
    return gap


def exact_family(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 4]`` tokens with exact cosines (scaled sign and axis vectors, zeros) from a small pool: many ties."""
    signs = torch.tensor([[1 if (i >> b) & 1 else -1 for b in range(4)] for i in range(16)], dtype=torch.float64)
    family = torch.cat(
        [signs, torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64), torch.zeros(1, 4)]
    )
    pool = family[torch.randint(0, len(family), (6,), generator=generator)]
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=generator).double()
    return pool[torch.randint(0, 6, (n,), generator=generator)] * scale


# --- 0. the kernels exist ----------------------------------------------------------------------------------------


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_reference_matches_brute_force_random(seed):
    """The float64 reference equals the brute force on tiny random padded batches, odd and even counts, several
    budgets and round sizes (r capped by per_round, by R - k and by |A|)."""
    g = torch.Generator().manual_seed(seed)
    tokens, dim = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    features = torch.randn(3, tokens, dim, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, tokens + 1, (3,), generator=g)
    lengths[0] = tokens
    for per_round in (1, 2, 8):
        for k in sorted({0, 1, 2, tokens // 3, tokens // 2, tokens}):
            got = reference.bipartite_dedup(features, lengths, k, per_round)
            assert torch.equal(got, brute_batch(features, lengths, k, per_round)), f"k={k} per_round={per_round}"


# three draws where Triton runs interpreted (seconds each), six elsewhere
EXACT_CASES = [(impl, seed) for impl in ["reference", *KERNELS] for seed in range(3 if impl == "triton" else 6)] + [
    pytest.param("cuda", seed, marks=CUDA.marks, id=f"cuda-{seed}") for seed in range(6)
]


@pytest.mark.parametrize(("impl", "seed"), EXACT_CASES)
def test_exact_ties_family(impl, seed):
    """Exactly representable tokens full of duplicates, zeros and ties: every implementation equals the brute force
    (the stable order of equal scores decides which tokens drop and the next parity split)."""
    g = torch.Generator().manual_seed(100 + seed)
    features, lengths = padded([exact_family(n, g) for n in (12, 0, 5, 23)])
    for k in (0, 1, 4, 9, 23):
        for per_round in (1, 3, 8):
            want = brute_batch(features, lengths, k, per_round)
            assert torch.equal(call(impl, features.float(), lengths, k, per_round), want), f"k={k} r={per_round}"


@pytest.mark.parametrize("impl", ["brute", "reference", *GPU_KERNELS])
def test_hand_example(impl):
    """Tokens [x, x, y, y', z, w] with y' ~ y: round 1 (k = 5, r = 1) splits A = {0, 2, 4}, B = {1, 3, 5}; token 0
    duplicates token 1 (score 1) and is dropped; survivors [4, 2] by descending score (z scores its cosine to w,
    above y's to y'), then B."""
    x, y, z = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    features = torch.tensor([[x, x, y, [0.0, 1.0, 0.3], z, [0.0, 0.1, 1.0]]])
    assert call(impl, features, torch.tensor([6]), 5, 1).tolist() == [[4, 2, 1, 3, 5]]


@triton_test
def test_triton_ranks_across_tiles():
    """16-position tiles over exactly tied inputs (up to 30 evens per round): scores, stable ranks and the new order
    are assembled across tiles exactly as the brute force orders them."""
    from mrprune.triton_kernels.bipartite_dedup import bipartite_dedup_triton

    g = torch.Generator().manual_seed(400)
    features, lengths = padded([exact_family(n, g) for n in (60, 37)])
    for k, per_round in ((7, 8), (20, 3)):
        want = brute_batch(features, lengths, k, per_round)
        got = bipartite_dedup_triton(to_triton(features.float()), to_triton(lengths), k, per_round, block=16)
        assert torch.equal(got.cpu(), want), f"k={k} per_round={per_round}"


# --- 2. kernels vs reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize(("tokens", "dim", "k"), [(40, 16, 10), (64, 32, 16), (33, 8, 5), (301, 24, 32)])
def test_kernel_matches_reference(backend, tokens, dim, k):
    """Random tokens whose rounds have no near-tied scores: the kernel reproduces the reference exactly."""
    g = torch.Generator().manual_seed(tokens * dim)
    for _ in range(20):  # the first draw whose rounds have clear gaps
        features = torch.randn(1, tokens, dim, generator=g)
        if min_round_gap(features[0], k, 8) >= GAP:
            break
    else:
        pytest.fail("no input without near-ties in 20 draws")
    lengths = torch.tensor([tokens])
    assert torch.equal(call(backend, features, lengths, k), call("reference", features, lengths, k))


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    """float32/float16/bfloat16 inputs: the kernel matches the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(7)
    features, lengths = padded([torch.randn(48, 24, generator=g), torch.randn(17, 24, generator=g)])
    features = features.to(dtype)
    for b, n in enumerate(lengths.tolist()):
        assert min_round_gap(features[b, :n], 12, 8) >= GAP, "test input near-tied"
    assert torch.equal(call(backend, features, lengths, 12), call("reference", features, lengths, 12))


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_kernel_clustered_is_a_valid_selection(backend):
    """Clustered tokens (realistic near-ties): a valid, duplicate-free selection of k tokens per item."""
    g = torch.Generator().manual_seed(9)
    features, lengths = padded([clustered(n, 16, generator=g) for n in (200, 57, 0)])
    got = call(backend, features, lengths, 40)
    for b, n in enumerate(lengths.tolist()):
        kept = got[b, : min(40, n)].tolist()
        assert len(set(kept)) == len(kept) and all(0 <= i < n for i in kept)
        assert got[b, min(40, n) :].tolist() == [-1] * (40 - min(40, n))


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("k", [0, 1, 7, 29])
def test_kernel_padded_batch(backend, k):
    """A padded batch with garbage padding and an empty item: the reference's result; other garbage, same result."""
    g = torch.Generator().manual_seed(k)
    features, lengths = padded([torch.randn(n, 12, generator=g) for n in (13, 0, 29, 7)])
    got = call(backend, features, lengths, k)
    assert torch.equal(got, call("reference", features, lengths, k))
    assert got[1].tolist() == [-1] * k
    garbage = features.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[b, n:] = torch.randn(garbage[b, n:].shape, generator=g) * 100
    assert torch.equal(call(backend, garbage, lengths, k), got)


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_int32_lengths_and_strided_features(backend):
    g = torch.Generator().manual_seed(3)
    features, lengths = padded([torch.randn(n, 10, generator=g) for n in (21, 9)])
    want = call(backend, features, lengths, 6)
    strided = features.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert torch.equal(call(backend, strided, lengths.int(), 6), want)


# --- 3. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["brute", "reference", *GPU_KERNELS])
def test_nothing_to_drop(impl):
    """k >= n_b keeps every token in input order; k = 0 gives an empty [B, 0] result; N = 1 keeps token 0."""
    features = torch.randn(3, 4, 3)
    lengths = torch.tensor([4, 1, 0])
    assert call(impl, features, lengths, 4).tolist() == [[0, 1, 2, 3], [0, -1, -1, -1], [-1] * 4]
    assert call(impl, features, lengths, 0).shape == (3, 0)


@pytest.mark.parametrize("impl", ["brute", "reference", *GPU_KERNELS])
def test_zero_vectors_and_duplicates(impl):
    """Duplicates score 1 and drop first; a zero vector scores 0 (cosines with it are 0)."""
    e1, e2, zero = [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]
    features = torch.tensor([[e1, e1, zero, e2, e2, e1]])
    # round 1 (k = 4, r = 2): A = {0, 2, 4} scores 1, 0, 1; B = {1, 3, 5}; drop 0 and 4 -> [2, 1, 3, 5]
    assert call(impl, features, torch.tensor([6]), 4, 8).tolist() == [[2, 1, 3, 5]]


@pytest.mark.parametrize("impl", ["reference", *GPU_KERNELS])
def test_identical_tokens(impl):
    """All tokens identical: every score ties at 1; the stable order drops the earliest even positions."""
    features = torch.ones(1, 10, 3)
    # round 1 (k = 3, r = min(8, 7, 5) = 5): A = {0,2,4,6,8} all dropped -> [1,3,5,7,9];
    # round 2 (r = min(8, 2, 3) = 2): A = {1,5,9}, drop 1, 5 -> [9, 3, 7]
    assert call(impl, features, torch.tensor([10]), 3).tolist() == [[9, 3, 7]]


@pytest.mark.parametrize("impl", ["reference", *GPU_KERNELS])
def test_batch_equals_per_item(impl):
    g = torch.Generator().manual_seed(5)
    features, lengths = padded([torch.randn(n, 20, generator=g) for n in (70, 0, 31, 1, 70)])
    batch = call(impl, features, lengths, 12)
    for b, n in enumerate(lengths.tolist()):
        alone = call(impl, features[b : b + 1], lengths[b : b + 1], 12)
        assert torch.equal(alone, batch[b : b + 1]), f"item {b}"
        kk = min(12, n)
        trimmed = call(impl, features[b : b + 1, :n], lengths[b : b + 1], kk)
        assert torch.equal(trimmed[0], batch[b, :kk]), f"item {b} (trimmed)"


# --- 4. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 5, 3)
    lengths = torch.tensor([5, 3])
    nan = x.clone()
    nan[0, 1, 0] = math.nan
    return {
        "rank2": ((x[0], lengths, 2), ValueError, "features must be 3-D"),
        "int_features": ((x.long(), lengths, 2), TypeError, "features must be float16"),
        "k_negative": ((x, lengths, -1), ValueError, "k must lie in"),
        "k_above_N": ((x, lengths, 6), ValueError, "k must lie in"),
        "k_bool": ((x, lengths, True), TypeError, "k must be an int"),
        "per_round_zero": ((x, lengths, 2, 0), ValueError, "per_round must be >= 1"),
        "per_round_float": ((x, lengths, 2, 2.5), TypeError, "per_round must be an int"),
        "length_above_N": ((x, torch.tensor([6, 3]), 2), ValueError, "lengths must lie in"),
        "float_lengths": ((x, lengths.float(), 2), TypeError, "lengths must be int32 or int64"),
        "nan": ((nan, lengths, 2), ValueError, "features contains NaN or Inf"),
        "lengths_on_meta": ((x, lengths.to("meta"), 2), ValueError, "lengths is on meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.bipartite_dedup: {fragment}"):
        ops.bipartite_dedup(*args)


# --- 5. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(1)
    features, lengths = padded([torch.randn(n, 8, generator=g) for n in (11, 0, 6)])
    for args in ((features, lengths, 4, 8), (features.half(), lengths, 11, 2)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.bipartite_dedup.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def dedup(features, lengths):
        return ops.bipartite_dedup(features, lengths, 5), ops.bipartite_dedup(features, lengths, 3, 2)

    compiled = torch.compile(dedup, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 5)):
        features, lengths = padded([torch.randn(n, 8, generator=g) for n in sizes])
        with backends.use_backend(backend):
            got, want = compiled(features, lengths), dedup(features, lengths)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"sizes {sizes}"
