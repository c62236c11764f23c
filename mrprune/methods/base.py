"""The pruner interface and the batching glue every method shares.

A pruner decides which visual tokens of each image to keep. It sees the tokens of one image (``select``) or of a
padded batch of images (``select_batch``), plus each image's layout, and returns the kept indices of each image sorted
ascending (spatial order). All numerics run in ``torch.ops.mrprune``; methods only arrange inputs and budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import _validation, ops
from ..layouts import GridLayout, LlavaNextLayout
from . import _checks
from .results import MergedTokens, Result
from .stages import Need, Stage

Layout = LlavaNextLayout | GridLayout


def round_half_up(value: float) -> int:
    """``round`` without banker's rounding: 0.5 rounds up (budgets are counts of tokens)."""
    return math.floor(value + 0.5)


class KeptCountUnknown(ValueError):
    """The number of tokens a pruner keeps of an image does not follow from the image's layout alone (an adaptive
    count, merged tokens, pruning inside the language model, an official mode's feature-dependent budget); the
    message says which."""


def check_keep_ratio(keep_ratio: float, owner: str = "Pruner") -> float:
    return _checks.keep_ratio(owner, keep_ratio)


def take_prefixes(indices: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """The first ``counts[b]`` entries of each row of ``indices [B, k]`` (a top-k or greedy order is prefix-stable)."""
    return [indices[b, :count] for b, count in enumerate(counts)]


def newline_count(layout: Layout) -> int:
    """LLaVA-NeXT newline tokens of ``layout`` (0 for a :class:`~mrprune.GridLayout`)."""
    return layout.newline_indices.numel() if isinstance(layout, LlavaNextLayout) else 0


def _batch_of_one(owner: str, method: Pruner, features: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``select``'s one-item keywords (:data:`~mrprune.methods.stages.ITEM_KEYWORDS`, by ``method``'s needs and
    stage) in ``select_batch``'s form for a batch of one; other keywords unchanged. Raises ``ValueError`` naming
    ``owner``, the keyword and its expected shape for a value of another shape."""
    from .stages import ITEM_KEYWORDS, LLM_ITEM_KEYWORDS

    forms: dict[str, str] = {}
    for need in method.needs:
        forms.update(ITEM_KEYWORDS.get(need.value, {}))
    if method.stage is Stage.LLM:
        forms.update(LLM_ITEM_KEYWORDS)
    lifted = dict(kwargs)
    for key in forms.keys() & kwargs.keys():
        form, value = forms[key], kwargs[key]
        if form.startswith("{layer: "):
            inner = form[len("{layer: ") : -1]
            if not isinstance(value, dict):
                raise ValueError(
                    f"mrprune.{owner}: {key} must be a dict {form} of one item's tensors, got "
                    f"{_checks._describe(value, with_shape=True)}"
                )
            lifted[key] = {
                layer: _one_item(owner, f"{key}[{layer!r}]", v, inner, features) for layer, v in value.items()
            }
        else:
            lifted[key] = _one_item(owner, key, value, form, features)
    return lifted


def _one_item(owner: str, name: str, value: Any, form: str, features: torch.Tensor) -> torch.Tensor:
    """``value`` (one item's tensor of shape ``form``, e.g. ``"[N, D]"``; ``"[]"``: an int) with a batch dimension."""
    if form == "[]":
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return torch.tensor([value], device=features.device)
        error = ValueError if isinstance(value, torch.Tensor) else TypeError  # a batch's [1] is a shape error
        raise error(
            f"mrprune.{owner}: {name} must be one item's int (select_batch takes one per item), got "
            f"{_checks._describe(value, with_shape=True)}"
        )
    dims = form[1:-1].split(", ")
    expected = tuple(str(features.shape[0]) if d == "N" else d for d in dims)
    spelt = f"({expected[0]},)" if len(expected) == 1 else f"({', '.join(expected)})"
    if (
        not isinstance(value, torch.Tensor)
        or value.dim() != len(dims)
        or (dims[0] == "N" and value.shape[0] != features.shape[0])
    ):
        raise ValueError(
            f"mrprune.{owner}: {name} must be the {form} = {spelt} tensor of one item (select_batch takes it with a "
            f"batch dimension in front), got {_checks._describe(value, with_shape=True)}"
        )
    return value[None]


class _NeedsText:
    """``Pruner.uses_text``: whether the method takes text embeddings (``Need.TEXT``), on the class and on instances."""

    def __get__(self, instance: Any, owner: type) -> bool:
        return Need.TEXT in owner.needs


class Pruner:
    """Base class of the pruning methods.

    Subclasses implement :meth:`_select_batch` and declare where they act and what they read (see
    :mod:`mrprune.methods.stages`): ``stage``, ``needs`` (each need arrives as a keyword argument of
    ``_select_batch``), ``position_mode`` (the positions the kept tokens take by default in an integration) and, for
    ``vision``-stage methods, ``attention_layers`` (the vision encoder layers whose attention they read).
    """

    stage: ClassVar[Stage] = Stage.PROJECTOR
    #: ``True`` for methods that return :class:`~mrprune.methods.results.MergedTokens` instead of kept indices.
    merges: ClassVar[bool] = False
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LAYOUT})
    position_mode: ClassVar[str] = "original"
    attention_layers: tuple[int, ...] = ()

    uses_text = _NeedsText()

    def select(
        self,
        features: torch.Tensor,
        layout: Layout | None = None,
        text: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Result:
        """Kept token indices of one image (merging methods: its :class:`MergedTokens`).

        Parameters
        ----------
        features : Tensor ``[N, D]``
            The image's visual tokens in the LLM input space (after the projector / merger).
        layout : LlavaNextLayout or GridLayout or None
            Where each token sits; ``None`` is a flat sequence of ``N`` tokens (``GridLayout(1, 1, N)``).
        text : Tensor ``[M, D]`` or None
            Text token embeddings, for text-conditioned methods.
        **kwargs
            The method's options and the signals its needs deliver, for this one item: the keywords that
            ``select_batch`` takes with a leading batch dimension without it
            (:data:`~mrprune.methods.stages.ITEM_KEYWORDS`): ``attention`` ``{layer: [N]}`` (vision attention) or
            ``[N]`` (the last query's attention, ``llm`` stage), ``crops`` / ``patches`` / ``groups`` /
            ``key_norms`` / ``origin`` / ``positions`` ``[N]``, ``clip_image [N, E]``, ``normed [N, D]``,
            ``rotary [N, d]``, ``input_embeddings [N0, D]``, ``seeds`` and ``original_lengths`` an int; the others
            (``crop_attention``, ``crop_features``, ``crop_keys``, ``clip_text``, ``prompt``, ``attention_kind``,
            ``step``, ``layer``) as ``select_batch`` takes them for a batch of one.

        Returns
        -------
        Tensor ``[K]``, int64, sorted ascending, or :class:`MergedTokens` (methods with ``merges = True``).

        Raises
        ------
        ValueError or TypeError
            Naming ``select`` and the argument: features that are not ``[N, D]``, a keyword the method never reads,
            a one-item keyword of another shape (a batch's ``[1, N]`` included; ``TypeError`` for a non-int where an
            int is due); then what ``select_batch`` raises.
        """
        owner = f"{type(self).__name__}.select"
        batch, layouts, lengths, texts = _checks.single_input(owner, features, layout, text)
        _checks.keywords(owner, self, kwargs)  # a misspelt option before a signal of the wrong shape
        kwargs = _batch_of_one(owner, self, features, kwargs)
        return self.select_batch(batch, layouts, lengths, texts, **kwargs)[0]

    def select_batch(
        self,
        features: torch.Tensor,
        layouts: Sequence[Layout | None],
        lengths: torch.Tensor | Sequence[int] | None = None,
        texts: Sequence[torch.Tensor | None] | None = None,
        **kwargs: Any,
    ) -> list[Result]:
        """Kept token indices (merging methods: :class:`MergedTokens`) of every image of a padded batch.

        Parameters
        ----------
        features : Tensor ``[B, N_max, D]``
            Image ``b`` owns ``features[b, :lengths[b]]``.
        layouts : sequence of B layouts (``None``: flat)
            Each must describe exactly ``lengths[b]`` tokens.
        lengths : Tensor or sequence of B ints, or None (every image uses all ``N_max`` rows)
        texts : sequence of B ``[M_b, D]`` tensors (or None entries), or None
            Text token embeddings per image, for text-conditioned methods.

        Returns
        -------
        list of B int64 tensors, each sorted ascending, or of B :class:`MergedTokens` (``merges = True``);
        ``[]`` for an empty batch, ``B = 0``.

        Raises
        ------
        ValueError or TypeError
            Naming the method and the argument, for any input :func:`mrprune.methods._checks.batch_inputs` rejects.
        """
        owner = f"{type(self).__name__}.select_batch"
        lengths, layouts = _checks.batch_inputs(owner, features, layouts, lengths, texts, self.uses_text)
        _checks.keywords(owner, self, kwargs)
        if features.shape[0] == 0:
            return []
        with _validation.scan_once():  # the ops below scan the same features for NaN/Inf once, not per call
            kept = self._select_batch(features, layouts, lengths, texts, **kwargs)
        return [k if isinstance(k, MergedTokens) else k.sort().values for k in kept]

    def kept_count(self, layout: Layout) -> int:
        """Tokens :meth:`select` keeps of an image with ``layout``, for any features (from the layout alone).

        The default is the budget convention most methods share: the method's budget in all (its ``size``, a
        :class:`~mrprune.methods._vision.Budget`, or ``round(keep_ratio * T)`` half up, at most ``T``), LLaVA-NeXT
        newline tokens included and kept first (so at least every newline). Methods whose count differs override it.

        Parameters
        ----------
        layout : LlavaNextLayout or GridLayout
            The image's layout (``T = layout.num_tokens``). Vision-stage methods count as the integrations call
            them: each token's crop given, newlines in no crop.

        Returns
        -------
        int, the length of ``select(features, layout)`` (``T`` at most).

        Raises
        ------
        KeptCountUnknown
            Where the count depends on more than the layout: merging methods, ``llm``-stage methods (they prune
            inside the language model, at several layers, after the prompt is laid out), ``official=True`` modes,
            methods without a fixed budget.
        """
        name = type(self).__name__
        if self.merges:
            raise KeptCountUnknown(
                f"mrprune.{name} merges tokens: it returns merged tokens (MergedTokens), not a kept subset"
            )
        if self.stage is Stage.LLM:
            raise KeptCountUnknown(
                f"mrprune.{name} prunes inside the language model (llm stage): every visual token enters the model "
                "and is dropped at its pruning layers, so no count of kept input tokens applies"
            )
        if getattr(self, "official", False):
            raise KeptCountUnknown(
                f"mrprune.{name}(official=True) follows the official code's budget arithmetic (per crop, padding "
                "patches, tokens kept on top), which kept_count does not model: it gives the default mode's count; "
                "use official=False"
            )
        total = layout.num_tokens
        size = getattr(self, "size", None)
        ratio = getattr(self, "keep_ratio", None)
        if callable(size):
            budget = size(total)
        elif isinstance(ratio, float):
            budget = min(round_half_up(ratio * total), total)
        else:
            raise KeptCountUnknown(f"mrprune.{name} has no fixed budget: its count depends on the features")
        return min(max(budget, newline_count(layout)), total)

    def _select_batch(
        self,
        features: torch.Tensor,
        layouts: list[Layout],
        lengths: torch.Tensor,
        texts: Sequence[torch.Tensor | None] | None,
        **kwargs: Any,
    ) -> list[Result]:
        raise NotImplementedError


def top_tokens(scores: torch.Tensor, lengths: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Per item, the ``counts[b]`` best-scored tokens (ties to the lower index), through ``mrprune.topk_indices``."""
    k = max(counts, default=0)
    return take_prefixes(ops.topk_indices(scores, lengths, k), counts)
