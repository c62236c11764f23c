"""mrprune.DART: ``official=True`` against a port of the official selection (key-norm pivots, set-ordered pivot loop,
least-similar candidates), the default mode against a plain loop (exact budgets, even split), batch independence,
edge cases and errors; inside the tiny models: keep-all, kept tokens as computed from the eager model, decoding on the
cache it leaves (layers 0 .. K-1 keep the whole prompt) equal to the full-recompute oracle, batch = per sample."""

from __future__ import annotations

import pytest
import torch

import mrprune
from mrprune.layouts import GridLayout, LlavaNextLayout
from mrprune.methods import DART
from mrprune.methods.stages import PromptTokens


def official_port(keys, states, start, n, budget, image_pivots=4, text_pivots=4, next_layout=False):
    """The official ``get_retained_image_token`` on one sequence: ``keys [1, H, L, d]`` (layer K-1, after RoPE),
    ``states [1, L, D]`` (final norm of layer K-1's output), the image at ``start .. start + n``; returns the kept
    sequence positions of image tokens."""
    per_pivot = int(budget // (image_pivots + text_pivots))
    if next_layout:
        per_pivot = int(min(budget, n - image_pivots) // (image_pivots + text_pivots))
    flat = keys.permute(0, 2, 1, 3).reshape(keys.shape[0], keys.shape[2], -1)
    image_norms = torch.norm(flat[0][start : start + n], p=1, dim=-1)
    text_norms = torch.norm(flat[0][start + n :], p=1, dim=-1)
    image_indices = (image_norms.topk(image_pivots).indices + start).tolist()
    text_indices = (text_norms.topk(text_pivots).indices + start + n).tolist()
    chosen = set(image_indices + text_indices)
    valid = set(range(start, start + n))
    valid.difference_update(image_indices)
    for pivot in list(chosen.copy()):
        candidates = list(valid)
        cos = -torch.nn.functional.cosine_similarity(states[0][pivot, :], states[0][candidates, :], dim=-1)
        picked = [candidates[i] for i in cos.topk(per_pivot).indices.tolist()]
        chosen.update(picked)
        valid.difference_update(picked)
    chosen.difference_update(text_indices)
    return sorted(chosen)


def needs_of(keys, states, start, n):
    """What the llm stage hands DART for the one image of the sequence (prompt: every token after it, all text)."""
    length = keys.shape[2]
    norms = keys.permute(0, 2, 1, 3).reshape(1, length, -1).abs().sum(-1)[0]
    text = torch.cat([torch.arange(start), torch.arange(start + n, length)])
    prompt = PromptTokens(
        lengths=torch.tensor([text.numel()]),
        positions=text[None],
        after=(text >= start + n)[None],
        embeddings=states[:, text],
        hidden=states[:, text],
        key_norms=norms[text][None],
        normed=states[:, text],
    )
    return dict(
        key_norms=norms[start : start + n][None],
        normed=states[:, start : start + n],
        prompt=prompt,
        positions=torch.arange(start, start + n)[None],
    )


def sequence(seed, length, heads=4, dim=8, width=32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, length, dim, generator=generator)
    states = torch.randn(1, length, width, generator=generator)
    return keys, states


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("n", "budget", "layout"), [(64, 16, "grid"), (100, 24, "grid"), (80, 40, "next"), (30, 40, "next")]
)
def test_official_equals_the_port(seed, n, budget, layout):
    start, text = 7, 12
    keys, states = sequence(seed, start + n + text)
    next_layout = layout == "next"
    expected = torch.tensor(official_port(keys, states, start, n, budget, next_layout=next_layout)) - start
    shape = LlavaNextLayout(rows=1, cols=1, base_side=4) if next_layout else None
    method = DART(budget=budget, official=True)
    needs = needs_of(keys, states, start, n)
    if next_layout:  # the method reads the layout type only; give it a layout of n tokens
        kept = method._official(0, shape, torch.tensor([n]), **needs)
    else:
        kept = method.select_batch(states[:, start : start + n], [GridLayout(1, 1, n)], **needs)[0]
    assert torch.equal(kept, expected)
    per_pivot = (min(budget, n - 4) if next_layout else budget) // 8
    assert kept.numel() == 4 + 8 * per_pivot  # "128" keeps 132


def loop_default(key_norms, normed, text_norms, text_normed, budget, image_pivots=4, text_pivots=4):
    """The default mode on one item, as a plain loop."""
    n = key_norms.numel()
    budget = min(budget, n)
    image = sorted(range(n), key=lambda i: (-float(key_norms[i]), i))[: min(image_pivots, budget)]
    text = sorted(range(text_norms.numel()), key=lambda i: (-float(text_norms[i]), i))[:text_pivots]
    pivots = [normed[i] for i in image] + [text_normed[t] for t in text]
    rest = budget - len(image)
    pool = [i for i in range(n) if i not in image]
    kept = list(image)
    for j, pivot in enumerate(pivots):
        count = rest // len(pivots) + (1 if j < rest % len(pivots) else 0)
        cos = {i: float(torch.nn.functional.cosine_similarity(pivot, normed[i], dim=0)) for i in pool}
        picked = sorted(pool, key=lambda i: (cos[i], i))[:count]
        kept += picked
        pool = [i for i in pool if i not in picked]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget", [5, 13, 30, 200])
def test_default_equals_the_loop_and_keeps_the_budget(seed, budget):
    start, n, text = 3, 40, 9
    keys, states = sequence(seed, start + n + text)
    needs = needs_of(keys, states, start, n)
    kept = DART(budget=budget).select_batch(states[:, start : start + n], [None], **needs)[0]
    prompt = needs["prompt"]
    after = prompt.after[0]
    expected = loop_default(
        needs["key_norms"][0], needs["normed"][0], prompt.key_norms[0][after], prompt.normed[0][after], budget
    )
    assert kept.tolist() == expected
    assert kept.numel() == min(budget, n)


def test_batch_equals_items_alone():
    items = []
    for seed, (start, n, text) in enumerate([(3, 30, 5), (6, 50, 2), (2, 20, 0)]):
        keys, states = sequence(seed, start + n + text)
        items.append((states[0, start : start + n], needs_of(keys, states, start, n)))
    method = DART(budget=12)
    alone = [method.select_batch(s[None], [None], **needs)[0] for s, needs in items]
    tokens = max(s.shape[0] for s, _ in items)
    texts = max(int(needs["prompt"].lengths[0]) for _, needs in items)

    def pad(t, size, dim=1):
        shape = list(t.shape)
        shape[dim] = size - shape[dim]
        return torch.cat([t, t.new_zeros(shape)], dim)

    fields = {}
    for name in ("positions", "after", "embeddings", "hidden", "key_norms", "normed"):
        fields[name] = torch.cat([pad(getattr(needs["prompt"], name), texts) for _, needs in items])
    prompt = PromptTokens(lengths=torch.cat([needs["prompt"].lengths for _, needs in items]), **fields)
    batch = method.select_batch(
        torch.stack([pad(s, tokens, 0) for s, _ in items]),
        [None] * 3,
        torch.tensor([s.shape[0] for s, _ in items]),
        key_norms=torch.cat([pad(needs["key_norms"], tokens) for _, needs in items]),
        normed=torch.cat([pad(needs["normed"], tokens) for _, needs in items]),
        prompt=prompt,
    )
    for ours, theirs in zip(batch, alone, strict=True):
        assert torch.equal(ours, theirs)
    assert batch[2].numel() == 12  # no text after the third item: 4 image pivots share the picks


def test_arguments_and_errors():
    assert DART().size.budget == 128
    assert DART(keep_ratio=0.25).size.keep_ratio == 0.25
    with pytest.raises(ValueError, match="exactly one"):
        DART(budget=64, keep_ratio=0.5)
    with pytest.raises(ValueError, match="official=True takes a budget"):
        DART(keep_ratio=0.5, official=True)
    with pytest.raises(ValueError, match="image_pivots \\+ text_pivots"):
        DART(image_pivots=0, text_pivots=0)
    with pytest.raises(ValueError, match="layer"):
        DART(layer=0)
    keys, states = sequence(0, 30)
    needs = needs_of(keys, states, 5, 20)
    with pytest.raises(ValueError, match="key_norms"):
        DART().select_batch(states[:, 5:25], [None], **{**needs, "key_norms": needs["key_norms"][:, :3]})
    with pytest.raises(ValueError, match="prompt"):
        DART().select_batch(states[:, 5:25], [None], **{**needs, "prompt": None})
    with pytest.raises(ValueError, match="positions"):
        DART(budget=16, official=True).select_batch(states[:, 5:25], [None], **{**needs, "positions": None})


def test_zero_vectors_and_small_items():
    keys, states = sequence(1, 20)
    states[:, 8:12] = 0  # zero states: cosine 0, never NaN
    needs = needs_of(keys, states, 5, 10)
    kept = DART(budget=6).select_batch(states[:, 5:15], [None], **needs)[0]
    assert kept.numel() == 6 and kept.unique().numel() == 6
    assert torch.equal(DART(budget=50).select_batch(states[:, 5:15], [None], **needs)[0], torch.arange(10))


# -- inside the tiny models -------------------------------------------------------------------------------------------

pytest.importorskip("transformers")

from mrprune.integrations import patched  # noqa: E402
from tests.tiny_models import GREEDY, eager_copy, items_of, oracle_generate  # noqa: E402
from tests.tiny_models import LLM_CASES as CASES  # noqa: E402


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, *CASES[request.param]()


@torch.no_grad()
def eager_kept(model, inputs, positions, method, next_layout=False):
    """DART on needs computed from the unpatched eager model's hidden states and its layer K-1's own modules."""
    import sys

    eager = eager_copy(model)
    text_model = eager.model.language_model
    out = eager(**inputs, position_ids=positions, output_hidden_states=True)
    layer = method.layer
    module = text_model.layers[layer - 1]
    states = out.hidden_states[layer - 1]
    k = module.self_attn.k_proj(module.input_layernorm(states))
    k = k.view(*k.shape[:2], -1, module.self_attn.head_dim).transpose(1, 2)
    cos, sin = text_model.rotary_emb(states, positions)
    k = sys.modules[type(module.self_attn).__module__].apply_rotary_pos_emb(k, k, cos, sin)[1]
    norms = k.abs().sum(-1).sum(1)
    normed = text_model.norm(out.hidden_states[layer])
    real = inputs["attention_mask"].bool()
    items = items_of(inputs["input_ids"])
    visual = torch.zeros_like(real)
    for b, cols in items:
        visual[b, cols] = True
    kept = []
    for b, cols in items:
        text = (real[b] & ~visual[b]).nonzero()[:, 0]
        first = int(real[b].int().argmax())
        prompt = PromptTokens(
            lengths=torch.tensor([text.numel()]),
            positions=(text - first)[None],
            after=(text > cols.max())[None],
            embeddings=normed[b, text][None],
            hidden=normed[b, text][None],
            key_norms=norms[b, text][None],
            normed=normed[b, text][None],
        )
        needs = dict(key_norms=norms[b, cols][None], normed=normed[b, cols][None], prompt=prompt)
        needs["positions"] = (cols - first)[None]
        if method.official and next_layout:  # the official NeXT arithmetic reads the layout's type only
            shape = LlavaNextLayout(rows=1, cols=1, base_side=2)
            kept.append(method._official(0, shape, torch.tensor([cols.numel()]), **needs))
        else:
            kept.append(method.select_batch(normed[b, cols][None], [None], **needs)[0])
    return kept


@pytest.mark.parametrize("official", [False, True])
@torch.no_grad()
def test_generate_equals_the_oracle(case, official):
    name, model, inputs, positions, _ = case
    # official LLaVA-NeXT: per pivot min(budget, n - 4) // 8, so a budget of 24 keeps 4 + 8 * 2 of a 20+ token image
    method = DART(budget=(24 if name == "llava_next" else 6) if official else 5, layer=2, official=official)
    steps = 4
    with patched(model, method) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    ours = [k for record in handle.last for k in record.kept]
    expected = eager_kept(model, inputs, positions, method, next_layout=name == "llava_next")
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)
    real = inputs["attention_mask"].bool()
    keep = real.clone()
    for (b, cols), k in zip(items_of(inputs["input_ids"]), ours, strict=True):
        keep[b, cols] = False
        keep[b, cols[k]] = True
    tokens, scores = oracle_generate(model, inputs, positions, method, [keep], steps)
    assert torch.equal(generated.sequences[:, inputs["input_ids"].shape[1] :], tokens)
    for a, b in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@torch.no_grad()
def test_keep_all_and_batch_equal(case):
    _, model, inputs, _, singles = case
    logits = model(**inputs).logits
    with patched(model, DART(budget=10_000)):
        assert torch.equal(model(**inputs).logits, logits)
    steps = 3
    with patched(model, DART(budget=5)) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        for b, visual in enumerate(singles):
            real = inputs["attention_mask"][b].bool()
            text = {k: inputs[k][b][real][None] for k in ("input_ids", "mm_token_type_ids") if k in inputs}
            one = model.generate(**text, **visual, max_new_tokens=steps, **GREEDY)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            assert all(torch.equal(x, y) for x, y in zip(handle.last[0].kept, records[b].kept, strict=True))
        static = model.generate(**inputs, max_new_tokens=steps, cache_implementation="static", **GREEDY)
    assert torch.equal(static.sequences, both.sequences)
    assert mrprune.methods.DART is DART
