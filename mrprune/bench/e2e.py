"""End to end: prefill time, time to first token and decode rate of an HF LLaVA-NeXT model, with and without pruning.

The model is built from a config with random weights (no hub, no download):

* ``tiny`` — the test-size model of :mod:`mrprune.integrations.testing` (28 px crops, 88 visual tokens): seconds.
* ``small`` (CPU default) — the real LLaVA-NeXT token layout (CLIP 336 px / 14 px patches, a 672 x 672 image:
  576 base + 48 x 48 high-res + 48 newline = 2928 visual tokens) with narrow layers (CLIP width 64, a 4-layer
  256-wide Llama), so that a CPU prefill takes a fraction of a second and pruning's share is visible.
* ``cpu`` — a realistic CPU-sized model in bfloat16: CLIP ViT-L/14-336 (24 layers, 1024 wide) and a ~0.5 B-parameter
  language model (Qwen2-0.5B's shape as a Llama: 24 layers, 896 wide, GQA 14/2 heads, 4864 MLP, 151,936-token
  vocabulary), 672 x 672 images (2928 visual tokens): pruning's share of the prefill as a user would see it.
* ``7b`` (GPU default) — LLaVA-NeXT-7B size in bfloat16: a Mistral-7B-like language model (32 layers, 4096 wide,
  GQA 32/8 heads, 14336 MLP) and CLIP ViT-L/14-336 (24 layers, 1024 wide), 672 x 672 images (2928 visual tokens).

Each configuration — no pruning, then each pruner (``mrprune.patch``) at each pruned share (default 50/70/90 %) —
is measured on the same inputs. Besides the benchmark's methods, the default method list (all of them) adds the
e2e-only :data:`E2E_METHODS`: ToMe (``mrprune.ToMe(keep_ratio=...)``), which merges inside every CLIP block, so its
cost is in the vision encoder's share of the prefill (``prune_ms`` is only its final grouping step).
``prefill_ms`` is one ``model(**inputs)`` forward (vision encoder, pruning and the
language model's prefill); a greedy ``generate(max_new_tokens=new_tokens)`` gives ``ttft_ms`` (from the call to the
first token's logits) and ``decode_tok_s`` (the batch's tokens per second over the later steps), both read by a
logits processor that records the time of every step (after a CUDA synchronisation on a GPU); and
``prune_ms`` the pruning step alone as the integration measures it (``handle.last[b].seconds``: selection and batch
rebuild), or, without that record, a timed ``select_batch`` on the same features. Prefills are timed with CUDA
events on a GPU and ``time.perf_counter`` on a CPU; every figure is the median (and p20/p80 for the prefill) of
``repeat`` calls after one warm-up prefill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..methods.tome import BudgetOutOfReach
from .report import E2ERow

__all__ = ["E2E_METHODS", "build_model", "model_config", "run_e2e"]

logger = logging.getLogger(__name__)

#: Methods only the end-to-end benchmark runs (they act inside the model: no selection to time on its own).
E2E_METHODS = ("tome",)

IMAGE_SIZE = (672, 672)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _require_integration() -> tuple[Callable, Any]:
    """``mrprune.patch`` and transformers, or a clear error."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise RuntimeError("mrprune bench --e2e needs transformers (pip install 'mrprune[hf]')") from error
    try:
        from ..integrations import patch
    except ImportError as error:
        raise RuntimeError(
            "mrprune bench --e2e needs the Hugging Face integration mrprune.patch(model, pruner), which is not "
            f"importable here ({error})"
        ) from error
    return patch, transformers


def model_config(size: str) -> Any:
    """The ``LlavaNextConfig`` of the ``small``, ``cpu`` or ``7b`` model (random weights are drawn from it)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    if size == "small":
        vision = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=64,
        )
        text = LlamaConfig(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=999, image_grid_pinpoints=PINPOINTS
        )
    if size == "cpu":  # CLIP ViT-L/14-336 (0.30 B) + a Qwen2-0.5B-shaped language model (0.49 B)
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
        text = LlamaConfig(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=151646,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=True,
        )
    if size == "7b":  # llava-v1.6-mistral-7b: Mistral-7B text model, CLIP ViT-L/14-336 (7.57 B parameters)
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
        text = MistralConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            sliding_window=None,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=32000,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    raise ValueError(f"no config for model size {size!r}; choose small, cpu or 7b")


def build_model(size: str, device: torch.device) -> tuple[Any, dict[str, torch.Tensor], int, int]:
    """A random-weight LLaVA-NeXT model and one prompt's inputs: ``(model, inputs, visual_tokens, text_hidden)``.

    ``inputs`` holds ``input_ids`` (BOS, 12 text tokens, the image placeholders, 24 text tokens),
    ``attention_mask``, ``pixel_values [1, crops, 3, H, W]`` and ``image_sizes``; the placeholder count is the
    image's :class:`~mrprune.LlavaNextLayout` size, as the model packs it.
    """
    from transformers import LlavaNextForConditionalGeneration

    from ..layouts import LlavaNextLayout

    torch.manual_seed(0)
    dtype = torch.float32
    if size == "tiny":
        from ..integrations.testing import IMAGE_TOKEN, tiny_llava_next

        model = tiny_llava_next()
        image_size, pinpoints, crop, patch, image_token = (56, 56), [[28, 56], [56, 28], [56, 56]], 28, 7, IMAGE_TOKEN
    elif size in ("small", "cpu", "7b"):
        if size == "7b" and device.type != "cuda":
            raise RuntimeError("--model-size 7b needs a GPU (a 7B prefill takes minutes on a CPU); use small")
        config = model_config(size)
        dtype = torch.bfloat16 if size in ("cpu", "7b") else torch.float32
        with torch.device(device):  # random init directly on the device, in its dtype (no float32 copy of a 7B)
            model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
        model = model.to(dtype).eval()
        vision = config.vision_config
        image_size, pinpoints, crop, patch = IMAGE_SIZE, PINPOINTS, vision.image_size, vision.patch_size
        image_token = config.image_token_index
    else:
        raise ValueError(f"unknown model size {size!r}; choose tiny, small, cpu or 7b")
    model = model.to(device)
    model.generation_config.eos_token_id = None  # random weights: never stop early, always generate new_tokens
    model.generation_config.pad_token_id = 0
    layout = LlavaNextLayout.from_image_size(image_size, pinpoints, crop, patch)
    crops = 1 + (image_size[0] // crop) * (image_size[1] // crop)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size
    words = lambda n: torch.randint(3, min(vocab, image_token), (n,), generator=generator).tolist()  # noqa: E731
    ids = [1, *words(12), *[image_token] * layout.num_tokens, *words(24)]
    input_ids = torch.tensor([ids], device=device)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(1, crops, 3, crop, crop, generator=generator).to(device=device, dtype=dtype),
        image_sizes=torch.tensor([list(image_size)], device=device),
    )
    return model, inputs, layout.num_tokens, model.config.text_config.hidden_size


def _batch(inputs: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in inputs.items()}


def _pruners(methods: Sequence[str], keep: float) -> list[tuple[str, Any]]:
    from ..methods import DivPrune, GPrune, MRPruner, RandomPruner, ResPrune, ToMe

    make = {
        "mr_pruner": lambda: MRPruner(keep_ratio=keep),
        "g_prune": lambda: GPrune(keep_ratio=keep),
        "resprune": lambda: ResPrune(keep_ratio=keep, alpha="llava"),
        "divprune": lambda: DivPrune(keep_ratio=keep),
        "random": lambda: RandomPruner(keep_ratio=keep),
        "tome": lambda: ToMe(keep_ratio=keep),
    }
    return [(name, make[name]()) for name in methods if name in make]


class _Clock:
    """Wall time of one call: CUDA events on a GPU (synchronised), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, out
        start_s = time.perf_counter()
        out = fn()
        return time.perf_counter() - start_s, out


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).median())


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(list(values), dtype=torch.float64), q))


def _generate_times(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> tuple[float, float | None]:
    """One greedy ``generate``: (seconds to the first token, seconds per later step or None)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = inputs["input_ids"].device

    class StepTimes(LogitsProcessor):
        """Records the wall time at each generation step (after its forward pass; on a GPU after a
        synchronisation): step 0 ends the prefill (time to first token), the gaps between later steps are the
        decoding steps."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    steps = StepTimes()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1, logits_processor=LogitsProcessorList([steps])
    )
    times = steps.times
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return times[0] - start, per_step


def _measure(
    model: Any, inputs: dict[str, torch.Tensor], clock: _Clock, repeat: int, new_tokens: int, handle: Any | None
) -> dict[str, Any]:
    """Prefill, TTFT and decode measurements of the model as it is (patched or not)."""
    with torch.no_grad():
        clock(lambda: model(**inputs, use_cache=True))  # warm-up (also compiles / autotunes kernels)
        prefill, prune, kept = [], [], []
        for _ in range(repeat):
            seconds, out = clock(lambda: model(**inputs, use_cache=True))
            del out
            prefill.append(seconds)
            records = getattr(handle, "last", None) if handle is not None else None
            if records:
                prune.append(records[0].seconds)
                kept.append(sum(r.tokens_after for r in records) / len(records))
        generated = [_generate_times(model, inputs, new_tokens) for _ in range(repeat)]
    batch = inputs["input_ids"].shape[0]
    per_step = [s for _, s in generated if s]
    return {
        "prefill": prefill,
        "ttft": _median([t for t, _ in generated]),
        "decode_tok_s": batch / _median(per_step) if per_step else None,
        "prune": _median(prune) if prune else None,
        "kept": _median(kept) if kept else None,
    }


def _select_time(model: Any, inputs: dict[str, torch.Tensor], pruner: Any, clock: _Clock, repeat: int) -> float:
    """Fallback pruning time without ``handle.last``: ``select_batch`` on the image features the model computes."""
    from ..layouts import LlavaNextLayout

    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        pooled = list(features.pooler_output)
        vision = model.config.vision_config
        layouts = [
            LlavaNextLayout.from_image_size(
                tuple(s), model.config.image_grid_pinpoints, vision.image_size, vision.patch_size
            )
            for s in inputs["image_sizes"].tolist()
        ]
        from ..batching import pad_batch

        padded, lengths = pad_batch(pooled)
        texts = [inputs["input_ids"][b, -8:] for b in range(padded.shape[0])] if pruner.uses_text else None
        if texts is not None:
            texts = [model.get_input_embeddings()(t) for t in texts]
        call = lambda: pruner.select_batch(padded, layouts, lengths, texts)  # noqa: E731
        call()
        return _median([clock(call)[0] for _ in range(repeat)])


def run_e2e(
    args: Any, device: torch.device, methods: Sequence[str], env: dict[str, Any] | None = None
) -> list[E2ERow] | None:
    """The ``--e2e`` benchmark: one row per configuration (None when it cannot run; the reason is logged). The
    settings used are recorded in ``env["settings"]``."""
    try:
        patch, _ = _require_integration()
    except RuntimeError as error:
        logger.error("%s", error)
        return None
    from .ops import METHODS

    if set(METHODS) <= set(methods):  # the default "all": the e2e-only methods too
        methods = [*methods, *(name for name in E2E_METHODS if name not in methods)]
    quick = getattr(args, "quick", False)
    size = args.model_size or ("tiny" if quick else "7b" if device.type == "cuda" else "small")
    batch = (args.batch or (1,))[0]
    repeat = args.repeat if args.repeat is not None else (1 if quick else 3 if device.type == "cuda" else 2)
    new_tokens = args.new_tokens or (2 if quick else 32 if device.type == "cuda" else 8)
    prune_shares = (0.5,) if quick and tuple(args.prune) == (0.5, 0.7, 0.9) else tuple(args.prune)
    if env is not None:
        env["settings"] = {"model_size": size, "batch": batch, "repeat": repeat, "new_tokens": new_tokens,
                           "pruned_shares": list(prune_shares), "methods": list(methods)}  # fmt: skip
    logger.info("e2e: building the %s LLaVA-NeXT model on %s (random weights)", size, device)
    try:
        model, inputs, visual, hidden = build_model(size, device)
    except RuntimeError as error:
        logger.error("mrprune bench --e2e: %s", error)
        return None
    inputs = _batch(inputs, batch)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    clock = _Clock(device)
    text_ids = inputs["input_ids"][0, -8:]  # ResPrune's text: the prompt's last words
    configs: list[tuple[str, float | None, Any]] = [("none", None, None)]
    for share in prune_shares:
        keep = round(1 - share, 6)
        configs += [(name, keep, pruner) for name, pruner in _pruners(methods, keep)]
    hf_logger = logging.getLogger("mrprune.integrations.hf")
    level = hf_logger.level
    hf_logger.setLevel(logging.WARNING)  # patch() logs every install at INFO
    rows: list[E2ERow] = []
    try:
        for i, (name, keep, pruner) in enumerate(configs, 1):
            case = "unpruned" if pruner is None else f"{100 * (1 - keep):.0f}% pruned"
            row = E2ERow(
                "e2e",
                name,
                case,
                f"llava_next_{size}",
                batch,
                visual,
                hidden,
                dtype,
                device.type,
                "patched" if pruner else "unpatched",
                keep_ratio=keep,
                measurements=repeat,
            )
            try:
                if pruner is None:
                    result = _measure(model, inputs, clock, repeat, new_tokens, None)
                else:
                    extra = {"texts": [text_ids] * batch} if pruner.uses_text else {}
                    handle = patch(model, pruner, **extra)
                    try:
                        result = _measure(model, inputs, clock, repeat, new_tokens, handle)
                    finally:
                        handle.remove()
                    if result["prune"] is None:
                        result["prune"] = _select_time(model, inputs, pruner, clock, repeat)
                        row.prune_source = "select_batch"
                    else:
                        row.prune_source = "handle.last"
            except Exception as error:  # one failing configuration is reported, the others still run
                logger.debug("e2e %s failed", name, exc_info=True)
                oom = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
                # a budget the model cannot reach (ToMe on a tower with too few blocks) is no failure of the run
                row.status = "OOM" if oom else "n/a" if isinstance(error, BudgetOutOfReach) else "error"
                row.note = f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                logger.info("  [%d/%d] %s %s: %s %s", i, len(configs), name, case, row.status, row.note)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            prefill = result["prefill"]
            row.prefill_ms = 1e3 * _median(prefill)
            row.prefill_p20_ms, row.prefill_p80_ms = 1e3 * _quantile(prefill, 0.2), 1e3 * _quantile(prefill, 0.8)
            row.ttft_ms = 1e3 * result["ttft"]
            row.decode_tok_s = result["decode_tok_s"]
            row.prune_ms = None if result["prune"] is None else 1e3 * result["prune"]
            row.kept_tokens = visual if pruner is None else result["kept"]
            rows.append(row)
            logger.info(
                "  [%d/%d] %s %s: prefill %.1f ms, TTFT %.1f ms, decode %s tok/s, prune %s ms",
                i,
                len(configs),
                name,
                case,
                row.prefill_ms,
                row.ttft_ms,
                "-" if row.decode_tok_s is None else f"{row.decode_tok_s:.1f}",
                "-" if row.prune_ms is None else f"{row.prune_ms:.1f}",
            )
    finally:
        hf_logger.setLevel(level)
    base = next((r for r in rows if r.name == "none" and r.prefill_ms), None)
    if base is not None:
        for row in rows:
            if row.prefill_ms and row is not base:
                row.prefill_speedup = base.prefill_ms / row.prefill_ms
                row.ttft_speedup = base.ttft_ms / row.ttft_ms if row.ttft_ms else None
    return rows
