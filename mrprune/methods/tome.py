"""ToMe: token merging inside every vision-encoder block (Bolya et al., "Token Merging: Your ViT But Faster",
ICLR 2023; official code facebookresearch/ToMe @ af95e4b, ``tome/merge.py``, ``tome/patch/timm.py``; its LLaVA port,
ModelTC/LightCompress ``llmc/compression/token_reduction/tome.py``).

A ``vision``-stage method that acts *inside* the encoder (``Need.VISION_MERGE``): in each block, after attention and
before the MLP, the block's keys averaged over heads are the similarity metric; the tokens alternate into sets A
(even rows) and B (odd rows), every A token finds its most similar B token, and the ``r`` A tokens with the best
matches are merged into their partners by size-weighted mean (``mrprune.bipartite_merge``; [CLS] never merges,
``r <= 50 %`` of a block's tokens). With *proportional attention* the later blocks add ``log(size)`` to every key's
attention logit, so a merged token weighs as much as the patches it stands for.

The integration runs the blocks (model code stays in the adapters): it calls :meth:`ToMe.start` on the tower's input,
:meth:`ToMe.attention_bias` and :meth:`ToMe.merge_block` in each block, and :meth:`ToMe.unmerge` on each block's
output, so the tower hands every patch position its merged token's state and LLaVA's feature selection and projector
run unchanged. ``_select_batch`` then reads, per token in the LLM input space, the merged group it belongs to
(``groups``) and returns :class:`~mrprune.methods.results.MergedTokens`: one output token per group, the projector
output at the group's first token (the projector works token by token, so that is the projector of the merged state).

Qwen2.5-VL's tower has no [CLS], attends within windows in most blocks, and its patch merger folds each 2 x 2 patch
group (4 consecutive rows of the window-reordered sequence) into one LLM token. There the ToMe *unit* is such a group
and the merge set is a *window* (:meth:`ToMe.window_schedule`, :meth:`ToMe.start_windows`): a unit merged across
windows would belong to no window in the later windowed blocks, and a merge across groups would leave the merger no
2 x 2 group to fold. A unit's features are its 4 patches' states side by side, so the size-weighted mean merges
each patch with the same patch of its partner, and its metric is its 4 patches' head-averaged (pre-rotary) keys side
by side; merged units keep the rotary angles of their group's first unit (:meth:`ToMe.representatives`), the token
whose position the merged LLM token takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import ops
from . import _checks
from ._vision import Budget, allocate
from .base import Pruner
from .results import MergedTokens
from .stages import Need, Stage

__all__ = ["BudgetOutOfReach", "ToMe", "ToMeState", "merge_schedule"]


@dataclass
class ToMeState:
    """ToMe's state over one encoder run of ``C`` crops of ``N0`` tokens ([CLS] first).

    Attributes
    ----------
    tokens : Tensor ``[C, T, D]``
        The current (merged) hidden states, rows past ``counts[c]`` are padding.
    sizes : Tensor ``[C, T]`` float32
        Original tokens each row stands for (0 on padding).
    counts : list of C ints
        Each crop's current token count (on the host: it follows from the schedule).
    source : Tensor ``[C, N0]`` int64
        The current row of every original token.
    schedule : list of C lists of int
        Pairs each crop merges in each merging block.
    merged : bool
        Whether some block merged something (proportional attention starts in the next block).
    protect_first : bool
        Row 0 is a [CLS] that never merges (CLIP); ``False`` on towers without one (Qwen2.5-VL's windows).
    spatial_order : bool
        Merged rows stay in the order of their surviving (partner B / unmerged A) rows, instead of ToMe's
        ``[unmerged A, B]`` (``mrprune.bipartite_merge``'s ``spatial_order``).
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    counts: list[int]
    source: torch.Tensor
    schedule: list[list[int]]
    merged: bool = False
    protect_first: bool = True
    spatial_order: bool = False


class BudgetOutOfReach(ValueError):
    """A token budget the tower's blocks cannot merge down to (each block merges at most half of its tokens)."""


def merge_schedule(tokens: int, target: int, blocks: int, reach: bool = True, protected: int = 1) -> list[int]:
    """``r`` per block that takes ``tokens`` patches (plus ``protected`` tokens that never merge: a [CLS]; 0 on
    towers without one) to ``target`` in ``blocks`` ToMe blocks.

    The merges are spread evenly (the first ``(tokens - target) % blocks`` blocks take one more); where a block's
    50 % cap ``(T - protected) // 2`` binds, every block merges as much as it can (front-loaded) instead.

    Raises
    ------
    BudgetOutOfReach
        A ``ValueError``: when even front-loaded merging cannot reach ``target`` (with ``reach=False`` the
        front-loaded schedule is returned instead).
    """
    total = tokens - target
    for even in (True, False):
        left, count, schedule = total, tokens + protected, []
        for block in range(blocks):
            want = -(-left // (blocks - block)) if even else left
            step = min(want, (count - protected) // 2)
            schedule.append(step)
            left, count = left - step, count - step
        if left <= 0 or not (reach or even):
            return schedule
    raise BudgetOutOfReach(
        f"mrprune.ToMe: {target} tokens out of {tokens} patches are out of reach in {blocks} block(s) (each merges at "
        f"most half of its tokens: at least {tokens - sum(schedule)} remain); use a larger budget"
    )


class ToMe(Pruner):
    """ToMe: bipartite soft matching and size-weighted merging in every vision-encoder block up to LLaVA's select layer.

    Parameters
    ----------
    r : int or sequence of int, optional
        Pairs merged per block (capped at half of a block's tokens, [CLS] aside): an int for every block (LightCompress'
        ``r: 16``), with ``r_step`` the linear schedule ``int(r + i * r_step)`` (LightCompress' ``(start, step)``), or
        one entry per block (missing blocks merge nothing). Every crop follows the same schedule.
    budget : int, optional
        Tokens kept per image instead (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320, newlines included and kept):
        split over the crops by their token counts, each crop's ``r`` schedule chosen by :func:`merge_schedule`.
    keep_ratio : float in (0, 1], optional
        Share of each image's tokens kept instead (``round(keep_ratio * n)``). Exactly one of ``r``, ``budget`` and
        ``keep_ratio``.
    r_step : float
        Added to ``r`` per block (``r`` an int only).
    proportional_attention : bool
        Add ``log(size)`` to the attention logits of the blocks after the first merge (the ToMe paper and its timm
        patch). Needs a tower on SDPA or eager attention: FlashAttention-2 and flex attention take no float bias, and
        the integration refuses them with an error rather than drop the bias.
    official : bool
        ``True`` reproduces LightCompress' LLaVA port (the code behind the papers' ToMe rows): ``r`` per block as
        above; sizes are *not* carried from block to block (each block averages its matched tokens with equal weight,
        the port discards ``merge_wavg``'s sizes) and there is no proportional attention; [CLS] protected, official
        ``[unmerged A, B]`` row order (it decides the next block's A/B split). ``r`` only.

    Notes
    -----
    Budget: a crop of ``P`` patches ends with ``P - sum(r_i)`` tokens over the blocks up to the one whose output LLaVA
    projects (``vision_feature_layer``, -2: 23 of CLIP-L's 24 blocks; LightCompress with ``r = 16``: 576 - 368 = 208
    tokens). Blocks after it run on the merged tokens without merging (the official port merges there too, but
    nothing reads their output).

    Differences from the official port, all documented: the merged tokens reach the language model in the order of
    their representatives (each group's first token in the image, whose position the merged token takes), not in
    the port's ``[unmerged A, B]`` shuffle; the matching sort is stable and the weighted mean accumulates in float32
    (``mrprune.bipartite_merge``); batches of any size and every crop of LLaVA-NeXT (each crop merges on its own;
    the port runs LLaVA-1.5 at batch 1; LLaVA-NeXT's anyres packing cannot take its shortened crops at all). On
    LLaVA-NeXT a crop merges all its patches, those unpadding removes included, to its share of the budget, and a
    group lying partly in that padding counts only its remaining tokens, so a ``budget`` is an upper bound there
    (a crop whose share is all its tokens, or that has no tokens in the image, merges nothing; a crop given no
    share merges as far as its blocks reach).

    Qwen2.5-VL: units are 2 x 2 patch groups (one LLM token each), merged within their window in every block of the
    tower (the patch merger reads the last one; ``r`` is per window and block, a ``budget`` / ``keep_ratio`` counts
    LLM tokens per image or video and is split over its windows, see :meth:`window_schedule`); the full-attention
    blocks attend over whole frames of merged units, with ``log(size)`` per key under proportional attention; a
    merged token reaches the LLM at its group's first token (the M-RoPE position of that token under
    ``"original"``). ``official=True`` is refused there (the official port is LLaVA's).
    """

    stage = Stage.VISION
    merges = True
    needs = Pruner.needs | {Need.VISION_MERGE}

    def __init__(
        self,
        r: int | Sequence[int] | None = None,
        budget: int | None = None,
        keep_ratio: float | None = None,
        r_step: float = 0.0,
        proportional_attention: bool = True,
        official: bool = False,
    ) -> None:
        if sum(value is not None for value in (r, budget, keep_ratio)) != 1:
            raise ValueError("mrprune.ToMe: give exactly one of r, budget and keep_ratio")
        self.official = _checks.flag("ToMe", "official", official)
        self.proportional_attention = _checks.flag("ToMe", "proportional_attention", proportional_attention)
        self.r_step = _checks.real("ToMe", "r_step", r_step)
        self.size = None if r is not None else Budget("ToMe", budget, keep_ratio)
        if r is None:
            self.r = None
        elif isinstance(r, int) and not isinstance(r, bool):
            self.r = _checks.count("ToMe", "r", r)
        elif isinstance(r, Sequence) and not isinstance(r, str):
            self.r = tuple(_checks.count("ToMe", "r", value) for value in r)
            if self.r_step:
                raise ValueError("mrprune.ToMe: r_step applies to an int r only")
        else:
            raise TypeError(f"mrprune.ToMe: r must be an int or a sequence of ints, got {r!r}")
        if self.official and self.r is None:
            raise ValueError("mrprune.ToMe(official=True) takes r (the official per-block merge count)")
        if self.official:
            self.proportional_attention = False

    def __repr__(self) -> str:
        if self.r is None:
            what = repr(self.size)
        else:
            what = f"r={self.r!r}" + (f", r_step={self.r_step}" if self.r_step else "")
        return f"ToMe({what}, proportional_attention={self.proportional_attention}, official={self.official})"

    # -- inside the encoder (called by the integration) ---------------------------------------------------------

    def schedule(
        self, patches: int, blocks: int, crop_tokens: Sequence[Sequence[int]], extra: Sequence[int]
    ) -> list[list[int]]:
        """``r`` per block for every crop of an encoder call (the crops of all items, in order).

        Parameters
        ----------
        patches : int
            Patch tokens per crop (the [CLS] aside).
        blocks : int
            Blocks that merge: those up to the one whose output the projector reads.
        crop_tokens : per item, per crop, how many of the crop's patches reach the language model (LLaVA-1.5: all;
            LLaVA-NeXT: after unpadding).
        extra : per item, its tokens from no crop (LLaVA-NeXT newlines), kept as they are.
        """
        if self.r is not None:
            per_block = self._per_block(blocks)
            return [list(per_block) for crops in crop_tokens for _ in crops]
        fewest = patches - sum(merge_schedule(patches, 1, blocks, reach=False))
        schedules = []
        for crops, lines in zip(crop_tokens, extra, strict=True):
            wanted = self.size(sum(crops) + lines) - lines
            for share, present in zip(allocate(max(wanted, 0), crops), crops, strict=True):
                # a crop keeping all its tokens (or having none in the image) merges nothing; one given no share
                # (a budget below one token per crop) merges all it can
                target = patches if share >= present else share if share else fewest
                schedules.append(merge_schedule(patches, target, blocks))
        return schedules

    def _per_block(self, blocks: int) -> list[int]:
        """``r`` of each of ``blocks`` blocks (``r`` given)."""
        if isinstance(self.r, int):
            return [max(int(self.r + i * self.r_step), 0) for i in range(blocks)]
        return [*self.r[:blocks], *[0] * max(blocks - len(self.r), 0)]

    def window_schedule(self, windows: Sequence[Sequence[int]], blocks: int) -> list[list[int]]:
        """``r`` per block for every window of an encoder call on a tower without [CLS] whose merge unit is a group of
        patches (Qwen2.5-VL: a window's 2 x 2 patch groups, each one future LLM token).

        Parameters
        ----------
        windows : per item, the unit count of each of its windows (the tower's window order).
        blocks : int
            The tower's blocks (all of them merge: the patch merger reads the last one).

        Notes
        -----
        ``r`` (with ``r_step``, or per block) is per *window*, capped at half of the window's units. ``budget`` /
        ``keep_ratio`` count the item's LLM tokens (units): the item's share is split over its windows by their sizes
        (:func:`~mrprune.methods._vision.allocate`), each window's schedule chosen by :func:`merge_schedule` with no
        protected token. A window given no share (a budget below the window count) merges as far as its blocks
        reach and keeps at least one unit, so such a budget is exceeded.
        """
        if self.r is not None:
            per_block = self._per_block(blocks)
            return [list(per_block) for counts in windows for _ in counts]
        schedules = []
        for counts in windows:
            for share, units in zip(allocate(self.size(sum(counts)), counts), counts, strict=True):
                if share >= units:
                    target = units
                elif share:
                    target = share
                else:
                    target = units - sum(merge_schedule(units, 1, blocks, reach=False, protected=0))
                schedules.append(merge_schedule(units, target, blocks, protected=0))
        return schedules

    def start_windows(self, units: torch.Tensor, counts: Sequence[int], schedule: list[list[int]]) -> ToMeState:
        """The state before the first block of a tower without [CLS], one merge set per window.

        Parameters
        ----------
        units : Tensor ``[W, T, F]``
            Each window's units (rows past ``counts[w]`` are padding); a unit's ``F`` features are its patches'
            states side by side, so the size-weighted mean merges every patch of a unit with the same patch of its
            partner.
        counts : W ints, each window's units.
        schedule : W lists, pairs each window merges per block.
        """
        windows, width, _ = units.shape
        if len(schedule) != windows or len(counts) != windows:
            raise ValueError(f"mrprune.ToMe: {len(schedule)} schedules and {len(counts)} counts for {windows} windows")
        position = torch.arange(width, device=units.device)
        valid = position < torch.tensor(list(counts), device=units.device)[:, None]
        return ToMeState(
            tokens=units,
            sizes=valid.float(),
            counts=list(counts),
            source=torch.where(valid, position, -1),
            schedule=schedule,
            protect_first=False,
            spatial_order=True,
        )

    def representatives(self, state: ToMeState) -> torch.Tensor:
        """``[C, T]`` int64: the first original token (index into ``N0``) of each current row's group, -1 for padding
        rows (the token whose rotary angles a merged unit keeps, and whose LLM position it takes)."""
        crops, width = state.tokens.shape[:2]
        originals = state.source.shape[1]
        first = torch.full((crops, width + 1), originals, dtype=torch.int64, device=state.source.device)
        rows = torch.where(state.source >= 0, state.source, width)  # padding into a spare column
        order = torch.arange(originals, device=state.source.device).expand(crops, originals)
        first = first.scatter_reduce(1, rows, order, reduce="amin")[:, :width]
        return torch.where(first < originals, first, -1)

    def unit_bias(self, state: ToMeState, dtype: torch.dtype) -> torch.Tensor | None:
        """``[C, T]`` ``log(size)`` of each row (``-inf`` on padding) with proportional attention once something merged,
        else ``None``: the per-key bias of a tower that lays its windows end to end (no padding to mask)."""
        if not (self.proportional_attention and state.merged):
            return None
        return state.sizes.log().to(dtype)

    def start(self, hidden: torch.Tensor, schedule: list[list[int]]) -> ToMeState:
        """The state before the first block: ``hidden [C, N0, D]`` (the tower's input, [CLS] first), sizes 1."""
        crops, tokens, _ = hidden.shape
        if len(schedule) != crops:
            raise ValueError(f"mrprune.ToMe: {len(schedule)} schedules for {crops} crops")
        device = hidden.device
        return ToMeState(
            tokens=hidden,
            sizes=torch.ones(crops, tokens, dtype=torch.float32, device=device),
            counts=[tokens] * crops,
            source=torch.arange(tokens, device=device).expand(crops, tokens),
            schedule=schedule,
        )

    def attention_bias(self, state: ToMeState, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention bias ``[C, 1, 1, T]`` of the next block: ``log(size)`` per key with proportional
        attention once something merged, ``-inf`` on padding rows (crops whose schedules differ); ``None`` when it
        would be all zeros (the block then runs exactly as the unpatched tower)."""
        padded = min(state.counts) < state.tokens.shape[1]
        if not padded and not (self.proportional_attention and state.merged):
            return None
        if self.proportional_attention:
            bias = state.sizes.log()  # log 0 = -inf on padding
        else:
            bias = torch.where(state.sizes > 0, 0.0, float("-inf"))
        return bias[:, None, None, :].to(dtype)

    def uses_bias(self, schedule: list[list[int]], packed: bool = False) -> bool:
        """Whether blocks will need :meth:`attention_bias` (proportional attention, or crops of different lengths;
        ``packed``: crops laid end to end, no padding to mask, only proportional attention)."""
        merges = any(any(r) for r in schedule)
        ragged = not packed and any(r != schedule[0] for r in schedule)
        return merges and (self.proportional_attention or ragged)

    def merge_block(self, state: ToMeState, block: int, hidden: torch.Tensor, keys: torch.Tensor) -> None:
        """Merge after block ``block``'s attention, in place on ``state``.

        Parameters
        ----------
        hidden : Tensor ``[C, T, D]``
            The block's states after attention and its residual (``state.tokens``' layout).
        keys : Tensor ``[C, T, H, d]``
            The block's keys per head (the metric is their mean over heads, as the official ``k.mean(1)``).
        """
        state.tokens = hidden
        steps = [schedule[block] if block < len(schedule) else 0 for schedule in state.schedule]
        if not any(steps):
            return
        metric = keys.mean(2)
        crops, width, dim = hidden.shape
        device = hidden.device
        # the new lengths follow from the schedule (the op's cap), so no device value is read back
        protected = int(state.protect_first)
        counts = [n - min(r, max(n - protected, 0) // 2) for n, r in zip(state.counts, steps, strict=True)]
        new_width = max(counts)
        if len(set(steps)) == 1 and len(set(state.counts)) == 1:  # one op call on the whole batch, no padding
            groups = [(list(range(crops)), steps[0])]
        else:
            groups = [([c for c, step in enumerate(steps) if step == r], r) for r in sorted(set(steps))]
        rows = torch.full((crops, width), -1, dtype=torch.int64, device=device)
        tokens = hidden.new_zeros(crops, new_width, dim)
        sizes = torch.zeros(crops, new_width, dtype=torch.float32, device=device)
        for members, r in groups:
            index = slice(None) if len(members) == crops else torch.tensor(members, device=device)
            span = max(state.counts[c] for c in members)
            lengths = torch.tensor([state.counts[c] for c in members], device=device)
            carried = None if self.official else state.sizes[index, :span]
            merged, merged_sizes, source, _ = ops.bipartite_merge(
                hidden[index, :span],
                metric[index, :span],
                lengths,
                min(r, max(span - protected, 0) // 2),
                carried,
                state.protect_first,
                state.spatial_order,
            )
            rows[index, :span] = source
            out = min(merged.shape[1], new_width)
            tokens[index, :out] = merged[:, :out]
            if self.official:  # sizes are not carried: every row weighs 1 in the next merge
                kept = torch.tensor([counts[c] for c in members], device=device)
                merged_sizes = (torch.arange(out, device=device) < kept[:, None]).float()
            sizes[index, :out] = merged_sizes[:, :out].float()
        state.tokens, state.sizes, state.counts = tokens, sizes, counts
        # original padding tokens (windows shorter than the widest) keep -1
        state.source = torch.where(state.source >= 0, rows.gather(1, state.source.clamp(min=0)), -1)
        state.merged = True

    def unmerge(self, state: ToMeState, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [C, T, D]`` (merged rows) -> ``[C, N0, D]``: every original token gets its row's state (original
        padding tokens get row 0's)."""
        return hidden.gather(1, state.source.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))

    # -- in the LLM input space --------------------------------------------------------------------------------

    def _select_batch(self, features, layouts, lengths, texts, groups=None, **kwargs):
        if groups is None or not isinstance(groups, torch.Tensor) or groups.shape != features.shape[:2]:
            raise ValueError(
                f"mrprune.ToMe: needs groups [B, N] = {tuple(features.shape[:2])} (each token's merged group in the "
                "vision encoder, -1 for tokens of no crop); integrations pass it, select_batch callers must"
            )
        results = []
        for b, n in enumerate(lengths.tolist()):
            own = groups[b, :n].to(features.device)
            position = torch.arange(n, device=features.device)
            ids = torch.where(own >= 0, own, -1 - position)  # a token of no crop is a group of its own
            unique, inverse = torch.unique(ids, return_inverse=True)
            first = torch.full((unique.numel(),), n, dtype=torch.int64, device=features.device)
            first = first.scatter_reduce(0, inverse, position, reduce="amin")
            order = first.argsort()
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=features.device)
            sources = rank[inverse]
            kept = first[order]
            sizes = torch.bincount(sources, minlength=kept.numel())
            weights = (1.0 / sizes[sources]).float()
            results.append(MergedTokens(features[b, kept], kept, sources, weights))
        return results
