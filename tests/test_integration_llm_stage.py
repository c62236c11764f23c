"""The multi-layer ``llm`` stage on every tiny model (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; 4 decoder layers).

Methods prune at several layers; the layers before each stage keep the longer prompt in their cache (PDrop) or drop
it too (a FastV-like staged method). The oracle is a hand-written greedy loop on the *unpatched* eager model that
recomputes the whole sequence at every step and hides, per decoder layer, the prompt tokens the pruned model no
longer has there (prompt rows: dropped at a pruning layer at or before it; generated rows: the same, or the final
dropped set when every layer's cache is pruned). The kept tokens are checked stage by stage against the eager
attention of the same masked model; the needs of the stage (prompt attention, key norms, normed states) against the
eager model's own attention probabilities and hidden states.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patched  # noqa: E402
from mrprune.methods.base import Pruner, round_half_up, top_tokens  # noqa: E402
from mrprune.methods.results import MergedTokens  # noqa: E402
from mrprune.methods.stages import Need, Stage  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    GREEDY,
    LLM_CASES,
    eager_copy,
    hide_hooks,
    items_of,
    layer_hidden,
    oracle_generate,
)

ATOL = 1e-4  # the oracle runs eager attention without a cache, the patched model SDPA with one


class StagedTopK(Pruner):
    """Test method: FastV's rule at several layers (scored by the layer before, every layer's cache pruned)."""

    stage = Stage.LLM
    needs = Pruner.needs | {Need.LAST_QUERY_ATTENTION}
    score_offset = -1
    prune_earlier_cache = True

    def __init__(self, layers, ratios):
        self.layers, self.ratios = tuple(layers), tuple(ratios)

    def count(self, step, original, current):
        return min(round_half_up(self.ratios[step] * original), current)

    def _select_batch(self, features, layouts, lengths, texts, attention=None, step=0, original_lengths=None, **kw):
        counts = [self.count(step, n0, n) for n0, n in zip(original_lengths.tolist(), lengths.tolist(), strict=True)]
        return top_tokens(attention.float(), lengths, counts)


METHODS = {
    "pdrop": lambda keep=None: mrprune.methods.PDrop(layers=(1, 2, 3), ratios=keep or (0.5, 0.25, 0.125)),
    "pdrop_official": lambda keep=None: mrprune.methods.PDrop(layers=(1, 3), ratios=keep or (0.6, 0.3), official=True),
    "staged": lambda keep=None: StagedTopK(layers=(1, 3), ratios=keep or (0.6, 0.3)),
    # official floor counts empty small items: an emptied item sits out the later pruning layers
    "pdrop_emptying": lambda keep=None: mrprune.methods.PDrop(layers=(1, 3), ratios=keep or (0.1, 0.05), official=True),
}


@pytest.fixture(scope="module", params=list(LLM_CASES))
def case(request):
    return request.param, *LLM_CASES[request.param]()


@torch.no_grad()
def expected_stages(model, inputs, positions, method):
    """The kept columns after each pruning layer, chosen on the eager attention of the masked unpatched model."""
    eager = eager_copy(model)
    real = inputs["attention_mask"].bool()
    items = items_of(inputs["input_ids"])
    survivors = [cols for _, cols in items]
    kept_by_stage = []
    for step, layer in enumerate(method.layers):
        hooks = hide_hooks(eager, layer_hidden(real, method, kept_by_stage, upto=step))
        try:
            attentions = eager(**inputs, position_ids=positions, output_attentions=True).attentions
        finally:
            for hook in hooks:
                hook.remove()
        scores = attentions[layer + method.score_offset][:, :, -1].mean(1)  # the last column is every prompt's last
        keep = real.clone()
        for i, (b, cols) in enumerate(items):
            current = survivors[i]
            count = method.count(step, cols.numel(), current.numel())
            survivors[i] = current[scores[b, current].topk(count).indices.sort().values]
            keep[b, cols] = False
            keep[b, survivors[i]] = True
        kept_by_stage.append(keep)
    return kept_by_stage, [(b, cols, s) for (b, cols), s in zip(items, survivors, strict=True)]


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_generate_equals_the_staged_oracle(case, method):
    """Kept tokens stage by stage as the eager attention picks them, and greedy decoding on the cache the stages left
    (layers of different lengths, or all pruned) equal to the hand-written full-recompute loop."""
    _, model, inputs, positions, _ = case
    pruner = METHODS[method]()
    steps = 4
    kept_by_stage, expected = expected_stages(model, inputs, positions, pruner)
    with patched(model, pruner) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    kept = [(b, k) for b, record in enumerate(handle.last) for k in record.kept]
    assert len(kept) == len(expected)
    for (b, ours), (row, cols, theirs) in zip(kept, expected, strict=True):
        assert b == row
        assert torch.equal(cols[ours], theirs)
    tokens, scores = oracle_generate(model, inputs, positions, pruner, kept_by_stage, steps)
    assert torch.equal(generated.sequences[:, inputs["input_ids"].shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["pdrop", "staged"])
@torch.no_grad()
def test_keep_all_equals_unpatched(case, method):
    _, model, inputs, _, _ = case
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    pruner = METHODS[method]((1.0,) * len(METHODS[method]().layers))
    with patched(model, pruner) as handle:
        assert torch.equal(model(**inputs).logits, logits)
        again = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    assert [r.tokens_after for r in handle.last] == [r.tokens_before for r in handle.last]
    assert torch.equal(again.sequences, generated.sequences)
    for a, b in zip(again.logits, generated.logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["pdrop", "staged"])
@torch.no_grad()
def test_batch_equals_single_prompts(case, method):
    _, model, inputs, _, singles = case
    steps = 3
    with patched(model, METHODS[method]()) as handle:
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


@pytest.mark.parametrize("method", ["pdrop", "staged"])
@torch.no_grad()
def test_static_cache_equals_dynamic_cache(case, method):
    """``cache_implementation="static"``: every layer group fills its own number of slots; greedy decoding, beam
    search and several return sequences match the dynamic cache."""
    import transformers
    from packaging.version import Version

    name, model, inputs, _, _ = case
    variants = [{}, {"num_beams": 2, "num_return_sequences": 2}]
    if name == "llava_next" and Version(transformers.__version__).release < (5, 23):
        variants = variants[:1]  # see tests/test_integration_stages.py::test_static_cache_equals_dynamic_cache
    with patched(model, METHODS[method]()) as handle:
        for extra in variants:
            dynamic = model.generate(**inputs, max_new_tokens=3, **GREEDY, **extra)
            kept = handle.last
            static = model.generate(**inputs, max_new_tokens=3, cache_implementation="static", **GREEDY, **extra)
            assert all(
                torch.equal(x, y)
                for a, b in zip(kept, handle.last, strict=True)
                for x, y in zip(a.kept, b.kept, strict=True)
            )
            assert torch.equal(static.sequences, dynamic.sequences)
            for ours, theirs in zip(static.logits, dynamic.logits, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@torch.no_grad()
def test_remove_restores_the_model(case):
    _, model, inputs, _, _ = case
    hooks_before = {name: list(m._forward_pre_hooks) for name, m in model.named_modules()}
    logits = model(**inputs).logits
    with patched(model, METHODS["pdrop"]()):
        model.generate(**inputs, max_new_tokens=2)
    assert {name: list(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks_before
    assert "forward" not in model.__dict__
    assert torch.equal(model(**inputs).logits, logits)


class Recorder(Pruner):
    """Test method: records what the stage hands it and keeps the first half of each item's tokens."""

    stage = Stage.LLM
    needs = Pruner.needs | {Need.LAST_QUERY_ATTENTION, Need.PROMPT_ATTENTION, Need.KEY_NORMS, Need.NORMED_STATES}
    prune_earlier_cache = False

    def __init__(self, layers, offset):
        self.layers, self.score_offset, self.calls = tuple(layers), offset, []

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        self.calls.append(dict(features=features, lengths=lengths, **kwargs))
        return [torch.arange((n + 1) // 2) for n in lengths.tolist()]


def _rotary(model, hidden, positions):
    return model.model.language_model.rotary_emb(hidden, positions)


@pytest.mark.parametrize("offset", [-1, 0])
@torch.no_grad()
def test_needs_equal_the_eager_model(case, offset):
    """Per stage: prompt attention and the last query's attention equal the eager attention probabilities of the
    masked unpatched model, key norms its layer's keys, normed states its final norm of the hidden states; prompt
    positions, order and input embeddings as in the input."""
    _, model, inputs, positions, _ = case
    recorder = Recorder(layers=(1, 3), offset=offset)
    with patched(model, recorder):
        model(**inputs, position_ids=positions)
    eager = eager_copy(model)
    text_model = eager.model.language_model
    real = inputs["attention_mask"].bool()
    input_ids = inputs["input_ids"]
    items = items_of(input_ids)
    visual = torch.zeros_like(real)
    for b, cols in items:
        visual[b, cols] = True
    survivors = [cols for _, cols in items]
    kept_by_stage = []
    embeds = None

    def grab(module, args, kwargs):
        nonlocal embeds
        embeds = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    for step, layer in enumerate(recorder.layers):
        call = recorder.calls[step]
        assert call["step"] == step and call["layer"] == layer
        hooks = hide_hooks(eager, layer_hidden(real, recorder, kept_by_stage, upto=step))
        hooks.append(text_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True))
        try:
            out = eager(**inputs, position_ids=positions, output_attentions=True, output_hidden_states=True)
        finally:
            for hook in hooks:
                hook.remove()
        scorer = layer + offset
        probs = out.attentions[scorer].mean(1)  # [B, L, L]
        states = out.hidden_states[scorer]
        normed = text_model.norm(out.hidden_states[layer])
        module = text_model.layers[scorer]
        k = module.self_attn.k_proj(module.input_layernorm(states))
        k = k.view(*k.shape[:2], -1, module.self_attn.head_dim).transpose(1, 2)
        cos, sin = _rotary(eager, states, positions)
        rope = sys.modules[type(module.self_attn).__module__].apply_rotary_pos_emb
        k = rope(k, k, cos, sin)[1]
        norms = k.abs().sum(-1).sum(1)  # [B, L]
        prompt = call["prompt"]
        keep = real.clone()
        for i, (b, cols) in enumerate(items):
            current = survivors[i]
            n = current.numel()
            assert torch.equal(call["origin"][i, :n], torch.searchsorted(cols, current))
            text = (real[b] & ~visual[b]).nonzero()[:, 0]
            present = (kept_by_stage[-1] if step else real)[b].nonzero()[:, 0]
            t = text.numel()
            assert int(prompt.lengths[i]) == t
            assert torch.equal(prompt.positions[i, :t], torch.searchsorted(present, text))
            assert torch.equal(call["positions"][i, :n], torch.searchsorted(present, current))
            assert torch.equal(prompt.after[i, :t], text > cols.max())
            torch.testing.assert_close(prompt.embeddings[i, :t], embeds[b, text], rtol=0, atol=0)
            torch.testing.assert_close(prompt.hidden[i, :t], states[b, text], rtol=0, atol=1e-6)
            torch.testing.assert_close(call["features"][i, :n], out.hidden_states[layer][b, current], rtol=0, atol=1e-6)
            torch.testing.assert_close(prompt.attention[i, :t, :n], probs[b][text][:, current], rtol=0, atol=1e-5)
            torch.testing.assert_close(call["attention"][i, :n], probs[b, -1, current], rtol=0, atol=1e-5)
            torch.testing.assert_close(call["key_norms"][i, :n], norms[b, current], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(prompt.key_norms[i, :t], norms[b, text], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(call["normed"][i, :n], normed[b, current], rtol=0, atol=1e-5)
            torch.testing.assert_close(prompt.normed[i, :t], normed[b, text], rtol=0, atol=1e-5)
            torch.testing.assert_close(call["input_embeddings"][i, : cols.numel()], embeds[b, cols], rtol=0, atol=1e-6)
            survivors[i] = current[: (n + 1) // 2]
            keep[b, cols] = False
            keep[b, survivors[i]] = True
        kept_by_stage.append(keep)


class PairMerge(Pruner):
    """Test method: at each pruning layer, every current token pair (2i, 2i + 1) merges into token 2i (their mean)."""

    stage = Stage.LLM
    merges = True
    prune_earlier_cache = False

    def __init__(self, layers):
        self.layers = tuple(layers)

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):  # reads no need: the llm keywords pass
        out = []
        for b, n in enumerate(lengths.tolist()):
            sources = torch.arange(n) // 2
            weights = 1.0 / torch.bincount(sources)[sources].float()
            tokens = torch.zeros((n + 1) // 2, features.shape[-1]).index_add_(
                0, sources, features[b, :n].float() * weights[:, None]
            )
            out.append(MergedTokens(tokens.to(features.dtype), torch.arange(0, n, 2), sources, weights))
        return out


def merge_hooks(model, method, groups_by_stage, length):
    """Pre-hooks replacing, at each pruning layer, every representative's prompt row by its group's weighted mean."""

    def hook(step):
        def merge(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden = hidden.clone()
            before = hidden[:, :length].clone()
            for b, representative, members, weights in groups_by_stage[step]:
                hidden[b, representative] = (before[b, members] * weights[:, None]).sum(0)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return merge

    layers = model.model.language_model.layers
    return [layers[k].register_forward_pre_hook(hook(s), with_kwargs=True) for s, k in enumerate(method.layers)]


@torch.no_grad()
def test_merged_tokens_replace_their_representatives(case):
    """A merging llm-stage method: the merged hidden states take their representatives' rows (later layers and the
    cache see them), as an eager oracle that writes the same means at each pruning layer and hides the rest."""
    _, model, inputs, positions, _ = case
    method = PairMerge(layers=(1, 3))
    steps = 3
    with patched(model, method) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    real = inputs["attention_mask"].bool()
    length = real.shape[1]
    items = items_of(inputs["input_ids"])
    survivors = [cols for _, cols in items]
    kept_by_stage, groups_by_stage = [], []
    for _ in method.layers:
        keep, groups = real.clone(), []
        for i, (b, cols) in enumerate(items):
            current = survivors[i]
            for j in range(0, current.numel(), 2):
                members = current[j : j + 2]
                groups.append((b, current[j], members, torch.full((members.numel(),), 1.0 / members.numel())))
            survivors[i] = current[::2]
            keep[b, cols] = False
            keep[b, survivors[i]] = True
        kept_by_stage.append(keep)
        groups_by_stage.append(groups)
    records = [(b, k, m) for b, r in enumerate(handle.last) for k, m in zip(r.kept, r.merged, strict=True)]
    expected = [(row, cols, survivor) for (row, cols), survivor in zip(items, survivors, strict=True)]
    for (b, kept, merged), (row, cols, survivor) in zip(records, expected, strict=True):
        assert b == row and torch.equal(cols[kept], survivor)
        assert torch.equal(merged.kept, kept)
        assert torch.equal(merged.sizes, torch.bincount(merged.sources[merged.sources >= 0]))
    eager = eager_copy(model)
    hooks = merge_hooks(eager, method, groups_by_stage, length)
    try:
        tokens, scores = oracle_generate(eager, inputs, positions, method, kept_by_stage, steps, copy_model=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(generated.sequences[:, length:], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
