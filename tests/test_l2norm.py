"""L2-norm (G-Prune's baseline): the kept set is the top of the projector-output norms (checked against sorting on
inputs with a guaranteed gap), budgets, ties, batches and presets."""

from __future__ import annotations

import pytest
import torch

from mrprune.methods import L2Norm, preset


def test_top_norms_with_a_gap():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, 8, generator=generator)
    lengths = torch.tensor([20, 13, 7])
    kept = L2Norm(keep_ratio=0.4).select_batch(features, [None] * 3, lengths)
    for b, n in enumerate(lengths.tolist()):
        norms = features[b, :n].double().norm(dim=-1)
        order = norms.argsort(descending=True)
        k = int(0.4 * n + 0.5)
        assert kept[b].numel() == k
        assert norms[order[k - 1]] - norms[order[k]] > 1e-6  # the top-k set is well defined
        assert torch.equal(kept[b], order[:k].sort().values)


def test_budget_ties_and_single_select():
    features = torch.ones(1, 6, 4)  # all norms equal: ties go to the lower index
    assert L2Norm(budget=3).select_batch(features, [None])[0].tolist() == [0, 1, 2]
    assert L2Norm(budget=10).select(features[0]).tolist() == list(range(6))  # a budget above n keeps everything
    features[0, 4] *= 2
    assert L2Norm(budget=1).select(features[0]).tolist() == [4]
    # the L2 norm, not another one: [3, 0, 0, 0] (L2 3, L1 3) beats [1.2] * 4 (L2 2.4, L1 4.8)
    assert L2Norm(budget=1).select(torch.tensor([[1.2] * 4, [3.0, 0, 0, 0]])).tolist() == [1]


def test_presets_and_errors():
    assert preset("l2norm_64").size.budget == 64
    assert abs(preset("l2norm_qwen_667").size.keep_ratio - 1 / 3) < 1e-12
    with pytest.raises(ValueError, match="exactly one"):
        L2Norm()
    with pytest.raises(ValueError, match="keep_ratio"):
        L2Norm(keep_ratio=1.5)
