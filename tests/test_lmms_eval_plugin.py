"""The lmms-eval plugin (mrprune.integrations.lmms_eval): pruner arguments, token accounting, entry-point registration,
and a real ``python -m lmms_eval`` run on tiny random LLaVA models with a local task (offline)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mrprune
from mrprune.integrations import PruneRecord
from mrprune.integrations import lmms_eval as plugin

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "mrprune.integrations.lmms_eval:manifests"


def _lmms_eval_models() -> None:
    """Skip unless lmms-eval and the modules its llava_hf wrapper imports at the top (decord) are importable."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'mrprune[eval]')")
    pytest.importorskip(
        "decord", reason="lmms-eval's llava_hf / qwen2_5_vl wrappers import decord (pip install decord)"
    )


# -- pruner arguments --------------------------------------------------------------------------------------------------


def test_build_pruner_from_presets_and_methods():
    pruner = plugin.build_pruner("mr_pruner", keep_ratio=0.3)
    assert isinstance(pruner, mrprune.MRPruner) and pruner.keep_ratio == 0.3
    assert plugin.build_pruner("MRPruner").keep_ratio == mrprune.MRPruner().keep_ratio
    assert plugin.build_pruner("mr_pruner_90").keep_ratio == 0.1  # a preset
    overridden = plugin.build_pruner("g_prune", keep_ratio=0.25, official=True)
    assert isinstance(overridden, mrprune.GPrune) and overridden.keep_ratio == 0.25 and overridden.official
    assert isinstance(plugin.build_pruner("div_prune", keep_ratio=0.2), mrprune.DivPrune)
    assert plugin.build_pruner("resprune_64").budget == 64
    assert plugin.build_pruner("random", keep_ratio=0.5, seed=3).seed == 3
    assert plugin.build_pruner("fastv", layer=3).layer == 3
    # every exported method by its class name (ToMe had no entry in a hand-kept table)
    for name in mrprune.methods.__all__:
        cls = getattr(mrprune.methods, name)
        if isinstance(cls, type) and issubclass(cls, mrprune.Pruner) and cls is not mrprune.Pruner:
            assert plugin._method_classes()[name.lower()] is cls
    assert isinstance(plugin.build_pruner("tome", budget=8), mrprune.methods.ToMe)
    with pytest.raises(ValueError, match="unknown pruner"):
        plugin.build_pruner("no_such_method")
    with pytest.raises(ValueError, match="keep_ratio"):
        plugin.build_pruner("mr_pruner", keep_ratio=2.0)


def test_split_arguments_routes_pruner_keywords():
    ours, theirs = plugin.split_arguments(
        "random", {"pretrained": "x", "keep_ratio": 0.5, "seed": 3, "batch_size": 2, "device": "cpu"}
    )
    assert ours == {"keep_ratio": 0.5, "seed": 3}
    assert theirs == {"pretrained": "x", "batch_size": 2, "device": "cpu"}
    ours, theirs = plugin.split_arguments("mr_pruner_90", {"official": True, "pruner_beta": 0.2, "dtype": "float16"})
    assert ours == {"official": True, "beta": 0.2} and theirs == {"dtype": "float16"}
    with pytest.raises(ValueError, match="unknown pruner"):
        plugin.split_arguments("nope", {})


def test_pyproject_declares_the_entry_point_and_extra():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11) or tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"]["mrprune"] == ENTRY_POINT
    assert any(req.startswith("lmms-eval") for req in project["optional-dependencies"]["eval"])
    assert not any("lmms" in req for req in project["dependencies"])  # an optional extra only
    module, attribute = ENTRY_POINT.split(":")
    assert callable(getattr(importlib.import_module(module), attribute))


# -- token accounting --------------------------------------------------------------------------------------------------


class _Handle:
    def __init__(self):
        self.last = None
        self.pruner = mrprune.MRPruner(keep_ratio=0.25)
        self.position_mode = "original"


def _record(before: int, after: int) -> PruneRecord:
    return PruneRecord([torch.arange(after)], ["image"], before, after, 0.002, torch.arange(after + 5))


def test_prune_stats_counts_each_prefill_once(tmp_path, caplog):
    handle = _Handle()
    stats = plugin.PruneStats(handle, rank=1, world_size=2, log_path=str(tmp_path / "log.jsonl"))
    assert stats.log_path.endswith("log.jsonl.rank1")
    stats.observe()  # nothing pruned yet
    handle.last = [_record(100, 25), _record(80, 20)]
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        stats.observe()
        stats.observe()  # a decoding step: the same records, not counted again
        handle.last = [_record(40, 10)]
        stats.observe()
        summary = stats.report("generate_until")
    assert (stats.batches, stats.samples, stats.tokens_before, stats.tokens_after) == (2, 3, 220, 55)
    assert summary["kept_fraction"] == pytest.approx(0.25) and summary["mean_tokens_after"] == pytest.approx(55 / 3)
    assert "visual tokens 180 -> 45" in caplog.text and "220 -> 55 (25.0 % kept)" in caplog.text
    lines = [json.loads(line) for line in Path(stats.log_path).read_text().splitlines()]
    assert [line.get("batch") for line in lines] == [1, 2, None]
    assert lines[0]["tokens_after"] == [25, 20] and lines[-1]["summary"] == "generate_until"


def test_merging_methods_build_and_are_counted():
    """VisionZip / PruMerge(+) by method and preset name; records of merged prefills count their output tokens."""
    from mrprune.methods.results import MergedTokens

    assert isinstance(plugin.build_pruner("visionzip", budget=64), mrprune.VisionZip)
    assert plugin.build_pruner("visionzip_64", official=True).official
    zipped = plugin.build_pruner("VisionZip", keep_ratio=0.2, contextual_ratio=0.25)
    assert zipped.contextual_ratio == 0.25 and zipped.size.keep_ratio == 0.2
    assert plugin.build_pruner("prumerge_plus_64").size.budget == 64
    plain = plugin.build_pruner("prumerge", keep_ratio=0.2, plus=False)
    assert isinstance(plain, mrprune.PruMerge) and not plain.plus
    ours, theirs = plugin.split_arguments("visionzip_64", {"contextual_ratio": 0.25, "pretrained": "x"})
    assert ours == {"contextual_ratio": 0.25} and theirs == {"pretrained": "x"}
    handle = _Handle()
    stats = plugin.PruneStats(handle)
    sources = torch.tensor([0, 0, 1, -1])
    merged = MergedTokens(torch.zeros(2, 3), torch.tensor([0, 2]), sources, torch.tensor([0.5, 0.5, 1.0, 0.0]))
    handle.last = [PruneRecord([merged.kept], ["image"], 4, 2, 0.001, torch.arange(6), [merged])]
    stats.observe()
    assert (stats.tokens_before, stats.tokens_after) == (4, 2)


# -- registration ------------------------------------------------------------------------------------------------------


def test_manifests_register_chat_and_simple_classes():
    _lmms_eval_models()
    from lmms_eval.api.model import lmms
    from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
    from lmms_eval.models.registry_v2 import ModelRegistryV2
    from lmms_eval.models.simple.llava_hf import LlavaHf

    registry = ModelRegistryV2()
    for manifest in registry._coerce_payload_to_manifests(plugin.manifests):  # what the entry-point loader does
        registry.register_manifest(manifest)
    assert {"mrprune_llava_hf", "mrprune_llava", "mrprune_llava_next", "mrprune_qwen2_5_vl"} <= set(
        registry.list_model_names()
    )
    chat = registry.get_model_class("mrprune_llava_next")
    simple = registry.get_model_class("mrprune_llava_next", force_simple=True)
    assert issubclass(chat, LlavaHfChat) and issubclass(chat, lmms) and not chat.is_simple
    assert issubclass(simple, LlavaHf) and simple.is_simple and not issubclass(simple, LlavaHfChat)
    assert chat is plugin.PrunedLlavaHf and chat.__module__ == plugin.__name__
    qwen = registry.get_model_class("mrprune_qwen2_5_vl")
    assert qwen.__mro__[1] is plugin._PrunedMixin and qwen.__name__ == "PrunedQwen2_5_VL"
    with pytest.raises(AttributeError):
        plugin.NoSuchWrapper  # noqa: B018


def test_wrapper_requires_a_pruner():
    _lmms_eval_models()
    with pytest.raises(ValueError, match="pruner="):
        plugin.PrunedLlavaHf(pretrained="unused")
    with pytest.raises(ValueError, match="unknown pruner"):
        plugin.PrunedLlavaHf(pretrained="unused", pruner="nope")


# -- the real CLI, offline ---------------------------------------------------------------------------------------------

_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
_WORDS = ["what", "is", "in", "the", "picture", "?", "user", "assistant", ":", "yes", "no", "a", "cat", "cup", "of"]


def _save_tiny_llava(folder: Path, next_model: bool) -> None:
    """A tiny random LLaVA(-NeXT) model plus an offline processor (word-level tokenizer, 28 px CLIP images)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from mrprune.integrations.testing import IMAGE_TOKEN, tiny_llava, tiny_llava_next

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 100)]
    words[10 : 10 + len(_WORDS)] = _WORDS
    words[IMAGE_TOKEN] = "<image>"
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = _TEMPLATE
    size = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    if next_model:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        images = LlavaNextImageProcessorPil(**size, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
        processor_cls, model = LlavaNextProcessor, tiny_llava_next()
    else:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        images = LlavaImageProcessorPil(**size)
        processor_cls, model = LlavaProcessor, tiny_llava()
    processor = processor_cls(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""

_GENERATE_TASK = """task: mrprune_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _write_task(folder: Path) -> int:
    """A local task folder: sample images from scikit-image (small copies), a JSON dataset, a task YAML."""
    data = pytest.importorskip("skimage.data", reason="the task's images ship with scikit-image")
    from PIL import Image

    folder.mkdir()
    rows = []
    for i, name in enumerate(["astronaut", "coffee", "chelsea"]):
        image = Image.fromarray(getattr(data, name)())
        image.thumbnail((96, 96))  # keeps the aspect ratio: square and non-square images
        path = folder / f"{name}.png"
        image.save(path)
        rows.append({"id": i, "image": str(path), "question": "what is in the picture ?", "answer": "a cat"})
    (folder / "data.json").write_text(json.dumps(rows))
    (folder / "utils.py").write_text(_UTILS)
    (folder / "gen.yaml").write_text(_GENERATE_TASK.format(data=folder / "data.json"))
    return len(rows)


def _entry_point_shim(folder: Path) -> Path:
    """A dist-info declaring the plugin's entry point, for a checkout whose installed metadata predates it."""
    info = folder / "mrprune_lmms_eval_test-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mrprune-lmms-eval-test\nVersion: 0\n")
    module, attribute = ENTRY_POINT.split(":")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\nmrprune = {module}:{attribute}\n")
    return folder


def test_wrapper_patches_counts_and_unpatches(tmp_path):
    """In-process: the simple LLaVA-NeXT wrapper loads a tiny model, prunes a prefill, counts it, and unpatches."""
    _lmms_eval_models()
    from PIL import Image

    _save_tiny_llava(tmp_path, next_model=True)
    lm = plugin.PrunedLlavaHfSimple(pretrained=str(tmp_path), device="cpu", dtype="float32", pruner="random_50")
    model = lm.model
    assert lm.mrprune_handle.active and isinstance(lm.mrprune_handle.pruner, mrprune.RandomPruner)
    assert "forward" in model.__dict__ and lm.mrprune_stats.batches == 0
    prompt = lm._image_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture ?"}]}],
        add_generation_prompt=True,
    )
    inputs = lm._image_processor(images=[Image.new("RGB", (56, 28), (200, 10, 10))], text=prompt, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert (lm.mrprune_stats.batches, lm.mrprune_stats.samples) == (1, 1)  # decoding steps are not counted
    record = lm.mrprune_handle.last[0]
    assert lm.mrprune_stats.tokens_before == record.tokens_before == 52  # (28, 56) image: 52 tokens on the tiny model
    assert lm.mrprune_stats.tokens_after == record.tokens_after == 26
    lm.remove_pruning()
    assert "forward" not in model.__dict__ and not lm.mrprune_handle.active


def test_wrapper_with_a_merging_method(tmp_path):
    """In-process: the simple LLaVA-NeXT wrapper with VisionZip; the record holds the merged tokens."""
    _lmms_eval_models()
    from PIL import Image

    from mrprune.methods.results import MergedTokens

    _save_tiny_llava(tmp_path, next_model=True)
    lm = plugin.PrunedLlavaHfSimple(
        pretrained=str(tmp_path), device="cpu", dtype="float32", pruner="visionzip", keep_ratio=0.5
    )
    assert isinstance(lm.mrprune_handle.pruner, mrprune.VisionZip)
    prompt = lm._image_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture ?"}]}],
        add_generation_prompt=True,
    )
    inputs = lm._image_processor(images=[Image.new("RGB", (56, 28), (10, 200, 10))], text=prompt, return_tensors="pt")
    with torch.no_grad():
        lm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    record = lm.mrprune_handle.last[0]
    assert isinstance(record.merged[0], MergedTokens) and torch.equal(record.merged[0].kept, record.kept[0])
    assert (lm.mrprune_stats.tokens_before, lm.mrprune_stats.tokens_after) == (52, 26)
    lm.remove_pruning()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("next_model", "model_args", "kept_per_image", "simple"),
    [
        # the chat wrapper (lmms-eval's default; its chat path serves generation tasks only)
        (True, "pruner=mr_pruner,keep_ratio=0.3,position_mode=original", None, False),
        # the simple wrapper (--force_simple); a preset with an override, 16 -> 4 tokens per image
        (False, "pruner=g_prune,keep_ratio=0.25", 4, True),
    ],
    ids=["llava_next-chat-mr_pruner", "llava15-simple-g_prune"],
)
def test_lmms_eval_cli_runs_offline_and_reports_pruned_tokens(tmp_path, next_model, model_args, kept_per_image, simple):
    _lmms_eval_models()
    model = tmp_path / "model"
    _save_tiny_llava(model, next_model)
    docs = _write_task(tmp_path / "tasks")
    shim = _entry_point_shim(tmp_path / "site")
    log = tmp_path / "prune.jsonl"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(shim), str(ROOT), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        TRITON_INTERPRET="1",
    )
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", "mrprune_llava_next" if next_model else "mrprune_llava",
        "--model_args", f"pretrained={model},device=cpu,dtype=float32,prune_log={log},{model_args}",
        "--tasks", "mrprune_tiny_gen",
        "--include_path", str(tmp_path / "tasks"),
        "--batch_size", "1",
        "--output_path", str(tmp_path / "out"),
    ] + (["--force_simple"] if simple else [])  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Error during evaluation" not in output and "in generating" not in output, output[-4000:]
    assert "mrprune summary [rank 0/1] after generate_until" in output
    assert "|mrprune_tiny_gen" in output  # the results table
    assert ("gen_metrics" in output) != simple  # only the chat wrapper logs lmms-eval's throughput metrics

    entries = [json.loads(line) for line in log.read_text().splitlines()]
    summaries = {e["summary"]: e for e in entries if "summary" in e}
    assert list(summaries) == ["generate_until"]
    batches = [e for e in entries if "batch" in e]
    generate = summaries["generate_until"]
    assert generate["samples"] == generate["batches"] == docs  # batch size 1, one pruned prefill per doc
    for entry in batches:
        (before,), (after,) = entry["tokens_before"], entry["tokens_after"]
        assert 0 < after < before
        if kept_per_image is not None:
            assert (before, after) == (16, kept_per_image)
        else:  # MR-Pruner default mode keeps round(0.3 * tokens), newline tokens included
            assert after == int(0.3 * before + 0.5)
    assert generate["kept_fraction"] == pytest.approx(
        sum(e["tokens_after"][0] for e in batches[:docs]) / sum(e["tokens_before"][0] for e in batches[:docs])
    )
    assert list((tmp_path / "out").rglob("*results*.json"))
