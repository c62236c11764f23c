"""``Pruner.kept_count(layout)``: for every method :mod:`mrprune.methods` exports, either the number of tokens
``select`` keeps of an image with that layout (checked against ``select`` on synthetic features and signals, for
budgets and shares that round both ways, LLaVA-NeXT layouts whose newlines outnumber a small budget included), or a
:class:`mrprune.KeptCountUnknown` saying why the count does not follow from the layout."""

from __future__ import annotations

import pytest
import torch

from mrprune import KeptCountUnknown
from mrprune import methods as methods_module
from mrprune.layouts import GridLayout, LlavaNextLayout
from mrprune.methods import (
    SCOPE,
    TRIM,
    AgilePruner,
    CDPruner,
    DivPrune,
    FasterVLM,
    GPrune,
    HiRED,
    L2Norm,
    MRPruner,
    Pruner,
    RandomPruner,
    ResPrune,
    VisPruner,
)

LAYOUTS = [
    GridLayout(1, 6, 6),
    GridLayout(1, 1, 7),
    GridLayout(1, 1, 5),  # 0.5 * 5 = 2.5: half to even (DivPrune) keeps 2, half up 3
    GridLayout(2, 3, 5),
    LlavaNextLayout(rows=8, cols=4, base_side=4),  # 16 base + 32 grid + 8 newlines
    LlavaNextLayout(rows=0, cols=0, base_side=4),  # one crop: base view only
    LlavaNextLayout(rows=2, cols=0, base_side=3),  # one crop: base view + its newline tokens
]
RATIOS = [0.02, 0.1, 0.25, 0.5, 0.7, 1.0]  # 0.02: fewer than the newlines; 0.7 * 36 = 25.2, 0.5 * 7 = 3.5 (ties)
BUDGETS = [1, 5, 20, 1000]

#: A stand-in CLIP model: the synthetic ``clip_image`` / ``clip_text`` below are passed, so it is never called.
CLIP = {"clip": object(), "clip_tokenizer": lambda text: {"input_ids": [[0]]}}


def _sized(cls, **extra):
    return [cls(keep_ratio=r, **extra) for r in RATIOS] + [cls(budget=b, **extra) for b in BUDGETS]


#: Every exported method with a count, in the configurations tested against ``select``.
COUNTED = {
    MRPruner: [MRPruner(keep_ratio=r) for r in RATIOS],
    GPrune: [GPrune(keep_ratio=r) for r in RATIOS],
    DivPrune: [DivPrune(keep_ratio=r) for r in RATIOS],
    RandomPruner: [RandomPruner(keep_ratio=r, seed=3) for r in RATIOS],
    L2Norm: _sized(L2Norm),
    ResPrune: _sized(ResPrune),
    FasterVLM: _sized(FasterVLM),
    HiRED: _sized(HiRED),
    SCOPE: _sized(SCOPE),
    VisPruner: _sized(VisPruner),
    CDPruner: _sized(CDPruner),
    AgilePruner: _sized(AgilePruner),
    TRIM: [TRIM(keep_ratio=r, **CLIP) for r in RATIOS],
}


def _unknown():
    """(method, words the reason must contain) for every configuration whose count is not known from the layout."""
    m = methods_module
    return [
        (m.FastV(), "language model"),
        (m.PDrop(), "language model"),
        (m.DART(keep_ratio=0.5), "language model"),
        (m.SparseVLM(), "merges"),
        (m.ToMe(budget=64), "merges"),
        (m.VisionZip(budget=64), "merges"),
        (m.PruMerge(), "merges"),
        (m.TRIM(**CLIP), "IQR"),
        (m.DivPrune(official=True), "duplicate"),
        (MRPruner(official=True), "official"),
        (GPrune(official=True), "official"),
        (FasterVLM(budget=8, official=True), "official"),
    ]


def _crops(layout):
    """Each token's crop as the integrations give it: 0 the base view, the high-resolution grid's rows split over two
    tiles (1, 2), -1 the newlines."""
    if isinstance(layout, GridLayout):
        return torch.zeros(layout.num_tokens, dtype=torch.int64)
    crops = torch.full((layout.num_tokens,), -1, dtype=torch.int64)
    crops[layout.base_indices] = 0
    grid = layout.highres_indices
    if grid.numel():
        half = (layout.rows // 2) * layout.cols
        crops[grid[:half]] = 1
        crops[grid[half:]] = 2
    return crops


def _select(pruner, layout, seed):
    """``pruner.select`` on synthetic features and every signal its needs name, laid out as an integration does."""
    n, dim = layout.num_tokens, 8
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator) + 2 * torch.randn(dim, generator=generator)
    crops = _crops(layout)
    signals = {}
    if pruner.stage is methods_module.Stage.VISION:
        scores = torch.rand(n, generator=generator).masked_fill(crops < 0, 0.0)
        signals = {"attention": {layer: scores for layer in pruner.attention_layers}, "crops": crops}
        if methods_module.Need.CLIP_EMBEDDINGS in pruner.needs:
            clip_image = torch.randn(n, 6, generator=generator).masked_fill((crops < 0)[:, None], 0.0)
            signals |= {"clip_image": clip_image, "clip_text": [torch.randn(2, 6, generator=generator)]}
    text = torch.randn(3, dim, generator=generator) if pruner.uses_text else None
    return pruner.select(features, layout, text, **signals)


def _exported():
    return [
        getattr(methods_module, name)
        for name in methods_module.__all__
        if isinstance(getattr(methods_module, name), type)
        and issubclass(getattr(methods_module, name), Pruner)
        and getattr(methods_module, name) is not Pruner
    ]


def test_every_exported_method_is_covered():
    unknown = {type(method) for method, _ in _unknown()}
    missing = [cls.__name__ for cls in _exported() if cls not in COUNTED and cls not in unknown]
    assert not missing, f"add these methods to tests/test_kept_count.py: {missing}"


@pytest.mark.parametrize("cls", list(COUNTED), ids=lambda c: c.__name__)
def test_kept_count_is_what_select_keeps(cls):
    for pruner in COUNTED[cls]:
        for seed, layout in enumerate(LAYOUTS):
            kept = _select(pruner, layout, seed)
            assert kept.numel() == pruner.kept_count(layout), (pruner, layout)


@pytest.mark.parametrize(("method", "reason"), _unknown(), ids=[repr(m) for m, _ in _unknown()])
def test_unknown_counts_say_why(method, reason):
    with pytest.raises(KeptCountUnknown, match=reason):
        method.kept_count(GridLayout(1, 4, 4))
