"""ResPrune against an independent eager float64 implementation of its spec (research/algorithms.md §4), plus options.

The eager version keeps every token's explicit residual vector (Gram-Schmidt, re-orthogonalised pivots) and reads
the energies off them, unlike the library's incremental energy updates. Exact kept sets are only compared on
tie-safe trajectories: every greedy step's best score must beat the runner-up by ``MIN_GAP`` relative to the pair's
own scale (gate * squared norm), and no energy may sit near the exhaustion threshold. float64 inputs (the reference
path) are compared at full budgets; float32 inputs (the compiled kernels, ~2e-6 relative energy error) on the
longest tie-safe prefix of the trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mrprune import DivPrune, GridLayout, LlavaNextLayout, RandomPruner, ResPrune, preset
from mrprune.methods import ALPHA_PRESETS
from mrprune.testing import llava15_features, pad_batch, qwen2_5_vl_features

DIM = 256
TOL = 1e-5  # ResPrune's default exhaustion_tol
# Required relative score gap per greedy step: float32 kernels err by up to ~2e-6 of a token's own scale.
MIN_GAP = {torch.float32: 3e-5, torch.float64: 1e-9}
# Required distance, in decades, of every relative residual energy from the exhaustion threshold.
MIN_TOL_DECADES = {torch.float32: 2.0, torch.float64: 0.01}
MIN_SAFE_PICKS = 32  # a float32 comparison must cover at least this many picks


# --- independent eager implementation ----------------------------------------------------------------------------


@dataclass
class Trajectory:
    picks: list[int]  # in pick order, fill included
    gaps: list[float]  # per greedy step after the seed: relative margin best vs runner-up
    fill_start: int  # index into picks where the gate/index fill began (len(picks) if never)
    tol_decades: float  # closest any unpicked token's relative energy came to the threshold, in decades

    def kept(self, k: int) -> torch.Tensor:
        return torch.tensor(sorted(self.picks[:k]), dtype=torch.int64)

    def safe_prefix(self, dtype: torch.dtype) -> int:
        """Number of leading picks whose every greedy step is tie-safe at ``dtype``'s precision."""
        for step, gap in enumerate(self.gaps):
            if gap < MIN_GAP[dtype]:
                return step + 1  # picks 0..step are decided; pick step + 1 is not
        return len(self.picks)


def eager_gate(v: torch.Tensor, text: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """g = max(rho, 0) ** alpha with rho the max cosine to the text rows; 1 without text."""
    if text is None or text.shape[0] == 0:
        return torch.ones(v.shape[0], dtype=torch.float64)
    vn = v / v.norm(dim=1, keepdim=True)
    tn = text.double() / text.double().norm(dim=1, keepdim=True)
    rho = (vn @ tn.T).max(dim=1).values
    return rho.clamp_min(0) ** alpha


def eager_resprune(x, k, text=None, alpha=0.75, seed=None, tol=TOL) -> Trajectory:
    """Greedy argmax of gate * residual energy over unpicked tokens (float64), seeded; then fill by gate, index."""
    v = x.double()
    n = v.shape[0]
    g = eager_gate(v, text, alpha)
    initial = (v * v).sum(1)
    residual = v.clone()  # every token's residual against the span of the picks
    basis = v.new_zeros(0, v.shape[1])
    picks, gaps, fill_start, tol_decades = [], [], None, math.inf
    for step in range(min(k, n)):
        energy = (residual * residual).sum(1)
        unpicked = torch.ones(n, dtype=torch.bool)
        unpicked[picks] = False
        decades = (energy / (tol * initial)).log10().abs()
        tol_decades = min(tol_decades, float(decades[unpicked].min()))
        energy = torch.where(energy <= tol * initial, 0.0, energy)
        if step == 0:
            j = int(v.norm(dim=1).argmax()) if seed is None else seed
        else:
            score = torch.where(unpicked, g * energy, float("-inf"))
            j = int(score.argmax())
            if score[j] <= 0:
                fill_start = len(picks)
                rest = sorted(unpicked.nonzero().squeeze(1).tolist(), key=lambda i: (-float(g[i]), i))
                picks += rest[: min(k, n) - step]
                break
            top = score.topk(2)
            a, b = top.indices.tolist()
            scale = max(float(g[a] * initial[a]), float(g[b] * initial[b]))
            gaps.append(float(top.values[0] - top.values[1]) / scale if len(top.values) > 1 else math.inf)
        picks.append(j)
        u = v[j]
        for _ in range(2):  # classical Gram-Schmidt, twice
            u = u - basis.T @ (basis @ u)
        if energy[j] > 0:
            q = u / u.norm()
            basis = torch.cat([basis, q[None]])
            residual = residual - torch.outer(residual @ q, q)
    return Trajectory(picks, gaps, len(picks) if fill_start is None else fill_start, tol_decades)


def make_text(x: torch.Tensor, similar: int, unrelated: int, seed: int) -> torch.Tensor:
    """Text rows: ``similar`` noisy copies of random visual tokens (so the gate matters) and unrelated random rows."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = x.shape
    picks = torch.randperm(n, generator=gen)[:similar]
    scale = x.norm(dim=1).median() / math.sqrt(dim)
    close = x[picks] + 0.5 * scale * torch.randn(similar, dim, generator=gen)
    return torch.cat([close, scale * torch.randn(unrelated, dim, generator=gen)])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small sequential ops: one intra-op thread avoids OpenMP spin contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CACHE: dict = {}


def llava15(seed: int = 0) -> torch.Tensor:
    key = ("llava15", seed)
    if key not in _CACHE:
        _CACHE[key] = llava15_features(DIM, seed=seed)
    return _CACHE[key]


def qwen() -> tuple[torch.Tensor, GridLayout]:
    if "qwen" not in _CACHE:
        _CACHE["qwen"] = qwen2_5_vl_features(1, 8, 10, 3584, seed=0), GridLayout.from_grid_thw([1, 16, 20])
    return _CACHE["qwen"]


def assert_tie_safe(traj: Trajectory, k: int, dtype: torch.dtype) -> None:
    assert traj.tol_decades >= MIN_TOL_DECADES[dtype], f"an energy is near the threshold ({traj.tol_decades:.2g})"
    worst = min(traj.gaps[: max(0, min(k, traj.fill_start) - 1)], default=math.inf)
    assert worst >= MIN_GAP[dtype], f"greedy trajectory not tie-safe: gap {worst:.2e}"


# --- exact kept sets ------------------------------------------------------------------------------------------------


TEXTS = {"none": None, "text": (3, 5), "many": (12, 4)}


@pytest.mark.parametrize(
    ("size", "k", "alpha", "text_kind"),
    [
        ({"budget": 192}, 192, "llava", "text"),
        ({"budget": 128}, 128, "llava", "none"),
        ({"budget": 64}, 64, 1.5, "many"),
        ({"keep_ratio": 0.2}, 115, "qwen", "text"),
    ],
)
def test_matches_eager_float64(size, k, alpha, text_kind):
    """Full budgets on the float64 path: the exact kept set of the eager spec."""
    x = llava15(0).double()
    text = None if TEXTS[text_kind] is None else make_text(x.float(), *TEXTS[text_kind], seed=1)
    pruner = ResPrune(**size, alpha=alpha)
    traj = eager_resprune(x, k, text, pruner.alpha)
    assert_tie_safe(traj, k, torch.float64)
    got = pruner.select(x, GridLayout(1, 24, 24), text)
    assert got.dtype == torch.int64 and got.numel() == k
    assert torch.equal(got, traj.kept(k))


@pytest.mark.parametrize("text_kind", sorted(TEXTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_eager_float32_kernel(seed, text_kind):
    """float32 (compiled kernels): the exact kept set over the longest tie-safe budget."""
    x = llava15(seed)
    text = None if TEXTS[text_kind] is None else make_text(x, *TEXTS[text_kind], seed=seed + 10)
    traj = eager_resprune(x, 128, text)
    k = min(128, traj.safe_prefix(torch.float32))
    assert k >= MIN_SAFE_PICKS, f"only {k} tie-safe picks"
    assert traj.tol_decades >= MIN_TOL_DECADES[torch.float32]
    assert torch.equal(ResPrune(budget=k).select(x, None, text), traj.kept(k))


def test_text_gate_matters():
    """The text rows make a real difference (otherwise the text comparisons above would test nothing)."""
    x = llava15(0)
    text = make_text(x, *TEXTS["text"], seed=1)
    gate = eager_gate(x.double(), text, 0.75)
    assert float(gate.max()) > 0.8 and float(gate.min()) < 0.4
    with_text, without = ResPrune(budget=64).select(x, text=text), ResPrune(budget=64).select(x)
    assert len(set(with_text.tolist()) ^ set(without.tolist())) >= 8


def test_zero_gate_tokens_come_last():
    """Tokens with rho <= 0 (gate 0) are only kept once every positive-gate token is spanned or kept."""
    x = llava15(0)[:40, :32].double()  # 40 tokens in 32 dims: rank 32
    text = -x[:3]  # opposite of three tokens: some cosines negative
    gate = eager_gate(x, text, 0.75)
    zero = (gate == 0).nonzero().squeeze(1)
    assert 0 < zero.numel() < 40
    k = 40 - zero.numel() // 2
    traj = eager_resprune(x, k, text)
    assert_tie_safe(traj, k, torch.float64)
    assert all(float(gate[j]) > 0 for j in traj.picks[1 : traj.fill_start])  # greedy picks: positive gates only
    assert traj.fill_start < k and set(zero.tolist()) & set(traj.picks[traj.fill_start :])
    assert torch.equal(ResPrune(budget=k).select(x, text=text), traj.kept(k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qwen_shaped(dtype):
    """Qwen2.5-VL shapes (D = 3584, a small merged grid, alpha 'qwen'): the eager spec's kept set."""
    x, layout = qwen()
    x = x.to(dtype)
    assert layout.num_tokens == x.shape[0] == 80
    text = make_text(x.float(), 2, 3, seed=4)
    pruner = ResPrune(keep_ratio=1 / 3, alpha="qwen")
    k = 27  # 80 / 3 = 26.67
    traj = eager_resprune(x, k, text, 0.3)
    if dtype == torch.float32 and traj.safe_prefix(dtype) < k:  # compare the tie-safe prefix only
        k = traj.safe_prefix(dtype)
        assert k >= 16, f"only {k} tie-safe picks"
        pruner = ResPrune(budget=k, alpha="qwen")
    assert_tie_safe(traj, k, dtype)
    assert torch.equal(pruner.select(x, layout, text), traj.kept(k))


@pytest.mark.parametrize("with_text", [False, True])
def test_rank_exhaustion_float64(with_text):
    """n > D: after D pivots every residual is 0; the rest is filled by gate, then index: K distinct tokens."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # rank 32
    text = make_text(x.float(), 2, 2, seed=5) if with_text else None
    k = 56
    traj = eager_resprune(x, k, text)
    assert traj.fill_start == 32  # the fill really happens
    assert_tie_safe(traj, k, torch.float64)
    got = ResPrune(budget=k).select(x, GridLayout(1, 8, 8), text)
    assert got.numel() == got.unique().numel() == k
    assert torch.equal(got, traj.kept(k))


def test_rank_exhaustion_float32():
    """The kernel path keeps K distinct, sorted tokens past the rank too (and everything at K = n)."""
    x = qwen2_5_vl_features(1, 8, 8, 32, seed=2)
    got = ResPrune(budget=56).select(x)
    assert got.numel() == got.unique().numel() == 56 and bool((got[1:] > got[:-1]).all())
    everything = ResPrune(budget=64).select(x)
    assert everything.tolist() == list(range(64))


# --- options ----------------------------------------------------------------------------------------------------


def test_alpha_zero_equals_no_text():
    x = llava15(0)
    text = make_text(x, *TEXTS["text"], seed=1)
    assert torch.equal(ResPrune(budget=96, alpha=0).select(x, text=text), ResPrune(budget=96).select(x))
    assert torch.equal(ResPrune(budget=96, alpha=0.0).select(x, text=text), ResPrune(budget=96, alpha=2).select(x))


def test_no_text_equals_empty_text():
    x = llava15(0)
    pruner = ResPrune(budget=96)
    expected = pruner.select(x)
    assert torch.equal(pruner.select(x, text=None), expected)
    assert torch.equal(pruner.select(x, text=x.new_zeros(0, DIM)), expected)
    batch, lengths = pad_batch([x, x[:300]])
    got = pruner.select_batch(batch, [None, None], lengths, texts=None)
    assert torch.equal(got[0], expected)
    got_empty = pruner.select_batch(batch, [None, None], lengths, texts=[x.new_zeros(0, DIM), None])
    assert all(torch.equal(a, b) for a, b in zip(got, got_empty, strict=True))


def test_alpha_presets():
    assert ALPHA_PRESETS == {"llava": 0.75, "qwen": 0.3}
    assert ResPrune(budget=8).alpha == 0.75
    assert ResPrune(budget=8, alpha="llava").alpha == 0.75 and ResPrune(budget=8, alpha="qwen").alpha == 0.3
    x = llava15(0)
    text = make_text(x, *TEXTS["text"], seed=1)
    by_name = ResPrune(budget=64, alpha="qwen").select(x, text=text)
    assert torch.equal(by_name, ResPrune(budget=64, alpha=0.3).select(x, text=text))
    assert not torch.equal(by_name, ResPrune(budget=64, alpha=3.0).select(x, text=text))


@pytest.mark.parametrize("alpha", ["mistral", "LLAVA", -0.1, float("nan")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ResPrune(budget=8, alpha=alpha)


def test_default_seed_is_largest_norm_even_with_zero_gate():
    """Without a given seed the first pick is the largest-norm token, not the best gated score."""
    x = llava15(0).double()
    j = int(x.norm(dim=1).argmax())
    unit = x[j] / x[j].norm()
    i = int(((x / x.norm(dim=1, keepdim=True) @ unit) > 0.1).nonzero()[0])
    text = (x[i] - 2 * (x[i] @ unit) * unit)[None]  # x_i with its component along x_j flipped: gate(j) = 0
    gate = eager_gate(x, text, 0.75)
    assert float(gate[j]) == 0 and int((gate * x.norm(dim=1) ** 2).argmax()) != j
    traj = eager_resprune(x, 64, text)
    assert_tie_safe(traj, 64, torch.float64)
    got = ResPrune(budget=64).select(x, text=text)
    assert j in got.tolist() and torch.equal(got, traj.kept(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exhaustion_tol_marks_spanned_tokens(dtype):
    """A token whose relative residual is below exhaustion_tol counts as spanned (only kept by the index fill)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    near = 0.5 * (base[0] + 1e-4 * base[0].norm() * noise[0])  # relative residual ~1e-8 once base[0] is kept
    rough = 0.5 * (base[1] + 0.03 * base[1].norm() * noise[1])  # ~1e-3 once base[1] is kept
    x = torch.cat([base, near[None], rough[None]]).to(dtype)
    kept = {}
    for tol in (1e-5, 1e-2):
        traj = eager_resprune(x, 5, tol=tol)
        kept[tol] = ResPrune(budget=5, exhaustion_tol=tol).select(x)
        assert torch.equal(kept[tol], traj.kept(5)), tol
    assert kept[1e-5].tolist() == [0, 1, 2, 3, 5] and kept[1e-2].tolist() == [0, 1, 2, 3, 4]


def test_explicit_seed_changes_first_pick():
    """A given seed (e.g. the CLS-attention argmax) is the first pick; the rest follows the eager spec."""
    x = llava15(0).double()
    text = make_text(x.float(), *TEXTS["text"], seed=1)
    default = ResPrune(budget=64).select(x, text=text)
    assert int(x.norm(dim=1).argmax()) in default.tolist()
    seed = int(x.norm(dim=1).argmin())
    assert seed not in default.tolist()
    traj = eager_resprune(x, 64, text, seed=seed)
    assert_tie_safe(traj, 64, torch.float64)
    got = ResPrune(budget=64).select(x, text=text, seeds=seed)
    assert seed in got.tolist() and torch.equal(got, traj.kept(64))
    assert not torch.equal(got, default)


@pytest.mark.parametrize("size", [{"budget": 64}, {"keep_ratio": 0.25}])
def test_select_batch_equals_select(size):
    """Per-image texts (one None) and seeds: each image of a padded batch as if pruned alone."""
    items = [llava15(0), llava15(1)[:300], qwen2_5_vl_features(1, 6, 8, DIM, seed=3)]
    layouts = [GridLayout(1, 24, 24), None, GridLayout.from_grid_thw([1, 12, 16])]
    texts = [make_text(items[0], 3, 5, seed=1), None, make_text(items[2], 1, 2, seed=2)]
    batch, lengths = pad_batch(items)
    pruner = ResPrune(**size)
    got = pruner.select_batch(batch, layouts, lengths, texts)
    for b, item in enumerate(items):
        assert torch.equal(got[b], pruner.select(item, layouts[b], texts[b])), b
    seeds = [5, 17, 0]
    got = pruner.select_batch(batch, layouts, lengths, texts, seeds=seeds)
    for b, item in enumerate(items):
        assert torch.equal(got[b], pruner.select(item, layouts[b], texts[b], seeds=seeds[b])), b
        assert seeds[b] in got[b].tolist()


def test_next_layout_tokens_compete_jointly():
    """A NeXT image is pruned over all its tokens; the identical newline rows give at most one pivot."""
    layout = LlavaNextLayout(4, 6, base_side=6)
    x = torch.randn(layout.num_tokens, 64, generator=torch.Generator().manual_seed(0))
    x[layout.newline_indices] = 3 * x[0]  # identical rows, large norm: attractive pivots
    got = ResPrune(keep_ratio=0.5).select(x, layout)
    assert got.numel() == 32
    assert len(set(got.tolist()) & set(layout.newline_indices.tolist() + [0])) == 1


# --- budgets, presets, validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "size", "k"),
    [
        (576, {"keep_ratio": 1 / 128}, 5),
        (10, {"keep_ratio": 0.25}, 3),
        (576, {"budget": 100}, 100),
        (50, {"budget": 100}, 50),
        (7, {"keep_ratio": 1.0}, 7),
    ],
)
def test_budget_and_ratio_counts(n, size, k):
    """Budgets are capped by n; ratios round half up (4.5 -> 5, 2.5 -> 3)."""
    got = ResPrune(**size).select(torch.randn(n, 16))
    assert got.numel() == got.unique().numel() == k


@pytest.mark.parametrize(("name", "k"), [("resprune_192", 192), ("resprune_128", 128), ("resprune_64", 64)])
def test_presets(name, k):
    x = llava15(0)
    pruner = preset(name)
    assert isinstance(pruner, ResPrune) and pruner.alpha == 0.75 and pruner.budget == k
    assert pruner.select(x, GridLayout(1, 24, 24)).numel() == k
    assert torch.equal(pruner.select(x), ResPrune(budget=k, alpha=0.75).select(x))
    assert preset(name, alpha="qwen").alpha == 0.3


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"keep_ratio": 0.5, "budget": 10},
        {"budget": 0},
        {"budget": -3},
        {"budget": 2.5},
        {"keep_ratio": 0},
        {"keep_ratio": 1.5},
        {"keep_ratio": -0.2},
        {"keep_ratio": float("nan")},
    ],
)
def test_bad_sizes_raise(kwargs):
    with pytest.raises((ValueError, TypeError), match="keep_ratio|budget"):  # TypeError: a float budget
        ResPrune(**kwargs)


def test_bad_inputs_raise():
    x = torch.randn(576, 16)
    pruner = ResPrune(budget=8)
    with pytest.raises(ValueError, match="layout"):
        pruner.select(x[:500], GridLayout(1, 24, 24))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        pruner.select(x[None])
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        pruner.select_batch(x, [None])
    with pytest.raises(ValueError, match="text"):
        pruner.select(x, text=torch.randn(3, 8))  # wrong D
    with pytest.raises(ValueError, match="text"):
        pruner.select(x, text=torch.randn(16))  # not [M, D]
    with pytest.raises(ValueError, match="text entries"):
        pruner.select_batch(x[None], [None], texts=[None, None])


@pytest.mark.parametrize("cls", [DivPrune, RandomPruner])
def test_non_text_pruner_rejects_texts(cls):
    x = llava15(0)
    with pytest.raises(ValueError, match="does not use text"):
        cls(0.25).select_batch(x[None], [GridLayout(1, 24, 24)], texts=[make_text(x, 2, 2, seed=0)])
