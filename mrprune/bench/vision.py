"""What the vision- and llm-stage methods read, made up for the benchmark shapes (:func:`vision_inputs`,
:func:`llm_inputs`), ToMe's merges over synthetic crops (:func:`tome_blocks`), and eager ports of two official
selections.

A vision-stage method (FasterVLM, HiRED, SCOPE, VisPruner, CDPruner, TRIM, AgilePruner) reads more than the visual
tokens: the vision tower's [CLS] attention at one or two layers, each token's crop (and its patch within the crop),
and for ``official=True`` the attention and features of *every* patch of every crop (LLaVA-NeXT unpads the
high-resolution tiles, so some patches have no token); CDPruner and TRIM also read CLIP image and text embeddings.
:func:`vision_inputs` synthesises all of it from the benchmark's synthetic tokens, deterministically: per crop a
[CLS]-like softmax over the patches, the patches the unpadding removes filled with noisy copies of one "padding"
feature (cosines near 0.9 that differ by more than float32 rounding: the benchmark checks picks before timing),
CLIP embeddings as a fixed random projection of the tokens with text embeddings near two of them.

:func:`official_scope` and :func:`official_vispruner` are the official codes' per-crop selections written as they
run there (batched over the crops, dense, eager; float32), from the papers' repositories: SCOPE
(github.com/kinredon/SCOPE, ``scope/clip_encoder.py::SCOPE``) and VisPruner (github.com/Theia-4869/VisPruner,
``llava/model/llava_arch.py::encode_images``), mapped back to the tokens the model keeps as mrprune's
``official=True`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..layouts import GridLayout, LlavaNextLayout
from ..methods import Pruner
from ..methods.stages import LLM_KEYWORDS, NEED_KEYWORDS, PromptTokens, Stage

__all__ = [
    "VisionInputs",
    "llm_inputs",
    "need_kwargs",
    "official_scope",
    "official_vispruner",
    "tome_blocks",
    "token_sources",
    "vision_inputs",
]

#: Vision encoder layers whose [CLS] attention the benchmark provides (HiRED reads two, the others one).
LAYERS = (0, -2)
#: Width of the synthetic CLIP joint space (CDPruner, TRIM).
CLIP_DIM = 64


def token_sources(layout: LlavaNextLayout | GridLayout) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Each token's ``(crop, patch)`` as two ``[n]`` int64 tensors (``-1`` for newlines), the crop count and the
    patches per crop. LLaVA-NeXT: crop 0 is the base view, crop ``1 + r * tiles_wide + c`` the tile at row ``r``,
    column ``c``, the unpadded grid taken from the top-left of the tiles (a synthetic layout has no image to centre
    it in). A grid: one crop per frame."""
    n = layout.num_tokens
    crops = torch.full((n,), -1, dtype=torch.int64)
    patches = torch.full((n,), -1, dtype=torch.int64)
    if isinstance(layout, GridLayout):
        per_frame = layout.height * layout.width
        index = torch.arange(n)
        return index // per_frame, index % per_frame, layout.frames, per_frame
    side = layout.base_side
    crops[: layout.num_base] = 0
    patches[: layout.num_base] = torch.arange(layout.num_base)
    count = 1
    if layout.rows and layout.cols:
        tiles_wide, tiles_high = math.ceil(layout.cols / side), math.ceil(layout.rows / side)
        rows, cols = torch.arange(layout.rows)[:, None], torch.arange(layout.cols)[None]
        crops[layout.highres_indices] = (1 + (rows // side) * tiles_wide + cols // side).reshape(-1)
        patches[layout.highres_indices] = ((rows % side) * side + cols % side).reshape(-1)
        count += tiles_wide * tiles_high
    return crops, patches, count, layout.num_base


@dataclass
class VisionInputs:
    """The keyword arguments of a vision-stage ``select_batch`` (shapes for ``B`` items of ``N`` tokens, ``C`` crops of
    ``P`` patches; ``crop_*`` only where every item has the same crops)."""

    attention: dict[int, torch.Tensor]  # layer -> [B, N] float32 (newlines 0)
    crops: torch.Tensor  # [B, N] int64 (-1: newline or padding)
    patches: torch.Tensor  # [B, N] int64
    crop_attention: dict[int, torch.Tensor]  # layer -> [B, C, P] float32
    crop_features: torch.Tensor  # [B, C, P, D] in the features' dtype
    clip_image: torch.Tensor  # [B, N, CLIP_DIM] float32
    clip_text: list[torch.Tensor]  # per item [2, CLIP_DIM] float32

    def kwargs(self, pruner: Pruner) -> dict[str, Any]:
        """The keyword arguments an integration would pass ``pruner`` (those of its declared needs)."""
        every = {
            "attention": self.attention,
            "crops": self.crops,
            "patches": self.patches,
            "crop_attention": self.crop_attention,
            "crop_features": self.crop_features,
            "attention_kind": "cls",
            "clip_image": self.clip_image,
            "clip_text": self.clip_text,
            "crop_keys": {},  # the default modes of VisionZip / PruMerge read no keys
        }
        wanted = {key for need in pruner.needs for key in NEED_KEYWORDS.get(need.value, ())}
        return {key: value for key, value in every.items() if key in wanted}


def vision_inputs(features: torch.Tensor, lengths: torch.Tensor, layouts: list, seed: int = 11) -> VisionInputs:
    """Synthetic vision-stage inputs for ``features [B, N, D]`` whose items all have the layout ``layouts[0]``."""
    batch, tokens, dim = features.shape
    device = features.device
    generator = torch.Generator().manual_seed(seed)
    crop_of, patch_of, count, per_crop = token_sources(layouts[0])
    n = crop_of.numel()
    made = crop_of >= 0
    crops = torch.full((batch, tokens), -1, dtype=torch.int64)
    patches = torch.full((batch, tokens), -1, dtype=torch.int64)
    crops[:, :n], patches[:, :n] = crop_of, patch_of
    # every patch of every crop: the tokens where they exist, near-constant padding features elsewhere
    x = features.float().cpu()
    padding = x[:, :n][:, made].mean(1, keepdim=True)  # [B, 1, D]
    grid = padding[:, None].expand(batch, count, per_crop, dim).clone()
    grid += (
        0.3
        * padding.norm(dim=-1, keepdim=True)[:, None]
        / math.sqrt(dim)
        * torch.randn(grid.shape, generator=generator)
    )
    grid[:, crop_of[made], patch_of[made]] = x[:, :n][:, made]
    attention, crop_attention = {}, {}
    for layer in LAYERS:  # [CLS]-like rows: a softmax over each crop's patches, a few tokens dominate
        direction = torch.randn(dim, generator=generator)
        z = grid @ direction
        z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True).clamp_min(1e-12)
        rows = torch.softmax(2.0 * z, dim=-1)  # [B, C, P]: standardised logits, e^2 per standard deviation
        crop_attention[layer] = rows.to(device)
        token = torch.zeros(batch, tokens)
        token[:, :n][:, made] = rows[:, crop_of[made], patch_of[made]]
        attention[layer] = token.to(device)
    projection = torch.randn(dim, CLIP_DIM, generator=generator) / math.sqrt(dim)
    clip_image = x @ projection
    clip_text = []
    for b in range(batch):
        picks = torch.randint(0, int(lengths[b]), (2,), generator=generator)
        text = clip_image[b, picks] + 0.5 * clip_image[b, picks].norm(dim=-1, keepdim=True) / math.sqrt(
            CLIP_DIM
        ) * torch.randn(2, CLIP_DIM, generator=generator)
        clip_text.append(text.to(device))
    return VisionInputs(
        attention,
        crops.to(device),
        patches.to(device),
        crop_attention,
        grid.to(device=device, dtype=features.dtype),
        clip_image.to(device),
        clip_text,
    )


def _kept_tokens(chosen: torch.Tensor, inputs: VisionInputs, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Per item, the tokens whose ``(crop, patch)`` the per-crop masks ``chosen [B, C, P]`` keep (no newline)."""
    kept = []
    for b, n in enumerate(lengths.tolist()):
        owned, where = inputs.crops[b, :n], inputs.patches[b, :n]
        keep = (owned >= 0) & chosen[b][owned.clamp(min=0), where.clamp(min=0)]
        kept.append(keep.nonzero()[:, 0])
    return kept


def official_scope(
    inputs: VisionInputs, lengths: torch.Tensor, budget: int, layer: int, alpha: float = 1.0
) -> list[torch.Tensor]:
    """SCOPE's official selection per image: ``int(budget / crops)`` greedy picks in every crop at once, dense
    ``[C, P, P]`` cosines, each step ``gain = sum_i relu(S_ij - cur_i)`` (picked columns zeroed) times the [CLS]
    attention to the power ``alpha``, ``argmax``, then ``cur = max(cur, S_j)``."""
    chosen = []
    for b in range(len(lengths)):
        x = inputs.crop_features[b].float()
        saliency = inputs.crop_attention[layer][b].float() ** alpha
        crops, patches = saliency.shape
        unit = x / x.norm(dim=-1, keepdim=True)
        cosine = unit @ unit.transpose(1, 2)
        picked = torch.zeros(crops, patches, dtype=torch.bool, device=x.device)
        cur = torch.zeros(crops, patches, device=x.device)
        rows = torch.arange(crops, device=x.device)
        for _ in range(min(budget // crops, patches)):
            gain = (cosine.masked_fill(picked[:, None, :], 0) - cur[:, :, None]).clamp(min=0).sum(1) * saliency
            best = gain.masked_fill(picked, float("-inf")).argmax(1)
            picked[rows, best] = True
            cur = torch.maximum(cur, cosine[rows, best])
        chosen.append(picked)
    return _kept_tokens(chosen, inputs, lengths)


def official_vispruner(
    inputs: VisionInputs, lengths: torch.Tensor, budget: int, layer: int, ratio: float = 0.5, per_round: int = 8
) -> list[torch.Tensor]:
    """VisPruner's official selection per image: in every crop the ``int(budget * ratio)`` tokens of highest [CLS]
    attention, then among the rest rounds of even/odd de-duplication (drop the ``min(per_round, left - wanted)``
    even-position tokens most similar to an odd-position one, keep the others in descending score order, then the
    odd ones) until ``budget - important`` remain."""
    chosen = []
    for b in range(len(lengths)):
        x = inputs.crop_features[b].float()
        attention = inputs.crop_attention[layer][b].float()
        crops, patches = attention.shape
        t = min(budget, patches)
        important = int(t * ratio)
        order = attention.argsort(dim=-1, descending=True, stable=True)
        keep, rest = order[:, :important], order[:, important:]
        unit = x / x.norm(dim=-1, keepdim=True)
        rows = torch.arange(crops, device=x.device)[:, None]
        while rest.shape[1] > t - important:
            r = min(per_round, rest.shape[1] - (t - important))
            tokens = unit[rows, rest]
            scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(1, 2)).max(-1).values
            survivors = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
            rest = torch.cat([rest[:, ::2].gather(1, survivors), rest[:, 1::2]], dim=1)
        picked = torch.zeros(crops, patches, dtype=torch.bool, device=x.device)
        picked.scatter_(1, torch.cat([keep, rest], 1), True)
        chosen.append(picked)
    return _kept_tokens(chosen, inputs, lengths)


#: Text tokens of the synthetic prompt the llm-stage methods read.
PROMPT_TOKENS = 32


def llm_inputs(features: torch.Tensor, lengths: torch.Tensor, seed: int = 13) -> dict[str, Any]:
    """Synthetic ``select_batch`` keyword arguments of an ``llm``-stage method at its first pruning layer (step 0),
    for ``features [B, N, D]`` standing in for the hidden states: a prompt of :data:`PROMPT_TOKENS` text tokens after
    each item (random tokens of the item plus noise), their head-averaged attention to the item's tokens
    ``softmax(8 cos)`` ``[B, T, N]`` (0 on padding), its last row as the last-query attention, the tokens' L1 norms
    as key norms and an RMS norm as the final norm. Every key of every need; pick a method's with :func:`need_kwargs`.
    """
    batch, tokens, dim = features.shape
    device = features.device
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    picks = (torch.rand(batch, PROMPT_TOKENS, generator=generator) * lengths.cpu()[:, None]).long().to(device)
    prompt = torch.nn.functional.normalize(x.gather(1, picks[..., None].expand(-1, -1, dim)), dim=-1)
    prompt = prompt + 0.5 * torch.randn(batch, PROMPT_TOKENS, dim, generator=generator).to(device) / math.sqrt(dim)
    prompt = prompt * x.norm(dim=-1).mean()
    real = torch.arange(tokens, device=device)[None] < lengths[:, None]
    logits = (
        8.0 * torch.nn.functional.normalize(prompt, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).transpose(1, 2)
    )
    attention = logits.masked_fill(~real[:, None], float("-inf")).softmax(-1)  # [B, T, N]

    def rms(v: torch.Tensor) -> torch.Tensor:
        return (v.float() * torch.rsqrt(v.float().square().mean(-1, keepdim=True) + 1e-6)).to(v.dtype)

    text = PromptTokens(
        lengths=torch.full((batch,), PROMPT_TOKENS, device=device),
        positions=(lengths[:, None] + torch.arange(PROMPT_TOKENS, device=device)[None]),
        after=torch.ones(batch, PROMPT_TOKENS, dtype=torch.bool, device=device),
        embeddings=prompt.to(features.dtype),
        hidden=prompt.to(features.dtype),
        attention=attention,
        key_norms=prompt.abs().sum(-1),
        normed=rms(prompt.to(features.dtype)),
    )
    index = torch.arange(tokens, device=device).expand(batch, tokens)
    return {
        "attention": attention[:, -1],
        "prompt": text,
        "input_embeddings": features,
        "key_norms": (x.abs().sum(-1) * real),
        "normed": rms(features),
        "step": 0,
        "origin": torch.where(real, index, -1),
        "original_lengths": lengths,
        "positions": torch.where(real, index, -1),
    }


def need_kwargs(pruner: Pruner, available: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``available`` that ``pruner.select_batch`` takes (its needs' keywords, the llm stage's)."""
    wanted = {key for need in pruner.needs for key in NEED_KEYWORDS.get(need.value, ())}
    if getattr(pruner, "stage", None) is Stage.LLM:
        wanted |= set(LLM_KEYWORDS)
    return {key: value for key, value in available.items() if key in wanted}


def tome_blocks(pruner: Any, crops: torch.Tensor, blocks: int, heads: int) -> list[Any]:
    """ToMe's merging in ``blocks`` encoder blocks over ``crops [C, P, D]`` (a [CLS] prepended: their mean), every
    block's keys the current tokens split into ``heads`` heads (synthetic: no attention or MLP runs between merges),
    then each crop's :class:`~mrprune.methods.results.MergedTokens` over its ``P`` patches from the merged groups."""
    count, patches, dim = crops.shape
    hidden = torch.cat([crops.mean(1, keepdim=True), crops], 1)
    schedule = pruner.schedule(patches, blocks, [[patches]] * count, [0] * count)
    state = pruner.start(hidden, schedule)
    for block in range(blocks):
        tokens = state.tokens
        pruner.merge_block(state, block, tokens, tokens.view(*tokens.shape[:2], heads, dim // heads))
    groups = state.source[:, 1:]
    return pruner.select_batch(crops, [None] * count, groups=groups)
