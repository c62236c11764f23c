"""VisPruner: ``official=True`` against a port of the official selection (Theia-4869/VisPruner @ a089bff,
``encode_images``: important tokens by head-mean [CLS] attention, then even/odd de-duplication rounds of up to 8 on
the CLIP features) on tiny LLaVA-1.5 and LLaVA-NeXT models, mapped to tokens through the model's own packing; the
default mode's budgets; errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava, tiny_llava_next  # noqa: E402
from mrprune.methods import VisPruner, preset  # noqa: E402

LAYER = -2


def eager_tower(model, crops):
    """``(features [crops, P, Dv], attention [crops, P])`` of the select layer, from an eager tower."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out = eager.model.vision_tower(crops, output_attentions=True, output_hidden_states=True)
    return out.hidden_states[LAYER][:, 1:], out.attentions[LAYER][:, :, 0, 1:].mean(1)


def official_vispruner(features, attention, t, ratio=0.5, per_round=8):
    """The official per-crop selection, written out: ``(chosen [crops, P] bool, smallest decision margin)``."""
    crops, n = attention.shape
    important_num = int(t * ratio)
    diverse_num = t - important_num
    order = attention.argsort(dim=-1, descending=True)
    sorted_attention = attention.gather(1, order)
    margin = float((sorted_attention[:, :-1] - sorted_attention[:, 1:]).min())  # the whole order matters
    important, residual = order[:, :important_num], order[:, important_num:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while True:
        count = residual.shape[1]
        r = min(per_round, count - diverse_num)
        if r <= 0:
            break
        tokens = unit[torch.arange(crops)[:, None], residual]
        evens, odds = tokens[:, ::2], tokens[:, 1::2]
        scores = (evens @ odds.transpose(1, 2)).max(-1).values
        ranked = scores.sort(dim=-1, descending=True).values
        if r < ranked.shape[1]:  # the r dropped tokens are well defined
            margin = min(margin, float((ranked[:, r - 1] - ranked[:, r]).min()))
        keep = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, keep), residual[:, 1::2]], dim=1)
    chosen = torch.zeros(crops, n, dtype=torch.bool)
    chosen.scatter_(1, torch.cat([important, residual], 1), True)
    return chosen, margin


@pytest.mark.parametrize("t, per_round", [(10, 8), (6, 4), (7, 4)])  # 1 round; 3 rounds; odd T: int(3.5) important
@torch.no_grad()
def test_official_llava_matches_the_port(t, per_round):
    model = tiny_llava()
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    features, attention = eager_tower(model, pixels)
    # (the official code needs r <= the even-position candidates in every round: these settings respect it)
    chosen, margin = official_vispruner(features, attention, t, per_round=per_round)
    assert margin > 1e-6
    with patched(model, VisPruner(budget=t, per_round=per_round, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    kept = [k for record in handle.last for k in record.kept]
    assert all(torch.equal(k, c.nonzero()[:, 0]) for k, c in zip(kept, chosen, strict=True))


@torch.no_grad()
def test_official_llava_next_matches_the_port():
    model = tiny_llava_next()
    hidden = model.config.text_config.hidden_size
    sizes = torch.tensor([[28, 40], [56, 56], [40, 28]])
    pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    counts = [len(f) for f in model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    input_ids, mask = left_pad(
        [[1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 9], [1, 12, *[IMAGE_TOKEN] * counts[2], 14]]
    )
    t = 10
    with patched(model, VisPruner(budget=t, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = [k for record in handle.last for k in record.kept]
    crop_counts = {(28, 40): 3, (56, 56): 5, (40, 28): 3}
    for i, size in enumerate(sizes.tolist()):
        features, attention = eager_tower(model, pixels[i, : crop_counts[tuple(size)]])
        chosen, margin = official_vispruner(features, attention, t)
        assert margin > 1e-6
        packed = model.model.pack_image_features(
            [chosen.float()[..., None].expand(-1, -1, hidden)], sizes[i : i + 1], "default", torch.full((hidden,), -7.0)
        )[0][0][:, 0]
        assert torch.equal(kept[i], (packed == 1).nonzero()[:, 0]), i


def test_default_mode_budgets_and_duplicates():
    # crop 0: six tokens, the four least attended are two pairs of duplicates; budget 4 = 2 important + 2 diverse
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    features = torch.stack([torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.6, 0.0, 0.8]), a, a, b, b])[None]
    attention = torch.tensor([[0.9, 0.8, 0.4, 0.3, 0.2, 0.1]])
    kept = VisPruner(budget=4).select_batch(features, [None], attention={-2: attention})[0]
    assert kept.numel() == 4 and {0, 1} <= set(kept.tolist())
    assert len({tuple(features[0, i].tolist()) for i in kept.tolist()}) == 4  # no duplicate survives
    # newlines (crop -1) are kept first and counted
    crops = torch.tensor([[0, 0, 0, 0, 0, -1]])
    kept = VisPruner(budget=3).select_batch(features, [None], attention={-2: attention}, crops=crops)[0]
    assert kept.numel() == 3 and 5 in kept.tolist()


def test_presets_and_errors():
    assert preset("vispruner_128").size.budget == 128
    with pytest.raises(ValueError, match="visual_token_num"):
        VisPruner(keep_ratio=0.5, official=True)
    with pytest.raises(ValueError, match="important_ratio"):
        VisPruner(budget=3, important_ratio=2.0)
    with pytest.raises(ValueError, match="per_round"):
        VisPruner(budget=3, per_round=0)
    features = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="official=True"):
        VisPruner(budget=2, official=True).select_batch(features, [None], attention={-2: torch.rand(1, 4)})
