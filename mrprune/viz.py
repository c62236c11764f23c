"""Pictures of which visual tokens a pruner keeps: :func:`overlay`, :func:`token_boxes` and ``mrprune viz``.

Where a token's cell lies on the image (checked against transformers 5.23's image processors):

* **LLaVA-NeXT base view** — ``LlavaNextImageProcessor`` resizes the *whole* image to ``crop_size x crop_size``
  (336 x 336) without keeping its aspect ratio and without padding (``_get_image_patches``: ``resize`` to
  ``(shortest_edge, shortest_edge)``; the original LLaVA-NeXT ``process_anyres_image`` does the same). Its 24 x 24
  tokens therefore cover the image in cells of ``height / 24 x width / 24`` pixels, which are not square for a
  non-square image.
* **LLaVA-NeXT high-resolution grid** — the image is resized into the best pinpoint canvas keeping its aspect ratio,
  padded, tiled into 336 px crops, and the token grid is then *unpadded* (``unpad_image``): the ``rows x cols`` grid
  of :class:`~mrprune.layouts.LlavaNextLayout` covers the image itself (to within half a token at the edges),
  ``height / rows x width / cols`` pixels per cell. The newline token after each row has no cell; it is drawn in a
  narrow strip right of the grid.
* **LLaVA-1.5** (``GridLayout(1, 24, 24)``) — ``llava-hf`` checkpoints load ``CLIPImageProcessor`` /
  ``LlavaImageProcessor`` with ``do_pad=False``: shortest edge to 336, then a centre crop, so the grid covers the
  central square of the image (``fit="crop"``; the rest is shaded). The original LLaVA-1.5 code
  (``image_aspect_ratio="pad"``, or ``do_pad=True``) pads to a square with the mean colour first (``fit="pad"``).
* **Qwen2.5-VL** (``GridLayout.from_grid_thw``) — ``smart_resize`` scales the image to multiples of 28 px keeping
  its aspect ratio approximately; every merged token covers a 28 x 28 px cell of that image, so the ``h x w`` grid
  covers the whole image (``fit="stretch"``). A video's frames are drawn in a row (one panel per token frame, i.e.
  per ``temporal_patch_size`` input frames).

Kept tokens are drawn clear; pruned ones dimmed and hatched; an optional per-token score is drawn as a heat map
under them. A merging method's result (:class:`~mrprune.methods.results.MergedTokens`) is drawn as its groups: the
input tokens of one output token (``sources``) share one colour, the representative whose row the output token takes
is marked with a white square, tokens merged nowhere are dimmed and hatched, and one-token groups (tokens kept as
themselves) are drawn clear. Everything here is drawing glue: the pruning itself is the methods' job.

``mrprune viz`` runs a pruner preset on an image and saves the picture. No vision-tower weights exist offline, so
unless ``--features`` gives real ones it uses :func:`standin_features`: simple per-patch colour and gradient
statistics of the image lifted to ``D`` dimensions by a fixed random projection. They are *stand-ins, not CLIP
features*, and the picture says so. What a method reads besides its tokens is a stand-in too
(:func:`standin_signals`), named in the picture where it is synthetic: ToMe merges over a stand-in tower (its own merge
schedule over blocks that only merge), and the ``llm``-stage methods (PDrop, DART, SparseVLM) run every pruning layer
on a synthetic prompt, attention, keys and hidden states.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .layouts import DEFAULT_GRID_PINPOINTS, GridLayout, LlavaNextLayout

__all__ = [
    "FITS",
    "SAMPLE_IMAGES",
    "add_arguments",
    "overlay",
    "run",
    "standin_features",
    "standin_merge_groups",
    "standin_select",
    "standin_signals",
    "token_boxes",
]

logger = logging.getLogger(__name__)

#: How a grid covers its image: the whole image resized ("stretch"), the image padded to a square ("pad"), or the
#: central square of the image ("crop").
FITS = ("stretch", "pad", "crop")

#: Images shipped inside the scikit-image wheel that ``mrprune viz --image NAME`` accepts.
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")

MARGIN = 12  # pixels around and between panels
HEADER = 22  # panel caption height
LEGEND = 40  # legend band height
STRIP_GAP = 3  # gap between a LLaVA-NeXT high-resolution grid and its newline strip
_DIM_COLOUR = np.array([18.0, 18.0, 28.0])
_HATCH_COLOUR = np.array([150.0, 150.0, 160.0])
_HATCH_PERIOD = 5
_OUTSIDE_COLOUR = np.array([90.0, 90.0, 90.0])  # image area no token sees (centre crop)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_NOTE = (180, 50, 0)
# viridis, sampled at 0, 0.25, 0.5, 0.75, 1
_CMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)

Layout = LlavaNextLayout | GridLayout


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """One grid of tokens over one picture: token ``(r, c)`` is layout index ``first + r * stride + c``."""

    name: str
    rows: int
    cols: int
    first: int
    stride: int
    fit: str
    frame: int = 0
    group: str = ""  # views of one group share the heat-map scale

    def indices(self) -> np.ndarray:
        return self.first + np.arange(self.rows)[:, None] * self.stride + np.arange(self.cols)[None, :]


def _check_layout(layout: Any) -> None:
    if not isinstance(layout, LlavaNextLayout | GridLayout):
        raise TypeError(f"layout must be a mrprune.LlavaNextLayout or mrprune.GridLayout, got {type(layout).__name__}")


def _check_fit(fit: str) -> str:
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    return fit


def _views(layout: Layout, fit: str | None) -> tuple[list[_View], np.ndarray]:
    """The grids of a layout and the indices of its newline tokens (LLaVA-NeXT; empty otherwise)."""
    _check_layout(layout)
    if isinstance(layout, LlavaNextLayout):
        side = layout.base_side
        views = [_View("base", side, side, 0, side, _check_fit(fit or "stretch"), group="base")]
        if layout.rows and layout.cols:
            views.append(
                _View(
                    "high-res", layout.rows, layout.cols, layout.num_base, layout.cols + 1, "stretch", group="high-res"
                )
            )
        return views, layout.newline_indices.numpy()
    fit = _check_fit(fit or "stretch")
    per_frame = layout.height * layout.width
    views = [
        _View(
            f"frame {t}" if layout.frames > 1 else "grid",
            layout.height,
            layout.width,
            t * per_frame,
            layout.width,
            fit,
            frame=t,
            group="grid",
        )
        for t in range(layout.frames)
    ]
    return views, np.zeros(0, dtype=np.int64)


def _covered(fit: str, height: int, width: int) -> tuple[float, float, float, float]:
    """The image-pixel rectangle ``(x0, y0, x1, y1)`` a grid covers (outside the image for padding)."""
    if fit == "stretch":
        return 0.0, 0.0, float(width), float(height)
    side = max(height, width) if fit == "pad" else min(height, width)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def token_boxes(layout: Layout, image_size: tuple[int, int], fit: str | None = None) -> torch.Tensor:
    """Where every token of ``layout`` lies on an image of ``image_size = (height, width)`` pixels.

    Parameters
    ----------
    layout : LlavaNextLayout or GridLayout
    image_size : (height, width)
        Of the original image (of every frame, for a video).
    fit : {"stretch", "pad", "crop"}, optional
        How the (base) grid covers the image (see :data:`FITS` and the module notes); default ``"stretch"``. The
        LLaVA-NeXT high-resolution grid always covers the image.

    Returns
    -------
    Tensor ``[N, 5]`` float64
        Per token: the view (0 = base view / first frame, 1 = high-resolution grid / second frame, ...; -1 for a
        newline token) and the cell ``x0, y0, x1, y1`` in image pixels (NaN for newline tokens). With
        ``fit="pad"`` cells may lie partly outside the image.
    """
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"token_boxes: image_size must be positive, got {image_size}")
    views, newlines = _views(layout, fit)
    boxes = torch.full((layout.num_tokens, 5), math.nan, dtype=torch.float64)
    for number, view in enumerate(views):
        x0, y0, x1, y1 = _covered(view.fit, height, width)
        cw, ch = (x1 - x0) / view.cols, (y1 - y0) / view.rows
        rows, cols = np.meshgrid(np.arange(view.rows), np.arange(view.cols), indexing="ij")
        index = torch.from_numpy(view.indices().reshape(-1))
        cells = np.stack(
            [
                np.full(rows.size, number if isinstance(layout, LlavaNextLayout) else view.frame),
                x0 + cols.reshape(-1) * cw,
                y0 + rows.reshape(-1) * ch,
                x0 + (cols.reshape(-1) + 1) * cw,
                y0 + (rows.reshape(-1) + 1) * ch,
            ],
            axis=1,
        )
        boxes[index] = torch.from_numpy(cells.astype(np.float64))
    if newlines.size:
        boxes[torch.from_numpy(newlines), 0] = -1
    return boxes


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _to_pil(image: Any) -> Any:
    """A PIL RGB image from a PIL image or an ``[H, W]`` / ``[H, W, C]`` array (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., :3]
    elif array.ndim != 2:
        raise ValueError(f"image must be a PIL image or an [H, W] / [H, W, 3|4] array, got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"image is empty: shape {array.shape}")
    if array.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def _frames(image: Any, count: int) -> list[Any]:
    """One PIL image per frame: a sequence of ``count`` images (or one image repeated)."""
    if isinstance(image, list | tuple):
        pictures = [_to_pil(i) for i in image]
        if len(pictures) == 1:
            pictures = pictures * count
        if len(pictures) != count:
            raise ValueError(f"the layout has {count} frames but {len(pictures)} images were given")
        if len({p.size for p in pictures}) != 1:
            raise ValueError(f"all frames must have one size, got {sorted({p.size for p in pictures})}")
        return pictures
    return [_to_pil(image)] * count


def _kept_mask(kept: Any, total: int) -> np.ndarray:
    """Kept indices (or a boolean mask) as a boolean mask over the layout's ``total`` tokens."""
    values = kept.detach().cpu() if isinstance(kept, torch.Tensor) else torch.as_tensor(np.asarray(kept))
    if values.dim() != 1:
        raise ValueError(f"kept must be 1-D (indices or a boolean mask), got shape {tuple(values.shape)}")
    if values.dtype == torch.bool:
        if values.numel() != total:
            raise ValueError(f"a boolean kept mask needs {total} entries (the layout's tokens), got {values.numel()}")
        return values.numpy().copy()
    if values.numel() and (values.is_floating_point() or values.is_complex()):
        raise ValueError(f"kept indices must be integers, got dtype {values.dtype}")
    values = values.long()
    if values.numel() and (values.min() < 0 or values.max() >= total):
        raise ValueError(f"kept indices must lie in [0, {total}), got range [{values.min()}, {values.max()}]")
    if values.unique().numel() != values.numel():
        raise ValueError("kept indices must not repeat")
    mask = np.zeros(total, dtype=bool)
    mask[values.numpy()] = True
    return mask


def _score_array(scores: Any, total: int) -> np.ndarray | None:
    if scores is None:
        return None
    values = scores.detach().float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    if values.shape != (total,):
        raise ValueError(f"scores must have shape ({total},) (one per token), got {values.shape}")
    return values.astype(np.float64)


def _normalise(values: np.ndarray) -> np.ndarray:
    """Scores to [0, 1] between their 2nd and 98th percentile (NaN -> 0)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    lo, hi = np.percentile(finite, [2, 98])
    out = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
    return np.nan_to_num(np.clip(out, 0, 1), nan=0.0)


def _colours(values: np.ndarray) -> np.ndarray:
    """``[...]`` in [0, 1] -> ``[..., 3]`` RGB floats (viridis)."""
    position = np.clip(values, 0, 1) * (len(_CMAP) - 1)
    low = np.minimum(position.astype(int), len(_CMAP) - 2)
    weight = (position - low)[..., None]
    return _CMAP[low] * (1 - weight) + _CMAP[low + 1] * weight


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def _canvas(picture: Any, fit: str) -> tuple[Any, tuple[float, float, float, float]]:
    """The picture a panel shows (the padded square for ``"pad"``) and the grid's rectangle in its pixels."""
    from PIL import Image

    width, height = picture.size
    x0, y0, x1, y1 = _covered(fit, height, width)
    if fit != "pad":
        return picture, (x0, y0, x1, y1)
    side = int(round(x1 - x0))
    mean = tuple(int(v) for v in np.asarray(picture).reshape(-1, 3).mean(0).round())
    square = Image.new("RGB", (side, side), mean)
    square.paste(picture, (int(round(-x0)), int(round(-y0))))
    return square, (0.0, 0.0, float(side), float(side))


def _edges(start: float, stop: float, cells: int) -> np.ndarray:
    return np.round(start + np.arange(cells + 1) * (stop - start) / cells).astype(int)


def _cell_map(edges_x: np.ndarray, edges_y: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Per display pixel, the grid row and column it belongs to (-1 outside the grid)."""
    cols = np.searchsorted(edges_x, np.arange(width), side="right") - 1
    rows = np.searchsorted(edges_y, np.arange(height), side="right") - 1
    cols[(cols < 0) | (cols >= len(edges_x) - 1)] = -1
    rows[(rows < 0) | (rows >= len(edges_y) - 1)] = -1
    return rows, cols


@dataclass(frozen=True)
class _Groups:
    """A merged result as drawn: each token's group (output token, -1 merged nowhere), whether the group holds
    several tokens (coloured), and which tokens are representatives of such groups (marked)."""

    ids: np.ndarray  # [N] int
    merged: np.ndarray  # [N] bool: the token's group has >= 2 tokens
    representative: np.ndarray  # [N] bool

    @classmethod
    def of(cls, result: Any, total: int) -> _Groups:
        sources = result.sources.detach().cpu().numpy().astype(np.int64)
        if sources.shape != (total,):
            raise ValueError(f"merged tokens must map {total} input tokens (the layout's), got {sources.shape[0]}")
        kept = result.kept.detach().cpu().numpy().astype(np.int64)
        sizes = np.bincount(sources[sources >= 0], minlength=kept.size)
        merged = (sources >= 0) & (sizes[np.maximum(sources, 0)] > 1)
        representative = np.zeros(total, dtype=bool)
        representative[kept[sizes > 1]] = True
        return cls(sources, merged, representative)


def _group_colours(ids: np.ndarray) -> np.ndarray:
    """Distinct saturated colours per group id (hues on the golden-ratio sequence): ``ids`` shape + ``[3]``."""
    hue = (ids * 0.6180339887498949 + 0.11) % 1.0
    sector = np.floor(hue * 6).astype(int) % 6
    f = hue * 6 - np.floor(hue * 6)
    value, saturation = 235.0, 0.8
    p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
    channels = [
        np.choose(sector, [value, q, p, p, t, value]),
        np.choose(sector, [t, value, value, q, p, p]),
        np.choose(sector, [p, p, t, value, value, q]),
    ]
    return np.stack(channels, axis=-1)


def _render_view(
    picture: Any,
    view: _View,
    kept: np.ndarray,
    heat: np.ndarray | None,
    panel_height: int,
    dim: float,
    hatch: bool,
    groups: _Groups | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One panel as an RGB uint8 array, plus the display x and y cell edges of its grid."""
    from PIL import Image

    canvas, (gx0, gy0, gx1, gy1) = _canvas(picture, view.fit)
    scale = panel_height / canvas.size[1]
    width = max(1, int(round(canvas.size[0] * scale)))
    pixels = np.asarray(canvas.resize((width, panel_height), Image.Resampling.BILINEAR), dtype=np.float64).copy()
    edges_x = _edges(gx0 * scale, gx1 * scale, view.cols)
    edges_y = _edges(gy0 * scale, gy1 * scale, view.rows)
    rows, cols = _cell_map(edges_x, edges_y, width, panel_height)
    inside = (rows[:, None] >= 0) & (cols[None, :] >= 0)
    index = view.indices()[np.maximum(rows, 0)[:, None], np.maximum(cols, 0)[None, :]]
    if heat is not None:
        colour = _colours(heat[index])
        pixels = np.where(inside[..., None], 0.45 * pixels + 0.55 * colour, pixels)
    if groups is not None:  # every multi-token group in its own colour
        tinted = inside & groups.merged[index]
        colour = _group_colours(np.maximum(groups.ids[index], 0))
        pixels = np.where(tinted[..., None], 0.35 * pixels + 0.65 * colour, pixels)
    pruned = inside & ~kept[index]
    pixels = np.where(pruned[..., None], dim * pixels + (1 - dim) * _DIM_COLOUR, pixels)
    cell = min(np.diff(edges_x).min(initial=0), np.diff(edges_y).min(initial=0))
    if hatch and cell >= 4:
        yy, xx = np.mgrid[0:panel_height, 0:width]
        lines = pruned & ((xx + yy) % _HATCH_PERIOD == 0)
        pixels[lines] = 0.5 * pixels[lines] + 0.5 * _HATCH_COLOUR
    if cell >= 12:  # faint grid lines (the first pixel row / column of every cell) on coarse grids
        first_col = np.isin(np.arange(width), edges_x[:-1])
        first_row = np.isin(np.arange(panel_height), edges_y[:-1])
        lines = inside & (first_row[:, None] | first_col[None, :])
        pixels[lines] = 0.7 * pixels[lines] + 0.3 * 255
    outside = ~inside
    if view.fit == "crop" and outside.any():  # image area the model never sees
        pixels[outside] = 0.3 * pixels[outside] + 0.7 * _OUTSIDE_COLOUR
    if groups is not None:  # representatives: a white square with a dark rim in the cell's centre
        cells = view.indices()
        for row, col in zip(*np.nonzero(groups.representative[cells]), strict=True):
            x0, x1, y0, y1 = edges_x[col], edges_x[col + 1], edges_y[row], edges_y[row + 1]
            half = max(1, min(x1 - x0, y1 - y0) // 5)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            pixels[cy - half - 1 : cy + half + 1, cx - half - 1 : cx + half + 1] = 30.0
            pixels[cy - half : cy + half, cx - half : cx + half] = 255.0
    return np.clip(pixels, 0, 255).round().astype(np.uint8), edges_x, edges_y


def _render_strip(kept: np.ndarray, newlines: np.ndarray, edges_y: np.ndarray, width: int, height: int) -> np.ndarray:
    """The newline strip: one cell per high-resolution row, light when kept, dark when pruned."""
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    for row, token in enumerate(newlines):
        y0, y1 = edges_y[row], max(edges_y[row + 1] - 1, edges_y[row] + 1)
        colour = (225, 225, 225) if kept[token] else tuple(int(v) for v in _DIM_COLOUR)
        strip[y0:y1, :] = colour
    return strip


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def overlay(
    image: Any,
    kept: Any,
    layout: Layout,
    scores: Any = None,
    *,
    fit: str | None = None,
    title: str | None = None,
    subtitle: str | None = None,
    note: str | None = None,
    score_label: str = "score",
    panel_height: int = 320,
    dim: float = 0.3,
    hatch: bool = True,
) -> Any:
    """Draw which tokens were kept over the image.

    Parameters
    ----------
    image : PIL image, ``[H, W]`` / ``[H, W, 3]`` array, or a sequence of them (one per video frame)
        The original image (as given to the processor). For a multi-frame :class:`~mrprune.GridLayout` give one image
        per frame, or a single image to repeat.
    kept : int indices or a boolean mask ``[N]``, or :class:`~mrprune.methods.results.MergedTokens`
        The kept tokens of ``layout`` (what ``Pruner.select`` returns, or ``handle.last[b].kept[i]``); a merging
        method's result (``select``'s, or ``handle.last[b].merged[i]``) is drawn as its groups (module notes).
    layout : LlavaNextLayout or GridLayout
        The item's token layout; LLaVA-NeXT is drawn as base view and high-resolution grid side by side (with the
        newline tokens in a strip), a video as its frames in a row.
    scores : float ``[N]``, optional
        Per-token scores drawn as a heat map (viridis, scaled per view between the 2nd and 98th percentile).
    fit : {"stretch", "pad", "crop"}, optional
        How the (base) grid covers the image: default ``"stretch"`` (LLaVA-NeXT base view, Qwen2.5-VL); ``"crop"``
        for llava-hf LLaVA-1.5 (centre crop), ``"pad"`` for the original LLaVA-1.5 (padded square). See the module
        notes.
    title, subtitle, note : str, optional
        Text above the panels; the subtitle defaults to the kept count, ``note`` is drawn in orange (caveats).
    score_label : str
        Caption of the heat-map colour bar.
    panel_height : int
        Height of every panel in pixels (the width follows the image's aspect ratio).
    dim : float in [0, 1)
        Brightness kept in pruned cells (they are also blended towards a dark blue-grey and hatched).
    hatch : bool
        Hatch pruned cells (only where cells are at least 4 pixels wide).

    Returns
    -------
    PIL.Image.Image
        RGB. ``result.info["mrprune_panels"]`` lists each panel: ``name``, ``box`` ``(x0, y0, x1, y1)`` of the
        panel's picture in the result, the cell edges ``edges_x`` / ``edges_y`` (result pixels) and the layout
        ``indices`` ``[rows, cols]`` of its cells; a LLaVA-NeXT high-resolution panel also has ``strip`` (the newline
        strip's box) and ``newlines``. For merged tokens ``result.info["mrprune_groups"]`` is each token's group
        (``sources``, -1: merged nowhere).
    """
    from PIL import Image, ImageDraw

    from .methods.results import MergedTokens

    _check_layout(layout)
    if not (isinstance(panel_height, int) and panel_height >= 16):
        raise ValueError(f"panel_height must be an int >= 16, got {panel_height!r}")
    if not 0 <= dim < 1:
        raise ValueError(f"dim must lie in [0, 1), got {dim}")
    total = layout.num_tokens
    groups = _Groups.of(kept, total) if isinstance(kept, MergedTokens) else None
    mask = groups.ids >= 0 if groups is not None else _kept_mask(kept, total)
    values = _score_array(scores, total)
    views, newlines = _views(layout, fit)
    frames = _frames(image, layout.frames if isinstance(layout, GridLayout) else 1)
    heat = None
    if values is not None:
        heat = np.zeros(total)
        for group in dict.fromkeys(v.group for v in views):
            index = np.concatenate([v.indices().reshape(-1) for v in views if v.group == group])
            heat[index] = _normalise(values[index])

    panels = []
    for view in views:
        pixels, edges_x, edges_y = _render_view(frames[view.frame], view, mask, heat, panel_height, dim, hatch, groups)
        panel = {"name": view.name, "view": view, "pixels": pixels, "edges_x": edges_x, "edges_y": edges_y}
        if view.name == "high-res" and newlines.size:
            strip_width = max(6, int(round(float(np.diff(edges_x).mean()))))
            panel["strip_pixels"] = _render_strip(mask, newlines, edges_y, strip_width, panel_height)
        panels.append(panel)
    if isinstance(layout, LlavaNextLayout) and len(views) == 1 and newlines.size:  # single crop or no columns
        edges = _edges(0, panel_height, newlines.size)
        panels[0]["strip_pixels"] = _render_strip(mask, newlines, edges, 8, panel_height)

    kept_count = int(mask.sum())
    if subtitle is None and groups is not None:
        outputs = int(kept.kept.numel())
        subtitle = (
            f"{outputs} output tokens from {total} visual tokens ({100.0 * outputs / total:.1f} %): "
            f"{int(groups.representative.sum())} merged groups, {total - kept_count} tokens merged nowhere"
        )
    elif subtitle is None:
        subtitle = f"kept {kept_count} of {total} visual tokens ({100.0 * kept_count / total:.1f} %)"
    lines = [
        (text, size, colour)
        for text, size, colour in ((title, 16, _TEXT), (subtitle, 13, _TEXT), (note, 13, _NOTE))
        if text
    ]
    fonts = {size: _font(size) for _, size, _ in lines} | {12: _font(12)}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str, size: int) -> int:
        return int(math.ceil(measure.textlength(text, font=fonts.get(size) or _font(size))))

    line_height = {16: 22, 13: 18}
    top = MARGIN + sum(line_height[size] for _, size, _ in lines) + (4 if lines else 0)
    x = MARGIN
    for panel in panels:
        panel["x"] = x
        strip = panel.get("strip_pixels")
        panel_width = panel["pixels"].shape[1] + (STRIP_GAP + strip.shape[1] if strip is not None else 0)
        panel["caption"] = _caption(panel["view"], mask, newlines if strip is not None else None, groups is not None)
        panel_width = max(panel_width, text_width(panel["caption"], 12))
        x += panel_width + MARGIN
    width = max(x, max((text_width(t, s) for t, s, _ in lines), default=0) + 2 * MARGIN, 320)
    height = top + HEADER + panel_height + LEGEND
    out = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = MARGIN
    for text, size, colour in lines:
        draw.text((MARGIN, y), text, fill=colour, font=fonts[size])
        y += line_height[size]
    info = []
    for panel in panels:
        x0, y0 = panel["x"], top + HEADER
        draw.text((x0, top + 3), panel["caption"], fill=_TEXT, font=fonts[12])
        pixels = panel["pixels"]
        out.paste(Image.fromarray(pixels), (x0, y0))
        entry = {
            "name": panel["name"],
            "box": (x0, y0, x0 + pixels.shape[1], y0 + pixels.shape[0]),
            "edges_x": panel["edges_x"] + x0,
            "edges_y": panel["edges_y"] + y0,
            "indices": panel["view"].indices(),
        }
        strip = panel.get("strip_pixels")
        if strip is not None:
            sx = x0 + pixels.shape[1] + STRIP_GAP
            out.paste(Image.fromarray(strip), (sx, y0))
            entry["strip"] = (sx, y0, sx + strip.shape[1], y0 + strip.shape[0])
            entry["newlines"] = newlines.copy()
        info.append(entry)
    _legend(draw, fonts[12], MARGIN, top + HEADER + panel_height + 8, heat is not None, score_label, groups is not None)
    out.info["mrprune_panels"] = info
    if groups is not None:
        out.info["mrprune_groups"] = groups.ids.copy()
    return out


def _caption(view: _View, mask: np.ndarray, newlines: np.ndarray | None, merged: bool = False) -> str:
    index = view.indices()
    kept = int(mask[index].sum())
    verb = "in an output token" if merged else "kept"
    text = f"{view.name}: {view.rows} x {view.cols}, {verb} {kept} / {index.size}"
    if newlines is not None and newlines.size:
        text += f"; newlines kept {int(mask[newlines].sum())} / {newlines.size}"
    if view.fit != "stretch":
        text += f" ({view.fit})"
    return text


def _legend(draw: Any, font: Any, x: int, y: int, heat: bool, score_label: str, merged: bool = False) -> None:
    """Swatches for kept / pruned cells (merged results: also a merged group and its representative) and, with
    scores, a colour bar."""
    size = 14
    draw.rectangle((x, y, x + size, y + size), fill=(235, 235, 235), outline=(120, 120, 120))
    draw.text((x + size + 5, y), "kept", fill=_TEXT, font=font)
    x += size + 45
    dark = tuple(int(v) for v in 0.3 * 235 + 0.7 * _DIM_COLOUR)
    draw.rectangle((x, y, x + size, y + size), fill=dark, outline=(120, 120, 120))
    for offset in range(-size, size, _HATCH_PERIOD):
        draw.line(
            (x + max(offset, 0), y + max(-offset, 0), x + min(size, size + offset), y + min(size, size - offset)),
            fill=tuple(int(v) for v in _HATCH_COLOUR),
        )
    draw.text((x + size + 5, y), "pruned", fill=_TEXT, font=font)
    x += size + 65
    if merged:
        draw.rectangle((x, y, x + size, y + size), fill=tuple(int(v) for v in _group_colours(np.array(1))))
        draw.rectangle((x + 4, y + 4, x + size - 4, y + size - 4), fill=(255, 255, 255), outline=(30, 30, 30))
        draw.text((x + size + 5, y), "merged group, representative", fill=_TEXT, font=font)
        x += size + 200
    if heat:
        bar = _colours(np.linspace(0, 1, 100))
        for i, colour in enumerate(bar):
            draw.line((x + i, y, x + i, y + size), fill=tuple(int(v) for v in colour))
        draw.text((x + 106, y), f"{score_label} (low -> high, per view)", fill=_TEXT, font=font)


# ---------------------------------------------------------------------------------------------------------------------
# Stand-in features
# ---------------------------------------------------------------------------------------------------------------------

_PATCH = 8  # pixels per token cell when measuring the stand-in statistics


def _cell_statistics(picture: Any, view: _View) -> np.ndarray:
    """``[rows * cols, 12]`` statistics of the pixels under each cell of a view: mean RGB, luminance spread, mean
    gradient magnitude, the gradient structure tensor (3) and the 2 x 2 sub-cell luminance pattern (4)."""
    from PIL import Image

    canvas, box = _canvas(picture, view.fit)
    size = (view.cols * _PATCH, view.rows * _PATCH)
    pixels = np.asarray(canvas.resize(size, Image.Resampling.BILINEAR, box=box), dtype=np.float64) / 255.0
    luminance = pixels @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(luminance)

    def cells(array: np.ndarray) -> np.ndarray:  # [H, W, ...] -> [rows * cols, P * P, ...]
        shaped = array.reshape(view.rows, _PATCH, view.cols, _PATCH, *array.shape[2:])
        shaped = np.moveaxis(shaped, 2, 1)
        return shaped.reshape(view.rows * view.cols, _PATCH * _PATCH, *array.shape[2:])

    rgb = cells(pixels).mean(1)
    lum = cells(luminance)
    spread = lum.std(1)
    magnitude = cells(np.hypot(gx, gy)).mean(1)
    tensor = np.stack([cells(gx * gx).mean(1), cells(gy * gy).mean(1), cells(gx * gy).mean(1)], axis=1)
    half = _PATCH // 2
    quads = lum.reshape(-1, 2, half, 2, half).mean(axis=(2, 4)).reshape(-1, 4) - lum.mean(1, keepdims=True)
    return np.concatenate(
        [rgb, spread[:, None], magnitude[:, None], np.sqrt(np.abs(tensor)) * np.sign(tensor), quads], axis=1
    )


def standin_features(image: Any, layout: Layout, dim: int = 256, fit: str | None = None, seed: int = 0) -> torch.Tensor:
    """Image-based *stand-in* token features, for pictures when no vision-tower weights are at hand.

    Not CLIP / vision-tower features. Per token: 12 statistics of the pixels under its cell (mean colour, luminance
    spread, gradient magnitude and structure tensor, 2 x 2 luminance pattern), standardised over the image's tokens,
    lifted to ``dim`` dimensions by a fixed Gaussian projection (seeded), normalised, plus a shared mean direction
    (so the average cosine similarity is clearly positive, as for projector outputs) and small seeded noise (no exact
    ties on flat regions); the norm grows with local contrast (graph methods read norms as informativeness).
    LLaVA-NeXT newline tokens are one fixed vector. Similar-looking patches get similar features, so the cosine
    graphs the methods build are meaningful; what the methods keep on *real* features will differ.

    Returns
    -------
    Tensor ``[layout.num_tokens, dim]`` float32.
    """
    if not (isinstance(dim, int) and dim >= 16):
        raise ValueError(f"dim must be an int >= 16, got {dim!r}")
    views, newlines = _views(layout, fit)
    frames = _frames(image, layout.frames if isinstance(layout, GridLayout) else 1)
    total = layout.num_tokens
    stats = np.zeros((total, 12))
    for view in views:
        stats[view.indices().reshape(-1)] = _cell_statistics(frames[view.frame], view)
    cells = np.ones(total, dtype=bool)
    cells[newlines] = False
    z = stats[cells]
    z = (z - z.mean(0)) / np.maximum(z.std(0), 1e-6)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(12, dim, generator=generator, dtype=torch.float64) / math.sqrt(12)
    mean_direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    mean_direction /= mean_direction.norm()
    noise = torch.randn(total, dim, generator=generator, dtype=torch.float64) * (0.05 / math.sqrt(dim))
    lifted = torch.from_numpy(z) @ projection
    lifted = lifted / lifted.norm(dim=1, keepdim=True).clamp_min(1e-9) + 0.45 * mean_direction
    contrast = torch.from_numpy(z[:, 3] + z[:, 4]) / 2  # luminance spread + gradient magnitude
    lifted = lifted * (1.0 + 0.3 * torch.tanh(contrast))[:, None]
    features = torch.zeros(total, dim, dtype=torch.float64)
    features[torch.from_numpy(cells)] = lifted
    features[torch.from_numpy(~cells)] = 1.2 * mean_direction
    return (features + noise).float()


# ---------------------------------------------------------------------------------------------------------------------
# Scores for the heat map
# ---------------------------------------------------------------------------------------------------------------------


def standin_signals(
    pruner: Any,
    features: torch.Tensor,
    layout: Layout,
    image_size: tuple[int, int] | None = None,
    window: int | None = None,
) -> dict[str, Any]:
    """Stand-in inputs for what a method reads besides its tokens, so that every method can be drawn without a
    model. Shapes are ``select``'s (one item's, :meth:`~mrprune.Pruner.select`); empty for methods that read nothing
    else.

    * ``Need.VISION_ATTENTION``: each token's norm normalised over its crop, a *stand-in* for the encoder attention
      (crops from the layout: LLaVA-NeXT tiles from ``image_size`` and the default pinpoints, Qwen frames);
      ``Need.CLIP_EMBEDDINGS``: the tokens as CLIP image embeddings and their mean as the question's.
    * ``Need.VISION_MERGE`` (ToMe): ``groups`` from :func:`standin_merge_groups`, the method's own merge schedule
      run over a *stand-in tower* whose blocks only merge (no attention, no MLP), the tokens being their own keys
      (``window``: Qwen2.5-VL's, tokens merged within windows of ``window x window`` tokens).
    * ``llm``-stage methods: the signals of their first pruning layer (step 0) from :data:`SYNTHETIC_LLM_NOTE`'s
      synthetic prompt, attention, keys and normed states (:func:`standin_select` runs every pruning layer).
    """
    from .methods.stages import Need, Stage

    needs = getattr(pruner, "needs", ())
    if getattr(pruner, "stage", None) is Stage.LLM:
        tokens = features.float()
        origin = torch.arange(tokens.shape[0])
        return _llm_signals(pruner, tokens, _standin_prompt(tokens), tokens, 0, _llm_layers(pruner)[0], origin)
    if Need.VISION_MERGE in needs:
        return {"groups": standin_merge_groups(pruner, features, layout, image_size, window)}
    if Need.VISION_ATTENTION not in needs:
        return {}
    crops = _standin_crops(layout, image_size)[:, 0]
    total = layout.num_tokens
    norms = features.float().norm(dim=1)
    attention = torch.zeros(total)
    for crop in crops.unique().tolist():
        members = crops == crop
        if crop >= 0:
            attention[members] = norms[members] / norms[members].sum().clamp_min(1e-12)
    signals = {
        "attention": {layer: attention for layer in pruner.attention_layers},
        "crops": crops,
        "attention_kind": "cls",
    }
    if Need.CLIP_EMBEDDINGS in pruner.needs:  # CDPruner, TRIM: the tokens stand in for their CLIP embeddings and
        # their mean for the question's
        signals["clip_image"] = features.float()
        signals["clip_text"] = [features.float().mean(0, keepdim=True)]
    return signals


def _standin_crops(layout: Layout, image_size: tuple[int, int] | None) -> torch.Tensor:
    """``[N, 2]`` int64 ``(crop, patch)`` per token (``-1`` for newlines): LLaVA-NeXT's crops from ``image_size`` and
    the default pinpoints (base view and one high-resolution crop without it), a grid's frames."""
    total = layout.num_tokens
    if isinstance(layout, LlavaNextLayout):
        from .integrations.hf.adapters.llava_next import token_sources

        if image_size is not None and not layout.single_crop:
            return token_sources(layout, image_size, DEFAULT_GRID_PINPOINTS, 336)
        sources = torch.stack([torch.zeros(total, dtype=torch.int64), torch.arange(total)], 1)
        sources[layout.num_base :, 0] = 1
        sources[layout.num_base :, 1] -= layout.num_base
        sources[layout.newline_indices] = -1
        return sources
    per_frame = layout.height * layout.width
    return torch.stack([torch.arange(total) // per_frame, torch.arange(total) % per_frame], 1)


#: Blocks of the stand-in tower: CLIP-L/336's 24 up to LLaVA's feature layer -2.
STANDIN_TOWER_BLOCKS = 23
#: Blocks of the stand-in Qwen2.5-VL tower (all 32 of its ViT's blocks merge) and its window side in tokens
#: (``window_size`` 112 px / 14 px patches / 2 x 2 patch merge).
QWEN_TOWER_BLOCKS, QWEN_WINDOW = 32, 4
STANDIN_TOWER_NOTE = (
    "Stand-in tower: the method's merge schedule over 23 blocks that only merge (tokens = their own keys), NOT CLIP's."
)
QWEN_TOWER_NOTE = (
    "Stand-in tower: the method's merge schedule over 32 blocks that only merge within 4 x 4-token windows (tokens = "
    "their own keys), NOT Qwen2.5-VL's."
)


def standin_merge_groups(
    pruner: Any,
    features: torch.Tensor,
    layout: Layout,
    image_size: tuple[int, int] | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Each token's merged group from a *stand-in tower* for a method that merges inside the vision encoder (ToMe).

    Every crop becomes ``[CLS] + P`` patch tokens: the crop's tokens at their patches, [CLS] their mean, and the
    patches LLaVA-NeXT's unpadding removed one constant padding token (the image mean). The method's own
    ``schedule`` / ``start`` / ``merge_block`` then run over :data:`STANDIN_TOWER_BLOCKS` blocks that do nothing but
    merge, each block's keys being its current tokens (one head), as the integration groups a real tower's tokens.
    With ``window`` (a Qwen2.5-VL grid): every token is a unit merged within its frame's window of ``window x window``
    tokens (``window_schedule`` / ``start_windows``) over :data:`QWEN_TOWER_BLOCKS` such blocks.

    Returns
    -------
    Tensor ``[N]`` int64: the token's group (unique within the image), -1 for newline tokens.
    """
    if window is not None:
        return _standin_window_groups(pruner, features, layout, window)
    sources = _standin_crops(layout, image_size)
    present = sources[:, 0] >= 0
    crops = int(sources[:, 0].max()) + 1
    patches = int(sources[present, 1].max()) + 1
    if isinstance(layout, LlavaNextLayout):
        patches = max(patches, layout.base_side**2)  # a crop's full raster, unpadded patches included
    x = features.float()
    filler = x[present].mean(0)
    hidden = filler.expand(crops, 1 + patches, x.shape[1]).clone()
    crop, patch = sources[present, 0], sources[present, 1]
    hidden[crop, 1 + patch] = x[present]
    for c in range(crops):
        members = crop == c
        if bool(members.any()):
            hidden[c, 0] = x[present][members].mean(0)
    crop_tokens = torch.bincount(crop, minlength=crops).tolist()
    schedule = pruner.schedule(patches, STANDIN_TOWER_BLOCKS, [crop_tokens], [int((~present).sum())])
    state = pruner.start(hidden, schedule)
    for block in range(STANDIN_TOWER_BLOCKS):
        pruner.merge_block(state, block, state.tokens, state.tokens[:, :, None, :])
    rows = state.source  # [C, 1 + P]: each original token's row after the last merge
    groups = torch.full((layout.num_tokens,), -1, dtype=torch.int64)
    groups[present] = crop * rows.shape[1] + rows[crop, 1 + patch]
    return groups


def _standin_window_groups(pruner: Any, features: torch.Tensor, layout: Layout, window: int) -> torch.Tensor:
    """:func:`standin_merge_groups` on a Qwen2.5-VL grid: tokens merged within windows, as the tower's windows."""
    frames, rows, cols = layout.frames, layout.height, layout.width
    frame, y, x = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    across = -(-cols // window)
    key = ((frame * -(-rows // window) + y // window) * across + x // window).flatten()
    order = torch.argsort(key * rows * cols + torch.arange(key.numel()))  # windows in order, raster inside each
    counts = torch.bincount(key).tolist()
    counts = [c for c in counts if c]
    width = max(counts)
    slot = torch.arange(key.numel()) - torch.tensor([0, *counts]).cumsum(0)[:-1].repeat_interleave(torch.tensor(counts))
    window_of = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    units = features.float().new_zeros(len(counts), width, features.shape[1])
    units[window_of, slot] = features.float()[order]
    schedule = pruner.window_schedule([counts], QWEN_TOWER_BLOCKS)
    state = pruner.start_windows(units, counts, schedule)
    for block in range(QWEN_TOWER_BLOCKS):
        pruner.merge_block(state, block, state.tokens, state.tokens[:, :, None, :])
    groups = torch.empty(key.numel(), dtype=torch.int64)
    groups[order] = window_of * state.tokens.shape[1] + state.source[window_of, slot]
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic signals of llm-stage methods
# ---------------------------------------------------------------------------------------------------------------------

#: Text tokens of the synthetic prompt, and the sharpness of the synthetic attention (``softmax(s * cosine)``).
PROMPT_TOKENS = 8
ATTENTION_SHARPNESS = 8.0
SYNTHETIC_LLM_NOTE = (
    "Synthetic LLM signals: 8 prompt tokens (random image tokens + noise) after the image, attention = softmax(8 cos) "
    "to the current tokens, keys and hidden states = the tokens; NOT a language model's."
)


def _llm_layers(pruner: Any) -> tuple[int, ...]:
    return tuple(getattr(pruner, "layers", None) or (pruner.layer,))


def _standin_prompt(tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[T, D]`` synthetic prompt tokens: each a random image token's direction plus noise, at the tokens' mean
    norm (a question about a few image regions)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(tokens.shape[0], (PROMPT_TOKENS,), generator=generator)
    directions = torch.nn.functional.normalize(tokens[picks], dim=-1)
    noise = torch.randn(PROMPT_TOKENS, tokens.shape[1], generator=generator) / math.sqrt(tokens.shape[1])
    return (directions + 0.5 * noise) * tokens.norm(dim=1).mean()


def _rms_normed(x: torch.Tensor) -> torch.Tensor:
    """A weightless RMS norm, the stand-in for the language model's final norm."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def _llm_signals(
    pruner: Any,
    tokens: torch.Tensor,
    prompt: torch.Tensor,
    originals: torch.Tensor,
    step: int,
    layer: int,
    origin: torch.Tensor,
) -> dict[str, Any]:
    """``select``'s keyword arguments of an llm-stage method at one pruning layer, from synthetic signals over the
    ``tokens [n, D]`` left (``origin [n]``: their original indices) and the synthetic ``prompt [T, D]``."""
    from .methods.stages import LLM_KEYWORDS, NEED_KEYWORDS, PromptTokens

    n, count = tokens.shape[0], prompt.shape[0]
    unit = torch.nn.functional.normalize
    attention = (ATTENTION_SHARPNESS * unit(prompt, dim=-1) @ unit(tokens, dim=-1).T).softmax(-1)  # [T, n]
    text = PromptTokens(
        lengths=torch.tensor([count]),
        positions=(n + torch.arange(count))[None],
        after=torch.ones(1, count, dtype=torch.bool),
        embeddings=prompt[None],
        hidden=prompt[None],
        attention=attention[None],
        key_norms=prompt.abs().sum(-1)[None],
        normed=_rms_normed(prompt)[None],
    )
    available = {
        "attention": attention[-1],  # the last prompt token's row
        "prompt": text,
        "input_embeddings": originals,
        "key_norms": tokens.abs().sum(-1),
        "normed": _rms_normed(tokens),
        "step": step,
        "layer": layer,
        "origin": origin,
        "original_lengths": originals.shape[0],
        "positions": torch.arange(n),
    }
    wanted = set(LLM_KEYWORDS).union(*(NEED_KEYWORDS.get(need.value, ()) for need in pruner.needs))
    return {key: value for key, value in available.items() if key in wanted}


def standin_select(
    pruner: Any,
    features: torch.Tensor,
    layout: Layout,
    image_size: tuple[int, int] | None = None,
    window: int | None = None,
) -> Any:
    """``pruner``'s result on one image with :func:`standin_signals`; an llm-stage method runs every pruning layer
    on the tokens the previous one left (kept or merged), and its result is mapped back to the image's tokens
    (kept indices, or :class:`~mrprune.methods.results.MergedTokens` when some layer merged)."""
    from .methods.results import MergedTokens
    from .methods.stages import Stage

    if getattr(pruner, "stage", None) is not Stage.LLM:
        return pruner.select(features, layout, **standin_signals(pruner, features, layout, image_size, window))
    originals = features.float()
    tokens, prompt = originals, _standin_prompt(originals)
    total = originals.shape[0]
    source = torch.arange(total)  # each original token's current token, -1 once dropped
    weight = torch.ones(total)
    origin = torch.arange(total)  # each current token's representative among the original tokens
    merged = False
    for step, layer in enumerate(_llm_layers(pruner)):
        signals = _llm_signals(pruner, tokens, prompt, originals, step, layer, origin)
        result = pruner.select(tokens, layout if step == 0 else None, **signals)
        if isinstance(result, MergedTokens):
            merged = True
            to_new, weights, kept, tokens = result.sources, result.weights, result.kept, result.tokens.float()
        else:
            to_new = torch.full((tokens.shape[0],), -1, dtype=torch.int64)
            to_new[result] = torch.arange(result.numel())
            weights, kept, tokens = torch.ones(tokens.shape[0]), result, tokens[result]
        alive = source.clamp(min=0)
        source = torch.where(source >= 0, to_new[alive], -1)
        weight = torch.where(source >= 0, weight * weights[alive], 0.0)
        origin = origin[kept]
    if not merged:
        return origin
    return MergedTokens(tokens.to(features.dtype), origin, source, weight.float())


class StandinClip:
    """What ``mrprune viz`` gives TRIM for its CLIP model (TRIM has no preset: it needs the user's); the picture's
    CLIP embeddings are :func:`standin_signals`'."""

    def __repr__(self) -> str:
        return "stand-in CLIP"


def _standin_trim() -> Any:
    from .methods import TRIM

    return TRIM(clip=StandinClip())


#: Methods ``mrprune viz`` draws that have no preset, built with stand-ins.
STANDIN_METHODS = {"trim": _standin_trim}


def method_scores(
    pruner: Any,
    features: torch.Tensor,
    layout: Layout,
    kept: torch.Tensor,
    image_size: tuple[int, int] | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, str]:
    """Per-token scores to draw for ``pruner`` and a caption for them.

    Vision-stage methods: the stand-in encoder attention they ranked by (:func:`standin_signals`, with the image
    size for LLaVA-NeXT's crops). ``llm``-stage methods: the synthetic signal of their first pruning layer (DART:
    key norms; PDrop, FastV: the last prompt token's attention; SparseVLM: the prompt's attention, mean over text
    tokens).
    MR-Pruner / G-Prune: their graph score per resolution (``mrprune.graph_scores`` with the pruner's settings; for
    MR-Pruner's base view plus ``beta`` times the transfer from the high-resolution tokens it pruned). Other methods
    have no per-token score; their token norms are drawn. Newline tokens get NaN.
    """
    from . import ops
    from .methods import GPrune, MRPruner
    from .methods.stages import Need, Stage

    features = features.float()
    total = layout.num_tokens
    views, newlines = _views(layout, None)
    groups = {v.group: np.concatenate([w.indices().reshape(-1) for w in views if w.group == v.group]) for v in views}
    scores = torch.full((total,), math.nan)
    signals = standin_signals(pruner, features, layout, image_size, window)
    if Need.VISION_ATTENTION in pruner.needs:  # vision-stage methods: the (stand-in) encoder attention they rank by
        attention = next(iter(signals["attention"].values()))
        for index in groups.values():
            scores[index] = attention[index]
        return scores, "stand-in encoder attention (token norm per crop)"
    if getattr(pruner, "stage", None) is Stage.LLM:  # the synthetic signal of the first pruning layer
        if "key_norms" in signals:
            values, label = signals["key_norms"], "synthetic key L1 norm (first pruning layer)"
        elif "attention" in signals:
            values, label = signals["attention"], "synthetic last-prompt-token attention (first pruning layer)"
        else:
            values = signals["prompt"].attention[0].mean(0)
            label = "synthetic prompt attention, mean over text tokens (first pruning layer)"
        for index in groups.values():
            scores[index] = values[index]
        return scores, label
    if not isinstance(pruner, MRPruner | GPrune):
        norms = features.norm(dim=1)
        for index in groups.values():
            scores[index] = norms[index]
        return scores, "token norm"
    graph = dict(threshold=pruner.threshold, temperature=pruner.temperature, iterations=pruner.iterations)
    for index in groups.values():
        tokens = features[torch.from_numpy(index)][None]
        scores[index] = ops.graph_scores(tokens, torch.tensor([len(index)]), None, **graph)[0]
    label = f"graph score (t = {pruner.iterations})"
    if isinstance(pruner, MRPruner) and "high-res" in groups:
        low, high = torch.from_numpy(groups["base"]), torch.from_numpy(groups["high-res"])
        kept_mask = torch.zeros(total, dtype=torch.bool)
        kept_mask[kept] = True
        transfer = ops.transfer_scores(
            features[low][None],
            torch.tensor([len(low)]),
            features[high][None],
            ~kept_mask[high][None],
            None,
            pruner.cross_threshold,
            pruner.temperature,
        )[0]
        scores[low] = scores[low] + pruner.beta * transfer
        label = "graph score (+ beta x transfer on the base view)"
    return scores, label


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

LAYOUTS = ("llava_next", "llava15", "qwen")
_DEFAULT_FIT = {"llava_next": "stretch", "llava15": "crop", "qwen": "stretch"}
STANDIN_NOTE = (
    "Stand-in features: per-patch colour/gradient statistics under a fixed random projection, NOT CLIP / "
    "vision-tower features (pass --features for real ones)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mrprune viz`` (raises ImportError without Pillow: ``mrprune`` then reports viz unavailable)."""
    import PIL  # noqa: F401

    from .methods import PRESETS

    parser.add_argument(
        "--image",
        default="astronaut",
        help=f"an image file, or one of scikit-image's sample images {', '.join(SAMPLE_IMAGES)}",
    )
    parser.add_argument(
        "--method",
        default="mr_pruner_90",
        choices=sorted([*PRESETS, *STANDIN_METHODS]),
        help="a mrprune.preset name, or trim (TRIM with stand-in CLIP embeddings)",
    )
    parser.add_argument(
        "--layout",
        default="llava_next",
        choices=LAYOUTS,
        help="token layout: LLaVA-NeXT anyres (default pinpoints), LLaVA-1.5 24 x 24, Qwen2.5-VL",
    )
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--scores", action="store_true", help="draw the method's per-token scores as a heat map")
    parser.add_argument("--features", help="a torch.save()d [N, D] tensor (or dict with 'features') of real features")
    parser.add_argument(
        "--fit",
        choices=FITS,
        help="how the (base) grid covers the image; default stretch (llava_next, qwen), crop (llava15)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=1,
        help="qwen only: token frames of a synthetic video panning across the image (default 1)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=12845056,
        help="qwen only: the processor's max_pixels (the Qwen2.5-VL checkpoints' 12845056)",
    )
    parser.add_argument("--panel-height", type=int, default=320, help="height of each panel in pixels")
    parser.add_argument(
        "--colors",
        type=int,
        default=0,
        help="save as a palette PNG with this many colours (smaller files; 0: full colour)",
    )
    parser.add_argument("--dim", type=int, default=256, help="stand-in feature dimension")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stand-in projection")


def load_image(spec: str) -> tuple[Any, str]:
    """A scikit-image sample image by name, or an image file; returns ``(PIL image, name)``."""
    from pathlib import Path

    from PIL import Image

    if spec in SAMPLE_IMAGES:
        try:
            import skimage.data
        except ImportError as error:
            raise ValueError(f"--image {spec} needs scikit-image (pip install scikit-image)") from error
        return _to_pil(getattr(skimage.data, spec)()), spec
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--image: {spec!r} is neither a file nor one of {', '.join(SAMPLE_IMAGES)}")
    return Image.open(path).convert("RGB"), path.name


def _qwen_grid(height: int, width: int, max_pixels: int, min_pixels: int = 56 * 56, factor: int = 28) -> tuple:
    """The merged-token grid ``(rows, cols)`` of a Qwen2.5-VL image: the same rounding as transformers'
    ``smart_resize`` (sides to multiples of 28 px within ``[min_pixels, max_pixels]``), then 28 px per token."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h // factor, w // factor


def _pan(picture: Any, frames: int) -> list[Any]:
    """A synthetic video: a window of 3/4 of the width panning left to right across the image."""
    width, height = picture.size
    window = max(1, int(round(width * 0.75)))
    starts = np.linspace(0, width - window, frames).round().astype(int)
    return [picture.crop((int(s), 0, int(s) + window, height)) for s in starts]


def _load_features(path: str, total: int) -> torch.Tensor:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict):
        if "features" not in loaded:
            raise ValueError(f"--features {path}: a dict needs a 'features' entry, got keys {sorted(loaded)}")
        loaded = loaded["features"]
    if not isinstance(loaded, torch.Tensor) or loaded.dim() != 2 or loaded.shape[0] != total:
        raise ValueError(
            f"--features {path}: expected a [{total}, D] tensor for this layout, got {getattr(loaded, 'shape', loaded)}"
        )
    return loaded.float()


def run(args: argparse.Namespace) -> int:
    """``mrprune viz``: prune the image's tokens with a preset and save the picture. Returns the exit status."""
    from .methods import kept_indices, preset
    from .methods.stages import Need, Stage

    try:
        picture, name = load_image(args.image)
        width, height = picture.size
        fit = args.fit or _DEFAULT_FIT[args.layout]
        if args.frames < 1 or (args.frames > 1 and args.layout != "qwen"):
            raise ValueError("--frames must be >= 1, and above 1 only with --layout qwen")
        image: Any = picture
        if args.layout == "llava_next":
            layout = LlavaNextLayout.from_image_size((height, width))
            described = f"LLaVA-NeXT anyres ({height} x {width} image)"
        elif args.layout == "llava15":
            layout = GridLayout(1, 24, 24)
            described = f"LLaVA-1.5 24 x 24 ({height} x {width} image)"
        else:
            if args.frames > 1:
                image = _pan(picture, args.frames)
                width, height = image[0].size
            rows, cols = _qwen_grid(height, width, args.max_pixels)
            layout = GridLayout(args.frames, rows, cols)
            kind = f"video, {args.frames} token frames" if args.frames > 1 else "image"
            described = f"Qwen2.5-VL {kind} ({height} x {width} px, {rows} x {cols} merged tokens)"
        if args.features:
            features = _load_features(args.features, layout.num_tokens)
            note = None
        else:
            features = standin_features(image, layout, dim=args.dim, fit=fit, seed=args.seed)
            note = STANDIN_NOTE
        pruner = STANDIN_METHODS[args.method]() if args.method in STANDIN_METHODS else preset(args.method)
        size = (height, width) if args.layout == "llava_next" else None
        window = QWEN_WINDOW if args.layout == "qwen" else None  # a merging method merges within the tower's windows
        kept = standin_select(pruner, features, layout, size, window)
        synthetic = (
            SYNTHETIC_LLM_NOTE
            if pruner.stage is Stage.LLM
            else (QWEN_TOWER_NOTE if window else STANDIN_TOWER_NOTE)
            if Need.VISION_MERGE in pruner.needs
            else None
        )
        note = " ".join(text for text in (note, synthetic) if text) or None
        scores, label = method_scores(pruner, features, layout, kept, size, window) if args.scores else (None, "score")
        title = f"{args.method}: {pruner!r} on {name}, {described}"
        result = overlay(
            image,
            kept,
            layout,
            scores,
            fit=fit,
            title=title,
            note=note,
            score_label=label,
            panel_height=args.panel_height,
        )
    except ValueError as error:
        logger.error("mrprune viz: %s", error)
        return 2
    if args.colors:
        result = result.quantize(colors=args.colors, method=2, dither=0)
    result.save(args.out, optimize=True)
    logger.info(
        "mrprune viz: kept %d of %d tokens; wrote %s (%d x %d)",
        kept_indices(kept).numel(),
        layout.num_tokens,
        args.out,
        *result.size,
    )
    return 0
