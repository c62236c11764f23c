"""The vision-stage merging methods (VisionZip, PruMerge+) on every tiny model (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL):
merge-nothing is bit-identical to the unpatched model, a batch of 2 equals its prompts one by one, generate after a
merged prefill equals a hand-written decoding loop over an oracle prompt (the merged tokens written into
``inputs_embeds`` at their representatives' rows, the other visual rows masked out), ``remove()`` restores."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patch, patched  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    greedy_decode,
    kept_mask,
    mask_positions,
)
from mrprune.methods import MergedTokens, PruMerge, VisionZip  # noqa: E402
from tests.test_integration_stages import CASES, single_prompt  # noqa: E402

ATOL = 1e-5
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)

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


def oracle_embeds(model, input_ids, records):
    """The prompt's embeddings with every item's merged tokens at its representatives' rows."""
    embeds = model.get_input_embeddings()(input_ids).clone()
    for b, record in enumerate(records):
        ids = input_ids[b]
        cells = torch.cat([(ids == IMAGE_TOKEN).nonzero()[:, 0], (ids == VIDEO_TOKEN).nonzero()[:, 0]])
        sizes = [m.sources.numel() for m in record.merged]
        for item, merged in zip(cells.split(sizes), record.merged, strict=True):
            embeds[b, item[merged.kept]] = merged.tokens.to(embeds.dtype)
    return embeds


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
    before = _hooks_and_attributes(model)
    reference = model(**inputs).logits
    handle = patch(model, METHODS[method][1]())
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    handle.remove()
    assert _hooks_and_attributes(model) == before
    assert torch.equal(model(**inputs).logits, reference)
