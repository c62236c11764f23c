"""assign_merge (VisionZip's contextual tokens: argmax over targets + segment merge): reference, kernels, ties,
edges, errors, compile.

The reference is checked against a brute force with Python loops and ``math``; kernels against the float64 reference
(assignments exactly where the float64 argmax has a clear gap, or on exactly representable inputs where ties are exact
and go to the lower slot; merged values to float32 accuracy).
"""

from __future__ import annotations

import math

import pytest
import torch

from mrprune import backends, ops, reference
from tests.utils import INPUT_DTYPES, kernel_backends, padded

OP = "assign_merge"
KERNELS = kernel_backends(OP)
GAP = 1e-5


def call(impl: str, x, metric, lengths, targets, include_target=False):
    if impl == "brute":
        return brute_batch(x, metric, lengths, targets, include_target)
    if impl == "reference":
        return reference.assign_merge(x.double(), metric.double(), lengths, targets, include_target)
    assert impl in backends.available(OP, x.device), f"{impl} does not implement {OP}"
    with backends.use_backend(impl):
        return ops.assign_merge(x, metric, lengths, targets, include_target)


def brute_batch(x, metric, lengths, targets, include_target=False):
    batch, tokens, dim = x.shape
    slots = targets.shape[1]
    merged = torch.zeros(batch, slots, dim, dtype=torch.float64)
    assignment = torch.full((batch, tokens), -1, dtype=torch.int64)
    sizes = torch.zeros(batch, slots, dtype=torch.int64)
    for b in range(batch):
        n = int(lengths[b])
        xs, ms = x[b, :n].double().tolist(), metric[b, :n].double().tolist()
        units = []
        for v in ms:
            norm = math.sqrt(math.fsum(c * c for c in v))
            units.append([c / max(norm, 1e-12) for c in v])
        used = [t for t in range(slots) if int(targets[b, t]) >= 0]
        if not used or n == 0:
            continue
        where = {int(targets[b, t]): t for t in used}
        for i in range(n):
            if i in where:
                assignment[b, i] = where[i]
                continue
            best, arg = -math.inf, -1
            for t in used:
                cos = math.fsum(p * q for p, q in zip(units[i], units[int(targets[b, t])], strict=True))
                if cos > best:
                    best, arg = cos, t
            assignment[b, i] = arg
        for t in used:
            c = int(targets[b, t])
            members = [i for i in range(n) if int(assignment[b, i]) == t and i != c]
            sizes[b, t] = 1 + len(members)
            for d in range(dim):
                total = math.fsum(xs[i][d] for i in members)
                if include_target:
                    merged[b, t, d] = (xs[c][d] + total) / (1 + len(members))
                else:
                    merged[b, t, d] = xs[c][d] + total / max(len(members), 1)
    return merged, assignment, sizes


def uniform_targets(lengths, count):
    """VisionZip's targets: the first ``count`` of 0, step, 2 step, ... with ``step = max(1, n // count)``."""
    out = torch.full((len(lengths), count), -1, dtype=torch.int64)
    for b, n in enumerate(lengths.tolist()):
        picks = list(range(0, n, max(1, n // count)))[:count] if n else []
        out[b, : len(picks)] = torch.tensor(picks, dtype=torch.int64)
    return out


def exact_family(n: int, generator: torch.Generator) -> torch.Tensor:
    signs = torch.tensor([[1 if (i >> b) & 1 else -1 for b in range(4)] for i in range(16)], dtype=torch.float64)
    family = torch.cat(
        [signs, torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64), torch.zeros(1, 4)]
    )
    pool = family[torch.randint(0, len(family), (5,), generator=generator)]
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=generator).double()
    return pool[torch.randint(0, 5, (n,), generator=generator)] * scale


def decided(metric, n, targets) -> bool:
    used = targets[targets >= 0]
    if n == 0 or used.numel() < 2:
        return True
    u = metric[:n].double() / metric[:n].double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    top2 = (u @ u[used].T).topk(2, dim=1).values
    return bool((top2[:, 0] - top2[:, 1] >= GAP).all())


def check_against_oracle(backend, x, metric, lengths, targets, include_target=False):
    got = call(backend, x, metric, lengths, targets, include_target)
    want = call("reference", x, metric, lengths, targets, include_target)
    for b in range(x.shape[0]):
        assert decided(metric[b], int(lengths[b]), targets[b]), f"item {b}: test input near-tied"
    assert got[0].dtype == x.dtype and got[0].shape == want[0].shape
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[x.dtype]
    torch.testing.assert_close(got[0].double(), want[0].to(x.dtype).double(), rtol=tol, atol=tol)
    return got


@pytest.mark.ext
def test_cpp_kernel_registered():
    assert "cpp" in KERNELS


# --- 1. reference vs brute force ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_reference_matches_brute_force_random(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 12, (1,), generator=g))
    x = torch.randn(3, tokens, 3, generator=g, dtype=torch.float64)
    metric = torch.randn(3, tokens, 4, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, tokens + 1, (3,), generator=g)
    lengths[0] = tokens
    for count in (1, 3, tokens):
        targets = uniform_targets(lengths, count)
        shuffled = targets[:, torch.randperm(count, generator=g)]  # slot order and -1 holes anywhere
        for t in (targets, shuffled):
            for inc in (False, True):
                got = reference.assign_merge(x, metric, lengths, t, inc)
                want = brute_batch(x, metric, lengths, t, inc)
                torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
                assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("impl", ["reference", *KERNELS])
@pytest.mark.parametrize("seed", range(4))
def test_exact_ties_family(impl, seed):
    """Exactly representable metric rows with duplicates and zeros: assignments equal the brute force exactly
    (ties to the lower slot)."""
    g = torch.Generator().manual_seed(200 + seed)
    metric, lengths = padded([exact_family(n, g) for n in (12, 0, 7, 20)])
    metric[metric == 1e4] = 0.0
    x = torch.randint(-4, 5, (*metric.shape[:2], 3), generator=g).double()
    for count in (1, 4, 7):
        targets = uniform_targets(lengths, count)
        for inc in (False, True):
            want = brute_batch(x, metric, lengths, targets, inc)
            got = call(impl, x.float(), metric.float(), lengths, targets, inc)
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), f"count={count}"
            torch.testing.assert_close(got[0].double(), want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_hand_example(impl):
    """Targets 0 (e1) and 2 (e2): token 1 (near e1) and token 3 (near e2) join them, token 4 (e1 + e2, a tie)
    joins the lower slot. VisionZip: target + mean of members; include_target: mean of all."""
    metric = torch.tensor([[[1.0, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 1]]])
    x = torch.tensor([[[1.0], [2.0], [10.0], [20.0], [4.0]]])
    targets = torch.tensor([[0, 2]])
    merged, assignment, sizes = call(impl, x, metric, torch.tensor([5]), targets)
    assert assignment.tolist() == [[0, 0, 1, 1, 0]] and sizes.tolist() == [[3, 2]]
    assert merged[0, :, 0].tolist() == [1 + (2 + 4) / 2, 10 + 20]
    merged, _, _ = call(impl, x, metric, torch.tensor([5]), targets, True)
    assert merged[0, :, 0].tolist() == pytest.approx([(1 + 2 + 4) / 3, (10 + 20) / 2], rel=1e-6)


# --- 2. kernels vs reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(("tokens", "dim", "count"), [(40, 8, 5), (300, 16, 30), (567, 12, 10)])
def test_kernel_matches_reference_random(backend, tokens, dim, count):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, 24, generator=g)
    metric = torch.randn(2, tokens, dim, generator=g)
    lengths = torch.tensor([tokens, tokens // 2])
    targets = uniform_targets(lengths, count)
    for inc in (False, True):
        check_against_oracle(backend, x, metric, lengths, targets, inc)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_kernel_input_dtypes(backend, dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 60, 16, generator=g).to(dtype)
    metric = torch.randn(2, 60, 8, generator=g).to(dtype)
    lengths = torch.tensor([60, 33])
    check_against_oracle(backend, x, metric, lengths, uniform_targets(lengths, 6))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_padding_and_garbage(backend):
    g = torch.Generator().manual_seed(10)
    x, lengths = padded([torch.randn(n, 5, generator=g) for n in (13, 0, 29, 2)])
    metric, _ = padded([torch.randn(n, 4, generator=g) for n in (13, 0, 29, 2)])
    targets = uniform_targets(lengths, 4)
    got = check_against_oracle(backend, x, metric, lengths, targets)
    assert got[1][1].tolist() == [-1] * 29 and got[2][1].tolist() == [0] * 4
    garbage_x, garbage_m = x.clone(), metric.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage_x[b, n:] = torch.randn(garbage_x[b, n:].shape, generator=g)
        garbage_m[b, n:] = torch.randn(garbage_m[b, n:].shape, generator=g)
    for a, b in zip(call(backend, garbage_x, garbage_m, lengths, targets), got, strict=True):
        assert torch.equal(a, b)


# --- 3. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_no_targets_and_all_targets(impl):
    """No target: nothing assigned, zeros. Every token a target: each its own slot, merged == x bit for bit."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 6, 3, generator=g)
    metric = torch.randn(1, 6, 2, generator=g)
    lengths = torch.tensor([6])
    merged, assignment, sizes = call(impl, x, metric, lengths, torch.full((1, 2), -1))
    assert assignment.tolist() == [[-1] * 6] and sizes.tolist() == [[0, 0]] and not merged.any()
    merged, assignment, sizes = call(impl, x, metric, lengths, torch.tensor([[5, 4, 3, 2, 1, 0]]))
    assert assignment.tolist() == [[5, 4, 3, 2, 1, 0]] and sizes.tolist() == [[1] * 6]
    assert torch.equal(merged[0].to(x.dtype), x[0].flip(0))
    merged, _, _ = call(impl, x, metric, lengths, torch.zeros(1, 0, dtype=torch.int64))
    assert merged.shape == (1, 0, 3)


@pytest.mark.parametrize("impl", ["brute", "reference", *KERNELS])
def test_zero_metric_joins_first_slot(impl):
    """A zero metric row has cosine 0 to every target: a tie, so the lowest used slot (no NaN)."""
    metric = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, -1.0]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    merged, assignment, _ = call(impl, x, metric, torch.tensor([4]), torch.tensor([[-1, 2, 0]]))
    assert assignment.tolist() == [[2, 1, 1, 1]]  # token 3 (-e2): cos 0 with e1 (slot 1), -1 with slot 2
    assert torch.isfinite(merged).all()


# --- 4. bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 6, 3)
    m = torch.randn(2, 6, 4)
    lengths = torch.tensor([6, 3])
    t = torch.tensor([[0, 3], [1, -1]])
    return {
        "rank2": ((x[0], m, lengths, t), ValueError, "x must be 3-D"),
        "metric_batch": ((x, m[:1], lengths, t), ValueError, "metric must be"),
        "targets_float": ((x, m, lengths, t.float()), TypeError, "targets must be int32 or int64"),
        "targets_shape": ((x, m, lengths, t[0]), ValueError, "targets must have shape"),
        "target_past_length": ((x, m, lengths, torch.tensor([[0, 3], [3, -1]])), ValueError, "targets must be -1"),
        "target_below_minus_one": ((x, m, lengths, torch.tensor([[0, -2], [1, -1]])), ValueError, "targets must be"),
        "target_repeated": ((x, m, lengths, torch.tensor([[2, 2], [1, -1]])), ValueError, "targets must not repeat"),
        "include_int": ((x, m, lengths, t, 1), TypeError, "include_target must be a bool"),
        "x_inf": ((x.masked_fill(x > 1, math.inf), m, lengths, t), ValueError, "x contains NaN or Inf"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case, backend):
    args, error, fragment = BAD[case]
    with backends.use_backend(backend), pytest.raises(error, match=f"mrprune.assign_merge: {fragment}"):
        ops.assign_merge(*args)


# --- 5. opcheck and torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_opcheck(backend):
    g = torch.Generator().manual_seed(1)
    x, lengths = padded([torch.randn(n, 4, generator=g) for n in (11, 0, 6)])
    metric, _ = padded([torch.randn(n, 3, generator=g) for n in (11, 0, 6)])
    targets = uniform_targets(lengths, 3)
    for args in ((x, metric, lengths, targets, False), (x.bfloat16(), metric.bfloat16(), lengths, targets, True)):
        with backends.use_backend(backend):
            torch.library.opcheck(torch.ops.mrprune.assign_merge.default, args)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_torch_compile_fullgraph(backend):
    def merge(x, metric, lengths, targets):
        return ops.assign_merge(x, metric, lengths, targets)

    compiled = torch.compile(merge, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    for sizes in ((17, 0, 9), (23, 12)):
        x, lengths = padded([torch.randn(n, 4, generator=g) for n in sizes])
        metric, _ = padded([torch.randn(n, 3, generator=g) for n in sizes])
        targets = uniform_targets(lengths, 4)
        with backends.use_backend(backend):
            got, want = compiled(x, metric, lengths, targets), merge(x, metric, lengths, targets)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"sizes {sizes}"
