"""mrprune.PDrop: ``official=True`` against a port of the official rank-and-drop (the last instruction token's softmax
row from q/k, head mean, image columns, ``topk(int(n0 * ratio))``) over the stages, the default counts, batch
independence and errors. Inside the tiny models it is covered by tests/test_integration_llm_stage.py."""

from __future__ import annotations

import math

import pytest
import torch

import mrprune
from mrprune.methods import PDrop
from mrprune.methods.pdrop import pyramid_ratios


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


#: The tables' presets and the share of an image's tokens each averages to: LLaVA-1.5's 192 / 128 / 64 of 576 tokens,
#: LLaVA-NeXT's 640 / 320 of at most 2880.
TABLE = [
    ("pdrop_192", 192 / 576),
    ("pdrop_128", 128 / 576),
    ("pdrop_64", 64 / 576),
    ("pdrop_next_640", 640 / 2880),
    ("pdrop_next_320", 320 / 2880),
]
#: Image token counts: LLaVA-1.5 (576), LLaVA-NeXT's cap (2880) and a 672 x 672 any-res image (576 + 48 x 48 + 48
#: newlines), and the tiny test models' images (tiny_llava: 16, 36; tiny_llava_next: 52, 88).
TOKENS = [576, 2880, 2928, 16, 36, 52, 88]


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize(("name", "share"), TABLE)
def test_table_presets_average_the_budget_over_the_decoder_layers(name, share, official):
    """PyramidDrop's equivalent tokens, by brute force: the image tokens each of the 32 decoder layers holds, stage
    by stage through select_batch, averaged; each stage's count rounds by at most 0.5 (official: floors, < 1)."""
    method = mrprune.preset(name, official=official)
    generator = torch.Generator().manual_seed(0)
    for n0 in TOKENS:
        held, current = [], n0
        for layer in range(32):
            if layer in method.layers and current:  # official floors can leave a tiny image no token
                kept = method.select_batch(
                    torch.zeros(1, current, 2),
                    [None],
                    attention=torch.rand(1, current, generator=generator),
                    step=method.layers.index(layer),
                    original_lengths=torch.tensor([n0]),
                )[0]
                current = kept.numel()
            held.append(current)
        average = sum(held) / 32
        assert average == method.average_tokens(n0, 32)
        if official:
            assert share * n0 - 1 < average <= share * n0 + 1e-9, (name, n0, average)
        else:
            assert abs(average - share * n0) <= 0.5, (name, n0, average)


def test_pyramid_ratios():
    # the maintainer's example (Cooperx521/PyramidDrop #29): lambda = 0.19 on layers 2 / 8 / 16 for 64 of 576 tokens
    lam = pyramid_ratios(64 / 576, (2, 8, 16), 32)[0]
    assert abs(lam - 0.19) < 0.005
    ratios = pyramid_ratios(1 / 3, (8, 16, 24), 32)
    assert all(math.isclose(r, ratios[0] ** (i + 1)) for i, r in enumerate(ratios))  # geometric
    assert math.isclose((8 + 8 * sum(ratios)) / 32, 1 / 3)
    assert pyramid_ratios(1.0, (8, 16, 24), 32) == (1.0, 1.0, 1.0)
    # the paper's layers 8 / 16 / 24 keep every token for 8 of 32 layers: 144 of 576 at least
    with pytest.raises(ValueError, match="not reachable"):
        pyramid_ratios(128 / 576, (8, 16, 24), 32)
    with pytest.raises(ValueError, match="num_layers"):
        pyramid_ratios(0.5, (8, 16, 24), 24)
    with pytest.raises(ValueError, match="num_layers"):
        PDrop().average_tokens(576, 20)
    assert PDrop().average_tokens(576, 32) == (8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32


@torch.no_grad()
def test_table_presets_run_in_a_tiny_llava():
    """The presets' pruning layers 2 / 8 / 16 in a 17-layer tiny LLaVA (36 tokens per image): each prompt's image
    ends with the last stage's count of its original tokens."""
    from mrprune.integrations import patched
    from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava

    model = tiny_llava(layers=17, image_size=42)
    image = [IMAGE_TOKEN] * 36
    input_ids, attention_mask = left_pad([[1, 5, 6, *image, 7, 8, 9], [1, 12, *image, 13, 14]])
    pixels = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    for name, expected in [("pdrop_192", 6), ("pdrop_128", 3), ("pdrop_64", 0)]:
        method = mrprune.preset(name)
        assert method.count(2, 36, 36) == expected  # round(36 * lambda**3)
        with patched(model, method) as handle:
            model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, max_new_tokens=1)
        assert [[k.numel() for k in record.kept] for record in handle.last] == [[expected], [expected]]
