"""The projector stage: selecting each item's tokens before the language model, and the call that runs it.

Vision- and projector-stage methods select here, on every item of the batch at once (``select_batch`` on the
padded tokens in the LLM input space, their layouts, and the keyword arguments their needs ask for); the dropped
placeholders then leave their rows (:func:`~mrprune.integrations.hf.rows.rebuild`) and the language model runs on the
merged ``inputs_embeds`` with explicit positions: ``"original"`` (the unpruned positions, gathered) or
``"compact"`` (``0..L'-1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...batching import pad_batch
from ...methods.results import Result, merged_tokens
from ...methods.stages import Need
from ...text import extract_nouns, noun_token_ids
from .rows import Rows, take_labels
from .vision import VisionStage, VisualItem, clip_signals

__all__ = ["Texts", "merged_call", "select"]


def _per_row(entries: Sequence[Any], batch: int, name: str) -> list[Any]:
    """One entry per row; ``generate`` repeats every prompt for beams / ``num_return_sequences``."""
    if not entries or batch % len(entries):
        raise ValueError(f"mrprune: {len(entries)} {name} for a batch of {batch}; give one per prompt")
    return [entry for entry in entries for _ in range(batch // len(entries))]


class Texts:
    """Where text-conditioned methods (``Need.TEXT``) get their instruction's noun-token embeddings: ``texts``
    (embeddings or token ids per prompt), else ``instructions`` (strings), else the prompt's text after its last
    visual token, decoded with ``tokenizer``."""

    def __init__(self, tokenizer: Any, instructions: Sequence[str] | None, texts: Sequence[torch.Tensor] | None):
        self.tokenizer = tokenizer
        self.instructions = None if instructions is None else list(instructions)
        self.texts = None if texts is None else list(texts)

    def strings(self, items: list[VisualItem], input_ids: torch.Tensor, real: torch.Tensor) -> list[str]:
        """Each row's instruction: ``instructions``, else the prompt's text after its last visual token."""
        batch = input_ids.shape[0]
        if self.instructions is not None:
            return _per_row(self.instructions, batch, "instructions")
        strings = []
        for b in range(batch):
            last = max((int(item.cols.max()) for item in items if item.row == b), default=None)
            if last is None or self.tokenizer is None:  # a prompt without visual tokens needs no text
                strings.append("")
                continue
            tail = input_ids[b, last + 1 :][real[b, last + 1 :]]
            strings.append(self.tokenizer.decode(tail.tolist(), skip_special_tokens=True))
        return strings

    def embeddings(
        self, model: Any, method: Any, items: list[VisualItem], input_ids: torch.Tensor, real: torch.Tensor
    ) -> list[torch.Tensor]:
        """``[M, D]`` per item: its sample's instruction nouns in the model's input-embedding table."""
        batch = input_ids.shape[0]
        embed = model.get_input_embeddings()
        with torch.no_grad():
            if self.texts is not None:
                rows = [
                    embed(t.to(input_ids.device)) if t.dim() == 1 else t for t in _per_row(self.texts, batch, "texts")
                ]
            else:
                strings = self.strings(items, input_ids, real)
                rows = []
                for text in strings:
                    nouns = extract_nouns(text, getattr(method, "noun_extractor", None))
                    ids = noun_token_ids(text, nouns, self.tokenizer)
                    rows.append(embed(torch.tensor(ids, dtype=torch.int64, device=input_ids.device)))
        return [rows[item.row] for item in items]


def select(
    method: Any,
    vision: VisionStage,
    texts: Texts,
    model: Any,
    items: list[VisualItem],
    input_ids: torch.Tensor,
    real: torch.Tensor,
) -> list[Result]:
    """Run a vision- or projector-stage method on every item of the batch at once: kept indices (or
    :class:`~mrprune.methods.results.MergedTokens`) per item."""
    layouts = vision.layouts(items)
    features, lengths = pad_batch([item.features for item in items])
    extra = vision.signals(items)
    if Need.CLIP_EMBEDDINGS in method.needs:
        strings = texts.strings(items, input_ids, real)
        extra.update(clip_signals(method, items, [strings[item.row] for item in items]))
    text = texts.embeddings(model, method, items, input_ids, real) if Need.TEXT in method.needs else None
    with torch.no_grad():
        return method.select_batch(features, layouts, lengths, text, **extra)


def merged_call(
    adapter: Any,
    model: Any,
    position_mode: str,
    call: dict[str, Any],
    items: list[VisualItem],
    kept: list[Result] | None,
    rows: Rows,
    positions: torch.Tensor,
    mask_dtype: torch.dtype,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The language-model call on the rebuilt rows: kept features (a merging method's merged tokens, at their
    representatives' rows) merged into ``inputs_embeds`` (as the model merges them), the new attention mask,
    explicit positions ``[A, B, L']`` (also returned) and labels."""
    visual = set(adapter.visual_keys) | {"mm_encoder_outputs", "input_ids"}
    new_call = {k: v for k, v in call.items() if k not in visual}
    new_ids = rows.take(call["input_ids"])
    embeds = model.get_input_embeddings()(new_ids)
    for modality in adapter.modalities:
        group = [(i, item) for i, item in enumerate(items) if item.modality == modality]
        if not group:
            continue
        features = torch.cat(
            [item.features if kept is None else merged_tokens(kept[i], item.features) for i, item in group]
        )
        cells = (new_ids == adapter.token_id(modality)) & rows.real
        embeds = embeds.masked_scatter(cells[..., None], features.to(embeds.device, embeds.dtype))
    if position_mode == "original":
        new_positions = rows.take(positions, dim=2)
    else:
        compact = (rows.real.cumsum(1) - 1).clamp(min=0).masked_fill(~rows.real, 0)
        new_positions = compact.expand(positions.shape[0], -1, -1)
    new_call.update(
        inputs_embeds=embeds,
        attention_mask=rows.real.to(mask_dtype),
        position_ids=adapter.model_positions(new_positions),
        return_dict=True,
    )
    if call.get("labels") is not None:
        new_call["labels"] = take_labels(call["labels"], rows)
    return new_call, new_positions
