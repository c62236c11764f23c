"""The vision-stage merging methods (VisionZip, PruMerge+) on every tiny model (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL):
merge-nothing is bit-identical to the unpatched model, a batch of 2 equals its prompts one by one, generate after a
merged prefill equals a hand-written decoding loop over an oracle prompt (the merged tokens written into
``inputs_embeds`` at their representatives' rows, the other visual rows masked out), ``remove()`` restores."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patch, patched  # noqa: E402
from mrprune.integrations.hf.adapters.clip import cls_layers  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    greedy_decode,
    kept_mask,
    mask_positions,
)
from mrprune.methods import FasterVLM, MergedTokens, PruMerge, VisionZip  # noqa: E402
from mrprune.methods.stages import Need  # noqa: E402
from tests.tiny_models import CASES, GREEDY, forbid_eager_clip_attention, oracle_embeds, single_prompt  # noqa: E402

ATOL = 1e-5

#: merging methods, built (identity, merging)
METHODS = {
    "visionzip": (lambda: VisionZip(keep_ratio=1.0), lambda: VisionZip(keep_ratio=0.4, contextual_ratio=0.3)),
    "prumerge_plus": (lambda: PruMerge(keep_ratio=1.0, neighbors=0), lambda: PruMerge(neighbors=4)),
    "prumerge_budget": (
        lambda: PruMerge(keep_ratio=1.0, plus=False, neighbors=0),
        lambda: PruMerge(keep_ratio=0.4, plus=False, neighbors=3),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, *CASES[request.param]()


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_merge_nothing_equals_unpatched(case, method):
    _, model, inputs, _ = case
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    with patched(model, METHODS[method][0]()) as handle:
        assert torch.equal(model(**inputs).logits, logits)
        again = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    assert [r.tokens_after for r in handle.last] == [r.tokens_before for r in handle.last]
    assert all(isinstance(m, MergedTokens) for r in handle.last for m in r.merged)
    assert torch.equal(again.sequences, generated.sequences)
    for ours, theirs in zip(again.logits, generated.logits, strict=True):
        assert torch.equal(ours, theirs)


def _same_merge(a, b):
    assert torch.equal(a.kept, b.kept) and torch.equal(a.sources, b.sources)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=ATOL)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_batch_equals_single_prompts(case, method):
    _, model, inputs, singles = case
    steps = 3
    with patched(model, METHODS[method][1]()) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        assert sum(r.tokens_after for r in records) < sum(r.tokens_before for r in records)
        for b, visual in enumerate(singles):
            one = model.generate(**single_prompt(inputs, b, visual), max_new_tokens=steps, **GREEDY)
            for x, y in zip(handle.last[0].merged, records[b].merged, strict=True):
                _same_merge(x, y)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["original", "compact"])
@pytest.mark.parametrize("method", ["visionzip", "prumerge_plus"])
@torch.no_grad()
def test_generate_after_a_merged_prefill_equals_a_decode_loop(case, method, mode):
    name, model, inputs, _ = case
    steps = 4
    with patched(model, METHODS[method][1](), position_mode=mode) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    records = handle.last
    mask = inputs["attention_mask"]
    kept = kept_mask(records, mask)
    axes = 3 if name == "qwen2_5_vl" else 1
    if mode == "original":
        if name == "qwen2_5_vl":
            positions = model.model.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                video_grid_thw=inputs["video_grid_thw"],
                attention_mask=mask,
            )[0]
        else:
            positions = mask_positions(mask)
        first = positions[..., -1] + 1
    else:
        positions = mask_positions(kept)
        first = kept.sum(1)
        if axes == 3:
            positions, first = positions.expand(3, -1, -1), first.expand(3, -1)
    tokens, scores = greedy_decode(
        model,
        steps,
        attention_mask=kept,
        position_ids=positions,
        next_positions=first,
        inputs_embeds=oracle_embeds(model, inputs["input_ids"], records),
    )
    length = inputs["input_ids"].shape[1]
    assert torch.equal(generated.sequences[:, length:], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def _hooks_and_attributes(model):
    hooks = {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return hooks, set(model.__dict__), set(model.model.__dict__)


@pytest.mark.parametrize("method", ["visionzip", "prumerge_budget"])
@torch.no_grad()
def test_remove_restores_the_model(case, method):
    _, model, inputs, _ = case
    reference = model(**inputs).logits  # first: transformers installs permanent output-capturing hooks on a first call
    before = _hooks_and_attributes(model)
    handle = patch(model, METHODS[method][1]())
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    handle.remove()
    assert _hooks_and_attributes(model) == before
    assert torch.equal(model(**inputs).logits, reference)


class RecordingKeys(FasterVLM):
    """FasterVLM that reads the keys of two layers and the [CLS] row without a head split, and keeps what the vision
    stage handed it."""

    needs = FasterVLM.needs | {Need.VISION_KEYS}
    attention_heads = "joint"
    key_layers = (0, -1)

    def _select_batch(self, features, layouts, lengths, texts, crop_keys=None, **kwargs):
        self.seen = dict(kwargs, crop_keys=crop_keys)
        return super()._select_batch(features, layouts, lengths, texts, **kwargs)


def _eager_projections(model, crops, layer):
    """An eager copy's ``q_proj`` / ``k_proj`` outputs ``[crops, 1 + P, C]`` at vision ``layer`` on ``crops``."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention = cls_layers(eager.model.vision_tower)[layer].self_attn
    captured = {}
    hooks = [
        attention.q_proj.register_forward_hook(lambda module, args, output: captured.update(q=output)),
        attention.k_proj.register_forward_hook(lambda module, args, output: captured.update(k=output)),
    ]
    eager.model.vision_tower(crops)
    for hook in hooks:
        hook.remove()
    return captured["q"], captured["k"], attention.num_heads


@torch.no_grad()
def test_vision_keys_and_joint_attention_match_the_eager_tower(case, monkeypatch):
    """``Need.VISION_KEYS`` per crop (LLaVA-1.5's one, every LLaVA-NeXT crop, including the tiles' patches
    unpadding drops) equals the eager tower's ``k_proj`` output split into heads, [CLS] dropped; ``attention_heads =
    "joint"`` gives one softmax of the full ``q_cls . k / sqrt(C)``; the tower keeps SDPA; Qwen2.5-VL refuses the
    joint row and hands ``crop_keys=None``."""
    name, model, inputs, _ = case
    if name == "qwen2_5_vl":
        with pytest.raises(ValueError, match="without a head split"):
            patch(model, RecordingKeys(keep_ratio=0.5, layer=0))
        method = RecordingKeys(keep_ratio=0.5, layer=0)
        method.attention_heads = "mean"
        with patched(model, method):
            model(**inputs)
        assert method.seen["crop_keys"] is None
        return
    if name == "llava":
        crops = [inputs["pixel_values"][i : i + 1] for i in range(3)]
    else:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = model.config
        crops = [
            inputs["pixel_values"][i, : image_size_to_num_patches(tuple(s.tolist()), config.image_grid_pinpoints, 28)]
            for i, s in enumerate(inputs["image_sizes"])
        ]
    oracle = {layer: [_eager_projections(model, c, layer) for c in crops] for layer in (0, -1)}
    method = RecordingKeys(keep_ratio=0.5, layer=-1)
    with monkeypatch.context() as context:
        forbid_eager_clip_attention(context)
        with patched(model, method):
            model(**inputs)
    seen = method.seen
    assert sorted(seen["crop_keys"]) == [-1, 0]
    for layer in (0, -1):
        for b, (q, k, heads) in enumerate(oracle[layer]):
            keys = seen["crop_keys"][layer][b]
            assert keys.shape == (q.shape[0], q.shape[1] - 1, heads, q.shape[2] // heads)
            torch.testing.assert_close(keys, k[:, 1:].view(keys.shape), rtol=1e-5, atol=1e-6)
            if layer == -1:  # the probed attention layer: the joint row
                row = ((q[:, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)[:, 0, 1:]
                torch.testing.assert_close(seen["crop_attention"][-1][b], row, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "method",
    [lambda: VisionZip(budget=8, contextual_ratio=0.5, official=True), lambda: PruMerge(official=True, neighbors=4)],
    ids=["visionzip_official", "prumerge_official"],
)
@torch.no_grad()
def test_official_modes_remove_restores_the_model(method):
    """The key and joint-attention probes leave no hook behind: after each call and after ``remove()``."""
    model, inputs, _ = CASES["llava"]()
    inputs = dict(inputs, input_ids=inputs["input_ids"][1:], attention_mask=inputs["attention_mask"][1:])
    inputs["pixel_values"] = inputs["pixel_values"][2:]
    reference = model(**inputs).logits  # first call: transformers installs its output-recording hooks
    before = _hooks_and_attributes(model)
    handle = patch(model, method())
    during = _hooks_and_attributes(model)
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    assert _hooks_and_attributes(model) == during  # the probes' hooks live for one encoder call
    handle.remove()
    assert _hooks_and_attributes(model) == before
    assert torch.equal(model(**inputs).logits, reference)
