"""mrprune.FastV inside the language model (tiny random LLaVA and Qwen2.5-VL, 3 layers, pruning before layer 2):
the kept tokens are the eager-attention top-k of the last token at layer 1, outputs equal a per-layer mask oracle,
decoding continues on the pruned cache, the attention implementation is untouched; ``select`` takes one item's
``attention [N]`` and both entry points reject scores of another shape."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    greedy_decode,
    kept_mask,
    left_pad,
    mask_positions,
    tiny_llava,
    tiny_qwen2_5_vl,
)

ATOL = 1e-4  # the oracle runs eager attention, the patched model SDPA
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
LAYER = 2


def llava_case():
    image = [IMAGE_TOKEN] * 16
    input_ids, attention_mask = left_pad([[1, 5, 6, *image, 7, 8, *image, 9, 10, 11], [1, 12, *image, 13, 14, 15]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    singles = [dict(pixel_values=pixels[:2]), dict(pixel_values=pixels[2:])]
    return tiny_llava(layers=3), inputs, mask_positions(attention_mask), singles


def qwen_case():
    grids = torch.tensor([[1, 4, 4], [1, 8, 4], [1, 4, 8]])
    vision = lambda n: [VISION_START, *[IMAGE_TOKEN] * n, VISION_END]  # noqa: E731
    input_ids, attention_mask = left_pad([[1, 5, *vision(4), 7, 8], [1, 12, *vision(8), *vision(8), 13, 14]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    types = (input_ids == IMAGE_TOKEN).int()
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels,
        image_grid_thw=grids,
        mm_token_type_ids=types,
    )
    model = tiny_qwen2_5_vl(layers=3)
    positions = model.model.get_rope_index(input_ids, types, image_grid_thw=grids, attention_mask=attention_mask)[0]
    singles = [
        dict(pixel_values=pixels[:16], image_grid_thw=grids[:1]),
        dict(pixel_values=pixels[16:], image_grid_thw=grids[1:]),
    ]
    return model, inputs, positions, singles


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def case(request):
    return {"llava": llava_case, "qwen2_5_vl": qwen_case}[request.param]()


def without(inputs, *keys):
    return {k: v for k, v in inputs.items() if k not in keys}


def eager_copy(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def expected_kept(model, inputs, ratio):
    """Per image (placeholder order), the top ``round(ratio * n)`` of the last prompt token's head-averaged attention
    in layer ``LAYER - 1``, read from the eager model's attention probabilities."""
    attentions = eager_copy(model)(**inputs, output_attentions=True).attentions[LAYER - 1]
    scores = attentions[:, :, -1].mean(1)  # [B, L]: the last column is every (left-padded) prompt's last token
    kept = []
    for b in range(scores.shape[0]):
        cells = (inputs["input_ids"][b] == IMAGE_TOKEN).nonzero()[:, 0]
        runs = torch.tensor_split(cells, (cells.diff() > 1).nonzero()[:, 0] + 1)  # the test images are not adjacent
        for run in runs:
            count = int(ratio * run.numel() + 0.5)
            kept.append(scores[b, run].topk(count).indices.sort().values)
    return kept


@torch.no_grad()
def test_keep_all_equals_unpatched(case):
    model, inputs, _, _ = case
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    with patched(model, mrprune.FastV(keep_ratio=1.0, layer=LAYER)):
        assert torch.equal(model(**inputs).logits, logits)
        ours = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    assert torch.equal(ours.sequences, generated.sequences)
    for a, b in zip(ours.logits, generated.logits, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_kept_tokens_are_the_attention_top_k(case):
    model, inputs, _, _ = case
    with patched(model, mrprune.FastV(keep_ratio=0.4, layer=LAYER)) as handle:
        model(**inputs)
        assert model.config._attn_implementation == "sdpa"  # no switch to eager attention
    kept = [k for record in handle.last for k in record.kept]
    expected = expected_kept(model, inputs, 0.4)
    assert len(kept) == len(expected)
    for ours, theirs in zip(kept, expected, strict=True):
        assert torch.equal(ours, theirs)
    assert handle.last[0].tokens_after != handle.last[1].tokens_after


def masked_from_layer(model, dropped):
    """Hooks hiding the ``dropped [B, L]`` tokens from layers ``LAYER..`` during the prefill (eager float masks)."""

    def hide(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if mask.shape[-1] != dropped.shape[1]:  # a decoding step: the 2-D mask already hides them
            return None
        return args, {
            **kwargs,
            "attention_mask": mask.masked_fill(dropped[:, None, None, :], torch.finfo(mask.dtype).min),
        }

    layers = model.model.language_model.layers[LAYER:]
    return [layer.register_forward_pre_hook(hide, with_kwargs=True) for layer in layers]


@torch.no_grad()
def test_generate_equals_masked_oracle(case):
    model, inputs, positions, _ = case
    steps = 4
    with patched(model, mrprune.FastV(keep_ratio=0.4, layer=LAYER)) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        logits = model(**inputs, position_ids=positions).logits
    mask = inputs["attention_mask"]
    kept = kept_mask(handle.last, mask)
    eager = eager_copy(model)
    hooks = masked_from_layer(eager, (mask - kept).bool())
    try:
        oracle_logits = eager(**inputs, position_ids=positions).logits
        tokens, scores = greedy_decode(
            eager,
            steps,
            attention_mask=mask,  # layers 0 .. LAYER-1 see every token in the prefill
            decode_mask=kept,  # the cache then holds the kept tokens only
            position_ids=positions,
            next_positions=positions[..., -1] + 1,
            **without(inputs, "attention_mask"),
        )
    finally:
        for hook in hooks:
            hook.remove()
    for b, record in enumerate(handle.last):
        n = len(record.columns)
        torch.testing.assert_close(logits[b, -n:], oracle_logits[b, record.columns], rtol=0, atol=ATOL)
    assert torch.equal(generated.sequences[:, mask.shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@torch.no_grad()
def test_batch_equals_single_prompts(case):
    model, inputs, _, singles = case
    steps = 3
    with patched(model, mrprune.FastV(keep_ratio=0.4, layer=LAYER)) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        for b, visual in enumerate(singles):
            real = inputs["attention_mask"][b].bool()
            text = {k: inputs[k][b][real][None] for k in ("input_ids", "mm_token_type_ids") if k in inputs}
            one = model.generate(**text, **visual, max_new_tokens=steps, **GREEDY)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)
            assert all(torch.equal(x, y) for x, y in zip(handle.last[0].kept, records[b].kept, strict=True))


@torch.no_grad()
def test_labels_and_removal(case):
    model, inputs, positions, _ = case
    hooks_before = {name: list(m._forward_pre_hooks) for name, m in model.named_modules()}
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    with patched(model, mrprune.FastV(keep_ratio=0.4, layer=LAYER)) as handle:
        loss = model(**inputs, position_ids=positions, labels=labels).loss
        assert model(**inputs, position_ids=positions, labels=labels, return_dict=False)[0] == loss
    dropped = (inputs["attention_mask"] - kept_mask(handle.last, inputs["attention_mask"])).bool()
    eager = eager_copy(model)
    hooks = masked_from_layer(eager, dropped)
    try:
        oracle = eager(**inputs, position_ids=positions, labels=labels).loss
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(loss, oracle, rtol=0, atol=ATOL)
    assert {name: list(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks_before
    assert "forward" not in model.__dict__


def test_select_takes_one_item_scores():
    """``select`` takes ``attention [N]`` (the docstring's promise), keeps the top ``round(ratio * N)`` (gapped
    scores, so the indices are exact) and equals ``select_batch`` on the batch of one."""
    scores = torch.tensor([0.10, 0.90, 0.30, 0.80, 0.20, 0.70, 0.05])
    features = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    pruner = mrprune.FastV(keep_ratio=0.5)
    kept = pruner.select(features, mrprune.GridLayout(1, 1, 7), attention=scores)
    assert kept.tolist() == [1, 2, 3, 5]  # round(3.5) = 4 (half up), sorted ascending
    assert torch.equal(kept, pruner.select_batch(features[None], [None], attention=scores[None])[0])


@pytest.mark.parametrize(
    "attention",
    [torch.rand(1, 6), torch.rand(5), torch.rand(6, 1), None, [0.5] * 6],
    ids=["batch-of-one", "too-short", "column", "missing", "list"],
)
def test_select_rejects_other_attention(attention):
    with pytest.raises(ValueError, match=r"FastV\.select: attention must be the \[N\] = \(6,\)"):
        mrprune.FastV().select(torch.randn(6, 4), attention=attention)


def test_select_batch_rejects_one_item_scores():
    with pytest.raises(ValueError, match=r"FastV\.select_batch: attention must be the \[B, N\] = \(1, 6\)"):
        mrprune.FastV().select_batch(torch.randn(1, 6, 4), [None], attention=torch.rand(6))
