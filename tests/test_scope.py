"""SCOPE: ``official=True`` against a port of the official greedy (kinredon/SCOPE @ a01b98f, ``SCOPE()`` and
``CLIPVisionTower_SCOPE.forward``: CLIP select-layer features, [CLS] attention summed over heads, ``int(token_num /
crops)`` per crop) on tiny LLaVA-1.5 and LLaVA-NeXT models, mapped to tokens through the model's own packing; the
default mode's coverage greedy and budgets; errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava, tiny_llava_next  # noqa: E402
from mrprune.methods import SCOPE, preset  # noqa: E402

LAYER = -2


def eager_tower(model, crops):
    """``(features [crops, P, Dv], saliency [crops, P])``: the select layer's patch states and the [CLS] row summed
    over heads, from an eager tower (``output_attentions``, as the official code runs it)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out = eager.model.vision_tower(crops, output_attentions=True, output_hidden_states=True)
    return out.hidden_states[LAYER][:, 1:], out.attentions[LAYER][:, :, 0, 1:].sum(1)


def official_scope(features, saliency, k, alpha=1.0):
    """The official batched greedy, written out: returns the picks ``[crops, k]`` and the smallest margin between the
    best and the second-best gain over all steps (the comparison is meaningful only when it is positive)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    cosine = unit @ unit.transpose(1, 2)
    crops, n = saliency.shape
    chosen = torch.zeros(crops, n, dtype=torch.bool)
    cur = torch.zeros(crops, n)
    picks, margin = [], float("inf")
    weight = saliency**alpha
    for _ in range(k):
        gains = (cosine.masked_fill(chosen[:, None, :], 0) - cur[:, :, None]).clamp(min=0).sum(1) * weight
        gains = gains.masked_fill(chosen, float("-inf"))
        top = gains.topk(2, dim=1).values
        margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
        best = gains.argmax(1)
        chosen[torch.arange(crops), best] = True
        picks.append(best)
        cur = torch.maximum(cur, cosine[torch.arange(crops), best])
    return torch.stack(picks, 1), margin


@torch.no_grad()
def test_official_llava_matches_the_port():
    model = tiny_llava()
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    features, saliency = eager_tower(model, pixels)
    picks, margin = official_scope(features, saliency, 5)
    assert margin > 1e-5
    with patched(model, SCOPE(budget=5, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    kept = [k for record in handle.last for k in record.kept]
    assert all(torch.equal(k, p.sort().values) for k, p in zip(kept, picks, strict=True))


@torch.no_grad()
def test_official_llava_next_matches_the_port():
    model = tiny_llava_next()
    hidden = model.config.text_config.hidden_size
    sizes = torch.tensor([[28, 40], [56, 56], [40, 28]])
    pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    counts = [len(f) for f in model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    input_ids, mask = left_pad(
        [[1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 9], [1, 12, *[IMAGE_TOKEN] * counts[2], 14]]
    )
    token_num = 13
    with patched(model, SCOPE(budget=token_num, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = [k for record in handle.last for k in record.kept]
    crop_counts = {(28, 40): 3, (56, 56): 5, (40, 28): 3}
    for i, size in enumerate(sizes.tolist()):
        crops = crop_counts[tuple(size)]
        features, saliency = eager_tower(model, pixels[i, :crops])
        picks, margin = official_scope(features, saliency, token_num // crops)  # int(token_num / bs)
        assert margin > 1e-5
        chosen = torch.zeros(saliency.shape, dtype=torch.bool).scatter_(1, picks, True)
        packed = model.model.pack_image_features(
            [chosen.float()[..., None].expand(-1, -1, hidden)], sizes[i : i + 1], "default", torch.full((hidden,), -7.0)
        )[0][0][:, 0]
        assert torch.equal(kept[i], (packed == 1).nonzero()[:, 0]), i


def test_default_mode_budgets_per_crop():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 12, 6, generator=generator)
    crops = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
    scores = torch.rand(1, 12, generator=generator)
    kept = SCOPE(budget=7).select_batch(features, [None], attention={-2: scores}, crops=crops)[0]
    assert kept.numel() == 7 and {10, 11} <= set(kept.tolist())  # 2 newlines + 5 scored: 3 of crop 0, 2 of crop 1
    assert [int((crops[0, kept] == c).sum()) for c in (0, 1)] == [3, 2]
    # with saliency 1 everywhere and orthogonal tokens every pick gains the same: ties to the lower index
    eye = torch.eye(6)[None]
    ones = torch.ones(1, 6)
    assert SCOPE(budget=3).select_batch(eye, [None], attention={-2: ones})[0].tolist() == [0, 1, 2]
    # a duplicate of a kept token gains nothing: the second pick skips it
    twins = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert SCOPE(budget=2).select_batch(twins, [None], attention={-2: torch.ones(1, 3)})[0].tolist() == [0, 2]


def test_presets_and_errors():
    assert preset("scope_64").size.budget == 64
    assert preset("scope_qwen_778").layer == -1
    with pytest.raises(ValueError, match="token_num"):
        SCOPE(keep_ratio=0.5, official=True)
    with pytest.raises(ValueError, match="alpha"):
        SCOPE(budget=3, alpha=-1.0)
    features = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="official=True"):
        SCOPE(budget=2, official=True).select_batch(features, [None], attention={-2: torch.rand(1, 4)})
