"""The float64 greedy trace of ``diversity_select`` (DivPrune): score gaps, near-maximiser checks and the kernel vs
reference check that tests/test_diversity_select.py and tests/test_half_precision.py share."""

from __future__ import annotations

import math

import torch

from tests.utils import oracle, run

OP = "diversity_select"
INF = math.inf
# Kernels compute d = 1 - cos in float32; a float64 score gap above this cannot be reordered by their rounding.
GAP = 1e-5


def distance64(x: torch.Tensor) -> torch.Tensor:
    """Float64 ``1 - cos`` of the rows of ``x [n, D]``, made exactly symmetric (upper triangle mirrored)."""
    x = x.double()
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = 1 - u @ u.T
    return torch.triu(d) + torch.triu(d, 1).T


def greedy_steps(d: torch.Tensor, picks: list[int], mask_picked: bool):
    """Yield ``(scores, pick)`` for each step of the greedy along a given pick sequence."""
    n = d.shape[0]
    if n == 0:
        return
    scores = d.sort(dim=0).values[1] if n > 1 else d[0]
    nearest = torch.full((n,), INF, dtype=torch.float64)
    picked = torch.zeros(n, dtype=torch.bool)
    for j in picks:
        yield scores, j
        picked[j] = True
        nearest = torch.minimum(nearest, d[j])
        scores = nearest.masked_fill(picked, -INF) if mask_picked else nearest


def lower_tied_partner(d: torch.Tensor, first: int) -> int | None:
    """A lower-index token whose step-0 score ties exactly with ``first`` (its mutual nearest neighbour), if any."""
    scores = d.sort(dim=0).values[1] if d.shape[0] > 1 else d[0]
    tied = (scores == scores[first]) & (d[first] == scores[first]) & (torch.arange(len(scores)) < first)
    return int(tied.nonzero()[0]) if bool(tied.any()) else None


def clear_prefix(d: torch.Tensor, picks: list[int], mask_picked: bool, gap: float = GAP) -> int:
    """How many leading picks are decided by a float64 score gap >= ``gap`` (or by the exact step-0 tie between the
    most isolated token and its mutual nearest neighbour, which the spec gives to the lower index)."""
    for t, (scores, j) in enumerate(greedy_steps(d, picks, mask_picked)):
        others = scores.clone()
        others[j] = -INF
        if t == 0:  # the structural tie: a higher-index partner at exactly the same distance
            partner = (scores == scores[j]) & (d[j] == scores[j]) & (torch.arange(len(scores)) > j)
            others[partner] = -INF
        if not bool(scores[j] - others.max() >= gap):
            return t
    return len(picks)


def assert_greedy_consistent(d: torch.Tensor, picks: list[int], mask_picked: bool, tol: float = GAP) -> None:
    """Every pick is within ``tol`` of the best float64 score given the earlier picks (a near-maximiser)."""
    for t, (scores, j) in enumerate(greedy_steps(d, picks, mask_picked)):
        assert 0 <= j < d.shape[0], f"step {t}: index {j} out of range"
        assert scores[j] >= scores.max() - tol, (
            f"step {t}: picked {j} with score {float(scores[j])}, best is {int(scores.argmax())} "
            f"with {float(scores.max())}"
        )


def check_against_oracle(
    backend: str,
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    mask_picked: bool,
    min_prefix: int = 8,
    distances: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Kernel vs float64 reference: exact on the gap-decided prefix (which must cover ``min(k, n_b, min_prefix)``
    picks, else the input itself is near-tied), near-maximisers everywhere, -1 padding, no repeats when masking."""
    got = run(OP, backend, features, lengths, k, mask_picked)
    want = oracle(OP, features, lengths, k, mask_picked)
    assert got.dtype == torch.int64 and got.shape == (features.shape[0], k) and got.device == features.device
    for b in range(features.shape[0]):
        n = int(lengths[b])
        count = min(k, n)
        g, w = got[b].tolist(), want[b].tolist()
        assert g[count:] == [-1] * (k - count), f"item {b}: expected -1 past {count} picks, got {g}"
        d = distance64(features[b, :n]) if distances is None else distances[b]
        if count:
            partner = lower_tied_partner(d, w[0])
            assert partner is None, (
                f"item {b}: the reference picked {w[0]} first, but token {partner} (its mutual nearest neighbour) has "
                "exactly the same score and the lower index"
            )
        prefix = clear_prefix(d, w[:count], mask_picked)
        assert prefix >= min(count, min_prefix), f"item {b}: test input near-tied at step {prefix}"
        assert g[:prefix] == w[:prefix], f"item {b}: kernel {g[:prefix]} != reference {w[:prefix]}"
        assert_greedy_consistent(d, g[:count], mask_picked)
        if mask_picked:
            assert len(set(g[:count])) == count, f"item {b}: repeated index in {g[:count]}"
    return got
