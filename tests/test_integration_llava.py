"""mrprune.patch on LLaVA-1.5 (tiny random model): exactness, mask oracle, batching, decoding, removal, errors,
labels and ResPrune's text / seed inputs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import mrprune  # noqa: E402
from mrprune.integrations import patch, patched  # noqa: E402
from mrprune.integrations.testing import (  # noqa: E402
    IMAGE_TOKEN,
    greedy_decode,
    kept_mask,
    left_pad,
    mask_positions,
    tiny_llava,
)

ATOL = 1e-5
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
# word-level vocabulary of the test tokenizer (ids < 90: the visual placeholders are 90-93)
WORDS = ["[PAD]", "<s>", "</s>", "[UNK]", "what", "color", "is", "the", "dog", "car", "red", "?", "a"]


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def prompts(sequences, images):
    input_ids, attention_mask = left_pad(sequences)
    pixels = torch.randn(images, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)


@pytest.fixture
def inputs():
    """Two prompts: two images vs one (so the rows keep different numbers of tokens)."""
    image = [IMAGE_TOKEN] * 16
    return prompts([[1, 5, 6, *image, 7, 8, *image, 9, 10, 11], [1, 12, *image, 13, 14, 15, 16]], 3)


def without(inputs, *keys):
    return {k: v for k, v in inputs.items() if k not in keys}


@pytest.mark.parametrize(
    "pruner",
    [mrprune.MRPruner(keep_ratio=1.0), mrprune.GPrune(keep_ratio=1.0), mrprune.RandomPruner(keep_ratio=1.0)],
    ids=["mr_pruner", "g_prune", "random"],
)
@torch.no_grad()
def test_keep_all_equals_unpatched(model, inputs, pruner):
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    with patched(model, pruner) as handle:
        patched_logits = model(**inputs).logits
        patched_generated = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    assert [r.tokens_after for r in handle.last] == [32, 16]
    assert torch.equal(patched_logits, logits)
    assert torch.equal(patched_generated.sequences, generated.sequences)
    for ours, theirs in zip(patched_generated.logits, generated.logits, strict=True):
        assert torch.equal(ours, theirs)


@torch.no_grad()
def test_pruned_forward_equals_mask_oracle(model, inputs):
    with patched(model, mrprune.MRPruner(keep_ratio=0.3), position_mode="original") as handle:
        logits = model(**inputs).logits
    records = handle.last
    assert [r.tokens_before for r in records] == [32, 16]
    assert records[0].tokens_after != records[1].tokens_after
    assert logits.shape[1] == max(len(r.columns) for r in records) < inputs["input_ids"].shape[1]
    # the record maps the kept indices of each image to its columns (images start at columns 3 and 21 of row 0)
    text = [c for c in range(inputs["input_ids"].shape[1]) if inputs["input_ids"][0, c] != IMAGE_TOKEN]
    expected = sorted(text + (3 + records[0].kept[0]).tolist() + (21 + records[0].kept[1]).tolist())
    assert records[0].columns.tolist() == expected

    kept = kept_mask(records, inputs["attention_mask"])
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length).expand(2, length)  # what the unpatched forward uses without position ids
    oracle = model(**without(inputs, "attention_mask"), attention_mask=kept, position_ids=positions).logits
    full = model(**inputs).logits
    for b, record in enumerate(records):
        n = len(record.columns)
        torch.testing.assert_close(logits[b, -n:], oracle[b, record.columns], rtol=0, atol=ATOL)
        assert (full[b, -1] - oracle[b, -1]).abs().max() > 1e-3  # pruning changes the output


@torch.no_grad()
def test_right_padding_and_a_prompt_without_images(model):
    image = [IMAGE_TOKEN] * 16
    sequences = [[1, 5, *image, 7, *image, 8, 9], [1, 12, 13, 14]]
    length = len(sequences[0])
    input_ids = torch.zeros(2, length, dtype=torch.int64)
    attention_mask = torch.zeros(2, length, dtype=torch.int64)
    for b, sequence in enumerate(sequences):
        input_ids[b, : len(sequence)] = torch.tensor(sequence)
        attention_mask[b, : len(sequence)] = 1
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)) as handle:
        logits = model(**inputs).logits
    records = handle.last
    assert records[1].kept == [] and records[1].tokens_before == 0
    assert records[1].columns.tolist() == [0, 1, 2, 3]
    kept = kept_mask(records, attention_mask)
    positions = torch.arange(length).expand(2, length)
    oracle = model(input_ids=input_ids, pixel_values=pixels, attention_mask=kept, position_ids=positions).logits
    for b, record in enumerate(records):  # the rebuilt rows stay right-padded: real tokens first
        n = len(record.columns)
        torch.testing.assert_close(logits[b, :n], oracle[b, record.columns], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["original", "compact"])
@torch.no_grad()
def test_generate_equals_decode_loop(model, inputs, mode):
    steps = 5
    with patched(model, mrprune.MRPruner(keep_ratio=0.3), position_mode=mode) as handle:
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
    mask = inputs["attention_mask"]
    kept = kept_mask(handle.last, mask)
    if mode == "original":  # kept tokens at their unpruned positions, decoding after the unpruned prompt
        positions = mask_positions(mask)
        first = positions[:, -1] + 1
    else:  # the pruned prompt renumbered, decoding right after it
        positions = mask_positions(kept)
        first = kept.sum(1)
    tokens, scores = greedy_decode(
        model,
        steps,
        attention_mask=kept,
        position_ids=positions,
        next_positions=first,
        **without(inputs, "attention_mask"),
    )
    length = inputs["input_ids"].shape[1]
    assert torch.equal(generated.sequences[:, :length], inputs["input_ids"])  # the prompt comes back as given
    assert torch.equal(generated.sequences[:, length:], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["original", "compact"])
@pytest.mark.parametrize("step_positions", [True, False], ids=["positions", "no_positions"])
@torch.no_grad()
def test_hand_written_loop_on_the_patched_model(model, inputs, mode, step_positions):
    """A caller's own decoding loop keeps the unpruned view (mask over the whole prompt, unpruned positions)."""
    steps = 4
    mask = inputs["attention_mask"]
    positions = mask_positions(mask)
    with patched(model, mrprune.MRPruner(keep_ratio=0.3), position_mode=mode):
        generated = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        first = positions[:, -1] + 1 if step_positions else None
        tokens, scores = greedy_decode(
            model,
            steps,
            attention_mask=mask,
            position_ids=positions,
            next_positions=first,
            **without(inputs, "attention_mask"),
        )
    assert torch.equal(generated.sequences[:, mask.shape[1] :], tokens)
    for ours, theirs in zip(generated.logits, scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@torch.no_grad()
def test_batch_equals_single_prompts(model, inputs):
    steps = 4
    pruner = mrprune.MRPruner(keep_ratio=0.3)
    with patched(model, pruner) as handle:
        both = model.generate(**inputs, max_new_tokens=steps, **GREEDY)
        records = handle.last
        images = [inputs["pixel_values"][:2], inputs["pixel_values"][2:]]
        for b in range(2):
            ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()][None]
            one = model.generate(input_ids=ids, pixel_values=images[b], max_new_tokens=steps, **GREEDY)
            assert torch.equal(one.sequences[0, -steps:], both.sequences[b, -steps:])
            for ours, theirs in zip(one.logits, both.logits, strict=True):
                torch.testing.assert_close(ours[0], theirs[b], rtol=0, atol=ATOL)
            assert all(torch.equal(x, y) for x, y in zip(handle.last[0].kept, records[b].kept, strict=True))


@torch.no_grad()
def test_labels_are_gathered_with_the_tokens(model, inputs):
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)) as handle:
        loss = model(**inputs, labels=labels).loss
    kept = kept_mask(handle.last, inputs["attention_mask"])
    positions = torch.arange(labels.shape[1]).expand_as(labels)
    oracle = model(**without(inputs, "attention_mask"), attention_mask=kept, position_ids=positions, labels=labels)
    torch.testing.assert_close(loss, oracle.loss, rtol=0, atol=ATOL)


def _hooks_and_attributes(model):
    hooks = {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return hooks, set(model.__dict__), set(model.model.__dict__)


@torch.no_grad()
def test_remove_restores_the_model(model, inputs):
    before = _hooks_and_attributes(model)
    reference = model(**inputs).logits
    handle = patch(model, mrprune.FastV(keep_ratio=0.5, layer=1))
    handle.remove()
    handle = patch(model, mrprune.MRPruner(keep_ratio=0.3))
    assert handle.active and "forward" in model.__dict__
    assert model(**inputs).logits.shape[1] < reference.shape[1]
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    assert _hooks_and_attributes(model) == before
    assert model.forward.__func__ is type(model).forward
    assert model.model.get_image_features.__func__ is type(model.model).get_image_features
    assert torch.equal(model(**inputs).logits, reference)
    with patched(model, mrprune.MRPruner(keep_ratio=0.3)):
        assert model(**inputs).logits.shape[1] < reference.shape[1]
    assert _hooks_and_attributes(model) == before
    assert torch.equal(model(**inputs).logits, reference)


def test_errors(model, inputs, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    pruner = mrprune.MRPruner(keep_ratio=0.3)
    text_only = LlamaForCausalLM(
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        patch(text_only, pruner)
    with pytest.raises(TypeError, match="mrprune.Pruner"):
        patch(model, "mr_pruner")
    with pytest.raises(ValueError, match="position_mode"):
        patch(model, pruner, position_mode="shifted")
    with pytest.raises(ValueError, match="padding_side"):
        patch(model, pruner, padding_side="middle")
    with pytest.raises(ValueError, match="text-conditioned"):
        patch(model, mrprune.ResPrune(keep_ratio=0.3))
    with pytest.raises(ValueError, match="FastV"):
        patch(model, mrprune.FastV(), position_mode="compact")
    with pytest.raises(ValueError, match="layer"):
        patch(model, mrprune.FastV(layer=2))  # the tiny language model has layers 0 and 1
    with pytest.raises(ValueError, match="layer"):
        mrprune.FastV(layer=0)
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.16.2")
    with pytest.raises(ImportError, match="transformers>=5.17"):
        patch(model, pruner)
    monkeypatch.undo()
    assert "forward" not in model.__dict__  # nothing was left behind

    with patched(model, pruner):
        with pytest.raises(ValueError, match="already patched"):
            patch(model, pruner)
        with pytest.raises(ValueError, match="2-D attention_mask"):
            model(**without(inputs, "attention_mask"), attention_mask=inputs["attention_mask"][:, None, None, :])
        with pytest.raises(ValueError, match="input_ids"):
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
        short = dict(inputs, input_ids=inputs["input_ids"][:, 1:], attention_mask=inputs["attention_mask"][:, 1:])
        short["input_ids"][0, -5] = 7  # one placeholder fewer than the image has tokens
        with pytest.raises(ValueError, match="placeholders"):
            model(**short)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


class RecordingResPrune(mrprune.ResPrune):
    """ResPrune that records the text embeddings and seeds it is given."""

    def _select_batch(self, features, layouts, lengths, texts, seeds=None, **kwargs):
        self.seen = (texts, seeds)
        return super()._select_batch(features, layouts, lengths, texts, seeds=seeds, **kwargs)


@torch.no_grad()
def test_resprune_gets_instruction_embeddings_and_cls_seeds(model):
    ids = {w: i for i, w in enumerate(WORDS)}
    image = [IMAGE_TOKEN] * 16
    words = lambda text: [ids[w] for w in text.split()]  # noqa: E731
    batch = prompts(
        [[1, *words("what color is"), *image, *words("the dog ?")], [1, *image, *words("is the car red ?")]], 2
    )
    nouns = lambda text: [w for w in text.split() if w in {"color", "dog", "car"}]  # noqa: E731
    pruner = RecordingResPrune(keep_ratio=0.3, noun_extractor=nouns)
    table = model.get_input_embeddings().weight

    with patched(model, pruner, processor=_tokenizer()) as handle:
        model(**batch)
        texts, seeds = pruner.seen  # the prompt's text after its image: "the dog ?" and "is the car red ?"
        assert torch.equal(texts[0], table[[ids["dog"]]]) and torch.equal(texts[1], table[[ids["car"]]])
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        # the feature layer (-2 of a 2-layer tower) is layer 0's output: the CLS row of layer 0's attention
        attention = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[0]
        assert seeds.tolist() == attention[:, :, 0, 1:].mean(1).argmax(-1).tolist()

        handle.instructions = ["a red car", "what color is the dog"]
        model(**batch)
        texts, _ = pruner.seen
        assert torch.equal(texts[0], table[[ids["car"]]])
        assert torch.equal(texts[1], table[[ids["color"], ids["dog"]]])

        handle.texts = [torch.tensor([ids["red"]]), table[:3]]
        model(**batch)
        texts, _ = pruner.seen
        assert torch.equal(texts[0], table[[ids["red"]]]) and torch.equal(texts[1], table[:3])

        handle.texts = [table[:3]] * 3
        with pytest.raises(ValueError, match="3 texts for a batch of 2"):
            model(**batch)
