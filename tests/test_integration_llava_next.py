"""mrprune.patch on LLaVA-NeXT (tiny random model): anyres layouts (base view, high-resolution grid, newlines),
exactness, mask oracle, batching, decoding, ResPrune's base-view CLS seed, pre-encoded features."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    IMAGE_TOKEN,
    greedy_decode,
    kept_mask,
    left_pad,
    mask_positions,
    tiny_llava_next,
)

ATOL = 1e-5
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
SIZES = torch.tensor([[28, 56], [56, 56], [56, 28]])  # prompt 0 has the first two images, prompt 1 the third


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def inputs(model):
    pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the placeholder counts, as the unpatched model packs the images
        counts = [len(f) for f in model.model.get_image_features(pixels, SIZES, return_dict=True).pooler_output]
    assert counts == [52, 88, 56]
    input_ids, attention_mask = left_pad(
        [
            [1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 8, 9],
            [1, 12, 13, *[IMAGE_TOKEN] * counts[2], 14],
        ]
    )
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, image_sizes=SIZES)


def without(inputs, *keys):
    return {k: v for k, v in inputs.items() if k not in keys}


class RecordingMRPruner(mrprune.MRPruner):
    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        self.seen = (features, layouts, lengths)
        return super()._select_batch(features, layouts, lengths, texts, **kwargs)


@pytest.mark.parametrize("pruner", [mrprune.MRPruner(keep_ratio=1.0), mrprune.GPrune(keep_ratio=1.0)], ids=str)
@torch.no_grad()
def test_keep_all_equals_unpatched(model, inputs, pruner):
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    with patched(model, pruner):
        assert torch.equal(model(**inputs).logits, logits)
        ours = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    assert torch.equal(ours.sequences, generated.sequences)
    for a, b in zip(ours.logits, generated.logits, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_pruners_see_the_packed_layout(model, inputs):
    pruner = RecordingMRPruner(keep_ratio=0.3)
    with patched(model, pruner) as handle:
        model(**inputs)
    features, layouts, lengths = pruner.seen
    expected = [
        mrprune.LlavaNextLayout.from_image_size(tuple(s), [[28, 56], [56, 28], [56, 56]], 28, 7) for s in SIZES.tolist()
    ]
    assert layouts == expected
    assert [(layout.rows, layout.cols) for layout in layouts] == [(4, 8), (8, 8), (8, 4)]
    for b, layout in enumerate(layouts):  # newline tokens are exactly the image_newline vector
        newline = (features[b, : lengths[b]] == model.model.image_newline).all(-1).nonzero()[:, 0]
        assert torch.equal(newline, layout.newline_indices)
        kept = torch.cat(handle.last[0].kept + handle.last[1].kept)
        assert kept.numel() == sum(r.tokens_after for r in handle.last)
    # every image keeps all of its newline tokens (MR-Pruner's rule), in its own index space
    for kept, layout in zip(handle.last[0].kept + handle.last[1].kept, layouts, strict=True):
        assert torch.isin(layout.newline_indices, kept).all()


@torch.no_grad()
def test_layout_that_does_not_match_the_features_is_an_error(model, inputs, monkeypatch):
    from mrprune.integrations.hf.adapters import llava_next

    wrong = mrprune.LlavaNextLayout(rows=2, cols=2, base_side=4)
    monkeypatch.setattr(llava_next.LlavaNextLayout, "from_image_size", classmethod(lambda cls, *a, **k: wrong))
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)):
        with pytest.raises(ValueError, match="52 tokens but its layout"):
            model(**inputs)


@torch.no_grad()
def test_pruned_forward_equals_mask_oracle(model, inputs):
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)) as handle:
        logits = model(**inputs).logits
    records = handle.last
    assert [r.tokens_before for r in records] == [140, 56]
    kept = kept_mask(records, inputs["attention_mask"])
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length).expand(2, length)  # what the unpatched forward uses without position ids
    oracle = model(**without(inputs, "attention_mask"), attention_mask=kept, position_ids=positions).logits
    for b, record in enumerate(records):
        n = len(record.columns)
        torch.testing.assert_close(logits[b, -n:], oracle[b, record.columns], rtol=0, atol=ATOL)


@torch.no_grad()
def test_batch_equals_single_prompts(model, inputs):
    steps = 3
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        for b, images in enumerate([[0, 1], [2]]):
            ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()][None]
            pixels, sizes = inputs["pixel_values"][images], SIZES[images]
            one = model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=steps, **GREEDY)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)
            assert all(torch.equal(x, y) for x, y in zip(handle.last[0].kept, records[b].kept, strict=True))


@pytest.mark.parametrize("mode", ["original", "compact"])
@torch.no_grad()
def test_generate_equals_decode_loop(model, inputs, mode):
    steps = 4
    with patched(model, mrprune.MRPruner(keep_ratio=0.3), position_mode=mode) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    mask = inputs["attention_mask"]
    kept = kept_mask(handle.last, mask)
    positions = mask_positions(mask if mode == "original" else kept)
    first = positions[:, -1] + 1
    tokens, scores = greedy_decode(
        model,
        steps,
        attention_mask=kept,
        position_ids=positions,
        next_positions=first,
        **without(inputs, "attention_mask"),
    )
    assert torch.equal(generated.sequences[:, mask.shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@torch.no_grad()
def test_resprune_seed_is_the_base_view_cls_attention(model, inputs):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    class RecordingResPrune(mrprune.ResPrune):
        def _select_batch(self, features, layouts, lengths, texts, seeds=None, **kwargs):
            self.seeds = seeds
            return super()._select_batch(features, layouts, lengths, texts, seeds=seeds, **kwargs)

    table = model.get_input_embeddings().weight
    pruner = RecordingResPrune(keep_ratio=0.3)
    with patched(model, pruner, texts=[table[:2], table[2:3]]):
        model(**inputs)
    crops = [image_size_to_num_patches(s, [[28, 56], [56, 28], [56, 56]], 28) for s in SIZES.tolist()]
    assert crops == [3, 5, 3]
    pixels = torch.cat([inputs["pixel_values"][i, :n] for i, n in enumerate(crops)])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention = eager.model.vision_tower(pixels, output_attentions=True).attentions[0]  # produces hidden_states[-2]
    base_views = [0, 3, 8]  # each image's first crop
    assert pruner.seeds.tolist() == attention[base_views, :, 0, 1:].mean(1).argmax(-1).tolist()


@pytest.mark.skipif(
    "mm_encoder_outputs" not in inspect.signature(tiny_llava_next().forward).parameters,
    reason="pre-encoded features (mm_encoder_outputs) arrived in transformers 5.23",
)
@torch.no_grad()
def test_pre_encoded_features(model, inputs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def encoded():
        out = model.model.get_image_features(inputs["pixel_values"], SIZES, return_dict=True)
        return {"image": BaseModelOutputWithPooling(pooler_output=list(out.pooler_output))}

    before_patch = encoded()
    text = without(inputs, "pixel_values", "image_sizes")
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)):
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(**text, mm_encoder_outputs=encoded(), max_new_tokens=3), reference)
        with pytest.raises(ValueError, match="image sizes are unknown"):
            model.generate(**text, mm_encoder_outputs=before_patch, max_new_tokens=3)
