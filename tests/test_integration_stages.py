"""The stage contract on every tiny model (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) for every vision- and projector-stage
method: keep-all is bit-identical to the unpatched model, budgets as documented, a batch of 2 equals its prompts
one by one, ``remove()`` restores, and the vision stage hands methods the encoder attention an eager model computes."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patch, patched  # noqa: E402
from mrprune.integrations.testing import IMAGE_TOKEN, VIDEO_TOKEN  # noqa: E402
from mrprune.methods.base import round_half_up  # noqa: E402
from tests.tiny_models import CASES, GREEDY, llava_case, single_prompt  # noqa: E402

ATOL = 1e-5

#: every vision- / projector-stage method of this contract, built from a keep ratio
METHODS = {
    "fastervlm": lambda keep: mrprune.methods.FasterVLM(keep_ratio=keep),
    "fastervlm_last_layer": lambda keep: mrprune.methods.FasterVLM(keep_ratio=keep, layer=-1),
    "l2norm": lambda keep: mrprune.methods.L2Norm(keep_ratio=keep),
    "scope": lambda keep: mrprune.methods.SCOPE(keep_ratio=keep),
    "vispruner": lambda keep: mrprune.methods.VisPruner(keep_ratio=keep),
    "cdpruner": lambda keep: mrprune.methods.CDPruner(keep_ratio=keep),
    "hired": lambda keep: mrprune.methods.HiRED(keep_ratio=keep, budget_layer=0, select_layer=-1),
    "agilepruner": lambda keep: mrprune.methods.AgilePruner(keep_ratio=keep, erank_avg=1.0, tau_max=1.0),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, *CASES[request.param]()


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_keep_all_equals_unpatched(case, method):
    _, model, inputs, _ = case
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    with patched(model, METHODS[method](1.0)) as handle:
        assert torch.equal(model(**inputs).logits, logits)
        again = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    assert [r.tokens_after for r in handle.last] == [r.tokens_before for r in handle.last]
    assert torch.equal(again.sequences, generated.sequences)
    for ours, theirs in zip(again.logits, generated.logits, strict=True):
        assert torch.equal(ours, theirs)


def recording(pruner):
    """``pruner`` with each ``select_batch`` call's features recorded: per call, the list of its items' valid
    tokens."""
    calls, select_batch = [], pruner.select_batch

    def record(features, layouts, lengths, *args, **kwargs):
        calls.append([features[i, : int(lengths[i])].clone() for i in range(features.shape[0])])
        return select_batch(features, layouts, lengths, *args, **kwargs)

    pruner.select_batch = record
    return pruner, calls


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_budgets_and_batch_equal_single_prompts(case, method):
    """A prompt pruned in a batch keeps what it keeps alone and generates the same. Where the model itself hands the
    pruner different bits alone (BLAS picks its kernels by shape: on AMD EPYC the tiny vision tower's features of a
    lone image differ in the last bit), that image is held to its budget only (a near-tie may then go either way), and
    its prompt's generation is not compared."""
    _, model, inputs, singles = case
    steps = 3
    pruner, calls = recording(METHODS[method](0.4))
    with patched(model, pruner) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records, batch_items = handle.last, calls[-1]
        for record in records:
            for kept in record.kept:
                assert torch.equal(kept, kept.unique())  # sorted ascending, distinct
        first, compared = 0, 0
        for b, visual in enumerate(singles):
            one = model.generate(**single_prompt(inputs, b, visual), max_new_tokens=steps, **GREEDY)
            alone, items = handle.last[0], calls[-1]
            mine = batch_items[first : first + len(items)]
            first += len(items)
            assert [k.numel() for k in alone.kept] == [k.numel() for k in records[b].kept]
            same = [torch.equal(x, y) for x, y in zip(items, mine, strict=True)]
            for x, y, equal in zip(alone.kept, records[b].kept, same, strict=True):
                assert torch.equal(x, y) or not equal
            compared += sum(same)
            if not all(same):
                continue  # the model's own rounding differs between batch and single (see the docstring)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)
        assert compared, "no image had the same features alone as in the batch: nothing was compared"
    # every method here keeps round(0.4 n) tokens of an item of n (LLaVA-NeXT newlines included)
    sizes = [_item_sizes(inputs, b) for b in range(2)]
    assert [[k.numel() for k in r.kept] for r in records] == [[round_half_up(0.4 * n) for n in s] for s in sizes]


def _item_sizes(inputs, b):
    """Visual tokens of each item of prompt ``b`` (the test prompts separate items by text or vision markers)."""
    ids = inputs["input_ids"][b]
    cells = ((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).nonzero()[:, 0]
    runs = torch.tensor_split(cells, (cells.diff() > 1).nonzero()[:, 0] + 1)
    return [run.numel() for run in runs]


def _hooks_and_attributes(model):
    hooks = {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return hooks, set(model.__dict__), set(model.model.__dict__)


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_remove_restores_the_model(case, method):
    _, model, inputs, _ = case
    reference = model(**inputs).logits  # first: transformers installs permanent output-capturing hooks on a first call
    before = _hooks_and_attributes(model)
    handle = patch(model, METHODS[method](0.3))
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    handle.remove()
    assert _hooks_and_attributes(model) == before
    assert torch.equal(model(**inputs).logits, reference)


class Recording(mrprune.methods.FasterVLM):
    """FasterVLM that keeps what the vision stage handed it."""

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        self.seen = dict(kwargs, lengths=lengths)
        return super()._select_batch(features, layouts, lengths, texts, **kwargs)


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def _clip_attention(model, crops, layer):
    """``[crops, P]``: head-averaged [CLS] row of ``layer`` from an eager tower's attention probabilities."""
    tower = _eager(model).model.vision_tower
    return tower(crops, output_attentions=True).attentions[layer][:, :, 0, 1:].mean(1)


def _qwen_received(model, pixels, grids, layer):
    """Per merged token (original order), the received attention of block ``layer`` from a dense float64 softmax
    over the block's segments; the window order is undone by matching the merger's rows with the pooled output."""
    import sys

    visual = model.model.visual
    captured = {}

    def grab(module, args, kwargs):
        captured["inputs"] = (kwargs.get("hidden_states", args[0] if args else None), kwargs)

    def grab_merger(module, args, output):
        captured["merged"] = output

    hooks = [
        visual.blocks[layer].attn.register_forward_pre_hook(grab, with_kwargs=True),
        visual.merger.register_forward_hook(grab_merger),
    ]
    try:
        pooled = torch.cat(list(model.model.get_image_features(pixels, grids, return_dict=True).pooler_output))
    finally:
        for hook in hooks:
            hook.remove()
    hidden, kwargs = captured["inputs"]
    attention = visual.blocks[layer].attn
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    qkv = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1)
    q, k = rope(qkv[:, 0], qkv[:, 1], *kwargs["position_embeddings"])
    bounds = kwargs["cu_seqlens"].tolist()
    segment = torch.zeros(hidden.shape[0], dtype=torch.int64)
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        segment[start:end] = s
    logits = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * attention.scaling
    logits = logits.masked_fill(segment[:, None] != segment[None], float("-inf"))
    received = logits.softmax(-1).sum(1).mean(0)  # [S] window order
    unit = visual.spatial_merge_size**2
    per_token = received.view(-1, unit).mean(1)
    merged = captured["merged"]
    order = [int((merged == row).all(-1).nonzero()[0, 0]) for row in pooled]
    return per_token[order]


@torch.no_grad()
def test_vision_attention_matches_eager_attention(case):
    name, model, inputs, _ = case
    method = Recording(keep_ratio=0.5, layer=0)
    with patched(model, method):
        model(**inputs)
    seen, layer = method.seen, 0
    scores, crops, lengths = seen["attention"][layer], seen["crops"], seen["lengths"]
    if name == "llava":
        oracle = _clip_attention(model, inputs["pixel_values"], layer)
        assert seen["attention_kind"] == "cls"
        torch.testing.assert_close(scores, oracle, rtol=1e-5, atol=1e-7)
        assert bool((crops == 0).all())
    elif name == "llava_next":
        assert seen["attention_kind"] == "cls"
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = model.config
        counts = [
            image_size_to_num_patches(tuple(s.tolist()), config.image_grid_pinpoints, config.vision_config.image_size)
            for s in inputs["image_sizes"]
        ]
        for i, count in enumerate(counts):
            rows = _clip_attention(model, inputs["pixel_values"][i, :count], layer)  # [crops, P]
            # pack the attention as LLaVA-NeXT packs features: value in every channel, newline = -7
            features = rows[..., None].expand(-1, -1, config.text_config.hidden_size)
            newline = torch.full((config.text_config.hidden_size,), -7.0)
            packed = model.model.pack_image_features([features], inputs["image_sizes"][i : i + 1], "default", newline)
            packed = packed[0][0][:, 0]
            n = int(lengths[i])
            assert packed.numel() == n
            newlines = packed == -7.0
            assert torch.equal(crops[i, :n] < 0, newlines)
            torch.testing.assert_close(scores[i, :n], torch.where(newlines, 0.0, packed), rtol=1e-5, atol=1e-7)
            assert bool((seen["crop_attention"][layer][i] - rows).abs().max() < 1e-6)
    else:
        assert seen["attention_kind"] == "received"
        oracle = _qwen_received(model, inputs["pixel_values"], inputs["image_grid_thw"], layer)
        images = inputs["image_grid_thw"].prod(-1).div(4).long().tolist()
        flat = torch.cat([scores[i, :n] for i, n in enumerate(images)])
        torch.testing.assert_close(flat.double(), oracle, rtol=1e-4, atol=1e-6)
        video = int(inputs["video_grid_thw"].prod() // 4)
        assert crops[len(images), :video].tolist() == [0] * (video // 2) + [1] * (video // 2)  # one crop per frame


def _transformers_before(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release < Version(version).release


@pytest.mark.parametrize("method", ["fastervlm", "l2norm"])
@torch.no_grad()
def test_static_cache_equals_dynamic_cache(case, method):
    """``cache_implementation="static"``: the pruned prompt fills fewer slots of the static cache; greedy decoding,
    beam search and several return sequences match the dynamic cache."""
    name, model, inputs, _ = case
    variants = [{}, {"num_beams": 2, "num_return_sequences": 2}]
    if name == "llava_next" and _transformers_before("5.23"):
        # before 5.23, generate expands LLaVA-NeXT pixel_values image by image for beams, so a prompt with two images
        # gets another prompt's image (the unpatched model silently misplaces it; mrprune refuses)
        variants = variants[:1]
    with patched(model, METHODS[method](0.4)) as handle:
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
                torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@torch.no_grad()
def test_static_cache_with_an_llm_stage_method():
    """FastV prunes every layer's cache: its static cache fills fewer slots in every layer (the multi-layer llm stage,
    whose layers keep different lengths, is tested in tests/test_integration_llm_stage.py)."""
    model, inputs, _ = llava_case()
    with patched(model, mrprune.FastV(keep_ratio=0.5, layer=1)):
        dynamic = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        static = model.generate(**inputs, max_new_tokens=3, cache_implementation="static", **GREEDY)
    assert torch.equal(static.sequences, dynamic.sequences)
    for ours, theirs in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_the_hf_integration_names_no_method():
    """Stages, not method types: no module of the HF integration imports a concrete method (only the Pruner base and
    the stage declarations)."""
    import ast
    import pathlib

    root = pathlib.Path(mrprune.__file__).parent / "integrations" / "hf"
    allowed = {"Pruner", "Need", "Stage", "PromptTokens", "MergedTokens", "Result", "kept_indices", "merged_tokens"}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "methods" in node.module:
                names = {alias.name for alias in node.names}
                assert names <= allowed, f"{path.name} imports {names - allowed} from {node.module}"
