"""The CUDA C++ topk_indices kernel (csrc/cuda/topk_indices.cu) against the eager reference on CPU copies.

Rank counting is exact, so every comparison is bitwise: same indices, same order, same -1 padding.
"""

from __future__ import annotations

import pytest
import torch

import mrprune
from mrprune import backends, reference

pytestmark = [pytest.mark.cuda, pytest.mark.ext]

OP = "topk_indices"
INF = float("inf")


@pytest.fixture(autouse=True)
def _needs_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mrprune::_topk_indices_cuda", "CUDA"), (
        "mrprune._C was built without the CUDA kernels"
    )
    assert "cuda" in backends.available(OP, "cuda")


def expected(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool) -> torch.Tensor:
    return reference.topk_indices(scores.cpu(), lengths.cpu(), k, sort_indices)


def via_public_op(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool) -> torch.Tensor:
    with backends.use_backend("cuda"):
        return mrprune.topk_indices(scores.cuda(), lengths.cuda(), k, sort_indices=sort_indices)


def via_private_op(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool) -> torch.Tensor:
    return torch.ops.mrprune._topk_indices_cuda(
        scores.to("cuda", torch.float32).contiguous(), lengths.to("cuda", torch.int64), k, sort_indices
    )


def check(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool) -> None:
    want = expected(scores, lengths, k, sort_indices)
    for call in (via_public_op, via_private_op):
        got = call(scores, lengths, k, sort_indices)
        assert got.device.type == "cuda" and got.dtype == torch.int64 and got.shape == (scores.shape[0], k)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, msg=lambda m, c=call: f"{c.__name__}: {m}")


def make_scores(kind: str, batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(batch, tokens, generator=generator)
    if kind == "ties":  # integer scores: most comparisons are ties
        return torch.randint(0, 4, (batch, tokens), generator=generator).float()
    if kind == "constant":
        return torch.full((batch, tokens), 0.5)
    if kind == "inf":  # +-inf mixed with ties and signed zeros
        values = torch.tensor([-INF, INF, 0.0, -0.0, 1.0, -1.0])
        return values[torch.randint(0, len(values), (batch, tokens), generator=generator)]
    raise ValueError(kind)


def padded_lengths(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Random lengths in [0, N] with an empty item, a full item and a partial one whenever the batch allows."""
    lengths = torch.randint(0, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    if batch > 1:
        lengths[1] = 0
    if batch > 2:
        lengths[2] = max(tokens // 2 - 1, 0)
    return lengths


def with_garbage(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Padding holds values above every valid score (+inf and 1e30): a kernel that reads it picks it."""
    scores = scores.clone()
    for b, n in enumerate(lengths.tolist()):
        tail = scores[b, n:]
        tail.copy_(torch.where(torch.arange(tail.numel()) % 2 == 0, INF, 1e30))
    return scores


def budgets(lengths: torch.Tensor, tokens: int) -> list[int]:
    """k in {0, 1, n, N} (n: a partial item's length) plus one in between."""
    partial = [n for n in lengths.tolist() if 0 < n < tokens]
    ks = {0, min(1, tokens), tokens, (partial[0] if partial else tokens // 2), tokens // 3}
    return sorted(k for k in ks if 0 <= k <= tokens)


@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "inf"])
@pytest.mark.parametrize(
    "batch,tokens",
    # around the 256-token tile: 1 token, partial tile, exact tiles, one past, the LLaVA-style 576 / 2304 grids.
    [(1, 1), (3, 7), (2, 255), (4, 256), (3, 257), (5, 576), (8, 1000), (2, 2304)],
)
def test_matches_reference(batch, tokens, kind, sort_indices):
    generator = torch.Generator().manual_seed(batch * 100_003 + tokens)
    lengths = padded_lengths(batch, tokens, generator)
    scores = with_garbage(make_scores(kind, batch, tokens, generator), lengths)
    for k in budgets(lengths, tokens):
        check(scores, lengths, k, sort_indices)


@pytest.mark.slow
@pytest.mark.parametrize("sort_indices", [False, True])
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("batch,tokens", [(8, 16_384), (2, 65_536), (8, 65_536)])
def test_large(batch, tokens, kind, sort_indices):
    generator = torch.Generator().manual_seed(tokens + batch)
    lengths = padded_lengths(batch, tokens, generator)
    scores = with_garbage(make_scores(kind, batch, tokens, generator), lengths)
    for k in (1, 2304, tokens):
        check(scores, lengths, k, sort_indices)


@pytest.mark.parametrize("sort_indices", [False, True])
def test_all_items_empty(sort_indices):
    scores = torch.randn(3, 300)
    lengths = torch.zeros(3, dtype=torch.int64)
    for k in (0, 1, 300):
        check(scores, lengths, k, sort_indices)
        assert bool((via_public_op(scores, lengths, k, sort_indices) == -1).all())


@pytest.mark.parametrize("sort_indices", [False, True])
def test_ties_go_to_the_lower_index(sort_indices):
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, -0.0, 0.0, 2.0]])
    lengths = torch.tensor([8])
    got = via_public_op(scores, lengths, 5, sort_indices).cpu()
    want = [[1, 2, 4, 7, 0]] if not sort_indices else [[0, 1, 2, 4, 7]]
    assert got.tolist() == want


@pytest.mark.parametrize("sort_indices", [False, True])
def test_batch_equals_per_item(sort_indices):
    generator = torch.Generator().manual_seed(7)
    batch, tokens, k = 6, 700, 300
    lengths = padded_lengths(batch, tokens, generator)
    scores = with_garbage(make_scores("ties", batch, tokens, generator), lengths)
    batched = via_public_op(scores, lengths, k, sort_indices)
    for b in range(batch):
        single = via_public_op(scores[b : b + 1], lengths[b : b + 1], k, sort_indices)
        torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=0)
        # Trimming the padding away changes nothing either.
        n = int(lengths[b])
        trimmed = via_public_op(scores[b : b + 1, :n], lengths[b : b + 1], min(k, n), sort_indices)
        torch.testing.assert_close(batched[b : b + 1, : min(k, n)], trimmed, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_router_converts_inputs(dtype):
    # Non-contiguous low-precision scores and int32 lengths reach the kernel as contiguous float32 / int64.
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 50, (400, 5), generator=generator).to(dtype).t()  # [5, 400], non-contiguous
    lengths = torch.tensor([400, 0, 17, 256, 399], dtype=torch.int32)
    for sort_indices in (False, True):
        check(scores, lengths, 100, sort_indices)


def test_auto_backend_on_cuda_is_the_cuda_kernel():
    assert backends.available(OP, "cuda")[0] == "cuda"
    scores, lengths = torch.randn(2, 50, device="cuda"), torch.tensor([50, 20], device="cuda")
    torch.testing.assert_close(mrprune.topk_indices(scores, lengths, 30).cpu(), expected(scores, lengths, 30, False))


def test_runs_on_the_current_stream():
    scores, lengths = torch.randn(4, 3000), torch.tensor([3000, 10, 0, 2999])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = via_public_op(scores, lengths, 500, True)
    stream.synchronize()
    torch.testing.assert_close(got.cpu(), expected(scores, lengths, 500, True), rtol=0, atol=0)


def test_private_op_rejects_bad_arguments():
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


@pytest.mark.parametrize("sort_indices", [False, True])
def test_opcheck(sort_indices):
    generator = torch.Generator().manual_seed(11)
    lengths = torch.tensor([300, 0, 129])
    scores = with_garbage(make_scores("ties", 3, 300, generator), lengths).cuda()
    with backends.use_backend("cuda"):
        torch.library.opcheck(torch.ops.mrprune.topk_indices.default, (scores, lengths.cuda(), 64, sort_indices))


@pytest.mark.parametrize("sort_indices", [False, True])
def test_torch_compile_fullgraph(sort_indices):
    torch._dynamo.reset()

    def pick(scores, lengths):
        return mrprune.topk_indices(scores * 2.0, lengths, 40, sort_indices=sort_indices)

    compiled = torch.compile(pick, fullgraph=True)
    generator = torch.Generator().manual_seed(5)
    lengths = torch.tensor([500, 33, 0, 40])
    scores = with_garbage(make_scores("ties", 4, 500, generator), lengths)
    with backends.use_backend("cuda"):
        got = compiled(scores.cuda(), lengths.cuda())
    torch.testing.assert_close(got.cpu(), expected(scores * 2.0, lengths, 40, sort_indices), rtol=0, atol=0)
