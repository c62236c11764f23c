"""mrprune.PDrop: ``official=True`` against a port of the official rank-and-drop (the last instruction token's softmax
row from q/k, head mean, image columns, ``topk(int(n0 * ratio))``) over the stages, the default counts, batch
independence and errors. Inside the tiny models it is covered by tests/test_integration_llm_stage.py."""

from __future__ import annotations

import math

import pytest
import torch

import mrprune
from mrprune.methods import PDrop


def official_rank_drop(q, k, image_index, image_tokens, keep_length):
    """The official ``pdrop_rank_drop`` selection for one sample in inference: ``q [H, L, d]``, ``k [H, L, d]`` (after
    RoPE, the key heads repeated), the query at the prompt's last token; returns the kept sequence indices."""
    length, head_dim = q.shape[1], q.shape[2]
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    query = length - 1  # prompt_len + image_tokens - 1
    weights = q[:, query : query + 1] @ k.transpose(1, 2) / math.sqrt(head_dim) + mask[query : query + 1]
    weights = weights.softmax(-1, dtype=torch.float32)
    scores = weights.mean(0)[:, image_index : image_index + image_tokens].mean(0)
    return (scores.topk(keep_length).indices + image_index).sort().values


def test_official_stages_equal_the_port():
    generator = torch.Generator().manual_seed(0)
    heads, dim, before, n, after = 4, 16, 5, 37, 6
    ratios = (0.5, 0.25, 0.125)
    method = PDrop(layers=(8, 16, 24), ratios=ratios, official=True)
    kept = torch.arange(before, before + n)  # sequence positions of the surviving image tokens
    for step, ratio in enumerate(ratios):
        length = before + kept.numel() + after
        q = torch.randn(heads, length, dim, generator=generator)
        k = torch.randn(heads, length, dim, generator=generator)
        image_tokens = int(n * (1.0 if step == 0 else ratios[step - 1]))
        assert image_tokens == kept.numel()
        expected = official_rank_drop(q, k, before, image_tokens, int(n * ratio))
        attention = mrprune.ops.attention_rows(
            q[None, :, -1:], k[None], torch.ones(1, length, dtype=torch.bool), torch.tensor([[length - 1]])
        )[0, 0]
        ours = method.select_batch(
            torch.zeros(1, image_tokens, 8),
            [None],
            attention=attention[before : before + image_tokens][None],
            step=step,
            original_lengths=torch.tensor([n]),
        )[0]
        assert torch.equal(ours + before, expected)
        kept = kept[ours]
    assert kept.numel() == int(n * 0.125) == 4


@pytest.mark.parametrize(("official", "expected"), [(True, [18, 9, 4]), (False, [19, 9, 5])])
def test_counts_are_shares_of_the_original_tokens(official, expected):
    method = PDrop(layers=(2, 4, 6), official=official)
    current = 37
    for step, count in enumerate(expected):
        scores = torch.rand(1, current, generator=torch.Generator().manual_seed(step))
        kept = method.select_batch(
            torch.zeros(1, current, 4), [None], attention=scores, step=step, original_lengths=torch.tensor([37])
        )[0]
        assert kept.numel() == count
        assert torch.equal(kept, scores[0].topk(count).indices.sort().values)
        current = count


def test_batch_equals_items_alone():
    generator = torch.Generator().manual_seed(3)
    lengths = [10, 25, 1, 7]
    scores = torch.rand(4, 25, generator=generator)
    method = PDrop(layers=(1,), ratios=(0.4,))
    batch = method.select_batch(torch.zeros(4, 25, 2), [None] * 4, torch.tensor(lengths), attention=scores)
    for b, n in enumerate(lengths):
        alone = method.select_batch(torch.zeros(1, n, 2), [None], attention=scores[b : b + 1, :n])[0]
        assert torch.equal(batch[b], alone)
        assert batch[b].numel() == math.floor(0.4 * n + 0.5)


def test_arguments_and_errors():
    assert mrprune.preset("pdrop").layers == (8, 16, 24)
    assert PDrop().ratios == (0.5, 0.25, 0.125)
    with pytest.raises(ValueError, match="same non-zero length"):
        PDrop(layers=(8, 16), ratios=(0.5,))
    with pytest.raises(ValueError, match="increase"):
        PDrop(layers=(8, 8), ratios=(0.5, 0.25))
    with pytest.raises(ValueError, match="not increase"):
        PDrop(layers=(8, 16), ratios=(0.25, 0.5))
    with pytest.raises(ValueError):
        PDrop(layers=(0,), ratios=(0.5,))
    with pytest.raises(ValueError):
        PDrop(layers=(8,), ratios=(0.0,))
    with pytest.raises(TypeError, match="sequences"):
        PDrop(layers=8, ratios=0.5)
    method = PDrop(layers=(1, 2), ratios=(0.5, 0.25))
    with pytest.raises(ValueError, match="attention"):
        method.select_batch(torch.zeros(1, 5, 2), [None])
    with pytest.raises(ValueError, match="step"):
        method.select_batch(torch.zeros(1, 5, 2), [None], attention=torch.rand(1, 5), step=2)
    with pytest.raises(ValueError, match="original_lengths"):
        method.select_batch(
            torch.zeros(1, 5, 2), [None], attention=torch.rand(1, 5), original_lengths=torch.tensor([3])
        )
    with pytest.raises(TypeError, match="unexpected keyword"):
        method.select_batch(torch.zeros(1, 5, 2), [None], attention=torch.rand(1, 5), stage=1)
