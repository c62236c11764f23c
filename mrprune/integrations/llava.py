"""LLaVA-1.5 (``LlavaForConditionalGeneration``): every image is a ``side x side`` raster of patch tokens.

Also home of the CLS-attention probe LLaVA and LLaVA-NeXT share: ResPrune's seed is the patch token the vision
tower's CLS token attends to most in the layer that produces the feature layer's hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..layouts import GridLayout
from .hf import Adapter

__all__ = ["LlavaAdapter", "check_default_strategy", "cls_attention_probe", "config_argument"]


def _cls_attention_layer(vision_tower: Any, feature_layer: Any) -> Any:
    """The encoder layer whose output is ``hidden_states[feature_layer]``, if the tower is CLIP-like with a CLS token
    (``embeddings.class_embedding``; SigLIP has none) and ``feature_layer`` is one int; else ``None``."""
    vision_model = getattr(vision_tower, "vision_model", vision_tower)  # transformers 5 flattened CLIPVisionModel
    if not isinstance(feature_layer, int):
        return None
    if not hasattr(getattr(vision_model, "embeddings", None), "class_embedding"):
        return None
    layers = vision_model.encoder.layers
    produced_by = feature_layer % (len(layers) + 1)  # hidden_states[0] is the encoder input
    if produced_by == 0:
        return None
    layer = layers[produced_by - 1]
    attention = getattr(layer, "self_attn", None)
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")):
        return None
    return layer


def _cls_attention(attention: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the CLS query over the patch keys: ``[crops, 1 + P, D] -> [crops, P]``."""
    crops, tokens, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(hidden[:, :1]).view(crops, 1, heads, head_dim).transpose(1, 2)
    keys = attention.k_proj(hidden).view(crops, tokens, heads, head_dim).transpose(1, 2)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * attention.scale  # [crops, heads, 1, tokens]
    return logits.softmax(-1).mean(1)[:, 0, 1:]


@contextlib.contextmanager
def cls_attention_probe(vision_tower: Any, feature_layer: Any) -> Iterator[Callable[[], torch.Tensor | None]]:
    """Around one vision-tower run: yields a callable giving the CLS attention over the patch tokens
    ``[crops, P]`` of that run (``None`` if the tower has no CLS token or did not run)."""
    layer = _cls_attention_layer(vision_tower, feature_layer)
    if layer is None:
        yield lambda: None
        return
    captured: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield lambda: None if "hidden" not in captured else _cls_attention(layer.self_attn, captured["hidden"].detach())
    finally:
        hook.remove()


def config_argument(arguments: dict[str, Any], name: str, config: Any) -> Any:
    """A vision argument of the call, or the config's default (as ``merge_with_config_defaults`` fills it)."""
    value = arguments.get(name)
    return getattr(config, name) if value is None else value


def check_default_strategy(config: Any, arguments: dict[str, Any]) -> None:
    strategy = config_argument(arguments, "vision_feature_select_strategy", config)
    if strategy != "default":
        raise ValueError(
            f"mrprune: vision_feature_select_strategy={strategy!r} keeps the CLS token among the image tokens, which "
            "then are no grid; only 'default' is supported"
        )


class LlavaAdapter(Adapter):
    """``LlavaForConditionalGeneration``: images are ``GridLayout(1, side, side)`` (24 x 24 for CLIP-336/14)."""

    visual_keys = frozenset({"pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"})

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> GridLayout:
        check_default_strategy(self.model.config, arguments)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return GridLayout(1, side, side)

    @contextlib.contextmanager
    def seed_probe(self, modality: str, arguments: dict[str, Any]) -> Iterator[Callable[[], list[int] | None]]:
        feature_layer = config_argument(arguments, "vision_feature_layer", self.model.config)
        with cls_attention_probe(self.base.vision_tower, feature_layer) as attention:

            def seeds() -> list[int] | None:
                scores = attention()
                return None if scores is None else scores.argmax(-1).tolist()

            yield seeds
