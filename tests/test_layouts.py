"""Token layouts: LlavaNextLayout against transformers' own anyres/unpad code, index sets, GridLayout, validation."""

from __future__ import annotations

import math
import random
import types

import pytest
import torch
from transformers import LlavaNextConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    get_anyres_image_grid_shape,
    unpad_image,
)

from mrprune.layouts import DEFAULT_GRID_PINPOINTS, GridLayout, LlavaNextLayout, best_resolution

DEFAULT_PINPOINTS = LlavaNextConfig().image_grid_pinpoints  # transformers' default list, (height, width) pairs
# (pinpoints, crop_size, patch_size, image side range): LLaVA-NeXT (CLIP-336/14) and tiny test-model settings.
SETTINGS = {
    "llava-next": (DEFAULT_PINPOINTS, 336, 14, (16, 2400)),
    "tiny": ([[28, 56], [56, 28], [56, 56]], 28, 14, (4, 200)),
}
COUNTS = {"llava-next": 500, "tiny": 250}  # random image sizes per setting
MAX_ASPECT = 6.0


def random_sizes(count: int, low: int, high: int, seed: int) -> list[tuple[int, int]]:
    """``(height, width)`` pairs with log-uniform aspect ratios up to 1:MAX_ASPECT either way."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        height = rng.randint(low, high)
        aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
        sizes.append((height, max(1, round(height * aspect))))
    return sizes


def hf_grid(image_size, pinpoints, crop_size: int, patch_size: int) -> tuple[int, int]:
    """Rows and columns of the unpadded high-resolution token grid, by transformers' functions."""
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_size), [list(p) for p in pinpoints], crop_size)
    side = crop_size // patch_size
    grid = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), list(image_size))
    return tuple(grid.shape[1:])


def hf_pack(image_size, pinpoints, crop_size: int, patch_size: int, crops: int | None = None) -> torch.Tensor:
    """transformers' ``pack_image_features`` on one image whose features are token ids (newline = -1): ``[T]``."""
    config = types.SimpleNamespace(
        image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_config=types.SimpleNamespace(image_size=crop_size, patch_size=patch_size),
    )
    if crops is None:
        tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, crop_size)
        crops = 1 + tiles_h * tiles_w
    per_crop = (crop_size // patch_size) ** 2
    features = torch.arange(crops * per_crop, dtype=torch.float64).view(crops, per_crop, 1)
    packed, lengths = LlavaNextModel.pack_image_features(
        types.SimpleNamespace(config=config),
        [features],
        torch.tensor([list(image_size)]),
        "default",
        torch.tensor([-1.0], dtype=torch.float64),
    )
    assert lengths.tolist() == [packed[0].shape[0]]
    return packed[0][:, 0]


def check_partition(layout: LlavaNextLayout) -> None:
    """Base, high-res and newline indices partition ``range(num_tokens)`` and sit where the layout says."""
    parts = [layout.base_indices, layout.highres_indices, layout.newline_indices]
    for part in parts:
        assert part.dtype == torch.int64 and part.dim() == 1
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(layout.num_tokens))
    side, rows, cols = layout.base_side, layout.rows, layout.cols
    assert torch.equal(layout.base_indices, torch.arange(side * side))
    expected_high = [side * side + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    assert layout.highres_indices.tolist() == expected_high
    if layout.single_crop:
        assert layout.newline_indices.tolist() == [side * side]
    else:
        assert layout.newline_indices.tolist() == [side * side + r * (cols + 1) + cols for r in range(rows)]


# --- from_image_size against transformers -----------------------------------------------------------------------


def test_default_pinpoints_match_transformers():
    """mrprune's default pinpoints are LlavaNextConfig's default list."""
    assert [list(p) for p in DEFAULT_GRID_PINPOINTS] == DEFAULT_PINPOINTS


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_best_resolution_matches_transformers(setting):
    """The chosen anyres canvas is transformers' ``select_best_resolution``."""
    pinpoints, _, _, (low, high) = SETTINGS[setting]
    for size in random_sizes(250, low, high, seed=1):
        assert tuple(best_resolution(size, pinpoints)) == tuple(select_best_resolution(size, pinpoints)), size


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_from_image_size_matches_transformers_random(setting):
    """Random sizes (aspect ratios up to 1:6 either way): same unpadded grid and token count as transformers."""
    pinpoints, crop, patch, (low, high) = SETTINGS[setting]
    side = crop // patch
    for size in random_sizes(COUNTS[setting], low, high, seed=0):
        layout = LlavaNextLayout.from_image_size(size, pinpoints, crop, patch)
        rows, cols = hf_grid(size, pinpoints, crop, patch)
        assert (layout.rows, layout.cols, layout.base_side) == (rows, cols, side), size
        assert layout.num_tokens == side * side + rows * (cols + 1), size
        assert not layout.single_crop, size


@pytest.mark.parametrize(
    ("size", "rows", "cols"),
    [
        ((672, 672), 48, 48),  # square, 2 x 2 tiles
        ((480, 640), 36, 48),  # 4:3 landscape, padding rows removed
        ((640, 480), 48, 36),  # 3:4 portrait, padding columns removed
        ((336, 336), 24, 24),  # default pinpoints have no 1 x 1 grid: a 1 x 2 canvas, unpadded to 24 x 24
        ((300, 1000), 22, 72),  # wide, 1 x 3 tiles
    ],
)
def test_from_image_size_fixed(size, rows, cols):
    """Fixed sizes: the hand-derived grid, transformers' grid, and transformers' packed sequence all agree."""
    layout = LlavaNextLayout.from_image_size(size)
    assert (layout.rows, layout.cols) == (rows, cols) == hf_grid(size, DEFAULT_PINPOINTS, 336, 14)
    packed = hf_pack(size, DEFAULT_PINPOINTS, 336, 14)
    assert layout.num_tokens == packed.numel() == 576 + rows * (cols + 1)
    assert torch.equal(layout.newline_indices, (packed == -1).nonzero().squeeze(1))
    assert torch.equal(layout.base_indices, ((packed >= 0) & (packed < 576)).nonzero().squeeze(1))
    assert torch.equal(layout.highres_indices, (packed >= 576).nonzero().squeeze(1))
    check_partition(layout)


@pytest.mark.parametrize("size", [(60, 10), (10, 60), (30, 35), (56, 56)])
def test_from_image_size_tiny_packed(size):
    """Tiny-model settings (crop 28, patch 14), including grids unpadded to zero rows or columns."""
    pinpoints, crop, patch, _ = SETTINGS["tiny"]
    layout = LlavaNextLayout.from_image_size(size, pinpoints, crop, patch)
    packed = hf_pack(size, pinpoints, crop, patch)
    assert layout.num_tokens == packed.numel()
    assert torch.equal(layout.newline_indices, (packed == -1).nonzero().squeeze(1))
    assert torch.equal(layout.highres_indices, (packed >= 4).nonzero().squeeze(1))
    check_partition(layout)


def test_one_by_one_grid_matches_transformers():
    """A 1 x 1 tile grid is still anyres in transformers (base + one tile: base view then an unpadded grid)."""
    pinpoints = [[336, 336], [336, 672], [672, 336], [672, 672]]
    for size in [(336, 336), (300, 320)]:
        layout = LlavaNextLayout.from_image_size(size, pinpoints)
        rows, cols = hf_grid(size, pinpoints, 336, 14)
        assert hf_pack(size, pinpoints, 336, 14).numel() == 576 + rows * (cols + 1)
        assert (layout.rows, layout.cols) == (rows, cols), size
        assert layout.num_tokens == 576 + rows * (cols + 1), size


# --- index sets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "cols", "side"),
    [(48, 48, 24), (32, 48, 24), (1, 1, 24), (5, 3, 2), (0, 4, 2), (4, 0, 2), (0, 0, 24), (0, 0, 3)],
)
def test_index_sets_partition(rows, cols, side):
    """Base / high-res / newline indices partition range(num_tokens) exactly; counts add up."""
    layout = LlavaNextLayout(rows, cols, side)
    check_partition(layout)
    assert layout.num_base == side * side
    assert layout.highres_indices.numel() == rows * cols
    assert layout.newline_indices.numel() == (1 if (rows, cols) == (0, 0) else rows)


def test_single_crop_layout():
    """One crop: the 576 base tokens and one trailing newline, as transformers packs a single-crop image."""
    layout = LlavaNextLayout(0, 0)
    assert layout.single_crop and layout.num_tokens == 577
    assert layout.newline_indices.tolist() == [576] and layout.highres_indices.numel() == 0
    packed = hf_pack((336, 336), DEFAULT_PINPOINTS, 336, 14, crops=1)
    assert packed.numel() == layout.num_tokens and (packed == -1).nonzero().squeeze(1).tolist() == [576]


def test_square_672_layout():
    """The canonical 672 x 672 image: 48 x 48 grid, 576 + 48 * 49 = 2928 tokens, newline after each row."""
    layout = LlavaNextLayout.from_image_size((672, 672))
    assert (layout.rows, layout.cols, layout.num_tokens) == (48, 48, 2928)
    assert layout.newline_indices[:2].tolist() == [576 + 48, 576 + 97]
    assert int(layout.newline_indices[-1]) == 2927


# --- GridLayout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thw", [(1, 2, 2), (1, 16, 20), (1, 36, 52), (4, 16, 16), (3, 2, 8)])
def test_grid_from_thw(thw):
    """Qwen2.5-VL merge 2: t x h/2 x w/2 tokens, as many as the merger emits (prod(thw) / 4)."""
    t, h, w = thw
    for grid in (list(thw), torch.tensor(thw)):
        layout = GridLayout.from_grid_thw(grid)
        assert (layout.frames, layout.height, layout.width) == (t, h // 2, w // 2)
        assert layout.num_tokens == t * h * w // 4
    assert GridLayout.from_grid_thw(thw, merge_size=1).num_tokens == t * h * w


def test_grid_default_is_llava15():
    assert GridLayout().num_tokens == 576 and GridLayout(1, 24, 24) == GridLayout()


# --- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: LlavaNextLayout(-1, 4),
        lambda: LlavaNextLayout(4, -1),
        lambda: LlavaNextLayout(4, 4, 0),
        lambda: LlavaNextLayout.from_image_size((0, 100)),
        lambda: LlavaNextLayout.from_image_size((100, -5)),
        lambda: GridLayout(0, 24, 24),
        lambda: GridLayout(1, 0, 24),
        lambda: GridLayout(1, 24, 0),
        lambda: GridLayout.from_grid_thw([1, 1, 4]),  # fewer rows than the merge size
        lambda: GridLayout.from_grid_thw([1, 4]),
    ],
)
def test_invalid_layouts_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(("thw", "merge"), [((1, 3, 4), 2), ((1, 4, 6), 4), ((1, 4, 4), 0)])
def test_grid_from_thw_rejects_unmergeable(thw, merge):
    """A grid the merger cannot tile (or a merge size < 1) is invalid: ValueError, not a silent floor / crash."""
    with pytest.raises(ValueError):
        GridLayout.from_grid_thw(thw, merge_size=merge)
