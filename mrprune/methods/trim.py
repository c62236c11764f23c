"""TRIM (training-free use): keep the patches whose CLIP similarity to the question is an outlier (Song et al., "Less
is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal LLMs", COLING 2025; official code
FreedomIntelligence/TRIM @ 0e66677, ``llava/model/multimodal_encoder/clip_encoder.py::token_reduction``).

A ``vision``-stage method on CLIP's joint space: ``s_i = <v_i, t>`` with ``v_i`` the patch's
``visual_projection(post_layernorm(.))`` embedding and ``t`` the question's CLIP text embedding (both unnormalised, as
the official code), then ``p = softmax(-s)`` over the image's patches (the official negation); the kept count is the
share of ``p`` above the IQR outlier bound ``Q3 + 1.5 IQR`` (official ``TextSim:-1``) or a fixed share, and the
kept tokens are the top of ``p``. The CLIP model is the user's (``clip``, shared with CDPruner). The recipe's
fine-tuning and the ``TextSim+`` mean token (a merged token) are not part of it.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from . import _checks
from ._vision import check_layer, token_scores
from .base import KeptCountUnknown, Layout, Pruner, newline_count, round_half_up, take_prefixes
from .stages import Need, Stage

__all__ = ["TRIM"]


def _outlier_share(values: torch.Tensor) -> float:
    """Share of ``values`` above ``Q3 + 1.5 (Q3 - Q1)`` (linear-interpolated quartiles, as ``np.percentile``)."""
    quartiles = torch.quantile(values.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device))
    bound = quartiles[1] + 1.5 * (quartiles[1] - quartiles[0])
    return float((values.double() > bound).sum()) / values.numel()


class TRIM(Pruner):
    """TRIM: CLIP text-patch similarity with the IQR-outlier keep rule.

    Parameters
    ----------
    keep_ratio : float in (0, 1], optional
        A fixed share (official ``TextSim:k``: ``int(P * k)``); ``None`` (default) uses the IQR outlier share.
    clip, clip_tokenizer
        The user's ``CLIPModel`` and its tokenizer (as for :class:`~mrprune.methods.CDPruner`); required.
    layer : int
        The select layer (-2); named for the vision stage only.
    official : bool
        ``True`` reproduces the official selection on one-crop images (LLaVA-1.5): the IQR share is computed over
        *all images of the call at once* (the official flattening), the count is ``int(P * share)``, and the text is
        the question's first 77 tokens. Multi-crop images are refused because the official code has no token subset
        to reproduce there: ``token_reduction`` moves each crop's kept patches to the front of the crop and fills the
        rest with zeros, the LLaVA-NeXT merge (``prepare_inputs_labels_for_multimodal``) then lays those rows out as
        the crop's spatial grid, unpads it, appends newlines and cuts each *image* to ``actual_dims[image]``, one
        crop's count (and the question embedding broadcasts over the crops only when there is one question).

    Notes
    -----
    Default mode (``official=False``): the share and the softmax are per image (no coupling between the images of a
    batch), over every patch token of the image (LLaVA-NeXT: all crops; newlines are kept and not counted), the count
    is ``round(share * n)`` with at least one token, and a question longer than 77 tokens averages its segments'
    similarities. Ties go to the lower index.
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION, Need.CLIP_EMBEDDINGS}

    def __init__(
        self,
        keep_ratio: float | None = None,
        clip: Any = None,
        clip_tokenizer: Any = None,
        layer: int = -2,
        official: bool = False,
    ) -> None:
        self.keep_ratio = None if keep_ratio is None else _checks.keep_ratio("TRIM", keep_ratio)
        if clip is None:
            raise ValueError("mrprune.TRIM needs clip= (a CLIPModel matching the vision tower) and clip_tokenizer=")
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.layer = check_layer("TRIM", layer)
        self.official = _checks.flag("TRIM", "official", official)
        self.attention_layers = (self.layer,)

    def __repr__(self) -> str:
        return f"TRIM(keep_ratio={self.keep_ratio}, official={self.official})"

    def kept_count(self, layout: Layout) -> int:
        """Default mode with ``keep_ratio``: ``round(keep_ratio * S)`` of the ``S`` patch tokens (at least one), plus
        every newline. The IQR share (``keep_ratio=None``) and ``official=True`` depend on the features
        (:class:`mrprune.KeptCountUnknown`)."""
        if self.keep_ratio is None or self.official:
            raise KeptCountUnknown(
                "mrprune.TRIM keeps the IQR outlier share of its CLIP similarities (keep_ratio=None) or, with "
                "official=True, a share of its crops' patches: the count depends on the features; use keep_ratio= "
                "and official=False"
            )
        lines = newline_count(layout)
        scored = layout.num_tokens - lines
        return min(max(1, round_half_up(self.keep_ratio * scored)), scored) + lines

    def _select_batch(
        self, features, layouts, lengths, texts, attention=None, crops=None, clip_image=None, clip_text=None, **kwargs
    ):
        _, crops = token_scores("TRIM", features, attention, crops, self.layer)
        if clip_image is None or clip_text is None or any(t is None or t.shape[0] == 0 for t in clip_text):
            raise ValueError("mrprune.TRIM: every item needs clip_image and a non-empty clip_text (its question)")
        made = (crops >= 0) & (torch.arange(features.shape[1], device=features.device)[None] < lengths[:, None])
        segments = [t[:1] if self.official else t for t in clip_text]
        dots = torch.stack(
            [(clip_image[b].float() @ segments[b].float().T).mean(-1) for b in range(features.shape[0])]
        )  # [B, N]
        probs = torch.softmax((-dots).masked_fill(~made, float("-inf")), dim=-1).masked_fill(~made, 0.0)
        counts = []
        if self.official:
            if bool((made.sum(1) != lengths).any()):
                raise ValueError("mrprune.TRIM(official=True) takes one-crop images (LLaVA-1.5); use official=False")
            share = self.keep_ratio if self.keep_ratio is not None else _outlier_share(probs[made])
            counts = [int(int(n) * share) for n in lengths.tolist()]
        else:
            for b in range(features.shape[0]):
                scored = probs[b][made[b]]
                share = self.keep_ratio if self.keep_ratio is not None else _outlier_share(scored)
                counts.append(max(1, int(share * scored.numel() + 0.5)))
        valid = made.sum(1)
        order = ops.topk_indices(probs.masked_fill(~made, -1.0), lengths, max(counts, default=0))
        kept = take_prefixes(order, [min(c, int(v)) for c, v in zip(counts, valid.tolist(), strict=True)])
        newlines = [
            ((~made[b]) & (torch.arange(features.shape[1], device=made.device) < lengths[b])).nonzero()[:, 0]
            for b in range(len(kept))
        ]
        return [torch.cat([k, lines]) for k, lines in zip(kept, newlines, strict=True)]
