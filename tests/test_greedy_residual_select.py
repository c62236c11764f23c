"""greedy_residual_select: reference vs brute force, kernels vs reference, edge cases, validation, opcheck, compile.

The op is ResPrune's greedy gated residual-energy selection (spec: ``mrprune.reference.greedy_residual_select``).
Exact-index comparisons only run on inputs whose greedy score gaps are checked (in float64, on the rounded inputs)
to be far above float32 rounding; on arbitrary random inputs the kernels are checked by objective, tie-aware
properties instead (every pick is a maximiser of the dense float64 score, the reported energies are the dense
residual energies, the fill phase follows the gate/index rule).
"""

from __future__ import annotations

import functools

import pytest
import torch

import mrprune
from tests.utils import CUDA, INPUT_DTYPES, assert_close, clustered, device_of, kernel_backends, oracle, run

OP = "greedy_residual_select"
CPU_BACKENDS = kernel_backends(OP)
# The CUDA C++ kernel (GPU only) is one more backend: run() copies the inputs to the GPU and the results back.
BACKENDS = [*CPU_BACKENDS, CUDA]
ALGORITHMS = ("gram", "basis", "auto")
TOL = 1e-5  # the op's default exhaustion_tol

# Slack for float32 energies and scores in the tie-aware checks, relative to the item's largest squared norm (times
# its largest gate, if above 1).
ENERGY_SLACK = 1e-4
# Required lead of the best gated score over every other one at every greedy step, relative to the gated squared
# norms of the two tokens, for an exact-index comparison to be meaningful (float32 errors here are ~1e-6 of those).
MIN_GAP = 1e-4
# Required distance between every relative residual ``e_i / ||v_i||^2`` met on the way and the exhaustion threshold;
# float32 errors in relative residuals here are ~1e-6.
MIN_TOL_DIST = 5e-6


# --- independent float64 helpers -------------------------------------------------------------------------------


def _single_threaded(fn):
    """Run a helper on one thread: multi-threaded LAPACK on 20 x 10 matrices is 30x slower on a busy 2-core box."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _gate_list(gate: torch.Tensor | None, n: int) -> list[float]:
    return [1.0] * n if gate is None else [float(g) for g in gate[:n]]


def _relative_gap(best: float, scores: torch.Tensor, best_size: float, sizes: torch.Tensor) -> float:
    """How clearly ``best`` beats every other (finite) score, relative to the gated squared norms of both tokens,
    which set the size of their float32 rounding errors; ``inf`` without a competitor."""
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        return float("inf")
    return float(((best - scores[finite]) / (best_size + sizes[finite])).min())


@_single_threaded
def brute_force(v: torch.Tensor, k: int, gate=None, seed: int = -1, tol: float = TOL):
    """One item in float64: every step recomputes all residuals from scratch by least squares (no basis updates).

    Returns ``(indices [k], energies [k], min_gap, min_tol_dist)``; the last two measure how far the trajectory is
    from a score tie (the winner's lead over every other token, relative to the gated squared norms of both) and from
    the exhaustion threshold (``|rel - tol|`` over every relative residual ``rel`` of an unpicked nonzero token).
    """
    v = v.double()
    n = v.shape[0]
    g = _gate_list(gate, n)
    norm2 = (v * v).sum(1).tolist()
    picked: list[int] = []
    energies: list[float] = []
    min_gap, min_dist = float("inf"), float("inf")
    while len(picked) < min(k, n):
        rest = [i for i in range(n) if i not in picked]
        if picked:
            span = v[picked].T  # [D, s]
            fit = torch.linalg.lstsq(span, v[rest].T, driver="gelsd").solution
            resid = v[rest] - (span @ fit).T
            energy = (resid * resid).sum(1).tolist()
        else:
            energy = [norm2[i] for i in rest]
        for pos, i in enumerate(rest):
            if norm2[i] > 0:
                min_dist = min(min_dist, abs(energy[pos] / norm2[i] - tol))
            if energy[pos] <= tol * norm2[i]:  # exhaustion rule: relative energy <= tol counts as 0
                energy[pos] = 0.0
        if not picked and seed >= 0:
            j, e_j = seed, energy[rest.index(seed)]
        else:
            scores = [g[i] * e for i, e in zip(rest, energy, strict=True)]
            best = max(scores)
            if best <= 0:  # fill: descending gate, then ascending index
                fill = sorted(rest, key=lambda i: (-g[i], i))[: min(k, n) - len(picked)]
                picked += fill
                energies += [0.0] * len(fill)
                break
            pos = scores.index(best)  # the first maximum
            j, e_j = rest[pos], energy[pos]
            for i, score in zip(rest, scores, strict=True):
                if i != j:
                    min_gap = min(min_gap, (best - score) / (g[j] * norm2[j] + g[i] * norm2[i]))
        picked.append(j)
        energies.append(e_j)
    indices = torch.full((k,), -1, dtype=torch.int64)
    indices[: len(picked)] = torch.tensor(picked, dtype=torch.int64)
    out_energies = torch.zeros(k, dtype=torch.float64)
    out_energies[: len(energies)] = torch.tensor(energies, dtype=torch.float64)
    return indices, out_energies, min_gap, min_dist


def residual_energies(v: torch.Tensor, pivots: list[int]) -> torch.Tensor:
    """``||v_i - P v_i||^2`` of every row against the span of ``v[pivots]`` (linearly independent), in float64."""
    v = v.double()
    if not pivots:
        return (v * v).sum(1)
    q = torch.linalg.qr(v[pivots].T).Q  # [D, s], orthonormal basis of the span
    resid = v - (v @ q) @ q.T
    return (resid * resid).sum(1)


@_single_threaded
def dense_replay(v: torch.Tensor, k: int, gate=None, seed: int = -1, tol: float = TOL, per_step: bool = False):
    """The spec's greedy in float64 with every residual recomputed from an orthonormal basis of the pivots.

    Returns ``(indices, energies, min_gap, min_tol_dist)`` like :func:`brute_force` (vectorised, for larger items);
    with ``per_step``, lists of both per pick (the gap is ``inf`` for a seed) instead of their minima.
    """
    v = v.double()
    n = v.shape[0]
    g = torch.tensor(_gate_list(gate, n), dtype=torch.float64)
    norm2 = (v * v).sum(1)
    picked = torch.zeros(n, dtype=torch.bool)
    pivots: list[int] = []
    indices, energies, gaps, dists = [], [], [], []
    for t in range(min(k, n)):
        energy = residual_energies(v, pivots)
        live = ~picked & (norm2 > 0)
        dists.append(float((energy[live] / norm2[live] - tol).abs().min()) if bool(live.any()) else float("inf"))
        energy = torch.where(energy <= tol * norm2, 0.0, energy)
        if t == 0 and seed >= 0:
            j = seed
            gaps.append(float("inf"))
        else:
            score = torch.where(picked, float("-inf"), g * energy)
            j = int(torch.argmax(score))  # the first maximum
            best = float(score[j])
            if best <= 0:
                rest = [i for i in range(n) if not picked[i]]
                fill = sorted(rest, key=lambda i: (-float(g[i]), i))[: min(k, n) - t]
                indices += fill
                energies += [0.0] * len(fill)
                break
            score[j] = float("-inf")
            gaps.append(_relative_gap(best, score, float(g[j] * norm2[j]), g * norm2))
        indices.append(j)
        energies.append(float(energy[j]))
        picked[j] = True
        if energies[-1] > 0:
            pivots.append(j)
    out_indices = torch.full((k,), -1, dtype=torch.int64)
    out_indices[: len(indices)] = torch.tensor(indices, dtype=torch.int64)
    out_energies = torch.zeros(k, dtype=torch.float64)
    out_energies[: len(energies)] = torch.tensor(energies, dtype=torch.float64)
    if per_step:
        return out_indices, out_energies, gaps, dists
    return out_indices, out_energies, min(gaps, default=float("inf")), min(dists, default=float("inf"))


@_single_threaded
def explained_energy(v: torch.Tensor, picks: list[int]) -> float:
    """``sum_i ||P_S v_i||^2`` over all rows for the span ``S`` of the picked rows (float64, rank-revealing)."""
    v = v.double()
    picks = [p for p in picks if p >= 0]
    if not picks:
        return 0.0
    span = v[picks].T
    fit = torch.linalg.lstsq(span, v.T, driver="gelsd").solution
    return float(((span @ fit) ** 2).sum())


@_single_threaded
def check_trajectory(v, gate, indices, energies, k, seed=-1, tol=TOL, slack=ENERGY_SLACK):
    """Tie-aware check of one item's output against the spec, recomputing every residual densely in float64.

    * the first pick is the seed; every later greedy pick maximises ``gate * residual`` among unpicked tokens up to
      ``slack * scale``, and its reported energy is its dense residual energy at that moment;
    * once a pick reports energy 0 (outside a seed) every later pick does, every unpicked token then scores ~0, and
      the rest come in descending gate, then ascending index order; -1 past ``n``.
    Returns the number of positive-energy picks.
    """
    v = v.double()
    n = v.shape[0]
    m = min(k, n)
    g = torch.tensor(_gate_list(gate, n), dtype=torch.float64)
    indices, energies = indices.tolist(), energies.double()
    assert indices[m:] == [-1] * (k - m)
    assert bool((energies[m:] == 0).all())
    picks = indices[:m]
    assert sorted(picks) == sorted(set(picks)) and all(0 <= p < n for p in picks), picks
    norm2 = (v * v).sum(1)
    atol = slack * (float(norm2.max()) * max(float(g.max()), 1.0) if n else 1.0)
    seeded = seed >= 0 and m > 0
    if seeded:
        assert picks[0] == seed
    start = 1 if seeded else 0
    fill_start = next((t for t in range(start, m) if energies[t] == 0), m)
    assert bool((energies[fill_start:m] == 0).all()), energies
    pivots: list[int] = []
    unpicked = torch.ones(n, dtype=torch.bool)
    for t in range(fill_start):
        j = picks[t]
        dense = residual_energies(v, pivots)
        dense = torch.where(dense <= tol * norm2, 0.0, dense)
        assert abs(float(energies[t]) - float(dense[j])) <= atol, (t, j, float(energies[t]), float(dense[j]))
        if not (t == 0 and seeded):
            best = float(torch.where(unpicked, g * dense, float("-inf")).max())
            assert float(g[j] * dense[j]) >= best - atol, (t, j, float(g[j] * dense[j]), best)
            assert float(energies[t]) > 0
        unpicked[j] = False
        if float(energies[t]) > 0:
            pivots.append(j)
    if fill_start < m:
        dense = residual_energies(v, pivots)
        dense = torch.where(dense <= tol * norm2, 0.0, dense)
        leftover = torch.where(unpicked, g * dense, 0.0)
        assert float(leftover.max()) <= atol, ("fill started with work left", float(leftover.max()))
        rest = [i for i in range(n) if unpicked[i]]
        expected = sorted(rest, key=lambda i: (-float(g[i]), i))[: m - fill_start]
        assert picks[fill_start:] == expected
    return int((energies[:fill_start] > 0).sum())


# --- inputs ----------------------------------------------------------------------------------------------------

LENGTHS = (37, 0, 13, 50, 1)  # odd sizes, an empty item, n > D (rank exhaustion) and n < D
DIM = 19
N_PAD = max(LENGTHS)
K_VALUES = (0, 1, 7, 13, N_PAD)  # 13 = one item's n, 50 = N
VARIANTS = ("plain", "gate", "gate_seed")


def _make_item(n, gen, dtype, variant, item):
    """Features and gate row (in ``dtype``) and seed of one item; item 0 holds a zero vector at index 3."""
    scales = 0.5 + torch.rand(n, 1, generator=gen)
    x = (torch.randn(n, DIM, generator=gen) * scales).to(dtype)
    if item == 0 and n > 3:
        x[3] = 0  # a zero vector (and, in gate_seed, the seed of this item)
    gate = None
    if variant != "plain":
        gate = torch.rand(n, generator=gen).to(dtype)
        gate[torch.rand(n, generator=gen) < 0.2] = 0
    seed = -1
    if variant == "gate_seed" and n:
        seed = {0: 3, 2: -7, 3: n // 2, 4: 0}.get(item, -1)  # item 0: the zero vector; items 1, 2: none (< 0)
    return x, gate, seed


@functools.cache
def gapped_batch(dtype: torch.dtype, variant: str):
    """A padded batch whose full greedy trajectories (float64, on the rounded inputs) have clear score gaps.

    Items are drawn until every greedy step separates the best from the second-best gated score by at least
    ``MIN_GAP`` (see :func:`brute_force`) and every relative residual is ``MIN_TOL_DIST`` away from the exhaustion
    threshold. Returns ``(features, lengths, gate, seed, worst_gap, worst_dist)``.
    """
    gen = torch.Generator().manual_seed(1234 + VARIANTS.index(variant))
    items, gates, seeds = [], [], []
    worst_gap, worst_dist = float("inf"), float("inf")
    for item, n in enumerate(LENGTHS):
        for _attempt in range(200):
            x, gate, seed = _make_item(n, gen, dtype, variant, item)
            *_, gap, dist = dense_replay(x, n, gate, seed)
            if gap >= MIN_GAP and dist >= MIN_TOL_DIST:
                break
        else:
            raise AssertionError(f"no gapped input found for item {item}")
        worst_gap, worst_dist = min(worst_gap, gap), min(worst_dist, dist)
        items.append(x)
        gates.append(gate)
        seeds.append(seed)
    return _assemble(items, gates, seeds, dtype, variant) + (worst_gap, worst_dist)


@functools.cache
def random_batch(dtype: torch.dtype, variant: str):
    """The same layout with no gap screening: ``(features, lengths, gate, seed)``."""
    gen = torch.Generator().manual_seed(99 + VARIANTS.index(variant))
    parts = [_make_item(n, gen, dtype, variant, item) for item, n in enumerate(LENGTHS)]
    return _assemble(*map(list, zip(*parts, strict=True)), dtype, variant)


def _assemble(items, gates, seeds, dtype, variant):
    """Pad with garbage (1e4 features, gate 7 in the padding); a seed tensor only in the ``gate_seed`` variant."""
    batch = len(items)
    features = torch.full((batch, N_PAD, DIM), 1e4, dtype=dtype)
    gate = None if variant == "plain" else torch.full((batch, N_PAD), 7.0, dtype=dtype)
    for b, x in enumerate(items):
        features[b, : x.shape[0]] = x
        if gate is not None:
            gate[b, : x.shape[0]] = gates[b]
    lengths = torch.tensor([x.shape[0] for x in items], dtype=torch.int64)
    seed = torch.tensor(seeds, dtype=torch.int64) if variant == "gate_seed" else None
    return features, lengths, gate, seed


@functools.cache
def batch_oracle(kind: str, dtype: torch.dtype, variant: str, k: int):
    """The float64 reference on ``gapped_batch`` or ``random_batch`` (shared by every backend and algorithm)."""
    features, lengths, gate, seed = (gapped_batch if kind == "gapped" else random_batch)(dtype, variant)[:4]
    return oracle(OP, features, lengths, k, gate, seed)


def _item_args(features, lengths, gate, seed, b):
    n = int(lengths[b])
    return features[b, :n], None if gate is None else gate[b, :n], -1 if seed is None else int(seed[b])


# --- 1. reference vs brute force -------------------------------------------------------------------------------

BRUTE_CASES = {
    # name: (n, D, gate kind, seed, tol)
    "n_gt_d": (8, 5, None, -1, TOL),
    "n_lt_d": (5, 6, None, -1, TOL),
    "gated": (8, 6, "random", -1, TOL),
    "gate_zeros": (7, 4, "zeros", -1, TOL),
    "seeded": (8, 3, "random", 5, TOL),
    "zero_seed": (6, 4, None, 2, TOL),
    "dup_and_zero": (8, 4, "random", -1, TOL),
    "near_span_tol": (6, 6, None, -1, TOL),
    "near_span_tol0": (6, 6, None, -1, 0.0),
    "loose_tol": (7, 6, "random", -1, 0.3),
}


def _brute_case(name: str, attempt: int):
    n, dim, gate_kind, seed, tol = BRUTE_CASES[name]
    gen = torch.Generator().manual_seed(sorted(BRUTE_CASES).index(name) + 100 * attempt)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * (0.5 + torch.rand(n, 1, generator=gen))
    gate = None
    if gate_kind == "random":
        gate = torch.rand(n, generator=gen, dtype=torch.float64)
    elif gate_kind == "zeros":
        gate = torch.rand(n, generator=gen, dtype=torch.float64)
        gate[[1, 4]] = 0
        gate[5] = gate[6] = 0.25  # a gate tie in the fill phase
    if name == "zero_seed":
        x[2] = 0
    if name == "dup_and_zero":
        x[6] = x[1]
        x[3] = 0
        gate[6] = 0.5 * gate[1]  # the copy scores half: no tie between the duplicates
    if name.startswith("near_span"):
        x[4] = 0.7 * x[0] - 1.3 * x[2] + 3e-4 * torch.randn(dim, generator=gen, dtype=torch.float64)
    return x, gate, seed, tol


@pytest.mark.parametrize("k", [0, 1, 3, 8])
@pytest.mark.parametrize("name", sorted(BRUTE_CASES))
def test_reference_matches_brute_force(name, k):
    """The float64 reference equals a from-scratch least-squares greedy (seed, exhaustion and fill rules)."""
    for attempt in range(50):
        x, gate, seed, tol = _brute_case(name, attempt)
        want_idx, want_e, gap, dist = brute_force(x, x.shape[0], gate, seed, tol)
        if gap >= 1e-9 and dist >= 1e-9:  # float64 vs float64: far from ties / the threshold at 1e-16 rounding
            break
    else:
        raise AssertionError("no gapped brute-force input")
    n = x.shape[0]
    kk = min(k, n)
    args = (x[None], torch.tensor([n]), kk, None if gate is None else gate[None], torch.tensor([seed]), tol)
    idx, energies = mrprune.reference.greedy_residual_select(*args)
    assert idx.dtype == torch.int64 and energies.dtype == torch.float64
    assert idx[0].tolist() == want_idx[:kk].tolist()
    torch.testing.assert_close(energies[0], want_e[:kk], rtol=1e-9, atol=1e-12)
    if name.startswith("near_span") and kk == n:  # token 4 is within tol of span(0, 2): one pivot fewer
        assert int((energies > 0).sum()) == (n if tol == 0 else n - 1)


# --- 2. kernels vs reference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_exact_on_gapped_inputs(backend, algorithm, dtype, variant, k):
    """On gap-screened padded batches the kernel picks exactly the reference's indices, with matching energies."""
    features, lengths, gate, seed, gap, dist = gapped_batch(dtype, variant)
    assert gap >= MIN_GAP and dist >= MIN_TOL_DIST  # the comparison below is meaningful
    idx, energies = run(OP, backend, features, lengths, k, gate, seed, algorithm=algorithm)
    want_idx, want_e = batch_oracle("gapped", dtype, variant, k)
    assert idx.dtype == torch.int64 and energies.dtype == torch.float32
    assert idx.shape == energies.shape == (len(LENGTHS), k)
    assert torch.equal(idx, want_idx)
    assert_close(energies, want_e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", (7, N_PAD))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_objective_on_random_inputs(backend, algorithm, dtype, variant, k):
    """Unscreened inputs: each pick maximises the dense float64 score (ties allowed), energies are the dense
    residuals, un-gated energies never increase, fill order follows the spec, and the picked span explains as much
    energy as the reference's."""
    features, lengths, gate, seed = random_batch(dtype, variant)
    idx, energies = run(OP, backend, features, lengths, k, gate, seed, algorithm=algorithm)
    want_idx, _ = batch_oracle("random", dtype, variant, k)
    greedy_steps = 0
    for b in range(len(LENGTHS)):
        v, g, s = _item_args(features, lengths, gate, seed, b)
        greedy_steps += check_trajectory(v, g, idx[b], energies[b], k, s)
        if gate is None:
            e = energies[b, : min(k, v.shape[0])].double()
            e = e[1:] if s >= 0 else e
            scale = float((v.double() ** 2).sum(1).max()) if v.shape[0] else 0.0
            assert bool((e[:-1] >= e[1:] - ENERGY_SLACK * scale).all()), e
        total = float((v.double() ** 2).sum())
        ours, theirs = explained_energy(v, idx[b].tolist()), explained_energy(v, want_idx[b].tolist())
        assert ours >= theirs - 1e-4 * total
    assert greedy_steps >= min(k, 20)  # the checks above covered real greedy steps, not only fills


@pytest.mark.parametrize("helper", [brute_force, dense_replay])
def test_gap_screens_detect_ties_and_agree(helper):
    """The gap screens used by the exact tests detect a tie (so passing them means something); the vectorised
    float64 replay agrees with the brute force."""
    x = torch.eye(4, dtype=torch.float64)  # four equal energies: every step is a tie
    *_, gap, _ = helper(x, 4)
    assert gap == 0
    x = torch.randn(9, 5, dtype=torch.float64)
    x[7] = 0
    gate = torch.rand(9, dtype=torch.float64)
    want = brute_force(x, 9, gate, 7)
    got = helper(x, 9, gate, 7)
    assert got[0].tolist() == want[0].tolist()
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_exact_on_clustered_features(backend, algorithm):
    """Clustered, shifted features (as the graph tests use), past full rank: exact picks, energies and fill."""
    x = clustered(61, 33, generator=torch.Generator().manual_seed(3))
    want_idx, want_e, gap, dist = dense_replay(x, 40)
    assert gap >= MIN_GAP and dist >= MIN_TOL_DIST
    assert int((want_e > 0).sum()) == 33  # rank exhausted after D picks, then 7 fill picks
    idx, energies = run(OP, backend, x[None], torch.tensor([61]), 40, algorithm=algorithm)
    assert idx[0].tolist() == want_idx.tolist()
    assert_close(energies[0], want_e, rtol=1e-4, atol=1e-4)


def _synthetic(name: str) -> torch.Tensor:
    testing = pytest.importorskip("mrprune.testing")
    if name == "llava15":
        return testing.llava15_features(dim=64, seed=1)  # 576 tokens, outliers, smooth and textured regions
    return testing.qwen2_5_vl_features(frames=2, height=9, width=11, dim=48, seed=1)  # video: temporal redundancy


@pytest.mark.parametrize("name", ["llava15", "qwen2_5_vl_video"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_on_synthetic_vlm_features(backend, algorithm, name):
    """LLaVA-1.5 / Qwen2.5-VL-like tokens, gated and seeded, past full rank: the same picks as the float64 greedy
    while its score gaps are clear (a checked, long prefix), and every pick passes the tie-aware spec checks."""
    x = _synthetic(name)
    n, dim = x.shape
    k = dim + 12  # past the rank: the last picks are fills by gate
    gate = 0.2 + torch.rand(n, generator=torch.Generator().manual_seed(0))
    gate[::7] = 0
    seed = 5
    want_idx, want_e, gaps, dists = dense_replay(x, k, gate, seed, per_step=True)
    clear = [gap >= MIN_GAP and dist >= MIN_TOL_DIST for gap, dist in zip(gaps, dists, strict=False)]
    prefix = clear.index(False) if False in clear else len(clear)
    assert prefix >= 30, prefix  # the exact comparison below covers many steps
    idx, energies = run(
        OP, backend, x[None], torch.tensor([n]), k, gate[None], torch.tensor([seed]), algorithm=algorithm
    )
    assert idx[0, :prefix].tolist() == want_idx[:prefix].tolist()
    assert_close(energies[0, :prefix], want_e[:prefix], rtol=1e-4, atol=1e-4)
    assert check_trajectory(x, gate, idx[0], energies[0], k, seed) >= prefix


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_non_contiguous_and_int32(backend, algorithm):
    """A transposed (non-contiguous) feature view and int32 lengths/seed give the reference's result."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 12, 29, generator=gen)
    features = base.transpose(1, 2)  # [2, 29, 12], non-contiguous
    lengths = torch.tensor([29, 17], dtype=torch.int32)
    seed = torch.tensor([-1, 4], dtype=torch.int32)
    idx, energies = run(OP, backend, features, lengths, 15, None, seed, algorithm=algorithm)
    for b in range(2):
        v, _, s = _item_args(features, lengths, None, seed, b)
        *_, gap, dist = dense_replay(v, 15, None, s)
        assert gap >= MIN_GAP and dist >= MIN_TOL_DIST
        check_trajectory(v, None, idx[b], energies[b], 15, s)
    want_idx, want_e = oracle(OP, features, lengths.long(), 15, None, seed.long())
    assert torch.equal(idx, want_idx)
    assert_close(energies, want_e, rtol=1e-4, atol=1e-4)


def _llava_tokens(seed: int = 2) -> torch.Tensor:
    """2880 synthetic LLaVA-NeXT tokens (576 base + 48 x 48 high-res, newline tokens dropped), D = 4096."""
    testing = pytest.importorskip("mrprune.testing")
    rows = cols = 48
    x = testing.llava_next_features(rows, cols, 4096, seed=seed)
    newline = 576 + torch.arange(rows) * (cols + 1) + cols
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[newline] = False
    return x[keep]


def _gram_greedy(gram: torch.Tensor, k: int, tol: float = TOL):
    """float64 pivoted partial Cholesky of a Gram matrix (un-gated greedy): picks, energies, per-step score gaps."""
    energy = gram.diagonal().clone()
    initial = energy.clone()
    picked = torch.zeros(gram.shape[0], dtype=torch.bool)
    factor = gram.new_zeros(k, gram.shape[0])
    picks, energies, gaps = [], [], []
    for t in range(k):
        score = torch.where(picked, float("-inf"), energy)
        j = int(torch.argmax(score))
        best = float(score[j])
        score[j] = float("-inf")
        gaps.append(_relative_gap(best, score, float(initial[j]), initial))
        picks.append(j)
        energies.append(best)
        row = (gram[j] - factor[:t, j] @ factor[:t]) / energy[j].sqrt()
        factor[t] = row
        energy = (energy - row * row).clamp_min(0)
        energy = torch.where(energy <= tol * initial, 0.0, energy)
        picked[j] = True
    return picks, energies, gaps


def _check_order_on_gram(gram: torch.Tensor, picks: list[int], energies: torch.Tensor, slack: float) -> float:
    """Tie-aware check of an un-gated pick order against the float64 Gram; returns the explained energy.

    With ``L = chol(G[p, p])`` and ``W = L^-1 G[p, :]``, every token's residual before step ``t`` is
    ``G_ii - sum_{m<t} W_mi^2`` and the pick's is ``L_tt^2``: each pick must report that energy and be a maximiser.
    """
    norm2 = gram.diagonal()
    chol = torch.linalg.cholesky(gram[picks][:, picks])
    w = torch.linalg.solve_triangular(chol, gram[picks], upper=False)
    torch.testing.assert_close(energies.double(), chol.diagonal() ** 2, rtol=0, atol=slack * float(norm2.max()))
    before = norm2 - torch.cat([w.new_zeros(1, w.shape[1]), (w * w).cumsum(0)[:-1]])  # [k, N] residual at step t
    steps = torch.arange(len(picks))
    pick_step = torch.full((gram.shape[0],), len(picks))
    pick_step[picks] = steps
    picked = pick_step[None, :] < steps[:, None]  # [k, N]: token picked before step t
    best = torch.where(picked, float("-inf"), before).max(dim=1).values
    chosen = before[steps, torch.tensor(picks)]
    assert bool((chosen >= best - slack * norm2[picks]).all())
    return float((w * w).sum())


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_next_scale_gram_basis_reference(backend):
    """K = 640 of N = 2880 LLaVA-like tokens, D = 4096: gram, basis and the reference pick the same first 100 tokens
    (score gaps checked), every one of the 640 picks is a maximiser with the dense float64 energy, and both kernels'
    spans explain the same energy as the float64 greedy."""
    x = _llava_tokens()
    n, k, prefix = x.shape[0], 640, 100
    assert n == 2880
    features, lengths = x[None], torch.tensor([n])
    gram = x.double() @ x.double().T
    dense_picks, dense_e, gaps = _gram_greedy(gram, k)
    # float32 energies here are within ~3e-6 of the token's squared norm: 1e-5 leaves the prefix comparison exact
    assert min(gaps[:prefix]) >= 1e-5, min(gaps[:prefix])
    ref_idx, ref_e = mrprune.reference.greedy_residual_select(features, lengths, prefix)  # the float32 reference
    assert ref_idx[0].tolist() == dense_picks[:prefix]
    assert_close(ref_e[0], torch.tensor(dense_e[:prefix], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    want = _check_order_on_gram(gram, dense_picks, torch.tensor(dense_e, dtype=torch.float64), 1e-9)
    for algorithm in ("gram", "basis"):
        idx, energies = run(OP, backend, features, lengths, k, algorithm=algorithm)
        picks = idx[0].tolist()
        assert picks[:prefix] == dense_picks[:prefix], algorithm
        assert len(set(picks)) == k and bool((energies[0] > 0).all())  # no fill: D = 4096 > k
        got = _check_order_on_gram(gram, picks, energies[0], 1e-4)
        assert abs(got - want) <= 1e-4 * float(gram.diagonal().sum()), algorithm


# --- 3. edge cases ---------------------------------------------------------------------------------------------

IMPLS = [
    *(pytest.param(b, a, id=f"{b}-{a}") for b in CPU_BACKENDS for a in ALGORITHMS),
    *(pytest.param("cuda", a, marks=CUDA.marks, id=f"cuda-{a}") for a in ALGORITHMS),
    pytest.param("reference", "auto", id="reference"),
]


def _select(backend, algorithm, features, lengths, k, gate=None, seed=None, tol=TOL):
    return run(OP, backend, features, lengths, k, gate, seed, tol, algorithm)


@pytest.mark.parametrize("dtype", [*INPUT_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_k_zero(backend, algorithm, dtype):
    """k = 0 gives empty [B, 0] outputs: int64 indices, float32 energies (float64 for float64 input)."""
    features = torch.randn(3, 5, 4).to(dtype)
    idx, energies = _select(backend, algorithm, features, torch.tensor([5, 0, 2]), 0, torch.rand(3, 5))
    assert idx.shape == energies.shape == (3, 0)
    assert idx.dtype == torch.int64
    assert energies.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_k_at_least_n_picks_every_token_once(backend, algorithm, k):
    """k >= n_b: every valid token exactly once, then -1 with energy 0 (gates with zeros, seeds)."""
    features = torch.randn(4, 7, 3)
    lengths = torch.tensor([5, 0, 3, 7])
    gate = torch.rand(4, 7)
    gate[0, 1] = gate[3, 2] = 0
    seed = torch.tensor([4, -1, 0, -1])
    idx, energies = _select(backend, algorithm, features, lengths, k, gate, seed)
    for b, n in enumerate(lengths.tolist()):
        m = min(k, n)
        if n <= k:
            assert sorted(idx[b, :n].tolist()) == list(range(n))
        assert idx[b, m:].tolist() == [-1] * (k - m)
        assert bool((energies[b, m:] == 0).all())
        check_trajectory(features[b, :n], gate[b, :n], idx[b], energies[b], k, int(seed[b]))


@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_single_token(backend, algorithm):
    """N = 1: the token itself with its squared norm, or -1 for an empty item."""
    features = torch.tensor([[[3.0, -4.0]], [[1.0, 1.0]]])
    idx, energies = _select(backend, algorithm, features, torch.tensor([1, 0]), 1)
    assert idx.tolist() == [[0], [-1]]
    assert_close(energies, torch.tensor([[25.0], [0.0]]))


@pytest.mark.parametrize("seed", [-1, 4])
@pytest.mark.parametrize("gate", ["none", "ones"])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_all_tokens_identical(backend, algorithm, gate, seed):
    """Identical tokens: one pivot (the lowest index, or the seed), the rest by fill in ascending index."""
    v = torch.randn(6)
    features = v.expand(1, 9, 6).clone()
    gates = None if gate == "none" else torch.ones(1, 9)
    idx, energies = _select(backend, algorithm, features, torch.tensor([9]), 9, gates, torch.tensor([seed]))
    first = 0 if seed < 0 else seed
    assert idx[0].tolist() == [first] + [i for i in range(9) if i != first]
    assert_close(energies[0, 0], (v.double() ** 2).sum(), rtol=1e-5, atol=0)
    assert bool((energies[0, 1:] == 0).all())


@pytest.mark.parametrize("seed", [-1, 5])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_zero_vectors_never_pivot(backend, algorithm, seed):
    """Zero vectors are never greedy picks: they come in the fill (energy 0) or as the seed (energy 0)."""
    features = torch.randn(1, 12, 8)
    zero = [2, 5, 11]
    features[0, zero] = 0
    idx, energies = _select(backend, algorithm, features, torch.tensor([12]), 12, None, torch.tensor([seed]))
    picks = idx[0].tolist()
    greedy = [p for p, e in zip(picks, energies[0].tolist(), strict=True) if e > 0]
    assert len(greedy) == 8  # 9 nonzero tokens in D = 8
    assert not set(greedy) & set(zero)
    assert all(energies[0, picks.index(z)] == 0 for z in zero)
    if seed >= 0:
        assert picks[0] == seed
    check_trajectory(features[0], None, idx[0], energies[0], 12, seed)


@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_rank_exhaustion_fills_by_gate_then_index(backend, algorithm):
    """n > D: after D pivots the rest come by descending gate (ties, -0.0 == 0.0 included, by index), energy 0."""
    features = torch.randn(1, 11, 3)
    gate = torch.tensor([[1.0, 0.5, -0.0, 1.0, 0.5, 1.0, 0.5, 0.0, 1.0, 0.5, 0.5]])  # -0.0 ties with 0.0
    idx, energies = _select(backend, algorithm, features, torch.tensor([11]), 11, gate)
    picks = idx[0].tolist()
    assert bool((energies[0, :3] > 0).all()) and bool((energies[0, 3:] == 0).all())
    assert picks[3:] == sorted(set(range(11)) - set(picks[:3]), key=lambda i: (-float(gate[0, i]), i))
    check_trajectory(features[0], gate[0], idx[0], energies[0], 11)


@pytest.mark.parametrize("seed", [-1, 3])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_gate_all_zero_is_pure_fill(backend, algorithm, seed):
    """All gates 0: nothing scores, so the picks are by index (after the seed), all with energy 0 but the seed's."""
    features = torch.randn(2, 7, 4)
    lengths = torch.tensor([7, 5])
    idx, energies = _select(backend, algorithm, features, lengths, 6, torch.zeros(2, 7), torch.tensor([seed, -1]))
    first = [] if seed < 0 else [seed]
    assert idx[0].tolist() == (first + [i for i in range(7) if i != seed])[:6]
    assert idx[1].tolist() == [0, 1, 2, 3, 4, -1]
    want0 = float((features[0, seed].double() ** 2).sum()) if seed >= 0 else 0.0
    assert_close(energies[:, 0], torch.tensor([want0, 0.0]), rtol=1e-5, atol=0)
    assert bool((energies[:, 1:] == 0).all())


@pytest.mark.parametrize("gate_first", [False, True])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_duplicates(backend, algorithm, gate_first):
    """A duplicated top token: the tie goes to the lower index (or to the larger gate); the copy is never a pivot."""
    features = torch.randn(1, 8, 6)
    features[0, 5] = features[0, 2] = 3 * features[0, 2] / features[0, 2].norm() * 2  # clearly the largest norm
    gate = torch.ones(1, 8)
    if gate_first:
        gate[0, 5] = 1.5
    idx, energies = _select(backend, algorithm, features, torch.tensor([8]), 8, gate)
    first, copy = (5, 2) if gate_first else (2, 5)
    picks = idx[0].tolist()
    assert picks[0] == first
    assert energies[0, picks.index(copy)] == 0
    assert sum(e > 0 for e in energies[0].tolist()) == 6  # 7 distinct vectors in D = 6
    check_trajectory(features[0], gate[0], idx[0], energies[0], 8)


@pytest.mark.parametrize("tol", [0.0, TOL, 1e-2, 0.5])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_exhaustion_tol(backend, algorithm, tol):
    """exhaustion_tol decides whether a nearly spanned token (relative residual ~1e-3) is a pivot or a fill pick."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 8, generator=gen)
    x[6] = 0.8 * x[0] - 0.6 * x[1] + 0.05 * torch.randn(8, generator=gen)
    want_idx, want_e, gap, dist = dense_replay(x, 7, tol=tol)
    assert gap >= MIN_GAP and dist >= MIN_TOL_DIST
    idx, energies = _select(backend, algorithm, x[None], torch.tensor([7]), 7, tol=tol)
    assert idx[0].tolist() == want_idx.tolist()
    assert_close(energies[0], want_e, rtol=1e-4, atol=1e-4)
    pivots = int((energies > 0).sum())
    assert (pivots == 7) == (tol <= TOL)  # at tol >= 1e-2 the nearly spanned token is retired
    assert tol != 0.5 or pivots < 6  # a loose threshold retires tokens early


# Axis-aligned tokens: every Gram entry, factor entry and energy is exact in float32. Token 4 is parallel to token 0
# (spanned after it), tokens 1 and 5 are zero vectors.
AXES = torch.tensor(
    [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
)
AXES_CASES = {
    # name: (gate, seed, indices, energies)
    "plain": (None, -1, [0, 2, 3, 1, 4, 5], [9.0, 4.0, 1.0, 0.0, 0.0, 0.0]),
    "gate": ([1.0, 5.0, 1.0, 0.5, 2.0, 5.0], -1, [0, 2, 3, 1, 5, 4], [9.0, 4.0, 1.0, 0.0, 0.0, 0.0]),
    "zero_seed": (None, 1, [1, 0, 2, 3, 4, 5], [0.0, 9.0, 4.0, 1.0, 0.0, 0.0]),
    "spanned_seed": (None, 4, [4, 2, 3, 0, 1, 5], [1.0, 4.0, 1.0, 0.0, 0.0, 0.0]),
    "gate_zero_top": ([0.0, 1.0, 1.0, 1.0, 1.0, 1.0], -1, [2, 3, 4, 1, 5, 0], [4.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("k", [1, 4, 6])
@pytest.mark.parametrize("case", sorted(AXES_CASES))
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_exact_arithmetic_cases(backend, algorithm, case, k):
    """Hand-checked trajectories with exact float32 arithmetic (seeds on zero and spanned vectors, gates with zeros,
    rank exhaustion, fill by gate then index) match bit for bit."""
    gate, seed, want_idx, want_e = AXES_CASES[case]
    gate_t = None if gate is None else torch.tensor([gate])
    idx, energies = _select(backend, algorithm, AXES[None], torch.tensor([6]), k, gate_t, torch.tensor([seed]))
    assert idx[0].tolist() == want_idx[:k]
    assert energies[0].tolist() == want_e[:k]


@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_ties_go_to_the_lower_index(backend, algorithm):
    """Equal energies everywhere (scaled orthogonal axes, exact): the picks are 0, 1, 2, ...; with a gate, the gate
    decides and equal gated scores fall back to the lower index."""
    n = 6
    features, lengths = (2.0 * torch.eye(n))[None], torch.tensor([n])
    idx, energies = _select(backend, algorithm, features, lengths, n)
    assert idx[0].tolist() == list(range(n))
    assert energies[0].tolist() == [4.0] * n
    gate = torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.25, 1.0]])
    idx, _ = _select(backend, algorithm, features, lengths, n, gate)
    assert idx[0].tolist() == [1, 3, 5, 0, 2, 4]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_low_precision_strided_inputs(backend, algorithm, dtype):
    """Non-contiguous low-precision features and gates, int32 lengths and seeds: the spec's trajectory on the
    rounded values."""
    gen = torch.Generator().manual_seed(13)
    features = torch.randn(2, 12, 29, generator=gen).to(dtype).transpose(1, 2)  # [2, 29, 12], non-contiguous
    lengths = torch.tensor([29, 17], dtype=torch.int32)
    seed = torch.tensor([-1, 4], dtype=torch.int32)
    gate = torch.rand(29, 2, generator=gen).to(dtype).t()
    idx, energies = _select(backend, algorithm, features, lengths, 15, gate, seed)
    for b in range(2):
        v, g, s = _item_args(features, lengths, gate, seed, b)
        check_trajectory(v, g, idx[b], energies[b], 15, s)


# --- 4. batch equals per item ----------------------------------------------------------------------------------


def _assert_same(got, want, bitwise: bool) -> None:
    assert torch.equal(got[0], want[0])
    if bitwise:
        assert torch.equal(got[1], want[1]), (got[1] - want[1]).abs().max()
    else:
        assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["plain", "gate_seed"])
@pytest.mark.parametrize(("backend", "algorithm"), IMPLS)
def test_batch_equals_per_item(backend, algorithm, variant):
    """Each item of a padded batch gives the same result alone, at the same padded width or unpadded (copies):
    bitwise for the kernels, to rounding for the reference (its GEMVs may round differently on other addresses)."""
    features, lengths, gate, seed = random_batch(torch.float32, variant)
    k, bitwise = 20, backend != "reference"
    idx, energies = _select(backend, algorithm, features, lengths, k, gate, seed)
    for b, n in enumerate(lengths.tolist()):
        g = None if gate is None else gate[b : b + 1].clone()
        s = None if seed is None else seed[b : b + 1].clone()
        one = _select(backend, algorithm, features[b : b + 1].clone(), lengths[b : b + 1], k, g, s)
        _assert_same((one[0][0], one[1][0]), (idx[b], energies[b]), bitwise)
        if n:
            m = min(k, n)
            g = None if gate is None else gate[b : b + 1, :n].clone()
            one = _select(backend, algorithm, features[b : b + 1, :n].clone(), lengths[b : b + 1], m, g, s)
            _assert_same((one[0][0], one[1][0]), (idx[b, :m], energies[b, :m]), bitwise)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_result_independent_of_address(backend, algorithm):
    """The same item stored at different float offsets (as items of a batch with N * D % 4 != 0 are) gives bitwise
    the same picks and energies: a kernel's result must not depend on the memory alignment of its input."""
    n, dim = 50, 19
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(11))
    results = []
    device = device_of(backend)
    for offset in range(4):
        buffer = torch.zeros(n * dim + 4, device=device)
        item = buffer[offset : offset + n * dim].view(1, n, dim)
        item.copy_(x.to(device))
        results.append(_select(backend, algorithm, item, torch.tensor([n], device=device), 20))
    for offset, result in enumerate(results[1:], start=1):
        assert torch.equal(result[0], results[0][0]), offset
        assert torch.equal(result[1], results[0][1]), (offset, (result[1] - results[0][1]).abs().max())


@pytest.mark.parametrize("algorithm", ["gram", "basis"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_items_than_one_launch(backend, algorithm):
    """More items than the CUDA kernel runs at once (one block per SM): several launches; every item passes the
    trajectory checks and equals its own single-item run bitwise."""
    batch = torch.cuda.get_device_properties(0).multi_processor_count + 5 if backend == "cuda" else 9
    gen = torch.Generator().manual_seed(12)
    features = torch.randn(batch, 40, 8, generator=gen)
    lengths = torch.randint(0, 41, (batch,), generator=gen)
    gate = torch.rand(batch, 40, generator=gen)
    seed = torch.where(torch.rand(batch, generator=gen) < 0.5, lengths - 1, -1)
    idx, energies = _select(backend, algorithm, features, lengths, 30, gate, seed)
    for b in range(batch):
        v, g, s = _item_args(features, lengths, gate, seed, b)
        check_trajectory(v, g, idx[b], energies[b], 30, s)
    for b in (0, batch - 1):
        one = _select(backend, algorithm, features[b : b + 1], lengths[b : b + 1], 30, gate[b : b + 1], seed[b : b + 1])
        assert torch.equal(one[0][0], idx[b]) and torch.equal(one[1][0], energies[b])


# --- 5. bad input ----------------------------------------------------------------------------------------------


def _good_args() -> dict:
    return {
        "features": torch.randn(2, 6, 4),
        "lengths": torch.tensor([6, 3]),
        "k": 3,
        "gate": None,
        "seed": None,
        "exhaustion_tol": TOL,
        "algorithm": "auto",
    }


def _nan_at(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t


BAD_INPUTS = {
    "features_2d": (lambda a: {"features": a["features"][0]}, ValueError, "features must be 3-D"),
    "features_4d": (lambda a: {"features": a["features"][None]}, ValueError, "features must be 3-D"),
    "features_int": (lambda a: {"features": a["features"].long()}, TypeError, "features must be float16"),
    "features_nan": (lambda a: {"features": _nan_at(a["features"], float("nan"))}, ValueError, "features contains"),
    "features_inf": (lambda a: {"features": _nan_at(a["features"], float("inf"))}, ValueError, "features contains"),
    "k_negative": (lambda a: {"k": -1}, ValueError, r"k must lie in \[0, N=6\]"),
    "k_above_n": (lambda a: {"k": 7}, ValueError, r"k must lie in \[0, N=6\]"),
    "gate_negative": (lambda a: {"gate": -torch.rand(2, 6)}, ValueError, "gate must be non-negative"),
    "gate_shape": (lambda a: {"gate": torch.rand(2, 5)}, ValueError, r"gate must have shape \(2, 6\)"),
    "gate_1d": (lambda a: {"gate": torch.rand(6)}, ValueError, "gate must be 2-D"),
    "gate_nan": (lambda a: {"gate": _nan_at(torch.rand(2, 6), float("nan"))}, ValueError, "gate contains NaN"),
    "gate_int": (lambda a: {"gate": torch.ones(2, 6, dtype=torch.int64)}, TypeError, "gate must be float16"),
    "seed_at_length": (lambda a: {"seed": torch.tensor([0, 3])}, ValueError, "seed must be < lengths"),
    "seed_empty_item": (
        lambda a: {"lengths": torch.tensor([6, 0]), "seed": torch.tensor([-1, 0])},
        ValueError,
        "seed must be < lengths",
    ),
    "seed_float": (lambda a: {"seed": torch.tensor([0.0, 1.0])}, TypeError, "seed must be int32 or int64"),
    "seed_shape": (lambda a: {"seed": torch.tensor([0, 1, 2])}, ValueError, r"seed must have shape \(2,\)"),
    "lengths_above": (lambda a: {"lengths": torch.tensor([7, 3])}, ValueError, r"lengths must lie in \[0, 6\]"),
    "lengths_negative": (lambda a: {"lengths": torch.tensor([-1, 3])}, ValueError, r"lengths must lie in \[0, 6\]"),
    "lengths_float": (lambda a: {"lengths": torch.tensor([6.0, 3.0])}, TypeError, "lengths must be int32 or int64"),
    "lengths_shape": (lambda a: {"lengths": torch.tensor([6])}, ValueError, r"lengths must have shape \(2,\)"),
    "algorithm": (lambda a: {"algorithm": "qr"}, ValueError, "algorithm must be 'auto', 'gram' or 'basis'"),
    "tol_one": (lambda a: {"exhaustion_tol": 1.0}, ValueError, r"exhaustion_tol must lie in \[0, 1\)"),
    "tol_negative": (lambda a: {"exhaustion_tol": -1e-3}, ValueError, r"exhaustion_tol must lie in \[0, 1\)"),
    "tol_nan": (lambda a: {"exhaustion_tol": float("nan")}, ValueError, r"exhaustion_tol must lie in \[0, 1\)"),
    "lengths_meta": (lambda a: {"lengths": a["lengths"].to("meta")}, ValueError, "lengths is on meta"),
    "features_meta": (lambda a: {"features": a["features"].to("meta")}, ValueError, "lengths is on cpu but features"),
    "gate_meta": (lambda a: {"gate": torch.rand(2, 6, device="meta")}, ValueError, "gate is on meta"),
    "seed_meta": (lambda a: {"seed": torch.zeros(2, dtype=torch.int64, device="meta")}, ValueError, "seed is on meta"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "reference"])
def test_bad_input(backend, case):
    """Invalid arguments raise a clear error naming the op and the argument, whatever the backend."""
    change, error, message = BAD_INPUTS[case]
    args = _good_args()
    args.update(change(args))
    with mrprune.backends.use_backend(backend), pytest.raises(error, match=message) as info:
        mrprune.greedy_residual_select(*args.values())  # not run(): it would refuse a meta first argument
    assert "mrprune.greedy_residual_select" in str(info.value)


# --- 6. opcheck and torch.compile ------------------------------------------------------------------------------


def _small_args(with_extras: bool, algorithm: str, generator_seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(generator_seed)
    features = torch.randn(3, 9, 5, generator=gen).to(device)
    lengths = torch.tensor([9, 0, 6], device=device)
    gate = torch.rand(3, 9, generator=gen).to(device) if with_extras else None
    seed = torch.tensor([4, -1, 0], device=device) if with_extras else None
    return features, lengths, 6, gate, seed, TOL, algorithm


@pytest.mark.parametrize(("with_extras", "algorithm"), [(False, "gram"), (True, "basis"), (True, "auto")])
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_opcheck(backend, with_extras, algorithm):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) passes."""
    with mrprune.backends.use_backend(backend):
        result = torch.library.opcheck(
            torch.ops.mrprune.greedy_residual_select.default,
            _small_args(with_extras, algorithm, device=device_of(backend)),
        )
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize(("with_extras", "algorithm"), [(False, "gram"), (True, "basis")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend, with_extras, algorithm):
    """torch.compile(fullgraph=True) gives bitwise the eager result, also on new values of the same shapes."""

    def select(features, lengths, gate, seed):
        return mrprune.greedy_residual_select(features, lengths, 6, gate, seed, algorithm=algorithm)

    torch._dynamo.reset()
    compiled = torch.compile(select, fullgraph=True)
    with mrprune.backends.use_backend(backend):
        for generator_seed in (0, 1):
            args = _small_args(with_extras, algorithm, generator_seed, device_of(backend))
            features, lengths, _, gate, seed, _, _ = args
            got = compiled(features, lengths, gate, seed)
            want = select(features, lengths, gate, seed)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert got[0][0, 0] != -1


# --- 7. the CUDA kernel's own contract (GPU only) ------------------------------------------------------------------

cuda_only = pytest.mark.parametrize("backend", [CUDA])


@cuda_only
def test_cuda_auto_backend_is_the_cuda_kernel(backend):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mrprune::_greedy_residual_select_cuda", "CUDA")
    assert mrprune.backends.available(OP, "cuda")[0] == "cuda"


@cuda_only
def test_cuda_runs_on_the_current_stream(backend):
    features, lengths, gate, seed = gapped_batch(torch.float32, "gate_seed")[:4]
    want = run(OP, backend, features, lengths, 13, gate, seed)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), mrprune.backends.use_backend(backend):
        got = mrprune.greedy_residual_select(features.cuda(), lengths.cuda(), 13, gate.cuda(), seed.cuda())
    stream.synchronize()
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@cuda_only
def test_cuda_private_op_rejects_bad_arguments(backend):
    features, lengths = torch.randn(2, 10, 4, device="cuda"), torch.tensor([10, 3], device="cuda")
    op = torch.ops.mrprune._greedy_residual_select_cuda
    with pytest.raises(RuntimeError, match="k must lie"):
        op(features, lengths, 11, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="dtype"):
        op(features.double(), lengths, 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(2, 4, 10, device="cuda").transpose(1, 2), lengths, 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="dtype"):
        op(features, lengths.int(), 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="shape"):
        op(features, lengths[:1], 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op(features, lengths.cpu(), 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="gate must have shape"):
        op(features, lengths, 3, torch.rand(2, 9, device="cuda"), None, TOL, "auto")
    with pytest.raises(RuntimeError, match="seed must have shape"):
        op(features, lengths, 3, None, torch.zeros(3, dtype=torch.int64, device="cuda"), TOL, "auto")
    with pytest.raises(RuntimeError, match="algorithm"):
        op(features, lengths, 3, None, None, TOL, "qr")


@pytest.mark.slow
@cuda_only
@pytest.mark.parametrize("algorithm", ["gram", "basis"])
@pytest.mark.parametrize(("tokens", "dim", "k"), [(4096, 96, 200), (16_384, 64, 96)])
def test_cuda_large_n_trajectory(backend, algorithm, tokens, dim, k):
    """N up to 16,384 (the Gram is 1 GiB there) with gates, a seed and rank exhaustion (k > D): trajectory checks."""
    gen = torch.Generator().manual_seed(tokens)
    features = torch.randn(2, tokens, dim, generator=gen) * (0.5 + torch.rand(2, tokens, 1, generator=gen))
    gate = torch.rand(2, tokens, generator=gen)
    gate[:, ::7] = 0
    lengths = torch.tensor([tokens, tokens - 123])
    seed = torch.tensor([17, -1])
    idx, energies = _select(backend, algorithm, features, lengths, k, gate, seed)
    for b in range(2):
        v, g, s = _item_args(features, lengths, gate, seed, b)
        assert check_trajectory(v, g, idx[b], energies[b], k, s) >= dim  # the whole span was explored first


@pytest.mark.slow
@cuda_only
def test_cuda_qwen_scale(backend):
    """K = 2731 of N = 8192 Qwen2.5-VL-like tokens (8 frames of 32 x 32), D = 3584, default ("auto") form: every pick
    is a maximiser with the dense float64 energy."""
    testing = pytest.importorskip("mrprune.testing")
    x = testing.qwen2_5_vl_features(8, 32, 32, 3584, seed=0)
    k = 2731
    idx, energies = run(OP, backend, x[None], torch.tensor([x.shape[0]]), k)
    picks = idx[0].tolist()
    assert len(set(picks)) == k and bool((energies[0] > 0).all())  # no fill: D = 3584 > k
    _check_order_on_gram(x.double() @ x.double().T, picks, energies[0], 1e-4)
