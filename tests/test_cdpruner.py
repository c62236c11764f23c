"""CDPruner: the selection against a port of the official DPP greedy MAP (Theia-4869/CDPruner: relevance
``-cos`` min-max normalised over the whole call, kernel ``r S r``, incremental Cholesky, first maximum), on synthetic
inputs and end to end on a tiny LLaVA-1.5 with a tiny random ``CLIPModel`` as the text tower; budgets; errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava  # noqa: E402
from mrprune.methods import CDPruner, preset  # noqa: E402


def official_dpp(features, rel, k):
    """The official fast greedy MAP on ``L = diag(rel) S diag(rel)`` per row (features ``[B, N, D]``, rel already
    normalised): ``(picks [B, k] sorted, smallest margin between the best and second-best d over the steps)``."""
    unit = features / features.norm(dim=-1, keepdim=True)
    kernel = rel[:, :, None] * (unit @ unit.transpose(1, 2)) * rel[:, None, :]
    batch, n = rel.shape
    d = kernel.diagonal(dim1=1, dim2=2).clone()
    rows = torch.zeros(batch, k, n)
    picks, margin = [], float("inf")
    for t in range(k):
        top = d.topk(2, dim=1).values
        margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
        j = d.argmax(1)
        picks.append(j)
        ar = torch.arange(batch)
        c = (kernel[ar, j] - torch.einsum("bm,bmn->bn", rows[ar, :t, j], rows[:, :t])) / d[ar, j].sqrt()[:, None]
        rows[:, t] = c
        d = d - c**2
        d[ar, j] = float("-inf")
    return torch.stack(picks, 1).sort(1).values, margin


def test_matches_the_official_greedy_on_synthetic_inputs():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, 12, generator=generator)
    image = torch.randn(3, 20, 8, generator=generator)
    text = [torch.randn(1, 8, generator=generator) for _ in range(3)]
    unit_image = image / image.norm(dim=-1, keepdim=True)
    raw = -(unit_image @ torch.stack([t[0] / t[0].norm() for t in text])[:, :, None])[..., 0]
    official_rel = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())  # over the whole call
    expected, margin = official_dpp(features, official_rel, 6)
    assert margin > 1e-5
    signals = dict(attention={-2: torch.zeros(3, 20)}, clip_image=image, clip_text=text)
    kept = CDPruner(budget=6, official=True).select_batch(features, [None] * 3, **signals)
    assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True))
    # the default mode normalises per image: the same greedy on each image's own min-max (image 1 sits close to
    # its text: a narrow band of relevances that only a per-image min-max stretches)
    image[1] = 4 * text[1][0] + 0.5 * image[1]
    unit_image = image / image.norm(dim=-1, keepdim=True)
    raw = -(unit_image @ torch.stack([t[0] / t[0].norm() for t in text])[:, :, None])[..., 0]
    signals = dict(attention={-2: torch.zeros(3, 20)}, clip_image=image, clip_text=text)
    per_image = torch.stack([(r - r.min() + 1e-6) / (r.max() - r.min()) for r in raw])
    expected, margin = official_dpp(features, per_image, 6)
    assert margin > 1e-5
    kept = CDPruner(budget=6).select_batch(features, [None] * 3, **signals)
    assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True))


def tiny_clip(vision_config):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(text_config=text, vision_config=vision_config.to_dict(), projection_dim=16)
    clip = CLIPModel(config).eval()
    with torch.no_grad():  # a post-layernorm that is not the identity, so skipping it would show
        clip.vision_model.post_layernorm.weight.uniform_(0.2, 3.0)
        clip.vision_model.post_layernorm.bias.normal_()
    return clip


def clip_tokenizer(text):
    return {"input_ids": [1 + ord(c) % 97 for c in text]}


@torch.no_grad()
def test_end_to_end_with_a_clip_text_tower():
    model = tiny_llava()
    clip = tiny_clip(model.config.vision_config)
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    instructions = ["what color is the dog?", "is there a car?"]
    method = CDPruner(budget=5, clip=clip, clip_tokenizer=clip_tokenizer)
    with patched(model, method, instructions=instructions) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    kept = [k for record in handle.last for k in record.kept]
    # the oracle: the select layer's states through CLIP's post-layernorm and projection, the question's embedding
    states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(states))
    features = torch.stack(list(model.model.get_image_features(pixels, return_dict=True).pooler_output))
    for i, question in enumerate([instructions[0], instructions[0], instructions[1]]):
        text = clip.get_text_features(input_ids=torch.tensor([clip_tokenizer(question)["input_ids"]])).pooler_output
        raw = -torch.nn.functional.cosine_similarity(image_embeds[i], text, dim=-1)
        rel = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())
        expected, margin = official_dpp(features[i : i + 1], rel[None], 5)
        assert margin > 1e-6
        assert torch.equal(kept[i], expected[0]), i


def test_presets_and_errors():
    assert preset("cdpruner_192").size.budget == 192
    with pytest.raises(ValueError, match="visual_token_num"):
        CDPruner(keep_ratio=0.5, official=True)
    features = torch.randn(1, 5, 3)
    crops = torch.tensor([[0, 0, 0, 0, -1]])  # a newline: not the official one-crop input
    with pytest.raises(ValueError, match="official=True"):
        CDPruner(budget=2, official=True).select_batch(features, [None], attention={-2: torch.zeros(1, 5)}, crops=crops)
    # without CLIP inputs every relevance is equal: a pure DPP (first pick: the lowest index)
    kept = CDPruner(budget=2).select_batch(features, [None], attention={-2: torch.zeros(1, 5)}, crops=crops)[0]
    assert kept.numel() == 2 and 4 in kept.tolist() and 0 in kept.tolist()
