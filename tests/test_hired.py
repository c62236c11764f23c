"""HiRED: ``official=True`` against a port of the official selection (hasanar1f/HiRED @ 42be984,
``HiRED_token_selection`` / ``HiRED_sub_img_budgets``) on a tiny LLaVA-NeXT model with the eager tower's attention,
mapped to tokens through the model's own packing; the default mode's budgets and tile shares; errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava_next  # noqa: E402
from mrprune.layouts import LlavaNextLayout  # noqa: E402
from mrprune.methods import HiRED, preset  # noqa: E402

EARLY, LATE = 0, 1  # the tiny tower's two layers stand in for the official 0 and 22


def eager_attentions(model, crops):
    """``{layer: [crops, P]}`` head-averaged [CLS] rows from an eager tower's attention probabilities."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attentions = eager.model.vision_tower(crops, output_attentions=True).attentions
    return {layer: attentions[layer][:, :, 0, 1:].mean(1) for layer in (EARLY, LATE)}


def official_masks(early, late, rate, alpha):
    """The official per-crop masks ``[crops, P]`` (the budget arithmetic and the raster-chunk split included)."""
    crops, patches = late.shape
    total = int(crops * patches * rate)
    full = min(int(total * alpha), patches)
    sub = min(total - full, (crops - 1) * patches)
    mask = torch.zeros(crops, patches, dtype=torch.bool)
    mask[0, late[0].topk(full).indices] = True
    if sub > 0:
        spatial = torch.zeros(patches, dtype=torch.bool)
        spatial[early[0].topk(int(patches * (1 - alpha))).indices] = True
        per_chunk = spatial.reshape(crops - 1, -1).sum(-1)
        budgets = (per_chunk / per_chunk.sum() * sub).int().clamp(max=patches)
        for i, k in enumerate(budgets.tolist()):
            mask[i + 1, late[i + 1].topk(k).indices] = True
    return mask


def gapped(scores):
    values = scores.sort(dim=1, descending=True).values
    return bool((values[:, :-1] - values[:, 1:] > 1e-7).all())  # every top-k of every crop well defined


@pytest.mark.parametrize("rate, alpha", [(0.3, 0.5), (0.2, 0.3)])
@torch.no_grad()
def test_official_matches_the_port(rate, alpha):
    model = tiny_llava_next()
    config = model.config
    sizes = torch.tensor([[28, 40], [56, 56], [40, 28]])
    pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    counts = [len(f) for f in model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    input_ids, mask = left_pad(
        [[1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 9], [1, 12, *[IMAGE_TOKEN] * counts[2], 14]]
    )
    method = HiRED(keep_ratio=rate, alpha=alpha, budget_layer=EARLY, select_layer=LATE, official=True)
    with patched(model, method) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = [k for record in handle.last for k in record.kept]
    crop_counts = {(28, 40): 3, (56, 56): 5, (40, 28): 3}
    hidden = config.text_config.hidden_size
    for i, size in enumerate(sizes.tolist()):
        attention = eager_attentions(model, pixels[i, : crop_counts[tuple(size)]])
        assert gapped(attention[EARLY]) and gapped(attention[LATE])
        masks = official_masks(attention[EARLY], attention[LATE], rate, alpha)
        # where each (crop, patch) lands in the packed image: the model's own packing, newlines marked -7
        packed = model.model.pack_image_features(
            [masks.float()[..., None].expand(-1, -1, hidden)], sizes[i : i + 1], "default", torch.full((hidden,), -7.0)
        )[0][0][:, 0]
        expected = (packed == 1).nonzero()[:, 0]  # official packing drops the newlines
        assert torch.equal(kept[i], expected), (i, kept[i], expected)


def test_default_budgets_follow_the_early_attention():
    # a 2 x 1 tile image (tall): base 4 x 4 = 16 tokens, grid 8 x 4 with a newline per row
    layout = LlavaNextLayout(rows=8, cols=4, base_side=4)
    n = layout.num_tokens
    crops = torch.full((1, n), -1)
    crops[0, :16] = 0
    grid = layout.highres_indices.view(8, 4)
    crops[0, grid[:4].reshape(-1)] = 1  # top half of the grid: tile 1
    crops[0, grid[4:].reshape(-1)] = 2
    early = torch.zeros(1, n)
    early[0, 8:16] = torch.arange(1.0, 9.0)  # the base view's lower half attends: tile 2's region
    late = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    features = torch.randn(1, n, 3)
    method = HiRED(budget=20, alpha=0.5, budget_layer=0, select_layer=1)
    kept = method.select_batch(features, [layout], attention={0: early, 1: late}, crops=crops)[0]
    assert kept.numel() == 20
    per_crop = [int((crops[0, kept] == c).sum()) for c in (-1, 0, 1, 2)]
    assert per_crop == [8, 6, 0, 6]  # 8 newlines, 12 scored: 6 base, the 6 for the tiles all to tile 2
    for c in (0, 2):
        members = (crops[0] == c).nonzero()[:, 0]
        chosen = kept[crops[0, kept] == c]
        assert sorted(chosen.tolist()) == sorted(members[late[0, members].argsort(descending=True)[:6]].tolist())


def test_presets_and_errors():
    assert preset("hired_next_640").size.budget == 640
    with pytest.raises(ValueError, match="alpha"):
        HiRED(budget=4, alpha=1.5)
    with pytest.raises(ValueError, match="token_budget_rate"):
        HiRED(budget=4, official=True)
    features = torch.randn(1, 5, 2)
    signals = dict(attention={0: torch.rand(1, 5), -2: torch.rand(1, 5)}, attention_kind="cls")
    with pytest.raises(ValueError, match="official=True"):
        HiRED(keep_ratio=0.5, official=True).select_batch(features, [None], **signals)
