"""Tests of the synthetic visual-token generators in :mod:`mrprune.testing`."""

from __future__ import annotations

import pytest
import torch

from mrprune.testing import (
    cosine_degree_stats,
    llava15_features,
    llava_next_features,
    pad_batch,
    qwen2_5_vl_features,
)

BASE = 576


def _split_next(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a LLaVA-NeXT token set into (base [576, D], high-res [rows * cols, D], newlines [rows, D])."""
    grid = x[BASE:].reshape(rows, cols + 1, x.shape[1])
    return x[:BASE], grid[:, :cols].reshape(rows * cols, -1), grid[:, cols]


@pytest.fixture(scope="module")
def next_full() -> torch.Tensor:
    """The default LLaVA-NeXT shape: 576 base tokens + 48 x (48 + 1) high-res tokens, D = 4096."""
    return llava_next_features(seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and layout


@pytest.mark.parametrize(("rows", "cols"), [(48, 48), (32, 48), (1, 1), (3, 7)])
def test_llava_next_shape_and_newlines(rows: int, cols: int) -> None:
    dim = 32
    x = llava_next_features(rows, cols, dim, seed=1)
    assert x.shape == (BASE + rows * (cols + 1), dim)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    newline_idx = BASE + torch.arange(rows) * (cols + 1) + cols
    newlines = x[newline_idx]
    assert torch.equal(newlines, newlines[:1].expand(rows, dim))  # one fixed vector
    _, high, split_newlines = _split_next(x, rows, cols)
    assert torch.equal(split_newlines, newlines)
    # No image token is the newline vector.
    assert not (torch.cat([x[:BASE], high]) == newlines[0]).all(dim=1).any()


def test_llava15_shape_and_base_view_consistency() -> None:
    x = llava15_features(64, seed=5)
    assert x.shape == (BASE, 64)
    # A LLaVA-1.5 image is the base view of the LLaVA-NeXT image with the same seed.
    assert torch.equal(x, llava_next_features(4, 4, 64, seed=5)[:BASE])


@pytest.mark.parametrize(("frames", "height", "width"), [(1, 32, 32), (3, 5, 7), (1, 1, 1)])
def test_qwen_shape(frames: int, height: int, width: int) -> None:
    x = qwen2_5_vl_features(frames, height, width, 48, seed=2)
    assert x.shape == (frames * height * width, 48)
    assert torch.isfinite(x).all()
    assert qwen2_5_vl_features().shape == (1024, 3584)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism, dtype and device


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: llava_next_features(6, 8, 64, seed=seed),
        lambda seed: llava15_features(64, seed=seed),
        lambda seed: qwen2_5_vl_features(2, 6, 6, 64, seed=seed),
    ],
    ids=["llava_next", "llava15", "qwen2_5_vl"],
)
def test_deterministic_per_seed(make) -> None:
    assert torch.equal(make(0), make(0))
    assert torch.equal(make(7), make(7))
    assert not torch.allclose(make(0), make(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_a_cast_of_float32(dtype: torch.dtype) -> None:
    ref = llava_next_features(4, 4, 64, seed=3)
    x = llava_next_features(4, 4, 64, seed=3, dtype=dtype)
    assert x.dtype == dtype
    assert torch.equal(x, ref.to(dtype))
    assert qwen2_5_vl_features(1, 4, 4, 64, dtype=dtype).dtype == dtype
    assert llava15_features(64, dtype=dtype).dtype == dtype


def test_device() -> None:
    ref = llava15_features(64, seed=4)
    assert torch.equal(llava15_features(64, seed=4, device=torch.device("cpu")), ref)
    meta = llava_next_features(2, 2, 8, device="meta", dtype=torch.float16)
    assert meta.device.type == "meta"
    assert meta.dtype == torch.float16
    assert meta.shape == (BASE + 2 * 3, 8)
    if torch.cuda.is_available():
        x = qwen2_5_vl_features(2, 4, 4, 64, seed=4, device="cuda")
        assert x.is_cuda
        assert torch.equal(x.cpu(), qwen2_5_vl_features(2, 4, 4, 64, seed=4))


# ----------------------------------------------------------------------------------------------------------------------
# Realism at the LLaVA-NeXT shape (D = 4096)


@pytest.mark.parametrize("part", ["base", "high"])
def test_degree_within_each_resolution(next_full: torch.Tensor, part: str) -> None:
    base, high, _ = _split_next(next_full, 48, 48)
    feats = base if part == "base" else high
    stats = cosine_degree_stats(feats, 0.5)
    assert 0.01 <= stats["mean_fraction"] <= 0.20, stats
    assert stats["std"] / stats["mean"] > 0.2, stats  # the degree varies across tokens
    assert stats["min"] >= 1  # self is always included
    assert stats["max"] <= feats.shape[0]


def test_cross_resolution_graph(next_full: torch.Tensor) -> None:
    base, high, _ = _split_next(next_full, 48, 48)
    b = base / base.norm(dim=1, keepdim=True)
    h = high / high.norm(dim=1, keepdim=True)
    sim = b @ h.T  # [576, 2304]
    has_edge = (sim >= 0.5).any(dim=1).float().mean().item()
    assert 0.20 <= has_edge <= 0.95, has_edge
    # Both views depict the same content: the best high-res match of a base token is usually nearby.
    best = sim.argmax(dim=1)
    iy, ix = torch.arange(BASE) // 24, torch.arange(BASE) % 24
    jy, jx = best // 48, best % 48
    dist = torch.hypot((iy + 0.5) / 24 - (jy + 0.5) / 48, (ix + 0.5) / 24 - (jx + 0.5) / 48)
    assert dist.median() < 0.15, dist.median()


def test_outliers(next_full: torch.Tensor) -> None:
    base, high, _ = _split_next(next_full, 48, 48)
    for feats in (base, high):
        norms = feats.norm(dim=1)
        median = norms.median()
        assert norms.max() / median > 4
        assert norms.max() / median <= 10.5
        count = int((norms > 4 * median).sum())
        assert count == round(0.005 * feats.shape[0])  # ~0.5 % of the tokens: 3 and 12


def test_mean_direction(next_full: torch.Tensor) -> None:
    x = next_full / next_full.norm(dim=1, keepdim=True)
    n = x.shape[0]
    mean_pairwise = (x.sum(dim=0).square().sum() - n) / (n * (n - 1))  # mean of cos(x_i, x_j) over i != j
    assert mean_pairwise > 0.1
    # All tokens (newlines included) have a positive cosine with the common mean vector.
    common = x.mean(dim=0)
    assert (x @ common > 0).all()


def test_other_shapes_are_non_trivial() -> None:
    for feats in (llava15_features(seed=1), qwen2_5_vl_features(1, 32, 32, 3584, seed=1)):
        stats = cosine_degree_stats(feats)
        assert 0.01 <= stats["mean_fraction"] <= 0.20, stats
        assert stats["std"] / stats["mean"] > 0.2, stats


def test_qwen_temporal_correlation() -> None:
    x = qwen2_5_vl_features(4, 12, 12, 512, seed=0).reshape(4, 144, 512)

    def frame_cos(s: int, t: int) -> float:
        return torch.nn.functional.cosine_similarity(x[s], x[t], dim=1).mean().item()

    first_last = frame_cos(0, 3)
    for t in range(3):
        assert frame_cos(t, t + 1) > first_last + 0.05
    assert frame_cos(0, 1) > 0.7  # consecutive frames are strongly correlated


# ----------------------------------------------------------------------------------------------------------------------
# pad_batch


def test_pad_batch() -> None:
    items = [torch.randn(3, 4), torch.randn(5, 4), torch.randn(0, 4)]
    batch, lengths = pad_batch(items, pad_value=-1.5)
    assert batch.shape == (3, 5, 4)
    assert lengths.dtype == torch.int64
    assert lengths.tolist() == [3, 5, 0]
    for i, item in enumerate(items):
        assert torch.equal(batch[i, : len(item)], item)
        assert (batch[i, len(item) :] == -1.5).all()
    half, _ = pad_batch([x.half() for x in items])
    assert half.dtype == torch.float16
    assert (half[0, 3:] == 0).all()
    single, single_len = pad_batch([items[0]])
    assert torch.equal(single[0], items[0])
    assert single_len.tolist() == [3]


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([], "empty"),
        ([torch.zeros(3)], "2-D"),
        ([torch.zeros(2, 3), torch.zeros(1, 2, 3)], "2-D"),
        ([torch.zeros(2, 3), torch.zeros(2, 4)], "feature dim"),
        ([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16)], "dtype"),
        ([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], "device"),
    ],
    ids=["empty", "1d", "3d", "dim", "dtype", "device"],
)
def test_pad_batch_errors(items: list[torch.Tensor], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pad_batch(items)


# ----------------------------------------------------------------------------------------------------------------------
# cosine_degree_stats


def test_cosine_degree_stats_small_example() -> None:
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float16)
    stats = cosine_degree_stats(feats, 0.5)
    degrees = torch.tensor([2.0, 2.0, 1.0, 1.0])
    assert stats["mean"] == pytest.approx(1.5)
    assert stats["min"] == 1
    assert stats["max"] == 2
    assert stats["std"] == pytest.approx(degrees.std(unbiased=False).item())
    assert stats["mean_fraction"] == pytest.approx(1.5 / 4)
    assert cosine_degree_stats(feats, -1.0)["mean_fraction"] == pytest.approx(1.0)


def test_cosine_degree_stats_chunking() -> None:
    feats = qwen2_5_vl_features(1, 10, 10, 64, seed=3)
    assert cosine_degree_stats(feats, chunk=7) == cosine_degree_stats(feats)


def test_cosine_degree_stats_errors() -> None:
    with pytest.raises(ValueError, match="N, D"):
        cosine_degree_stats(torch.zeros(4))
    with pytest.raises(ValueError, match="N, D"):
        cosine_degree_stats(torch.zeros(0, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: llava_next_features(0, 4), "rows"),
        (lambda: llava_next_features(4, -1), "cols"),
        (lambda: llava_next_features(4, 4, 0), "dim"),
        (lambda: llava_next_features(2.5, 4), "rows"),
        (lambda: llava_next_features(True, 4), "rows"),
        (lambda: llava15_features(0), "dim"),
        (lambda: qwen2_5_vl_features(0), "frames"),
        (lambda: qwen2_5_vl_features(1, 0, 4), "height"),
        (lambda: qwen2_5_vl_features(1, 4, 0), "width"),
        (lambda: qwen2_5_vl_features(1, 4, 4, -3), "dim"),
    ],
)
def test_bad_arguments(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()
