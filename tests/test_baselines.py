"""DivPrune against an independent port of the official code (vbdi/divprune), RandomPruner, and argument checks.

Exact index comparisons on float data only run where the greedy trajectory is tie-safe: every step's winning
score must beat the best token of any other duplicate class by ``MIN_GAP`` (checked in float64). Exact duplicates
(LLaVA-NeXT's identical newline tokens) tie by construction; they are compared up to duplicate class, and the
tie-breaking itself is tested exactly on inputs whose arithmetic is exact (unit vectors with entries in
{0, +-1/2}, so every normalisation and cosine is exactly representable).
"""

from __future__ import annotations

import pytest
import torch

from mrprune import DivPrune, GridLayout, LlavaNextLayout, RandomPruner, ResPrune, preset
from mrprune.testing import llava15_features, llava_next_features, pad_batch

DIM = 256
NEXT_ROWS, NEXT_COLS = 12, 16
MIN_GAP = {torch.float32: 1e-5, torch.float64: 1e-9}  # float32 cosines differ by ~1e-7 between implementations


# --- independent port of the official DivPrune ------------------------------------------------------------------


def official_divprune(x: torch.Tensor, ratio: float, masked: bool = False) -> torch.Tensor:
    """The official selection in ``x``'s dtype: returns the picks in pick order (duplicates possible unless masked).

    ``d = 1 - Xh Xh^T``; pick 0 is the argmax of each column's second-smallest value (topk along dim 0); pick i is
    the argmax of the column-wise min over the picked rows. The official code recomputes that min over all picked
    rows each step; the running minimum kept here is bitwise the same (min is exact) and much faster.
    """
    n = x.shape[0]
    k = int(round(ratio * n))
    xh = x / x.norm(dim=1, keepdim=True)
    d = 1.0 - xh @ xh.T
    picks: list[int] = []
    nearest = None
    for i in range(k):
        if i == 0:
            scores = torch.topk(d, 2, dim=0, largest=False).values[1, :]
        else:
            nearest = d[picks[-1]] if nearest is None else torch.minimum(nearest, d[picks[-1]])
            scores = nearest.clone()
            if masked:
                scores[picks] = float("-inf")
        picks.append(int(torch.argmax(scores)))
    return torch.tensor(picks, dtype=torch.int64)


def duplicate_class(x: torch.Tensor) -> torch.Tensor:
    """For each row, the lowest index of a bitwise-identical row."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), x.shape[0], dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, torch.arange(x.shape[0]), reduce="amin")
    return first[inverse]


def min_gap(x: torch.Tensor, ratio: float, masked: bool) -> float:
    """Smallest float64 margin, over the first K official steps, between the winner and any other duplicate class."""
    x = x.double()
    cls = duplicate_class(x)
    xh = x / x.norm(dim=1, keepdim=True)
    d = 1.0 - xh @ xh.T
    nearest = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    picked = torch.zeros(x.shape[0], dtype=torch.bool)
    gap = float("inf")
    for i in range(int(round(ratio * x.shape[0]))):
        scores = d.sort(dim=0).values[1] if i == 0 else nearest
        if masked and i > 0:
            scores = scores.masked_fill(picked, float("-inf"))
        j = int(scores.argmax())
        gap = min(gap, float(scores[j] - scores.masked_fill(cls == cls[j], float("-inf")).max()))
        picked[j] = True
        nearest = torch.minimum(nearest, d[j])
    return gap


def canonical(indices: torch.Tensor, cls: torch.Tensor) -> list[int]:
    """Kept indices up to duplicate class, as a sorted multiset."""
    return sorted(cls[indices].tolist())


def exact_features(n: int, duplicates: int, seed: int, dim: int = 16) -> torch.Tensor:
    """Unit vectors with four entries +-1/2 (all cosines exact); ``duplicates`` rows copied from earlier rows."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(n, dim, generator=gen).argsort(dim=1)[:, :4]
    signs = torch.randint(0, 2, (n, 4), generator=gen).float() * 2 - 1
    x = torch.zeros(n, dim).scatter_(1, positions, 0.5 * signs)
    targets = torch.randperm(n - 1, generator=gen)[:duplicates] + 1
    for t in targets.tolist():
        x[t] = x[int(torch.randint(0, t, (1,), generator=gen))]
    return x


def exact_next_features(seed: int) -> tuple[torch.Tensor, LlavaNextLayout]:
    """Exact-arithmetic tokens in a LLaVA-NeXT layout with identical newline rows."""
    layout = LlavaNextLayout(4, 6, base_side=6)
    x = exact_features(layout.num_tokens, duplicates=5, seed=seed)
    x[layout.newline_indices] = torch.tensor([0.5, -0.5, 0.5, 0.5] + [0.0] * 12)
    return x, layout


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small sequential ops: one intra-op thread avoids OpenMP spin contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CACHE: dict[str, tuple[torch.Tensor, object]] = {}


def synthetic(name: str) -> tuple[torch.Tensor, object]:
    if name not in _CACHE:
        if name == "llava15":
            _CACHE[name] = llava15_features(DIM, seed=1), GridLayout(1, 24, 24)
        else:
            layout = LlavaNextLayout(NEXT_ROWS, NEXT_COLS)
            _CACHE[name] = llava_next_features(NEXT_ROWS, NEXT_COLS, DIM, seed=2), layout
    return _CACHE[name]


# --- DivPrune: exact sets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize(
    ("name", "dtype", "ratio"),
    [
        ("llava15", torch.float32, 0.05),
        ("llava15", torch.float32, 0.098),
        ("next", torch.float32, 0.05),
        ("llava15", torch.float64, 0.25),
        ("llava15", torch.float64, 0.5),
        ("next", torch.float64, 0.098),
        ("next", torch.float64, 0.3),
    ],
)
def test_divprune_matches_official_port(name, dtype, ratio, official):
    """Synthetic LLaVA-1.5 / NeXT tokens (NeXT: base, high-res and newlines jointly): same kept set as the port."""
    x, layout = synthetic(name)
    x = x.to(dtype)
    gap = min_gap(x, ratio, masked=not official)
    assert gap >= MIN_GAP[dtype], f"inputs not tie-safe at ratio {ratio}: gap {gap:.2e}"
    picks = official_divprune(x, ratio, masked=not official)
    got = DivPrune(ratio, official=official).select(x, layout)
    cls = duplicate_class(x)
    assert canonical(got, cls) == canonical(picks.unique(), cls)
    assert got.numel() == int(round(ratio * x.shape[0]))  # no re-picks this early: K distinct in both modes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio", [0.99, 1.0])
def test_divprune_next_past_distinct_tokens(ratio, dtype):
    """K beyond the distinct tokens of a NeXT image: official re-picks (fewer kept), the default keeps K."""
    x, layout = synthetic("next")
    x = x.to(dtype)
    cls = duplicate_class(x)
    distinct = int(cls.unique().numel())
    assert distinct == x.shape[0] - NEXT_ROWS + 1
    k = int(round(ratio * x.shape[0]))
    assert k > distinct
    official = DivPrune(ratio, official=True).select(x, layout)
    port = official_divprune(x, ratio).unique()
    assert canonical(official, cls) == canonical(port, cls) == sorted(cls.unique().tolist())
    default = DivPrune(ratio).select(x, layout)
    assert default.numel() == k == default.unique().numel()
    assert set(cls.unique().tolist()) <= set(default.tolist())


@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divprune_exact_ties_and_repicks(ratio, official, dtype):
    """Exact arithmetic, many exact ties and duplicates (newlines included): identical picks, ties to the lower index,
    official re-picks reproduced index for index."""
    x, layout = exact_next_features(seed=3)
    x = x.to(dtype)
    expected = official_divprune(x, ratio, masked=not official).unique()
    got = DivPrune(ratio, official=official).select(x, layout)
    assert got.tolist() == expected.tolist()


def test_divprune_exact_repicks_happen():
    """The exact-arithmetic case does exercise re-picks: the official mode keeps fewer than K, the default K."""
    x, layout = exact_next_features(seed=3)
    k = x.shape[0]
    assert official_divprune(x, 1.0).unique().numel() < k
    assert DivPrune(1.0, official=True).select(x, layout).numel() < k
    assert DivPrune(1.0).select(x, layout).tolist() == list(range(k))


@pytest.mark.parametrize(("n", "ratio", "k"), [(576, 1 / 128, 4), (10, 0.25, 2), (14, 0.25, 4), (576, 0.098, 56)])
def test_divprune_budget_is_python_round(n, ratio, k):
    """K = int(round(ratio * n)): half to even (4.5 -> 4, 2.5 -> 2, 3.5 -> 4)."""
    x = exact_features(n, duplicates=0, seed=n)
    assert int(round(ratio * n)) == k
    kept = DivPrune(ratio).select(x)
    assert kept.numel() == k


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.6, 1.0])
@pytest.mark.parametrize("name", ["llava15", "next"])
def test_divprune_default_keeps_k_distinct_sorted(name, ratio):
    x, layout = synthetic(name)
    kept = DivPrune(ratio).select(x, layout)
    assert kept.numel() == int(round(ratio * x.shape[0]))
    assert kept.dtype == torch.int64 and bool((kept[1:] > kept[:-1]).all())
    assert 0 <= int(kept.min()) and int(kept.max()) < x.shape[0]


def test_divprune_batch_equals_single():
    """Each image of a padded batch is pruned on its own tokens."""
    items = [synthetic("llava15")[0], synthetic("next")[0], exact_next_features(seed=4)[0].repeat(1, DIM // 16)]
    layouts = [synthetic("llava15")[1], synthetic("next")[1], exact_next_features(seed=4)[1]]
    batch, lengths = pad_batch(items)
    for official in (True, False):
        pruner = DivPrune(0.098, official=official)
        got = pruner.select_batch(batch, layouts, lengths)
        for b, item in enumerate(items):
            assert torch.equal(got[b], pruner.select(item, layouts[b])), b


def test_divprune_preset_is_official_ratio():
    x, layout = synthetic("llava15")
    assert preset("divprune").select(x, layout).numel() == 56
    assert preset("divprune", official=True).official


# --- RandomPruner -------------------------------------------------------------------------------------------------


# Hand-derived round-half-up counts: 4.5 -> 5, 2.5 -> 3, 56.448 -> 56, 0.3 -> 0, 7 -> 7, 0.5 -> 1.
@pytest.mark.parametrize(
    ("n", "ratio", "k"), [(576, 1 / 128, 5), (10, 0.25, 3), (576, 0.098, 56), (3, 0.1, 0), (7, 1.0, 7), (1, 0.5, 1)]
)
def test_random_count_rounds_half_up(n, ratio, k):
    kept = RandomPruner(ratio, seed=5).select(torch.randn(n, 8))
    assert kept.numel() == k


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_random_reproducible_subset_sorted(seed):
    x = torch.randn(576, 8)
    first = RandomPruner(0.3, seed=seed).select(x)
    assert torch.equal(first, RandomPruner(0.3, seed=seed).select(x))
    assert torch.equal(first, RandomPruner(0.3, seed=seed).select(torch.randn(576, 8)))  # depends on seed and n only
    assert not torch.equal(first, RandomPruner(0.3, seed=seed + 1).select(x))
    assert first.dtype == torch.int64 and first.unique().numel() == first.numel() == 173
    assert bool((first[1:] > first[:-1]).all()) and int(first.min()) >= 0 and int(first.max()) < 576


def test_random_is_not_a_prefix_or_stride():
    """A random subset, not the first K tokens or a regular stride."""
    kept = RandomPruner(0.25, seed=0).select(torch.randn(400, 4))
    assert kept.tolist() != list(range(100)) and len(set(torch.diff(kept).tolist())) > 1


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_random_batch_equals_single(ratio):
    items = [torch.randn(n, 16) for n in (576, 300, 1, 37)]
    layouts = [GridLayout(1, 24, 24), None, GridLayout(1, 1, 1), LlavaNextLayout(0, 0, base_side=6)]
    batch, lengths = pad_batch(items)
    pruner = RandomPruner(ratio, seed=7)
    got = pruner.select_batch(batch, layouts, lengths)
    assert len(got) == len(items)
    for b, item in enumerate(items):
        assert torch.equal(got[b], pruner.select(item, layouts[b])), b


# --- argument checks (baselines; ResPrune's own are in test_resprune.py) ------------------------------------------

PRUNERS = [DivPrune, RandomPruner]


@pytest.mark.parametrize("cls", PRUNERS)
@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.5", None])
def test_keep_ratio_out_of_range_raises(cls, ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        cls(keep_ratio=ratio)


@pytest.mark.parametrize("cls", PRUNERS)
def test_layout_mismatch_raises(cls):
    x = torch.randn(500, 8)
    with pytest.raises(ValueError, match="layout"):
        cls(0.5).select(x, GridLayout(1, 24, 24))
    with pytest.raises(ValueError, match="layout"):
        cls(0.5).select(torch.randn(576, 8), LlavaNextLayout(0, 0))
    batch, lengths = pad_batch([torch.randn(576, 8), torch.randn(100, 8)])
    with pytest.raises(ValueError, match="layout"):
        cls(0.5).select_batch(batch, [None, GridLayout(1, 24, 24)], lengths)


@pytest.mark.parametrize("cls", PRUNERS)
def test_bad_feature_shapes_raise(cls):
    pruner = cls(0.5)
    for bad in (torch.randn(8), torch.randn(1, 4, 8), torch.randn(4, 8).tolist()):
        with pytest.raises(ValueError, match=r"\[N, D\]"):
            pruner.select(bad)
    for bad in (torch.randn(4, 8), torch.randn(1, 1, 4, 8)):
        with pytest.raises(ValueError, match=r"\[B, N, D\]"):
            pruner.select_batch(bad, [None])


@pytest.mark.parametrize("cls", PRUNERS)
def test_bad_batch_arguments_raise(cls):
    batch, lengths = pad_batch([torch.randn(10, 8), torch.randn(6, 8)])
    pruner = cls(0.5)
    with pytest.raises(ValueError, match="layouts"):
        pruner.select_batch(batch, [None], lengths)
    with pytest.raises(ValueError, match="lengths"):
        pruner.select_batch(batch, [None, None], torch.tensor([10]))


@pytest.mark.parametrize("cls", PRUNERS)
def test_text_given_to_non_text_pruner_raises(cls):
    x = torch.randn(20, 8)
    with pytest.raises(ValueError, match="does not use text"):
        cls(0.5).select(x, text=torch.randn(3, 8))
    with pytest.raises(ValueError, match="does not use text"):
        cls(0.5).select_batch(x[None], [None], texts=[torch.randn(3, 8)])
    with pytest.raises(ValueError, match="does not use text"):
        cls(0.5).select_batch(x[None], [None], texts=[None])
    assert not cls.uses_text and ResPrune.uses_text
