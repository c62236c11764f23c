"""VisionZip: ``official=True`` against a port of the official selection and merge (dvlab-research/VisionZip @
3151f6d, ``visionzip/clip_encoder.py``, written here from its steps) on random inputs with gaps, per crop on
LLaVA-NeXT-like items; the default mode's budgets, weights and batch independence; edge cases; argument errors."""

from __future__ import annotations

import pytest
import torch

from mrprune.methods import MergedTokens, VisionZip, preset
from tests.utils import check_crops_alone

LAYER = -2


# --- the port (the official steps, eager torch, on one crop with its [CLS] row first) -------------------------------


def official_visionzip(hidden, metric, head_rows, dominant, contextual):
    """The official ``CLIPVisionTower_VisionZip.forward`` on one crop.

    ``hidden [1 + P, D]`` and ``metric [1 + P, Dm]`` with the [CLS] token first, ``head_rows [H, P]`` the per-head
    [CLS] attention over the patches; ``dominant`` is the official argument (``dominant - 1`` patches + [CLS]).
    Returns the dominant patch positions, the targets' patch positions (the contextual tokens' order), the
    contextual tokens, and each remaining patch's target slot.
    """
    tokens = hidden.shape[0]
    top = head_rows.sum(0).topk(dominant - 1).indices + 1
    all_indices = torch.cat([torch.zeros(1, dtype=top.dtype), top])
    mask = torch.ones(tokens, dtype=torch.bool).scatter_(0, all_indices, False)
    dominant_positions = (~mask).nonzero()[1:, 0] - 1  # [CLS] first, then the patches in index order
    filtered_metric = metric[mask]
    filtered_hidden = hidden[mask]
    normalized = filtered_metric / filtered_metric.norm(dim=-1, keepdim=True)
    step = max(1, normalized.shape[0] // contextual)
    targets = torch.arange(0, normalized.shape[0], step)[:contextual]
    others = ~torch.isin(torch.arange(normalized.shape[0]), targets)
    similarity = normalized[others] @ normalized[targets].T
    one_hot = torch.zeros(int(others.sum()), contextual, dtype=hidden.dtype)
    one_hot.scatter_(1, similarity.argmax(dim=1)[:, None], 1)
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    aggregated = one_hot.T @ filtered_hidden[others] / counts
    contextual_tokens = filtered_hidden[targets] + aggregated
    remaining = mask.nonzero()[:, 0] - 1
    slot = torch.full((remaining.numel(),), -1, dtype=torch.int64)
    slot[targets] = torch.arange(targets.numel())
    slot[others] = similarity.argmax(dim=1)
    return dominant_positions, remaining[targets], contextual_tokens, remaining, slot


def gapped_rows(heads, patches, generator):
    """Per-head attention on a 1/64 grid whose head sums are distinct (``4 perm + r``, ``r < 4``): head sum and head
    mean rank the patches the same, exactly, without ties."""
    rows = torch.randint(0, 4, (heads, patches), generator=generator).double()
    rows[0] = 4 * torch.randperm(patches, generator=generator).double()
    return (rows / 64 / patches).float()


def crop_inputs(crops, patches, dim, generator, heads=2):
    """Per crop the states ``[1 + P, D]``, the select layer's keys per head ``[1 + P, H, d]`` and the per-head
    [CLS] rows ``[H, P]`` (all with the [CLS] token first)."""
    hidden = torch.randn(crops, 1 + patches, dim, generator=generator)
    keys = torch.randn(crops, 1 + patches, heads, dim + 3, generator=generator)
    rows = torch.stack([gapped_rows(heads, patches, generator) for _ in range(crops)])  # [crops, H, P]
    return hidden, keys, rows


def check_against_port(result, positions, hidden, keys, rows, budget, contextual):
    """``result`` for an item whose crop ``c`` patch ``p`` is token ``positions[c, p]``; ``keys [crops, 1 + P, H,
    d]``, head-averaged as the official ``CLIPAttention_forward`` returns them (``raw_key_states.mean(1)``)."""
    kept, outputs = result.kept.tolist(), {}
    for crop in range(hidden.shape[0]):
        dom, targets, tokens, remaining, slot = official_visionzip(
            hidden[crop], keys[crop].mean(-2), rows[crop], budget - contextual, contextual
        )
        for p in dom.tolist():
            outputs[int(positions[crop, p])] = hidden[crop, 1 + p]
        for t, token in zip(targets.tolist(), tokens, strict=True):
            outputs[int(positions[crop, t])] = token
        # every remaining patch joins its target's output token
        for p, s in zip(remaining.tolist(), slot.tolist(), strict=True):
            rep = int(positions[crop, targets[s]])
            assert int(result.kept[result.sources[int(positions[crop, p])]]) == rep
    assert kept == sorted(outputs)
    expected = torch.stack([outputs[k] for k in kept])
    torch.testing.assert_close(result.tokens, expected, rtol=1e-6, atol=1e-6)


def select(method, features, crops, patches, rows, keys, lengths):
    """``select_batch`` with the vision stage's signals built by hand (``rows [B][crops, H, P]``, ``keys
    [B][crops, P, H, d]``)."""
    batch, width = features.shape[:2]
    scores = torch.zeros(batch, width)
    for b in range(batch):
        made = crops[b] >= 0
        mean = rows[b].mean(1)  # head mean, what the integration hands over
        scores[b, made] = mean[crops[b, made], patches[b, made]]
    return method.select_batch(
        features,
        [None] * batch,
        lengths,
        attention={LAYER: scores},
        crops=crops,
        patches=patches,
        crop_attention={LAYER: [r.mean(1) for r in rows]},
        crop_keys={LAYER: keys},
        attention_kind="cls",
    )


@pytest.mark.parametrize(("patches", "budget"), [(576, 64), (576, 128), (576, 192), (37, 10), (20, 19)])
def test_official_one_crop_matches_the_port(patches, budget):
    generator = torch.Generator().manual_seed(patches + budget)
    items = 3
    hidden, keys, rows = crop_inputs(items, patches, 16, generator)
    method = VisionZip(budget=budget, official=True)
    dominant, contextual = method.split(budget)
    if budget in (64, 128, 192):
        assert (dominant, contextual) == {64: (54, 10), 128: (108, 20), 192: (162, 30)}[budget]
    features = hidden[:, 1:]
    crops = torch.zeros(items, patches, dtype=torch.int64)
    positions = torch.arange(patches).expand(items, patches)
    results = select(method, features, crops, positions, [r[None] for r in rows], keys[:, None, 1:], None)
    for b, result in enumerate(results):
        assert isinstance(result, MergedTokens)
        assert result.kept.numel() == budget - 1  # the [CLS] state has no row
        check_against_port(
            result, positions[b : b + 1], hidden[b : b + 1], keys[b : b + 1], rows[b : b + 1], budget, contextual
        )


def test_official_per_crop_on_llava_next_like_items():
    """Three crops, their tokens interleaved with newlines (dropped, as the official code adds none)."""
    generator = torch.Generator().manual_seed(5)
    crops_n, patches, budget = 3, 30, 12
    hidden, keys, rows = crop_inputs(crops_n, patches, 8, generator)
    # token layout: crop 0 patches, then crops 1 and 2 interleaved in rows of 5 with a newline after each row
    crop_of, patch_of = [0] * patches, list(range(patches))
    for r in range(patches // 5):
        for crop in (1, 2):
            crop_of += [crop] * 5
            patch_of += list(range(5 * r, 5 * r + 5))
        crop_of.append(-1)
        patch_of.append(-1)
    crops, where = torch.tensor([crop_of]), torch.tensor([patch_of])
    n = crops.shape[1]
    positions = torch.full((crops_n, patches), -1, dtype=torch.int64)
    made = crops[0] >= 0
    positions[crops[0, made], where[0, made]] = made.nonzero()[:, 0]
    features = torch.zeros(1, n, 8)
    features[0, made] = hidden[crops[0, made], 1 + where[0, made]]
    method = VisionZip(budget=budget, official=True)
    (result,) = select(method, features, crops, where, [rows], [keys[:, 1:]], None)
    assert result.kept.numel() == crops_n * (budget - 1)
    assert bool((result.sources[~made] == -1).all())  # newlines dropped
    check_against_port(result, positions, hidden, keys, rows, budget, method.split(budget)[1])


def test_official_errors():
    generator = torch.Generator().manual_seed(0)
    hidden, keys, rows = crop_inputs(1, 12, 4, generator)
    crops, where = torch.zeros(1, 12, dtype=torch.int64), torch.arange(12)[None]
    features = hidden[:, 1:]
    with pytest.raises(ValueError, match="every patch of every crop"):  # a patch without a token (unpadding)
        select(
            VisionZip(budget=6, official=True),
            features[:, :11],
            crops[:, :11],
            where[:, :11],
            [rows],
            [keys[:, 1:]],
            None,
        )
    with pytest.raises(ValueError, match="CLIP towers"):
        VisionZip(budget=6, official=True).select_batch(
            features, [None], attention={LAYER: rows.mean(1)}, attention_kind="received"
        )
    with pytest.raises(ValueError, match="no contextual"):
        select(
            VisionZip(budget=6, contextual_ratio=0.0, official=True),
            features,
            crops,
            where,
            [rows],
            [keys[:, 1:]],
            None,
        )
    with pytest.raises(ValueError, match=r"include_target"):
        VisionZip(budget=6, official=True, include_target=True)


# --- default mode --------------------------------------------------------------------------------------------------


def test_default_one_crop_is_the_port_with_one_more_dominant_token():
    """On one crop the default mode is the official steps with ``T - C`` dominant patches (no [CLS] state) and the
    similarity on the tokens themselves."""
    generator = torch.Generator().manual_seed(2)
    hidden, _, rows = crop_inputs(2, 50, 8, generator)
    budget = 16
    method = VisionZip(budget=budget)
    dominant, contextual = method.split(budget)
    features = hidden[:, 1:]
    results = method.select_batch(features, [None, None], attention={LAYER: rows.mean(1)})
    for b, result in enumerate(results):
        assert result.kept.numel() == budget
        positions = torch.arange(50)[None]
        check_against_port(
            result, positions, hidden[b : b + 1], hidden[b : b + 1, :, None], rows[b : b + 1], budget + 1, contextual
        )


def test_default_weights_budgets_and_newlines():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 23, 6, generator=generator)
    crops = torch.tensor([[0] * 10 + [1] * 10 + [-1] * 3])
    scores = torch.rand(1, 23, generator=generator)
    (result,) = VisionZip(budget=11).select_batch(features, [None], attention={LAYER: scores}, crops=crops)
    assert result.kept.numel() == 11
    assert set(range(20, 23)) <= set(result.kept.tolist())  # newlines kept first, as themselves
    sums = torch.zeros(11).index_add_(0, result.sources, result.weights)
    torch.testing.assert_close(sums, torch.ones(11))  # every output token's weights sum to 1
    assert bool((result.sources >= 0).all())  # nothing dropped when C > 0
    # a merged token is twice the weighted mean of its sources (target + mean of members)
    for slot in range(11):
        members = (result.sources == slot).nonzero()[:, 0]
        weighted = (result.weights[members, None] * features[0, members]).sum(0)
        scale = 2.0 if members.numel() > 1 else 1.0
        torch.testing.assert_close(result.tokens[slot], scale * weighted, rtol=1e-5, atol=1e-6)
    # the plain mean with include_target
    (plain,) = VisionZip(budget=11, include_target=True).select_batch(
        features, [None], attention={LAYER: scores}, crops=crops
    )
    for slot in range(11):
        members = (plain.sources == slot).nonzero()[:, 0]
        torch.testing.assert_close(plain.tokens[slot], features[0, members].mean(0), rtol=1e-5, atol=1e-6)


def test_batch_equals_items_one_by_one():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(3, 40, 5, generator=generator)
    scores = torch.rand(3, 40, generator=generator)
    lengths = [40, 25, 7]
    method = VisionZip(keep_ratio=0.3)
    both = method.select_batch(features, [None] * 3, lengths, attention={LAYER: scores})
    for b, n in enumerate(lengths):
        (one,) = method.select_batch(features[b : b + 1, :n], [None], attention={LAYER: scores[b : b + 1, :n]})
        assert torch.equal(one.kept, both[b].kept) and torch.equal(one.sources, both[b].sources)
        assert torch.equal(one.tokens, both[b].tokens) and torch.equal(one.weights, both[b].weights)
        assert one.kept.numel() == round(0.3 * n + 1e-9) or one.kept.numel() == int(0.3 * n + 0.5)


def test_each_crop_of_a_padded_batch_equals_the_crop_alone():
    """Per-crop merging (``_vision.merge_per_crop``): items of crops of different sizes (one not contiguous) and
    newlines in one padded batch give, crop by crop, what the crop gives alone with its share of the budget."""
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, 30, 5, generator=generator)
    scores = torch.rand(2, 30, generator=generator)
    crops = torch.tensor([[0] * 12 + [-1] * 2 + [1] * 16, [1] * 3 + [0] * 6 + [-1] + [1] * 2 + [0] * 4 + [7] * 14])
    lengths = [30, 16]
    # budget 13 less the newlines, split by crop size (largest remainder): 11 over 12 / 16, 12 over 10 / 5; every
    # share >= 4 has a contextual token
    shares = [{0: 5, 1: 6}, {0: 8, 1: 4}]
    for include_target in (False, True):
        results = VisionZip(budget=13, include_target=include_target).select_batch(
            features, [None, None], lengths, attention={LAYER: scores}, crops=crops
        )
        for b, n in enumerate(lengths):
            check_crops_alone(
                results[b],
                features[b, :n],
                scores[b, :n],
                crops[b, :n],
                shares[b],
                lambda share: VisionZip(budget=share, include_target=include_target),  # noqa: B023
                layer=LAYER,
            )
            assert bool((results[b].weights < 1).any())  # contextual tokens merged something


def test_edge_cases():
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(1, 9, 4, generator=generator)
    scores = torch.rand(1, 9, generator=generator)
    # budget >= n keeps every token as itself (bit-identical)
    for method in (VisionZip(budget=50), VisionZip(keep_ratio=1.0)):
        (result,) = method.select_batch(features, [None], attention={LAYER: scores})
        assert result.kept.tolist() == list(range(9)) and torch.equal(result.tokens, features[0])
    # tiny items: one and two tokens
    for n in (1, 2):
        (result,) = VisionZip(budget=1).select_batch(features[:, :n], [None], attention={LAYER: scores[:, :n]})
        assert result.kept.numel() == 1
    # ties: constant attention picks the lowest indices as dominant tokens
    (result,) = VisionZip(budget=4, contextual_ratio=0.25).select_batch(
        features, [None], attention={LAYER: torch.ones(1, 9)}
    )
    assert result.kept.tolist()[:3] == [0, 1, 2] and result.kept.numel() == 4
    # no contextual share: the rest is dropped
    (result,) = VisionZip(budget=3, contextual_ratio=0.0).select_batch(features, [None], attention={LAYER: scores})
    assert result.kept.numel() == 3 and int((result.sources == -1).sum()) == 6


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        VisionZip()
    with pytest.raises(ValueError, match="exactly one"):
        VisionZip(budget=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match="contextual_ratio"):
        VisionZip(budget=4, contextual_ratio=1.5)
    with pytest.raises(ValueError, match="contextual_ratio"):
        VisionZip(budget=4, contextual_ratio=-0.1)
    with pytest.raises(TypeError, match="layer"):
        VisionZip(budget=4, layer=1.0)
    with pytest.raises(ValueError, match="budget"):
        VisionZip(budget=0)
    with pytest.raises(ValueError, match=r"attention=\{-2"):
        VisionZip(budget=4).select_batch(torch.randn(1, 5, 3), [None])


def test_presets():
    assert preset("visionzip_64").split(64) == (54, 10)
    assert preset("visionzip_next_640").size.budget == 640
    assert preset("visionzip_qwen_889").layer == -1


@torch.no_grad()
def test_official_on_a_tiny_llava_matches_the_port_of_the_eager_tower(monkeypatch):
    """End to end: the vision stage hands official=True the select layer's [CLS] attention and its keys (``k_proj``
    output, head-averaged by the method) of the eager tower, the model's tower keeps SDPA, and the merged tokens
    take their representatives' rows."""
    pytest.importorskip("transformers")
    import copy

    from mrprune.integrations import patched
    from mrprune.integrations.hf.adapters.clip import cls_layers
    from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava
    from tests.tiny_models import forbid_eager_clip_attention

    model = tiny_llava()
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    budget = 8
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention = cls_layers(eager.model.vision_tower)[LAYER].self_attn
    captured = {}
    hook = attention.k_proj.register_forward_hook(lambda module, args, output: captured.update(keys=output))
    for seed in range(20):  # pixels whose top-(T - C - 1) = top-3 [CLS] attention has a gap (no near-ties)
        pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
        out = eager.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        rows = out.attentions[LAYER][:, :, 0, 1:]  # [images, H, P]
        top = rows.sum(1).sort(dim=1, descending=True).values
        if bool(((top[:, 2] - top[:, 3]) > 1e-4 * top[:, 0]).all()):
            break
    else:
        pytest.fail("no seed gives gapped attention")
    hook.remove()
    keys = captured["keys"].view(3, 17, attention.num_heads, -1)  # [images, 1 + P, H, d], [CLS] first
    features = model.model.get_image_features(pixels, return_dict=True).pooler_output
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    forbid_eager_clip_attention(monkeypatch)  # the patched run keeps SDPA: no attention weights materialised
    with patched(model, VisionZip(budget=budget, contextual_ratio=0.5, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    merged = [m for record in handle.last for m in record.merged]
    assert [record.tokens_after for record in handle.last] == [2 * (budget - 1), budget - 1]
    for i, result in enumerate(merged):
        tokens = features[i].reshape(16, -1)
        hidden = torch.cat([torch.zeros(1, tokens.shape[1]), tokens])[None]
        check_against_port(result, torch.arange(16)[None], hidden, keys[i : i + 1], rows[i : i + 1], budget, 4)


@torch.no_grad()
def test_official_on_a_tiny_llava_next_matches_the_port_per_crop(monkeypatch):
    """End to end on LLaVA-NeXT: a (56, 56) image (the base view and 2 x 2 tiles, unpadding leaves it whole) is
    merged crop by crop as the port does on each crop with the eager tower's layer -2 [CLS] rows and keys; the
    newlines are dropped."""
    pytest.importorskip("transformers")
    import copy

    from mrprune.integrations import patched
    from mrprune.integrations.hf.adapters.clip import cls_layers
    from mrprune.integrations.hf.adapters.llava_next import token_sources
    from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava_next
    from mrprune.layouts import LlavaNextLayout
    from tests.tiny_models import forbid_eager_clip_attention

    model = tiny_llava_next()
    sizes = torch.tensor([[56, 56]])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention = cls_layers(eager.model.vision_tower)[LAYER].self_attn
    captured = {}
    hook = attention.k_proj.register_forward_hook(lambda module, args, output: captured.update(keys=output))
    for seed in range(20):  # every crop's top-3 head-summed [CLS] attention has a gap
        pixels = torch.randn(1, 5, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
        out = eager.model.vision_tower(pixels[0], output_attentions=True)
        rows = out.attentions[LAYER][:, :, 0, 1:]  # [crops, H, P]
        top = rows.sum(1).sort(dim=1, descending=True).values
        if bool(((top[:, 2] - top[:, 3]) > 1e-4 * top[:, 0]).all()):
            break
    else:
        pytest.fail("no seed gives gapped attention")
    hook.remove()
    keys = captured["keys"].view(5, 17, attention.num_heads, -1)
    (features,) = model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output  # [88, D]
    layout = LlavaNextLayout.from_image_size((56, 56), model.config.image_grid_pinpoints, crop_size=28, patch_size=7)
    sources = token_sources(layout, (56, 56), model.config.image_grid_pinpoints, 28)
    made = sources[:, 0] >= 0
    positions = torch.full((5, 16), -1, dtype=torch.int64)
    positions[sources[made, 0], sources[made, 1]] = made.nonzero()[:, 0]
    assert bool((positions >= 0).all())  # unpadding left the image whole
    hidden = torch.zeros(5, 17, features.shape[1])
    hidden[:, 1:] = features[positions]
    input_ids, mask = left_pad([[1, 5, *[IMAGE_TOKEN] * features.shape[0], 7]])
    budget = 8
    forbid_eager_clip_attention(monkeypatch)
    with patched(model, VisionZip(budget=budget, contextual_ratio=0.5, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    (result,) = handle.last[0].merged
    assert result.kept.numel() == 5 * (budget - 1)
    assert bool((result.sources[~made] == -1).all())  # newlines dropped
    check_against_port(result, positions, hidden, keys, rows, budget, 4)
