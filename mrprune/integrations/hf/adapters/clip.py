"""CLIP vision towers (LLaVA-1.5, LLaVA-NeXT): the [CLS] attention row of chosen encoder layers, per crop.

The row is recomputed from each layer's own ``q_proj`` / ``k_proj`` on the layer's input (one query, so the tower
keeps SDPA / FlashAttention), captured by a pre-hook on the layer's ``self_attn`` for one encoder call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..vision import cls_attention_row

__all__ = ["cls_attention_probe", "cls_layers", "crop_features", "feature_attention_layer"]


def cls_layers(vision_tower: Any) -> Any | None:
    """The encoder layers of a CLIP-like tower with a [CLS] token (``embeddings.class_embedding``; SigLIP has
    none) whose attention modules expose ``q_proj``, ``k_proj``, ``num_heads`` and ``scale``; else ``None``."""
    vision_model = getattr(vision_tower, "vision_model", vision_tower)  # transformers 5 flattened CLIPVisionModel
    if not hasattr(getattr(vision_model, "embeddings", None), "class_embedding"):
        return None
    layers = vision_model.encoder.layers
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "scale")):
            return None
    return layers


def feature_attention_layer(vision_tower: Any, feature_layer: Any) -> int | None:
    """The index of the encoder layer whose output is ``hidden_states[feature_layer]`` (``None`` for a list of
    feature layers, the embeddings, or a tower without [CLS])."""
    layers = cls_layers(vision_tower)
    if layers is None or not isinstance(feature_layer, int):
        return None
    produced_by = feature_layer % (len(layers) + 1)  # hidden_states[0] is the encoder input
    return None if produced_by == 0 else produced_by - 1


@contextlib.contextmanager
def cls_attention_probe(
    vision_tower: Any, layers: Sequence[int]
) -> Iterator[Callable[[], dict[int, torch.Tensor] | None]]:
    """Around one tower run: yields a callable giving ``{layer: [crops, P]}``, the head-averaged [CLS] attention over
    the patch tokens at each requested layer (indices into the encoder's layers, negative from the end), or ``None``
    if the tower has no [CLS] token or did not run."""
    encoder_layers = cls_layers(vision_tower)
    if encoder_layers is None or not layers:
        yield lambda: None
        return
    count = len(encoder_layers)
    for layer in layers:
        if not -count <= layer < count:
            raise ValueError(f"mrprune: vision layer {layer} out of range for a tower of {count} layers")
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable:
        def capture(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                captured[layer] = cls_attention_row(
                    module.q_proj, module.k_proj, hidden.detach(), module.num_heads, module.scale
                )

        return capture

    hooks = [
        encoder_layers[layer].self_attn.register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in layers
    ]
    try:
        yield lambda: dict(captured) if len(captured) == len(set(layers)) else None
    finally:
        for hook in hooks:
            hook.remove()


def crop_features(output: Any, feature_layer: Any) -> torch.Tensor | None:
    """The tower's states at ``feature_layer`` for every crop of an encoder call, ``[crops, P, D_vision]`` ([CLS]
    dropped), from the call's output (transformers returns the tower's ``hidden_states`` with the features), or
    ``None`` when the output does not carry them or the feature layer is not one int."""
    states = getattr(output, "hidden_states", None)
    if states is None or not isinstance(feature_layer, int):
        return None
    return states[feature_layer][:, 1:].detach()
