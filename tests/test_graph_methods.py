"""MRPruner and GPrune (``mrprune/methods/graph.py``) against the spec of research/algorithms.md §1.2, §2 and §3.

* ``official=True`` is compared index-for-index with an independent port of the official code written here in the
  official code's own style (dense float32 matrices, ``torch.topk``, ``torch.linalg.matrix_power``).
* ``official=False`` is compared with an independent eager implementation of the default-mode budget rule of the
  MRPruner / GPrune docstrings (same scores, stable top-k), and checked for its invariants (kept count, newlines).
* Batching, low-precision inputs, determinism, argument validation and the paper presets.

Exact-index comparisons are only meaningful where the selection is not decided by rounding: every top-k in the port
and the eager implementation asserts a relative gap of at least ``MIN_REL_GAP`` between its K-th and (K+1)-th
score, and every ``int()`` of a budget share asserts that its argument is not within ``MIN_FRAC_MARGIN`` of an
integer. The seeds below were chosen so that these checks hold.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import mrprune
from mrprune import GPrune, GridLayout, LlavaNextLayout, MRPruner
from mrprune.testing import llava15_features, llava_next_features, pad_batch

BASE = 576  # base view of LLaVA-NeXT: 24 x 24 tokens
# float32 scores of the port and of the library differ by ~1e-7 relative (other summation order, t vector-matrix
# products instead of matrix_power); a top-k boundary this much wider cannot be flipped by rounding.
MIN_REL_GAP = 1e-5
MIN_FRAC_MARGIN = 1e-3

GRIDS = [(48, 48), (32, 48), (48, 32), (24, 72), (72, 24), (24, 24)]
RATIOS = [0.05, 0.1, 0.3, 0.5, 0.7, 0.95]


@functools.lru_cache(maxsize=16)
def next_features(rows: int, cols: int, dim: int, seed: int) -> torch.Tensor:
    """Cached synthetic LLaVA-NeXT image (callers must not modify it)."""
    return llava_next_features(rows, cols, dim, seed=seed)


def single_crop_features(dim: int, seed: int) -> torch.Tensor:
    """A single-crop LLaVA-NeXT image: 576 base tokens and one trailing newline (the NeXT newline vector)."""
    x = llava_next_features(24, 24, dim, seed=seed)
    return torch.cat([x[:BASE], x[BASE + 24 : BASE + 25]])


def _assert_gap(scores: torch.Tensor, k: int, what: str) -> None:
    """The K-th and (K+1)-th largest scores differ by more than rounding, so any top-k agrees on the set."""
    n = scores.numel()
    if 0 < k < n:
        top = scores.flatten().sort(descending=True).values
        gap = float((top[k - 1] - top[k]) / top[k - 1].abs())
        assert gap > MIN_REL_GAP, f"{what}: score gap {gap:.2e} at K={k} of {n} is too small for an exact comparison"


def _assert_margin(value: float, what: str) -> None:
    """``int(value)`` cannot be changed by float32 rounding of ``value``."""
    frac = value - math.floor(value)
    assert min(frac, 1 - frac) > MIN_FRAC_MARGIN or value == math.floor(value), f"{what}: {value} too close to an int"


# --- independent port of the official code (research/algorithms.md §2.3-2.5, §3.2) -------------------------------


def official_mr_pruner(
    features: torch.Tensor,
    rows: int,
    cols: int,
    keep_ratio: float = 0.1,
    threshold: float = 0.5,
    cross_threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int = 1,
    beta: float = 0.5,
    *,
    empty_transfer_zero: bool = False,
    check_gaps: bool = True,
) -> tuple[torch.Tensor, dict]:
    """gooriiie/MR-Pruner @ 8c71785 for one anyres LLaVA-NeXT image, in float32. Returns (kept image indices, info).

    ``empty_transfer_zero`` replaces the official 0/0 = NaN transfer by 0 when no high-res token is pruned.
    """
    image_feature = features.float()
    stride = cols + 1
    high_index = torch.tensor([BASE + r * stride + c for r in range(rows) for c in range(cols)], dtype=torch.long)
    newline_index = torch.tensor([BASE + r * stride + cols for r in range(rows)], dtype=torch.long)
    low_feature = image_feature[:BASE]
    high_feature = image_feature[high_index]

    # §2.4 budget: T_img includes the newlines; the share is a 0-dim float32 tensor; int() truncates.
    total_tokens = BASE + rows * stride
    k_total = int(keep_ratio * total_tokens)
    w_low = low_feature.norm(dim=-1).unsqueeze(0)  # (1, 576)
    w_high = high_feature.norm(dim=-1).unsqueeze(0)  # (1, R*C)
    mean_low, mean_high = w_low.mean(), w_high.mean()
    ratio = mean_low / (mean_low + mean_high)
    if check_gaps:
        _assert_margin(float(k_total * ratio), "K_total * share")
    k_low = min(int(k_total * ratio), BASE)
    k_high = min(k_total - k_low, rows * cols)

    # §2.3 high-resolution affinity and §2.5 step 1-2: score, top-K_H.
    xh = F.normalize(high_feature, dim=-1)
    sim = xh @ xh.T
    sim = sim * (sim >= threshold)
    sim = sim / temperature
    sim = torch.where(sim.abs() < 1e-6, torch.full_like(sim, -5000.0), sim)
    a_high = torch.softmax(sim, dim=-1)
    degree_high = (a_high > 0).sum(-1).float()
    if iterations > 1:
        a_high = torch.linalg.matrix_power(a_high, iterations)
    score_high = (w_high @ a_high) / degree_high  # (1, R*C)
    if check_gaps:
        _assert_gap(score_high, k_high, "high-res score")
    keep_high = torch.topk(score_high, k_high, dim=-1).indices[0]

    # §2.5 step 3-4: cross transfer from the PRUNED high-res tokens (ascending index order) to the base tokens.
    pruned_mask = torch.ones(rows * cols, dtype=torch.bool)
    pruned_mask[keep_high] = False
    pruned = pruned_mask.nonzero()[:, 0]
    xl = F.normalize(low_feature, dim=-1)
    xp = F.normalize(high_feature[pruned], dim=-1)
    cross = xl @ xp.T  # (576, |Pr|)
    cross = cross * (cross >= cross_threshold)
    cross = cross / temperature
    cross = torch.where(cross.abs() < 1e-6, torch.full_like(cross, -5000.0), cross)
    q = torch.softmax(cross, dim=-1)
    degree_cross = (q > 0).sum(-1).float()
    w_pruned = w_high[0, pruned]
    prop = (q @ w_pruned) / degree_cross  # (576,); 0/0 = NaN when nothing was pruned
    if empty_transfer_zero and pruned.numel() == 0:
        prop = torch.zeros(BASE)

    # §2.3 base affinity and §2.5 step 5-6.
    sim = xl @ xl.T
    sim = sim * (sim >= threshold)
    sim = sim / temperature
    sim = torch.where(sim.abs() < 1e-6, torch.full_like(sim, -5000.0), sim)
    a_low = torch.softmax(sim, dim=-1)
    degree_low = (a_low > 0).sum(-1).float()
    if iterations > 1:
        a_low = torch.linalg.matrix_power(a_low, iterations)
    score_low = ((w_low @ a_low) / degree_low)[0]
    final = score_low + beta * prop
    if check_gaps:
        _assert_gap(final, k_low, "base score")
    keep_low = torch.topk(final, k_low, dim=-1).indices

    # §2.5 step 7: sort(keep_L U keep_H U E) as image indices.
    keep = torch.cat([keep_low, high_index[keep_high], newline_index]).sort().values
    info = dict(k_total=k_total, k_low=k_low, k_high=k_high, ratio=float(ratio), prop=prop, pruned=pruned.numel())
    return keep, info


def official_g_prune(
    features: torch.Tensor,
    rows: int,
    cols: int,
    keep_ratio: float = 0.5,
    threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int = 5,
    *,
    check_gaps: bool = True,
) -> tuple[torch.Tensor, dict]:
    """jytmelon/G-Prune @ 762c637 for one anyres LLaVA-NeXT image, in float32. Returns (kept image indices, info)."""
    image_feature = features.float()
    stride = cols + 1
    high_index = torch.tensor([BASE + r * stride + c for r in range(rows) for c in range(cols)], dtype=torch.long)
    newline_index = torch.tensor([BASE + r * stride + cols for r in range(rows)], dtype=torch.long)
    low_feature = image_feature[:BASE]
    high_feature = image_feature[high_index]

    # §3.2 budget: the same ratio of each resolution, newlines on top.
    k_low = int(keep_ratio * BASE)
    k_high = int(keep_ratio * rows * cols)

    # Base view: affinity, degree from P^1, P^t, score, top-K_L.
    xl = F.normalize(low_feature, dim=-1)
    sim = xl @ xl.T
    sim = sim * (sim >= threshold)
    sim = sim / temperature
    sim = torch.where(sim.abs() < 1e-6, torch.full_like(sim, -5000.0), sim)
    a_low = torch.softmax(sim, dim=-1)
    degree_low = (a_low > 0).sum(-1).float()
    a_low = torch.linalg.matrix_power(a_low, iterations)
    w_low = low_feature.norm(dim=-1).unsqueeze(0)
    score_low = (w_low @ a_low) / degree_low
    if check_gaps:
        _assert_gap(score_low, k_low, "base score")
    keep_low = torch.topk(score_low, k_low, dim=-1).indices[0]

    # High-resolution grid: the same.
    xh = F.normalize(high_feature, dim=-1)
    sim = xh @ xh.T
    sim = sim * (sim >= threshold)
    sim = sim / temperature
    sim = torch.where(sim.abs() < 1e-6, torch.full_like(sim, -5000.0), sim)
    a_high = torch.softmax(sim, dim=-1)
    degree_high = (a_high > 0).sum(-1).float()
    a_high = torch.linalg.matrix_power(a_high, iterations)
    w_high = high_feature.norm(dim=-1).unsqueeze(0)
    score_high = (w_high @ a_high) / degree_high
    if check_gaps:
        _assert_gap(score_high, k_high, "high-res score")
    keep_high = torch.topk(score_high, k_high, dim=-1).indices[0]

    keep = torch.cat([keep_low, high_index[keep_high], newline_index]).sort().values
    return keep, dict(k_low=k_low, k_high=k_high)


# --- independent eager implementation of the default mode (MRPruner / GPrune docstrings) --------------------------


def _index_sets(kind: str, rows: int, cols: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base-or-only tokens, high-res tokens, always-kept newlines) of a layout, from §1.2 (not from mrprune)."""
    empty = torch.zeros(0, dtype=torch.long)
    if kind == "grid":
        return torch.arange(n), empty, empty
    if kind == "single":
        return torch.arange(BASE), empty, torch.tensor([BASE])
    high = torch.tensor([BASE + r * (cols + 1) + c for r in range(rows) for c in range(cols)], dtype=torch.long)
    newline = torch.tensor([BASE + r * (cols + 1) + cols for r in range(rows)], dtype=torch.long)
    return torch.arange(BASE), high, newline


def _dense_scores(x: torch.Tensor, threshold: float, temperature: float, iterations: int) -> torch.Tensor:
    """``(w P^t) / deg(P)`` with the edge count as degree (float32, dense)."""
    if x.shape[0] == 0:
        return x.new_zeros(0)
    xn = F.normalize(x, dim=-1)
    sim = xn @ xn.T
    edge = sim >= threshold
    p = torch.softmax(torch.where(edge, sim / temperature, torch.full_like(sim, -5000.0)), dim=-1)
    return (x.norm(dim=-1) @ torch.linalg.matrix_power(p, iterations)) / edge.sum(-1).float()


def _dense_transfer(low: torch.Tensor, keys: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """Mean-norm transfer from ``keys`` to each ``low`` token (0 without keys)."""
    if keys.shape[0] == 0:
        return low.new_zeros(low.shape[0])
    sim = F.normalize(low, dim=-1) @ F.normalize(keys, dim=-1).T
    edge = sim >= threshold
    q = torch.softmax(torch.where(edge, sim / temperature, torch.full_like(sim, -5000.0)), dim=-1)
    degree = torch.where(edge.any(-1), edge.sum(-1), keys.shape[0]).float()
    return (q @ keys.norm(dim=-1)) / degree


def _stable_top(scores: torch.Tensor, k: int, what: str) -> torch.Tensor:
    _assert_gap(scores, k, what)
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def eager_default(
    method: str,
    features: torch.Tensor,
    kind: str,
    rows: int,
    cols: int,
    keep_ratio: float,
    threshold: float = 0.5,
    cross_threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Default-mode selection: ``max(round_half_up(keep_ratio * T_img), R)`` kept, newlines first; the rest split by
    mean norms (MRPruner, floor of the base share, excess of a capped side to the other) or by sizes (GPrune,
    rounded half up); then the same graph scores as the official code, ties to the lower index."""
    x = features.float()
    n = x.shape[0]
    low_idx, high_idx, always = _index_sets(kind, rows, cols, n)
    n_low, n_high = low_idx.numel(), high_idx.numel()
    kept_total = max(math.floor(keep_ratio * n + 0.5), always.numel())
    scored = kept_total - always.numel()
    low, high = x[low_idx], x[high_idx]
    if method == "mr":
        iterations = 1 if iterations is None else iterations
        if n_high == 0:
            k_low, k_high = scored, 0
        else:
            m_low, m_high = low.norm(dim=-1).double().mean(), high.norm(dim=-1).double().mean()
            share = float(m_low / (m_low + m_high))
            _assert_margin(scored * share, "scored * share")
            k_low = min(math.floor(scored * share), n_low)
            k_high = scored - k_low
            if k_high > n_high:
                k_low, k_high = k_low + k_high - n_high, n_high
    else:
        iterations = 5 if iterations is None else iterations
        k_low = min(math.floor(Fraction(scored * n_low, n_low + n_high) + Fraction(1, 2)), n_low)
        k_high = scored - k_low
    keep_high = _stable_top(_dense_scores(high, threshold, temperature, iterations), k_high, "high-res score")
    low_scores = _dense_scores(low, threshold, temperature, iterations)
    if method == "mr":
        pruned = torch.ones(n_high, dtype=torch.bool)
        pruned[keep_high] = False
        low_scores = low_scores + beta * _dense_transfer(low, high[pruned], cross_threshold, temperature)
    keep_low = _stable_top(low_scores, k_low, "base score")
    return torch.cat([low_idx[keep_low], high_idx[keep_high], always]).sort().values


def _assert_valid(kept: torch.Tensor, n: int, newlines: torch.Tensor) -> None:
    """Sorted, unique, in range, int64, every newline present."""
    assert kept.dtype == torch.int64 and kept.dim() == 1
    assert bool((kept[1:] > kept[:-1]).all()), "kept indices must be strictly increasing"
    assert kept.numel() == 0 or (int(kept[0]) >= 0 and int(kept[-1]) < n)
    assert bool(torch.isin(newlines, kept).all()), "every newline token must be kept"


def _newlines(rows: int, cols: int) -> torch.Tensor:
    return BASE + torch.arange(rows) * (cols + 1) + cols


# --- official mode: parity with the port ---------------------------------------------------------------------------

# Every grid with every keep ratio; D and seed vary along the grid.
PARITY_CASES = [
    (rows, cols, (256, 1024)[(i + j) % 2], (i + 2 * j) % 3, ratio)
    for i, (rows, cols) in enumerate(GRIDS)
    for j, ratio in enumerate(RATIOS)
]


@pytest.mark.parametrize("rows,cols,dim,seed,keep_ratio", PARITY_CASES)
def test_mr_pruner_official_matches_port(rows, cols, dim, seed, keep_ratio):
    """MRPruner(official=True) keeps exactly the official code's set (and its count K_L + K_H + R)."""
    x = next_features(rows, cols, dim, seed)
    want, info = official_mr_pruner(x, rows, cols, keep_ratio)
    got = MRPruner(keep_ratio, official=True).select(x, LlavaNextLayout(rows, cols))
    assert got.numel() == info["k_low"] + info["k_high"] + rows
    if info["k_high"] < rows * cols:  # only the high-res cap can make the count fall short of K_total + R
        assert got.numel() == info["k_total"] + rows
    assert torch.equal(got, want)


GPRUNE_PARITY_CASES = [
    (rows, cols, (1024, 256)[(i + j) % 2], (2 * i + j) % 3, RATIOS[(i + 2 * j) % len(RATIOS)])
    for i, (rows, cols) in enumerate(GRIDS)
    for j in range(3)
]


@pytest.mark.parametrize("rows,cols,dim,seed,keep_ratio", GPRUNE_PARITY_CASES)
def test_g_prune_official_matches_port(rows, cols, dim, seed, keep_ratio):
    """GPrune(official=True) keeps exactly the official set (matrix_power(P, 5), degree of P^1, per-resolution K)."""
    x = next_features(rows, cols, dim, seed)
    want, info = official_g_prune(x, rows, cols, keep_ratio)
    got = GPrune(keep_ratio, official=True).select(x, LlavaNextLayout(rows, cols))
    assert got.numel() == info["k_low"] + info["k_high"] + rows
    assert torch.equal(got, want)


@functools.cache
def _port_at_defaults(method: str, rows: int, cols: int, dim: int, seed: int, keep_ratio: float) -> torch.Tensor:
    port = official_mr_pruner if method == "mr" else official_g_prune
    return port(next_features(rows, cols, dim, seed), rows, cols, keep_ratio)[0]


def _hyper_id(hyper: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in hyper.items())


# (hyper-parameters, keep ratio): each pair changes the official kept set on the input below.
MR_HYPER = [
    (dict(threshold=0.6), 0.1),
    (dict(temperature=0.05), 0.5),
    (dict(iterations=2), 0.5),
    (dict(iterations=3), 0.5),
    (dict(beta=0.0), 0.1),
    (dict(beta=1.0), 0.1),
    (dict(beta=1.0), 0.5),
    (dict(cross_threshold=0.6, beta=1.0), 0.5),
    (dict(threshold=0.6, temperature=0.05, iterations=2, beta=1.0), 0.1),
]


@pytest.mark.parametrize("hyper,keep_ratio", MR_HYPER, ids=lambda v: _hyper_id(v) if isinstance(v, dict) else str(v))
def test_mr_pruner_official_hyperparameters(hyper, keep_ratio):
    """Non-default threshold / temperature / iterations / beta / cross threshold are used as the official code does
    (and the input is sensitive to each: the port's kept set differs from the one at the defaults)."""
    x = next_features(32, 48, 256, 1)
    want, _ = official_mr_pruner(x, 32, 48, keep_ratio, **hyper)
    assert not torch.equal(want, _port_at_defaults("mr", 32, 48, 256, 1, keep_ratio))
    got = MRPruner(keep_ratio, official=True, **hyper).select(x, LlavaNextLayout(32, 48))
    assert torch.equal(got, want)


G_HYPER = [dict(threshold=0.6), dict(temperature=0.05), dict(iterations=1), dict(iterations=2), dict(iterations=3)]


@pytest.mark.parametrize("hyper", G_HYPER, ids=_hyper_id)
def test_g_prune_official_hyperparameters(hyper):
    """Non-default threshold / temperature / iterations of GPrune(official=True) match the port (and change its
    kept set on this input)."""
    x = next_features(24, 72, 256, 0)
    want, _ = official_g_prune(x, 24, 72, 0.7, **hyper)
    assert not torch.equal(want, _port_at_defaults("g", 24, 72, 256, 0, 0.7))
    got = GPrune(0.7, official=True, **hyper).select(x, LlavaNextLayout(24, 72))
    assert torch.equal(got, want)


@pytest.mark.slow
def test_official_matches_port_dim_4096():
    """At the real LLaVA-NeXT width (D = 4096, square 48 x 48 image) both methods match the port at their defaults."""
    x = llava_next_features(48, 48, 4096, seed=0)
    layout = LlavaNextLayout(48, 48)
    assert torch.equal(MRPruner(0.1, official=True).select(x, layout), official_mr_pruner(x, 48, 48, 0.1)[0])
    assert torch.equal(GPrune(0.5, official=True).select(x, layout), official_g_prune(x, 48, 48, 0.5)[0])


# --- official mode: edge cases -------------------------------------------------------------------------------------


def test_official_budget_example_square_image():
    """§2.4 worked example: square 48 x 48, keep 0.1 -> T_img 2928, K_total 292, 340 tokens kept (newlines on top)."""
    x = next_features(48, 48, 256, 0)
    _, info = official_mr_pruner(x, 48, 48, 0.1)
    assert info["k_total"] == 292
    kept = MRPruner(0.1, official=True).select(x, LlavaNextLayout(48, 48))
    assert kept.numel() == 340
    _assert_valid(kept, 2928, _newlines(48, 48))


def test_official_low_cap_binds():
    """Tiny high-res norms: int(K_total * share) exceeds 576, so K_L = 576 (all base tokens) and K_H takes the rest;
    the count is still K_total + R, and the high-res choice matches the port."""
    rows, cols = 32, 48
    x = next_features(rows, cols, 256, 0).clone()
    x[BASE:] *= 0.01
    want, info = official_mr_pruner(x, rows, cols, 0.5)
    assert int(info["k_total"] * info["ratio"]) > BASE and info["k_low"] == BASE  # the cap binds
    got = MRPruner(0.5, official=True).select(x, LlavaNextLayout(rows, cols))
    assert got.numel() == info["k_total"] + rows
    assert bool(torch.isin(torch.arange(BASE), got).all())
    assert torch.equal(got, want)


def test_official_both_caps_bind():
    """keep 0.99: both caps bind, everything is kept and the count (T_img) is below K_total + R."""
    x = next_features(48, 48, 256, 0)
    want, info = official_mr_pruner(x, 48, 48, 0.99, empty_transfer_zero=True, check_gaps=False)
    assert info["k_low"] + info["k_high"] + 48 < info["k_total"] + 48
    got = MRPruner(0.99, official=True).select(x, LlavaNextLayout(48, 48))
    assert torch.equal(got, torch.arange(2928))
    assert torch.equal(got, want)


@pytest.mark.parametrize("keep_ratio", [0.95, 1.0])
def test_official_nothing_pruned_at_high_res(keep_ratio):
    """Small base norms: K_H = R*C (nothing pruned at high res) but K_L < 576. The official transfer is 0/0 = NaN
    there (selection undefined); mrprune uses 0: a valid set equal to the port with prop := 0."""
    rows, cols = 32, 48
    x = next_features(rows, cols, 256, 2).clone()
    x[:BASE] *= 0.05
    _, info = official_mr_pruner(x, rows, cols, keep_ratio, check_gaps=False)
    assert info["pruned"] == 0 and info["k_low"] < BASE
    assert bool(info["prop"].isnan().all())  # the official NaN
    want, _ = official_mr_pruner(x, rows, cols, keep_ratio, empty_transfer_zero=True)
    got = MRPruner(keep_ratio, official=True).select(x, LlavaNextLayout(rows, cols))
    _assert_valid(got, x.shape[0], _newlines(rows, cols))
    assert got.numel() == info["k_low"] + rows * cols + rows < info["k_total"] + rows
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["mr", "g"])
def test_official_keep_ratio_one(method):
    """keep_ratio 1.0 keeps every token (the official NaN transfer is not allowed to leak into the result)."""
    rows, cols = 24, 72
    x = next_features(rows, cols, 256, 0)
    n = BASE + rows * (cols + 1)
    if method == "mr":
        _, info = official_mr_pruner(x, rows, cols, 1.0, check_gaps=False)
        assert bool(info["prop"].isnan().all())
        want, _ = official_mr_pruner(x, rows, cols, 1.0, empty_transfer_zero=True)
        got = MRPruner(1.0, official=True).select(x, LlavaNextLayout(rows, cols))
    else:
        want, _ = official_g_prune(x, rows, cols, 1.0)
        got = GPrune(1.0, official=True).select(x, LlavaNextLayout(rows, cols))
    assert torch.equal(got, torch.arange(n))
    assert torch.equal(got, want)


@pytest.mark.parametrize("keep_ratio", [0.0003, 0.001, 0.003])
def test_official_tiny_budgets(keep_ratio):
    """K_total of 0, 1 and 3 (K_L and/or K_H = 0, where topk(0) is empty): both methods match the port."""
    x = next_features(24, 24, 256, 0)
    layout = LlavaNextLayout(24, 24)
    want, info = official_mr_pruner(x, 24, 24, keep_ratio)
    assert info["k_low"] == 0 or info["k_high"] == 0 or info["k_total"] == 3
    assert torch.equal(MRPruner(keep_ratio, official=True).select(x, layout), want)
    want, info = official_g_prune(x, 24, 24, keep_ratio)
    assert torch.equal(GPrune(keep_ratio, official=True).select(x, layout), want)
    if info["k_low"] == info["k_high"] == 0:
        assert torch.equal(want, _newlines(24, 24))


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
@pytest.mark.parametrize("kind", ["single_crop", "grid", "flat", "batch_with_single_crop"])
def test_official_rejects_non_anyres_layouts(cls, kind):
    """official=True raises ValueError naming official mode for single-crop LLaVA-NeXT images and plain grids."""
    pruner = cls(0.5, official=True)
    with pytest.raises(ValueError, match="official"):
        if kind == "single_crop":
            pruner.select(single_crop_features(64, 0), LlavaNextLayout(0, 0))
        elif kind == "grid":
            pruner.select(llava15_features(64, seed=0), GridLayout(1, 24, 24))
        elif kind == "flat":
            pruner.select(llava15_features(64, seed=0))
        else:
            batch, lengths = pad_batch([next_features(24, 24, 64, 0), single_crop_features(64, 0)])
            pruner.select_batch(batch, [LlavaNextLayout(24, 24), LlavaNextLayout(0, 0)], lengths)


@pytest.mark.parametrize("method", ["mr", "g"])
def test_official_zero_tokens(method):
    """All-zero tokens (base and high-res): their graph row is uniform with degree n (all below threshold) and their
    cross row uniform over the pruned tokens, as in the official code."""
    x = next_features(24, 24, 256, 0).clone()
    x[[3, 100, BASE + 5, BASE + 25 * 3 + 7]] = 0
    layout = LlavaNextLayout(24, 24)
    for keep_ratio in (0.1, 0.5):
        if method == "mr":
            want, _ = official_mr_pruner(x, 24, 24, keep_ratio)
            got = MRPruner(keep_ratio, official=True).select(x, layout)
        else:
            want, _ = official_g_prune(x, 24, 24, keep_ratio)
            got = GPrune(keep_ratio, official=True).select(x, layout)
        assert torch.equal(got, want)


def _borderline_image(dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Base: random tokens. High-res 1 x 3 grid: a (norm 1.5) and b (norm 1) with cos(a, b) = 0.501, a borderline edge
    whose softmax weight is ~6e-8; c (norm 1) isolated; then the newline."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(BASE, dim, generator=gen)
    e = torch.eye(dim)
    cos = 0.501
    a = 1.5 * e[3]
    b = cos * e[3] + math.sqrt(1 - cos * cos) * e[4]
    c = e[5]
    newline = e[6] + e[7]
    return torch.cat([base, torch.stack([a, b, c, newline])])


@pytest.mark.parametrize("method", ["mr", "g"])
def test_official_degree_counts_borderline_edges(method):
    """The degree is the edge count: a's only other edge is borderline (P ~ 6e-8) yet counts, so a scores
    1.5 / 2 < c's 1.0 and c is the one high-res token kept. A degree that dropped negligible P (as float16 underflow
    can) would keep a instead."""
    x = _borderline_image()
    high = x[BASE : BASE + 3]
    xn = F.normalize(high, dim=-1)
    sim = xn @ xn.T
    p = torch.softmax(torch.where(sim >= 0.5, sim / 0.03, torch.full_like(sim, -5000.0)), dim=-1)
    assert 0 < float(p[0, 1]) < 1e-7  # borderline, but positive in float32
    undercount = (p > 1e-6).sum(-1).float()
    assert int(torch.argmax(high.norm(dim=-1) @ p / undercount)) == 0  # a would win with the undercounted degree
    layout = LlavaNextLayout(1, 3)
    if method == "mr":
        want, info = official_mr_pruner(x, 1, 3, 0.005)
        got = MRPruner(0.005, official=True).select(x, layout)
    else:
        want, info = official_g_prune(x, 1, 3, 0.34)
        got = GPrune(0.34, official=True).select(x, layout)
    assert info["k_high"] == 1
    kept_high = got[(got >= BASE) & (got < BASE + 3)]
    assert kept_high.tolist() == [BASE + 2]
    assert torch.equal(got, want)


# --- default mode ------------------------------------------------------------------------------------------------

COUNT_RATIOS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.95, 1.0]
# Large grids get half of the ratios each (alternating); small layouts all of them. T_img is odd for (1, 2), (3, 4)
# and single-crop images, so 0.5 * T_img tests the half-up rounding.
COUNT_LAYOUTS = [
    ((48, 48), COUNT_RATIOS[0::2]),
    ((32, 48), COUNT_RATIOS[1::2]),
    ((24, 72), COUNT_RATIOS[0::2]),
    ((72, 24), COUNT_RATIOS[1::2]),
    ((24, 24), COUNT_RATIOS),
    ((1, 2), COUNT_RATIOS),
    ((3, 4), COUNT_RATIOS),
    ("single", COUNT_RATIOS),
    ("grid", COUNT_RATIOS),
]


def _layout_and_features(spec, dim: int = 32, seed: int = 0):
    """(layout, features, newline indices, kind, rows, cols) for a layout spec."""
    if spec == "single":
        return LlavaNextLayout(0, 0), single_crop_features(dim, seed), torch.tensor([BASE]), "single", 0, 0
    if spec == "grid":
        return GridLayout(1, 24, 24), llava15_features(dim, seed=seed), torch.zeros(0, dtype=torch.long), "grid", 0, 0
    rows, cols = spec
    return LlavaNextLayout(rows, cols), next_features(rows, cols, dim, seed), _newlines(rows, cols), "next", rows, cols


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
@pytest.mark.parametrize(
    "spec,ratios", COUNT_LAYOUTS, ids=lambda v: f"{len(v)}ratios" if isinstance(v, list) else str(v)
)
def test_default_kept_count_and_newlines(cls, spec, ratios):
    """Default mode keeps max(round_half_up(keep_ratio * T_img), R) tokens, newlines included and always kept;
    keep_ratio 1.0 keeps everything (no NaN from the empty transfer)."""
    layout, x, newlines, *_ = _layout_and_features(spec)
    n = x.shape[0]
    for keep_ratio in ratios:
        kept = cls(keep_ratio).select(x, layout)
        _assert_valid(kept, n, newlines)
        assert kept.numel() == max(math.floor(keep_ratio * n + 0.5), newlines.numel()), keep_ratio
        if keep_ratio == 1.0:
            assert torch.equal(kept, torch.arange(n))


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
@pytest.mark.parametrize("rows,cols", [(5, 0), (0, 5)])
def test_default_degenerate_unpadded_grids(cls, rows, cols):
    """A grid unpadded to zero columns (base + one newline per row, no high-res token) or to zero rows (base view
    only) works in default mode with the usual count and all newlines kept."""
    base = llava15_features(32, seed=0)
    newline = next_features(24, 24, 32, 0)[BASE + 24]
    x = torch.cat([base, newline.expand(rows * (cols + 1), -1)])
    layout = LlavaNextLayout(rows, cols)
    assert layout.num_tokens == x.shape[0]
    newlines = BASE + torch.arange(rows)
    for keep_ratio in (0.005, 0.1, 0.5, 1.0):
        kept = cls(keep_ratio).select(x, layout)
        _assert_valid(kept, x.shape[0], newlines)
        assert kept.numel() == max(math.floor(keep_ratio * x.shape[0] + 0.5), rows), keep_ratio


def test_default_budget_below_newline_count_keeps_only_newlines():
    """A budget smaller than R keeps exactly the R newline tokens."""
    x = next_features(48, 48, 32, 0)
    assert math.floor(0.01 * 2928 + 0.5) < 48
    for cls in (MRPruner, GPrune):
        assert torch.equal(cls(0.01).select(x, LlavaNextLayout(48, 48)), _newlines(48, 48))


@pytest.mark.parametrize(
    "spec,dim,seed,keep_ratio",
    [
        ((48, 48), 256, 0, 0.1),
        ((32, 48), 1024, 1, 0.3),
        ((48, 32), 256, 2, 0.05),
        ((24, 72), 256, 0, 0.5),
        ((72, 24), 1024, 2, 0.7),
        ((24, 24), 256, 1, 0.95),
        ((24, 24), 256, 0, 0.999),
        ("single", 256, 0, 0.1),
        ("single", 1024, 1, 0.5),
        ("grid", 256, 0, 0.3),
        ("grid", 1024, 2, 0.05),
    ],
    ids=str,
)
@pytest.mark.parametrize("method", ["mr", "g"])
def test_default_matches_eager(method, spec, dim, seed, keep_ratio):
    """Default mode selects exactly what the eager implementation of its documented budget rule selects."""
    layout, x, _, kind, rows, cols = _layout_and_features(spec, dim, seed)
    want = eager_default(method, x, kind, rows, cols, keep_ratio)
    cls = MRPruner if method == "mr" else GPrune
    assert torch.equal(cls(keep_ratio).select(x, layout), want)


@pytest.mark.parametrize(
    "method,hyper",
    [
        ("mr", dict(threshold=0.6, temperature=0.05, beta=1.0)),
        ("mr", dict(iterations=2, beta=0.0)),
        ("mr", dict(cross_threshold=0.6, iterations=3)),
        ("g", dict(threshold=0.6, temperature=0.05, iterations=2)),
        ("g", dict(iterations=1)),
    ],
    ids=lambda v: _hyper_id(v) if isinstance(v, dict) else v,
)
def test_default_hyperparameters_match_eager(method, hyper):
    """Default mode passes its hyper-parameters through (eager implementation with the same values)."""
    x = next_features(32, 48, 256, 1)
    want = eager_default(method, x, "next", 32, 48, 0.2, **hyper)
    cls = MRPruner if method == "mr" else GPrune
    assert torch.equal(cls(0.2, **hyper).select(x, LlavaNextLayout(32, 48)), want)


# --- batching, dtypes, determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
@pytest.mark.parametrize("official", [False, True])
def test_select_batch_equals_per_image(cls, official):
    """A padded batch of differently sized images gives each image's own selection (own statistics, own budget)."""
    specs = [(24, 24), (32, 48), (24, 72)] + ([] if official else ["single"])
    items = [_layout_and_features(spec, 64, seed) for seed, spec in enumerate(specs)]
    batch, lengths = pad_batch([x for _, x, *_ in items])
    pruner = cls(0.3, official=official)
    got = pruner.select_batch(batch, [layout for layout, *_ in items], lengths)
    assert len(got) == len(items)
    for kept, (layout, x, *_) in zip(got, items, strict=True):
        assert torch.equal(kept, pruner.select(x, layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("cls", [MRPruner, GPrune])
def test_low_precision_inputs(cls, official, dtype):
    """float16/bfloat16 features give a valid kept set of the right size, mostly the float32 selection."""
    rows, cols = 32, 48
    x32 = next_features(rows, cols, 256, 0)
    x = x32.to(dtype)
    layout = LlavaNextLayout(rows, cols)
    kept = cls(0.3, official=official).select(x, layout)
    _assert_valid(kept, x.shape[0], _newlines(rows, cols))
    if official and cls is MRPruner:
        expected = official_mr_pruner(x, rows, cols, 0.3, check_gaps=False)[0].numel()
    elif official:
        expected = official_g_prune(x, rows, cols, 0.3, check_gaps=False)[0].numel()
    else:
        expected = math.floor(0.3 * x.shape[0] + 0.5)
    assert kept.numel() == expected
    reference = cls(0.3, official=official).select(x32, layout)
    overlap = torch.isin(kept, reference).sum().item() / kept.numel()
    assert overlap > 0.9


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
def test_deterministic(cls):
    """Repeated calls give identical results."""
    x = next_features(24, 72, 256, 1)
    pruner = cls(0.2)
    assert torch.equal(pruner.select(x, LlavaNextLayout(24, 72)), pruner.select(x, LlavaNextLayout(24, 72)))


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
@pytest.mark.parametrize("keep_ratio", [0, 0.0, 1.5, -0.1, float("nan"), "0.5"])
def test_bad_keep_ratio(cls, keep_ratio):
    """keep_ratio outside (0, 1] (or not a number) is rejected at construction."""
    with pytest.raises(ValueError, match="keep_ratio"):
        cls(keep_ratio)


@pytest.mark.parametrize("cls", [MRPruner, GPrune])
@pytest.mark.parametrize(
    "case", ["layout_count_mismatch", "select_rank", "select_batch_rank", "layout_number", "lengths_shape"]
)
def test_bad_inputs(cls, case):
    """Malformed inputs raise ValueError with a message naming the problem."""
    x = next_features(24, 24, 32, 0)
    batch, lengths = pad_batch([x, next_features(32, 48, 32, 0)])
    layouts = [LlavaNextLayout(24, 24), LlavaNextLayout(32, 48)]
    pruner = cls(0.3)
    calls = {
        "layout_count_mismatch": (lambda: pruner.select(x, LlavaNextLayout(32, 48)), "describes"),
        "select_rank": (lambda: pruner.select(x[None]), r"\[N, D\]"),
        "select_batch_rank": (lambda: pruner.select_batch(x, [layouts[0]]), r"\[B, N, D\]"),
        "layout_number": (lambda: pruner.select_batch(batch, layouts[:1], lengths), "layouts"),
        "lengths_shape": (lambda: pruner.select_batch(batch, layouts, lengths[:1]), "lengths"),
    }
    call, message = calls[case]
    with pytest.raises(ValueError, match=message):
        call()


# --- presets -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,keep_ratio", [("mr_pruner_50", 0.5), ("mr_pruner_70", 0.3), ("mr_pruner_90", 0.1), ("mr_pruner_95", 0.05)]
)
def test_mr_pruner_presets(name, keep_ratio):
    """MR-Pruner presets name the pruned share: 50/70/90/95 % pruned = keep 0.5/0.3/0.1/0.05, default mode."""
    pruner = mrprune.preset(name)
    assert type(pruner) is MRPruner
    assert pruner.keep_ratio == pytest.approx(keep_ratio) and pruner.official is False
    assert (pruner.threshold, pruner.cross_threshold, pruner.temperature) == (0.5, 0.5, 0.03)
    assert (pruner.iterations, pruner.beta) == (1, 0.5)
    official = mrprune.preset(name, official=True)
    assert official.official is True and official.keep_ratio == pytest.approx(keep_ratio)


def test_g_prune_preset():
    """The G-Prune preset is keep 0.5 with t = 5; overrides replace arguments."""
    pruner = mrprune.preset("g_prune")
    assert type(pruner) is GPrune and pruner.keep_ratio == 0.5 and pruner.iterations == 5 and not pruner.official
    pruner = mrprune.preset("g_prune", official=True, keep_ratio=0.25)
    assert pruner.official is True and pruner.keep_ratio == 0.25


def test_preset_override_behaves_like_constructor():
    """preset(..., official=True) selects exactly what MRPruner(official=True) selects."""
    x = next_features(24, 24, 64, 0)
    layout = LlavaNextLayout(24, 24)
    got = mrprune.preset("mr_pruner_70", official=True).select(x, layout)
    assert torch.equal(got, MRPruner(0.3, official=True).select(x, layout))


def test_unknown_preset():
    """An unknown preset name raises ValueError listing the choices."""
    with pytest.raises(ValueError, match="unknown preset"):
        mrprune.preset("mr_pruner_80")
