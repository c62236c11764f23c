"""TRIM: ``official=True`` against a port of the official ``token_reduction`` (FreedomIntelligence/TRIM: unnormalised
CLIP dot products, ``softmax(-s)``, ``int(P * k)`` top tokens, IQR share over the whole call) on a tiny LLaVA-1.5
with a tiny random ``CLIPModel``; the IQR rule against ``numpy.percentile``; the default mode on LLaVA-NeXT; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava, tiny_llava_next  # noqa: E402
from mrprune.methods import TRIM  # noqa: E402
from mrprune.methods.trim import _outlier_share  # noqa: E402


def tiny_clip(vision_config):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(text_config=text, vision_config=vision_config.to_dict(), projection_dim=16)
    return CLIPModel(config).eval()


def clip_tokenizer(text):
    return {"input_ids": [1 + ord(c) % 97 for c in text]}


def official_outlier_share(values):
    flat = values.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
    return len(np.where(flat > q3 + 1.5 * (q3 - q1))[0]) / len(flat)


def test_outlier_share_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        values = torch.randn(37, generator=generator).exp() ** 3  # heavy right tail: some outliers
        assert _outlier_share(values) == pytest.approx(official_outlier_share(values), abs=0)
        assert _outlier_share(values) > 0


@torch.no_grad()
def test_official_matches_the_port():
    model = tiny_llava()
    clip = tiny_clip(model.config.vision_config)
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    questions = ["what color is the dog?", "what color is the dog?", "is there a car?"]
    states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    projected = clip.visual_projection(clip.vision_model.post_layernorm(states))
    text = torch.cat(
        [
            clip.get_text_features(input_ids=torch.tensor([clip_tokenizer(q)["input_ids"]])).pooler_output
            for q in questions
        ]
    )
    similarities = torch.softmax(-(projected @ text[:, :, None])[..., 0], dim=-1)  # [3, 16]
    for ratio in (0.25, None):
        share = ratio if ratio is not None else official_outlier_share(similarities)
        count = int(16 * share)
        expected = [similarities[i].topk(count).indices.sort().values for i in range(3)]
        ranked = similarities.sort(dim=-1, descending=True).values
        if count:
            assert bool((ranked[:, count - 1] - ranked[:, count] > 1e-7).all())
        method = TRIM(keep_ratio=ratio, clip=clip, clip_tokenizer=clip_tokenizer, official=True)
        with patched(model, method, instructions=[questions[0], questions[2]]) as handle:
            model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        kept = [k for record in handle.last for k in record.kept]
        assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True)), ratio


@torch.no_grad()
def test_default_mode_on_llava_next_keeps_newlines_and_counts_per_image():
    model = tiny_llava_next()
    clip = tiny_clip(model.config.vision_config)
    sizes = torch.tensor([[28, 40], [56, 56]])
    pixels = torch.randn(2, 5, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    counts = [len(f) for f in model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    input_ids, mask = left_pad([[1, 5, *[IMAGE_TOKEN] * counts[0], 9], [1, 12, *[IMAGE_TOKEN] * counts[1], 14]])
    method = TRIM(keep_ratio=0.3, clip=clip, clip_tokenizer=clip_tokenizer)
    with patched(model, method, instructions=["a dog", "a red car"]) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    from mrprune.layouts import LlavaNextLayout

    for record, size in zip(handle.last, sizes.tolist(), strict=True):
        layout = LlavaNextLayout.from_image_size(tuple(size), model.config.image_grid_pinpoints, 28, 7)
        scored = layout.num_tokens - layout.newline_indices.numel()
        kept = record.kept[0]
        assert torch.isin(layout.newline_indices, kept).all()
        assert kept.numel() == int(0.3 * scored + 0.5) + layout.newline_indices.numel()


def test_errors():
    with pytest.raises(ValueError, match="clip="):
        TRIM()
    method = TRIM(keep_ratio=0.5, clip=object())
    with pytest.raises(ValueError, match="clip_text"):
        method.select_batch(torch.randn(1, 4, 2), [None], attention={-2: torch.zeros(1, 4)})


@torch.no_grad()
def test_keep_all_is_the_unpatched_model_and_remove_restores():
    model = tiny_llava()
    clip = tiny_clip(model.config.vision_config)
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    inputs = dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    reference = model(**inputs).logits
    method = TRIM(keep_ratio=1.0, clip=clip, clip_tokenizer=clip_tokenizer)
    with patched(model, method, instructions=["a dog", "a car"]) as handle:
        assert torch.equal(model(**inputs).logits, reference)
        assert [r.tokens_after for r in handle.last] == [32, 16]
    assert torch.equal(model(**inputs).logits, reference)
