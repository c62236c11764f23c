"""Tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL checkpoints that vLLM can serve (tests and the benchmark).

Each builder saves a randomly initialised model with ``save_pretrained`` (safetensors), its processor (slow image
processors) and a word-level tokenizer (``w4`` .. ``w89`` are words; ids 90-93 are the visual placeholders) to a
folder, and returns the transformers model and processor. Text models have ``head_dim`` 32 (vLLM's CPU attention
rejects 16). Generation never stops early (no EOS).
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["IMAGE", "VIDEO", "VISION_END", "VISION_START", "build_llava", "build_qwen", "random_image"]

WORDS = ["[PAD]", "<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(4, 90)] + [f"x{i}" for i in range(90, 100)]
IMAGE, VIDEO, VISION_START, VISION_END = 90, 91, 92, 93


def _tokenizer(special: dict[int, str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS)
    for index, text in special.items():
        words[index] = text
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        additional_special_tokens=list(special.values()),
    )


def _text_config(hidden: int = 128, layers: int = 2) -> dict[str, Any]:
    # head_dim 32: vLLM's CPU attention rejects 16
    return dict(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _save(model: Any, processor: Any, path: str) -> None:
    """save_pretrained, with the CLIP tower's weights under the ``vision_model.`` prefix vLLM's loader expects."""
    from safetensors.torch import load_file, save_file

    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    processor.save_pretrained(path)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    prefix = "vision_tower."
    renamed = {
        (f"{prefix}vision_model.{k[len(prefix) :]}" if k.startswith(prefix) and "vision_model." not in k else k): v
        for k, v in state.items()
    }
    save_file(renamed, file, metadata={"format": "pt"})


def build_llava(
    path: str, next_: bool, image_size: int = 28, patch_size: int = 7, hidden: int = 128, layers: int = 2
) -> tuple[Any, Any]:
    """A tiny random LLaVA-1.5 (``next_=False``) or LLaVA-NeXT saved to ``path`` with its processor; returns both.

    CLIP tower of ``image_size`` px in ``patch_size`` px patches; LLaVA-NeXT pinpoints are 1 x 2, 2 x 1 and 2 x 2
    tiles.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(**_text_config(hidden, layers))
    if next_:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor
        from transformers import LlavaNextProcessor as Processor

        s = image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE, image_grid_pinpoints=pinpoints
        )
        model = LlavaNextForConditionalGeneration(config)
        images = LlavaNextImageProcessor(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
        )
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from transformers import LlavaProcessor as Processor

        tokens = (image_size // patch_size) ** 2
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, image_seq_length=tokens)
        model = LlavaForConditionalGeneration(config)
        images = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    processor = Processor(
        image_processor=images,
        tokenizer=_tokenizer({IMAGE: "<image>"}),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    _save(model, processor, path)
    return model.eval(), processor


def random_image(height: int, width: int, seed: int) -> Any:
    """A uniformly random RGB ``PIL.Image`` of ``height x width`` px."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


QWEN_SPECIAL = {
    IMAGE: "<|image_pad|>",
    VIDEO: "<|video_pad|>",
    VISION_START: "<|vision_start|>",
    VISION_END: "<|vision_end|>",
}


def build_qwen(path: str) -> tuple[Any, Any]:
    """A tiny random Qwen2.5-VL saved to ``path`` with its processor (images of 56² to 112² px); returns both."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    config = Qwen2_5_VLConfig(
        text_config=dict(**_text_config(), rope_parameters=rope),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        video_processor=Qwen2VLVideoProcessor(size=pixels),
        tokenizer=_tokenizer(QWEN_SPECIAL),
    )
    _save(model, processor, path)
    return model.eval(), processor
