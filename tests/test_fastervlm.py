"""FasterVLM: ``official=True`` against a port of the official selection (Theia-4869/FasterVLM @ 29ed074,
``llava_arch.py``: per-crop top-T by head-averaged [CLS] attention, LLaVA-NeXT index masks unpadded with the features,
newlines kept) on tiny LLaVA-1.5 and LLaVA-NeXT models with the eager tower's attention probabilities; the default
mode's budgets; argument errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava, tiny_llava_next  # noqa: E402
from mrprune.methods import FasterVLM, preset  # noqa: E402

LAYER = -2  # the tiny CLIP tower has 2 layers: the select layer's attention is layers[0]'s


def eager_attention(model, crops):
    """``[crops, P]`` head-averaged [CLS] row of the select layer, from an eager tower's attention probabilities."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager.model.vision_tower(crops, output_attentions=True).attentions[LAYER][:, :, 0, 1:].mean(1)


# --- the port (written from the official code's steps, in this test's own words) ----------------------------------


def official_crop_masks(attention, t):
    """Each crop's top-``t`` patches (the official ``torch.topk`` + ``scatter_``): ``[crops, P]`` bool."""
    masks = torch.zeros_like(attention, dtype=torch.bool)
    masks.scatter_(1, attention.topk(t, dim=1).indices, True)
    return masks


def official_unpad(grid, width, height):
    """The official ``unpad_image`` on a ``[rows, cols]`` token grid, ``original_size = (width, height)``."""
    rows, cols = grid.shape
    if width / height > cols / rows:
        padding = (rows - int(height * (cols / width))) // 2
        return grid[padding : rows - padding]
    padding = (cols - int(width * (rows / height))) // 2
    return grid[:, padding : cols - padding]


def official_kept(masks, tiles_high, tiles_wide, side, width, height):
    """Kept positions in the packed image (base view, then the unpadded grid with a newline after every row)."""
    base = masks[0]
    if masks.shape[0] == 1:
        return torch.cat([base, torch.ones(1, dtype=torch.bool)]).nonzero()[:, 0]
    grid = masks[1:].view(tiles_high, tiles_wide, side, side).permute(0, 2, 1, 3).reshape(tiles_high * side, -1)
    grid = official_unpad(grid, width, height)
    grid = torch.cat([grid, torch.ones(grid.shape[0], 1, dtype=torch.bool)], dim=1)  # newline column, always kept
    return torch.cat([base, grid.reshape(-1)]).nonzero()[:, 0]


def gapped(attention, t):
    """The ``t``-th and ``t+1``-th values of every crop differ: the top-``t`` set is well defined."""
    values = attention.sort(dim=1, descending=True).values
    return bool(((values[:, t - 1] - values[:, t]) > 1e-6).all())


@torch.no_grad()
def test_official_llava_matches_the_port():
    model = tiny_llava()
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    attention = eager_attention(model, pixels)
    t = 6
    assert gapped(attention, t)
    with patched(model, FasterVLM(budget=t, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    kept = [k for record in handle.last for k in record.kept]
    expected = [official_crop_masks(attention[i : i + 1], t)[0].nonzero()[:, 0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True))
    # the default mode keeps the same tokens on a one-crop image (no newline, one crop)
    with patched(model, FasterVLM(budget=t)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    assert all(torch.equal(a, b) for a, b in zip([k for r in handle.last for k in r.kept], expected, strict=True))


@torch.no_grad()
def test_official_llava_next_matches_the_port():
    model = tiny_llava_next()
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    sizes = torch.tensor([[28, 40], [56, 56], [40, 28]])  # unpadded left/right, none, top/bottom
    pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    counts = [len(f) for f in model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    input_ids, mask = left_pad(
        [[1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 9], [1, 12, *[IMAGE_TOKEN] * counts[2], 14]]
    )
    t = 5
    with patched(model, FasterVLM(budget=t, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = [k for record in handle.last for k in record.kept]
    canvases = {(28, 40): (1, 2), (56, 56): (2, 2), (40, 28): (2, 1)}  # tiles (high, wide) of the chosen pinpoints
    for i, (height, width) in enumerate(sizes.tolist()):
        tiles_high, tiles_wide = canvases[(height, width)]
        attention = eager_attention(model, pixels[i, : 1 + tiles_high * tiles_wide])
        assert gapped(attention, t)
        expected = official_kept(official_crop_masks(attention, t), tiles_high, tiles_wide, side, width, height)
        assert torch.equal(kept[i], expected), i
        assert kept[i].numel() < counts[i]


def test_default_budgets_and_per_crop_split():
    # one LLaVA-NeXT-like item: crop 0 has 4 tokens, crop 1 has 6, crop 2 has 2, two newlines (-1)
    crops = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1, 1, 1, 1, 2, 2, -1]])
    scores = torch.rand(1, 14, generator=torch.Generator().manual_seed(0))
    features = torch.randn(1, 14, 3)
    method = FasterVLM(budget=8)
    kept = method.select_batch(features, [None], attention={-2: scores}, crops=crops)[0]
    assert kept.numel() == 8
    assert set(kept.tolist()) >= {7, 13}  # newlines first
    # 6 scored tokens over crops of 4 / 6 / 2 tokens: 2 / 3 / 1, each its crop's best
    per_crop = {c: [i for i in kept.tolist() if crops[0, i] == c] for c in (0, 1, 2)}
    assert [len(per_crop[c]) for c in (0, 1, 2)] == [2, 3, 1]
    for c, chosen in per_crop.items():
        members = (crops[0] == c).nonzero()[:, 0]
        best = members[scores[0, members].argsort(descending=True)[: len(chosen)]]
        assert sorted(best.tolist()) == sorted(chosen)
    # a budget below the newline count keeps the newlines only; a ratio rounds half up
    assert FasterVLM(budget=1).select_batch(features, [None], attention={-2: scores}, crops=crops)[0].tolist() == [
        7,
        13,
    ]
    assert (
        FasterVLM(keep_ratio=0.25).select_batch(features, [None], attention={-2: scores}, crops=crops)[0].numel() == 4
    )


def test_presets_and_errors():
    assert preset("fastervlm_192").size.budget == 192
    assert preset("fastervlm_next_320").size.budget == 320
    qwen = preset("fastervlm_qwen_889")
    assert qwen.layer == -1 and abs(qwen.size.keep_ratio - 1 / 9) < 1e-12
    with pytest.raises(ValueError, match="exactly one of budget and keep_ratio"):
        FasterVLM()
    with pytest.raises(ValueError, match="exactly one of budget and keep_ratio"):
        FasterVLM(budget=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="budget"):
        FasterVLM(budget=0)
    with pytest.raises(TypeError, match="layer"):
        FasterVLM(budget=3, layer=1.5)
    with pytest.raises(TypeError, match="official"):
        FasterVLM(budget=3, official="yes")
    features = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="needs attention"):
        FasterVLM(budget=2).select_batch(features, [None])
    with pytest.raises(ValueError, match=r"attention\[-2\] must be"):
        FasterVLM(budget=2).select_batch(features, [None], attention={-2: torch.rand(1, 3)})
    with pytest.raises(ValueError, match="official=True"):
        FasterVLM(budget=2, official=True).select_batch(
            features, [None], attention={-2: torch.rand(1, 4)}, attention_kind="received"
        )
