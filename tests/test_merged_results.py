"""The merged-tokens result kind: its checks, and the HF integration placing merged tokens at their representatives'
rows (against an oracle built by hand: the merged features scattered into ``inputs_embeds``, the other visual rows
masked out, original positions)."""

from __future__ import annotations

import pytest
import torch

import mrprune
from mrprune.methods.results import MergedTokens, kept_indices, merged_tokens


def pair_merge(features: torch.Tensor) -> MergedTokens:
    """Each even/odd pair of tokens averaged into the even one (a lone last token stays itself)."""
    n = features.shape[0]
    sources = torch.arange(n) // 2
    sizes = torch.bincount(sources).float()
    tokens = torch.zeros(sizes.shape[0], features.shape[1]).index_add_(0, sources, features.float())
    tokens = (tokens / sizes[:, None]).to(features.dtype)
    return MergedTokens(tokens, torch.arange(0, n, 2), sources, 1 / sizes[sources])


class PairMerge(mrprune.Pruner):
    """A test-only projector-stage merger: :func:`pair_merge` per item."""

    merges = True

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        return [pair_merge(features[b, :n]) for b, n in enumerate(lengths.tolist())]


def test_merged_tokens_checks_and_accessors():
    features = torch.randn(5, 3)
    merged = pair_merge(features)
    assert merged.sizes.tolist() == [2, 2, 1]
    assert torch.equal(kept_indices(merged), torch.tensor([0, 2, 4]))
    assert torch.equal(merged_tokens(merged, features), merged.tokens)
    assert torch.equal(merged_tokens(torch.tensor([1, 3]), features), features[[1, 3]])
    torch.testing.assert_close(merged.tokens[0], features[:2].mean(0))
    with pytest.raises(ValueError, match="tokens must be"):
        MergedTokens(torch.zeros(2, 3), torch.arange(3), merged.sources, merged.weights)
    with pytest.raises(ValueError, match="sources and weights"):
        MergedTokens(merged.tokens, merged.kept, merged.sources[:4], merged.weights)
    with pytest.raises(TypeError, match="int64"):
        MergedTokens(merged.tokens, merged.kept.int(), merged.sources, merged.weights)
    # select_batch passes merged results through unsorted-untouched, one per item
    batch = torch.randn(2, 6, 3)
    results = PairMerge().select_batch(batch, [None, None], [6, 3])
    assert [r.kept.tolist() for r in results] == [[0, 2, 4], [0, 2]]


@torch.no_grad()
def test_merged_tokens_take_their_representatives_rows():
    pytest.importorskip("transformers")
    from mrprune.integrations import patched
    from mrprune.integrations.testing import IMAGE_TOKEN, kept_mask, left_pad, tiny_llava

    model = tiny_llava()
    image = [IMAGE_TOKEN] * 16
    input_ids, attention_mask = left_pad([[1, 5, 6, *image, 7, 8, *image, 9], [1, 12, *image, 13, 14, 15]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    with patched(model, PairMerge()) as handle:
        logits = model(**inputs).logits
    records = handle.last
    assert [r.tokens_after for r in records] == [16, 8]
    assert all(isinstance(m, MergedTokens) for r in records for m in r.merged)

    features = model.model.get_image_features(pixels, return_dict=True).pooler_output
    merged = torch.cat([pair_merge(f.reshape(-1, f.shape[-1])).tokens for f in features])
    representatives = torch.cat([pair_merge(f.reshape(-1, f.shape[-1])).kept for f in features])
    embeds = model.get_input_embeddings()(input_ids.masked_fill(input_ids == IMAGE_TOKEN, 0))
    cells = (input_ids == IMAGE_TOKEN).nonzero()
    for item, index, token in zip(cells.split(16), representatives.split(8), merged.split(8), strict=True):
        embeds[item[index, 0], item[index, 1]] = token.to(embeds.dtype)
    length = input_ids.shape[1]
    oracle = model(
        inputs_embeds=embeds,
        attention_mask=kept_mask(records, attention_mask),
        position_ids=torch.arange(length).expand(2, length),
    ).logits
    for b, record in enumerate(records):
        n = len(record.columns)
        torch.testing.assert_close(logits[b, -n:], oracle[b, record.columns], rtol=0, atol=1e-5)
