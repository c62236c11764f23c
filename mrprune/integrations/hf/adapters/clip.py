"""CLIP vision towers (LLaVA-1.5, LLaVA-NeXT): the [CLS] attention row and the keys of chosen encoder layers, per crop,
and the encoder run of methods that merge tokens in every block (ToMe).

The row is recomputed from each layer's own ``q_proj`` / ``k_proj`` on the layer's input (one query, so the tower
keeps SDPA / FlashAttention), captured by a pre-hook on the layer's ``self_attn`` for one encoder call: head-averaged
(one softmax per head), or *joint* (one softmax of the full ``q . k / sqrt(embed_dim)`` without a head split, as
PruMerge's official ``clip_encoder.py`` scores). The keys are the layer's own ``k_proj`` output (on
``layer_norm1`` of the layer input, bias included), captured by a forward hook on ``k_proj``: nothing is recomputed.

Merging (:func:`merge_blocks`): for one encoder call every layer's ``forward`` is replaced by the same steps as
``CLIPEncoderLayer.forward`` on the method's merged tokens, with the method's merge between the attention residual
and the MLP (keys from the layer's own ``k_proj``, captured by a forward hook) and its additive attention bias passed
as the attention mask (SDPA and eager attention add a float mask to the logits; FlashAttention-2 and flex attention
take none, so a bias-needing run on them is refused); each layer returns its merged states *unmerged* (every token
gets its merged row), so the recorded ``hidden_states``, LLaVA's feature selection and the projector see the usual
shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..vision import cls_attention_row

__all__ = [
    "cls_attention_probe",
    "cls_layers",
    "crop_features",
    "feature_attention_layer",
    "key_probe",
    "merge_blocks",
]


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
    vision_tower: Any, layers: Sequence[int], heads: str = "mean"
) -> Iterator[Callable[[], dict[int, torch.Tensor] | None]]:
    """Around one tower run: yields a callable giving ``{layer: [crops, P]}``, the [CLS] attention over the patch
    tokens at each requested layer (indices into the encoder's layers, negative from the end), or ``None`` if the
    tower has no [CLS] token or did not run.

    ``heads``: ``"mean"`` averages the heads' softmax rows (scale ``head_dim ** -0.5``); ``"joint"`` takes one
    softmax of the full ``q_cls . k`` over all ``embed_dim`` channels, scaled by ``embed_dim ** -0.5`` (PruMerge's
    official score; the [CLS] key is in the softmax, its column dropped after)."""
    if heads not in ("mean", "joint"):
        raise ValueError(f"mrprune: heads must be 'mean' or 'joint', got {heads!r}")
    encoder_layers = _checked_layers(vision_tower, layers)
    if encoder_layers is None:
        yield lambda: None
        return
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable:
        def capture(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if heads == "joint":  # one head of all channels
                split, scale = 1, (module.num_heads * module.head_dim) ** -0.5
            else:
                split, scale = module.num_heads, module.scale
            with torch.no_grad():
                captured[layer] = cls_attention_row(module.q_proj, module.k_proj, hidden.detach(), split, scale)

        return capture

    hooks = [
        encoder_layers[layer].self_attn.register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in layers
    ]
    try:
        yield lambda: dict(captured) if len(captured) == len(set(layers)) else None
    finally:
        for hook in hooks:
            hook.remove()


def _checked_layers(vision_tower: Any, layers: Sequence[int]) -> Any | None:
    """The tower's encoder layers (``None``: no [CLS] tower, or no layer asked for); raises on an index out of
    range."""
    encoder_layers = cls_layers(vision_tower)
    if encoder_layers is None or not layers:
        return None
    count = len(encoder_layers)
    for layer in layers:
        if not -count <= layer < count:
            raise ValueError(f"mrprune: vision layer {layer} out of range for a tower of {count} layers")
    return encoder_layers


@contextlib.contextmanager
def key_probe(vision_tower: Any, layers: Sequence[int]) -> Iterator[Callable[[], dict[int, torch.Tensor] | None]]:
    """Around one tower run: yields a callable giving ``{layer: [crops, P, H, d]}``, each requested layer's keys of
    the patch tokens (the layer's ``k_proj`` output on its ``layer_norm1``-ed input, bias included, split into its
    ``H`` heads of ``d`` channels, [CLS] dropped; the tower's dtype, detached), or ``None`` if the tower has no
    [CLS] token or did not run. ``.mean(-2)`` gives VisionZip's head-averaged keys, ``.flatten(-2)`` PruMerge's
    full keys."""
    encoder_layers = _checked_layers(vision_tower, layers)
    if encoder_layers is None:
        yield lambda: None
        return
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int, heads: int) -> Callable:
        def capture(module: Any, args: tuple, output: torch.Tensor) -> None:
            crops, tokens, _ = output.shape
            captured[layer] = output.detach().view(crops, tokens, heads, -1)[:, 1:]

        return capture

    hooks = []
    for layer in layers:
        attention = encoder_layers[layer].self_attn
        hooks.append(attention.k_proj.register_forward_hook(hook_for(layer, attention.num_heads)))
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


@contextlib.contextmanager
def merge_blocks(
    vision_tower: Any, method: Any, schedule: list[list[int]]
) -> Iterator[Callable[[], torch.Tensor | None]]:
    """Around one tower run of ``C`` crops: every encoder layer runs on the method's merged tokens (block ``i``
    merging ``schedule[c][i]`` pairs of crop ``c``); yields a callable giving the source map ``[C, 1 + P]`` int64
    (each token's row after the last merge, [CLS] first), or ``None`` if the tower did not run.

    ``method`` provides ``start``, ``attention_bias``, ``merge_block``, ``unmerge`` and ``uses_bias``
    (:class:`mrprune.ToMe`).
    """
    layers = cls_layers(vision_tower)
    if layers is None:
        raise ValueError("mrprune: merging inside the vision encoder needs a CLIP tower with a [CLS] token")
    implementation = getattr(layers[0].self_attn.config, "_attn_implementation", None)
    if method.uses_bias(schedule) and implementation not in ("sdpa", "eager", None):
        raise NotImplementedError(
            f"mrprune: {type(method).__name__} adds an attention bias (log(size) with proportional attention, -inf on "
            f"the padding of crops merged to different lengths) that the vision tower's {implementation!r} attention "
            "does not take; load the tower with attn_implementation='sdpa' (or 'eager'), or merge every crop with "
            "the same r and proportional_attention=False"
        )
    run: dict[str, Any] = {}

    def capture_keys(module: Any, args: tuple, output: torch.Tensor) -> None:
        run["keys"] = output

    def forward_for(index: int, layer: Any) -> Callable:
        attention = layer.self_attn

        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
            if index == 0:
                run["state"] = method.start(hidden_states, schedule)
            elif hidden_states is not run.get("out"):
                raise RuntimeError(
                    f"mrprune: CLIP encoder layer {index} did not receive layer {index - 1}'s output, so the merged "
                    "tokens cannot be followed"
                )
            state = run["state"]
            residual = state.tokens
            bias = method.attention_bias(state, residual.dtype)
            if bias is not None:
                attention_mask = bias if attention_mask is None else attention_mask + bias
            hidden, _ = attention(hidden_states=layer.layer_norm1(residual), attention_mask=attention_mask, **kwargs)
            hidden = residual + hidden
            keys = run.pop("keys")
            method.merge_block(state, index, hidden, keys.view(*hidden.shape[:2], attention.num_heads, -1))
            residual = state.tokens
            state.tokens = residual + layer.mlp(layer.layer_norm2(residual))
            run["out"] = method.unmerge(state, state.tokens)
            return run["out"]

        return forward

    previous = [layer.__dict__.get("forward") for layer in layers]  # another patch's instance forward, if any
    if any(p is not None for p in previous):
        raise RuntimeError("mrprune: the CLIP encoder layers' forward is already patched; remove that patch first")
    hooks = [layer.self_attn.k_proj.register_forward_hook(capture_keys) for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = forward_for(index, layer)
    try:
        yield lambda: run["state"].source if "state" in run else None
    finally:
        for layer in layers:
            del layer.__dict__["forward"]
        for hook in hooks:
            hook.remove()
