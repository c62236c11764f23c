"""received_attention (the attention each token receives, head-averaged): reference, kernels, segments, errors, compile.

The reference (``mrprune.reference.received_attention``) is checked against a brute force written with Python loops
and ``math``; every kernel is checked against the float64 reference on the same (rounded) inputs, with and without
segments, on padded batches, in every input dtype, and at tile sizes that make the segment tile ranges matter.
"""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import INPUT_DTYPES, kernel_backends, triton_test

OP = "received_attention"
KERNELS = kernel_backends(OP)
RTOL, ATOL = 1e-5, 1e-6


def call(backend: str, *args, **kwargs) -> torch.Tensor:
    """The public op with ``backend`` forced (fails if that backend does not serve it)."""
    assert backend in backends.available(OP, args[0].device), f"{backend} does not implement {OP}"
    with backends.use_backend(backend):
        return ops.received_attention(*args, **kwargs)


def oracle(q, k, lengths, segment_ids=None, scale=None) -> torch.Tensor:
    return reference.received_attention(q.double(), k.double(), lengths, segment_ids, scale)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=ATOL)


# --- independent brute force --------------------------------------------------------------------------------------


def brute_item(q: list, k: list, n: int, segments: list | None, scale: float) -> list[float]:
    """Loops over heads, queries and keys: softmax of each query row over the keys of its segment, then column sums,
    then the mean over heads."""
    heads = len(q)
    out = [0.0] * n
    for h in range(heads):
        for i in range(n):
            keys = [j for j in range(n) if segments is None or segments[j] == segments[i]]
            logits = [scale * math.fsum(a * b for a, b in zip(q[h][i], k[h][j], strict=True)) for j in keys]
            top = max(logits)
            weights = [math.exp(z - top) for z in logits]
            total = math.fsum(weights)
            for j, w in zip(keys, weights, strict=True):
                out[j] += w / total / heads
    return out


def brute(q, k, lengths, segment_ids=None, scale=None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape[0], q.shape[2], dtype=torch.float64)
    for b in range(q.shape[0]):
        n = int(lengths[b])
        segments = None if segment_ids is None else segment_ids[b, :n].tolist()
        qb, kb = q[b, :, :n].double().tolist(), k[b, :, :n].double().tolist()
        out[b, :n] = torch.tensor(brute_item(qb, kb, n, segments, scale), dtype=torch.float64)
    return out


def random_case(batch, heads, tokens, dim, generator, segments=False, sorted_ids=True, spread=1.0):
    q = torch.randn(batch, heads, tokens, dim, generator=generator) * spread
    k = torch.randn(batch, heads, tokens, dim, generator=generator) * spread
    lengths = torch.randint(0, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    seg = None
    if segments:
        seg = torch.randint(0, 3, (batch, tokens), generator=generator)
        if sorted_ids:
            seg = seg.sort(dim=1).values
    # garbage in the padding, which must be ignored
    for b, n in enumerate(lengths.tolist()):
        q[b, :, n:] = 1e3
        k[b, :, n:] = -1e3
    return q, k, lengths, seg


# --- 0. the kernels exist ----------------------------------------------------------------------------------------


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_brute_force(seed, segments):
    """The float64 reference equals the loop-and-math brute force on tiny padded batches, with and without segments
    (unsorted segment ids included), with the default and an explicit scale."""
    g = torch.Generator().manual_seed(seed)
    tokens, dim = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    q, k, lengths, seg = random_case(3, 2, tokens, dim, g, segments, sorted_ids=seed % 2 == 0)
    q, k = q.double(), k.double()
    for scale in (None, 0.7):
        want = brute(q, k, lengths, seg, scale)
        torch.testing.assert_close(reference.received_attention(q, k, lengths, seg, scale), want, rtol=1e-12, atol=0)


# --- 2. kernels vs reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("segments", [False, True])
def test_kernel_matches_reference(backend, segments):
    """Padded batch (garbage padding, an item of length 0), sorted segments: float32 kernel vs float64 reference."""
    g = torch.Generator().manual_seed(1)
    q, k, lengths, seg = random_case(3, 2, 45, 24, g, segments)
    lengths[1] = 0
    got = call(backend, q, k, lengths, seg)
    assert got.dtype == torch.float32 and got.shape == (3, 45)
    close(got, oracle(q, k, lengths, seg))
    assert got[1].abs().sum() == 0
    for b, n in enumerate(lengths.tolist()):
        assert got[b, n:].abs().sum() == 0, "padding must score 0"
        # every softmax row sums to 1, so an item's scores sum to its number of queries
        assert math.isclose(float(got[b].double().sum()), n, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    """float32/float16/bfloat16 q and k: the kernel matches the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(2)
    q, k, lengths, seg = random_case(2, 3, 37, 20, g, segments=True)
    q, k = q.to(dtype), k.to(dtype)
    close(call(backend, q, k, lengths, seg), oracle(q, k, lengths, seg))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_sharp_and_scaled_logits(backend):
    """Large logits (a peaked softmax: the max subtraction matters) and an explicit scale."""
    g = torch.Generator().manual_seed(3)
    q, k, lengths, _ = random_case(1, 2, 30, 16, g, spread=4.0)
    for scale in (None, 2.0, 1e-3):
        close(call(backend, q, k, lengths, None, scale), oracle(q, k, lengths, None, scale))


@pytest.mark.parametrize("backend", KERNELS)
def test_segments_are_independent(backend):
    """With segments, each segment's scores equal those of the segment run alone (Qwen2.5-VL's window blocks), for
    the ids :func:`mrprune.ops.segment_ids_from_cu_seqlens` derives from ``cu_seqlens``."""
    g = torch.Generator().manual_seed(4)
    tokens = 40
    q, k, lengths, _ = random_case(1, 2, tokens, 8, g)
    cu = torch.tensor([0, 7, 20, 21, 40], dtype=torch.int32)
    seg = ops.segment_ids_from_cu_seqlens(cu, tokens)[None]
    assert seg[0].tolist() == [0] * 7 + [1] * 13 + [2] + [3] * 19
    got = call(backend, q, k, lengths, seg)
    for s in range(4):
        lo, hi = int(cu[s]), int(cu[s + 1])
        alone = call(backend, q[:, :, lo:hi].contiguous(), k[:, :, lo:hi].contiguous(), torch.tensor([hi - lo]))
        close(got[:, lo:hi], alone)
    assert math.isclose(float(got[0, 20]), 1.0, rel_tol=1e-6), "a one-token segment attends only itself"


@pytest.mark.parametrize("backend", KERNELS)
def test_unsorted_segment_ids(backend):
    """Segment ids in any order (not contiguous blocks) are masked exactly too."""
    g = torch.Generator().manual_seed(5)
    q, k, lengths, seg = random_case(2, 2, 33, 8, g, segments=True, sorted_ids=False)
    close(call(backend, q, k, lengths, seg), oracle(q, k, lengths, seg))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_odd_sizes(backend):
    """N = 1 (the token receives exactly 1), d = 1, sizes off every tile multiple."""
    g = torch.Generator().manual_seed(6)
    for heads, tokens, dim in ((1, 1, 1), (2, 1, 5), (1, 17, 1), (3, 65, 3)):
        q, k, lengths, _ = random_case(1, heads, tokens, dim, g)
        got = call(backend, q, k, lengths)
        close(got, oracle(q, k, lengths))
    one = call(backend, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.tensor([1]))
    assert one.tolist() == [[1.0]]


@pytest.mark.parametrize("backend", KERNELS)
def test_int32_ids_and_strided_inputs(backend):
    """int32 lengths and segment ids and non-contiguous q/k give the same scores as int64 and contiguous ones."""
    g = torch.Generator().manual_seed(7)
    q, k, lengths, seg = random_case(2, 2, 21, 8, g, segments=True)
    want = call(backend, q, k, lengths, seg)
    strided_q = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided_q.is_contiguous()
    torch.testing.assert_close(call(backend, strided_q, k, lengths.int(), seg.int()), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_batch_equals_per_item(backend):
    """Each item of a padded batch scores the same alone, padded or trimmed."""
    g = torch.Generator().manual_seed(8)
    q, k, lengths, seg = random_case(3, 2, 26, 8, g, segments=True)
    batch = call(backend, q, k, lengths, seg)
    for b, n in enumerate(lengths.tolist()):
        alone = call(backend, q[b : b + 1], k[b : b + 1], lengths[b : b + 1], seg[b : b + 1])
        torch.testing.assert_close(alone, batch[b : b + 1], rtol=1e-6, atol=1e-7)
        trimmed = call(
            backend,
            q[b : b + 1, :, :n].contiguous(),
            k[b : b + 1, :, :n].contiguous(),
            lengths[b : b + 1],
            seg[b : b + 1, :n].contiguous(),
        )
        torch.testing.assert_close(trimmed[0], batch[b, :n], rtol=1e-6, atol=1e-7)


# --- 3. Triton tiles ---------------------------------------------------------------------------------------------


@triton_test
@pytest.mark.parametrize("sorted_ids", [True, False])
def test_triton_small_tiles_with_segments(sorted_ids):
    """16-token tiles over 70 tokens and segments crossing tile borders: the per-tile ranges skip only tiles that
    share no segment (sorted ids) and cover everything needed (unsorted ids)."""
    from mrprune.triton_kernels.received_attention import received_attention_triton, tile_ranges

    g = torch.Generator().manual_seed(9)
    q, k, lengths, _ = random_case(2, 2, 70, 16, g)
    lengths[1] = 50
    cu = torch.tensor([0, 5, 18, 40, 41, 70])
    seg = ops.segment_ids_from_cu_seqlens(cu, 70)[None].repeat(2, 1)
    if not sorted_ids:
        seg = seg[:, torch.randperm(70, generator=g)]
    got = received_attention_triton(q, k, lengths, seg, block=16)
    close(got, oracle(q, k, lengths, seg))
    if sorted_ids:
        ranges = tile_ranges(seg, lengths, 70, 16)
        # tile 0 (tokens 0-15: segments 0, 1) reaches tiles 0-1 (segment 1 ends at 17); tile 4 (64-69, segment 4)
        # reaches tiles 2-4 (segment 4 starts at 41); item 1 has 4 live tiles (50 tokens), tile 4 is empty
        assert ranges[0, 0].tolist() == [0, 2] and ranges[0, 4].tolist() == [2, 5]
        assert ranges[1, 3].tolist() == [2, 4] and ranges[1, 4].tolist() == [0, 0]


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("segments", [False, True])
def test_triton_head_dim_in_steps(dtype, segments):
    """A 40-feature head in 16-feature steps (the float32 GPU path steps over the head dimension): three steps, the
    last one masked past the head, give the same scores as the reference."""
    from mrprune.triton_kernels.received_attention import received_attention_triton

    g = torch.Generator().manual_seed(11)
    q, k, lengths, seg = random_case(2, 3, 37, 40, g, segments=segments)
    q, k = q.to(dtype), k.to(dtype)
    got = received_attention_triton(q, k, lengths, seg, block=16, block_d=16)
    close(got, oracle(q, k, lengths, seg))


# --- 4. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    q = torch.randn(2, 3, 5, 4)
    lengths = torch.tensor([5, 3])
    nan = q.clone()
    nan[0, 1, 2, 0] = math.nan
    return {
        "rank3": ((q[0], q[0], lengths), ValueError, "q must be 4-D"),
        "int_q": ((q.long(), q.long(), lengths), TypeError, "q must be float16"),
        "k_shape": ((q, q[:, :2], lengths), ValueError, "k must match q"),
        "k_dtype": ((q, q.double(), lengths), ValueError, "k must match q"),
        "no_heads": ((q[:, :0], q[:, :0], lengths), ValueError, "q and k need at least one head"),
        "length_above_N": ((q, q, torch.tensor([6, 3])), ValueError, "lengths must lie in"),
        "float_lengths": ((q, q, lengths.float()), TypeError, "lengths must be int32 or int64"),
        "segment_shape": ((q, q, lengths, torch.zeros(2, 4, dtype=torch.int64)), ValueError, "segment_ids must have"),
        "segment_dtype": ((q, q, lengths, torch.zeros(2, 5)), TypeError, "segment_ids must be int32 or int64"),
        "scale_zero": ((q, q, lengths, None, 0.0), ValueError, "scale must be positive"),
        "scale_nan": ((q, q, lengths, None, math.nan), ValueError, "scale must be a finite number"),
        "nan": ((nan, q, lengths), ValueError, "q contains NaN or Inf"),
        "lengths_on_meta": ((q, q, lengths.to("meta")), ValueError, "lengths is on meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    """Invalid arguments raise a clear error naming the op and the argument, whatever the backend."""
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.received_attention: {fragment}"):
        ops.received_attention(*args)


# --- 5. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    """torch.library.opcheck (schema, fake tensor, AOT dispatch) passes, with and without segments and scale."""
    g = torch.Generator().manual_seed(10)
    q, k, lengths, seg = random_case(2, 2, 11, 8, g, segments=True)
    for args in ((q, k, lengths, None, None), (q.half(), k.half(), lengths, seg, 0.5)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.received_attention.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True, dynamic=True) traces the op without graph breaks and returns the eager scores."""

    def scores(q, k, lengths, seg):
        return ops.received_attention(q, k, lengths), ops.received_attention(q, k, lengths, seg, 0.3)

    compiled = torch.compile(scores, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(11)
    for tokens in (13, 21):
        q, k, lengths, seg = random_case(2, 2, tokens, 8, g, segments=True)
        with backends.use_backend(backend):
            got, want = compiled(q, k, lengths, seg), scores(q, k, lengths, seg)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
