"""diversity_select (DivPrune's greedy max-min cosine-distance selection): reference, kernels, edges, errors, compile.

The reference (``mrprune.reference.diversity_select``) is checked against an independent brute force written with
Python loops and ``math``; every kernel is checked against the float64 reference. Index comparisons are exact only
where the float64 greedy has a clear gap between the winner and the runner-up (or an exact structural tie, which the
spec resolves to the lower index); beyond that, every kernel pick must still be a near-maximiser of the float64 greedy
criterion given the kernel's own earlier picks.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import mrprune
from mrprune import backends, reference
from mrprune.testing import llava_next_features
from tests.diversity_oracle import GAP, check_against_oracle, distance64
from tests.utils import CUDA, INPUT_DTYPES, clustered, device_of, kernel_backends, padded, run

OP = "diversity_select"
CPU_KERNELS = kernel_backends(OP)
# The CUDA C++ kernel (GPU only) is one more kernel: run() copies the inputs to the GPU and the picks back.
KERNELS = [*CPU_KERNELS, CUDA]
INF = math.inf


# --- independent brute force --------------------------------------------------------------------------------------


def brute_distance(vectors: list[list[float]]) -> list[list[float]]:
    """d_ij = 1 - cos(x_i, x_j) with x / max(||x||, 1e-12), by explicit loops (exactly symmetric)."""
    units = []
    for v in vectors:
        norm = math.sqrt(math.fsum(c * c for c in v))
        units.append([c / max(norm, 1e-12) for c in v])
    n = len(units)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            dot = 0.0
            for a, b in zip(units[i], units[j], strict=True):
                dot += a * b
            d[i][j] = 1.0 - dot
    return d


def first_argmax(scores: list[float], candidates: list[int]) -> int:
    best = -1
    for i in candidates:
        if best < 0 or scores[i] > scores[best]:
            best = i
    return best


def brute_select(vectors: list[list[float]], k: int, mask_picked: bool) -> list[int]:
    """DivPrune by the letter of the spec: the first pick maximises the second-smallest d[:, j], later picks maximise
    min_{s in S} d_sj (ties to the lower index); picked tokens are candidates again unless ``mask_picked``."""
    n = len(vectors)
    out = [-1] * k
    if n == 0 or k == 0:
        return out
    d = brute_distance(vectors)
    first = []
    for j in range(n):
        column = sorted(d[i][j] for i in range(n))
        first.append(column[1] if n > 1 else column[0])
    j = first_argmax(first, list(range(n)))
    nearest = [INF] * n
    picked: list[int] = []
    for t in range(min(k, n)):
        out[t] = j
        picked.append(j)
        for i in range(n):
            nearest[i] = min(nearest[i], d[j][i])
        candidates = [i for i in range(n) if not (mask_picked and i in picked)]
        if candidates:
            j = first_argmax(nearest, candidates)
    return out


def brute_batch(features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool) -> torch.Tensor:
    rows = [brute_select(features[b, : int(lengths[b])].double().tolist(), k, mask_picked) for b in range(len(lengths))]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(lengths), k)


@functools.cache
def llava_next_case(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic LLaVA-NeXT tokens ``[1, 576 + rows * (cols + 1), 256]`` and their float64 distance matrix."""
    features = llava_next_features(rows, cols, 256, seed=0)[None]
    return features, distance64(features[0])


def exact_family(n: int, generator: torch.Generator, pool_size: int = 5) -> torch.Tensor:
    """``[n, 4]`` tokens whose unit vectors and cosines are exact in binary floating point (scaled sign vectors,
    scaled axis vectors, zeros), drawn with replacement from a small pool: duplicates and exact ties everywhere."""
    signs = torch.tensor([[1 if (i >> b) & 1 else -1 for b in range(4)] for i in range(16)], dtype=torch.float64)
    axes = torch.cat([torch.eye(4), -torch.eye(4)]).double()
    family = torch.cat([signs, axes, torch.zeros(1, 4, dtype=torch.float64)])
    pool = family[torch.randint(0, len(family), (pool_size,), generator=generator)]
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=generator).double()
    return pool[torch.randint(0, pool_size, (n,), generator=generator)] * scale


def with_garbage(features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy with different random garbage in every padded row."""
    out = features.clone()
    for b, n in enumerate(lengths.tolist()):
        out[b, n:] = (torch.randn(out[b, n:].shape, generator=generator) * 100).to(out.dtype)
    return out


# --- 0. the kernels exist ----------------------------------------------------------------------------------------


@pytest.mark.ext
def test_cpp_kernel_registered():
    """The compiled extension serves diversity_select on the CPU (so the kernel tests below are not vacuous)."""
    assert "cpp" in CPU_KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_reference_matches_brute_force_random(seed, mask_picked):
    """The float64 reference equals the loop-and-math brute force on tiny random padded batches (n <= 8, D <= 5)."""
    g = torch.Generator().manual_seed(seed)
    batch, tokens, dim = 3, int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    features = torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, tokens + 1, (batch,), generator=g)
    lengths[0] = tokens
    features = with_garbage(features, lengths, g)
    for k in sorted({0, 1, tokens // 2, tokens}):
        got = reference.diversity_select(features, lengths, k, mask_picked)
        assert torch.equal(got, brute_batch(features, lengths, k, mask_picked)), f"k={k}"


@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_reference_matches_brute_force_exact_ties(seed, mask_picked):
    """On exactly representable tokens full of duplicates, zeros and ties, the reference (float64 and float32) equals
    the brute force pick for pick: ties to the lower index, re-picks without the mask."""
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    features = exact_family(n, g)[None]
    lengths = torch.tensor([n])
    for k in range(n + 1):
        want = brute_batch(features, lengths, k, mask_picked)
        for dtype in (torch.float64, torch.float32):
            got = reference.diversity_select(features.to(dtype), lengths, k, mask_picked)
            assert torch.equal(got, want), f"{dtype} k={k}: {got.tolist()} != {want.tolist()}"


IMPLEMENTATIONS = ["brute", "reference", *KERNELS]


def select_with(impl: str, features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool) -> torch.Tensor:
    if impl == "brute":
        return brute_batch(features, lengths, k, mask_picked)
    if impl == "reference":
        return reference.diversity_select(features.double(), lengths, k, mask_picked)
    return run(OP, impl, features.float(), lengths, k, mask_picked)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_unmasked_mode_repicks_a_duplicate(impl):
    """Tokens [e1, e1, e2]: e2 (index 2) is the most isolated, then e1 at index 0 (tie with index 1, lower index);
    then every min-distance is exactly 0, so the mask picks index 1 while the official (unmasked) rule re-picks 0."""
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    lengths = torch.tensor([3])
    assert select_with(impl, features, lengths, 3, True).tolist() == [[2, 0, 1]]
    assert select_with(impl, features, lengths, 3, False).tolist() == [[2, 0, 0]]


# float64 inputs always run on the reference, so the kernels are checked in float32 only
TWO_TOKEN_CASES = [
    ("reference", torch.float64),
    ("reference", torch.float32),
    *((b, torch.float32) for b in CPU_KERNELS),
    pytest.param("cuda", torch.float32, marks=CUDA.marks, id="cuda-float32"),
]


@pytest.mark.parametrize(("impl", "dtype"), TWO_TOKEN_CASES)
@pytest.mark.parametrize("dim", [3, 9, 16, 33])
def test_two_tokens_first_pick_is_index_zero(impl, dtype, dim):
    """With two tokens both columns' second-smallest distance is d_01 = d_10, an exact tie: the first pick must be 0.
    (A distance matrix that is not exactly symmetric breaks this tie by rounding.)"""
    bad = []
    for seed in range(20):
        x = torch.randn(1, 2, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        got = (reference.diversity_select if impl == "reference" else lambda *a: run(OP, impl, *a))(
            x, torch.tensor([2]), 2, True
        )
        if got.tolist() != [[0, 1]]:
            bad.append((seed, got.tolist()))
    assert not bad, f"first pick of a tied pair went to index 1 (seed, picks): {bad}"


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_isolated_mutual_pair_first_pick_is_lower_index(impl):
    """Two tokens that are each other's nearest neighbour (cos 0.9), both far from a tight cluster, are the most
    isolated and tie exactly at step 0: the lower index of the pair must be picked first."""
    bad = []
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        dim, n = 16, 40
        centre = torch.randn(dim, generator=g)
        x = centre + 0.01 * torch.randn(n, dim, generator=g)  # tight cluster
        u, w = torch.linalg.qr(torch.randn(dim, 3, generator=g))[0].T[1:]  # two unit directions
        u, w = u - (u @ centre) * centre / centre.dot(centre), w - (w @ centre) * centre / centre.dot(centre)
        u, w = u / u.norm(), w / w.norm()
        w = w - (w @ u) * u
        w = w / w.norm()
        a, b = sorted(torch.randperm(n, generator=g)[:2].tolist())
        x[a], x[b] = 3 * u, 2 * (0.9 * u + math.sqrt(0.19) * w)
        scores = distance64(x).sort(dim=0).values[1]
        assert scores.topk(2).indices.sort().values.tolist() == [a, b] and scores[a] == scores[b]  # the construction
        x = x[None]
        if impl == "reference":
            got = reference.diversity_select(x.double(), torch.tensor([n]), 1)
        else:
            got = run(OP, impl, x, torch.tensor([n]), 1)
        if int(got[0, 0]) != a:
            bad.append((seed, (a, b), int(got[0, 0])))
    assert not bad, f"(seed, pair, first pick) where the tied pair was not resolved to its lower index: {bad}"


# --- 2. kernels vs reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_kernel_exact_ties_family(backend, seed, mask_picked):
    """On exactly representable tokens (every distance in {0, .5, 1, 1.5, 2}) the kernel equals the brute force pick
    for pick: exact tie-breaking to the lower index, zero vectors at distance 1, re-picks without the mask."""
    g = torch.Generator().manual_seed(200 + seed)
    items = [exact_family(n, g).float() for n in (8, 0, 5, 13)]
    features, lengths = padded(items)
    for k in (0, 1, 5, 13):
        want = brute_batch(features, lengths, k, mask_picked)
        assert torch.equal(run(OP, backend, features, lengths, k, mask_picked), want), f"k={k}"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize(("tokens", "dim"), [(40, 16), (64, 32), (33, 8), (129, 20), (300, 64)])
def test_kernel_matches_reference_clustered(backend, tokens, dim, mask_picked):
    """Clustered tokens with clear score gaps: the kernel reproduces every reference pick, the first one included."""
    g = torch.Generator().manual_seed(tokens * dim)
    features = clustered(tokens, dim, generator=g)[None]
    lengths = torch.tensor([tokens])
    got = check_against_oracle(backend, features, lengths, tokens, mask_picked, min_prefix=min(tokens // 2, 20))
    scores = distance64(features[0]).sort(dim=0).values[1]
    assert int(got[0, 0]) == int(scores.argmax()), "the first pick is not the most isolated token"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mask_picked", [True, False])
def test_kernel_llava_next_features(backend, mask_picked):
    """Synthetic LLaVA-NeXT tokens (12x12 grid, identical newline tokens): the kernel follows the reference; the first
    newline picked is the lowest-index one (an exact tie); the rest wait until every distinct token is picked (mask)
    or the distinct tokens come first without repeats (unmasked)."""
    rows = cols = 12
    features, d = llava_next_case(rows, cols)
    tokens = features.shape[1]
    newlines = [576 + r * (cols + 1) + cols for r in range(rows)]
    distinct = tokens - (rows - 1)
    lengths = torch.tensor([tokens])
    full = check_against_oracle(backend, features, lengths, tokens, mask_picked, min_prefix=40, distances=[d])
    for k in (1, 5, 73):  # the greedy is prefix-closed: a smaller budget gives the first k picks
        assert torch.equal(run(OP, backend, features, lengths, k, mask_picked), full[:, :k]), f"k={k}"
    got = full[0].tolist()
    head = got[:distinct]
    assert len(set(head)) == distinct, "a distinct token was skipped or repeated before the newlines were exhausted"
    assert [i for i in head if i in newlines] == [newlines[0]], "expected exactly the first newline among them"
    if mask_picked:
        assert sorted(got[distinct:]) == newlines[1:]
    else:
        assert set(got) <= set(range(tokens))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("mask_picked", [True, False])
def test_kernel_input_dtypes(backend, dtype, mask_picked):
    """float32/float16/bfloat16 inputs: the kernel matches the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(7)
    features, lengths = padded([clustered(48, 24, generator=g), clustered(17, 24, generator=g)])
    features = features.to(dtype)
    check_against_oracle(backend, features, lengths, 20, mask_picked, min_prefix=10)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(
    ("tokens", "dim"), [(1, 1), (2, 3), (3, 2), (7, 1), (63, 7), (65, 33), (127, 5), (128, 4), (129, 9), (257, 5)]
)
def test_kernel_odd_sizes(backend, tokens, dim):
    """Odd token counts and dimensions (incl. D = 1, where every distance is 0 or 2, and N = 257, past one GEMM row
    block): the kernel's picks are valid, gap-decided picks match, every pick is a near-maximiser."""
    g = torch.Generator().manual_seed(tokens + 1000 * dim)
    features = clustered(tokens, dim, generator=g)[None]
    min_prefix = 0 if dim == 1 else 3
    for mask_picked in (True, False):
        check_against_oracle(backend, features, torch.tensor([tokens]), tokens, mask_picked, min_prefix=min_prefix)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("k", [0, 1, 5, 13, 29])
def test_kernel_padded_batch(backend, k, mask_picked):
    """A padded batch with garbage padding and an empty item, k in {0, 1, 5, n_0, N}: matches the reference, and
    other garbage in the padding gives bitwise the same picks."""
    g = torch.Generator().manual_seed(k)
    features, lengths = padded([clustered(n, 12, generator=g) for n in (13, 0, 29, 7)])
    got = check_against_oracle(backend, features, lengths, k, mask_picked, min_prefix=5)
    assert got[1].tolist() == [-1] * k
    assert torch.equal(run(OP, backend, with_garbage(features, lengths, g), lengths, k, mask_picked), got)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_int32_lengths_and_strided_features(backend):
    """int32 lengths and non-contiguous features give bitwise the same picks as int64 lengths and contiguous ones."""
    g = torch.Generator().manual_seed(3)
    features, lengths = padded([clustered(n, 10, generator=g) for n in (21, 9)])
    want = run(OP, backend, features, lengths, 9)
    strided = features.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert torch.equal(run(OP, backend, strided, lengths.int(), 9), want)


# --- 3. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask_picked", [True, False])
def test_single_token(impl, mask_picked):
    """N = 1: k = 1 picks token 0, k = 0 gives an empty [B, 0] result."""
    features = torch.randn(2, 1, 3)
    lengths = torch.tensor([1, 0])
    assert select_with(impl, features, lengths, 1, mask_picked).tolist() == [[0], [-1]]
    assert select_with(impl, features, lengths, 0, mask_picked).shape == (2, 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_all_tokens_identical_exact(impl):
    """Identical tokens with exact unit vectors: every distance is exactly 0, so the mask gives 0, 1, ..., n-1 (ties
    to the lower index) and the unmasked rule re-picks token 0 every time."""
    n = 6
    features = torch.tensor([[2.0, -2.0, 2.0, 2.0]]).expand(n, 4)[None]
    lengths = torch.tensor([n])
    assert select_with(impl, features, lengths, n, True).tolist() == [list(range(n))]
    assert select_with(impl, features, lengths, n, False).tolist() == [[0] * n]


@pytest.mark.parametrize("backend", KERNELS)
def test_all_tokens_identical_generic(backend):
    """Identical generic tokens (rounding noise only): the mask still returns every token exactly once."""
    n = 50
    features = torch.randn(1, 1, 37).expand(1, n, 37).contiguous()
    got = run(OP, backend, features, torch.tensor([n]), n)
    assert sorted(got[0].tolist()) == list(range(n))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_zero_vectors(impl):
    """A zero vector normalises to 0, at distance 1 from everything (itself included). For [e1, 2*e1, 0]: the zero
    vector is the most isolated (pick 2), then 0 (tie with 1, lower index), then 1 with the mask; unmasked, the zero
    vector's self-distance 1 beats the exact 0s, so it is re-picked. An all-zero item is one big tie."""
    features = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0]] * 3])
    lengths = torch.tensor([3, 3])
    assert select_with(impl, features, lengths, 3, True).tolist() == [[2, 0, 1], [0, 1, 2]]
    assert select_with(impl, features, lengths, 3, False).tolist() == [[2, 0, 2], [0, 0, 0]]


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("mask_picked", [True, False])
def test_budget_at_least_length(impl, mask_picked):
    """k >= n_b: the mask returns every valid token exactly once then -1; unmasked, n_b picks (valid indices) then
    -1."""
    g = torch.Generator().manual_seed(11)
    features, lengths = padded([clustered(n, 6, generator=g) for n in (9, 4, 1, 0)])
    got = select_with(impl, features, lengths, 9, mask_picked)
    for b, n in enumerate(lengths.tolist()):
        row = got[b].tolist()
        assert row[n:] == [-1] * (9 - n)
        if mask_picked:
            assert sorted(row[:n]) == list(range(n))
        else:
            assert all(0 <= i < n for i in row[:n])


# --- 4. batch equals per item ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("mask_picked", [True, False])
def test_batch_equals_per_item(impl, mask_picked):
    """Each item of a padded batch gives bitwise the same picks alone, padded or trimmed to its own length."""
    g = torch.Generator().manual_seed(5)
    features, lengths = padded([clustered(n, 20, generator=g) for n in (70, 0, 31, 1, 70)])
    k = 12
    batch = select_with(impl, features, lengths, k, mask_picked)
    for b, n in enumerate(lengths.tolist()):
        alone = select_with(impl, features[b : b + 1], lengths[b : b + 1], k, mask_picked)
        assert torch.equal(alone, batch[b : b + 1]), f"item {b} (padded)"
        trimmed = select_with(impl, features[b : b + 1, :n], lengths[b : b + 1], min(k, n), mask_picked)
        assert torch.equal(trimmed[0], batch[b, : min(k, n)]), f"item {b} (trimmed)"


# --- 5. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 5, 3)
    lengths = torch.tensor([5, 3])
    nan, inf = x.clone(), x.clone()
    nan[0, 1, 0] = math.nan
    inf[1, 2, 2] = -math.inf
    return {
        "rank2": ((x[0], lengths, 2), ValueError, "features must be 3-D"),
        "rank4": ((x[None], lengths, 2), ValueError, "features must be 3-D"),
        "int_features": ((x.long(), lengths, 2), TypeError, "features must be float16/bfloat16/float32/float64"),
        "bool_features": ((x > 0, lengths, 2), TypeError, "features must be float16"),
        "k_negative": ((x, lengths, -1), ValueError, "k must lie in"),
        "k_above_N": ((x, lengths, 6), ValueError, "k must lie in"),
        "length_above_N": ((x, torch.tensor([6, 3]), 2), ValueError, "lengths must lie in"),
        "length_negative": ((x, torch.tensor([5, -1]), 2), ValueError, "lengths must lie in"),
        "float_lengths": ((x, lengths.float(), 2), TypeError, "lengths must be int32 or int64"),
        "lengths_too_short": ((x, lengths[:1], 2), ValueError, "lengths must have shape"),
        "lengths_2d": ((x, lengths[None], 2), ValueError, "lengths must have shape"),
        "nan": ((nan, lengths, 2), ValueError, "features contains NaN or Inf"),
        "inf": ((inf, lengths, 2), ValueError, "features contains NaN or Inf"),
        "lengths_on_meta": ((x, lengths.to("meta"), 2), ValueError, "lengths is on meta"),
        "features_on_meta": ((x.to("meta"), lengths, 2), ValueError, "lengths is on cpu but .*meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *CPU_KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    """Invalid arguments raise a clear ValueError/TypeError naming the op and the argument, whatever the backend."""
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.diversity_select: {fragment}"):
        mrprune.diversity_select(*args)


# --- 6. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("mask_picked", [True, False])
def test_opcheck(backend, mask_picked):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) passes for the op."""
    g = torch.Generator().manual_seed(1)
    features, lengths = padded([clustered(n, 8, generator=g) for n in (11, 0, 6)])
    features, lengths = features.to(device_of(backend)), lengths.to(device_of(backend))
    for args in ((features, lengths, 4, mask_picked), (features.half(), lengths, 11, mask_picked)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.diversity_select.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True, dynamic=True) traces the op in both modes without graph breaks and returns the
    eager picks, for two batch shapes served by the same symbolic-shape graph."""

    def select(features, lengths):
        return (
            mrprune.diversity_select(features, lengths, 5),
            mrprune.diversity_select(features, lengths, 5, mask_picked=False),
        )

    torch._dynamo.reset()
    compiled = torch.compile(select, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 5)):
        features, lengths = padded([clustered(n, 8, generator=g) for n in sizes])
        features, lengths = features.to(device_of(backend)), lengths.to(device_of(backend))
        with backends.use_backend(backend):
            got, want = compiled(features, lengths), select(features, lengths)
        for mode in range(2):
            assert torch.equal(got[mode], want[mode]), f"sizes {sizes}, mask_picked={mode == 0}"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dim", [16, 19])
def test_kernel_result_independent_of_address(backend, dim):
    """The same item at different float offsets (16-byte aligned or not) gives bitwise the same picks."""
    n = 150
    x = clustered(n, dim, generator=torch.Generator().manual_seed(11))
    device = device_of(backend)
    results = []
    for offset in range(4):
        buffer = torch.zeros(n * dim + 4, device=device)
        item = buffer[offset : offset + n * dim].view(1, n, dim)
        item.copy_(x.to(device))
        with backends.use_backend(backend):
            results.append(mrprune.diversity_select(item, torch.tensor([n], device=device), 60).cpu())
    for offset, got in enumerate(results[1:], start=1):
        assert torch.equal(got, results[0]), offset


# --- 7. the CUDA kernel's own contract (GPU only) ----------------------------------------------------------------

cuda_only = pytest.mark.parametrize("backend", [CUDA])


@cuda_only
def test_cuda_auto_backend_is_the_cuda_kernel(backend):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mrprune::_diversity_select_cuda", "CUDA")
    assert backends.available(OP, "cuda")[0] == "cuda"


@cuda_only
def test_cuda_runs_on_the_current_stream(backend):
    g = torch.Generator().manual_seed(9)
    features, lengths = padded([clustered(n, 16, generator=g) for n in (400, 17, 0)])
    want = run(OP, backend, features, lengths, 50)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), backends.use_backend(backend):
        got = mrprune.diversity_select(features.cuda(), lengths.cuda(), 50)
    stream.synchronize()
    assert torch.equal(got.cpu(), want)


@cuda_only
def test_cuda_private_op_rejects_bad_arguments(backend):
    features, lengths = torch.randn(2, 10, 4, device="cuda"), torch.tensor([10, 3], device="cuda")
    op = torch.ops.mrprune._diversity_select_cuda
    with pytest.raises(RuntimeError, match="k must lie"):
        op(features, lengths, 11, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(features.double(), lengths, 3, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(2, 4, 10, device="cuda").transpose(1, 2), lengths, 3, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(features, lengths.int(), 3, True)
    with pytest.raises(RuntimeError, match="shape"):
        op(features, lengths[:1], 3, True)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op(features, lengths.cpu(), 3, True)


@cuda_only
def test_cuda_several_chunks(backend):
    """A batch whose similarity workspaces exceed one chunk (1 GiB at N = 4096: 15 items) runs in several launches:
    each item still equals its own run bitwise and follows the reference."""
    g = torch.Generator().manual_seed(21)
    batch, tokens = 18, 4096
    features = torch.randn(batch, tokens, 8, generator=g)
    lengths = torch.randint(1, 300, (batch,), generator=g)
    lengths[3] = tokens
    got = run(OP, backend, features, lengths, 10)
    for b in (0, 3, 16, 17):
        assert torch.equal(run(OP, backend, features[b : b + 1], lengths[b : b + 1], 10), got[b : b + 1]), b
    small = [b for b in range(batch) if b != 3][:4]
    check_against_oracle(backend, features[small, :300], lengths[small], 10, True, min_prefix=0)


def _chunked_greedy64(x: torch.Tensor, k: int, mask_picked: bool, block: int = 1024):
    """The spec's greedy in float64 without an n x n matrix: the first score from column minima over row blocks,
    then one distance row per step. Returns the picks and each step's winner lead over the runner-up."""
    x = x.double()
    n = x.shape[0]
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    two = torch.full((2, n), INF, dtype=torch.float64)
    for r0 in range(0, n, block):
        d = 1 - u[r0 : r0 + block] @ u.T
        two = torch.cat([two, d]).topk(2, dim=0, largest=False).values
    scores = two[1] if n > 1 else two[0]
    nearest = torch.full((n,), INF, dtype=torch.float64)
    picked = torch.zeros(n, dtype=torch.bool)
    picks, leads = [], []
    for _ in range(min(k, n)):
        top = scores.topk(2) if n > 1 else (scores, None)
        j = int(torch.argmax(scores))
        picks.append(j)
        leads.append(float(top[0][0] - top[0][1]) if n > 1 else INF)
        picked[j] = True
        nearest = torch.minimum(nearest, 1 - u @ u[j])
        scores = nearest.masked_fill(picked, -INF) if mask_picked else nearest
    return picks, leads


@pytest.mark.slow
@cuda_only
@pytest.mark.parametrize("mask_picked", [True, False])
def test_cuda_large_n(backend, mask_picked):
    """N = 16,384 (a 1 GiB similarity): the gap-decided picks equal the float64 greedy's, and every pick is a
    near-maximiser of the float64 criterion along the kernel's own picks."""
    n, dim, k = 16_384, 64, 96
    x = clustered(n, dim, clusters=64, generator=torch.Generator().manual_seed(3))
    got = run(OP, backend, x[None], torch.tensor([n]), k, mask_picked)[0].tolist()
    want, leads = _chunked_greedy64(x, k, mask_picked)
    prefix = next((t for t, lead in enumerate(leads) if lead < GAP), k)
    assert prefix >= 10, f"test input near-tied at step {prefix}"
    assert got[:prefix] == want[:prefix]
    u = x.double() / x.double().norm(dim=-1, keepdim=True)
    nearest = torch.full((n,), INF, dtype=torch.float64)
    picked = torch.zeros(n, dtype=torch.bool)
    for t, j in enumerate(got[1:], start=1):
        prev = got[t - 1]
        picked[prev] = True
        nearest = torch.minimum(nearest, 1 - u @ u[prev])
        scores = nearest.masked_fill(picked, -INF) if mask_picked else nearest
        assert scores[j] >= scores.max() - GAP, t


@pytest.mark.slow
@cuda_only
def test_cuda_state_in_global_memory(backend):
    """A padded width N = 48,000 is too wide for the selection state in shared memory (5 bytes per token), so the
    kernel keeps it in global memory; items of a few hundred tokens still follow the reference (and the batch runs
    as two launches of one 9 GB similarity workspace each)."""
    g = torch.Generator().manual_seed(8)
    items = [clustered(n, 24, generator=g) for n in (300, 211)]
    features = torch.zeros(2, 48_000, 24)
    for b, item in enumerate(items):
        features[b, : item.shape[0]] = item
    lengths = torch.tensor([300, 211])
    got = run(OP, backend, features, lengths, 50)
    trimmed, _ = padded(items)
    want = check_against_oracle(backend, trimmed, lengths, 50, True, min_prefix=20)
    assert torch.equal(got, want)
