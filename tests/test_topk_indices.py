"""topk_indices: reference vs brute force, kernels vs reference, batch invariance, validation, opcheck, compile.

Spec (``mrprune.reference.topk_indices``): per item, the ``k`` largest of the ``n_b`` valid scores, larger score first
and ties to the lower index (-0.0 and 0.0 are equal); ``sort_indices`` returns the same picks ascending; -1 past
``n_b``. Padding here holds +inf, which would win every comparison if it were ever read.
"""

from __future__ import annotations

import functools

import pytest
import torch

import mrprune
from tests.utils import CUDA, device_of, kernel_backends, run

OP = "topk_indices"
BACKENDS = kernel_backends(OP)
# The CUDA C++ kernel (GPU only) is one more implementation: inputs are copied to the GPU, results back.
KERNELS = [*BACKENDS, CUDA]
IMPLS = [*BACKENDS, "reference", CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def brute_force(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool) -> torch.Tensor:
    """Python ``sorted`` with the key ``(-score, index)`` on each item's valid prefix, padded with -1."""
    out = []
    for row, n in zip(scores.double().tolist(), lengths.tolist(), strict=True):
        top = sorted(range(n), key=lambda i: (-row[i], i))[:k]  # -(-0.0) == -(0.0): zeros tie
        if sort_indices:
            top = sorted(top)
        out.append(top + [-1] * (k - len(top)))
    return torch.tensor(out, dtype=torch.int64).reshape(len(out), k)


def make_scores(case: str, lengths: list[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A padded ``[B, N]`` batch of ``case`` scores with +inf garbage in the padding."""
    n_pad = max(lengths)
    shape = (len(lengths), n_pad)
    if case == "ties":  # integer-valued: many exact ties
        scores = torch.randint(-3, 4, shape, generator=generator).float()
    elif case == "infs":  # +-inf among few distinct finite values
        scores = torch.randint(-2, 3, shape, generator=generator).float()
        pick = torch.rand(shape, generator=generator)
        scores[pick < 0.15] = float("-inf")
        scores[pick > 0.85] = float("inf")
    elif case == "zeros":  # -0.0 and 0.0 (equal) among +-1
        scores = torch.randint(-1, 2, shape, generator=generator).float()
        negative_zero = (scores == 0) & (torch.rand(shape, generator=generator) < 0.5)
        scores[negative_zero] = -0.0
    else:  # distinct random values (plus one exact tie per row)
        scores = torch.randn(shape, generator=generator)
        scores[:, -1] = scores[:, 0]
    scores = scores.to(dtype)
    for b, n in enumerate(lengths):
        scores[b, n:] = float("inf")
    return scores


# --- 1. reference vs brute force -------------------------------------------------------------------------------


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["ties", "infs", "zeros", "random"])
def test_reference_matches_brute_force(case, dtype, sort_indices):
    """The reference equals Python ``sorted`` by ``(-score, index)`` for every k, with ties, infs and signed zeros."""
    lengths = [23, 0, 9, 1, 30]
    scores = make_scores(case, lengths, dtype, torch.Generator().manual_seed(1))
    lens = torch.tensor(lengths)
    for k in range(0, 31):
        got = mrprune.reference.topk_indices(scores, lens, k, sort_indices)
        assert got.dtype == torch.int64
        assert torch.equal(got, brute_force(scores, lens, k, sort_indices)), k


def test_brute_force_orders_ties_and_zeros():
    """The brute force itself: ties to the lower index, -0.0 == 0.0, +inf first and -inf last."""
    scores = torch.tensor([[0.0, -0.0, 2.0, float("-inf"), 2.0, -0.0, float("inf")]])
    assert brute_force(scores, torch.tensor([7]), 7, False).tolist() == [[6, 2, 4, 0, 1, 5, 3]]
    assert brute_force(scores, torch.tensor([5]), 6, True).tolist() == [[0, 1, 2, 3, 4, -1]]


# --- 2. kernels vs reference -----------------------------------------------------------------------------------

LENGTHS = [37, 0, 36, 1, 50, 49]
K_VALUES = {"0": 0, "1": 1, "n-1": 36, "n": 37, "N": 50}


@pytest.mark.parametrize("k", list(K_VALUES.values()), ids=list(K_VALUES))
@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("case", ["ties", "infs", "zeros", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", IMPLS)
def test_matches_reference_and_brute_force(backend, dtype, case, sort_indices, k):
    """Every implementation equals the reference and the brute force on padded batches (garbage +inf padding)."""
    scores = make_scores(case, LENGTHS, dtype, torch.Generator().manual_seed(2))
    lengths = torch.tensor(LENGTHS)
    got = run(OP, backend, scores, lengths, k, sort_indices)
    assert got.dtype == torch.int64 and got.shape == (len(LENGTHS), k)
    assert torch.equal(got, mrprune.reference.topk_indices(scores, lengths, k, sort_indices))
    assert torch.equal(got, brute_force(scores, lengths, k, sort_indices))


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("backend", IMPLS)
def test_signed_zeros_and_infinities_exact(backend, sort_indices):
    """Hand-checked order: +inf, then 1, then the zeros by index (signs ignored), then -inf."""
    scores = torch.tensor([[-0.0, float("-inf"), 0.0, 1.0, -0.0, float("inf"), 0.0, float("-inf")]])
    got = run(OP, backend, scores, torch.tensor([8]), 6, sort_indices)
    want = [5, 3, 0, 2, 4, 6]
    assert got.tolist() == [sorted(want) if sort_indices else want]


@pytest.mark.parametrize("backend", IMPLS)
def test_float64_resolution_is_kept(backend):
    """float64 scores closer than float32 resolution are still ordered exactly (float64 is never rounded)."""
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 - 1e-12, 1.0 + 2e-12]], dtype=torch.float64)
    assert run(OP, backend, scores, torch.tensor([4]), 4).tolist() == [[3, 1, 0, 2]]


@pytest.mark.parametrize("backend", IMPLS)
def test_non_contiguous_scores_and_int32_lengths(backend):
    """A transposed (non-contiguous) score view and int32 lengths give the brute-force result."""
    base = torch.randint(0, 5, (40, 3), generator=torch.Generator().manual_seed(3)).float()
    scores = base.T  # [3, 40], non-contiguous
    lengths = torch.tensor([40, 17, 0], dtype=torch.int32)
    for sort_indices in (False, True):
        got = run(OP, backend, scores, lengths, 20, sort_indices)
        assert torch.equal(got, brute_force(scores, lengths.long(), 20, sort_indices))


@functools.cache
def _large_case():
    """100k integer scores in [0, 50) (about 2000-way ties); item 1 has 77,777 tokens, item 2 none. Also returns
    each item's full order by a stable sort of the negated scores (exact for integers): the spec's order."""
    n_pad = 100_000
    scores = torch.randint(0, 50, (3, n_pad), generator=torch.Generator().manual_seed(4)).float()
    lengths = torch.tensor([n_pad, 77_777, 0])
    scores[1, 77_777:] = float("inf")
    orders = [torch.sort(-scores[b, :n], stable=True).indices for b, n in enumerate(lengths.tolist())]
    return scores, lengths, orders


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("k", [1000, 99_999])
@pytest.mark.parametrize("backend", IMPLS)
def test_large_heavy_ties(backend, k, sort_indices):
    """100k tokens with heavy ties and a shorter item, k below and above its length: still exact."""
    scores, lengths, orders = _large_case()
    got = run(OP, backend, scores, lengths, k, sort_indices)
    for b, n in enumerate(lengths.tolist()):
        m = min(k, n)
        want = orders[b][:m].sort().values if sort_indices else orders[b][:m]
        assert torch.equal(got[b, :m], want)
        assert bool((got[b, m:] == -1).all())
    assert int((got[1] >= 0).sum()) == min(k, 77_777)


def padded_lengths(batch: int, tokens: int, generator: torch.Generator) -> list[int]:
    """Random lengths in [0, N] with a full item, an empty one and a partial one whenever the batch allows."""
    lengths = torch.randint(0, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    if batch > 1:
        lengths[1] = 0
    if batch > 2:
        lengths[2] = max(tokens // 2 - 1, 0)
    return lengths.tolist()


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("case", ["ties", "infs", "random"])
@pytest.mark.parametrize(
    "batch,tokens",
    # around the CUDA kernel's 256-token tile: 1 token, partial tile, exact tiles, one past, LLaVA-style grids.
    [(1, 1), (3, 7), (2, 255), (4, 256), (3, 257), (5, 576), (8, 1000), (2, 2304)],
)
@pytest.mark.parametrize("backend", KERNELS)
def test_tile_boundaries(backend, batch, tokens, case, sort_indices):
    """Sizes around the tile width, padded items with +inf garbage, k in {0, 1, a partial length, N / 3, N}."""
    generator = torch.Generator().manual_seed(batch * 100_003 + tokens)
    lengths = padded_lengths(batch, tokens, generator)
    scores = make_scores(case, lengths, torch.float32, generator)
    lens = torch.tensor(lengths)
    partial = [n for n in lengths if 0 < n < tokens]
    for k in sorted({0, 1, tokens, partial[0] if partial else tokens // 2, tokens // 3}):
        got = run(OP, backend, scores, lens, k, sort_indices)
        assert torch.equal(got, mrprune.reference.topk_indices(scores, lens, k, sort_indices)), k


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("backend", IMPLS)
def test_all_items_empty(backend, sort_indices):
    """Every item empty: -1 everywhere, whatever k."""
    scores, lengths = torch.randn(3, 300), torch.zeros(3, dtype=torch.int64)
    for k in (0, 1, 300):
        got = run(OP, backend, scores, lengths, k, sort_indices)
        assert got.shape == (3, k) and bool((got == -1).all())


# --- 3. batch equals per item, bad input, opcheck, compile -----------------------------------------------------


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("backend", IMPLS)
def test_batch_equals_per_item(backend, sort_indices):
    """Each item alone (same padded width, or unpadded) gives exactly its row of the batched result."""
    scores = make_scores("ties", LENGTHS, torch.float32, torch.Generator().manual_seed(5))
    lengths = torch.tensor(LENGTHS)
    k = 30
    batched = run(OP, backend, scores, lengths, k, sort_indices)
    for b, n in enumerate(LENGTHS):
        alone = run(OP, backend, scores[b : b + 1].clone(), lengths[b : b + 1], k, sort_indices)
        assert torch.equal(alone[0], batched[b])
        if n:
            m = min(k, n)
            alone = run(OP, backend, scores[b : b + 1, :n].clone(), lengths[b : b + 1], m, sort_indices)
            assert torch.equal(alone[0], batched[b, :m])


def _good_args() -> dict:
    return {"scores": torch.randn(2, 6), "lengths": torch.tensor([6, 3]), "k": 3, "sort_indices": False}


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[1, 2] = float("nan")
    return t


BAD_INPUTS = {
    "scores_nan": (lambda a: {"scores": _with_nan(a["scores"])}, ValueError, "scores contain NaN"),
    "scores_1d": (lambda a: {"scores": a["scores"][0]}, ValueError, "scores must be 2-D"),
    "scores_3d": (lambda a: {"scores": a["scores"][None]}, ValueError, "scores must be 2-D"),
    "scores_int": (lambda a: {"scores": a["scores"].long()}, TypeError, "scores must be float16"),
    "k_negative": (lambda a: {"k": -1}, ValueError, r"k must lie in \[0, N=6\]"),
    "k_above_n": (lambda a: {"k": 7}, ValueError, r"k must lie in \[0, N=6\]"),
    "lengths_above": (lambda a: {"lengths": torch.tensor([7, 3])}, ValueError, r"lengths must lie in \[0, 6\]"),
    "lengths_negative": (lambda a: {"lengths": torch.tensor([6, -2])}, ValueError, r"lengths must lie in \[0, 6\]"),
    "lengths_shape": (lambda a: {"lengths": torch.tensor([6, 3, 1])}, ValueError, r"lengths must have shape \(2,\)"),
    "lengths_float": (lambda a: {"lengths": torch.tensor([6.0, 3.0])}, TypeError, "lengths must be int32 or int64"),
    "lengths_meta": (lambda a: {"lengths": a["lengths"].to("meta")}, ValueError, "lengths is on meta"),
    "scores_meta": (lambda a: {"scores": a["scores"].to("meta")}, ValueError, "lengths is on cpu but scores"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_bad_input(backend, case):
    """Invalid arguments raise a clear error naming the op and the argument, whatever the backend."""
    change, error, message = BAD_INPUTS[case]
    args = _good_args()
    args.update(change(args))
    with mrprune.backends.use_backend(backend), pytest.raises(error, match=message) as info:
        mrprune.topk_indices(*args.values())  # not run(): it would refuse a meta first argument
    assert "mrprune.topk_indices" in str(info.value)


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("backend", IMPLS)
def test_opcheck(backend, sort_indices):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) passes."""
    scores = make_scores("ties", [9, 0, 5], torch.float32, torch.Generator().manual_seed(6))
    scores[:, 5:] = 0  # opcheck also traces: keep the padding finite but still ignorable
    device = device_of(backend)
    with mrprune.backends.use_backend(backend):
        result = torch.library.opcheck(
            torch.ops.mrprune.topk_indices.default,
            (scores.to(device), torch.tensor([9, 0, 5], device=device), 4, sort_indices),
        )
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True) equals eager, in both sort modes, also on new values of the same shapes."""

    def select(scores, lengths):
        return mrprune.topk_indices(scores, lengths, 5), mrprune.topk_indices(scores, lengths, 5, sort_indices=True)

    torch._dynamo.reset()
    compiled = torch.compile(select, fullgraph=True)
    device = device_of(backend)
    lengths = torch.tensor([9, 0, 6])
    with mrprune.backends.use_backend(backend):
        for seed in (0, 1):
            scores = make_scores("ties", [9, 0, 6], torch.float32, torch.Generator().manual_seed(seed))
            got = compiled(scores.to(device), lengths.to(device))
            want = select(scores.to(device), lengths.to(device))
            assert got[0].device.type == device
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert torch.equal(got[0].cpu(), brute_force(scores, lengths, 5, False))


# --- 4. the CUDA kernel's own contract (GPU only) ----------------------------------------------------------------

cuda_only = pytest.mark.parametrize("backend", [CUDA])


@cuda_only
def test_cuda_auto_backend_is_the_cuda_kernel(backend):
    """On CUDA tensors the auto route picks the CUDA C++ kernel."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mrprune::_topk_indices_cuda", "CUDA")
    assert mrprune.backends.available(OP, "cuda")[0] == "cuda"
    scores, lengths = torch.randn(2, 50), torch.tensor([50, 20])
    got = mrprune.topk_indices(scores.cuda(), lengths.cuda(), 30)
    assert torch.equal(got.cpu(), mrprune.reference.topk_indices(scores, lengths, 30))


@cuda_only
def test_cuda_runs_on_the_current_stream(backend):
    """The kernel is launched on the current stream (a side stream here), so the result is ready after it syncs."""
    scores, lengths = torch.randn(4, 3000), torch.tensor([3000, 10, 0, 2999])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), mrprune.backends.use_backend("cuda"):
        got = mrprune.topk_indices(scores.cuda(), lengths.cuda(), 500, sort_indices=True)
    stream.synchronize()
    assert torch.equal(got.cpu(), mrprune.reference.topk_indices(scores, lengths, 500, True))


@cuda_only
def test_cuda_private_op_rejects_bad_arguments(backend):
    """The launcher's own checks behind the router: clear errors, never a bad launch."""
    scores, lengths = torch.randn(2, 10, device="cuda"), torch.tensor([10, 3], device="cuda")
    op = torch.ops.mrprune._topk_indices_cuda
    with pytest.raises(RuntimeError, match="k must lie"):
        op(scores, lengths, 11, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(scores.double(), lengths, 3, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(10, 2, device="cuda").t(), lengths, 3, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(scores, lengths.int(), 3, False)
    with pytest.raises(RuntimeError, match="shape"):
        op(scores, lengths[:1], 3, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op(scores, lengths.cpu(), 3, False)
