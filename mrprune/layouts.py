"""Where each visual token of an image sits: the layouts the pruners need to know.

* :class:`LlavaNextLayout` — LLaVA-NeXT "anyres" with ``spatial_unpad`` (research/algorithms.md §1.2): the base
  view (``base_side x base_side`` tokens, 24 x 24 = 576 for CLIP-336/14), then the unpadded high-resolution grid of
  ``rows x cols`` tokens in row-major order with one newline token after each row. An image that yields one crop
  only is the base view plus a single trailing newline (``rows = cols = 0``).
* :class:`GridLayout` — a plain ``frames x height x width`` raster: LLaVA-1.5 (1 x 24 x 24) and Qwen2.5-VL (tokens
  after the 2 x 2 merge, ``t x h/2 x w/2`` of ``image_grid_thw``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from . import _validation

__all__ = ["GridLayout", "LlavaNextLayout", "best_resolution", "DEFAULT_GRID_PINPOINTS"]

#: LLaVA-NeXT's default ``image_grid_pinpoints`` as (height, width) pairs.
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def best_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The anyres canvas LLaVA-NeXT picks for an image: the pinpoint (height, width) that keeps the most of the image's
    resolution after an aspect-preserving downscale, ties to the least wasted canvas area."""
    height, width = image_size
    best, best_effective, best_waste = None, -1, math.inf
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pin_h, pin_w), effective, waste
    return best


def _integer_fields(layout: object, *names: str) -> None:
    """Token counts are ints: a float or bool field would only fail later, as an index (NumPy ints become ints)."""
    for name in names:
        value = _validation.integer(type(layout).__name__, name, getattr(layout, name))
        object.__setattr__(layout, name, value)  # frozen dataclass


@dataclass(frozen=True)
class LlavaNextLayout:
    """Token layout of one LLaVA-NeXT image.

    Parameters
    ----------
    rows, cols : int
        The unpadded high-resolution grid (``48 x 48`` for a square 672 px image on the 2 x 2 grid); both 0 for an
        image with a single crop.
    base_side : int
        Side of the base view in tokens (``crop_size // patch_size``; 24 for CLIP ViT-L/14-336).
    """

    rows: int
    cols: int
    base_side: int = 24

    def __post_init__(self) -> None:
        _integer_fields(self, "rows", "cols", "base_side")
        if self.base_side < 1:
            raise ValueError(f"LlavaNextLayout: base_side must be >= 1, got {self.base_side}")
        if self.rows < 0 or self.cols < 0:
            raise ValueError(f"LlavaNextLayout: rows and cols must be >= 0, got rows={self.rows}, cols={self.cols}")

    @classmethod
    def from_image_size(
        cls,
        image_size: tuple[int, int],
        grid_pinpoints: Sequence[Sequence[int]] = DEFAULT_GRID_PINPOINTS,
        crop_size: int = 336,
        patch_size: int = 14,
    ) -> LlavaNextLayout:
        """The layout LLaVA-NeXT's ``pack_image_features`` produces for an image of ``image_size = (height, width)``.

        The grid of ``crop_size`` tiles comes from the best pinpoint; its token grid is then cropped symmetrically
        (``unpad_image``) back to the image's aspect ratio. Anyres always yields the base crop plus at least one tile,
        so this is never a single-crop layout (even a 1 x 1 tile grid is unpadded and gets newlines).
        """
        height, width = image_size
        if height < 1 or width < 1:
            raise ValueError(f"LlavaNextLayout.from_image_size: image_size must be positive, got {image_size}")
        side = crop_size // patch_size
        canvas_h, canvas_w = best_resolution((height, width), grid_pinpoints)
        rows, cols = (canvas_h // crop_size) * side, (canvas_w // crop_size) * side
        if width / height > cols / rows:  # wider than the canvas: padding rows top and bottom
            padding = (rows - int(round(height * (cols / width), 7))) // 2
            rows -= 2 * padding
        else:
            padding = (cols - int(round(width * (rows / height), 7))) // 2
            cols -= 2 * padding
        return cls(rows, cols, side)

    @property
    def num_base(self) -> int:
        return self.base_side * self.base_side

    @property
    def single_crop(self) -> bool:
        """One crop only (no anyres): the base view and one trailing newline. (An extreme aspect ratio can also unpad
        the grid to zero rows, leaving no high-resolution token and no newline, or to zero columns, leaving one
        newline per row.)"""
        return self.rows == 0 and self.cols == 0

    @property
    def num_tokens(self) -> int:
        """All tokens of the image, newlines included: ``base + rows * (cols + 1)`` (``base + 1`` single-crop)."""
        return self.num_base + (1 if self.single_crop else self.rows * (self.cols + 1))

    @cached_property
    def base_indices(self) -> torch.Tensor:
        """Indices of the base-view tokens, ``[base]``."""
        return torch.arange(self.num_base)

    @cached_property
    def highres_indices(self) -> torch.Tensor:
        """Indices of the high-resolution tokens (newlines excluded) in raster order, ``[rows * cols]``."""
        grid = torch.arange(self.rows * (self.cols + 1)).view(self.rows, self.cols + 1)[:, : self.cols]
        return self.num_base + grid.reshape(-1)

    @cached_property
    def newline_indices(self) -> torch.Tensor:
        """Indices of the newline tokens, ``[rows]`` (``[1]`` for a single-crop image)."""
        if self.single_crop:
            return torch.tensor([self.num_base])
        return self.num_base + torch.arange(self.rows) * (self.cols + 1) + self.cols


@dataclass(frozen=True)
class GridLayout:
    """A ``frames x height x width`` raster of tokens, row-major within a frame (LLaVA-1.5: ``GridLayout(1, 24, 24)``;
    Qwen2.5-VL: ``GridLayout(t, h // 2, w // 2)`` from ``image_grid_thw``)."""

    frames: int = 1
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        _integer_fields(self, "frames", "height", "width")
        if min(self.frames, self.height, self.width) < 1:
            raise ValueError(f"GridLayout: frames, height and width must be >= 1, got {self}")

    @classmethod
    def from_grid_thw(cls, grid_thw: Sequence[int], merge_size: int = 2) -> GridLayout:
        """The token grid of a Qwen2.5-VL image or video from its ``image_grid_thw`` / ``video_grid_thw`` row."""
        t, h, w = (_validation.integer("GridLayout.from_grid_thw", "grid_thw", v) for v in grid_thw)
        if merge_size < 1 or h % merge_size or w % merge_size:
            raise ValueError(f"GridLayout.from_grid_thw: grid {list(grid_thw)} does not merge by {merge_size}")
        return cls(t, h // merge_size, w // merge_size)

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width
