"""PruMerge / PruMerge+: ``official=True`` against a port of the official selection and merge (42Shawn/LLaVA-PruMerge
@ 097c041, ``clip_encoder.py::token_prune_merge_advanced(_plus)``, written here from its steps) on random inputs
with gaps; the default mode's budgets, merge and batch independence; edge cases; argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrprune.methods import PruMerge, preset
from tests.utils import check_crops_alone

LAYER = -1


# --- the port (the official steps, eager torch) --------------------------------------------------------------------


def official_ratio(attention):
    """The official ``outlier_dectection``: share of the flattened attention above ``Q3 + 1.5 IQR`` (numpy)."""
    values = attention.float().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)


def official_complement(idx, dim):
    """The official ``complement_idx`` for ``[B, L]`` indices: the other positions, ascending."""
    masked = torch.scatter(torch.arange(dim).expand(idx.shape[0], dim), 1, idx, 0)
    return masked.sort(dim=1).values[:, idx.shape[1] :]


def official_prumerge(features, keys, cls_attn, plus, ratio=None):
    """``token_prune_merge_advanced(_plus)`` from ``cls_attn`` on: ``features [B, N, C]`` (the select layer's
    patches), ``keys [B, N, Ck]`` (the last layer's keys without [CLS]), ``cls_attn [B, N]``. Returns the kept
    indices ``[B, L]`` in the official order, their updated tokens ``[B, L, C]`` and the extra token ``[B, C]``."""
    batch, n, channels = features.shape
    if ratio is None:
        ratio = official_ratio(cls_attn)
    idx = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True).indices
    if plus:  # the adaptive branch (batch 1); the official 575 is N - 1 for N = 576
        step_length = int(1 / ratio)
        sequence = torch.arange(0, n - 1, int(step_length / 3))
        flat = idx.flatten()
        filtered = torch.tensor([x for x in sequence if x not in flat], dtype=torch.int64)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    x_others = torch.gather(features, 1, idx[..., None].expand(-1, -1, channels))
    x_others_attn = torch.gather(cls_attn, 1, idx)
    key_others = torch.gather(keys, 1, idx[..., None].expand(-1, -1, keys.shape[2]))
    compl = official_complement(idx, n)
    non_topk = torch.gather(features, 1, compl[..., None].expand(-1, -1, channels))
    non_topk_key = torch.gather(keys, 1, compl[..., None].expand(-1, -1, keys.shape[2]))
    non_topk_attn = torch.gather(cls_attn, 1, compl)
    key_others_norm = F.normalize(key_others, p=2, dim=-1)
    non_topk_key_norm = F.normalize(non_topk_key, p=2, dim=-1)
    updated = torch.zeros_like(x_others)
    for b in range(batch):
        for i in range(idx.shape[1]):
            query = key_others_norm[b, i][None, None]
            rest_x = torch.cat([x_others[b, :i], x_others[b, i + 1 :], non_topk[b]])[None]
            rest_attn = torch.cat([x_others_attn[b, :i], x_others_attn[b, i + 1 :], non_topk_attn[b]])[None]
            rest_keys = torch.cat([key_others_norm[b, :i], key_others_norm[b, i + 1 :], non_topk_key_norm[b]])[None]
            similarity = torch.bmm(query, rest_keys.transpose(1, 2))
            cluster = torch.topk(similarity, k=32, dim=2, largest=True).indices.squeeze()
            weighted = torch.sum(rest_x[:, cluster] * rest_attn[:, cluster][..., None], dim=1)
            updated[b, i] = x_others[b, i] + weighted
    extra = torch.sum(non_topk * non_topk_attn[..., None], dim=1)
    return idx, updated, extra


def random_inputs(batch, n, generator, dim=12):
    """Features ``[B, N, C]``, the last layer's keys per head ``[B, N, 2, d]`` (the port takes them flattened, the
    official full keys) and a [CLS] attention row ``[B, N]``."""
    features = torch.randn(batch, n, dim, generator=generator)
    keys = torch.randn(batch, n, 2, dim + 4, generator=generator)
    attention = (1.5 * torch.randn(batch, n, generator=generator)).softmax(-1)
    return features, keys, attention


def official_select(method, features, keys, attention):
    batch, n = attention.shape
    return method.select_batch(
        features,
        [None] * batch,
        attention={LAYER: attention},
        crops=torch.zeros(batch, n, dtype=torch.int64),
        patches=torch.arange(n).expand(batch, n),
        crop_attention={LAYER: [attention[b : b + 1] for b in range(batch)]},
        crop_keys={LAYER: [keys[b : b + 1] for b in range(batch)]},
        attention_kind="cls",
    )


def check_against_port(result, idx, updated, extra, attention):
    compl = official_complement(idx[None], attention.numel())[0]
    extra_rep = int(compl[attention[compl].argmax()])  # the pruned token of largest attention
    expected = {int(i): token for i, token in zip(idx.tolist(), updated, strict=True)}
    expected[extra_rep] = extra
    assert result.kept.tolist() == sorted(expected)
    torch.testing.assert_close(
        result.tokens, torch.stack([expected[k] for k in sorted(expected)]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_plus_matches_the_port(seed):
    generator = torch.Generator().manual_seed(seed)
    features, keys, attention = random_inputs(1, 576, generator)
    idx, updated, extra = official_prumerge(features, keys.flatten(-2), attention, plus=True)
    (result,) = official_select(PruMerge(official=True), features, keys, attention)
    assert 0 < int(576 * official_ratio(attention)) < idx.shape[1]  # the samples added tokens
    check_against_port(result, idx[0], updated[0], extra[0], attention[0])


def test_official_plus_samples_stop_before_the_last_patch():
    """35 outliers of 576: share 0.0608, stride int(16 / 3) = 5, which divides 575: the official ``arange(0, 575)``
    leaves the last patch out."""
    generator = torch.Generator().manual_seed(11)
    features, keys, _ = random_inputs(1, 576, generator)
    attention = 1 + torch.rand(1, 576, generator=generator)
    attention[0, torch.randperm(575, generator=generator)[:35]] += 10.0
    attention = attention / attention.sum()  # a probability row, like the [CLS] softmax
    assert int(576 * official_ratio(attention)) == 35
    idx, updated, extra = official_prumerge(features, keys.flatten(-2), attention, plus=True)
    assert 575 not in idx[0].tolist()
    (result,) = official_select(PruMerge(official=True), features, keys, attention)
    check_against_port(result, idx[0], updated[0], extra[0], attention[0])


@pytest.mark.parametrize("ratio", [None, 1 / 8])
def test_official_plain_matches_the_port_over_a_batch(ratio):
    """Plain PruMerge: the adaptive share is one share over the whole call (the official flattening)."""
    generator = torch.Generator().manual_seed(7)
    features, keys, attention = random_inputs(3, 200, generator)
    attention[1] = (4.0 * torch.randn(200, generator=generator)).softmax(-1)  # more outliers in one image
    idx, updated, extra = official_prumerge(features, keys.flatten(-2), attention, plus=False, ratio=ratio)
    results = official_select(PruMerge(keep_ratio=ratio, plus=False, official=True), features, keys, attention)
    for b, result in enumerate(results):
        check_against_port(result, idx[b], updated[b], extra[b], attention[b])
    if ratio is None:  # one share for all: each image alone would keep another count
        alone = official_select(PruMerge(plus=False, official=True), features[1:2], keys[1:2], attention[1:2])[0]
        assert alone.kept.numel() != results[1].kept.numel()


def test_official_errors():
    generator = torch.Generator().manual_seed(0)
    features, keys, attention = random_inputs(1, 60, generator)
    with pytest.raises(ValueError, match="adaptive share"):
        PruMerge(budget=64, official=True)
    with pytest.raises(ValueError, match="adaptive share"):
        PruMerge(keep_ratio=0.2, official=True)  # the fixed-ratio PruMerge+ branch
    with pytest.raises(ValueError, match="extra token"):
        PruMerge(official=True, extra_token=False)
    with pytest.raises(ValueError, match="divides by 0"):  # constant attention: no outliers
        official_select(PruMerge(official=True), features, keys, torch.full((1, 60), 1 / 60))
    with pytest.raises(ValueError, match="CLIP towers"):
        PruMerge(official=True).select_batch(features, [None], attention={LAYER: attention})
    with pytest.raises(ValueError, match="one-crop"):
        PruMerge(official=True).select_batch(
            features,
            [None],
            attention={LAYER: attention},
            crops=torch.zeros(1, 60, dtype=torch.int64),
            crop_attention={LAYER: [attention.view(2, 30)]},
            crop_keys={LAYER: [keys.view(2, 30, 2, -1)]},
            attention_kind="cls",
        )


# --- default mode --------------------------------------------------------------------------------------------------


def brute_force_merge(features, attention, kept, k):
    """``x_c + sum a_j x_j`` over the ``k`` nearest other tokens by feature cosine (brute force, float64)."""
    x = features.double()
    unit = x / x.norm(dim=-1, keepdim=True)
    out = []
    for c in kept.tolist():
        similarity = unit @ unit[c]
        similarity[c] = -float("inf")
        near = similarity.argsort(descending=True, stable=True)[: min(k, x.shape[0] - 1)]
        out.append(x[c] + (attention[near].double()[:, None] * x[near]).sum(0))
    return torch.stack(out)


def test_default_adaptive_counts_and_merge():
    generator = torch.Generator().manual_seed(3)
    features, _, attention = random_inputs(1, 120, generator)
    for plus in (False, True):
        (result,) = PruMerge(plus=plus, neighbors=8).select_batch(features, [None], attention={LAYER: attention})
        share = official_ratio(attention)
        top = attention[0].topk(max(1, int(120 * share))).indices
        kept = set(top.tolist())
        if plus:
            kept |= set(range(0, 120, max(1, int(int(1 / share) / 3))))
        pruned = sorted(set(range(120)) - kept)
        extra = pruned[int(attention[0, pruned].argmax())]
        assert result.kept.tolist() == sorted(kept | {extra})
        slots = [result.kept.tolist().index(c) for c in sorted(kept)]
        expected = brute_force_merge(features[0], attention[0], torch.tensor(sorted(kept)), 8)
        torch.testing.assert_close(result.tokens[slots].double(), expected, rtol=1e-5, atol=1e-5)
        extra_token = (attention[0, pruned, None] * features[0, pruned]).sum(0)
        torch.testing.assert_close(result.tokens[result.kept.tolist().index(extra)], extra_token)
        # a pruned token's output: the kept token ranking it nearest (lower slot on equal ranks), else the extra one
        unit = features[0].double() / features[0].double().norm(dim=-1, keepdim=True)
        ranks = {}
        for c in sorted(kept):
            similarity = unit @ unit[c]
            similarity[c] = -float("inf")
            for r, j in enumerate(similarity.argsort(descending=True, stable=True)[:8].tolist()):
                ranks.setdefault(j, (r, c))
                ranks[j] = min(ranks[j], (r, c))
        for j in pruned:
            assert int(result.kept[result.sources[j]]) == (ranks[j][1] if j in ranks else extra)
        assert bool((result.sources >= 0).all())
        assert bool((result.weights > 0).all()) and bool((result.weights <= 1).all())


def test_default_budgets_crops_and_newlines():
    generator = torch.Generator().manual_seed(4)
    features, _, attention = random_inputs(1, 43, generator)
    crops = torch.tensor([[0] * 20 + [1] * 20 + [-1] * 3])
    for plus in (False, True):
        (result,) = PruMerge(budget=13, plus=plus).select_batch(
            features, [None], attention={LAYER: attention}, crops=crops
        )
        assert result.kept.numel() == 13
        assert {40, 41, 42} <= set(result.kept.tolist())
        # each crop: 5 tokens of which one is the crop's extra token; sources stay within the crop
        for crop in (0, 1):
            members = (crops[0] == crop).nonzero()[:, 0]
            assert int(torch.isin(result.kept, members).sum()) == 5
            assert bool(torch.isin(result.kept[result.sources[members]], members).all())
    # PruMerge+: of 7 kept slots, 4 by attention and 3 evenly spaced samples among the rest
    (result,) = PruMerge(budget=7, extra_token=False).select_batch(
        features[:, :20], [None], attention={LAYER: attention[:, :20]}
    )
    top = set(attention[0, :20].topk(4).indices.tolist())
    rest = sorted(set(range(20)) - top)
    assert set(result.kept.tolist()) == top | {rest[0], rest[16 // 3], rest[32 // 3]}


def test_batch_equals_items_one_by_one():
    generator = torch.Generator().manual_seed(5)
    features, _, attention = random_inputs(3, 70, generator)
    lengths = [70, 41, 9]
    for method in (PruMerge(), PruMerge(keep_ratio=0.3, plus=False)):
        both = method.select_batch(features, [None] * 3, lengths, attention={LAYER: attention})
        for b, n in enumerate(lengths):
            (one,) = method.select_batch(features[b : b + 1, :n], [None], attention={LAYER: attention[b : b + 1, :n]})
            assert torch.equal(one.kept, both[b].kept) and torch.equal(one.sources, both[b].sources)
            torch.testing.assert_close(one.tokens, both[b].tokens, rtol=0, atol=0)


def test_each_crop_of_a_padded_batch_equals_the_crop_alone():
    """Per-crop merging (``_vision.merge_per_crop``): items of crops of different sizes (one not contiguous, one
    smaller than the 32 neighbours) and newlines in one padded batch give, crop by crop, what the crop gives alone
    (adaptive: with its own outlier count; budget: with its share of the item's budget)."""
    generator = torch.Generator().manual_seed(8)
    features, _, attention = random_inputs(2, 63, generator)
    crops = torch.tensor(
        [[0] * 40 + [-1] * 3 + [1] * 20, [1] * 6 + [0] * 25 + [-1] * 2 + [1] * 4 + [5] * 26]  # row 1: 37 tokens
    )
    lengths = [63, 37]
    # budget 15 less the newlines, split by crop size (largest remainder): 12 over 40 / 20, 13 over 25 / 10
    budgeted = [{0: 8, 1: 4}, {0: 9, 1: 4}]
    adaptive = [{0: None, 1: None}] * 2
    for plus in (True, False):
        for budget, shares in ((15, budgeted), (None, adaptive)):
            results = PruMerge(budget=budget, plus=plus).select_batch(
                features, [None, None], lengths, attention={LAYER: attention}, crops=crops
            )
            for b, n in enumerate(lengths):
                check_crops_alone(
                    results[b],
                    features[b, :n],
                    attention[b, :n],
                    crops[b, :n],
                    shares[b],
                    lambda share: PruMerge(budget=share, plus=plus),  # noqa: B023
                    layer=LAYER,
                )


def test_edge_cases():
    generator = torch.Generator().manual_seed(6)
    features, _, attention = random_inputs(1, 9, generator)
    # keep-all without neighbours is the identity
    (result,) = PruMerge(keep_ratio=1.0, neighbors=0).select_batch(features, [None], attention={LAYER: attention})
    assert result.kept.tolist() == list(range(9)) and torch.equal(result.tokens, features[0])
    # more neighbours than tokens: every other token
    (result,) = PruMerge(budget=1, plus=False, neighbors=50).select_batch(
        features, [None], attention={LAYER: attention}
    )
    c = int(attention[0].argmax())
    assert result.kept.tolist() == [c]  # a budget of 1 leaves no slot for the extra token
    expected = brute_force_merge(features[0], attention[0], torch.tensor([c]), 50)
    torch.testing.assert_close(result.tokens.double(), expected, rtol=1e-5, atol=1e-5)
    # tiny items and constant attention (no outliers: one token by attention, the lowest index)
    for n in (1, 2, 3):
        for plus in (False, True):
            (result,) = PruMerge(plus=plus).select_batch(features[:, :n], [None], attention={LAYER: torch.ones(1, n)})
            assert result.kept[0] == 0 and bool((result.sources >= 0).all())
            if not plus:  # the token 0, and the extra token at the first pruned token
                assert result.kept.tolist() == [0, 1][:n]


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        PruMerge(budget=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match="neighbors"):
        PruMerge(neighbors=-1)
    with pytest.raises(TypeError, match="plus"):
        PruMerge(plus=1)
    with pytest.raises(TypeError, match="layer"):
        PruMerge(layer="last")
    with pytest.raises(ValueError, match=r"attention=\{-1"):
        PruMerge().select_batch(torch.randn(1, 5, 3), [None])


def test_presets():
    assert preset("prumerge_plus").size is None and preset("prumerge_plus").plus
    assert not preset("prumerge").plus
    assert preset("prumerge_plus_64").size.budget == 64
    assert preset("prumerge_qwen_667").size.keep_ratio == pytest.approx(1 / 3)


def _eager_last_layer(eager, pixels):
    """The eager tower's last layer ``q_proj`` / ``k_proj`` outputs ``[B, 1 + P, C]`` (as the official hooks take
    them) on ``pixels``."""
    from mrprune.integrations.hf.adapters.clip import cls_layers

    attention = cls_layers(eager.model.vision_tower)[LAYER].self_attn
    captured = {}
    hooks = [
        attention.q_proj.register_forward_hook(lambda module, args, output: captured.update(q=output)),
        attention.k_proj.register_forward_hook(lambda module, args, output: captured.update(k=output)),
    ]
    eager.model.vision_tower(pixels)
    for hook in hooks:
        hook.remove()
    return captured["q"], captured["k"]


def _gapped(cls_attn, keys, neighbors):
    """Whether the official decisions have margins (> 1e-4 relative) that SDPA-vs-eager rounding cannot flip: no
    attention near the IQR bound, a gap at the top-k cut, and at every token's ``neighbors``-th nearest key."""
    values = cls_attn.flatten().double()
    q1, q3 = torch.quantile(values, 0.25), torch.quantile(values, 0.75)
    bound = q3 + 1.5 * (q3 - q1)
    scale = float(values.max())
    if bool(((values - bound).abs() < 1e-4 * scale).any()) or not bool((values > bound).any()):
        return False
    ordered = cls_attn.double().sort(dim=1, descending=True).values
    count = int(cls_attn.shape[1] * official_ratio(cls_attn))
    if count and bool(((ordered[:, count - 1] - ordered[:, count]) < 1e-4 * scale).any()):
        return False
    unit = F.normalize(keys.double(), dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).diagonal_scatter(torch.full(keys.shape[:2], -9.0).double(), 0, 1, 2)
    near = similarity.sort(dim=2, descending=True).values
    return bool(((near[..., neighbors - 1] - near[..., neighbors]) > 1e-4).all())


@pytest.mark.parametrize("plus", [True, False])
@torch.no_grad()
def test_official_on_a_tiny_llava_matches_the_port_of_the_eager_tower(plus, monkeypatch):
    """End to end on a tiny LLaVA-1.5 with 36 patches (enough for the official 32 neighbours): the vision stage hands
    official=True the last layer's [CLS] row without a head split and its full keys, the model's tower keeps SDPA,
    and the merged tokens equal the port run on the eager tower's own ``q_proj`` / ``k_proj`` outputs (PruMerge+ on
    one image, the official adaptive branch's batch; plain PruMerge on two, one IQR share for both)."""
    pytest.importorskip("transformers")
    import copy

    from mrprune.integrations import patched
    from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava
    from tests.tiny_models import forbid_eager_clip_attention

    model = tiny_llava(image_size=42)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    patches, images = 36, 1 if plus else 2
    for seed in range(40):
        pixels = torch.randn(images, 3, 42, 42, generator=torch.Generator().manual_seed(seed))
        q, k = _eager_last_layer(eager, pixels)
        channels = q.shape[-1]
        cls_attn = ((q[:, :1] @ k.transpose(-2, -1)) * channels**-0.5).softmax(-1)[:, 0, 1:]  # [B, P]
        keys = k[:, 1:]  # the official Key_wo_cls
        if _gapped(cls_attn, keys, 32):
            break
    else:
        pytest.fail("no seed gives gapped attention and neighbours")
    # the joint row ranks unlike the head mean here, so a head-averaged score would fail the comparison
    split_q = q[:, :1].view(images, 1, 4, -1).transpose(1, 2)  # [B, H, 1, d]
    split_k = k.view(images, 1 + patches, 4, -1).transpose(1, 2)  # [B, H, 1 + P, d]
    mean_row = ((split_q @ split_k.transpose(-2, -1)) * (channels // 4) ** -0.5).softmax(-1).mean(1)[:, 0, 1:]
    assert not torch.equal(mean_row.argsort(dim=1, descending=True), cls_attn.argsort(dim=1, descending=True))
    features = torch.stack(list(model.model.get_image_features(pixels, return_dict=True).pooler_output))
    idx, updated, extra = official_prumerge(features, keys, cls_attn, plus=plus)
    image = [IMAGE_TOKEN] * patches
    prompts = [[1, 5, *image, 7]] if plus else [[1, 5, *image, 7, *image, 9]]
    input_ids, mask = left_pad(prompts)
    forbid_eager_clip_attention(monkeypatch)  # the patched run keeps SDPA: no attention weights materialised
    with patched(model, PruMerge(plus=plus, official=True)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    merged = handle.last[0].merged
    assert len(merged) == images
    for b, result in enumerate(merged):
        check_against_port(result, idx[b], updated[b], extra[b], cls_attn[b])
