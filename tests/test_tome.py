"""ToMe: the per-block merge against a port of the official one (facebookresearch/ToMe ``tome/merge.py``:
``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``), the whole tower against ports of LightCompress' LLaVA
block (``official=True``: sizes reset per block, no proportional attention) and of ToMe's timm block (default: sizes
carried, ``log(size)`` added to the logits), merge-nothing bit-identical to the unpatched model, a batch equal to its
prompts, decoding after a merged prefill, ``remove()``, schedules and errors."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patch, patched  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    IMAGE_TOKEN,
    _text_config,
    greedy_decode,
    kept_mask,
    left_pad,
    mask_positions,
    tiny_llava_next,
)
from mrprune.methods import ToMe, preset  # noqa: E402
from mrprune.methods.tome import merge_schedule  # noqa: E402

ATOL = 1e-5
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def deep_llava(seed: int = 0):
    """A tiny LLaVA-1.5 whose CLIP tower has 4 layers (16 patches + [CLS]): 3 blocks up to the select layer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=7
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(2)),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def model():
    return deep_llava()


@pytest.fixture(scope="module")
def inputs():
    image = [IMAGE_TOKEN] * 16
    input_ids, attention_mask = left_pad([[1, 5, 6, *image, 7, 8, *image, 9, 10], [1, 12, *image, 13, 14, 15]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)


# --- the port (the official steps, in this test's own words) ------------------------------------------------------


def port_matching(metric, r):
    """ToMe's ``bipartite_soft_matching`` with a class token: a function merging ``[B, T, C]`` tensors."""
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)
    if r <= 0:
        return lambda x, mode: x
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)[..., None]
    stay, gone = order[:, r:].sort(dim=1).values, order[:, :r]
    into = partner[..., None].gather(1, gone)

    def merge(x, mode):
        evens, odds = x[:, ::2], x[:, 1::2]
        n, half, c = evens.shape
        kept = evens.gather(1, stay.expand(n, half - r, c))
        moved = evens.gather(1, gone.expand(n, r, c))
        odds = odds.scatter_reduce(1, into.expand(n, r, c), moved, reduce=mode)
        return torch.cat([kept, odds], dim=1)

    return merge


def port_wavg(merge, x, size):
    """``merge_wavg``: size-weighted mean (size 1 where ``None``), new sizes."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def port_source(merge, x, source):
    """``merge_source``: which original tokens each row holds, ``[B, T, N0]`` 0/1."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None].expand(n, t, t)
    return merge(source, "amax")


def port_tower(model, pixels, r_per_block, official):
    """The select layer's merged tokens through the projector ``[B, K, D]`` (official row order) and their source
    ``[B, K, 1 + P]``: LightCompress' CLIP block (official) or ToMe's timm block (sizes, proportional attention)."""
    tower = model.model.vision_tower
    x = tower.pre_layrnorm(tower.embeddings(pixels))
    size = source = None
    layers = tower.encoder.layers
    blocks = len(layers) + model.config.vision_feature_layer + 1
    for index, layer in enumerate(layers[:blocks]):
        attention = layer.self_attn
        h = layer.layer_norm1(x)
        b, t, _ = h.shape

        def heads(projection, h=h, b=b, t=t, attention=attention):
            return projection(h).view(b, t, attention.num_heads, -1).transpose(1, 2)

        q, k, v = heads(attention.q_proj), heads(attention.k_proj), heads(attention.v_proj)
        logits = (q @ k.transpose(-1, -2)) * attention.scale
        if not official and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + attention.out_proj(out)
        merge = port_matching(k.mean(1), r_per_block[index])
        source = port_source(merge, x, source)
        x, new_size = port_wavg(merge, x, None if official else size)
        size = None if official else new_size
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.model.multi_modal_projector(x[:, 1:]), source[:, 1:]


def assert_same_merge(merged, tokens, source):
    """Our ``MergedTokens`` of one image against the port's tokens ``[K, D]`` and 0/1 source ``[K, 1 + P]``."""
    assert merged.kept.numel() == tokens.shape[0]
    for j in range(tokens.shape[0]):
        members = source[j, 1:].nonzero()[:, 0]
        out = int(merged.sources[members[0]])
        assert (merged.sources == out).nonzero()[:, 0].tolist() == members.tolist()
        assert int(merged.kept[out]) == int(members[0])  # the group's first token is its representative
        torch.testing.assert_close(merged.tokens[out], tokens[j], rtol=0, atol=ATOL)
    torch.testing.assert_close(merged.weights, 1 / merged.sizes[merged.sources].float())


# --- the per-block merge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("official", [True, False], ids=["official", "sizes"])
def test_merge_block_matches_the_port(official):
    generator = torch.Generator().manual_seed(0)
    crops, tokens, dim, heads = 3, 17, 8, 2
    method = ToMe(r=5, official=official)
    hidden = torch.randn(crops, tokens, dim, generator=generator)
    state = method.start(hidden, [[5, 4]] * crops)
    size = source = None
    x = hidden
    for block, r in enumerate([5, 4]):
        keys = torch.randn(crops, x.shape[1], heads, 4, generator=generator)
        x = x + 0.1 * torch.randn(x.shape, generator=generator)
        method.merge_block(state, block, x, keys)
        merge = port_matching(keys.mean(2), r)
        source = port_source(merge, x, source)
        x, new_size = port_wavg(merge, x, None if official else size)
        size = None if official else new_size
        torch.testing.assert_close(state.tokens, x, rtol=0, atol=1e-6)
        rows = source.argmax(1)  # [crops, N0]: the row holding each original token
        assert torch.equal(state.source, rows)
        expected = torch.ones_like(x[..., 0]) if official else size[..., 0]
        torch.testing.assert_close(state.sizes, expected)
        assert state.tokens.shape[1] == tokens - sum([5, 4][: block + 1])
    unmerged = method.unmerge(state, state.tokens)
    assert torch.equal(unmerged, state.tokens.gather(1, rows[..., None].expand(-1, -1, dim)))


def test_merge_schedule():
    assert merge_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    assert sum(merge_schedule(576, 64, 23)) == 512
    # the 50 % cap binds: 16 patches to 2 in 3 blocks needs the front-loaded 8, 4, 2
    assert merge_schedule(16, 2, 3) == [8, 4, 2]
    assert merge_schedule(16, 16, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="out of reach"):
        merge_schedule(16, 1, 3)
    method = ToMe(budget=10)
    assert method.schedule(16, 3, [[16], [16]], [0, 0]) == [[2, 2, 2]] * 2
    assert ToMe(r=4, r_step=-1.5).schedule(16, 4, [[16]], [0]) == [[4, 2, 1, 0]]
    assert ToMe(r=[3, 1]).schedule(16, 3, [[16]], [0]) == [[3, 1, 0]]
    # LLaVA-NeXT: a budget per image (28 tokens: 6 = 10 - 4 newlines), split over the crops by size (4 and 2); a
    # crop without tokens in the image merges nothing, a crop given no share as much as its blocks reach, a crop
    # keeping all its tokens nothing
    assert ToMe(budget=10).schedule(16, 3, [[16, 8, 0]], [4]) == [[4, 4, 4], [8, 4, 2], [0, 0, 0]]
    assert ToMe(budget=6).schedule(16, 3, [[16, 1]], [4]) == [[8, 4, 2]] * 2
    assert ToMe(keep_ratio=1.0).schedule(16, 3, [[16, 8]], [4]) == [[0, 0, 0]] * 2


# --- the tower ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_official_llava_matches_lightcompress_port(model, inputs):
    r = [3, 2, 2]
    with patched(model, ToMe(r=r, official=True)) as handle:
        model(**inputs)
    merged = [m for record in handle.last for m in record.merged]
    tokens, source = port_tower(model, inputs["pixel_values"], r, official=True)
    assert tokens.shape[1] == 16 - sum(r)
    for i, ours in enumerate(merged):
        assert_same_merge(ours, tokens[i], source[i])


@torch.no_grad()
def test_default_llava_matches_timm_port_with_proportional_attention(model, inputs):
    r = [4, 3, 2]
    with patched(model, ToMe(r=r)) as handle:
        model(**inputs)
    merged = [m for record in handle.last for m in record.merged]
    tokens, source = port_tower(model, inputs["pixel_values"], r, official=False)
    for i, ours in enumerate(merged):
        assert_same_merge(ours, tokens[i], source[i])
    # the bias matters here: the port without it (sizes still carried) gives other tokens
    plain = ToMe(r=r, proportional_attention=False)
    with patched(model, plain) as handle:
        model(**inputs)
    unbiased = [m for record in handle.last for m in record.merged]
    assert any(
        a.kept.shape != b.kept.shape or (a.tokens - b.tokens).abs().max() > 1e-3
        for a, b in zip(merged, unbiased, strict=True)
    )


@torch.no_grad()
def test_crops_on_different_schedules_equal_each_alone(model):
    """Crops merged to different lengths share one padded batch: the padding is masked out of every attention."""
    from mrprune.integrations.hf.adapters.clip import merge_blocks

    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    schedules = [[4, 3, 2, 0], [1, 1, 1, 0]]
    method = ToMe(r=1)
    with merge_blocks(tower, method, schedules) as source:
        both = tower(pixels, output_hidden_states=True).hidden_states[-2]
        rows = source()
    for c, schedule in enumerate(schedules):
        with merge_blocks(tower, method, [schedule]) as source:
            one = tower(pixels[c : c + 1], output_hidden_states=True).hidden_states[-2]
            assert torch.equal(source()[0], rows[c])
        torch.testing.assert_close(one[0], both[c], rtol=0, atol=ATOL)


@torch.no_grad()
def test_budget_is_the_token_count_on_llava(model, inputs):
    # r = 16 is capped at half of each block's tokens: 16 -> 8 -> 4 -> 2 patches in the 3 blocks
    for method, kept in ((ToMe(budget=7), 7), (ToMe(keep_ratio=0.5), 8), (ToMe(r=16), 2)):
        with patched(model, method) as handle:
            model(**inputs)
        assert [m.kept.numel() for r in handle.last for m in r.merged] == [kept] * 3


@torch.no_grad()
def test_merge_nothing_is_bit_identical(model, inputs):
    next_model = tiny_llava_next()
    sizes = torch.tensor([[28, 40], [56, 56]])
    pixels = torch.randn(2, 5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    counts = [len(f) for f in next_model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    ids, mask = left_pad([[1, 5, *[IMAGE_TOKEN] * counts[0], 7], [1, *[IMAGE_TOKEN] * counts[1], 8, 9]])
    cases = [
        (model, inputs),
        (next_model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)),
    ]
    for net, given in cases:
        logits = net(**given).logits
        generated = net.generate(**given, max_new_tokens=3, **GREEDY)
        for method in (ToMe(r=0), ToMe(keep_ratio=1.0), ToMe(r=0, official=True)):
            with patched(net, method) as handle:
                assert torch.equal(net(**given).logits, logits)
                again = net.generate(**given, max_new_tokens=3, **GREEDY)
            assert [r.tokens_after for r in handle.last] == [r.tokens_before for r in handle.last]
            assert torch.equal(again.sequences, generated.sequences)
            assert all(torch.equal(a, b) for a, b in zip(again.logits, generated.logits, strict=True))


def single_prompt(inputs, b, visual):
    real = inputs["attention_mask"][b].bool()
    return dict(input_ids=inputs["input_ids"][b][real][None], **visual)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@torch.no_grad()
def test_batch_equals_single_prompts(model, inputs, family):
    if family == "llava":
        net, method = model, ToMe(r=[3, 2, 2])
        singles = [dict(pixel_values=inputs["pixel_values"][:2]), dict(pixel_values=inputs["pixel_values"][2:])]
    else:  # budgets per image: crops merge on different schedules, padded side by side with a -inf bias
        net, method = tiny_llava_next(), ToMe(budget=40)
        net.config.vision_feature_layer = -1  # both blocks merge
        sizes = torch.tensor([[28, 40], [56, 56], [40, 28]])
        pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        counts = [len(f) for f in net.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
        ids, mask = left_pad(
            [
                [1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 8],
                [1, 12, *[IMAGE_TOKEN] * counts[2], 14],
            ]
        )
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
        singles = [
            dict(pixel_values=pixels[:2], image_sizes=sizes[:2]),
            dict(pixel_values=pixels[2:], image_sizes=sizes[2:]),
        ]
    steps = 3
    with patched(net, method) as handle:
        both = net.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        if family == "llava_next":  # at most the budget per image
            assert all(k.numel() <= 40 for r in records for k in r.kept)
        for b, visual in enumerate(singles):
            one = net.generate(**single_prompt(inputs, b, visual), max_new_tokens=steps, **GREEDY)
            for ours, theirs in zip(handle.last[0].merged, records[b].merged, strict=True):
                assert torch.equal(ours.kept, theirs.kept) and torch.equal(ours.sources, theirs.sources)
                torch.testing.assert_close(ours.tokens, theirs.tokens, rtol=0, atol=ATOL)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)


@torch.no_grad()
def test_generate_after_a_merged_prefill_equals_a_decode_loop(model, inputs):
    steps = 4
    with patched(model, ToMe(r=[3, 2, 2])) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    records = handle.last
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # the oracle: the unpatched model on embeddings with each merged token at its representative's cell, the other
    # image cells masked out, every token at its unpruned position
    embeds = model.get_input_embeddings()(input_ids.masked_fill(input_ids == IMAGE_TOKEN, 0))
    merged = [m for record in records for m in record.merged]
    cells = (input_ids == IMAGE_TOKEN).nonzero()
    for item, result in zip(cells.split(16), merged, strict=True):
        embeds[item[result.kept, 0], item[result.kept, 1]] = result.tokens.to(embeds.dtype)
    positions = mask_positions(mask)
    tokens, scores = greedy_decode(
        model,
        steps,
        attention_mask=kept_mask(records, mask),
        position_ids=positions,
        next_positions=positions[:, -1] + 1,
        inputs_embeds=embeds,
    )
    assert torch.equal(generated.sequences[:, input_ids.shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def _state(model):
    modules = {  # patch() itself replaces the top model's forward while active
        name: (list(m._forward_hooks), list(m._forward_pre_hooks), name == "" or "forward" in m.__dict__)
        for name, m in model.named_modules()
    }
    return modules, set(model.__dict__), set(model.model.__dict__)


@torch.no_grad()
def test_remove_restores_and_no_block_patch_outlives_a_call(model, inputs):
    reference = model(**inputs).logits  # (transformers installs its output-recording hooks on a first call)
    before = _state(model)
    handle = patch(model, ToMe(r=[3, 2, 2]))
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    assert _state(model)[0] == before[0]  # the block wrappers and key hooks live only while the tower runs
    with pytest.raises(ValueError, match="out of reach"):  # raised while encoding: still nothing left behind
        handle.pruner.size, handle.pruner.r = mrprune.methods._vision.Budget("ToMe", 1, None), None
        model(**inputs)
    assert _state(model)[0] == before[0]
    handle.remove()
    assert _state(model) == before
    assert torch.equal(model(**inputs).logits, reference)


def test_presets_and_errors(model, inputs):
    assert preset("tome_192").size.budget == 192 and preset("tome_next_320").size.budget == 320
    official = preset("tome_r16")
    assert official.r == 16 and official.official and not official.proportional_attention
    with pytest.raises(ValueError, match="exactly one of r, budget and keep_ratio"):
        ToMe()
    with pytest.raises(ValueError, match="exactly one of r, budget and keep_ratio"):
        ToMe(r=2, budget=3)
    with pytest.raises(ValueError, match="official=True"):
        ToMe(budget=64, official=True)
    with pytest.raises(TypeError, match="r must be"):
        ToMe(r=1.5)
    with pytest.raises(ValueError, match="r_step"):
        ToMe(r=[1, 2], r_step=1.0)
    with pytest.raises(TypeError, match="official"):
        ToMe(r=1, official="yes")
    with pytest.raises(ValueError, match="needs groups"):
        ToMe(r=1).select_batch(torch.randn(1, 4, 2), [None])
    # proportional attention is a float bias: a tower on flex / FlashAttention-2 is refused, not silently unbiased
    tower_config = model.model.vision_tower.config
    saved = tower_config._attn_implementation
    try:
        tower_config._attn_implementation = "flex_attention"
        with patched(model, ToMe(r=2)), pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
            model(**inputs)
    finally:
        tower_config._attn_implementation = saved
    assert "forward" not in model.model.vision_tower.encoder.layers[0].__dict__
