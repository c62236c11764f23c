"""The CUDA C++ greedy_residual_select kernel (csrc/cuda/greedy_residual_select.cu) against the spec on CPU copies.

Spec: ``mrprune.reference.greedy_residual_select``. The kernel is a weighted pivoted partial Cholesky in two forms
(``algorithm="gram"``: a precomputed Gram; ``"basis"``: Gram rows computed on the fly, one GEMV per step), so:

* on gap-screened inputs (every greedy step's winner leads by far more than float32 rounding, every relative
  residual is far from the exhaustion threshold) the picks equal the float64 reference's exactly and the energies
  match;
* on arbitrary inputs every output is checked by objective, tie-aware properties against a dense float64
  recomputation: each greedy pick maximises ``gate * residual`` among the unpicked tokens (up to a float32 slack),
  its reported energy is its residual at that moment, the fill starts only when nothing scores and follows the
  descending-gate-then-index rule, -1 and 0 past ``n``;
* exact-arithmetic inputs (axis vectors, duplicates, zero vectors) pin ties, seeds, gates and the fill bit for bit;
* the result does not depend on the batch composition, the padding or the input's address (bitwise).

Everything here needs a CUDA GPU and an extension built with the CUDA kernels (skipped otherwise).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import mrprune
from mrprune import backends, reference
from tests.utils import INPUT_DTYPES, assert_close, clustered, oracle

pytestmark = [pytest.mark.cuda, pytest.mark.ext]

OP = "greedy_residual_select"
ALGORITHMS = ("gram", "basis", "auto")
TOL = 1e-5  # the op's default exhaustion_tol
# Slack of the objective checks, relative to the item's largest squared norm (times its largest gate, if above 1).
SLACK = 1e-4
# Gap screening: the winner's lead over every other score relative to the gated squared norms of both tokens, and the
# distance of every relative residual from the exhaustion threshold (float32 errors here are ~1e-6 of both).
MIN_GAP = 1e-4
MIN_TOL_DIST = 5e-6
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


def _to(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def select(features, lengths, k, gate=None, seed=None, tol=TOL, algorithm="auto"):
    """The public op with the CUDA backend on device copies; results back on the CPU."""
    with backends.use_backend(BACKEND):
        idx, energies = mrprune.greedy_residual_select(
            _to(features), _to(lengths), k, _to(gate), _to(seed), tol, algorithm
        )
    assert idx.device.type == DEVICE and energies.device.type == DEVICE
    assert idx.dtype == torch.int64 and energies.dtype == torch.float32
    assert idx.shape == energies.shape == (features.shape[0], k)
    return idx.cpu(), energies.cpu()


def select_private(features, lengths, k, gate=None, seed=None, tol=TOL, algorithm="auto"):
    """The private CUDA op on canonical inputs (contiguous float32, int64), bypassing the router."""
    f32 = lambda t: None if t is None else t.to(DEVICE, torch.float32).contiguous()  # noqa: E731
    i64 = lambda t: None if t is None else t.to(DEVICE, torch.int64).contiguous()  # noqa: E731
    op = getattr(torch.ops.mrprune, PRIVATE_OP)
    idx, energies = op(f32(features), i64(lengths), k, f32(gate), i64(seed), tol, algorithm)
    return idx.cpu(), energies.cpu()


# --- independent float64 helpers -------------------------------------------------------------------------------


def _gates(gate: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64) if gate is None else gate[:n].double()


def replay(v: torch.Tensor, k: int, gate=None, seed: int = -1, tol: float = TOL):
    """The spec's greedy in float64 on explicit residual vectors (Gram-Schmidt, re-orthogonalised).

    Returns ``(indices [k], energies [k], min_gap, min_tol_dist)``: the smallest lead of a greedy winner over any
    other unpicked token (relative to the gated squared norms of both), and the smallest distance between a relative
    residual ``e_i / ||v_i||^2`` of an unpicked nonzero token and ``tol``.
    """
    v = v.double()
    n = v.shape[0]
    g = _gates(gate, n)
    norm2 = (v * v).sum(1)
    resid = v.clone()
    basis = v.new_zeros(0, v.shape[1])
    picked = torch.zeros(n, dtype=torch.bool)
    indices, energies = [], []
    min_gap, min_dist = math.inf, math.inf
    for t in range(min(k, n)):
        energy = (resid * resid).sum(1)
        live = ~picked & (norm2 > 0)
        if bool(live.any()):
            min_dist = min(min_dist, float((energy[live] / norm2[live] - tol).abs().min()))
        energy = torch.where(energy <= tol * norm2, 0.0, energy)
        if t == 0 and seed >= 0:
            j = seed
        else:
            score = torch.where(picked, -math.inf, g * energy)
            j = int(torch.argmax(score))  # the first maximum
            best = float(score[j])
            if best <= 0:  # fill: descending gate, then ascending index
                rest = [i for i in range(n) if not picked[i]]
                fill = sorted(rest, key=lambda i: (-float(g[i]), i))[: min(k, n) - t]
                indices += fill
                energies += [0.0] * len(fill)
                break
            others = torch.isfinite(score) & (torch.arange(n) != j)
            if bool(others.any()):
                lead = (best - score[others]) / (g[j] * norm2[j] + (g * norm2)[others])
                min_gap = min(min_gap, float(lead.min()))
        indices.append(j)
        energies.append(float(energy[j]))
        picked[j] = True
        if energies[-1] > 0:
            q = resid[j].clone()
            for _ in range(2):
                q = q - (basis @ q) @ basis
            q = q / q.norm()
            basis = torch.cat([basis, q[None]])
            resid = resid - (resid @ q)[:, None] * q[None]
    out_idx = torch.full((k,), -1, dtype=torch.int64)
    out_idx[: len(indices)] = torch.tensor(indices, dtype=torch.int64)
    out_e = torch.zeros(k, dtype=torch.float64)
    out_e[: len(energies)] = torch.tensor(energies, dtype=torch.float64)
    return out_idx, out_e, min_gap, min_dist


def check_objective(v, gate, indices, energies, k, seed=-1, tol=TOL, slack=SLACK) -> int:
    """Tie-aware check of one item's output against a dense float64 recomputation; returns the greedy pick count.

    The positive-energy picks are linearly independent, so one QR of them in pick order gives every token's residual
    before every step: ``||v_i||^2 - sum_{m < c} (q_m . v_i)^2`` with ``c`` pivots so far. Each greedy pick must
    report that residual (after the exhaustion rule) and maximise ``gate * residual`` among the unpicked tokens; the
    fill must start with nothing left to score and follow descending gate, then ascending index; -1 and 0 past n.
    """
    v = v.double()
    n = v.shape[0]
    m = min(k, n)
    g = _gates(gate, n)
    indices, energies = indices.tolist(), energies.double()
    assert indices[m:] == [-1] * (k - m), indices
    assert bool((energies[m:] == 0).all())
    picks = indices[:m]
    assert len(set(picks)) == m and all(0 <= p < n for p in picks), picks
    if m == 0:
        return 0
    norm2 = (v * v).sum(1)
    atol = slack * float(norm2.max()) * max(float(g.max()), 1.0)
    seeded = seed >= 0
    if seeded:
        assert picks[0] == seed
    start = 1 if seeded else 0
    fill_start = next((t for t in range(start, m) if energies[t] == 0), m)
    assert bool((energies[fill_start:m] == 0).all()), energies
    pivots = [p for t, p in enumerate(picks[:fill_start]) if energies[t] > 0]
    if pivots:
        q = torch.linalg.qr(v[pivots].T).Q  # [D, r]: orthonormal basis of the pivots, in pick order
        explained = torch.cat([v.new_zeros(n, 1), ((v @ q) ** 2).cumsum(1)], dim=1)  # [n, r + 1]
    else:
        explained = v.new_zeros(n, 1)
    unpicked = torch.ones(n, dtype=torch.bool)
    count = 0  # pivots so far
    for t in range(fill_start + 1):
        # (past D pivots, rounding-level ones after exhaustion, nothing more is explained)
        dense = (norm2 - explained[:, min(count, explained.shape[1] - 1)]).clamp_min(0)
        dense = torch.where(dense <= tol * norm2, 0.0, dense)
        if t == fill_start:
            if fill_start < m:
                leftover = torch.where(unpicked, g * dense, 0.0)
                assert float(leftover.max()) <= atol, ("fill started with work left", float(leftover.max()))
                rest = [i for i in range(n) if unpicked[i]]
                assert picks[fill_start:] == sorted(rest, key=lambda i: (-float(g[i]), i))[: m - fill_start]
            break
        j = picks[t]
        assert abs(float(energies[t]) - float(dense[j])) <= atol, (t, j, float(energies[t]), float(dense[j]))
        if not (t == 0 and seeded):
            best = float(torch.where(unpicked, g * dense, -math.inf).max())
            assert float(g[j] * dense[j]) >= best - atol, (t, j, float(g[j] * dense[j]), best)
            assert float(energies[t]) > 0
        unpicked[j] = False
        if float(energies[t]) > 0:
            count += 1
    return sum(1 for e in energies[:fill_start].tolist() if e > 0)


def explained_energy(v: torch.Tensor, picks: list[int]) -> float:
    """``sum_i ||P_S v_i||^2`` for the span ``S`` of the picked rows (float64, rank-revealing least squares)."""
    v = v.double()
    picks = [p for p in picks if p >= 0]
    if not picks:
        return 0.0
    span = v[picks].T
    fit = torch.linalg.lstsq(span, v.T, driver="gelsd").solution
    return float(((span @ fit) ** 2).sum())


# --- inputs ----------------------------------------------------------------------------------------------------

LENGTHS = (37, 0, 13, 50, 1)  # odd sizes, an empty item, n > D (rank exhaustion), n < D, a single token
DIM = 19
N_PAD = max(LENGTHS)
K_VALUES = (0, 1, 7, 13, N_PAD)  # 13 = one item's n, 50 = N
VARIANTS = ("plain", "gate", "gate_seed")


def _make_item(n, gen, dtype, variant, item):
    """Features and gate row (rounded to ``dtype``) and seed of one item; item 0 holds a zero vector at index 3."""
    x = (torch.randn(n, DIM, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))).to(dtype)
    if item == 0 and n > 3:
        x[3] = 0
    gate = None
    if variant != "plain":
        gate = torch.rand(n, generator=gen).to(dtype)
        gate[torch.rand(n, generator=gen) < 0.2] = 0
    seed = -1
    if variant == "gate_seed" and n:
        seed = {0: 3, 2: -7, 3: n // 2, 4: 0}.get(item, -1)  # item 0: the zero vector; items 1, 2: none (< 0)
    return x, gate, seed


def _assemble(items, gates, seeds, dtype, variant):
    """Pad with garbage (1e4 features, gate 7): a kernel that reads the padding picks it."""
    features = torch.full((len(items), N_PAD, DIM), 1e4, dtype=dtype)
    gate = None if variant == "plain" else torch.full((len(items), N_PAD), 7.0, dtype=dtype)
    for b, x in enumerate(items):
        features[b, : x.shape[0]] = x
        if gate is not None:
            gate[b, : x.shape[0]] = gates[b]
    lengths = torch.tensor([x.shape[0] for x in items], dtype=torch.int64)
    seed = torch.tensor(seeds, dtype=torch.int64) if variant == "gate_seed" else None
    return features, lengths, gate, seed


@functools.cache
def gapped_batch(dtype: torch.dtype, variant: str):
    """A padded batch whose float64 greedy trajectories (on the rounded inputs) have clear gaps everywhere."""
    gen = torch.Generator().manual_seed(4321 + VARIANTS.index(variant))
    items, gates, seeds = [], [], []
    for item, n in enumerate(LENGTHS):
        for _attempt in range(200):
            x, gate, seed = _make_item(n, gen, dtype, variant, item)
            *_, gap, dist = replay(x, n, gate, seed)
            if gap >= MIN_GAP and dist >= MIN_TOL_DIST:
                break
        else:
            raise AssertionError(f"no gapped input found for item {item}")
        items.append(x)
        gates.append(gate)
        seeds.append(seed)
    return _assemble(items, gates, seeds, dtype, variant)


@functools.cache
def random_batch(dtype: torch.dtype, variant: str):
    """The same layout without gap screening."""
    gen = torch.Generator().manual_seed(77 + VARIANTS.index(variant))
    parts = [_make_item(n, gen, dtype, variant, item) for item, n in enumerate(LENGTHS)]
    return _assemble(*map(list, zip(*parts, strict=True)), dtype, variant)


def _item(features, lengths, gate, seed, b):
    n = int(lengths[b])
    return features[b, :n], None if gate is None else gate[b, :n], -1 if seed is None else int(seed[b])


# --- 1. exact picks on gapped inputs, objective on random ones ---------------------------------------------------


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exact_on_gapped_inputs(algorithm, dtype, variant, k):
    """Gap-screened padded batches (garbage padding, a zero vector, seeds, gates with zeros, n > D and n < D, K = 0,
    1, n, N): the kernel picks exactly the float64 reference's indices, with matching energies."""
    features, lengths, gate, seed = gapped_batch(dtype, variant)
    want_idx, want_e = oracle(OP, features, lengths, k, gate, seed)
    for call in (select, select_private):
        idx, energies = call(features, lengths, k, gate, seed, TOL, algorithm)
        assert torch.equal(idx, want_idx), (call.__name__, idx, want_idx)
        assert_close(energies, want_e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", (7, N_PAD))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_objective_on_random_inputs(algorithm, dtype, variant, k):
    """Unscreened inputs: every pick is a dense float64 maximiser with the dense energy, the fill follows the spec,
    and the picked span explains as much energy as the reference's."""
    features, lengths, gate, seed = random_batch(dtype, variant)
    idx, energies = select(features, lengths, k, gate, seed, TOL, algorithm)
    want_idx, _ = oracle(OP, features, lengths, k, gate, seed)
    greedy = 0
    for b in range(len(LENGTHS)):
        v, g, s = _item(features, lengths, gate, seed, b)
        greedy += check_objective(v, g, idx[b], energies[b], k, s)
        total = float((v.double() ** 2).sum())
        assert explained_energy(v, idx[b].tolist()) >= explained_energy(v, want_idx[b].tolist()) - 1e-4 * total
    assert greedy >= min(k, 20)  # real greedy steps were checked, not only fills


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exact_on_clustered_features(algorithm):
    """Clustered, shifted features (the first gap-screened draw): exact picks, same energies."""
    for draw in range(50):
        x = clustered(61, 33, generator=torch.Generator().manual_seed(draw))
        want_idx, want_e, gap, dist = replay(x, 25)
        if gap >= MIN_GAP and dist >= MIN_TOL_DIST:
            break
    else:
        raise AssertionError("no gapped clustered draw")
    idx, energies = select(x[None], torch.tensor([61]), 25, algorithm=algorithm)
    assert idx[0].tolist() == want_idx.tolist()
    assert_close(energies[0], want_e, rtol=1e-4, atol=1e-4)


# --- 2. exact arithmetic: ties, seeds, gates, zero vectors, fill ---------------------------------------------------

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
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exact_arithmetic_cases(algorithm, case, k):
    """Hand-checked trajectories with exact float32 arithmetic (seeds on zero and spanned vectors, gates with zeros,
    rank exhaustion, fill by gate then index) match bit for bit, and so does the reference."""
    gate, seed, want_idx, want_e = AXES_CASES[case]
    features, lengths = AXES[None], torch.tensor([6])
    gate_t = None if gate is None else torch.tensor([gate])
    seed_t = torch.tensor([seed])
    idx, energies = select(features, lengths, k, gate_t, seed_t, TOL, algorithm)
    assert idx[0].tolist() == want_idx[:k]
    assert energies[0].tolist() == want_e[:k]
    ref_idx, ref_e = reference.greedy_residual_select(features, lengths, k, gate_t, seed_t)
    assert ref_idx[0].tolist() == want_idx[:k] and ref_e[0].tolist() == want_e[:k]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ties_go_to_the_lower_index(algorithm):
    """Equal energies everywhere (scaled orthogonal axes, exact): the picks are 0, 1, 2, ...; with a gate, the gate
    decides and equal gated scores fall back to the lower index."""
    n = 6
    features = (2.0 * torch.eye(n))[None]
    lengths = torch.tensor([n])
    idx, energies = select(features, lengths, n, algorithm=algorithm)
    assert idx[0].tolist() == list(range(n))
    assert energies[0].tolist() == [4.0] * n
    gate = torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.25, 1.0]])
    idx, _ = select(features, lengths, n, gate, algorithm=algorithm)
    assert idx[0].tolist() == [1, 3, 5, 0, 2, 4]


@pytest.mark.parametrize("seed", [-1, 4])
@pytest.mark.parametrize("gate", ["none", "ones"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_tokens_identical(algorithm, gate, seed):
    """Identical tokens: one pivot (the lowest index, or the seed), the rest by fill in ascending index."""
    v = torch.randn(6, generator=torch.Generator().manual_seed(1))
    features = v.expand(1, 9, 6).clone()
    gates = None if gate == "none" else torch.ones(1, 9)
    idx, energies = select(features, torch.tensor([9]), 9, gates, torch.tensor([seed]), algorithm=algorithm)
    first = 0 if seed < 0 else seed
    assert idx[0].tolist() == [first] + [i for i in range(9) if i != first]
    assert_close(energies[0, 0], (v.double() ** 2).sum(), rtol=1e-5, atol=0)
    assert bool((energies[0, 1:] == 0).all())


@pytest.mark.parametrize("gate_first", [False, True])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_duplicates(algorithm, gate_first):
    """A duplicated top token: the tie goes to the lower index (or to the larger gate); the copy is never a pivot."""
    features = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(2))
    features[0, 5] = features[0, 2] = 6 * features[0, 2] / features[0, 2].norm()  # clearly the largest norm
    gate = torch.ones(1, 8)
    if gate_first:
        gate[0, 5] = 1.5
    idx, energies = select(features, torch.tensor([8]), 8, gate, algorithm=algorithm)
    first, copy = (5, 2) if gate_first else (2, 5)
    picks = idx[0].tolist()
    assert picks[0] == first
    assert energies[0, picks.index(copy)] == 0
    assert sum(e > 0 for e in energies[0].tolist()) == 6  # 7 distinct vectors in D = 6
    check_objective(features[0], gate[0], idx[0], energies[0], 8)


@pytest.mark.parametrize("seed", [-1, 5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_vectors_never_pivot(algorithm, seed):
    """Zero vectors are never greedy picks: they come in the fill (energy 0) or as the seed (energy 0)."""
    features = torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(3))
    zero = [2, 5, 11]
    features[0, zero] = 0
    idx, energies = select(features, torch.tensor([12]), 12, None, torch.tensor([seed]), algorithm=algorithm)
    picks = idx[0].tolist()
    greedy = [p for p, e in zip(picks, energies[0].tolist(), strict=True) if e > 0]
    assert len(greedy) == 8  # 9 nonzero tokens in D = 8
    assert not set(greedy) & set(zero)
    assert all(energies[0, picks.index(z)] == 0 for z in zero)
    check_objective(features[0], None, idx[0], energies[0], 12, seed)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rank_exhaustion_fills_by_gate_then_index(algorithm):
    """n > D: after D pivots the rest come by descending gate (ties, -0.0 == 0.0 included, by index), energy 0."""
    features = torch.randn(1, 11, 3, generator=torch.Generator().manual_seed(4))
    gate = torch.tensor([[1.0, 0.5, -0.0, 1.0, 0.5, 1.0, 0.5, 0.0, 1.0, 0.5, 0.5]])
    idx, energies = select(features, torch.tensor([11]), 11, gate, algorithm=algorithm)
    picks = idx[0].tolist()
    assert bool((energies[0, :3] > 0).all()) and bool((energies[0, 3:] == 0).all())
    assert picks[3:] == sorted(set(range(11)) - set(picks[:3]), key=lambda i: (-float(gate[0, i]), i))
    check_objective(features[0], gate[0], idx[0], energies[0], 11)


@pytest.mark.parametrize("seed", [-1, 3])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gate_all_zero_is_pure_fill(algorithm, seed):
    """All gates 0: nothing scores, so the picks are by index (after the seed), all with energy 0 but the seed's."""
    features = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([7, 5])
    idx, energies = select(features, lengths, 6, torch.zeros(2, 7), torch.tensor([seed, -1]), algorithm=algorithm)
    first = [] if seed < 0 else [seed]
    assert idx[0].tolist() == (first + [i for i in range(7) if i != seed])[:6]
    assert idx[1].tolist() == [0, 1, 2, 3, 4, -1]
    want0 = float((features[0, seed].double() ** 2).sum()) if seed >= 0 else 0.0
    assert_close(energies[:, 0], torch.tensor([want0, 0.0]), rtol=1e-5, atol=0)
    assert bool((energies[:, 1:] == 0).all())


@pytest.mark.parametrize("tol", [0.0, TOL, 1e-2, 0.5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exhaustion_tol(algorithm, tol):
    """exhaustion_tol, relative to each token's own squared norm, decides whether a nearly spanned token (relative
    residual ~1e-3) is a pivot or a fill pick."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 8, generator=gen)
    x[6] = 0.8 * x[0] - 0.6 * x[1] + 0.05 * torch.randn(8, generator=gen)
    x[2] *= 30  # a large token: an absolute threshold would differ from the relative one
    want_idx, want_e, gap, dist = replay(x, 7, tol=tol)
    assert gap >= MIN_GAP and dist >= MIN_TOL_DIST
    idx, energies = select(x[None], torch.tensor([7]), 7, tol=tol, algorithm=algorithm)
    assert idx[0].tolist() == want_idx.tolist()
    assert_close(energies[0], want_e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_k_edges_and_single_token(algorithm):
    """k = 0 gives empty outputs; N = 1 picks the token with its squared norm; k = N picks every token once."""
    features = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([5, 0, 2])
    idx, energies = select(features, lengths, 0, torch.rand(3, 5), algorithm=algorithm)
    assert idx.shape == energies.shape == (3, 0)
    idx, energies = select(torch.tensor([[[3.0, -4.0]], [[1.0, 1.0]]]), torch.tensor([1, 0]), 1, algorithm=algorithm)
    assert idx.tolist() == [[0], [-1]] and energies.tolist() == [[25.0], [0.0]]
    idx, energies = select(features, lengths, 5, algorithm=algorithm)
    for b, n in enumerate(lengths.tolist()):
        assert sorted(idx[b, :n].tolist()) == list(range(n)) and idx[b, n:].tolist() == [-1] * (5 - n)
        check_objective(features[b, :n], None, idx[b], energies[b], 5)


# --- 3. scale ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gram", "basis"])
@pytest.mark.parametrize(("tokens", "dim", "k"), [(4096, 96, 200), (16_384, 64, 96)])
def test_large_n_objective(algorithm, tokens, dim, k):
    """N up to 16,384 (the Gram is 1 GiB there) with gates, a seed and rank exhaustion (k > D): objective checks."""
    gen = torch.Generator().manual_seed(tokens)
    features = torch.randn(2, tokens, dim, generator=gen) * (0.5 + torch.rand(2, tokens, 1, generator=gen))
    gate = torch.rand(2, tokens, generator=gen)
    gate[:, ::7] = 0
    lengths = torch.tensor([tokens, tokens - 123])
    seed = torch.tensor([17, -1])
    idx, energies = select(features, lengths, k, gate, seed, TOL, algorithm)
    for b in range(2):
        v, g, s = _item(features, lengths, gate, seed, b)
        assert check_objective(v, g, idx[b], energies[b], k, s) >= dim  # the whole span was explored first


def _llava_tokens(seed: int = 2) -> torch.Tensor:
    """2880 synthetic LLaVA-NeXT tokens (576 base + 48 x 48 high-res, newline tokens dropped), D = 4096."""
    testing = pytest.importorskip("mrprune.testing")
    rows = cols = 48
    x = testing.llava_next_features(rows, cols, 4096, seed=seed)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[576 + torch.arange(rows) * (cols + 1) + cols] = False
    return x[keep]


def _check_order_on_gram(gram: torch.Tensor, picks: list[int], energies: torch.Tensor, slack: float) -> float:
    """Un-gated pick order against the float64 Gram; returns the explained energy. With ``L = chol(G[p, p])`` and
    ``W = L^-1 G[p, :]``, a token's residual before step ``t`` is ``G_ii - sum_{m<t} W_mi^2`` and the pick's is
    ``L_tt^2``: each pick must report that energy and be a maximiser."""
    norm2 = gram.diagonal()
    chol = torch.linalg.cholesky(gram[picks][:, picks])
    w = torch.linalg.solve_triangular(chol, gram[picks], upper=False)
    torch.testing.assert_close(energies.double(), chol.diagonal() ** 2, rtol=0, atol=slack * float(norm2.max()))
    before = norm2 - torch.cat([w.new_zeros(1, w.shape[1]), (w * w).cumsum(0)[:-1]])
    steps = torch.arange(len(picks))
    pick_step = torch.full((gram.shape[0],), len(picks))
    pick_step[picks] = steps
    picked = pick_step[None, :] < steps[:, None]
    best = torch.where(picked, -math.inf, before).max(dim=1).values
    chosen = before[steps, torch.tensor(picks)]
    assert bool((chosen >= best - slack * norm2[picks]).all())
    return float((w * w).sum())


def _gram_greedy(gram: torch.Tensor, k: int, tol: float = TOL):
    """float64 un-gated pivoted partial Cholesky: picks, energies and the winner's lead at each step."""
    energy = gram.diagonal().clone()
    initial = energy.clone()
    picked = torch.zeros(gram.shape[0], dtype=torch.bool)
    factor = gram.new_zeros(k, gram.shape[0])
    picks, energies, gaps = [], [], []
    for t in range(k):
        score = torch.where(picked, -math.inf, energy)
        top = torch.topk(score, 2)
        j = int(top.indices[0])
        gaps.append(float(top.values[0] - top.values[1]) / float(initial[j] + initial[int(top.indices[1])]))
        picks.append(j)
        energies.append(float(energy[j]))
        row = (gram[j] - factor[:t, j] @ factor[:t]) / energy[j].sqrt()
        factor[t] = row
        energy = (energy - row * row).clamp_min(0)
        energy = torch.where(energy <= tol * initial, 0.0, energy)
        picked[j] = True
    return picks, energies, gaps


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_llava_next_scale(batch):
    """K = 640 of N = 2880 LLaVA-like tokens, D = 4096: both forms pick the float64 greedy's first 100 tokens (gaps
    checked), all 640 picks are maximisers with the dense energies, and the spans explain the same energy; a batch
    of copies gives every item bitwise the same result."""
    x = _llava_tokens()
    n, k, prefix = x.shape[0], 640, 100
    gram = x.double() @ x.double().T
    dense_picks, dense_e, gaps = _gram_greedy(gram, k)
    assert min(gaps[:prefix]) >= 1e-5, min(gaps[:prefix])
    want = _check_order_on_gram(gram, dense_picks, torch.tensor(dense_e, dtype=torch.float64), 1e-9)
    features = x[None].expand(batch, n, x.shape[1]).contiguous()
    lengths = torch.full((batch,), n)
    for algorithm in ("gram", "basis"):
        idx, energies = select(features, lengths, k, algorithm=algorithm)
        picks = idx[0].tolist()
        assert picks[:prefix] == dense_picks[:prefix], algorithm
        assert len(set(picks)) == k and bool((energies[0] > 0).all())  # no fill: D = 4096 > k
        got = _check_order_on_gram(gram, picks, energies[0], 1e-4)
        assert abs(got - want) <= 1e-4 * float(gram.diagonal().sum()), algorithm
        for b in range(1, batch):
            assert torch.equal(idx[b], idx[0]) and torch.equal(energies[b], energies[0])


@pytest.mark.slow
def test_qwen_scale():
    """K = 2731 of N = 8192 Qwen2.5-VL-like tokens (8 frames of 32 x 32), D = 3584, default ("auto") form: every pick
    is a maximiser with the dense float64 energy."""
    testing = pytest.importorskip("mrprune.testing")
    x = testing.qwen2_5_vl_features(8, 32, 32, 3584, seed=0)
    k = 2731
    idx, energies = select(x[None], torch.tensor([x.shape[0]]), k)
    picks = idx[0].tolist()
    assert len(set(picks)) == k and bool((energies[0] > 0).all())  # no fill: D = 3584 > k
    _check_order_on_gram(x.double() @ x.double().T, picks, energies[0], 1e-4)


# --- 4. batch composition, padding, addresses, chunks -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "gate_seed"])
@pytest.mark.parametrize("algorithm", ["gram", "basis"])
def test_batch_equals_per_item(algorithm, variant):
    """Each item of a padded batch gives bitwise the same picks and energies alone, at the same padded width or
    unpadded: the split of an item over blocks depends on the batch, the arithmetic does not."""
    features, lengths, gate, seed = random_batch(torch.float32, variant)
    k = 20
    idx, energies = select(features, lengths, k, gate, seed, TOL, algorithm)
    for b, n in enumerate(lengths.tolist()):
        g = None if gate is None else gate[b : b + 1]
        s = None if seed is None else seed[b : b + 1]
        one = select(features[b : b + 1], lengths[b : b + 1], k, g, s, TOL, algorithm)
        assert torch.equal(one[0][0], idx[b]) and torch.equal(one[1][0], energies[b]), b
        if n:
            m = min(k, n)
            g = None if gate is None else gate[b : b + 1, :n]
            one = select(features[b : b + 1, :n], lengths[b : b + 1], m, g, s, TOL, algorithm)
            assert torch.equal(one[0][0], idx[b, :m]) and torch.equal(one[1][0], energies[b, :m]), b


@pytest.mark.parametrize("dim", [16, 19])
@pytest.mark.parametrize("algorithm", ["gram", "basis"])
def test_result_independent_of_address(algorithm, dim):
    """The same item at different float offsets (16-byte aligned or not, D % 4 == 0 or not) gives bitwise the same
    picks and energies: vectorised and scalar loads sum in the same order."""
    n = 50
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(11))
    results = []
    for offset in range(4):
        buffer = torch.zeros(n * dim + 4, device=DEVICE)
        item = buffer[offset : offset + n * dim].view(1, n, dim)
        item.copy_(x.to(DEVICE))
        with backends.use_backend(BACKEND):
            got = mrprune.greedy_residual_select(item, torch.tensor([n], device=DEVICE), 20, algorithm=algorithm)
        results.append((got[0].cpu(), got[1].cpu()))
    for offset, (idx, energies) in enumerate(results[1:], start=1):
        assert torch.equal(idx, results[0][0]), offset
        assert torch.equal(energies, results[0][1]), offset


@pytest.mark.parametrize("algorithm", ["gram", "basis"])
def test_more_items_than_one_launch(algorithm):
    """More items than SMs: the items run in several launches (one block each); every item passes the objective
    checks and equals its own single-item run bitwise."""
    batch = torch.cuda.get_device_properties(0).multi_processor_count + 5 if DEVICE == "cuda" else 9
    gen = torch.Generator().manual_seed(12)
    features = torch.randn(batch, 40, 8, generator=gen)
    lengths = torch.randint(0, 41, (batch,), generator=gen)
    gate = torch.rand(batch, 40, generator=gen)
    seed = torch.where(torch.rand(batch, generator=gen) < 0.5, lengths - 1, -1)
    idx, energies = select(features, lengths, 30, gate, seed, TOL, algorithm)
    for b in range(batch):
        v, g, s = _item(features, lengths, gate, seed, b)
        check_objective(v, g, idx[b], energies[b], 30, s)
    for b in (0, batch - 1):
        one = select(features[b : b + 1], lengths[b : b + 1], 30, gate[b : b + 1], seed[b : b + 1], TOL, algorithm)
        assert torch.equal(one[0][0], idx[b]) and torch.equal(one[1][0], energies[b])


# --- 5. the op around the kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_converts_inputs(dtype):
    """Non-contiguous low-precision features and gates, int32 lengths and seeds reach the kernel as contiguous
    float32 / int64: the same picks as float64 on the rounded values."""
    gen = torch.Generator().manual_seed(13)
    base = torch.randn(2, 12, 29, generator=gen).to(dtype)
    features = base.transpose(1, 2)  # [2, 29, 12], non-contiguous
    lengths = torch.tensor([29, 17], dtype=torch.int32)
    seed = torch.tensor([-1, 4], dtype=torch.int32)
    gate = torch.rand(29, 2, generator=gen).to(dtype).t()
    idx, energies = select(features, lengths, 15, gate, seed)
    for b in range(2):
        v, g, s = _item(features, lengths.long(), gate, seed.long(), b)
        check_objective(v, g, idx[b], energies[b], 15, s)


def test_auto_backend_on_cuda_is_the_cuda_kernel():
    assert backends.available(OP, DEVICE)[0] == BACKEND


def test_runs_on_the_current_stream():
    features, lengths, gate, seed = gapped_batch(torch.float32, "gate_seed")
    want = select(features, lengths, 13, gate, seed)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), backends.use_backend(BACKEND):
        got = mrprune.greedy_residual_select(_to(features), _to(lengths), 13, _to(gate), _to(seed))
    stream.synchronize()
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_private_op_rejects_bad_arguments():
    features, lengths = torch.randn(2, 10, 4, device=DEVICE), torch.tensor([10, 3], device=DEVICE)
    op = getattr(torch.ops.mrprune, PRIVATE_OP)
    with pytest.raises(RuntimeError, match="k must lie"):
        op(features, lengths, 11, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="dtype"):
        op(features.double(), lengths, 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(2, 4, 10, device=DEVICE).transpose(1, 2), lengths, 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="dtype"):
        op(features, lengths.int(), 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="shape"):
        op(features, lengths[:1], 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op(features, lengths.cpu(), 3, None, None, TOL, "auto")
    with pytest.raises(RuntimeError, match="gate must have shape"):
        op(features, lengths, 3, torch.rand(2, 9, device=DEVICE), None, TOL, "auto")
    with pytest.raises(RuntimeError, match="seed must have shape"):
        op(features, lengths, 3, None, torch.zeros(3, dtype=torch.int64, device=DEVICE), TOL, "auto")
    with pytest.raises(RuntimeError, match="algorithm"):
        op(features, lengths, 3, None, None, TOL, "qr")


def _small_args(with_extras: bool, algorithm: str, generator_seed: int = 0):
    gen = torch.Generator().manual_seed(generator_seed)
    features = torch.randn(3, 9, 5, generator=gen).to(DEVICE)
    lengths = torch.tensor([9, 0, 6], device=DEVICE)
    gate = torch.rand(3, 9, generator=gen).to(DEVICE) if with_extras else None
    seed = torch.tensor([4, -1, 0], device=DEVICE) if with_extras else None
    return features, lengths, 6, gate, seed, TOL, algorithm


@pytest.mark.parametrize(("with_extras", "algorithm"), [(False, "gram"), (True, "basis"), (True, "auto")])
def test_opcheck(with_extras, algorithm):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on CUDA tensors."""
    with backends.use_backend(BACKEND):
        result = torch.library.opcheck(
            torch.ops.mrprune.greedy_residual_select.default, _small_args(with_extras, algorithm)
        )
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize(("with_extras", "algorithm"), [(False, "gram"), (True, "basis")])
def test_compile_fullgraph_matches_eager(with_extras, algorithm):
    """torch.compile(fullgraph=True) on CUDA tensors gives bitwise the eager result, also on new values."""
    torch._dynamo.reset()

    def pick(features, lengths, gate, seed):
        return mrprune.greedy_residual_select(features * 1.0, lengths, 6, gate, seed, algorithm=algorithm)

    compiled = torch.compile(pick, fullgraph=True)
    with backends.use_backend(BACKEND):
        for generator_seed in (0, 1):
            features, lengths, _, gate, seed, _, _ = _small_args(with_extras, algorithm, generator_seed)
            got, want = compiled(features, lengths, gate, seed), pick(features, lengths, gate, seed)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert got[0][0, 0] != -1
