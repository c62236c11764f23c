"""bipartite_merge (ToMe's bipartite soft matching + size-weighted merge): reference, kernels, ties, edges, errors,
compile.

The reference is checked against a brute force written with Python loops and ``math`` that follows
``tome/merge.py`` step by step; every kernel is checked against the float64 reference: the matching (``source``,
``out_lengths``) exactly on inputs whose float64 decisions have clear gaps or are exactly representable (exact ties
go to the lower position), the merged values to float32 accuracy, and unmerged tokens bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import INPUT_DTYPES, clustered, kernel_backends, padded

OP = "bipartite_merge"
KERNELS = kernel_backends(OP)
#: Without Triton under the (slow) interpreter: for the large shapes.
FAST_KERNELS = kernel_backends(OP, interpreted=False)
#: A float64 decision (score order at the cut, best partner) closer than this could flip in float32.
GAP = 1e-5


def call(impl: str, x, metric, lengths, r, sizes=None, protect_first=True, spatial_order=False):
    """``brute``, ``reference`` (float64) or a kernel backend through the public op."""
    if impl == "brute":
        return brute_batch(x, metric, lengths, r, sizes, protect_first, spatial_order)
    if impl == "reference":
        s = None if sizes is None else sizes.double()
        return reference.bipartite_merge(x.double(), metric.double(), lengths, r, s, protect_first, spatial_order)
    assert impl in backends.available(OP, x.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.bipartite_merge(x, metric, lengths, r, sizes, protect_first, spatial_order)


# --- independent brute force (tome/merge.py by the letter, one item at a time) ------------------------------------


def brute_item(x, metric, r, sizes, protect_first, spatial_order):
    n = len(x)
    protect = 1 if protect_first and n > 0 else 0
    r = min(r, max(n - protect, 0) // 2)
    units = []
    for v in metric:
        norm = math.sqrt(math.fsum(c * c for c in v))
        units.append([c / max(norm, 1e-12) for c in v])
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    score, partner = [], []
    for a in a_pos:
        best, arg = -math.inf, 0
        for j, b in enumerate(b_pos):
            cos = math.fsum(p * q for p, q in zip(units[a], units[b], strict=True))
            if cos > best:  # the first maximum
                best, arg = cos, j
        score.append(-math.inf if (protect and a == 0) else best)
        partner.append(arg)
    rank = sorted(range(len(a_pos)), key=lambda i: -score[i])  # stable: ties keep position order
    gone, stay = rank[:r], rank[r:]
    if protect:
        stay = sorted(stay)
    rows = [a_pos[i] for i in stay] + b_pos
    if spatial_order:
        rows = sorted(rows)
    slot = {p: t for t, p in enumerate(rows)}
    for i in gone:
        slot[a_pos[i]] = slot[b_pos[partner[i]]]
    groups = {t: [p for p in range(n) if slot[p] == t] for t in range(len(rows))}
    merged, merged_sizes = [], []
    for t, p in enumerate(rows):
        members = groups[t]
        mass = math.fsum(sizes[i] for i in members)
        if len(members) == 1:
            merged.append(list(x[p]))
        else:
            merged.append([math.fsum(sizes[i] * x[i][c] for i in members) / mass for c in range(len(x[p]))])
        merged_sizes.append(mass)
    return merged, merged_sizes, [slot[p] for p in range(n)], n - r


def brute_batch(x, metric, lengths, r, sizes=None, protect_first=True, spatial_order=False):
    batch, tokens, dim = x.shape
    merged = torch.zeros(batch, tokens - r, dim, dtype=torch.float64)
    merged_sizes = torch.zeros(batch, tokens - r, dtype=torch.float64)
    source = torch.full((batch, tokens), -1, dtype=torch.int64)
    out_lengths = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        n = int(lengths[b])
        s = [1.0] * n if sizes is None else sizes[b, :n].double().tolist()
        m, ms, src, count = brute_item(
            x[b, :n].double().tolist(), metric[b, :n].double().tolist(), r, s, protect_first, spatial_order
        )
        if count:
            merged[b, :count] = torch.tensor(m, dtype=torch.float64)
            merged_sizes[b, :count] = torch.tensor(ms, dtype=torch.float64)
        source[b, :n] = torch.tensor(src, dtype=torch.int64)
        out_lengths[b] = count
    return merged, merged_sizes, source, out_lengths


def exact_family(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 4]`` metric rows with exactly representable cosines (power-of-two multiples of sign and axis vectors,
    and zeros) from a small pool: duplicates and exact ties everywhere."""
    signs = torch.tensor([[1 if (i >> b) & 1 else -1 for b in range(4)] for i in range(16)], dtype=torch.float64)
    family = torch.cat(
        [signs, torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64), torch.zeros(1, 4)]
    )
    pool = family[torch.randint(0, len(family), (5,), generator=generator)]
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=generator).double()
    return pool[torch.randint(0, 5, (n,), generator=generator)] * scale


def decided(metric: torch.Tensor, n: int, r: int, protect_first: bool, spatial_order: bool) -> bool:
    """Whether the float64 matching of one item has gaps > GAP at every decision a float32 kernel must reproduce."""
    if n < 2:
        return True
    u = metric[:n].double() / metric[:n].double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    block = u[0::2] @ u[1::2].T
    top2 = block.topk(min(2, block.shape[1]), dim=1).values
    if block.shape[1] > 1 and bool((top2[:, 0] - top2[:, 1] < GAP).any()):
        return False
    score = top2[:, 0].clone()
    protect = 1 if protect_first else 0
    if protect:
        score = score[1:]
    r = min(r, (n - protect) // 2)
    ordered = score.sort(descending=True).values
    if not protect_first and not spatial_order:  # the whole descending order is output order
        return bool((ordered[:-1] - ordered[1:] >= GAP).all()) if ordered.numel() > 1 else True
    return not (0 < r < ordered.numel() and float(ordered[r - 1] - ordered[r]) < GAP)


def check_against_oracle(backend, x, metric, lengths, r, sizes=None, protect_first=True, spatial_order=False):
    got = call(backend, x, metric, lengths, r, sizes, protect_first, spatial_order)
    want = call("reference", x, metric, lengths, r, sizes, protect_first, spatial_order)
    merged, merged_sizes, source, out_lengths = got
    assert merged.dtype == x.dtype and merged.shape == (x.shape[0], x.shape[1] - r, x.shape[2])
    assert merged_sizes.dtype == torch.float32 and source.dtype == out_lengths.dtype == torch.int64
    for b in range(x.shape[0]):
        n = int(lengths[b])
        assert decided(metric[b], n, r, protect_first, spatial_order), f"item {b}: test input near-tied"
    assert torch.equal(out_lengths, want[3])
    assert torch.equal(source, want[2])
    torch.testing.assert_close(merged_sizes.double(), want[1], rtol=1e-6, atol=0)
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[x.dtype]
    torch.testing.assert_close(merged.double(), want[0].to(x.dtype).double(), rtol=tol, atol=tol)
    # every token that absorbed nothing is its input row, bit for bit
    for b in range(x.shape[0]):
        n, count = int(lengths[b]), int(out_lengths[b])
        members = torch.bincount(source[b, :n], minlength=count)
        for t in range(count):
            if members[t] == 1:
                i = int((source[b, :n] == t).nonzero()[0, 0])
                assert torch.equal(merged[b, t], x[b, i]), f"item {b} row {t} is not input token {i}"
    return got


# --- 0. the kernels exist ----------------------------------------------------------------------------------------


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


def assert_results_equal(got, want, exact_values: bool = False):
    for name, a, b in zip(("merged", "merged_sizes", "source", "out_lengths"), got, want, strict=True):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        elif exact_values:
            assert torch.equal(a.double(), b.double()), name
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("seed", range(8))
def test_reference_matches_brute_force_random(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 12, (1,), generator=g))
    x = torch.randn(3, tokens, 3, generator=g, dtype=torch.float64)
    metric = torch.randn(3, tokens, 4, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 4, (3, tokens), generator=g).double()
    lengths = torch.randint(0, tokens + 1, (3,), generator=g)
    lengths[0] = tokens
    for protect in (True, False):
        for spatial in (False, True):
            for r in sorted({0, 1, max(tokens - int(protect), 0) // 2}):
                for s in (None, sizes):
                    got = reference.bipartite_merge(x, metric, lengths, r, s, protect, spatial)
                    assert_results_equal(got, brute_batch(x, metric, lengths, r, s, protect, spatial))


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("seed", range(6))
def test_exact_ties_family(impl, seed):
    """Exactly representable metric rows (duplicates, zeros, opposite vectors, power-of-two scalings) and integer
    x and sizes: every implementation equals the brute force exactly (exact ties: first maximum, stable sort)."""
    g = torch.Generator().manual_seed(100 + seed)
    items = [exact_family(n, g) for n in (9, 0, 6, 14, 1)]
    metric, lengths = padded(items)
    metric[metric == 1e4] = 0.0
    x = torch.randint(-4, 5, (*metric.shape[:2], 3), generator=g).double()
    sizes = 2.0 ** torch.randint(0, 3, metric.shape[:2], generator=g).double()
    for protect in (True, False):
        for spatial in (False, True):
            for r in (0, 1, 3, 6):
                want = brute_batch(x, metric, lengths, r, sizes, protect, spatial)
                got = call(impl, x.float(), metric.float(), lengths, r, sizes.float(), protect, spatial)
                for name, a, b in zip(("merged", "sizes", "source", "lengths"), got, want, strict=True):
                    if a.dtype == torch.int64:
                        assert torch.equal(a, b), f"{name} r={r} protect={protect} spatial={spatial}"
                    else:
                        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_ties_across_column_tiles(impl):
    """Identical metric rows on 300 tokens (150 odd partners: several column tiles of every kernel): each even token's
    partner is the first odd token, and the merged even tokens are the first ones after the [CLS]."""
    metric = torch.ones(1, 300, 4)
    x = torch.arange(300.0).reshape(1, 300, 1)
    merged, sizes, source, out_lengths = call(impl, x, metric, torch.tensor([300]), 40)
    want = brute_batch(x, metric, torch.tensor([300]), 40)
    assert torch.equal(source, want[2]) and torch.equal(out_lengths, want[3])
    assert source[0, 2:82:2].tolist() == [source[0, 1].item()] * 40
    torch.testing.assert_close(merged.double(), want[0])


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_hand_example(impl):
    """Tokens 0..5 with metric rows [cls, e1, e1', e2, e2', e3] (primes: near copies). A = 0, 2, 4, B = 1, 3, 5.
    Token 2 matches 1 (cos 1), token 4 matches 3 (cos 0.99...), the [CLS] is protected: r = 2 merges 2 -> 1 and
    4 -> 3 with sizes 1 + 3 and 1 + 1."""
    metric = torch.tensor([[[1.0, 1, 1], [1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 1, 0.1], [0, 0, 1]]], dtype=torch.float64)
    x = torch.arange(6, dtype=torch.float64)[None, :, None] * torch.ones(1, 1, 2, dtype=torch.float64)
    sizes = torch.tensor([[1.0, 1, 3, 1, 1, 1]], dtype=torch.float64)
    merged, msizes, source, out_lengths = call(impl, x.float(), metric.float(), torch.tensor([6]), 2, sizes.float())
    # official order: unmerged A (the [CLS]) then B = 1, 3, 5
    assert source.tolist() == [[0, 1, 1, 2, 2, 3]] and out_lengths.tolist() == [4]
    torch.testing.assert_close(
        merged[0, :, 0].double(), torch.tensor([0.0, (1 + 3 * 2) / 4, (3 + 4) / 2, 5.0]).double()
    )
    assert msizes.tolist() == [[1.0, 4.0, 2.0, 1.0]]


# --- 2. kernels vs reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "tokens", "dim"),
    [(b, t, d) for b in KERNELS for t, d in ((41, 8), (64, 16))]
    + [(b, t, d) for b in FAST_KERNELS for t, d in ((300, 24), (577, 12))],
)
def test_kernel_matches_reference_random(backend, tokens, dim):
    g = torch.Generator().manual_seed(tokens * dim)
    x = torch.randn(2, tokens, 20, generator=g)
    metric = torch.randn(2, tokens, dim, generator=g)
    sizes = torch.randint(1, 5, (2, tokens), generator=g).float()
    lengths = torch.tensor([tokens, tokens - 7])
    for r in (0, 5, tokens // 4):
        check_against_oracle(backend, x, metric, lengths, r, sizes, True, False)
        check_against_oracle(backend, x, metric, lengths, r, None, True, True)
    if tokens <= 64:  # the whole descending order is decided only on small items
        check_against_oracle(backend, x, metric, lengths, 3, sizes, False, False)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    """float16/bfloat16 x and metric are read in their own precision; merged rows come back in x's dtype."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 50, 16, generator=g).to(dtype)
    metric = torch.randn(2, 50, 8, generator=g).to(dtype)
    check_against_oracle(backend, x, metric, torch.tensor([50, 31]), 12, None, True, False)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_padding_is_ignored(backend):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 6, generator=g) for n in (13, 0, 29, 2)]
    ms = [torch.randn(n, 5, generator=g) for n in (13, 0, 29, 2)]
    x, lengths = padded(xs)
    metric, _ = padded(ms)
    got = check_against_oracle(backend, x, metric, lengths, 6)
    assert got[3].tolist() == [13 - 6, 0, 29 - 6, 2]  # item 3: r capped at (2 - 1) // 2 = 0
    assert got[2][1].tolist() == [-1] * 29 and torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    garbage_x, garbage_m = x.clone(), metric.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage_x[b, n:] = torch.randn(garbage_x[b, n:].shape, generator=g) * 100
        garbage_m[b, n:] = torch.randn(garbage_m[b, n:].shape, generator=g)
    for a, b in zip(call(backend, garbage_x, garbage_m, lengths, 6), got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_and_int32_inputs(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 7, generator=g)
    metric = torch.randn(2, 30, 5, generator=g)
    lengths = torch.tensor([30, 17])
    want = call(backend, x, metric, lengths, 9)
    strided = metric.transpose(1, 2).contiguous().transpose(1, 2)
    got = call(backend, x.transpose(1, 2).contiguous().transpose(1, 2), strided, lengths.int(), 9)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


# --- 3. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_r_zero_is_identity(impl):
    """r = 0: every token comes back bit for bit (in the official order, or in place with spatial_order)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, generator=g)
    metric = torch.randn(2, 7, 4, generator=g)
    lengths = torch.tensor([7, 4])
    merged, sizes, source, out_lengths = call(impl, x, metric, lengths, 0, None, True, True)
    for b, n in enumerate(lengths.tolist()):
        assert source[b, :n].tolist() == list(range(n))
        assert torch.equal(merged[b, :n].to(x.dtype), x[b, :n])
    assert out_lengths.tolist() == [7, 4] and sizes.sum().item() == 11
    _, _, source, _ = call(impl, x, metric, lengths, 0, None, True, False)
    assert source[0].tolist() == [0, 4, 1, 5, 2, 6, 3]  # [A = 0, 2, 4, 6, then B = 1, 3, 5]


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_zero_metric_rows_and_duplicates(impl):
    """A zero metric row has cosine 0 to everything (no NaN); an exact duplicate pair merges first."""
    metric = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    x = torch.arange(12.0).reshape(1, 6, 2)
    merged, sizes, source, out_lengths = call(impl, x, metric, torch.tensor([6]), 1, None, False, True)
    # A = 0, 2, 4: tokens 0 and 2 score 0 (zero rows), token 4 matches 1 exactly (cos 1) and merges
    assert source.tolist() == [[0, 1, 2, 3, 1, 4]] and out_lengths.tolist() == [5]
    assert torch.isfinite(merged).all() and merged[0, 1].tolist() == [(2 + 8) / 2, (3 + 9) / 2]


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_maximum_r_and_short_items(impl):
    """r at the cap (N - 1) // 2 merges every non-[CLS] A token; an item of 1 or 2 tokens merges nothing."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 9, 2, generator=g)
    metric = torch.randn(3, 9, 3, generator=g)
    lengths = torch.tensor([9, 2, 1])
    merged, sizes, source, out_lengths = call(impl, x, metric, lengths, 4)
    assert out_lengths.tolist() == [5, 2, 1]
    assert source[0, 0] == 0 and set(source[0].tolist()) == set(range(5))
    torch.testing.assert_close(sizes.sum(1).double(), lengths.double())


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
def test_batch_equals_per_item(impl):
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(n, 5, generator=g) for n in (31, 0, 12, 1, 31)]
    ms = [clustered(n, 6, generator=g) for n in (31, 0, 12, 1, 31)]
    x, lengths = padded(xs)
    metric, _ = padded(ms)
    batch = call(impl, x, metric, lengths, 5, None, True, True)
    for b in range(len(xs)):
        alone = call(impl, x[b : b + 1], metric[b : b + 1], lengths[b : b + 1], 5, None, True, True)
        for a, c in zip(alone, batch, strict=True):
            assert torch.equal(a, c[b : b + 1]), f"item {b}"


# --- 4. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 6, 3)
    m = torch.randn(2, 6, 4)
    lengths = torch.tensor([6, 3])
    nan = m.clone()
    nan[0, 1, 0] = math.nan
    return {
        "rank2": ((x[0], m, lengths, 1), ValueError, "x must be 3-D"),
        "int_x": ((x.long(), m, lengths, 1), TypeError, "x must be float16"),
        "metric_tokens": ((x, m[:, :5], lengths, 1), ValueError, "metric must be"),
        "r_negative": ((x, m, lengths, -1), ValueError, "r must lie in"),
        "r_too_large": ((x, m, lengths, 3), ValueError, r"r must lie in \[0, 2\]"),
        "r_float": ((x, m, lengths, 1.0), TypeError, "r must be an int"),
        "lengths_above_N": ((x, m, torch.tensor([7, 3]), 1), ValueError, "lengths must lie in"),
        "sizes_shape": ((x, m, lengths, 1, torch.ones(2, 5)), ValueError, "sizes must have shape"),
        "sizes_zero": ((x, m, lengths, 1, torch.zeros(2, 6)), ValueError, "sizes must be positive"),
        "metric_nan": ((x, nan, lengths, 1), ValueError, "metric contains NaN or Inf"),
        "protect_int": ((x, m, lengths, 1, None, 1), TypeError, "protect_first must be a bool"),
        "metric_on_meta": ((x, m.to("meta"), lengths, 1), ValueError, "metric is on meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.bipartite_merge: {fragment}"):
        ops.bipartite_merge(*args)


# --- 5. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(1)
    x, lengths = padded([torch.randn(n, 4, generator=g) for n in (11, 0, 6)])
    metric, _ = padded([torch.randn(n, 3, generator=g) for n in (11, 0, 6)])
    sizes = torch.rand(x.shape[:2], generator=g) + 0.5
    for args in ((x, metric, lengths, 3, None, True, False), (x.half(), metric.half(), lengths, 5, sizes, False, True)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.bipartite_merge.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def merge(x, metric, lengths):
        return ops.bipartite_merge(x, metric, lengths, 4)

    compiled = torch.compile(merge, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 12)):
        x, lengths = padded([torch.randn(n, 4, generator=g) for n in sizes])
        metric, _ = padded([torch.randn(n, 3, generator=g) for n in sizes])
        with backends.use_backend(backend):
            got, want = compiled(x, metric, lengths), merge(x, metric, lengths)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"sizes {sizes}"
