"""The symmetric Triton kernels map their program id to a tile pair on the device (no table copied from the host)."""

from __future__ import annotations

import pytest
import torch

from tests.utils import triton_test


def _expected(tiles: int, first: int, count: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(tiles, tiles)  # row-major over the upper triangle
    pairs = torch.stack([rows, cols], dim=1).to(torch.int32)
    return pairs[first : first + count]


@triton_test
@pytest.mark.parametrize("tiles", [1, 2, 3, 7, 16, 45])
def test_every_pair_of_small_tilings(tiles):
    from mrprune.triton_kernels._common import num_tile_pairs, probe_tile_pairs

    total = num_tile_pairs(tiles)
    got = probe_tile_pairs(tiles, 0, count=1 << max(total - 1, 0).bit_length())[:total]
    torch.testing.assert_close(got, _expected(tiles, 0, total), rtol=0, atol=0)


@triton_test
@pytest.mark.parametrize("tiles", [1024, 4097, 16384])
def test_row_starts_of_large_tilings(tiles):
    """Around the starts of rows where the float32 square root rounds worst (large tile counts: N = 1M tokens at
    64-token tiles), and at the very end."""
    from mrprune.triton_kernels._common import num_tile_pairs, probe_tile_pairs

    starts = [0, tiles // 3, tiles // 2, tiles - 40]
    firsts = [max(r * tiles - r * (r - 1) // 2 - 8, 0) for r in starts] + [num_tile_pairs(tiles) - 16]
    for first in firsts:
        got = probe_tile_pairs(tiles, first, count=16)
        rows = []
        for p in range(first, first + 16):  # exact integer inversion of the row-start formula
            i = max(r for r in range(max(0, (p // tiles) - 2), tiles) if r * tiles - r * (r - 1) // 2 <= p)
            rows.append((i, i + p - (i * tiles - i * (i - 1) // 2)))
        torch.testing.assert_close(got, torch.tensor(rows, dtype=torch.int32), rtol=0, atol=0)
