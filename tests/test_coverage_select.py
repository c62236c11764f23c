"""coverage_select (SCOPE's saliency-weighted greedy coverage): reference, kernels, ties, edges, errors, compile.

The reference (``mrprune.reference.coverage_select``) is checked against a brute force written with Python loops and
``math``; every kernel is checked against the float64 reference. Index comparisons are exact where the float64 greedy
has a clear gap between the winner and the runner-up, or on exactly representable inputs (where every tie is exact
and goes to the lower index); beyond that every kernel pick must be a near-maximiser of the float64 criterion given
the kernel's own earlier picks.
"""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import CUDA, INPUT_DTYPES, clustered, kernel_backends, padded, run, to_triton, triton_test

OP = "coverage_select"
KERNELS = kernel_backends(OP)
# The CUDA C++ kernel (GPU only) is one more kernel: run() copies the inputs to the GPU and the picks back.
GPU_KERNELS = [*KERNELS, CUDA]
#: Kernels compute in float32; a float64 score gap above this (relative to the score) cannot be reordered by rounding.
GAP = 1e-4


def call(impl: str, features, lengths, k, saliency=None, alpha=1.0) -> torch.Tensor:
    """``brute``, ``reference`` (float64) or a kernel backend through the public op."""
    if impl == "brute":
        return brute_batch(features, lengths, k, saliency, alpha)
    if impl == "reference":
        sal = None if saliency is None else saliency.double()
        return reference.coverage_select(features.double(), lengths, k, sal, alpha)
    if impl == "cuda":
        return run(OP, "cuda", features, lengths, k, saliency, alpha)
    assert impl in backends.available(OP, features.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.coverage_select(features, lengths, k, saliency, alpha)


# --- independent brute force --------------------------------------------------------------------------------------


def brute_cosines(vectors: list[list[float]]) -> list[list[float]]:
    units = []
    for v in vectors:
        norm = math.sqrt(math.fsum(c * c for c in v))
        units.append([c / max(norm, 1e-12) for c in v])
    s = [[math.fsum(a * b for a, b in zip(u, w, strict=True)) for w in units] for u in units]
    for i, v in enumerate(vectors):  # the spec: a non-zero token's cosine with itself is exactly 1
        if math.sqrt(math.fsum(c * c for c in v)) >= 1e-12:
            s[i][i] = 1.0
    return s


def brute_steps(vectors, weights: list[float], picks: list[int]):
    """Along a pick sequence, yield each step's scores w_j * sum_i max(0, S_ij - cur_i) (exactly rounded sums; picked
    tokens -inf), then apply the step's pick ``picks[t]`` (read after the yield, so that a caller may append it):
    cur_i = max(cur_i, S_ji)."""
    n = len(vectors)
    s = brute_cosines(vectors)
    cur = [0.0] * n
    for t in range(n):
        yield [
            -math.inf if j in picks[:t] else weights[j] * math.fsum(max(0.0, s[i][j] - cur[i]) for i in range(n))
            for j in range(n)
        ]
        if t >= len(picks):
            return
        cur = [max(cur[i], s[picks[t]][i]) for i in range(n)]


def brute_select(vectors, k: int, weights: list[float]) -> list[int]:
    """SCOPE by the letter: k times, argmax over unpicked j of w_j * sum_i max(0, S_ij - cur_i) (first maximum wins),
    then cur_i = max(cur_i, S_ji)."""
    out: list[int] = []
    steps = brute_steps(vectors, weights, out)
    while len(out) < min(k, len(vectors)):
        scores = next(steps)
        out.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
    return out + [-1] * (k - len(out))


def brute_batch(features, lengths, k, saliency=None, alpha=1.0) -> torch.Tensor:
    rows = []
    for b in range(len(lengths)):
        n = int(lengths[b])
        w = [1.0] * n if saliency is None else [float(a) ** alpha for a in saliency[b, :n].double().tolist()]
        rows.append(brute_select(features[b, :n].double().tolist(), k, w))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(lengths), k)


def exact_family(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 4]`` tokens with exactly representable unit vectors and cosines (scaled sign and axis vectors, zeros),
    drawn from a small pool: duplicates and exact ties everywhere."""
    signs = torch.tensor([[1 if (i >> b) & 1 else -1 for b in range(4)] for i in range(16)], dtype=torch.float64)
    family = torch.cat(
        [signs, torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64), torch.zeros(1, 4)]
    )
    pool = family[torch.randint(0, len(family), (5,), generator=generator)]
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=generator).double()
    return pool[torch.randint(0, 5, (n,), generator=generator)] * scale


# --- float64 greedy trace ----------------------------------------------------------------------------------------


def steps64(x: torch.Tensor, weights: torch.Tensor, picks: list[int]):
    """Yield ``(scores, pick)`` along a given pick sequence, in float64 (picked tokens score -inf)."""
    u = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = u @ u.T
    s.diagonal().copy_(torch.where(x.double().norm(dim=-1) >= 1e-12, 1.0, s.diagonal()))
    cur = torch.zeros(len(x), dtype=torch.float64)
    picked = torch.zeros(len(x), dtype=torch.bool)
    for j in picks:
        scores = (s - cur[:, None]).clamp_min(0).sum(0) * weights
        yield scores.masked_fill(picked, -math.inf), j
        picked[j] = True
        cur = torch.maximum(cur, s[j])


def check_against_oracle(backend, features, lengths, k, saliency=None, alpha=1.0, min_prefix=8) -> torch.Tensor:
    """Kernel vs float64 reference: exact on the gap-decided prefix (which must cover ``min(k, n_b, min_prefix)``
    picks, else the input itself is near-tied), near-maximisers everywhere, no repeats, -1 padding."""
    got = call(backend, features, lengths, k, saliency, alpha)
    assert_near_greedy(got, features, lengths, k, saliency, alpha, min_prefix)
    return got


def assert_near_greedy(got, features, lengths, k, saliency=None, alpha=1.0, min_prefix=8) -> None:
    """``got`` (picks of a float32 kernel) vs the float64 reference: the checks of :func:`check_against_oracle`."""
    want = call("reference", features, lengths, k, saliency, alpha)
    assert got.dtype == torch.int64 and got.shape == (features.shape[0], k)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        count = min(k, n)
        g, w = got[b].tolist(), want[b].tolist()
        assert g[count:] == [-1] * (k - count)
        assert len(set(g[:count])) == count and all(0 <= i < n for i in g[:count]), f"item {b}: {g}"
        weights = torch.ones(n, dtype=torch.float64)
        if saliency is not None:
            weights = saliency[b, :n].double() ** alpha
        x = features[b, :n]
        prefix = count
        for t, (scores, j) in enumerate(steps64(x, weights, w[:count])):
            others = scores.clone()
            others[j] = -math.inf
            if not bool(scores[j] - others.max() >= GAP * max(1.0, float(scores[j]))):
                prefix = t
                break
        assert prefix >= min(count, min_prefix), f"item {b}: test input near-tied at step {prefix}"
        assert g[:prefix] == w[:prefix], f"item {b}: kernel {g[:prefix]} != reference {w[:prefix]}"
        for t, (scores, j) in enumerate(steps64(x, weights, g[:count])):
            best = float(scores.max())
            assert float(scores[j]) >= best - GAP * max(1.0, best), f"item {b} step {t}: {j} is not a near-maximiser"


# --- 0. the kernels exist ----------------------------------------------------------------------------------------


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_reference_matches_brute_force_random(seed):
    """The float64 reference equals the brute force on tiny random padded batches with random saliency and alpha."""
    g = torch.Generator().manual_seed(seed)
    tokens, dim = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    features = torch.randn(3, tokens, dim, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, tokens + 1, (3,), generator=g)
    lengths[0] = tokens
    saliency = torch.rand(3, tokens, generator=g, dtype=torch.float64)
    for alpha in (0.0, 0.5, 1.0, 2.0):
        for k in sorted({0, 1, tokens // 2, tokens}):
            for sal in (None, saliency):
                got = reference.coverage_select(features, lengths, k, sal, alpha)
                assert_greedy_with_brute_force(got, features, lengths, k, sal, alpha)


def assert_greedy_with_brute_force(got, features, lengths, k, saliency, alpha, tol=1e-12):
    """Every pick of ``got`` is the brute force's first maximum given the picks before it, except where another score
    is within ``tol`` (relative) of the maximum: random inputs tie exactly in real arithmetic (two unpicked tokens j, l
    above the coverage gain (1 - cur_j) + (S_jl - cur_l) and (S_jl - cur_l) + (1 - cur_j) alike), and rounding
    then decides; there any near-maximiser may be picked."""
    assert got.shape == (len(lengths), k)
    for b in range(len(lengths)):
        n = int(lengths[b])
        w = [1.0] * n if saliency is None else [float(a) ** alpha for a in saliency[b, :n].double().tolist()]
        picks = got[b, : min(k, n)].tolist()
        assert got[b, min(k, n) :].eq(-1).all(), f"item {b}: picks past n"
        steps = brute_steps(features[b, :n].double().tolist(), w, picks)
        for t in range(len(picks)):
            scores = next(steps)
            best = max(scores)
            first = scores.index(best)
            near = [j for j, v in enumerate(scores) if v >= best - tol * max(1.0, abs(best))]
            assert picks[t] == first or (len(near) > 1 and picks[t] in near), f"item {b} step {t}: {picks} k={k}"


IMPLEMENTATIONS = ["brute", "reference", *GPU_KERNELS]


# three draws where Triton runs interpreted (seconds each), six elsewhere
EXACT_CASES = [(impl, seed) for impl in ["reference", *KERNELS] for seed in range(3 if impl == "triton" else 6)] + [
    pytest.param("cuda", seed, marks=CUDA.marks, id=f"cuda-{seed}") for seed in range(6)
]


@pytest.mark.parametrize(("impl", "seed"), EXACT_CASES)
def test_exact_ties_family(impl, seed):
    """Exactly representable tokens (duplicates, zeros, opposite vectors) and power-of-two saliency: every
    implementation equals the brute force pick for pick (exact ties go to the lower index)."""
    g = torch.Generator().manual_seed(100 + seed)
    items = [exact_family(n, g) for n in (8, 0, 5, 13)]
    features, lengths = padded(items)
    features[features == 1e4] = 0.0  # padded() fills with garbage; keep this input exact everywhere
    saliency = 2.0 ** torch.randint(-2, 2, features.shape[:2], generator=g).double()
    for k in (0, 1, 5, 13):
        for sal in (None, saliency):
            want = brute_batch(features, lengths, k, sal)
            assert torch.equal(call(impl, features.float(), lengths, k, sal), want), f"k={k} saliency={sal is not None}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_hand_example(impl):
    """Tokens [e1, e1, e2, (e1 + e2) / sqrt 2 direction, 0]: without saliency the diagonal token covers most (gain
    1/sqrt2 * 3 + 1 + 0 = 3.12 > e1's 1 + 1 + 0 + 0.707 = 2.71), then e1 at index 0 (index 1 is its duplicate,
    whose gain is then 0), then e2; the zero vector never gains anything and comes last, after the duplicate.
    With saliency 0 on the diagonal token it goes last among the positive gains."""
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [0.0, 0.0]]])
    lengths = torch.tensor([5])
    assert call(impl, features, lengths, 5).tolist() == [[3, 0, 2, 1, 4]]
    saliency = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]])
    # e1 (0) gains 1 + 1 + 0 + .707 first; then e2 (2) gains 1; all others gain 0 -> lower index first
    assert call(impl, features, lengths, 5, saliency).tolist() == [[0, 2, 1, 3, 4]]


# float64 inputs always run on the reference, so the kernels are checked in float32 only
TWO_TOKEN_CASES = [("reference", torch.float64), ("reference", torch.float32), *((b, torch.float32) for b in KERNELS)]


@pytest.mark.parametrize(("impl", "dtype"), TWO_TOKEN_CASES)
@pytest.mark.parametrize("dim", [3, 9, 33])
def test_two_tokens_first_pick_is_index_zero(impl, dtype, dim):
    """With two tokens both gains are 1 + max(0, S_01): an exact tie (the self-cosine is exactly 1 by the spec, and
    S is symmetric), so the first pick must be 0 whatever the rounding of the norms."""
    bad = []
    for seed in range(20):
        x = torch.randn(1, 2, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        got = (
            reference.coverage_select(x, torch.tensor([2]), 2)
            if impl == "reference"
            else call(impl, x, torch.tensor([2]), 2)
        )
        if got.tolist() != [[0, 1]]:
            bad.append((seed, got.tolist()))
    assert not bad, f"first pick of a tied pair went to index 1 (seed, picks): {bad}"


@triton_test
def test_triton_ties_across_tiles():
    """16-token sweep tiles over exactly tied inputs: a tie between tiles goes to the earlier tile (lower index)."""
    from mrprune.triton_kernels.coverage_select import coverage_select_triton

    g = torch.Generator().manual_seed(300)
    features, lengths = padded([exact_family(n, g) for n in (40, 23)])
    features[features == 1e4] = 0.0
    saliency = 2.0 ** torch.randint(-2, 2, features.shape[:2], generator=g).float()
    for k in (5, 23):
        want = brute_batch(features, lengths, k, saliency)
        got = coverage_select_triton(to_triton(features.float()), to_triton(lengths), k, to_triton(saliency), block=16)
        assert torch.equal(got.cpu(), want), f"k={k}"


# --- 2. kernels vs reference -------------------------------------------------------------------------------------


# N = 300 (past the interpreter's 256-token tiles) only where the kernel runs natively (too slow interpreted)
CLUSTERED_CASES = (
    [(b, n, d) for b in KERNELS for n, d in ((40, 16), (64, 32), (33, 8))]
    + [(b, 300, 24) for b in kernel_backends(OP, interpreted=False)]
    + [pytest.param("cuda", n, d, marks=CUDA.marks, id=f"cuda-{n}-{d}") for n, d in ((40, 16), (33, 8), (300, 24))]
)


@pytest.mark.parametrize(("backend", "tokens", "dim"), CLUSTERED_CASES)
def test_kernel_matches_reference_clustered(backend, tokens, dim):
    """Clustered tokens with random saliency: the kernel reproduces the gap-decided reference picks."""
    g = torch.Generator().manual_seed(tokens * dim)
    features = clustered(tokens, dim, generator=g)[None]
    saliency = torch.rand(1, tokens, generator=g)
    lengths = torch.tensor([tokens])
    for alpha in (1.0, 0.5):
        check_against_oracle(backend, features, lengths, tokens // 2, saliency, alpha, min_prefix=6)
    check_against_oracle(backend, features, lengths, tokens, None, min_prefix=4)


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    """float32/float16/bfloat16 features and saliency: the kernel matches the float64 reference on the same rounded
    inputs."""
    g = torch.Generator().manual_seed(7)
    features, lengths = padded([clustered(48, 24, generator=g), clustered(17, 24, generator=g)])
    saliency = torch.rand(features.shape[:2], generator=g).to(dtype)
    check_against_oracle(backend, features.to(dtype), lengths, 20, saliency, min_prefix=6)


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("k", [0, 1, 7, 29])
def test_kernel_padded_batch(backend, k):
    """A padded batch with garbage padding and an empty item: matches the reference; other garbage in the padding
    gives the same picks."""
    g = torch.Generator().manual_seed(k)
    features, lengths = padded([clustered(n, 12, generator=g) for n in (13, 0, 29, 7)])
    saliency = torch.rand(features.shape[:2], generator=g)
    got = check_against_oracle(backend, features, lengths, k, saliency, min_prefix=4)
    assert got[1].tolist() == [-1] * k
    garbage = features.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[b, n:] = torch.randn(garbage[b, n:].shape, generator=g) * 100
    saliency2 = saliency.clone()
    saliency2[0, 13:] = 50.0
    assert torch.equal(call(backend, garbage, lengths, k, saliency2), got)


@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_int32_lengths_and_strided_features(backend):
    g = torch.Generator().manual_seed(3)
    features, lengths = padded([clustered(n, 10, generator=g) for n in (21, 9)])
    want = call(backend, features, lengths, 9)
    strided = features.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert torch.equal(call(backend, strided, lengths.int(), 9), want)


# --- 3. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_single_token_and_empty(impl):
    features = torch.randn(2, 1, 3)
    lengths = torch.tensor([1, 0])
    assert call(impl, features, lengths, 1).tolist() == [[0], [-1]]
    assert call(impl, features, lengths, 0).shape == (2, 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_zero_vectors_and_duplicates_come_last(impl):
    """A zero vector gains nothing (its cosines are 0), and a duplicate of a picked token gains nothing either: with
    k = n both come after every token with a positive gain, in index order."""
    features = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    got = call(impl, features, torch.tensor([5]), 5)[0].tolist()
    assert got[:2] in ([1, 2], [2, 1]) and got[2:] == [0, 3, 4], got


@pytest.mark.parametrize("impl", ["reference", *GPU_KERNELS])
def test_budget_at_least_length(impl):
    """k >= n_b: every valid token exactly once, then -1."""
    g = torch.Generator().manual_seed(11)
    features, lengths = padded([clustered(n, 6, generator=g) for n in (9, 4, 1, 0)])
    got = call(impl, features, lengths, 9, torch.rand(features.shape[:2], generator=g))
    for b, n in enumerate(lengths.tolist()):
        assert sorted(got[b, :n].tolist()) == list(range(n)) and got[b, n:].tolist() == [-1] * (9 - n)


@pytest.mark.parametrize("impl", ["reference", *GPU_KERNELS])
def test_alpha_zero_ignores_saliency(impl):
    """alpha = 0 makes every weight 1 (0 ** 0 = 1 included): the picks of no saliency at all."""
    g = torch.Generator().manual_seed(12)
    features = clustered(30, 8, generator=g)[None]
    saliency = torch.rand(1, 30, generator=g)
    saliency[0, ::3] = 0
    lengths = torch.tensor([30])
    assert torch.equal(call(impl, features, lengths, 10, saliency, 0.0), call(impl, features, lengths, 10))


@pytest.mark.parametrize("impl", ["reference", *GPU_KERNELS])
def test_batch_equals_per_item(impl):
    g = torch.Generator().manual_seed(5)
    features, lengths = padded([clustered(n, 20, generator=g) for n in (70, 0, 31, 1, 70)])
    saliency = torch.rand(features.shape[:2], generator=g)
    batch = call(impl, features, lengths, 12, saliency)
    for b, n in enumerate(lengths.tolist()):
        alone = call(impl, features[b : b + 1], lengths[b : b + 1], 12, saliency[b : b + 1])
        assert torch.equal(alone, batch[b : b + 1]), f"item {b}"
        kk = min(12, n)
        trimmed = call(impl, features[b : b + 1, :n], lengths[b : b + 1], kk, saliency[b : b + 1, :n])
        assert torch.equal(trimmed[0], batch[b, :kk]), f"item {b} (trimmed)"


# --- 4. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 5, 3)
    lengths = torch.tensor([5, 3])
    sal = torch.rand(2, 5)
    nan = x.clone()
    nan[0, 1, 0] = math.nan
    return {
        "rank2": ((x[0], lengths, 2), ValueError, "features must be 3-D"),
        "int_features": ((x.long(), lengths, 2), TypeError, "features must be float16"),
        "k_negative": ((x, lengths, -1), ValueError, "k must lie in"),
        "k_above_N": ((x, lengths, 6), ValueError, "k must lie in"),
        "k_float": ((x, lengths, 2.0), TypeError, "k must be an int"),
        "length_above_N": ((x, torch.tensor([6, 3]), 2), ValueError, "lengths must lie in"),
        "float_lengths": ((x, lengths.float(), 2), TypeError, "lengths must be int32 or int64"),
        "saliency_shape": ((x, lengths, 2, sal[:, :4]), ValueError, "saliency must have shape"),
        "saliency_negative": ((x, lengths, 2, -sal), ValueError, "saliency must be non-negative"),
        "saliency_nan": ((x, lengths, 2, sal.masked_fill(sal > 0.5, math.nan)), ValueError, "saliency contains NaN"),
        "alpha_negative": ((x, lengths, 2, sal, -1.0), ValueError, "alpha must be >= 0"),
        "alpha_inf": ((x, lengths, 2, sal, math.inf), ValueError, "alpha must be a finite number"),
        "nan": ((nan, lengths, 2), ValueError, "features contains NaN or Inf"),
        "lengths_on_meta": ((x, lengths.to("meta"), 2), ValueError, "lengths is on meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.coverage_select: {fragment}"):
        ops.coverage_select(*args)


# --- 5. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(1)
    features, lengths = padded([clustered(n, 8, generator=g) for n in (11, 0, 6)])
    saliency = torch.rand(features.shape[:2], generator=g)
    for args in ((features, lengths, 4, None, 1.0), (features.half(), lengths, 11, saliency.half(), 0.5)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.coverage_select.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def select(features, lengths, saliency):
        return ops.coverage_select(features, lengths, 5), ops.coverage_select(features, lengths, 5, saliency, 2.0)

    compiled = torch.compile(select, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 5)):
        features, lengths = padded([clustered(n, 8, generator=g) for n in sizes])
        saliency = torch.rand(features.shape[:2], generator=g)
        with backends.use_backend(backend):
            got, want = compiled(features, lengths, saliency), select(features, lengths, saliency)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"sizes {sizes}"
