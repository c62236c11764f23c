"""mrprune.SparseVLM (llm stage, v1): against a port of the official selection (raters on the input embeddings,
per-budget schedule with ``min(count, v - 1)``, top-30 % recycling into density-peak clusters) stage after stage on
inputs with score gaps; default-mode budgets, batches = per sample, edge cases and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mrprune.batching import pad_batch
from mrprune.methods import MergedTokens, SparseVLM, preset
from mrprune.methods.sparsevlm import (
    RANK_SETTINGS,
    SCHEDULES,
    SCHEDULES_V2,
    gravity,
    head_scores,
    rater_scores,
    select_raters,
)
from mrprune.methods.stages import Need, PromptTokens

# --- a port of the official selection (Gumpest/SparseVLMs, USE_VERSION=1_0, batch 1), eager torch -----------------

OFFICIAL_LAYER_STAGE = {2: 0, 6: 1, 15: 2}


def official_raters(embeddings, v_start, v_num):
    """``m = softmax(V T^T, dim=text).mean(visual)``; the raters are ``where(m > m.mean())`` (text-relative)."""
    visual = embeddings[v_start : v_start + v_num]
    text = embeddings[v_start + v_num :]
    m = (visual @ text.T).softmax(1).mean(0)
    return torch.where(m > m.mean())[0]


def official_cluster_and_merge(x, cluster_num):
    """DPC-kNN as the official ``cluster_and_merge`` (batch 1): kNN density with ``k = cluster_num`` plus 1e-6
    noise, distance to a denser token, top ``rho * delta`` centres, nearest-centre assignment, ``/ (count + 1e-6)``."""
    n, c_dim = x.shape
    dist = (x[:, None] - x[None]).norm(dim=-1) / c_dim**0.5
    nearest = dist.topk(cluster_num, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    # the official code adds ``rand * 1e-6`` to the density so no two are equal; the kNN density of a mutual
    # nearest pair is equal by construction, so the port breaks exact ties by position (as mrprune, documented)
    # instead of at random, and the test data keeps every other density gap far above 1e-6
    position = torch.arange(n)
    mask = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (position[None, :] < position[:, None])
    )
    mask = mask.to(x.dtype)
    parent = (dist * mask + dist.max() * (1 - mask)).min(-1).values
    centers = (parent * density).topk(cluster_num).indices
    assign = dist[:, centers].argmin(1)
    assign[centers] = torch.arange(cluster_num)
    count = torch.zeros(cluster_num, dtype=x.dtype).index_add_(0, assign, torch.ones(n, dtype=x.dtype)) + 1e-6
    merged = torch.zeros(cluster_num, c_dim, dtype=x.dtype).index_add_(0, assign, x / count[assign][:, None])
    return merged, centers, density, parent * density


def official_stage(attention, hidden, v_start, v_num, raters, layer_idx, budget, rank=None):
    """One official pruning layer on one sequence: ``attention [H, L, L]`` probabilities of layer ``layer_idx``,
    ``hidden [L, D]`` its output; ``rank = (scale, bias)``: the first release's ``attn_postprocess_rank`` count.
    Returns the new sequence, its visual count, the kept visual indices (ascending) and, in order, the recycled
    visual indices (score order), the merged tokens and their centres (into those); ``None`` for the last four
    when the layer keeps everything."""
    text_start = v_start + v_num
    rows = attention.mean(0)[raters + text_start, v_start:text_start]
    relation = rows.mean(0)
    if rank is None:
        count = min(SCHEDULES[budget][OFFICIAL_LAYER_STAGE[layer_idx]], v_num - 1)
    else:
        r = int(torch.linalg.matrix_rank(rows.float()))
        if v_num - r == 0:  # s_flag False: nothing leaves, nothing merges
            return hidden, v_num, None, None, None, None, dict(relation=relation, rank=r)
        count = min(int(r * rank[0] + rank[1]), v_num - 1)
    mask = torch.zeros(v_num, dtype=torch.bool)
    mask[relation.topk(count).indices] = True
    dropped = torch.where(~mask)[0]
    n_rec = int(dropped.shape[0] * 0.3) + 1
    order = relation[dropped].topk(n_rec).indices
    recycled = dropped[order]
    cluster_num = int(n_rec / 10) + 1
    merged, centers, density, score = official_cluster_and_merge(hidden[v_start + recycled], cluster_num)
    kept = torch.where(mask)[0]
    sequence = torch.cat([hidden[:v_start], hidden[v_start + kept], merged, hidden[text_start:]])
    gaps = dict(relation=relation, density=density, score=score)
    return sequence, kept.numel() + cluster_num, kept, recycled, merged, centers, gaps


# --- a port of the official v2.0 selection (Gumpest/SparseVLMs branch v2.0, USE_VERSION=2_0, batch 1) -------------


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def official_rotary(positions, head_dim, base=10000.0):
    """LLaMA's rotary embedding (transformers 4.37 ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``) of an
    all-ones head vector at ``positions [L]``: ``[L, d]``."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = positions[:, None].float() * inv_freq[None]
    emb = torch.cat([freqs, freqs], -1)
    ones = torch.ones(positions.shape[0], head_dim)
    return ones * emb.cos() + rotate_half(ones) * emb.sin()


def official_stage_v2(attention, v_start, v_num, raters, positions, head_dim, layer_idx, budget, heads=14):
    """One v2.0 pruning layer on one sequence: ``attention [H, L, L]`` probabilities divided by ``rope_weights`` (the
    all-ones q / k rotated at ``positions [L]``, ``q k^T / sqrt(d)``), ``select_attn_head_by_sum`` (per head the sum
    over rater rows and visual columns, ``topk(14)``), then ``attn_postprocess_topk`` (mean over the kept heads, the
    rater rows, ``topk(min(count, v - 1))``). Returns the kept visual indices (ascending), the new positions and
    the scores and head masses (for gap screening)."""
    rope = official_rotary(positions, head_dim)
    rope_weights = rope @ rope.T / head_dim**0.5
    corrected = attention / rope_weights
    text_start = v_start + v_num
    rows = raters + text_start
    mass = corrected[:, rows, v_start:text_start].sum((1, 2))
    chosen = mass.topk(heads).indices
    relation = corrected[chosen].mean(0)[rows, v_start:text_start].mean(0)
    count = min(SCHEDULES_V2[budget][OFFICIAL_LAYER_STAGE[layer_idx]], v_num - 1)
    mask = torch.zeros(v_num, dtype=torch.bool)
    mask[relation.topk(count).indices] = True
    kept = torch.where(mask)[0]
    keep = torch.ones(positions.shape[0], dtype=torch.bool)
    keep[v_start:text_start] = mask  # v2.0: no merge, the kept tokens keep their position ids
    return kept, positions[keep], dict(relation=relation, mass=mass)


def head_attention(length, heads, v_start, v_num, raters, generator):
    """Causal ``[H, L, L]`` probabilities whose text rows pay the visual tokens a share ``0.2 .. 0.8`` of their mass
    (one per head), in the shares of :func:`rows_with_gaps` with a permutation per head, so the heads' masses and the
    kept heads' mean both have gaps."""
    logits = torch.randn(heads, length, length, generator=generator) * 3
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    text_start = v_start + v_num
    share = 0.2 + 0.6 * torch.randperm(heads, generator=generator).double() / heads
    for h in range(heads):
        rest = attention[h, text_start:].clone().double()
        rest[..., v_start:text_start] = 0
        rest = (1 - share[h]) * rest / rest.sum(-1, keepdim=True)
        rest[..., v_start:text_start] = share[h] * rows_with_gaps(raters, length - text_start, v_num, generator)
        attention[h, text_start:] = rest.float()
    return attention


# --- helpers ------------------------------------------------------------------------------------------------------


def min_gap(values):
    ordered = values.double().sort().values
    return float((ordered[1:] - ordered[:-1]).min()) if values.numel() > 1 else float("inf")


def untied_gap(values):
    """The smallest relative gap between distinct values (exact ties allowed)."""
    ordered = values.double().unique()
    return float(((ordered[1:] - ordered[:-1]) / ordered[1:]).min()) if ordered.numel() > 1 else float("inf")


def rows_with_gaps(raters, rows, n, generator):
    """``[rows, n]`` float64 attention shares: the rater rows pay the tokens the shares of one random permutation
    (spacing ``1 / sum``, perturbed per row by under a tenth of it), every other row those of another permutation, so
    the raters' mean has guaranteed gaps and differs from any mean that lets a non-rater in."""
    rater, other = ((torch.randperm(n, generator=generator) + 1).double() for _ in range(2))
    rater, other = rater / rater.sum(), other / other.sum()
    noise = (torch.rand(rows, n, generator=generator, dtype=torch.float64) - 0.5) * 0.1 * rater.min()
    is_rater = torch.zeros(rows, 1, dtype=torch.bool)
    is_rater[raters] = True
    return torch.where(is_rater, rater + noise, other)


def random_attention(length, heads, v_start, v_num, raters, generator):
    """Causal attention probabilities ``[H, L, L]`` whose text rows pay the visual tokens half their mass in the
    shares of :func:`rows_with_gaps` (every head alike)."""
    logits = torch.randn(heads, length, length, generator=generator) * 3
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    text_start = v_start + v_num
    rest = attention[:, text_start:].clone().double()
    rest[..., v_start:text_start] = 0
    rest = 0.5 * rest / rest.sum(-1, keepdim=True)
    rest[..., v_start:text_start] = 0.5 * rows_with_gaps(raters, length - text_start, v_num, generator)
    attention[:, text_start:] = rest.float()
    return attention


def clustered_tokens(n, dim, generator):
    """Hidden states around a few well separated centres (DPC-kNN has clear peaks), a distinct scale each."""
    centres = torch.randn(6, dim, generator=generator) * 4
    which = torch.randint(0, 6, (n,), generator=generator)
    return centres[which] + torch.randn(n, dim, generator=generator) * torch.rand(n, 1, generator=generator)


def prompt_tokens(text, attention, after=None):
    """A :class:`PromptTokens` of ``text [B, T, D]`` embeddings and ``attention [B, T, N]`` (all after the item)."""
    batch, length = text.shape[:2]
    positions = torch.arange(length).expand(batch, -1)
    after = torch.ones(batch, length, dtype=torch.bool) if after is None else after
    return PromptTokens(torch.full((batch,), length), positions, after, text, text, attention)


def method_stage(method, step, hidden, embeddings, v_start, v_num, n0, attention_rows):
    """Our method on one sequence at one stage (batch of one), fed like the integration feeds it."""
    text_start = v_start + v_num
    return method.select(
        hidden[v_start:text_start],
        step=step,
        prompt=prompt_tokens(embeddings[None, -attention_rows.shape[0] :], attention_rows[None]),
        input_embeddings=embeddings[v_start : v_start + n0],
        original_lengths=n0,
    )


def low_rank_rows(raters, rows, n, extra, generator):
    """Attention shares whose rater rows span exactly ``1 + extra`` dimensions: random positive mixtures of
    ``1 + extra`` random share vectors (the other rows as :func:`rows_with_gaps`)."""
    shares = rows_with_gaps(raters, rows, n, generator)
    basis = torch.rand(1 + extra, n, generator=generator, dtype=torch.float64)
    mix = torch.rand(raters.numel(), 1 + extra, generator=generator, dtype=torch.float64) + 0.1
    shares[raters] = (mix @ basis) / (mix @ basis).sum(-1, keepdim=True)
    return shares


#: Visual tokens after layers 2 / 6 / 15 on a 576-token image, worked out by hand from the official formulas:
#: keep min(s, v - 1), recycle int(0.3 d) + 1 of the d dropped into int(r / 10) + 1 clusters (192: 300 + 9 = 309,
#: 200 + 4 = 204, 110 + 3 = 113).
TRAJECTORIES = {192: [309, 204, 113], 128: [312, 117, 39], 96: [249, 55, 27], 64: [82, 32, 18]}


# --- the official selection, stage after stage ------------------------------------------------------------------


@pytest.mark.parametrize("budget", [192, 128, 96, 64])
def test_official_matches_port_over_three_stages(budget):
    generator = torch.Generator().manual_seed(budget)
    prefix, n0, m, dim, heads = 5, 576, 12, 16, 4
    embeddings = clustered_tokens(prefix + n0 + m, dim, generator)
    hidden = embeddings.clone()
    method = SparseVLM(budget=budget, official=True)
    raters = official_raters(embeddings, prefix, n0)
    ours_raters = select_raters(
        embeddings[None, prefix : prefix + n0],
        torch.tensor([n0]),
        embeddings[None, prefix + n0 :],
        torch.ones(1, m, dtype=torch.bool),
    )[0]
    assert torch.equal(ours_raters.nonzero()[:, 0], raters)
    assert 0 < raters.numel() < m
    v_num, counts = n0, []
    for step, layer_idx in enumerate((2, 6, 15)):
        hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=generator)  # "the layer's output"
        attention = random_attention(hidden.shape[0], heads, prefix, v_num, raters, generator)
        text_start = prefix + v_num
        sequence, new_v, kept, recycled, merged, centers, gaps = official_stage(
            attention, hidden, prefix, v_num, raters, layer_idx, budget
        )
        assert min_gap(gaps["relation"]) > 1e-8, "the test's scores must have gaps"
        ordered = gaps["score"].sort(descending=True).values
        boundary = (
            float(ordered[centers.numel() - 1] - ordered[centers.numel()]) if ordered.numel() > centers.numel() else 1
        )
        assert untied_gap(gaps["density"]) > 1e-5 and boundary > 1e-5, "the test's clusters must have gaps"
        rows = attention.mean(0)[text_start:, prefix:text_start]
        result = method_stage(method, step, hidden, embeddings, prefix, v_num, n0, rows)
        assert isinstance(result, MergedTokens)
        # kept tokens, plus one merged token per cluster at its centre
        representatives = torch.cat([kept, recycled[centers]]).sort().values
        assert torch.equal(result.kept, representatives)
        assert result.kept.numel() == new_v
        index = {int(t): i for i, t in enumerate(result.kept)}
        for t in kept.tolist():
            assert torch.equal(result.tokens[index[t]], hidden[prefix + t])
            assert result.weights[t] == 1 and result.sources[t] == index[t]
        for c, centre in enumerate(recycled[centers].tolist()):
            torch.testing.assert_close(result.tokens[index[centre]], merged[c], rtol=1e-5, atol=1e-5)
        # the source map: recycled tokens point at their cluster, the rest of the dropped tokens nowhere
        dropped_only = torch.ones(v_num, dtype=torch.bool)
        dropped_only[kept] = False
        dropped_only[recycled] = False
        assert bool((result.sources[dropped_only] == -1).all()) and bool((result.weights[dropped_only] == 0).all())
        assert bool((result.sources[recycled] >= 0).all())
        sums = torch.zeros(new_v).index_add_(
            0, result.sources[result.sources >= 0], result.weights[result.sources >= 0]
        )
        torch.testing.assert_close(sums, torch.ones(new_v))
        # the official next sequence: kept visual tokens, merged tokens, text (our order differs, the set does not)
        hidden, v_num = sequence, new_v
        counts.append(v_num)
    assert counts == TRAJECTORIES[budget]


def v2_stage(method, step, embeddings, v_start, v_num, n0, attention, positions, head_dim):
    """Our v2.0 method on one sequence at one stage (batch of one), fed like the integration feeds it."""
    text_start = v_start + v_num
    rotary = official_rotary(positions, head_dim)
    text = embeddings[None, -(attention.shape[1] - text_start) :]
    prompt = PromptTokens(
        torch.tensor([text.shape[1]]),
        torch.arange(text.shape[1])[None],
        torch.ones(1, text.shape[1], dtype=torch.bool),
        text,
        text,
        head_attention=attention[None, :, text_start:, v_start:text_start],
        rotary=rotary[None, text_start:],
    )
    return method.select(
        torch.zeros(v_num, embeddings.shape[1]),
        step=step,
        prompt=prompt,
        rotary=rotary[v_start:text_start],
        input_embeddings=embeddings[v_start : v_start + n0],
        original_lengths=n0,
    )


@pytest.mark.parametrize("budget", [192, 128, 96, 64])
def test_v2_official_matches_port_over_three_stages(budget):
    """v2.0 under ``official=True``: gravity-corrected attention, 14 of 20 heads, the v2.0 schedule, three stages with
    the kept tokens' original positions (LLaMA's d = 128 rotary)."""
    generator = torch.Generator().manual_seed(budget + 1)
    prefix, n0, m, dim, heads, head_dim = 5, 576, 12, 16, 20, 128
    embeddings = clustered_tokens(prefix + n0 + m, dim, generator)
    method = SparseVLM(budget=budget, version="2.0", official=True)
    assert not method.merge and method.heads == 14
    raters = official_raters(embeddings, prefix, n0)
    assert 0 < raters.numel() < m
    positions = torch.arange(prefix + n0 + m)
    v_num, origin, counts = n0, torch.arange(n0), []
    for step, layer_idx in enumerate((2, 6, 15)):
        attention = head_attention(positions.shape[0], heads, prefix, v_num, raters, generator)
        kept, new_positions, gaps = official_stage_v2(
            attention, prefix, v_num, raters, positions, head_dim, layer_idx, budget
        )
        ordered = gaps["relation"].sort(descending=True).values
        scale = float(ordered.abs().max())
        assert float(ordered[kept.numel() - 1] - ordered[kept.numel()]) > 1e-5 * scale, "the cut needs a gap"
        ordered = gaps["mass"].sort(descending=True).values
        assert float(ordered[13] - ordered[14]) > 1e-4 * float(ordered[0]), "the 14th / 15th heads need a gap"
        result = v2_stage(method, step, embeddings, prefix, v_num, n0, attention, positions, head_dim)
        assert not isinstance(result, MergedTokens)
        assert torch.equal(result, kept)
        origin, positions, v_num = origin[kept], new_positions, kept.numel()
        assert torch.equal(positions[prefix : prefix + v_num], prefix + origin)  # original positions kept
        counts.append(v_num)
    assert counts == [min(c, 575) for c in SCHEDULES_V2[budget]]


@pytest.mark.parametrize("seed", range(3))
def test_gravity_and_head_scores_match_loops(seed):
    """The gravity of LLaMA's rotary is ``2 sum_i cos(distance theta_i) / sqrt(d)``; the head scores equal loops over
    items, heads, raters and tokens (padding, unequal lengths, fewer heads than asked)."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, t, n, d = 3, 5, 6, 9, 16
    positions_t = torch.randint(0, 300, (batch, t), generator=generator)
    positions_v = torch.randint(0, 300, (batch, n), generator=generator)
    g = gravity(
        torch.stack([official_rotary(p, d) for p in positions_t]),
        torch.stack([official_rotary(p, d) for p in positions_v]),
    )
    theta = 1.0 / 10000.0 ** (torch.arange(0, d, 2).double() / d)
    distance = (positions_t[:, :, None] - positions_v[:, None, :]).double()
    closed = 2 * torch.cos(distance[..., None] * theta).sum(-1) / d**0.5
    torch.testing.assert_close(g.double(), closed, rtol=1e-4, atol=1e-4)
    attention = torch.rand(batch, heads, t, n, generator=generator, dtype=torch.float64)
    g = closed + 0.5 * closed.sign()  # away from zero: the loops and the vectorised division agree
    raters = torch.rand(batch, t, generator=generator) < 0.6
    raters[:, 0] = True
    lengths = torch.tensor([n, 4, 7])
    for keep in (2, heads, heads + 3):
        scores = head_scores(attention, g, raters, lengths, keep)
        for b in range(batch):
            v, rows = int(lengths[b]), raters[b].nonzero()[:, 0].tolist()
            masses = [
                sum(float(attention[b, h, r, j] / g[b, r, j]) for r in rows for j in range(v)) for h in range(heads)
            ]
            chosen = sorted(range(heads), key=lambda h: -masses[h])[: min(keep, heads)]
            for j in range(n):
                want = 0.0
                if j < v:
                    want = sum(float(attention[b, h, r, j] / g[b, r, j]) for h in chosen for r in rows)
                    want /= len(chosen) * len(rows)
                assert abs(float(scores[b, j]) - want) < 1e-9 * max(1.0, abs(want))


def v2_batch_inputs(batch_lengths, t=5, heads=4, d=16, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, n = len(batch_lengths), max(batch_lengths)
    lengths = torch.tensor(batch_lengths)
    text = torch.randn(batch, t, dim, generator=generator)
    attention = torch.rand(batch, heads, t, n, generator=generator)
    valid = torch.arange(n)[None] < lengths[:, None]
    attention = attention * valid[:, None, None]
    positions_v = torch.arange(n)[None].expand(batch, -1) + 3
    positions_t = torch.arange(t)[None].expand(batch, -1) + 3 + n
    rotary_v = torch.stack([official_rotary(p, d) for p in positions_v]) * valid[..., None]
    rotary_t = torch.stack([official_rotary(p, d) for p in positions_t])
    prompt = PromptTokens(
        torch.full((batch,), t),
        positions_t,
        torch.ones(batch, t, dtype=torch.bool),
        text,
        text,
        head_attention=attention,
        rotary=rotary_t,
    )
    embeddings = torch.randn(batch, n, dim, generator=generator)
    features = torch.randn(batch, n, dim, generator=generator)
    return (
        features,
        lengths,
        dict(prompt=prompt, rotary=rotary_v, input_embeddings=embeddings, original_lengths=lengths),
    )


def test_v2_batch_equals_per_sample():
    """Each item of a padded batch is scored and counted on its own (the official code reads ``attention[0]``)."""
    method = SparseVLM(budget=192, version="2.0", heads=2)
    features, lengths, kwargs = v2_batch_inputs([12, 7, 10])
    both = method.select_batch(features, [None] * 3, lengths, None, step=0, **kwargs)
    for b in range(3):
        v = int(lengths[b])
        prompt = _subset_prompt(kwargs["prompt"], b)
        single = method.select_batch(
            features[b : b + 1, :v],
            [None],
            lengths[b : b + 1],
            None,
            step=0,
            prompt=dataclasses.replace(prompt, head_attention=prompt.head_attention[..., :v]),
            rotary=kwargs["rotary"][b : b + 1, :v],
            input_embeddings=kwargs["input_embeddings"][b : b + 1, :v],
            original_lengths=lengths[b : b + 1],
        )[0]
        assert torch.equal(single, both[b])
        assert both[b].numel() == min(int(300 * v / 576 + 0.5), v)


def _subset_prompt(prompt, b):
    fields = {f.name: getattr(prompt, f.name) for f in dataclasses.fields(prompt)}
    return PromptTokens(**{k: None if t is None else t[b : b + 1] for k, t in fields.items()})


def test_v2_options_and_bad_input():
    method = SparseVLM(version="2.0")
    assert Need.ROTARY in method.needs and method.prompt_attention_heads == "per_head" and not method.merges
    assert method.schedule == SCHEDULES_V2[192] and method.layers == (3, 7, 16)
    assert Need.ROTARY not in SparseVLM().needs and SparseVLM().merge
    with pytest.raises(ValueError, match="version"):
        SparseVLM(version="2")
    with pytest.raises(ValueError, match="neither recycles"):
        SparseVLM(version="2.0", merge=True)
    with pytest.raises(ValueError, match="neither recycles"):
        SparseVLM(version="2.0", rank=True)
    with pytest.raises(ValueError, match="heads belongs"):
        SparseVLM(heads=3)
    with pytest.raises(ValueError, match="heads"):
        SparseVLM(version="2.0", heads=0)
    features, lengths, kwargs = v2_batch_inputs([6, 6])
    with pytest.raises(ValueError, match="head_attention"):
        method.select_batch(
            features,
            [None] * 2,
            lengths,
            None,
            **{**kwargs, "prompt": dataclasses.replace(kwargs["prompt"], head_attention=None)},
        )
    with pytest.raises(ValueError, match="rotary"):
        method.select_batch(features, [None] * 2, lengths, None, **{**kwargs, "rotary": kwargs["rotary"][:, :3]})
    with pytest.raises(ValueError, match="rotary"):
        no_rotary = dataclasses.replace(kwargs["prompt"], rotary=None)
        method.select_batch(features, [None] * 2, lengths, None, **{**kwargs, "prompt": no_rotary})
    with pytest.raises(TypeError, match="rotary"):  # v1 does not read it
        SparseVLM().select_batch(features, [None] * 2, lengths, None, **kwargs)


@pytest.mark.parametrize(("budget", "extra", "seed"), [(192, 2, 1), (128, 1, 0), (64, 3, 0)])
def test_official_rank_counts_match_port(budget, extra, seed):
    """The first release's ``min(int(rank * scale + bias), v - 1)`` at layers 2 / 6 / 15 / 19, chained (seeds whose
    data has the gaps the test asserts)."""
    generator = torch.Generator().manual_seed(budget + extra + seed)
    prefix, n0, m, dim, heads = 3, 576, 14, 16, 2
    embeddings = clustered_tokens(prefix + n0 + m, dim, generator)
    hidden = embeddings.clone()
    method = SparseVLM(budget=budget, rank=True, official=True)
    assert method.layers == (3, 7, 16, 20)
    raters = official_raters(embeddings, prefix, n0)
    assert raters.numel() > extra + 1
    v_num = n0
    for step, layer_idx in enumerate((2, 6, 15, 19)):
        length = hidden.shape[0]
        attention = random_attention(length, heads, prefix, v_num, raters, generator)
        rows = low_rank_rows(raters, m, v_num, extra, generator)
        attention[:, prefix + v_num :, prefix : prefix + v_num] = 0.5 * rows.float()
        sequence, new_v, kept, recycled, merged, centers, gaps = official_stage(
            attention, hidden, prefix, v_num, raters, layer_idx, budget, rank=RANK_SETTINGS[budget]
        )
        result = method_stage(
            method,
            step,
            hidden,
            embeddings,
            prefix,
            v_num,
            n0,
            attention.mean(0)[prefix + v_num :, prefix : prefix + v_num],
        )
        if kept is None:
            assert torch.equal(result.kept, torch.arange(v_num)) and gaps["rank"] == v_num
        else:
            ordered = gaps["relation"].sort(descending=True).values
            assert float(ordered[kept.numel() - 1] - ordered[kept.numel()]) > 1e-8, "the test needs a gap at the cut"
            if centers.numel() == 1:  # every density 1: the official topk may pick any top score, ours the first
                assert gaps["score"][centers[0]] == gaps["score"].max()
                centers = torch.zeros(1, dtype=torch.int64)
            else:
                score = gaps["score"].sort(descending=True).values
                boundary = float(score[centers.numel() - 1] - score[centers.numel()])
                assert untied_gap(gaps["density"]) > 1e-5 and boundary > 1e-5, "the test's clusters must have gaps"
            assert int(torch.linalg.matrix_rank(rows[raters].float())) == 1 + extra
            representatives = torch.cat([kept, recycled[centers]]).sort().values
            assert torch.equal(result.kept, representatives)
            index = {int(t): i for i, t in enumerate(result.kept)}
            for c, centre in enumerate(recycled[centers].tolist()):
                torch.testing.assert_close(result.tokens[index[centre]], merged[c], rtol=1e-5, atol=1e-5)
        hidden, v_num = sequence, new_v


def test_rank_counts_keep_everything_at_full_rank():
    """``r = v``: nothing leaves and nothing merges (official and default); otherwise default keeps min(count, v)."""
    generator = torch.Generator().manual_seed(0)
    item = stage_inputs(3, 6, seed=1)
    item["attention"] = torch.rand(6, 3, generator=generator)  # every rater row random: rank 3 = v
    for official in (False, True):
        result = run(SparseVLM(rank=True, scale=0.5, bias=0.0, official=official), 0, [item])[0]
        assert result.kept.tolist() == [0, 1, 2] and torch.equal(result.tokens, item["features"])
    item = stage_inputs(40, 6, seed=2)  # every rater row alike, rank 1 < v: keeps int(1 * 50) -> min(50, 40)
    item["attention"][item["raters"]] = item["attention"][item["raters"][0]].clone()
    assert run(SparseVLM(rank=True, scale=50.0, bias=0.0, merge=False), 0, [item])[0].kept.numel() == 40
    assert run(SparseVLM(rank=True, scale=50.0, bias=0.0, merge=False, official=True), 0, [item])[0].kept.numel() == 39
    assert run(SparseVLM(rank=True, scale=2.5, bias=3.0, merge=False), 0, [item])[0].kept.numel() == 5


# --- default mode -------------------------------------------------------------------------------------------------


def stage_inputs(n0, m, dim=16, seed=0, n=None, dtype=torch.float32, after=None):
    """One item's inputs to a stage: ``n`` current tokens (default ``n0``), attention rows with gaps between the
    raters (the official rule among the text tokens ``after`` it, default all)."""
    generator = torch.Generator().manual_seed(seed)
    n = n0 if n is None else n
    embeddings = clustered_tokens(n0 + m, dim, generator)
    features = clustered_tokens(n, dim, generator)
    after = torch.ones(m, dtype=torch.bool) if after is None else after
    candidates = after.nonzero()[:, 0]
    raters = candidates[official_raters(torch.cat([embeddings[:n0], embeddings[n0:][after]]), 0, n0)]
    return dict(
        features=features.to(dtype),
        attention=rows_with_gaps(raters, m, n, generator).float(),
        text_embeddings=embeddings[n0:].to(dtype),
        visual_embeddings=embeddings[:n0].to(dtype),
        raters=raters,
    )


def run(method, step, items, after=None):
    """``select_batch`` on a padded batch of the ``stage_inputs`` dicts."""
    features, lengths = pad_batch([i["features"] for i in items])
    text, text_lengths = pad_batch([i["text_embeddings"] for i in items])
    visual, visual_lengths = pad_batch([i["visual_embeddings"] for i in items])
    attention = torch.zeros(len(items), text.shape[1], features.shape[1])
    for b, i in enumerate(items):
        attention[b, : i["attention"].shape[0], : i["attention"].shape[1]] = i["attention"]
    real = torch.arange(text.shape[1])[None] < text_lengths[:, None]
    positions = torch.where(real, torch.arange(text.shape[1])[None], -1)
    prompt = PromptTokens(text_lengths, positions, real if after is None else after & real, text, text, attention)
    return method.select_batch(
        features,
        [None] * len(items),
        lengths,
        step=step,
        prompt=prompt,
        input_embeddings=visual,
        original_lengths=visual_lengths,
    )


def expected_size(count, n, recycle=0.3):
    dropped = n - count
    recycled = min(int(recycle * dropped) + 1, dropped) if dropped else 0
    return count + (int(recycled / 10) + 1 if recycled else 0)


@pytest.mark.parametrize(("n0", "stage"), [(576, 0), (144, 0), (144, 1), (2880 // 4, 2), (37, 1)])
def test_default_budgets_scale_with_the_image(n0, stage):
    """``round(schedule[s] * n0 / 576)`` kept by rater score, the best ``int(0.3 d) + 1`` dropped ones recycled."""
    method = SparseVLM(budget=128)
    n = n0 if stage == 0 else max(1, n0 // 2)
    item = stage_inputs(n0, 9, n=n, seed=n0)
    result = run(method, stage, [item])[0]
    count = min(int(SCHEDULES[128][stage] * n0 / 576 + 0.5), n)
    scores = item["attention"][item["raters"]].mean(0)
    order = scores.argsort(descending=True)
    kept, dropped = order[:count], order[count:]
    recycled = dropped[: min(int(0.3 * dropped.numel()) + 1, dropped.numel())] if dropped.numel() else dropped
    assert result.kept.numel() == expected_size(count, n)
    assert set(kept.tolist()) <= set(result.kept.tolist())
    assert (result.sources >= 0).nonzero()[:, 0].tolist() == sorted(kept.tolist() + recycled.tolist())
    assert bool((result.tokens[result.sources[kept]] == item["features"][kept]).all())


def test_default_equals_official_on_llava_budgets():
    for budget in SCHEDULES:
        for stage in range(3):
            n = [576, 320, 130][stage]
            item_n = stage_inputs(576, 10, n=n, seed=3 + stage)
            ours = run(SparseVLM(budget=budget), stage, [item_n])[0]
            official = run(SparseVLM(budget=budget, official=True), stage, [item_n])[0]
            if SCHEDULES[budget][stage] < n:
                assert torch.equal(ours.kept, official.kept) and torch.equal(ours.tokens, official.tokens)


def test_keep_all_schedule_returns_the_tokens_unchanged():
    method = SparseVLM(schedule=(576, 576, 576))
    items = [stage_inputs(40, 5, seed=1), stage_inputs(25, 7, seed=2)]
    for step in range(3):
        for item, result in zip(items, run(method, step, items), strict=True):
            n = item["features"].shape[0]
            assert torch.equal(result.kept, torch.arange(n))
            assert torch.equal(result.tokens, item["features"])
            assert torch.equal(result.sources, torch.arange(n)) and bool((result.weights == 1).all())


def test_official_always_drops_one_token():
    """``min(schedule, v - 1)``: with a schedule above the token count one token still leaves and is recycled
    into a cluster of its own."""
    item = stage_inputs(40, 5, seed=4)
    result = run(SparseVLM(schedule=(576, 576, 576), official=True), 0, [item])[0]
    assert result.kept.numel() == 40  # 39 kept + 1 cluster of the dropped token, at its own position
    torch.testing.assert_close(result.tokens, item["features"])
    plain = run(SparseVLM(schedule=(576, 576, 576), official=True, merge=False), 0, [item])[0]
    worst = int(item["attention"][item["raters"]].mean(0).argmin())
    assert plain.kept.tolist() == [t for t in range(40) if t != worst]
    assert run(SparseVLM(schedule=(576, 576, 576), merge=False), 0, [item])[0].kept.numel() == 40  # default: all
    one = run(SparseVLM(official=True), 0, [stage_inputs(1, 5, seed=4)])[0]  # v = 1: keeps 0, merges 1
    assert one.kept.tolist() == [0] and one.sources.tolist() == [0]


def test_batch_equals_per_sample():
    method = SparseVLM(budget=64)
    items = [stage_inputs(576, 12, seed=5), stage_inputs(144, 3, seed=6), stage_inputs(300, 20, n=90, seed=7)]
    for step in range(3):
        batched = run(method, step, items)
        for item, result in zip(items, batched, strict=True):
            single = run(method, step, [item])[0]
            for name in ("tokens", "kept", "sources", "weights"):
                assert torch.equal(getattr(result, name), getattr(single, name)), name


def test_merge_off_and_recycle_share():
    item = stage_inputs(576, 8, seed=8)
    dropped_only = run(SparseVLM(budget=192, merge=False), 0, [item])[0]
    assert dropped_only.kept.numel() == 300 and bool((dropped_only.weights[dropped_only.sources >= 0] == 1).all())
    more = run(SparseVLM(budget=192, recycle=1.0), 0, [item])[0]  # every dropped token recycled: 276 -> 28 clusters
    assert more.kept.numel() == 300 + 28 and bool((more.sources >= 0).all())
    # kept tokens are the same set: the 300 best by rater score
    scores = item["attention"][item["raters"]].mean(0)
    best = scores.topk(300).indices.sort().values
    assert torch.equal(dropped_only.kept, best)
    assert set(best.tolist()) <= set(more.kept.tolist())


def test_half_precision_tokens():
    item = stage_inputs(144, 6, seed=9, dtype=torch.bfloat16)
    result = run(SparseVLM(budget=128), 0, [item])[0]
    assert result.tokens.dtype == torch.bfloat16
    reference = run(SparseVLM(budget=128), 0, [{**item, "features": item["features"].float()}])[0]
    assert torch.equal(result.kept, reference.kept)


# --- raters and scores against loops ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_raters_and_scores_match_loops(seed):
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64)
    text = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    visual_lengths, text_lengths = torch.tensor([7, 4, 2]), torch.tensor([6, 3, 5])
    text_mask = torch.arange(6)[None] < text_lengths[:, None]
    raters = select_raters(visual, visual_lengths, text, text_mask)
    attention = torch.rand(3, 6, 7, generator=generator, dtype=torch.float64)
    scores = rater_scores(attention, raters)
    for b in range(3):
        n, m = int(visual_lengths[b]), int(text_lengths[b])
        relevance = [0.0] * m
        for i in range(n):
            logits = [float(visual[b, i] @ text[b, t]) for t in range(m)]
            top = max(logits)
            exps = [torch.tensor(x - top).exp().item() for x in logits]
            for t in range(m):
                relevance[t] += exps[t] / sum(exps) / n
        mean = sum(relevance) / m
        expected = [relevance[t] > mean for t in range(m)] + [False] * (6 - m)
        assert raters[b].tolist() == expected
        chosen = [t for t in range(6) if expected[t]]
        for j in range(7):
            assert abs(float(scores[b, j]) - sum(float(attention[b, t, j]) for t in chosen) / len(chosen)) < 1e-12


def test_raters_strictly_above_the_mean():
    """``m = [0.5, 0.25, 0.25, 0]`` exactly (softmaxes of one-hot logits of 200): the mean 0.25 is no rater."""
    text = torch.eye(4)[[0, 1, 1, 2]][None]
    visual = 200 * torch.eye(4)[[0, 1]][None]
    raters = select_raters(visual, torch.tensor([2]), text, torch.ones(1, 4, dtype=torch.bool))
    assert raters.tolist() == [[True, False, False, False]]


def test_constant_relevance_uses_every_text_token():
    visual, text = torch.randn(1, 4, 3), torch.randn(1, 1, 3)
    assert select_raters(visual, torch.tensor([4]), text, torch.ones(1, 1, dtype=torch.bool)).tolist() == [[True]]
    same, mask = torch.ones(1, 3, 3), torch.tensor([[True, True, False]])
    assert select_raters(visual, torch.tensor([4]), same, mask).tolist() == [[True, True, False]]


# --- edges and errors ---------------------------------------------------------------------------------------------


def test_empty_batch_and_items_without_text_after_them():
    method = SparseVLM()
    assert method.select_batch(torch.zeros(0, 5, 16), [], torch.zeros(0, dtype=torch.int64)) == []
    later = torch.tensor([False, False, False, True, True, True])
    items = [stage_inputs(40, 6, seed=s, after=later) for s in (10, 11, 13)]
    after = torch.stack([later, later, torch.zeros(6, dtype=torch.bool)])  # the third image ends its prompt
    with pytest.raises(ValueError, match="SparseVLM: every item needs text tokens after it"):
        run(method, 0, items, after=after)
    # text tokens before the item are no raters' candidates: the rule runs on those after it
    after = torch.stack([later] * 3)
    ours = run(method, 0, items, after=after)
    count = int(300 * 40 / 576 + 0.5)
    for b, item in enumerate(items):
        assert bool(later[item["raters"]].all())
        best = item["attention"][item["raters"]].mean(0).topk(count).indices
        assert set(best.tolist()) <= set(ours[b].kept.tolist())


def test_bad_input():
    item = stage_inputs(20, 4, seed=12)
    method = SparseVLM()
    features = item["features"][None]
    prompt = prompt_tokens(item["text_embeddings"][None], item["attention"][None])
    good = dict(prompt=prompt, input_embeddings=item["visual_embeddings"][None], original_lengths=torch.tensor([20]))
    with pytest.raises(ValueError, match="SparseVLM: step must be an int in"):
        method.select_batch(features, [None], step=3, **good)
    bad = prompt_tokens(item["text_embeddings"][None], item["attention"][None, :, :5])
    with pytest.raises(ValueError, match="SparseVLM: prompt.attention must be"):
        method.select_batch(features, [None], **{**good, "prompt": bad})
    nan = prompt_tokens(item["text_embeddings"][None], item["attention"][None] * float("nan"))
    with pytest.raises(ValueError, match="SparseVLM: prompt.attention must be finite"):
        method.select_batch(features, [None], **{**good, "prompt": nan})
    with pytest.raises(ValueError, match="SparseVLM: prompt must be the PromptTokens"):
        method.select_batch(features, [None], **{**good, "prompt": None})
    with pytest.raises(ValueError, match="SparseVLM: input_embeddings must be"):
        method.select_batch(features, [None], **{**good, "input_embeddings": None})
    with pytest.raises(ValueError, match="SparseVLM: input_embeddings must be"):
        method.select_batch(features, [None], **{**good, "original_lengths": torch.tensor([19])})
    with pytest.raises(ValueError, match="budget must be one of"):
        SparseVLM(budget=100)
    with pytest.raises(ValueError, match="same non-zero length"):
        SparseVLM(scoring_layers=(2, 6))
    with pytest.raises(ValueError, match="scoring_layers must increase"):
        SparseVLM(scoring_layers=(2, 2, 15))
    with pytest.raises(TypeError, match="must be sequences"):
        SparseVLM(scoring_layers=2)
    with pytest.raises(ValueError, match="recycle"):
        SparseVLM(recycle=1.5)
    with pytest.raises((TypeError, ValueError), match="official"):
        SparseVLM(official=None)
    with pytest.raises((TypeError, ValueError), match="budget"):
        SparseVLM(budget=192.0)
    with pytest.raises(ValueError, match="rank counts replace the schedule"):
        SparseVLM(rank=True, schedule=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="rank counts have settings for budgets"):
        SparseVLM(budget=96, rank=True)
    with pytest.raises(ValueError, match="scale and bias belong to rank=True"):
        SparseVLM(scale=2.0)
    with pytest.raises(ValueError, match="scale"):
        SparseVLM(rank=True, scale=-1.0, bias=0.0)
    assert SparseVLM(budget=96, rank=True, scale=1.0, bias=2.0).layers == (3, 7, 16, 20)


def test_declarations():
    method = SparseVLM()
    assert method.layers == (3, 7, 16) and method.stage.value == "llm" and method.merges
    assert SparseVLM(scoring_layers=(1, 2, 3)).layers == (2, 3, 4)
    assert not method.prune_earlier_cache


def test_lmms_eval_names():
    from mrprune.integrations import lmms_eval as plugin

    assert plugin.build_pruner("sparsevlm_64").schedule == SCHEDULES[64]
    method = plugin.build_pruner("SparseVLM", budget=128, official=True)
    assert isinstance(method, SparseVLM) and method.official and method.schedule == SCHEDULES[128]


def test_presets():
    assert preset("sparsevlm_192").schedule == SCHEDULES[192]
    assert preset("sparsevlm_next_640").schedule == SCHEDULES[128]
    assert preset("sparsevlm_next_320").schedule == SCHEDULES[64]
    assert preset("sparsevlm_qwen_667").schedule == SCHEDULES[192]
    assert preset("sparsevlm_qwen_889").schedule == SCHEDULES[64]
    assert preset("sparsevlm_64", official=True).official
    ranked = preset("sparsevlm_rank_128")
    assert ranked.rank and (ranked.scale, ranked.bias) == RANK_SETTINGS[128] and ranked.layers == (3, 7, 16, 20)
    for name, budget in (("sparsevlm_v2_96", 96), ("sparsevlm_v2_next_640", 128)):
        v2 = preset(name)
        assert v2.version == "2.0" and v2.schedule == SCHEDULES_V2[budget] and v2.heads == 14 and not v2.merge


# --- tiny models (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; 4 decoder layers) -------------------------------------------

try:
    import transformers  # noqa: F401
except ImportError:  # the method tests above run without it
    CASES = {}
else:
    from mrprune.integrations import patched
    from tests.tiny_models import GREEDY, eager_copy, hide_hooks, items_of, layer_hidden, recompute_loop
    from tests.tiny_models import LLM_CASES as CASES  # the llm stage's cases

HF_ATOL = 1e-4  # the oracle runs eager attention without a cache, the patched model SDPA with one


class Recording(SparseVLM):
    """SparseVLM that records, per pruning layer, each item's current tokens (original indices) and its result."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _select_batch(self, features, layouts, lengths, texts, origin=None, **kwargs):
        results = super()._select_batch(features, layouts, lengths, texts, **kwargs)
        self.calls.append(
            [(origin[i, : int(n)].clone(), r) for i, (n, r) in enumerate(zip(lengths, results, strict=True))]
        )
        return results


def tiny_method(**kwargs):
    """Scoring layers 0 / 1 / 2 of the 4-layer models (pruning at the entry of 1 / 2 / 3)."""
    return Recording(scoring_layers=(0, 1, 2), **kwargs)


def tiny_v2(**kwargs):
    """v2.0 at scoring layers 0 / 1 / 2, keeping 2 of the tiny models' 4 query heads (2 key heads: GQA)."""
    return Recording(scoring_layers=(0, 1, 2), version="2.0", heads=2, **kwargs)


def skip_mrope(name):
    if name == "qwen2_5_vl":
        pytest.skip("M-RoPE: v2.0 is refused there (test_hf_v2_refuses_mrope)")


def tiny_version(version: str, name: str, **kwargs):
    """``tiny_method`` (v1) or ``tiny_v2``; v2.0 skips Qwen2.5-VL (M-RoPE, refused)."""
    if version == "2.0":
        skip_mrope(name)
        return tiny_v2(**kwargs)
    return tiny_method(**kwargs)


@pytest.fixture(scope="module", params=list(CASES) or [pytest.param(None, marks=pytest.mark.skip("no transformers"))])
def hf_case(request):
    return request.param, *CASES[request.param]()


def merge_hooks(model, inputs, method, upto=None):
    """Pre-hooks on the pruning layers of the unpatched eager model (those of the first ``upto`` recorded calls) that
    replace, per item, every output token's representative row by the mean of its sources' states (the recorded
    source map); with :func:`hide_hooks` this is the pruned model written out by hand."""
    items = items_of(inputs["input_ids"])
    layers = model.model.language_model.layers

    def hook(step):
        def merge(module, args, kwargs):
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
            for (b, cols), (origin, result) in zip(items, method.calls[step], strict=True):
                if not isinstance(result, MergedTokens):  # v2.0: a plain selection, nothing merged
                    continue
                for out, representative in enumerate(result.kept.tolist()):
                    sources = origin[(result.sources == out).nonzero()[:, 0]]
                    hidden[b, cols[origin[representative]]] = hidden[b, cols[sources]].mean(0)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return merge

    calls = range(len(method.calls) if upto is None else upto)
    return [layers[method.layers[s]].register_forward_pre_hook(hook(s), with_kwargs=True) for s in calls]


def kept_by_stage_of(inputs, method):
    """Per pruning layer, the prompt columns still present after it (representatives of the output tokens)."""
    real = inputs["attention_mask"].bool()
    items = items_of(inputs["input_ids"])
    stages = []
    for call in method.calls:
        keep = real.clone()
        for (b, cols), (origin, result) in zip(items, call, strict=True):
            keep[b, cols] = False
            keep[b, cols[origin[result.kept if isinstance(result, MergedTokens) else result]]] = True
        stages.append(keep)
    return stages


@torch.no_grad()
def oracle_generate(model, inputs, positions, method, steps):
    """Greedy tokens and logits of the unpatched eager model with the recorded merges written into the states and the
    dropped prompt columns hidden from each layer on (each group of layers keeps the prompt it saw), the whole
    sequence recomputed at every step."""
    eager = eager_copy(model)
    real = inputs["attention_mask"].bool()
    hidden = layer_hidden(real, method, kept_by_stage_of(inputs, method))
    hooks = hide_hooks(eager, hidden, hidden) + merge_hooks(eager, inputs, method)
    return recompute_loop(eager, inputs, positions, hooks, steps)


@torch.no_grad()
def eager_selection(model, inputs, positions, method, step):
    """Each item's kept tokens at pruning layer ``step`` (original indices), chosen here from the eager model: raters
    by the official rule on its input embeddings among the text after the item, their head-averaged attention
    probabilities to the item's current tokens in the scoring layer (the merges and drops of earlier layers written
    in by hand), the default-mode count."""
    eager = eager_copy(model)
    real = inputs["attention_mask"].bool()
    items = items_of(inputs["input_ids"])
    text_model = eager.model.language_model
    hooks = hide_hooks(eager, layer_hidden(real, method, kept_by_stage_of(inputs, method), upto=step))
    hooks += merge_hooks(eager, inputs, method, upto=step)
    embeds = []
    hooks.append(
        text_model.layers[0].register_forward_pre_hook(
            lambda m, a, k: embeds.append(k["hidden_states"] if "hidden_states" in k else a[0]), with_kwargs=True
        )
    )
    try:
        out = eager(**inputs, position_ids=positions, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    probs = out.attentions[method.layers[step] - 1].mean(1)  # [B, L, L]
    visual = torch.zeros_like(real)
    for b, cols in items:
        visual[b, cols] = True
    kept = []
    for (b, cols), (origin, _) in zip(items, method.calls[step], strict=True):
        text = (real[b] & ~visual[b]).nonzero()[:, 0]
        text = text[text > cols.max()]
        raters = text[official_raters(torch.cat([embeds[0][b, cols], embeds[0][b, text]]), 0, cols.numel())]
        raters = text if raters.numel() == 0 else raters  # one text token after the item: no rater above the mean
        scores = probs[b][raters][:, cols[origin]].mean(0)
        count = min(int(method.schedule[step] * cols.numel() / 576 + 0.5), origin.numel())
        kept.append(origin[scores.topk(count).indices].sort().values)
    return kept


@torch.no_grad()
def test_hf_generate_equals_the_hand_written_loop(hf_case):
    """Three pruning layers with merges: the kept tokens at each are the eager model's rater top-k, and greedy
    decoding on the cache the stages left equals the full-recompute loop with the merges and drops written in."""
    _, model, inputs, positions, _ = hf_case
    method = tiny_method(budget=192)
    steps = 4
    with patched(model, method) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    assert len(method.calls) == 3
    assert any(bool((r.weights < 1).any() & (r.weights > 0).any()) for _, r in method.calls[0])  # something merged
    for step in range(3):
        expected = eager_selection(model, inputs, positions, method, step)
        for (origin, result), theirs in zip(method.calls[step], expected, strict=True):
            assert set(theirs.tolist()) <= set(origin[result.kept].tolist())  # the kept ones, plus cluster centres
            assert result.kept.numel() == expected_size(theirs.numel(), origin.numel())
    records = [m for record in handle.last for m in record.merged]
    assert all(isinstance(m, MergedTokens) for m in records)
    tokens, scores = oracle_generate(model, inputs, positions, method, steps)
    assert torch.equal(generated.sequences[:, inputs["input_ids"].shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=HF_ATOL)


@torch.no_grad()
@pytest.mark.parametrize("version", ["1", "2.0"])
def test_hf_keep_all_equals_unpatched(hf_case, version):
    name, model, inputs, _, _ = hf_case
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    with patched(model, tiny_version(version, name, schedule=(576, 576, 576))) as handle:
        assert torch.equal(model(**inputs).logits, logits)
        again = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    assert [r.tokens_after for r in handle.last] == [r.tokens_before for r in handle.last]
    assert torch.equal(again.sequences, generated.sequences)
    for a, b in zip(again.logits, generated.logits, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
@pytest.mark.parametrize("version", ["1", "2.0"])
def test_hf_batch_equals_single_prompts(hf_case, version):
    name, model, inputs, _, singles = hf_case
    steps = 3
    with patched(model, tiny_version(version, name, budget=128)) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        assert any(r.tokens_after < r.tokens_before for r in records)
        for b, visual in enumerate(singles):
            real = inputs["attention_mask"][b].bool()
            text = {k: inputs[k][b][real][None] for k in ("input_ids", "mm_token_type_ids") if k in inputs}
            one = model.generate(**text, **visual, max_new_tokens=steps, **GREEDY)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=HF_ATOL)
            assert all(torch.equal(x, y) for x, y in zip(handle.last[0].kept, records[b].kept, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("version", ["1", "2.0"])
def test_hf_static_cache_and_remove(hf_case, version):
    name, model, inputs, _, _ = hf_case
    hooks_before = {n: list(m._forward_pre_hooks) for n, m in model.named_modules()}
    logits = model(**inputs).logits
    with patched(model, tiny_version(version, name, budget=64)):
        dynamic = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        static = model.generate(**inputs, max_new_tokens=3, cache_implementation="static", **GREEDY)
    assert torch.equal(static.sequences, dynamic.sequences)
    for ours, theirs in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert {n: list(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks_before
    assert "forward" not in model.__dict__
    assert torch.equal(model(**inputs).logits, logits)


# --- v2.0 on the tiny models (LLaVA-1.5, LLaVA-NeXT; Qwen2.5-VL's M-RoPE refused) ---------------------------------


@torch.no_grad()
def eager_selection_v2(model, inputs, positions, method, step):
    """Each item's kept tokens at pruning layer ``step`` from the eager model (the drops of earlier layers written in
    by hand): raters as :func:`eager_selection`, every head's attention probabilities divided by the closed-form
    gravity ``2 s^2 sum_i cos((p_t - p_v) theta_i) / sqrt(d)`` of the model's rotary (``inv_freq``, ``s`` its
    attention scaling) at the original positions, the ``method.heads`` heads of most corrected rater-to-item
    attention averaged, the default-mode count. Also returns the gap at each item's cut (for screening)."""
    eager = eager_copy(model)
    real = inputs["attention_mask"].bool()
    items = items_of(inputs["input_ids"])
    text_model = eager.model.language_model
    hooks = hide_hooks(eager, layer_hidden(real, method, kept_by_stage_of(inputs, method), upto=step))
    embeds = []
    hooks.append(
        text_model.layers[0].register_forward_pre_hook(
            lambda m, a, k: embeds.append(k["hidden_states"] if "hidden_states" in k else a[0]), with_kwargs=True
        )
    )
    try:
        out = eager(**inputs, position_ids=positions, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    probs = out.attentions[method.layers[step] - 1]  # [B, H, L, L]
    rotary = text_model.rotary_emb
    theta = rotary.inv_freq.double()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    visual = torch.zeros_like(real)
    for b, cols in items:
        visual[b, cols] = True
    kept, gaps = [], []
    for (b, cols), (origin, _) in zip(items, method.calls[step], strict=True):
        text = (real[b] & ~visual[b]).nonzero()[:, 0]
        text = text[text > cols.max()]
        raters = text[official_raters(torch.cat([embeds[0][b, cols], embeds[0][b, text]]), 0, cols.numel())]
        raters = text if raters.numel() == 0 else raters
        current = cols[origin]
        distance = (positions[b, raters][:, None] - positions[b, current][None]).double()
        g = 2 * scaling**2 * torch.cos(distance[..., None] * theta).sum(-1) / (2 * theta.numel()) ** 0.5
        corrected = probs[b][:, raters][:, :, current].double() / g  # [H, raters, N]
        chosen = corrected.sum((1, 2)).topk(method.heads).indices
        scores = corrected[chosen].mean(0).mean(0)
        count = min(int(method.schedule[step] * cols.numel() / 576 + 0.5), origin.numel())
        ordered = scores.sort(descending=True).values
        gaps.append(float(ordered[count - 1] - ordered[count]) if 0 < count < ordered.numel() else 1.0)
        kept.append(origin[scores.topk(count).indices].sort().values)
    return kept, gaps


@torch.no_grad()
def test_hf_v2_refuses_mrope(hf_case):
    name, model, _, _, _ = hf_case
    if name != "qwen2_5_vl":
        pytest.skip("1-D RoPE: v2.0 runs (the tests below)")
    with pytest.raises(NotImplementedError, match="M-RoPE"), patched(model, tiny_v2()):
        pass


@torch.no_grad()
def test_hf_v2_generate_equals_the_hand_written_loop(hf_case):
    """v2.0 at three pruning layers: the kept tokens at each are the eager model's gravity-corrected top-head
    selection, and greedy decoding on the cache the stages left equals the full-recompute loop with the drops
    written in (original positions kept)."""
    name, model, inputs, positions, _ = hf_case
    skip_mrope(name)
    method = tiny_v2(budget=192)
    steps = 4
    with patched(model, method):
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    assert len(method.calls) == 3
    for step in range(3):
        expected, gaps = eager_selection_v2(model, inputs, positions, method, step)
        for (origin, result), theirs, gap in zip(method.calls[step], expected, gaps, strict=True):
            assert gap > 1e-6, "the tiny model's scores need a gap at the cut"
            assert not isinstance(result, MergedTokens)
            assert torch.equal(origin[result].sort().values, theirs)  # recorded before select_batch sorts
    tokens, scores = oracle_generate(model, inputs, positions, method, steps)
    assert torch.equal(generated.sequences[:, inputs["input_ids"].shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=HF_ATOL)


class FieldRecording(SparseVLM):
    """v2.0 that records the per-head rows and rotary vectors the llm stage hands it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields = []

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        self.fields.append((kwargs["prompt"], kwargs["rotary"], lengths.clone()))
        return super()._select_batch(features, layouts, lengths, texts, **kwargs)


@torch.no_grad()
def test_hf_v2_fields_equal_the_eager_model(hf_case):
    """At the first pruning layer: ``prompt.head_attention`` is every head's eager attention probabilities (GQA keys
    shared), and ``gravity(prompt.rotary, rotary)`` the closed-form RoPE-only logit of the model's rotary at the
    tokens' positions."""
    name, model, inputs, positions, _ = hf_case
    skip_mrope(name)
    method = FieldRecording(scoring_layers=(1, 2), schedule=(300, 200), version="2.0", heads=2)
    with patched(model, method):
        model(**inputs, position_ids=positions)
    out = eager_copy(model)(**inputs, position_ids=positions, output_attentions=True)
    probs = out.attentions[1]  # [B, H, L, L]: scoring layer 1
    rotary = model.model.language_model.rotary_emb
    theta = rotary.inv_freq.double()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    prompt, item_rotary, lengths = method.fields[0]
    g = gravity(prompt.rotary, item_rotary)
    real = inputs["attention_mask"].bool()
    items = items_of(inputs["input_ids"])
    visual = torch.zeros_like(real)
    for b, cols in items:
        visual[b, cols] = True
    for i, (b, cols) in enumerate(items):
        text = (real[b] & ~visual[b]).nonzero()[:, 0]
        t, n = text.numel(), cols.numel()
        assert int(prompt.lengths[i]) == t and int(lengths[i]) == n
        ours = prompt.head_attention[i, :, :t, :n]
        torch.testing.assert_close(ours, probs[b][:, text][:, :, cols], rtol=0, atol=1e-6)
        distance = (positions[b, text][:, None] - positions[b, cols][None]).double()
        closed = 2 * scaling**2 * torch.cos(distance[..., None] * theta).sum(-1) / (2 * theta.numel()) ** 0.5
        torch.testing.assert_close(g[i, :t, :n].double(), closed, rtol=1e-5, atol=1e-5)
