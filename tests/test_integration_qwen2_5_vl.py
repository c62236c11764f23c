"""mrprune.patch on Qwen2.5-VL (tiny random model): images and videos, 3-D M-RoPE positions gathered from the
unpruned sequence, exactness, mask oracle, batching and decoding under both position policies."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    greedy_decode,
    kept_mask,
    left_pad,
    mask_positions,
    tiny_qwen2_5_vl,
)

ATOL = 1e-5
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
IMAGE_GRIDS = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 8, 4]])  # 4, 8 and 8 tokens after the 2 x 2 merge
VIDEO_GRIDS = torch.tensor([[2, 4, 4]])  # 8 tokens
PATCH = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


def vision(token, n):
    return [VISION_START, *[token] * n, VISION_END]


@pytest.fixture(scope="module")
def inputs():
    """Prompt 0: two images; prompt 1: an image and a video."""
    generator = torch.Generator().manual_seed(1)
    input_ids, attention_mask = left_pad(
        [
            [1, 5, *vision(IMAGE_TOKEN, 4), 7, *vision(IMAGE_TOKEN, 8), 8, 9],
            [1, 12, *vision(IMAGE_TOKEN, 8), *vision(VIDEO_TOKEN, 8), 13, 14, 15],
        ]
    )
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(int(IMAGE_GRIDS.prod(-1).sum()), PATCH, generator=generator),
        image_grid_thw=IMAGE_GRIDS,
        pixel_values_videos=torch.randn(int(VIDEO_GRIDS.prod(-1).sum()), PATCH, generator=generator),
        video_grid_thw=VIDEO_GRIDS,
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int(),
    )


def rope_positions(model, inputs, attention_mask=None):
    """``[3, B, L]`` M-RoPE positions of the unpruned prompts (the model's own ``get_rope_index``)."""
    mask = inputs["attention_mask"] if attention_mask is None else attention_mask
    return model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=mask,
    )[0]


def without(inputs, *keys):
    return {k: v for k, v in inputs.items() if k not in keys}


class RecordingGPrune(mrprune.GPrune):
    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        self.layouts = layouts
        return super()._select_batch(features, layouts, lengths, texts, **kwargs)


@pytest.mark.parametrize("pruner", [mrprune.GPrune(keep_ratio=1.0), mrprune.RandomPruner(keep_ratio=1.0)], ids=str)
@torch.no_grad()
def test_keep_all_equals_unpatched(model, inputs, pruner):
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    with patched(model, pruner, position_mode="original") as handle:
        assert torch.equal(model(**inputs).logits, logits)
        ours = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    assert [r.tokens_after for r in handle.last] == [12, 16]
    assert torch.equal(ours.sequences, generated.sequences)
    for a, b in zip(ours.logits, generated.logits, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_pruned_forward_equals_mask_oracle(model, inputs):
    pruner = RecordingGPrune(keep_ratio=0.5)
    with patched(model, pruner, position_mode="original") as handle:
        logits = model(**inputs).logits  # no position ids: the model's M-RoPE positions, computed unpruned
    records = handle.last
    assert pruner.layouts == [
        mrprune.GridLayout(1, 2, 2),
        mrprune.GridLayout(1, 2, 4),
        mrprune.GridLayout(1, 4, 2),
        mrprune.GridLayout(2, 2, 2),
    ]
    assert [r.modalities for r in records] == [["image", "image"], ["image", "video"]]
    assert [r.tokens_before for r in records] == [12, 16]
    assert [[k.numel() for k in r.kept] for r in records] == [[2, 4], [4, 4]]
    kept = kept_mask(records, inputs["attention_mask"])
    positions = rope_positions(model, inputs)
    assert not torch.equal(positions[1], positions[2])  # real 3-D positions
    oracle = model(**without(inputs, "attention_mask"), attention_mask=kept, position_ids=positions).logits
    full = model(**inputs).logits
    for b, record in enumerate(records):
        n = len(record.columns)
        torch.testing.assert_close(logits[b, -n:], oracle[b, record.columns], rtol=0, atol=ATOL)
        assert (full[b, -1] - oracle[b, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["original", "compact"])
@torch.no_grad()
def test_generate_equals_decode_loop(model, inputs, mode):
    steps = 5
    with patched(model, mrprune.GPrune(keep_ratio=0.5), position_mode=mode) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    kept = kept_mask(handle.last, inputs["attention_mask"])
    if mode == "original":  # the unpruned M-RoPE positions; decoding after the largest one
        positions = rope_positions(model, inputs)
        first = positions[..., -1] + 1
    else:  # the pruned prompt renumbered 0..n-1 on all three axes
        positions = mask_positions(kept).expand(3, -1, -1)
        first = kept.sum(1).expand(3, -1)
    tokens, scores = greedy_decode(
        model,
        steps,
        attention_mask=kept,
        position_ids=positions,
        next_positions=first,
        **without(inputs, "attention_mask"),
    )
    length = inputs["input_ids"].shape[1]
    assert torch.equal(generated.sequences[:, :length], inputs["input_ids"])
    assert torch.equal(generated.sequences[:, length:], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@torch.no_grad()
def test_batch_equals_single_prompts(model, inputs):
    steps = 3
    image_rows = IMAGE_GRIDS.prod(-1).tolist()
    singles = [  # prompt 0: images 0 and 1; prompt 1: image 2 and the video
        dict(pixel_values=inputs["pixel_values"][: sum(image_rows[:2])], image_grid_thw=IMAGE_GRIDS[:2]),
        dict(
            pixel_values=inputs["pixel_values"][sum(image_rows[:2]) :],
            image_grid_thw=IMAGE_GRIDS[2:],
            pixel_values_videos=inputs["pixel_values_videos"],
            video_grid_thw=VIDEO_GRIDS,
        ),
    ]
    with patched(model, mrprune.DivPrune(keep_ratio=0.5)) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        for b, visual in enumerate(singles):
            real = inputs["attention_mask"][b].bool()
            ids = inputs["input_ids"][b][real][None]
            types = inputs["mm_token_type_ids"][b][real][None]
            one = model.generate(input_ids=ids, mm_token_type_ids=types, **visual, max_new_tokens=steps, **GREEDY)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)
            assert all(torch.equal(x, y) for x, y in zip(handle.last[0].kept, records[b].kept, strict=True))
