"""Shared tiny-model cases and oracles for the integration tests (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL).

Each case is a padded batch of two prompts (several images, a Qwen2.5-VL video) with, per prompt, the visual inputs
that prompt takes alone. The test modules guard on ``transformers`` themselves (``pytest.importorskip``); the models
are built lazily, so importing this module needs only torch.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch

from mrprune.integrations.testing import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    left_pad,
    mask_positions,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
)

GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
#: one Qwen2.5-VL patch's pixel values: 3 channels x 2 frames x 14 x 14
PATCH = 3 * 2 * 14 * 14
#: decoder layers of the llm stage's cases (``LLM_CASES``)
LLM_LAYERS = 4


def llava_case(layers: int = 2) -> tuple[Any, dict, list[dict]]:
    """``(model, inputs, singles)``: two prompts with three 16-token images."""
    image = [IMAGE_TOKEN] * 16
    input_ids, attention_mask = left_pad([[1, 5, 6, *image, 7, 8, *image, 9, 10, 11], [1, 12, *image, 13, 14, 15]])
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    singles = [dict(pixel_values=pixels[:2]), dict(pixel_values=pixels[2:])]
    return tiny_llava(layers=layers), inputs, singles


def llava_next_case(layers: int = 2) -> tuple[Any, dict, list[dict]]:
    """``(model, inputs, singles)``: two prompts with three any-resolution images."""
    model = tiny_llava_next(layers=layers)
    # (28, 40) is unpadded left and right, (40, 28) top and bottom: both offsets of the tiles' token grid matter
    sizes = torch.tensor([[28, 40], [56, 56], [40, 28]])
    pixels = torch.randn(3, 5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        counts = [len(f) for f in model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output]
    input_ids, attention_mask = left_pad(
        [
            [1, 5, *[IMAGE_TOKEN] * counts[0], 7, *[IMAGE_TOKEN] * counts[1], 8, 9],
            [1, 12, *[IMAGE_TOKEN] * counts[2], 14],
        ]
    )
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, image_sizes=sizes)
    singles = [
        dict(pixel_values=pixels[:2], image_sizes=sizes[:2]),
        dict(pixel_values=pixels[2:], image_sizes=sizes[2:]),
    ]
    return model, inputs, singles


def qwen_case(layers: int = 2) -> tuple[Any, dict, list[dict]]:
    """``(model, inputs, singles)``: two prompts with three images and a two-frame video."""
    images, videos = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 8, 4]]), torch.tensor([[2, 4, 4]])
    vision = lambda token, n: [VISION_START, *[token] * n, VISION_END]  # noqa: E731
    input_ids, attention_mask = left_pad(
        [
            [1, 5, *vision(IMAGE_TOKEN, 4), 7, *vision(IMAGE_TOKEN, 8), 8, 9],
            [1, 12, *vision(IMAGE_TOKEN, 8), *vision(VIDEO_TOKEN, 8), 13, 14, 15],
        ]
    )
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(int(images.prod(-1).sum()), PATCH, generator=generator)
    video = torch.randn(int(videos.prod(-1).sum()), PATCH, generator=generator)
    types = (input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int()
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels,
        image_grid_thw=images,
        pixel_values_videos=video,
        video_grid_thw=videos,
        mm_token_type_ids=types,
    )
    split = int(images[:2].prod(-1).sum())
    singles = [
        dict(pixel_values=pixels[:split], image_grid_thw=images[:2]),
        dict(pixel_values=pixels[split:], image_grid_thw=images[2:], pixel_values_videos=video, video_grid_thw=videos),
    ]
    return tiny_qwen2_5_vl(layers=layers), inputs, singles


def prompt_positions(model: Any, inputs: dict) -> torch.Tensor:
    """The position ids the model gives ``inputs``: M-RoPE ``[3, B, L]`` on Qwen2.5-VL, else ``[B, L]``."""
    mask = inputs["attention_mask"]
    if "image_grid_thw" not in inputs:
        return mask_positions(mask)
    return model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=mask,
    )[0]


def _with_positions(build: Callable[..., tuple[Any, dict, list[dict]]]) -> Callable[[], tuple]:
    @functools.wraps(build)
    def case() -> tuple[Any, dict, torch.Tensor, list[dict]]:
        model, inputs, singles = build(layers=LLM_LAYERS)
        return model, inputs, prompt_positions(model, inputs), singles

    return case


#: the vision / projector stage's cases (2 decoder layers): name -> ``() -> (model, inputs, singles)``
CASES = {"llava": llava_case, "llava_next": llava_next_case, "qwen2_5_vl": qwen_case}
#: the llm stage's cases (``LLM_LAYERS`` decoder layers): name -> ``() -> (model, inputs, positions, singles)``
LLM_CASES = {name: _with_positions(build) for name, build in CASES.items()}


def single_prompt(inputs: dict, b: int, visual: dict) -> dict:
    """Prompt ``b`` of the padded batch ``inputs`` alone (padding removed) with its visual inputs ``visual``."""
    real = inputs["attention_mask"][b].bool()
    one = dict(input_ids=inputs["input_ids"][b][real][None], **visual)
    if "mm_token_type_ids" in inputs:
        one["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][real][None]
    return one


def forbid_eager_clip_attention(monkeypatch: Any) -> None:
    """Make the CLIP tower's eager attention (the only path that materialises attention weights) raise."""
    from transformers.models.clip import modeling_clip

    def eager(*args, **kwargs):
        raise AssertionError("the CLIP tower ran eager attention")

    monkeypatch.setattr(modeling_clip, "eager_attention_forward", eager)


def oracle_embeds(model: Any, input_ids: torch.Tensor, records: list) -> torch.Tensor:
    """The prompt's embeddings with every item's merged tokens at its representatives' rows."""
    embeds = model.get_input_embeddings()(input_ids).clone()
    for b, record in enumerate(records):
        ids = input_ids[b]
        cells = torch.cat([(ids == IMAGE_TOKEN).nonzero()[:, 0], (ids == VIDEO_TOKEN).nonzero()[:, 0]])
        sizes = [m.sources.numel() for m in record.merged]
        for item, merged in zip(cells.split(sizes), record.merged, strict=True):
            embeds[b, item[merged.kept]] = merged.tokens.to(embeds.dtype)
    return embeds


# --- the llm stage's oracle: the unpatched eager model with, per decoder layer, the dropped prompt tokens hidden ---


def eager_copy(model: Any) -> Any:
    """A deep copy of ``model`` on eager attention (the path that returns attention probabilities)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def items_of(input_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(row, columns)]`` of every visual item: per row images in prompt order, then videos."""
    items = []
    for b in range(input_ids.shape[0]):
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):
            cells = (input_ids[b] == token).nonzero()[:, 0]
            if cells.numel():
                items.extend((b, run) for run in torch.tensor_split(cells, (cells.diff() > 1).nonzero()[:, 0] + 1))
    return items


def hide_hooks(model: Any, prompt_hidden: list, decode_hidden: list | None = None) -> list:
    """Pre-hooks hiding, in decoder layer ``l``, the prompt columns ``prompt_hidden[l] [B, L]`` from the prompt's rows
    and ``decode_hidden[l]`` (default: the same) from every later row (eager float masks)."""
    decode_hidden = prompt_hidden if decode_hidden is None else decode_hidden

    def hook(index):
        def hide(module, args, kwargs):
            mask = kwargs["attention_mask"]
            length = prompt_hidden[index].shape[1]
            hidden = torch.zeros(mask.shape[0], 1, mask.shape[2], mask.shape[3], dtype=torch.bool)
            hidden[:, 0, :length, :length] = prompt_hidden[index][:, None, :]
            hidden[:, 0, length:, :length] = decode_hidden[index][:, None, :]
            return args, {**kwargs, "attention_mask": mask.masked_fill(hidden, torch.finfo(mask.dtype).min)}

        return hide

    layers = model.model.language_model.layers
    return [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]


def layer_hidden(real: torch.Tensor, method: Any, kept_by_stage: list, upto: int | None = None) -> list:
    """Per decoder layer (of ``LLM_LAYERS``), the prompt columns hidden there: real tokens dropped at a pruning layer
    at or before it."""
    layers = method.layers
    hidden = []
    for index in range(LLM_LAYERS):
        stages = [s for s, k in enumerate(layers) if k <= index and (upto is None or s < upto)]
        hidden.append(real & ~kept_by_stage[stages[-1]] if stages else torch.zeros_like(real))
    return hidden


@torch.no_grad()
def oracle_generate(
    model: Any,
    inputs: dict,
    positions: torch.Tensor,
    method: Any,
    kept_by_stage: list,
    steps: int,
    copy_model: bool = True,
) -> tuple[torch.Tensor, list]:
    """Greedy tokens and logits of the masked unpatched eager model, the whole sequence recomputed at every step."""
    eager = eager_copy(model) if copy_model else model
    real = inputs["attention_mask"].bool()
    prompt_hidden = layer_hidden(real, method, kept_by_stage)
    final = real & ~kept_by_stage[-1]
    decode_hidden = [final] * LLM_LAYERS if method.prune_earlier_cache else prompt_hidden
    return recompute_loop(eager, inputs, positions, hide_hooks(eager, prompt_hidden, decode_hidden), steps)


def recompute_loop(
    eager: Any, inputs: dict, positions: torch.Tensor, hooks: list, steps: int
) -> tuple[torch.Tensor, list]:
    """Greedy decoding of ``eager`` with the whole sequence recomputed at every step (no cache); ``hooks`` (the
    oracle's masks and writes) are removed at the end. Returns tokens ``[B, steps]`` and the per-step logits."""
    ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], positions
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    types = inputs.get("mm_token_type_ids")
    tokens, scores = [], []
    try:
        for _ in range(steps):
            call = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra)
            if types is not None:
                call["mm_token_type_ids"] = types
            logits = eager(**call).logits[:, -1]
            token = logits.argmax(-1)
            tokens.append(token)
            scores.append(logits)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
            if types is not None:
                types = torch.cat([types, types.new_zeros(types.shape[0], 1)], 1)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(tokens, 1), scores
