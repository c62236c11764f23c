"""attention_rows (head-averaged attention probabilities of M query rows from q/k: FastV / PDrop / SparseVLM):
reference, kernels, masks, GQA, edges, errors, compile."""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import INPUT_DTYPES, kernel_backends

OP = "attention_rows"
KERNELS = kernel_backends(OP)


def call(impl: str, q, k, key_mask, positions=None, scale=None, reduce=False):
    if impl == "brute":
        return brute(q, k, key_mask, positions, scale, reduce)
    if impl == "reference":
        return reference.attention_rows(q.double(), k.double(), key_mask, positions, scale, reduce)
    assert impl in backends.available(OP, q.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.attention_rows(q, k, key_mask, positions, scale, reduce)


def brute(q, k, key_mask, positions=None, scale=None, reduce=False):
    batch, heads, rows, dim = q.shape
    kv_heads, tokens = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, rows, tokens, dtype=torch.float64)
    real = [[positions is None or int(positions[b, m]) >= 0 for m in range(rows)] for b in range(batch)]
    for b in range(batch):
        for m in range(rows):
            if not real[b][m]:
                continue
            allowed = [bool(key_mask[b, j]) and (positions is None or j <= int(positions[b, m])) for j in range(tokens)]
            for h in range(heads):
                g = h // (heads // kv_heads)
                logits = [
                    scale * math.fsum(float(q[b, h, m, c]) * float(k[b, g, j, c]) for c in range(dim))
                    for j in range(tokens)
                ]
                top = max([logits[j] for j in range(tokens) if allowed[j]], default=None)
                if top is None:
                    continue
                weights = [math.exp(logits[j] - top) if allowed[j] else 0.0 for j in range(tokens)]
                total = math.fsum(weights)
                for j in range(tokens):
                    out[b, m, j] += weights[j] / total / heads
    if not reduce:
        return out
    result = torch.zeros(batch, tokens, dtype=torch.float64)
    for b in range(batch):
        count = sum(real[b])
        if count:
            result[b] = sum(out[b, m] for m in range(rows) if real[b][m]) / count
    return result


def inputs(batch, heads, kv_heads, rows, tokens, dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rows, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=g).to(dtype)
    key_mask = torch.rand(batch, tokens, generator=g) > 0.2
    positions = torch.randint(-1, tokens, (batch, rows), generator=g)
    return q, k, key_mask, positions


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_brute_force(seed):
    q, k, mask, pos = inputs(2, 4, 2, 3, 7, 5, seed, torch.float64)
    for positions in (None, pos):
        for scale in (None, 0.3):
            for reduce in (False, True):
                got = reference.attention_rows(q, k, mask, positions, scale, reduce)
                torch.testing.assert_close(got, brute(q, k, mask, positions, scale, reduce), rtol=1e-12, atol=1e-14)


def test_matches_fastv_last_token_row():
    """One row at the last real position, full heads: the FastV probability row (softmax over allowed keys)."""
    q, k, _, _ = inputs(1, 2, 2, 1, 6, 4, 3, torch.float64)
    mask = torch.ones(1, 6, dtype=torch.bool)
    logits = (q @ k.transpose(-1, -2))[:, :, 0] * 4**-0.5
    want = logits.softmax(-1).mean(1)
    got = reference.attention_rows(q, k, mask, torch.tensor([[5]]), reduce=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(("heads", "kv_heads", "rows", "tokens", "dim"), [(4, 4, 1, 50, 16), (8, 2, 5, 300, 64)])
def test_kernel_matches_reference(backend, heads, kv_heads, rows, tokens, dim):
    q, k, mask, pos = inputs(2, heads, kv_heads, rows, tokens, dim, tokens)
    for positions in (None, pos):
        for reduce in (False, True):
            got = call(backend, q, k, mask, positions, None, reduce)
            want = call("reference", q, k, mask, positions, None, reduce)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    q, k, mask, pos = inputs(2, 4, 1, 3, 40, 32, 1, dtype)
    got = call(backend, q, k, mask, pos, 0.2)
    torch.testing.assert_close(got.double(), call("reference", q, k, mask, pos, 0.2), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_masks_and_padded_rows(impl):
    """Keys outside the mask or after a row's position get 0; a padded row (-1) and a row without keys are 0; rows
    sum to 1 otherwise; the reduce mean leaves padded rows out."""
    q, k, _, _ = inputs(1, 2, 1, 4, 6, 3, 5)
    mask = torch.tensor([[False, True, True, False, True, True]])
    positions = torch.tensor([[5, 2, -1, 0]])  # row 3 can only see key 0, which is masked: no key at all
    out = call(impl, q, k, mask, positions)
    assert not out[0, :, 0].any() and not out[0, :, 3].any() and not out[0, 1, 3:].any()
    assert not out[0, 2].any() and not out[0, 3].any()
    torch.testing.assert_close(out[0, :2].sum(-1).double(), torch.ones(2, dtype=torch.float64))
    reduced = call(impl, q, k, mask, positions, reduce=True)
    torch.testing.assert_close(reduced.double(), out[:, :2].sum(1).double() / 3)  # rows 0, 1, 3 are real


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_empty_shapes(impl):
    q, k, mask, _ = inputs(2, 2, 2, 0, 5, 3, 6)
    assert call(impl, q, k, mask).shape == (2, 0, 5)
    assert not call(impl, q, k, mask, reduce=True).any()
    q, k, mask, _ = inputs(1, 2, 2, 2, 0, 3, 6)
    assert call(impl, q, k, mask).shape == (1, 2, 0)


def _bad_cases():
    q, k, mask, pos = inputs(2, 4, 2, 3, 6, 8, 0)
    return {
        "q_rank": ((q[0], k, mask), ValueError, "q must be 4-D"),
        "k_dtype": ((q, k.double(), mask), TypeError, "k must have q's dtype"),
        "head_dim": ((q, k[..., :4], mask), ValueError, "k must be"),
        "gqa": ((q, torch.randn(2, 3, 6, 8), mask), ValueError, "q needs H >= 1 heads, a multiple"),
        "mask_dtype": ((q, k, mask.int()), TypeError, "key_mask must be bool"),
        "mask_shape": ((q, k, mask[:, :5]), ValueError, "key_mask must have shape"),
        "positions_range": ((q, k, mask, pos + 7), ValueError, "query_positions must be -1"),
        "positions_float": ((q, k, mask, pos.float()), TypeError, "query_positions must be int32"),
        "scale_zero": ((q, k, mask, None, 0.0), ValueError, "scale must be positive"),
        "reduce_int": ((q, k, mask, None, None, 1), TypeError, "reduce must be a bool"),
        "q_nan": ((q.masked_fill(q > 1, math.nan), k, mask), ValueError, "q contains NaN"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.attention_rows: {fragment}"):
        ops.attention_rows(*args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    q, k, mask, pos = inputs(2, 4, 2, 3, 9, 8, 1)
    for args in ((q, k, mask, pos, None, False), (q.half(), k.half(), mask, None, 0.5, True)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.attention_rows.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def rows(q, k, mask, pos):
        return ops.attention_rows(q, k, mask, pos), ops.attention_rows(q, k, mask, pos, reduce=True)

    compiled = torch.compile(rows, fullgraph=True, dynamic=True)
    for tokens in (9, 17):
        q, k, mask, pos = inputs(2, 4, 2, 3, tokens, 8, tokens)
        with backends.use_backend(backend):
            got, want = compiled(q, k, mask, pos), rows(q, k, mask, pos)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
