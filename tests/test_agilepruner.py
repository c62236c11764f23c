"""AgilePruner (a reconstruction: no official code): the method against a brute-force loop of the algorithm its
docstring states, on tiny inputs whose distances keep clear of every threshold; the effective rank against known
values; budgets, per-crop split, batch = per item, edge cases; argument errors; a tiny LLaVA through ``patched``."""

from __future__ import annotations

import math

import pytest
import torch

from mrprune.methods import AgilePruner, FasterVLM, preset
from mrprune.methods.agilepruner import effective_rank

# --- brute force (plain Python loops, float64) ------------------------------------------------------------------


def brute_erank(x: torch.Tensor) -> float:
    values = torch.linalg.svdvals(x.double()).tolist()
    total = sum(values)
    if total == 0:
        return 0.0
    return math.exp(-sum(v / total * math.log(v / total) for v in values if v > 0))


def brute_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = math.sqrt(sum(v * v for v in a.tolist())), math.sqrt(sum(v * v for v in b.tolist()))
    if na == 0 or nb == 0:
        return 0.0
    return sum(u * v for u, v in zip(a.tolist(), b.tolist(), strict=True)) / (na * nb)


def brute_taus(x, k, erank_avg, tau_max):
    ratio = brute_erank(x) / erank_avg
    return [min(tau_max, i * ratio * 0.01) for i in range(1, k + 1)]


def brute_agile(x, scores, k, erank_avg, tau_max):
    """Walk tokens by descending score (ties: lower index); keep the next unsuppressed one; the i-th kept suppresses
    every remaining token within cosine distance tau_i; fill from the suppressed in score order."""
    n = x.shape[0]
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    taus = brute_taus(x, max(k, 1), erank_avg, tau_max)
    kept, suppressed = [], set()
    for t in order:
        if len(kept) == k:
            break
        if t in suppressed:
            continue
        kept.append(t)
        tau = taus[len(kept) - 1]
        for j in order:
            if j not in kept and j not in suppressed and 1 - brute_cos(x[t], x[j]) < tau:
                suppressed.add(j)
    for t in order:
        if len(kept) < k and t not in kept:
            kept.append(t)
    return sorted(kept)


def clear_of_thresholds(x, k, erank_avg, tau_max, gap=1e-4):
    """No pairwise cosine distance lies within ``gap`` of a threshold (float32 vs float64 cannot flip a decision)."""
    taus = brute_taus(x, max(k, 1), erank_avg, tau_max)
    n = x.shape[0]
    distances = [1 - brute_cos(x[i], x[j]) for i in range(n) for j in range(i + 1, n)]
    return all(abs(d - t) > gap for d in distances for t in taus)


def attention(scores):
    return {-2: scores}


# --- the algorithm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 5, 9, 12, 20])
def test_matches_brute_force_per_item_and_in_a_batch(seed, k):
    gen = torch.Generator().manual_seed(seed)
    erank_avg, tau_max = 0.1, 0.9  # D = 3: erank <= 3, so tau_i = min(0.9, ~0.2 i): suppression matters
    lengths = [12, 9, 5]
    features = torch.randn(3, 12, 3, generator=gen)
    scores = torch.rand(3, 12, generator=gen)
    for b, n in enumerate(lengths):
        assert clear_of_thresholds(features[b, :n], min(k, n), erank_avg, tau_max)
    method = AgilePruner(budget=k, erank_avg=erank_avg, tau_max=tau_max)
    batch = method.select_batch(features, [None] * 3, lengths, attention=attention(scores))
    for b, n in enumerate(lengths):
        expected = brute_agile(features[b, :n], scores[b, :n], min(k, n), erank_avg, tau_max)
        assert batch[b].tolist() == expected, (b, k)
        assert batch[b].numel() == min(k, n)
        single = method.select(features[b, :n], attention=attention(scores[b, :n]))
        assert torch.equal(single, batch[b])


def test_suppression_changes_the_pick_and_tau_max_zero_is_fastervlm():
    # token 1 is a near-copy of token 0 (both top-scored); token 2 points elsewhere
    features = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.1]])
    agile = AgilePruner(budget=2, erank_avg=0.1, tau_max=0.5).select_batch(
        features, [None], attention=attention(scores)
    )
    assert agile[0].tolist() == [0, 2]
    plain = AgilePruner(budget=2, tau_max=0.0).select_batch(features, [None], attention=attention(scores))
    faster = FasterVLM(budget=2).select_batch(features, [None], attention=attention(scores))
    assert plain[0].tolist() == faster[0].tolist() == [0, 1]


def test_edge_cases_duplicates_zero_vectors_and_large_budgets():
    gen = torch.Generator().manual_seed(7)
    # duplicates of the best token are suppressed (distance 0 < tau_1 > 0), then fill the budget last
    base = torch.randn(3, generator=gen)
    features = torch.stack([base, base, base, torch.randn(3, generator=gen), torch.randn(3, generator=gen)])[None]
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.2, 0.1]])
    method = AgilePruner(budget=3, erank_avg=0.1, tau_max=0.05)
    assert method.select_batch(features, [None], attention=attention(scores))[0].tolist() == [0, 3, 4]
    assert AgilePruner(budget=4, erank_avg=0.1, tau_max=0.05).select_batch(
        features, [None], attention=attention(scores)
    )[0].tolist() == [0, 1, 3, 4]  # the fill takes the suppressed copies in score order
    # all-zero tokens: erank 0, tau 0, nothing suppressed: the top tokens by attention
    zeros = torch.zeros(1, 5, 3)
    assert method.select_batch(zeros, [None], attention=attention(scores))[0].tolist() == [0, 1, 2]
    # zero vectors among others have cosine 0 (distance 1): kept unless tau exceeds 1
    mixed = torch.cat([torch.zeros(1, 2, 3), torch.randn(1, 3, 3, generator=gen)], dim=1)
    assert brute_agile(mixed[0], scores[0], 3, 0.1, 0.9) == (
        AgilePruner(budget=3, erank_avg=0.1, tau_max=0.9)
        .select_batch(mixed, [None], attention=attention(scores))[0]
        .tolist()
    )
    # k >= N keeps everything; ties in attention go to the lower index
    assert AgilePruner(budget=50, erank_avg=0.1).select_batch(features, [None], attention=attention(scores))[
        0
    ].tolist() == list(range(5))
    flat = torch.ones(1, 5)
    assert AgilePruner(budget=2, tau_max=0.0).select_batch(features, [None], attention=attention(flat))[0].tolist() == [
        0,
        1,
    ]


def test_effective_rank_known_values():
    eye = torch.zeros(3, 6, 4)
    eye[0, :4] = torch.eye(4)  # 4 equal singular values: erank 4
    eye[1, :3, 0] = torch.tensor([1.0, 2.0, 3.0])  # rank 1: erank 1
    lengths = torch.tensor([6, 3, 2])  # item 2 all zero: erank 0
    eye[1, 4:, :] = 99.0  # padding rows are ignored
    values = effective_rank(eye, lengths)
    assert values.dtype == torch.float64
    assert torch.allclose(values, torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    assert math.isclose(float(effective_rank(x[None], torch.tensor([7]))[0]), brute_erank(x), rel_tol=1e-12)


def test_per_crop_budgets_and_newlines():
    crops = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1, 1, 1, 1, 2, 2, -1]])
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 14, generator=gen)
    features = torch.randn(1, 14, 3, generator=gen)
    method = AgilePruner(budget=8, erank_avg=0.1, tau_max=0.9)
    kept = method.select_batch(features, [None], attention=attention(scores), crops=crops)[0]
    assert kept.numel() == 8 and set(kept.tolist()) >= {7, 13}
    per_crop = {c: [i for i in kept.tolist() if crops[0, i] == c] for c in (0, 1, 2)}
    assert [len(per_crop[c]) for c in (0, 1, 2)] == [2, 3, 1]  # FasterVLM's split by crop size
    for c, chosen in per_crop.items():  # each crop runs the algorithm on its own tokens
        members = (crops[0] == c).nonzero()[:, 0]
        expected = brute_agile(features[0, members], scores[0, members], len(chosen), 0.1, 0.9)
        assert sorted(members[expected].tolist()) == chosen
    assert (
        AgilePruner(keep_ratio=0.25).select_batch(features, [None], attention=attention(scores), crops=crops)[0].numel()
        == 4
    )


def test_presets_and_errors():
    assert preset("agilepruner_64").size.budget == 64
    assert preset("agilepruner_next_640").size.budget == 640
    qwen = preset("agilepruner_qwen_778")
    assert qwen.layer == -1 and abs(qwen.size.keep_ratio - 2 / 9) < 1e-12
    from mrprune.integrations import lmms_eval

    by_name = lmms_eval.build_pruner("agilepruner", budget=5, tau_max=0.2)
    assert isinstance(by_name, AgilePruner) and by_name.size.budget == 5 and by_name.tau_max == 0.2
    with pytest.raises(ValueError, match="exactly one of budget and keep_ratio"):
        AgilePruner()
    with pytest.raises(ValueError, match="exactly one of budget and keep_ratio"):
        AgilePruner(budget=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="budget"):
        AgilePruner(budget=0)
    with pytest.raises(ValueError, match="erank_avg must be > 0"):
        AgilePruner(budget=3, erank_avg=0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="AgilePruner: erank_avg"):
            AgilePruner(budget=3, erank_avg=bad)
        with pytest.raises(ValueError, match="AgilePruner: tau_max"):
            AgilePruner(budget=3, tau_max=bad)
    with pytest.raises(TypeError, match="layer"):
        AgilePruner(budget=3, layer=1.5)
    features = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="AgilePruner: needs attention"):
        AgilePruner(budget=2).select_batch(features, [None])
    with pytest.raises(ValueError, match=r"attention\[-2\] must be"):
        AgilePruner(budget=2).select_batch(features, [None], attention={-2: torch.rand(1, 3)})
    with pytest.raises(ValueError, match="AgilePruner.select_batch: features"):
        AgilePruner(budget=2).select_batch(torch.randn(4, 2), [None], attention={-2: torch.rand(1, 4)})


# --- through the integration --------------------------------------------------------------------------------------


@torch.no_grad()
def test_tiny_llava_keep_all_and_budgets():
    pytest.importorskip("transformers")
    from mrprune.integrations import patched
    from mrprune.integrations.testing import IMAGE_TOKEN, left_pad, tiny_llava

    model = tiny_llava()
    image = [IMAGE_TOKEN] * 16
    input_ids, mask = left_pad([[1, 5, *image, 7, *image, 9], [1, 12, *image, 14]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits
    with patched(model, AgilePruner(keep_ratio=1.0, erank_avg=0.5, tau_max=1.0)):
        assert torch.equal(model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits, logits)
    with patched(model, AgilePruner(budget=5, erank_avg=0.5, tau_max=1.0)) as handle:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    kept = [k for record in handle.last for k in record.kept]
    assert [k.numel() for k in kept] == [5, 5, 5]
    assert all(torch.equal(k, k.unique()) for k in kept)
