"""ToMe on Qwen2.5-VL's vision tower: the merged tower against a port in this test's own words (2 x 2 patch groups
as units, merged within windows, rotary angles of each group's first unit, ``log(size)`` on the logits), no group
across windows, merge-nothing bit-identical to the unpatched model, a batch equal to its prompts, decoding after a
merged prefill equal to a hand-written loop, ``remove()``, schedules and errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from mrprune.integrations import patch, patched  # noqa: E402
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
from mrprune.methods import MergedTokens, ToMe  # noqa: E402
from tests.tiny_models import GREEDY, PATCH, oracle_embeds, single_prompt  # noqa: E402

ATOL = 1e-5
WINDOW = 2  # units per window side: window_size 56 / patch 14 / merge 2


def deep_qwen(seed: int = 0):
    """A tiny Qwen2.5-VL whose vision tower has 3 blocks: windowed, full attention, windowed (sharp attention)."""
    model = tiny_qwen2_5_vl(layers=2, seed=seed, vision_depth=3)
    with torch.no_grad():  # queries and keys 10x: logits of order 1, so rotary angles and sizes move the softmax
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.dim] *= 10
    return model


@pytest.fixture(scope="module")
def model():
    return deep_qwen()


def make_inputs(images, videos=None):
    """Prompt 0: image 0 (and the video); prompt 1: the other images. Grids ``(t, h, w)`` in patches."""
    images = torch.tensor(images)
    videos = None if videos is None else torch.tensor(videos)
    vision = lambda token, n: [VISION_START, *[token] * n, VISION_END]  # noqa: E731
    tokens = (images.prod(-1) // 4).tolist()
    first = [1, 5, *vision(IMAGE_TOKEN, tokens[0]), 7]
    if videos is not None:
        first += [*vision(VIDEO_TOKEN, int(videos.prod(-1).sum()) // 4), 8]
    second = [1, 12, *[t for n in tokens[1:] for t in vision(IMAGE_TOKEN, n)], 13, 14]
    input_ids, attention_mask = left_pad([first, second])
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(int(images.prod(-1).sum()), PATCH, generator=generator),
        image_grid_thw=images,
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int(),
    )
    split = int(images[0].prod())
    singles = [dict(pixel_values=inputs["pixel_values"][:split], image_grid_thw=images[:1])]
    singles.append(dict(pixel_values=inputs["pixel_values"][split:], image_grid_thw=images[1:]))
    if videos is not None:
        inputs["pixel_values_videos"] = torch.randn(int(videos.prod(-1).sum()), PATCH, generator=generator)
        inputs["video_grid_thw"] = videos
        singles[0].update(pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=videos)
    return inputs, singles


#: partial windows at the edges (3 x 5 units), whole ones (4 x 6), a 2-frame video (one window per frame)
IMAGES, VIDEOS = [[1, 6, 10], [1, 8, 12]], [[2, 4, 4]]


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(IMAGES, VIDEOS)


def windows_of(grid):
    """Each token's window (frame, window row, window column) of an item ``(t, h, w)``, raster order."""
    t, h, w = grid
    frame, y, x = torch.meshgrid(torch.arange(t), torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    key = (frame * 1000 + (y // WINDOW) * 100 + x // WINDOW).flatten()
    return key


# --- the port (the tower's steps with ToMe, in this test's own words) -------------------------------------------


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def port_match(metric, r):
    """ToMe's bipartite matching on ``metric [n, C]`` (no [CLS]): ``r`` even positions, best cosines first (stable),
    each into its first most similar odd position; returns each position's surviving position."""
    n = metric.shape[0]
    r = min(r, n // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    evens, odds = list(range(0, n, 2)), list(range(1, n, 2))
    target = list(range(n))
    if r == 0 or not odds:
        return target
    scores = unit[evens] @ unit[odds].T
    best, partner = scores.max(-1)
    for e in sorted(range(len(evens)), key=lambda i: -best[i].item())[:r]:
        target[evens[e]] = odds[int(partner[e])]
    return target


def port_tower(visual, pixels, grids, r, proportional=True):
    """Every token's final state after the merger ``[N, D_out]`` (raster order, a group's tokens share it) and each
    token's group, for one tower call with ``r`` merges per window and block."""
    visual = copy.deepcopy(visual).double()
    hidden = visual.patch_embed(pixels.double())  # rows: 2 x 2 units of consecutive patches, units in raster order
    positions = []
    for t, h, w in grids.tolist():
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = (v.reshape(h // 2, 2, w // 2, 2).transpose(1, 2).flatten() for v in (ys, xs))
        positions.append(torch.stack([ys, xs], -1).repeat(t, 1))
    cos, sin = (p.double() for p in visual.rotary_pos_emb(hidden, torch.cat(positions)))
    dim, heads = hidden.shape[-1], visual.blocks[0].attn.num_heads
    units = hidden.view(-1, 4, dim)
    frames, keys = [], []
    start = 0
    for i, (t, h, w) in enumerate(grids.tolist()):
        n = t * h * w // 4
        frames.append(torch.arange(n) // (h * w // 4) + 1000 * i)
        keys.append(windows_of((t, h, w)) + 10**6 * i)
        start += n
    frames, keys = torch.cat(frames), torch.cat(keys)
    # groups: (members, state [4, D], size, first unit); one list per window
    windows = {}
    for u in range(units.shape[0]):
        windows.setdefault(int(keys[u]), []).append(([u], units[u], 1.0, u))
    for index, block in enumerate(visual.blocks):
        full = index in visual.fullatt_block_indexes
        groups = [g for window in windows.values() for g in window]
        x = torch.stack([g[1] for g in groups]).reshape(-1, dim)
        first = torch.tensor([g[3] for g in groups])
        rows = torch.stack([(first * 4)[:, None] + torch.arange(4)]).flatten()
        segment = (frames if full else keys)[first].repeat_interleave(4)
        size = torch.tensor([g[2] for g in groups], dtype=torch.float64).repeat_interleave(4)
        attention = block.attn
        qkv = attention.qkv(block.norm1(x)).view(-1, 3, heads, dim // heads)
        q, k, v = (rotate(qkv[:, i], cos[rows, None], sin[rows, None]) if i < 2 else qkv[:, i] for i in range(3))
        logits = torch.einsum("qhd,khd->hqk", q, k) * attention.scaling
        if proportional:
            logits = logits + size.log()
        logits = logits.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
        x = x + attention.proj(torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(-1, dim))
        metric = qkv[:, 1].mean(1).reshape(-1, 4 * (dim // heads))  # pre-rotary keys, a unit's 4 side by side
        states = x.view(-1, 4, dim)
        merged, at = {}, 0
        for key, window in windows.items():
            n = len(window)
            target = port_match(metric[at : at + n], r)
            survivors = sorted(set(target))
            new = []
            for s in survivors:
                parts = [p for p in range(n) if target[p] == s]
                weight = torch.tensor([window[p][2] for p in parts], dtype=torch.float64)
                state = (weight[:, None, None] * states[at + torch.tensor(parts)]).sum(0) / weight.sum()
                members = sorted(m for p in parts for m in window[p][0])
                new.append((members, state, float(weight.sum()), members[0]))
            merged[key] = new
            at += n
        windows = merged
        groups = [g for window in windows.values() for g in window]
        x = torch.stack([g[1] for g in groups]).reshape(-1, dim)
        x = x + block.mlp(block.norm2(x))
        windows = {}
        at = 0
        for key, window in merged.items():
            windows[key] = [(g[0], x.view(-1, 4, dim)[at + i], g[2], g[3]) for i, g in enumerate(window)]
            at += len(window)
    out = torch.zeros(units.shape[0], visual.merger.mlp[-1].out_features, dtype=torch.float64)
    group_of = torch.zeros(units.shape[0], dtype=torch.int64)
    merger = visual.merger
    for g, (members, state, _, _) in enumerate(group for window in windows.values() for group in window):
        out[members] = merger(state)[0]
        group_of[members] = g
    return out.float(), group_of


def same_partition(sources, groups):
    """``sources`` and ``groups`` ``[n]`` split the tokens into the same groups."""
    pairs = torch.unique(torch.stack([sources, groups]), dim=1)
    return pairs.shape[1] == sources.unique().numel() == groups.unique().numel()


@pytest.mark.parametrize("r, proportional", [(1, True), (2, True), (1, False)])
@torch.no_grad()
def test_tower_matches_the_port(model, inputs, r, proportional):
    """Each item's merged tokens: the port's groups (within windows, sizes carried over blocks, full-attention
    blocks over whole frames), each group's merged state at its first token, its weights ``1 / size``."""
    inputs, _ = inputs
    visual = model.model.visual
    with patched(model, ToMe(r=r, proportional_attention=proportional)) as handle:
        model(**inputs)
    merged = [m for record in handle.last for m in record.merged]
    expected = []
    for modality in ("image", "video"):
        out, groups = port_tower(
            visual,
            inputs[f"pixel_values{'_videos' if modality == 'video' else ''}"],
            inputs[f"{modality}_grid_thw"],
            r,
            proportional,
        )
        sizes = (inputs[f"{modality}_grid_thw"].prod(-1) // 4).tolist()
        expected += list(zip(out.split(sizes), groups.split(sizes), strict=True))
    # handle.last: prompt 0 holds image 0 then the video, prompt 1 images 1..
    order = [expected[0], expected[-1], *expected[1:-1]]
    assert len(merged) == len(order)
    for result, (out, groups) in zip(merged, order, strict=True):
        assert isinstance(result, MergedTokens)
        assert same_partition(result.sources, groups)
        first = torch.full((int(groups.max()) + 1,), groups.numel()).scatter_reduce(
            0, groups, torch.arange(groups.numel()), reduce="amin"
        )
        assert torch.equal(result.kept, first[first < groups.numel()].sort().values)
        torch.testing.assert_close(result.tokens, out[result.kept], rtol=1e-4, atol=ATOL)
        size = torch.bincount(result.sources)[result.sources]
        torch.testing.assert_close(result.weights, 1.0 / size.float())


@torch.no_grad()
def test_groups_stay_within_windows(model):
    """No group spans two windows (or frames), the token count is what the per-window schedule leaves, and the
    windows do merge (r = 1 per window and block, 3 blocks)."""
    inputs, _ = make_inputs([[1, 6, 10], [1, 8, 12], [1, 4, 12]], [[4, 4, 8]])
    with patched(model, ToMe(r=1)) as handle:
        model(**inputs)
    merged = [m for record in handle.last for m in record.merged]
    grids = [inputs["image_grid_thw"][0], inputs["video_grid_thw"][0], *inputs["image_grid_thw"][1:]]
    for result, grid in zip(merged, grids, strict=True):
        windows = windows_of(grid.tolist())
        for output in range(result.kept.numel()):
            assert windows[result.sources == output].unique().numel() == 1
        left = 0
        for key in windows.unique():
            units = int((windows == key).sum())
            for _ in range(3):
                units -= min(1, units // 2)
            left += units
        assert result.kept.numel() == left < result.sources.numel()


@torch.no_grad()
def test_merge_nothing_is_bit_identical(model, inputs):
    inputs, _ = inputs
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    for method in (ToMe(r=0), ToMe(keep_ratio=1.0)):
        with patched(model, method) as handle:
            assert torch.equal(model(**inputs).logits, logits)
            again = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        assert [r.tokens_after for r in handle.last] == [r.tokens_before for r in handle.last]
        assert all(isinstance(m, MergedTokens) for r in handle.last for m in r.merged)
        assert torch.equal(again.sequences, generated.sequences)
        assert all(torch.equal(a, b) for a, b in zip(again.logits, generated.logits, strict=True))


@pytest.mark.parametrize("method", [lambda: ToMe(r=1), lambda: ToMe(keep_ratio=0.3)], ids=["r", "keep_ratio"])
@torch.no_grad()
def test_batch_equals_single_prompts(model, inputs, method):
    inputs, singles = inputs
    steps = 3
    with patched(model, method()) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        assert sum(r.tokens_after for r in records) < sum(r.tokens_before for r in records)
        for b, visual in enumerate(singles):
            one = model.generate(**single_prompt(inputs, b, visual), max_new_tokens=steps, **GREEDY)
            for ours, theirs in zip(handle.last[0].merged, records[b].merged, strict=True):
                assert torch.equal(ours.kept, theirs.kept) and torch.equal(ours.sources, theirs.sources)
                torch.testing.assert_close(ours.tokens, theirs.tokens, rtol=0, atol=ATOL)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["original", "compact"])
@torch.no_grad()
def test_generate_after_a_merged_prefill_equals_a_decode_loop(model, inputs, mode):
    inputs, _ = inputs
    steps = 4
    with patched(model, ToMe(r=1), position_mode=mode) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    records = handle.last
    mask = inputs["attention_mask"]
    kept = kept_mask(records, mask)
    if mode == "original":  # the representatives' M-RoPE positions in the unpruned sequence
        positions = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"],
            attention_mask=mask,
        )[0]
        first = positions[..., -1] + 1
    else:
        positions, first = mask_positions(kept).expand(3, -1, -1), kept.sum(1).expand(3, -1)
    tokens, scores = greedy_decode(
        model,
        steps,
        attention_mask=kept,
        position_ids=positions,
        next_positions=first,
        inputs_embeds=oracle_embeds(model, inputs["input_ids"], records),
    )
    assert torch.equal(generated.sequences[:, inputs["input_ids"].shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def _state(model):
    modules = {
        name: (list(m._forward_hooks), list(m._forward_pre_hooks), name == "" or "forward" in m.__dict__)
        for name, m in model.named_modules()
    }
    return modules, set(model.__dict__), set(model.model.__dict__)


@torch.no_grad()
def test_remove_restores_and_no_block_patch_outlives_a_call(model, inputs):
    inputs, _ = inputs
    reference = model(**inputs).logits  # (transformers installs its output-recording hooks on a first call)
    before = _state(model)
    handle = patch(model, ToMe(r=1))
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    assert _state(model)[0] == before[0]  # the block wrappers and qkv hooks live only while the tower runs
    with pytest.raises(NotImplementedError, match="official"):  # raised while encoding: nothing left behind
        handle.pruner.official = True
        model(**inputs)
    handle.pruner.official = False
    assert _state(model)[0] == before[0]
    handle.remove()
    assert _state(model) == before
    assert torch.equal(model(**inputs).logits, reference)


def test_window_schedule():
    assert ToMe(r=2).window_schedule([[4, 2], [1]], 3) == [[2, 2, 2]] * 3
    # budget 3 of 6 units: shares 2 and 1, spread evenly over the blocks
    assert ToMe(budget=3).window_schedule([[4, 2]], 2) == [[1, 1], [1, 0]]
    # budget 1: the larger window's share; the window given none merges as far as its blocks reach (2 -> 1)
    assert ToMe(budget=1).window_schedule([[2, 4]], 3) == [[1, 0, 0], [1, 1, 1]]
    assert ToMe(keep_ratio=1.0).window_schedule([[4, 3]], 2) == [[0, 0], [0, 0]]


@torch.no_grad()
def test_flash_and_flex_attention_are_refused_with_proportional_attention(model, inputs):
    inputs, _ = inputs
    config = model.model.visual.config
    saved = config._attn_implementation
    try:
        config._attn_implementation = "flex_attention"
        with patched(model, ToMe(r=1)), pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
            model(**inputs)
    finally:
        config._attn_implementation = saved
    assert all("forward" not in block.__dict__ for block in model.model.visual.blocks)
