"""The CUDA C++ diversity_select kernel (csrc/cuda/diversity_select.cu) against the spec on CPU copies.

Spec: ``mrprune.reference.diversity_select`` (DivPrune's greedy max-min cosine distance). The kernel computes
``d = 1 - S`` from an exactly symmetric float32 similarity, so:

* on exactly representable tokens (scaled sign/axis vectors, zeros: every distance is exact) it equals an
  independent brute force pick for pick, ties to the lower index, re-picks without the mask;
* elsewhere it equals the float64 reference on every pick decided by a clear float64 score gap (or by the exact
  step-0 tie of a mutual nearest pair, which the spec gives to the lower index), and every pick is a near-maximiser
  of the float64 criterion given the kernel's own earlier picks;
* results are bitwise independent of the batch composition, the padding and the input's address.

Everything here needs a CUDA GPU and an extension built with the CUDA kernels (skipped otherwise).
"""

from __future__ import annotations

import math

import pytest
import torch

import mrprune
from mrprune import backends
from mrprune.testing import llava_next_features
from tests.utils import INPUT_DTYPES, clustered, oracle, padded

pytestmark = [pytest.mark.cuda, pytest.mark.ext]

OP = "diversity_select"
INF = math.inf
# The kernel rounds d = 1 - cos in float32; a float64 score gap above this cannot be reordered by that rounding.
GAP = 1e-5
# Where the op runs (a local harness may point these at the CPU kernels to check the tests themselves).
DEVICE = "cuda"
BACKEND = "cuda"
PRIVATE_OP = f"_{OP}_cuda"


@pytest.fixture(autouse=True)
def _needs_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mrprune::{PRIVATE_OP}", "CUDA"), (
        "mrprune._C was built without the CUDA kernels"
    )
    assert BACKEND in backends.available(OP, DEVICE)


def select(features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool = True) -> torch.Tensor:
    """The public op with the CUDA backend on device copies; the picks back on the CPU."""
    with backends.use_backend(BACKEND):
        got = mrprune.diversity_select(features.to(DEVICE), lengths.to(DEVICE), k, mask_picked)
    assert got.device.type == DEVICE and got.dtype == torch.int64 and got.shape == (features.shape[0], k)
    return got.cpu()


def select_private(features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool = True) -> torch.Tensor:
    """The private CUDA op on canonical inputs (contiguous float32, int64), bypassing the router."""
    op = getattr(torch.ops.mrprune, PRIVATE_OP)
    got = op(features.to(DEVICE, torch.float32).contiguous(), lengths.to(DEVICE, torch.int64), k, mask_picked)
    return got.cpu()


# --- independent helpers -----------------------------------------------------------------------------------------


def brute_select(vectors: list[list[float]], k: int, mask_picked: bool) -> list[int]:
    """DivPrune by the letter of the spec with loops and math: the first pick maximises the second-smallest
    d[:, j]; later picks maximise min_{s in S} d_sj; ties to the lower index; re-picks unless ``mask_picked``."""
    n = len(vectors)
    out = [-1] * k
    if n == 0 or k == 0:
        return out
    units = []
    for v in vectors:
        norm = math.sqrt(math.fsum(c * c for c in v))
        units.append([c / max(norm, 1e-12) for c in v])
    d = [[1.0 - math.fsum(a * b for a, b in zip(units[i], units[j], strict=True)) for j in range(n)] for i in range(n)]

    def first_argmax(scores, candidates):
        best = -1
        for i in candidates:
            if best < 0 or scores[i] > scores[best]:
                best = i
        return best

    first = [sorted(d[i][j] for i in range(n))[1 if n > 1 else 0] for j in range(n)]
    j = first_argmax(first, range(n))
    nearest = [INF] * n
    picked: set[int] = set()
    for t in range(min(k, n)):
        out[t] = j
        picked.add(j)
        nearest = [min(nearest[i], d[j][i]) for i in range(n)]
        candidates = [i for i in range(n) if not (mask_picked and i in picked)]
        if candidates:
            j = first_argmax(nearest, candidates)
    return out


def brute_batch(features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool) -> torch.Tensor:
    rows = [brute_select(features[b, : int(n)].double().tolist(), k, mask_picked) for b, n in enumerate(lengths)]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(lengths), k)


def exact_family(n: int, generator: torch.Generator, pool_size: int = 5) -> torch.Tensor:
    """``[n, 4]`` tokens whose unit vectors and cosines are exact in binary floating point (scaled sign vectors,
    scaled axis vectors, zeros), drawn with replacement from a small pool: duplicates and exact ties everywhere."""
    signs = torch.tensor([[1 if (i >> b) & 1 else -1 for b in range(4)] for i in range(16)], dtype=torch.float64)
    axes = torch.cat([torch.eye(4), -torch.eye(4)]).double()
    family = torch.cat([signs, axes, torch.zeros(1, 4, dtype=torch.float64)])
    pool = family[torch.randint(0, len(family), (pool_size,), generator=generator)]
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=generator).double()
    return pool[torch.randint(0, pool_size, (n,), generator=generator)] * scale


def distance64(x: torch.Tensor) -> torch.Tensor:
    """Float64 ``1 - cos`` of the rows of ``x [n, D]``, made exactly symmetric (upper triangle mirrored)."""
    x = x.double()
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = 1 - u @ u.T
    return torch.triu(d) + torch.triu(d, 1).T


def greedy_steps(d: torch.Tensor, picks: list[int], mask_picked: bool):
    """Yield ``(scores, pick)`` for each step of the greedy along a given pick sequence."""
    n = d.shape[0]
    scores = d.sort(dim=0).values[1] if n > 1 else d[0]
    nearest = torch.full((n,), INF, dtype=torch.float64)
    picked = torch.zeros(n, dtype=torch.bool)
    for j in picks:
        yield scores, j
        picked[j] = True
        nearest = torch.minimum(nearest, d[j])
        scores = nearest.masked_fill(picked, -INF) if mask_picked else nearest


def clear_prefix(d: torch.Tensor, picks: list[int], mask_picked: bool, gap: float = GAP) -> int:
    """How many leading picks are decided by a float64 score gap >= ``gap`` (or by the exact step-0 tie between the
    most isolated token and its mutual nearest neighbour of higher index, which the spec gives to the lower index)."""
    for t, (scores, j) in enumerate(greedy_steps(d, picks, mask_picked)):
        others = scores.clone()
        others[j] = -INF
        if t == 0:
            partner = (scores == scores[j]) & (d[j] == scores[j]) & (torch.arange(len(scores)) > j)
            others[partner] = -INF
        if not bool(scores[j] - others.max() >= gap):
            return t
    return len(picks)


def assert_greedy_consistent(d: torch.Tensor, picks: list[int], mask_picked: bool, tol: float = GAP) -> None:
    """Every pick is within ``tol`` of the best float64 score given the earlier picks (a near-maximiser)."""
    for t, (scores, j) in enumerate(greedy_steps(d, picks, mask_picked)):
        assert 0 <= j < d.shape[0], f"step {t}: index {j} out of range"
        assert scores[j] >= scores.max() - tol, f"step {t}: picked {j} ({float(scores[j])}), best {float(scores.max())}"


def check_against_oracle(features, lengths, k, mask_picked, min_prefix=8) -> torch.Tensor:
    """Kernel vs the float64 reference (on CPU copies): exact on the gap-decided prefix (which must cover
    ``min(k, n_b, min_prefix)`` picks, else the input itself is near-tied), near-maximisers everywhere, -1 padding,
    no repeats with the mask. Returns the kernel's picks."""
    got = select(features, lengths, k, mask_picked)
    want = oracle(OP, features.cpu(), lengths.cpu(), k, mask_picked)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        count = min(k, n)
        g, w = got[b].tolist(), want[b].tolist()
        assert g[count:] == [-1] * (k - count), f"item {b}: expected -1 past {count} picks, got {g}"
        if count == 0:
            continue
        d = distance64(features[b, :n].cpu())
        prefix = clear_prefix(d, w[:count], mask_picked)
        assert prefix >= min(count, min_prefix), f"item {b}: test input near-tied at step {prefix}"
        assert g[:prefix] == w[:prefix], f"item {b}: kernel {g[:prefix]} != reference {w[:prefix]}"
        assert_greedy_consistent(d, g[:count], mask_picked)
        if mask_picked:
            assert len(set(g[:count])) == count, f"item {b}: repeated index in {g[:count]}"
    return got


def with_garbage(features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy with different random garbage in every padded row."""
    out = features.clone()
    for b, n in enumerate(lengths.tolist()):
        out[b, n:] = (torch.randn(out[b, n:].shape, generator=generator) * 100).to(out.dtype)
    return out


# --- 1. exact ties, duplicates, zero vectors -----------------------------------------------------------------------


@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_exact_ties_family(seed, mask_picked):
    """Exactly representable tokens (every distance in {0, .5, 1, 1.5, 2}): the kernel equals the brute force pick
    for pick, through the public op and the private one."""
    g = torch.Generator().manual_seed(300 + seed)
    features, lengths = padded([exact_family(n, g).float() for n in (8, 0, 5, 13, 129)])
    for k in (0, 1, 5, 13, 129):
        want = brute_batch(features, lengths, k, mask_picked)
        assert torch.equal(select(features, lengths, k, mask_picked), want), f"k={k}"
        assert torch.equal(select_private(features, lengths, k, mask_picked), want), f"k={k} (private op)"


def test_unmasked_mode_repicks_a_duplicate():
    """[e1, e1, e2]: e2 first, then index 0 (tie with 1); then every min-distance is 0: the mask picks 1, the
    official unmasked rule re-picks 0."""
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    lengths = torch.tensor([3])
    assert select(features, lengths, 3, True).tolist() == [[2, 0, 1]]
    assert select(features, lengths, 3, False).tolist() == [[2, 0, 0]]


def test_zero_vectors():
    """A zero vector is at distance 1 from everything (itself included): [e1, 2 e1, 0] gives 2, 0, 1 (masked) or
    2, 0, 2 (unmasked); an all-zero item is one big tie."""
    features = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0]] * 3])
    lengths = torch.tensor([3, 3])
    assert select(features, lengths, 3, True).tolist() == [[2, 0, 1], [0, 1, 2]]
    assert select(features, lengths, 3, False).tolist() == [[2, 0, 2], [0, 0, 0]]


def test_all_tokens_identical_exact():
    """Identical exact tokens: every distance is 0, so the mask gives 0, 1, ..., n - 1 and no mask re-picks 0."""
    n = 6
    features = torch.tensor([[2.0, -2.0, 2.0, 2.0]]).expand(n, 4)[None]
    lengths = torch.tensor([n])
    assert select(features, lengths, n, True).tolist() == [list(range(n))]
    assert select(features, lengths, n, False).tolist() == [[0] * n]


def test_all_tokens_identical_generic():
    """Identical generic tokens (rounding noise only): the mask still returns every token exactly once."""
    n = 300
    features = torch.randn(1, 1, 37, generator=torch.Generator().manual_seed(1)).expand(1, n, 37).contiguous()
    got = select(features, torch.tensor([n]), n)
    assert sorted(got[0].tolist()) == list(range(n))


@pytest.mark.parametrize("dim", [3, 9, 16, 33])
def test_two_tokens_first_pick_is_index_zero(dim):
    """With two tokens both columns' second-smallest distance is d_01 = d_10, an exact tie (the similarity is
    bitwise symmetric): the first pick must be 0."""
    bad = []
    for seed in range(20):
        x = torch.randn(1, 2, dim, generator=torch.Generator().manual_seed(seed))
        got = select(x, torch.tensor([2]), 2)
        if got.tolist() != [[0, 1]]:
            bad.append((seed, got.tolist()))
    assert not bad, f"first pick of a tied pair went to index 1 (seed, picks): {bad}"


def test_isolated_mutual_pair_first_pick_is_lower_index():
    """Two tokens that are each other's nearest neighbour (cos 0.9), both far from a tight cluster, tie exactly at
    step 0: the lower index of the pair comes first (the pair straddles 128-token Gram tiles)."""
    bad = []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        dim, n = 16, 300
        centre = torch.randn(dim, generator=g)
        x = centre + 0.01 * torch.randn(n, dim, generator=g)
        u, w = torch.linalg.qr(torch.randn(dim, 3, generator=g))[0].T[1:]
        u, w = u - (u @ centre) * centre / centre.dot(centre), w - (w @ centre) * centre / centre.dot(centre)
        u = u / u.norm()
        w = w - (w @ u) * u
        w = w / w.norm()
        a, b = sorted(torch.randperm(n, generator=g)[:2].tolist())
        x[a], x[b] = 3 * u, 2 * (0.9 * u + math.sqrt(0.19) * w)
        got = select(x[None], torch.tensor([n]), 1)
        if int(got[0, 0]) != a:
            bad.append((seed, (a, b), int(got[0, 0])))
    assert not bad, f"(seed, pair, first pick) where the tied pair was not resolved to its lower index: {bad}"


# --- 2. against the float64 reference --------------------------------------------------------------------------


@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize(("tokens", "dim"), [(40, 16), (64, 32), (33, 8), (129, 20), (300, 64)])
def test_matches_reference_clustered(tokens, dim, mask_picked):
    """Clustered tokens with clear score gaps: the kernel reproduces the reference picks, the first one included."""
    g = torch.Generator().manual_seed(tokens * dim)
    features = clustered(tokens, dim, generator=g)[None]
    got = check_against_oracle(features, torch.tensor([tokens]), tokens, mask_picked, min_prefix=min(tokens // 2, 20))
    scores = distance64(features[0]).sort(dim=0).values[1]
    assert int(got[0, 0]) == int(scores.argmax()), "the first pick is not the most isolated token"


@pytest.mark.parametrize("mask_picked", [True, False])
def test_llava_next_features(mask_picked):
    """Synthetic LLaVA-NeXT tokens (12 x 12 grid, identical newline tokens): the kernel follows the reference; the
    first newline picked is the lowest-index one; the others wait until every distinct token is picked (mask), or
    the distinct tokens come first without repeats (unmasked)."""
    rows = cols = 12
    features = llava_next_features(rows, cols, 256, seed=0)[None]
    tokens = features.shape[1]
    newlines = [576 + r * (cols + 1) + cols for r in range(rows)]
    distinct = tokens - (rows - 1)
    lengths = torch.tensor([tokens])
    for k in (1, 5, 73):
        check_against_oracle(features, lengths, k, mask_picked, min_prefix=5)
    got = check_against_oracle(features, lengths, tokens, mask_picked, min_prefix=40)[0].tolist()
    head = got[:distinct]
    assert len(set(head)) == distinct, "a distinct token was skipped or repeated before the newlines were exhausted"
    assert [i for i in head if i in newlines] == [newlines[0]], "expected exactly the first newline among them"
    if mask_picked:
        assert sorted(got[distinct:]) == newlines[1:]


@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_input_dtypes(dtype, mask_picked):
    """float32/float16/bfloat16 inputs: the kernel matches the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(7)
    features, lengths = padded([clustered(48, 24, generator=g), clustered(17, 24, generator=g)])
    check_against_oracle(features.to(dtype), lengths, 20, mask_picked, min_prefix=10)


@pytest.mark.parametrize(
    ("tokens", "dim"), [(1, 1), (2, 3), (3, 2), (7, 1), (63, 7), (65, 33), (127, 5), (128, 4), (129, 9), (257, 5)]
)
def test_odd_sizes(tokens, dim):
    """Odd token counts around the 128-token Gram tiles and odd dimensions (D = 1: every distance is 0 or 2; D % 4
    != 0: scalar loads): valid picks, gap-decided picks match, every pick is a near-maximiser."""
    g = torch.Generator().manual_seed(tokens + 1000 * dim)
    features = clustered(tokens, dim, generator=g)[None]
    for mask_picked in (True, False):
        check_against_oracle(features, torch.tensor([tokens]), tokens, mask_picked, min_prefix=0 if dim == 1 else 3)


@pytest.mark.parametrize("mask_picked", [True, False])
@pytest.mark.parametrize("k", [0, 1, 5, 13, 29])
def test_padded_batch(k, mask_picked):
    """A padded batch with garbage padding and an empty item, k in {0, 1, 5, n_0, N}: matches the reference; other
    garbage in the padding gives bitwise the same picks; k >= n_b picks every valid token once (mask)."""
    g = torch.Generator().manual_seed(k)
    features, lengths = padded([clustered(n, 12, generator=g) for n in (13, 0, 29, 7)])
    got = check_against_oracle(features, lengths, k, mask_picked, min_prefix=5)
    assert got[1].tolist() == [-1] * k
    assert torch.equal(select(with_garbage(features, lengths, g), lengths, k, mask_picked), got)
    for b, n in enumerate(lengths.tolist()):
        if mask_picked and k >= n:
            assert sorted(got[b, :n].tolist()) == list(range(n))


# --- 3. batch composition, addresses, chunks, scale --------------------------------------------------------------


@pytest.mark.parametrize("mask_picked", [True, False])
def test_batch_equals_per_item(mask_picked):
    """Each item of a padded batch gives bitwise the same picks alone, padded or trimmed to its own length."""
    g = torch.Generator().manual_seed(5)
    features, lengths = padded([clustered(n, 20, generator=g) for n in (170, 0, 31, 1, 170)])
    k = 12
    batch = select(features, lengths, k, mask_picked)
    for b, n in enumerate(lengths.tolist()):
        alone = select(features[b : b + 1], lengths[b : b + 1], k, mask_picked)
        assert torch.equal(alone, batch[b : b + 1]), f"item {b} (padded)"
        trimmed = select(features[b : b + 1, :n], lengths[b : b + 1], min(k, n), mask_picked)
        assert torch.equal(trimmed[0], batch[b, : min(k, n)]), f"item {b} (trimmed)"


@pytest.mark.parametrize("dim", [16, 19])
def test_result_independent_of_address(dim):
    """The same item at different float offsets (16-byte aligned or not) gives bitwise the same picks."""
    n = 150
    x = clustered(n, dim, generator=torch.Generator().manual_seed(11))
    results = []
    for offset in range(4):
        buffer = torch.zeros(n * dim + 4, device=DEVICE)
        item = buffer[offset : offset + n * dim].view(1, n, dim)
        item.copy_(x.to(DEVICE))
        with backends.use_backend(BACKEND):
            results.append(mrprune.diversity_select(item, torch.tensor([n], device=DEVICE), 60).cpu())
    for offset, got in enumerate(results[1:], start=1):
        assert torch.equal(got, results[0]), offset


def test_several_chunks():
    """A batch whose similarity workspaces exceed one chunk (1 GiB at N = 4096: 15 items) runs in several launches:
    each item still equals its own run bitwise and follows the reference."""
    g = torch.Generator().manual_seed(21)
    batch, tokens = 18, 4096
    features = torch.randn(batch, tokens, 8, generator=g)
    lengths = torch.randint(1, 300, (batch,), generator=g)
    lengths[3] = tokens
    got = select(features, lengths, 10)
    for b in (0, 3, 16, 17):
        assert torch.equal(select(features[b : b + 1], lengths[b : b + 1], 10), got[b : b + 1]), b
    small = [b for b in range(batch) if b != 3][:4]
    check_against_oracle(features[small, :300], lengths[small], 10, True, min_prefix=0)


def _chunked_greedy64(x: torch.Tensor, k: int, mask_picked: bool, block: int = 1024):
    """The spec's greedy in float64 without an n x n matrix: the first score from column minima over row blocks,
    then one distance row per step. Returns the picks and each step's (winner lead over the runner-up)."""
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
@pytest.mark.parametrize("mask_picked", [True, False])
def test_large_n(mask_picked):
    """N = 16,384 (a 1 GiB similarity): the gap-decided picks equal the float64 greedy's, and every pick is a
    near-maximiser of the float64 criterion along the kernel's own picks."""
    n, dim, k = 16_384, 64, 96
    x = clustered(n, dim, clusters=64, generator=torch.Generator().manual_seed(3))
    got = select(x[None], torch.tensor([n]), k, mask_picked)[0].tolist()
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
def test_state_in_global_memory():
    """A padded width N = 48,000 is too wide for the selection state in shared memory (5 bytes per token), so the
    kernel keeps it in global memory; items of a few hundred tokens still follow the reference (and the batch runs
    as two launches of one 9 GB similarity workspace each)."""
    g = torch.Generator().manual_seed(8)
    items = [clustered(n, 24, generator=g) for n in (300, 211)]
    features = torch.zeros(2, 48_000, 24)
    for b, item in enumerate(items):
        features[b, : item.shape[0]] = item
    lengths = torch.tensor([300, 211])
    got = select(features, lengths, 50)
    trimmed, _ = padded(items)
    want = check_against_oracle(trimmed, lengths, 50, True, min_prefix=20)
    assert torch.equal(got, want)


# --- 4. the op around the kernel ----------------------------------------------------------------------------------


def test_router_converts_inputs():
    """int32 lengths and non-contiguous float16 features reach the kernel as int64 / contiguous float32."""
    g = torch.Generator().manual_seed(3)
    features, lengths = padded([clustered(n, 10, generator=g) for n in (21, 9)])
    features = features.half()
    want = select(features.float(), lengths, 9)
    strided = features.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert torch.equal(select(strided, lengths.int(), 9), want)


def test_auto_backend_on_cuda_is_the_cuda_kernel():
    assert backends.available(OP, DEVICE)[0] == BACKEND


def test_runs_on_the_current_stream():
    g = torch.Generator().manual_seed(9)
    features, lengths = padded([clustered(n, 16, generator=g) for n in (400, 17, 0)])
    want = select(features, lengths, 50)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), backends.use_backend(BACKEND):
        got = mrprune.diversity_select(features.to(DEVICE), lengths.to(DEVICE), 50)
    stream.synchronize()
    assert torch.equal(got.cpu(), want)


def test_private_op_rejects_bad_arguments():
    features, lengths = torch.randn(2, 10, 4, device=DEVICE), torch.tensor([10, 3], device=DEVICE)
    op = getattr(torch.ops.mrprune, PRIVATE_OP)
    with pytest.raises(RuntimeError, match="k must lie"):
        op(features, lengths, 11, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(features.double(), lengths, 3, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(2, 4, 10, device=DEVICE).transpose(1, 2), lengths, 3, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(features, lengths.int(), 3, True)
    with pytest.raises(RuntimeError, match="shape"):
        op(features, lengths[:1], 3, True)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op(features, lengths.cpu(), 3, True)


@pytest.mark.parametrize("mask_picked", [True, False])
def test_opcheck(mask_picked):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on CUDA tensors."""
    g = torch.Generator().manual_seed(1)
    features, lengths = padded([clustered(n, 8, generator=g) for n in (11, 0, 6)])
    features, lengths = features.to(DEVICE), lengths.to(DEVICE)
    for args in ((features, lengths, 4, mask_picked), (features.half(), lengths, 11, mask_picked)):
        with backends.use_backend(BACKEND):
            torch.library.opcheck(torch.ops.mrprune.diversity_select.default, args)


@pytest.mark.parametrize("mask_picked", [True, False])
def test_torch_compile_fullgraph(mask_picked):
    """torch.compile(fullgraph=True) on CUDA tensors traces the op without graph breaks and returns the eager picks."""
    torch._dynamo.reset()

    def pick(features, lengths):
        return mrprune.diversity_select(features * 2.0, lengths, 5, mask_picked=mask_picked)

    compiled = torch.compile(pick, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 5)):
        features, lengths = padded([clustered(n, 8, generator=g) for n in sizes])
        features, lengths = features.to(DEVICE), lengths.to(DEVICE)
        with backends.use_backend(BACKEND):
            got, want = compiled(features, lengths), pick(features, lengths)
        assert torch.equal(got, want)
