"""Synthetic, LLaVA-like visual-token features for tests and benchmarks.

Random Gaussian tokens in thousands of dimensions are almost exactly orthogonal, so the cosine-similarity graph that
token-pruning methods build (edge iff ``cos(x_i, x_j) >= 0.5``) is empty on them, unlike on real vision-encoder
outputs.  The generators here mimic the structure that matters for such graphs:

* **Spatially correlated patches.**  One continuous random field over the image plane ``[0, 1]^2`` is built from
  random ``dim``-dimensional vectors on three coarse grids (octaves), interpolated with a smoothstep-faded bilinear
  kernel, and sampled at the patch centres of every view.  Neighbouring patches are similar, far ones less, and the
  low-resolution and high-resolution views of one image depict the same content.
* **Textured and smooth regions.**  A scalar "texture" field scales the fine octave and the per-token noise, so the
  number of similar tokens varies strongly across the image.
* **A shared mean direction.**  Every token has a positive component along one common unit vector (at realistic
  ``dim``), as real projector outputs do, so the mean pairwise cosine is clearly positive (about 0.2).
* **High-norm outliers.**  About 0.5 % of the tokens of each view (random positions; none in views of fewer than 100
  tokens) get 5-10x the median norm and point mostly along one shared "register" direction, like the artefact tokens
  of CLIP/LLaVA features.
* **Newline tokens** (LLaVA-NeXT): one fixed vector, with the median norm, repeated after every high-resolution row.
* **Temporal drift** (Qwen2.5-VL video): all random ingredients (grids, texture, per-token noise) follow an AR(1)
  process over frames with correlation 0.9 per frame.

The typical token norm is of order 1 (median about 2); only directions matter for cosine graphs.  Everything is
generated in float32 on the CPU from a seeded :class:`torch.Generator` (so results are deterministic and
device-independent) and cast to the requested dtype and device at the end.  A LLaVA-1.5 image is exactly the base view
of the LLaVA-NeXT image with the same seed.  The whole LLaVA-NeXT image at ``dim = 4096`` takes well under a second.
"""

from __future__ import annotations

import logging
import math

import torch

from .batching import pad_batch

__all__ = [
    "cosine_degree_stats",
    "llava15_features",
    "llava_next_features",
    "pad_batch",
    "qwen2_5_vl_features",
]

logger = logging.getLogger(__name__)

_BASE_SIDE = 24  # LLaVA-1.5 / LLaVA-NeXT base view: 336 px / 14 px patches.

# Field parameters (tuned so that the cosine graph at threshold 0.5 has a mean degree of a few % of N).
_OCTAVES = ((3, 1.0), (6, 0.7), (12, 0.5))  # (cells per side, amplitude); the last one is the "fine" octave.
_TEXTURE_CELLS = 3  # cells per side of the scalar texture field.
_TEXTURE_GAIN = 3.0  # sharpness of the smooth/textured transition.
_TEXTURE_QUANTILE = 0.5  # about 1 - this share of the image is textured.
_TEXTURE_REFERENCE = 64  # side of the raster on which the texture quantile is measured.
_DETAIL_RANGE = (0.15, 2.2)  # multiplier of the fine octave and the noise, from smooth to textured regions.
_NOISE = 1.1  # per-token noise amplitude (relative to one octave of unit amplitude).
_MEAN_WEIGHT = 0.8  # component along the shared mean direction (relative to one octave of unit amplitude).
_OUTLIER_FRACTION = 0.005
_OUTLIER_NORM = (5.0, 10.0)  # outlier norm as a multiple of the median token norm.
_OUTLIER_OWN = 0.5  # weight of the token's own direction in an outlier (the shared direction has weight 1).
_TEMPORAL_RHO = 0.9  # AR(1) correlation of all random ingredients between consecutive frames.


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _interp_weights(n: int, cells: int, offset: float) -> torch.Tensor:
    """Weights ``[n, cells + 2]`` that interpolate a 1-D grid at the ``n`` patch centres ``(i + 0.5) / n``.

    The grid node ``k`` sits at image coordinate ``(k - offset) / cells``; ``offset`` in ``[0, 1)`` shifts the grid so
    that it does not line up with the patches.  Rows are L2-normalised, so an interpolated field of i.i.d. unit-variance
    node values has unit variance everywhere.
    """
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n * cells + offset
    lo = u.floor().clamp(max=cells).long()
    f = u - lo
    f = f * f * (3.0 - 2.0 * f)  # smoothstep fade: the field is C1 across cell borders.
    w = torch.zeros(n, cells + 2)
    w[torch.arange(n), lo] = 1.0 - f
    w[torch.arange(n), lo + 1] = f
    return w / w.norm(dim=1, keepdim=True)


def _weights(rows: int, cols: int, cells: int, offsets: list[float]) -> torch.Tensor:
    """Weights ``[rows * cols, (cells + 2) ** 2]`` interpolating a 2-D node grid at the centres of a raster."""
    return torch.kron(_interp_weights(rows, cells, offsets[0]), _interp_weights(cols, cells, offsets[1]))


def _sample(rows: int, cols: int, cells: int, offsets: list[float], grids: torch.Tensor) -> torch.Tensor:
    """Interpolate node values ``[T, (cells + 2) ** 2, C]`` at the centres of a raster: ``[T, rows * cols, C]``."""
    return torch.matmul(_weights(rows, cols, cells, offsets), grids)


def _ar_normal(frames: int, nodes: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Draw standard normal samples ``[frames, nodes, dim]``: i.i.d. within a frame, AR(1)-correlated across frames."""
    z = torch.randn(frames, nodes, dim, generator=gen)
    for t in range(1, frames):
        z[t] = _TEMPORAL_RHO * z[t - 1] + math.sqrt(1.0 - _TEMPORAL_RHO**2) * z[t]
    return z


def _field_views(
    views: list[tuple[int, int]], dim: int, *, frames: int = 1, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample one random field at the patch centres of several views of the same image (or video).

    Parameters
    ----------
    views : list of (int, int)
        ``(rows, cols)`` of each view's patch grid; every view covers the whole image plane ``[0, 1]^2``.
    dim : int
        Feature dimension ``D``.
    frames : int, optional
        Number of frames ``T``; the field drifts slowly from frame to frame.
    seed : int, optional
        Seed of the CPU :class:`torch.Generator`.

    Returns
    -------
    features : list of torch.Tensor
        One float32 CPU tensor ``[T * rows * cols, D]`` per view, in ``(t, row, col)`` raster order.
    extra : torch.Tensor
        A fixed float32 vector ``[D]`` with the median token norm (used as the LLaVA-NeXT newline token).
    """
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(dim)  # makes the typical token norm O(1).
    mean_dir, outlier_dir, extra_dir = _unit(torch.randn(3, dim, generator=gen))
    offsets = [torch.rand(2, generator=gen).tolist() for _ in _OCTAVES]
    # Every vector-valued part of a token is one matmul: [interpolation weights | 1] @ [octave nodes ; mean vector].
    nodes = [_ar_normal(frames, (cells + 2) ** 2, dim, gen) for cells, _ in _OCTAVES]
    nodes = torch.cat([*nodes, _MEAN_WEIGHT * math.sqrt(dim) * mean_dir.expand(frames, 1, dim)], dim=1)
    texture = (
        _TEXTURE_CELLS,
        torch.rand(2, generator=gen).tolist(),
        _ar_normal(frames, (_TEXTURE_CELLS + 2) ** 2, 1, gen),
    )
    # Standardise the texture field by its quantile on a dense reference raster, so that every image (and every view
    # of it) has about the same share of textured area.
    reference = _sample(_TEXTURE_REFERENCE, _TEXTURE_REFERENCE, *texture)  # [T, n_ref, 1]
    tex_center = reference.quantile(_TEXTURE_QUANTILE, dim=1, keepdim=True)
    tex_spread = reference.std(dim=1, keepdim=True)

    features = []
    medians = []
    for rows, cols in views:
        n = rows * cols
        tex = torch.sigmoid(_TEXTURE_GAIN * (_sample(rows, cols, *texture) - tex_center) / tex_spread)  # [T, n, 1]
        detail = scale * (_DETAIL_RANGE[0] + (_DETAIL_RANGE[1] - _DETAIL_RANGE[0]) * tex)  # smooth -> textured
        weights = [
            scale * amp * _weights(rows, cols, cells, off) for (cells, amp), off in zip(_OCTAVES, offsets, strict=True)
        ]
        weights = [w.expand(frames, n, -1) for w in weights[:-1]] + [weights[-1] * detail]  # fine octave: like noise
        weights = torch.cat([*weights, torch.full((frames, n, 1), scale)], dim=2)
        x = torch.bmm(weights, nodes)
        x.addcmul_(detail, _ar_normal(frames, n, dim, gen), value=_NOISE)  # per-token noise, also drifting slowly
        x = x.reshape(frames * n, dim)

        norms = x.norm(dim=1)
        median = norms.median()
        medians.append(median)
        k = round(_OUTLIER_FRACTION * x.shape[0])  # views with < 100 tokens have none
        idx = torch.randperm(x.shape[0], generator=gen)[:k]
        factor = _OUTLIER_NORM[0] + (_OUTLIER_NORM[1] - _OUTLIER_NORM[0]) * torch.rand(k, 1, generator=gen)
        x[idx] = factor * median * _unit(outlier_dir + _OUTLIER_OWN * _unit(x[idx]))
        features.append(x)
        logger.debug("view %dx%d (x%d frames): %d outlier tokens at %s", rows, cols, frames, k, idx.tolist())
    extra = torch.stack(medians).median() * _unit(extra_dir + _MEAN_WEIGHT * mean_dir)
    return features, extra


def llava_next_features(
    rows: int = 48,
    cols: int = 48,
    dim: int = 4096,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Synthetic visual tokens of one LLaVA-NeXT "anyres" image.

    Index layout: ``0 .. 575`` is the base view (24 x 24 raster, row-major); then the high-resolution grid row-major
    with one newline token after each row: token ``(r, c)`` is at ``576 + r * (cols + 1) + c`` and the newline of row
    ``r`` at ``576 + r * (cols + 1) + cols``.  All newline tokens are the same vector.

    Parameters
    ----------
    rows, cols : int, optional
        High-resolution patch grid (>= 1 each).  ``rows = cols = 48`` is a square 672 x 672 image on the 2 x 2 grid;
        e.g. ``32 x 48`` is a 4:3 image after unpadding.  Both views cover the same image content.
    dim : int, optional
        Feature dimension ``D`` (>= 1).
    seed : int, optional
        Random seed; the output is a deterministic function of all arguments except ``device``.
    dtype : torch.dtype, optional
        Output dtype (generation is in float32).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    torch.Tensor
        ``[576 + rows * (cols + 1), dim]`` tensor of ``dtype`` on ``device``.
    """
    _check_positive(rows=rows, cols=cols, dim=dim)
    (base, high), newline = _field_views([(_BASE_SIDE, _BASE_SIDE), (rows, cols)], dim, seed=seed)
    high = torch.cat([high.reshape(rows, cols, dim), newline.expand(rows, 1, dim)], dim=1).reshape(-1, dim)
    return torch.cat([base, high]).to(device=device, dtype=dtype)


def llava15_features(
    dim: int = 4096, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Synthetic visual tokens of one LLaVA-1.5 image.

    Parameters
    ----------
    dim : int, optional
        Feature dimension ``D`` (>= 1).
    seed : int, optional
        Random seed.
    dtype : torch.dtype, optional
        Output dtype (generation is in float32).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    torch.Tensor
        ``[576, dim]`` tensor of ``dtype`` on ``device``: a 24 x 24 patch raster, row-major.
    """
    _check_positive(dim=dim)
    (x,), _ = _field_views([(_BASE_SIDE, _BASE_SIDE)], dim, seed=seed)
    return x.to(device=device, dtype=dtype)


def qwen2_5_vl_features(
    frames: int = 1,
    height: int = 32,
    width: int = 32,
    dim: int = 3584,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Synthetic visual tokens of one Qwen2.5-VL image or video (tokens after the 2 x 2 patch merge).

    Consecutive frames are strongly correlated (the field, the texture and the per-token noise drift slowly: AR(1)
    with correlation 0.9 per frame), so a video has temporal redundancy.  ``frames = 1`` is a still image.

    Parameters
    ----------
    frames : int, optional
        Number of (merged) frames ``T`` (>= 1).
    height, width : int, optional
        Merged token grid per frame (>= 1 each).
    dim : int, optional
        Feature dimension ``D`` (>= 1).
    seed : int, optional
        Random seed.
    dtype : torch.dtype, optional
        Output dtype (generation is in float32).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    torch.Tensor
        ``[frames * height * width, dim]`` tensor of ``dtype`` on ``device`` in ``(t, h, w)`` raster order.
    """
    _check_positive(frames=frames, height=height, width=width, dim=dim)
    (x,), _ = _field_views([(height, width)], dim, frames=frames, seed=seed)
    return x.to(device=device, dtype=dtype)


def cosine_degree_stats(features: torch.Tensor, threshold: float = 0.5, *, chunk: int = 1024) -> dict[str, float]:
    """Degree statistics of the cosine-similarity graph of a token set.

    The degree of token ``i`` is the number of ``j`` (``i`` itself included) with ``cos(x_i, x_j) >= threshold``.
    Computed in float32 with plain torch ops, ``chunk`` rows at a time (``N = 36,864`` fits in memory).  Zero rows
    have cosine 0 with everything (and 0 with themselves).

    Parameters
    ----------
    features : torch.Tensor
        ``[N, D]`` features, any floating dtype, any device.
    threshold : float, optional
        Edge threshold on the cosine similarity.
    chunk : int, optional
        Rows per block of the similarity matrix.

    Returns
    -------
    dict of str to float
        ``mean``, ``min``, ``max``, ``std`` (population) of the degree, and ``mean_fraction`` = ``mean / N``.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D] tensor, got shape {tuple(features.shape)}")
    _check_positive(chunk=chunk)
    x = features.float()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    degree = torch.cat([(x[i : i + chunk] @ x.T >= threshold).sum(dim=1) for i in range(0, x.shape[0], chunk)]).double()
    mean = degree.mean().item()
    return {
        "mean": mean,
        "min": degree.min().item(),
        "max": degree.max().item(),
        "std": degree.std(unbiased=False).item(),
        "mean_fraction": mean / x.shape[0],
    }
