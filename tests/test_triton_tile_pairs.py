"""The symmetric Triton kernels map their program id to a tile pair on the device (no table copied from the host), in
banded order: bands of ``group`` tile rows, column by column within a band (``group = 1``: row-major)."""

from __future__ import annotations

import bisect

import pytest

from tests.utils import triton_test


def _expected(tiles: int, group: int) -> list[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i <= j``, in banded order, enumerated by loops."""
    pairs = []
    for i0 in range(0, tiles, group):
        rows = range(i0, min(i0 + group, tiles))
        pairs += [(i, j) for j in range(i0, tiles) for i in rows if i <= j]
    return pairs


@triton_test
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("tiles", [1, 2, 3, 7, 8, 16, 45])
def test_every_pair_of_small_tilings(tiles, group):
    from mrprune.triton_kernels._common import num_tile_pairs, probe_tile_pairs

    total = num_tile_pairs(tiles)
    got = probe_tile_pairs(tiles, 0, count=1 << max(total - 1, 0).bit_length(), group=group)[:total]
    assert got.tolist() == [list(p) for p in _expected(tiles, group)]


@triton_test
@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("tiles", [1024, 4097, 16384])
def test_band_starts_of_large_tilings(tiles, group):
    """Around the starts of bands where the float32 square roots round worst (large tile counts: N = 1M tokens at
    64-token tiles), inside a band's triangle, and at the very end."""
    from mrprune.triton_kernels._common import num_tile_pairs, probe_tile_pairs

    bands = -(-tiles // group)
    starts_of = [0]  # pairs before each band, summed band by band (exact)
    for b in range(bands):
        rows = min(group, tiles - b * group)
        starts_of.append(starts_of[-1] + rows * (rows + 1) // 2 + rows * (tiles - b * group - rows))

    def band_start(g: int) -> int:
        return starts_of[g]

    starts = [0, bands // 3, bands // 2, bands - 2, bands - 1]
    last = num_tile_pairs(tiles) - 16
    firsts = [min(max(band_start(g) - 8, 0), last) for g in starts] + [band_start(bands // 2) + 20, last]
    for first in firsts:
        got = probe_tile_pairs(tiles, first, count=16, group=group).tolist()
        want = []
        for p in range(first, first + 16):
            g = bisect.bisect_right(starts_of, p) - 1
            q, i0 = p - band_start(g), g * group
            rows = min(group, tiles - i0)
            column = max(c for c in range(rows) if c * (c + 1) // 2 <= q) if q < rows * (rows + 1) // 2 else None
            if column is not None:
                want.append([i0 + q - column * (column + 1) // 2, i0 + column])
            else:
                rest = q - rows * (rows + 1) // 2
                want.append([i0 + rest % group, i0 + group + rest // group])
        assert got == want, (first, [(a, b) for a, b in zip(got, want, strict=True) if a != b][:3])
