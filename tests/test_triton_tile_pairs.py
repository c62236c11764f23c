"""The symmetric Triton kernels map their program id to a tile pair on the device (no table copied from the host), in
banded order: bands of ``group`` tile rows, column by column within a band (``group = 1``: row-major)."""

from __future__ import annotations

import bisect

import pytest

from tests.utils import TRITON_DEVICE, triton_test


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


# --- persistent programs: a fixed grid, each program looping over (item, pair) work items ---------------------------


@triton_test
@pytest.mark.parametrize(
    ("lengths", "tokens", "programs"),
    [
        ([40, 17], 40, 3),  # ragged: the second item's pairs right of its tokens are dead
        ([150, 0, 70], 150, 4),  # 10 tiles (a full band of 8, a partial one of 2), N not a multiple of the tile
        ([304], 304, 7),  # 19 tiles, 190 pairs: 27 or 28 work items per program
        ([33], 33, 1),  # one program does everything
        ([20, 20], 20, 7),  # more programs than work items: the extra ones do nothing
    ],
)
def test_persistent_programs_visit_every_item_once(lengths, tokens, programs):
    """Program ``w mod programs`` visits work item ``w = b * pairs + p`` (item-major, banded pair ``p``) exactly once,
    and no work item past ``B * pairs``; ``live`` says whether the pair touches the item's tokens."""
    from mrprune.triton_kernels._common import TILE_GROUP, probe_work_items

    block = 16
    pairs = _expected(-(-tokens // block), TILE_GROUP.value)
    want = [
        [1, (b * len(pairs) + p) % programs, b, i, j, int(j * block < n)]
        for b, n in enumerate(lengths)
        for p, (i, j) in enumerate(pairs)
    ]
    got = probe_work_items(lengths, tokens, block, programs, device=TRITON_DEVICE).tolist()
    assert got[-1] == [0, -1, -1, -1, -1, -1], "work items past the end were visited"
    bad = [(w, g, e) for w, (g, e) in enumerate(zip(got[:-1], want, strict=True)) if g != e]
    assert not bad, f"{len(bad)} of {len(want)} work items wrong, e.g. (w, got, want) {bad[:3]}"


def test_pair_grid_choice(monkeypatch):
    """One program per pair and item unless the work items exceed PERSISTENT_MIN_WAVES waves of the persistent grid
    (``auto``), or as ``MRPRUNE_TRITON_PERSISTENT`` or the caller says; never more programs than work items; an H200's
    132 SMs go persistent at video sizes only."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    import torch
    from mrprune.triton_kernels import _common
    from mrprune.triton_kernels._common import pair_grid

    cpu = torch.empty(0)
    monkeypatch.setattr(_common, "persistent_programs", lambda t: 3)
    monkeypatch.delenv("MRPRUNE_TRITON_PERSISTENT", raising=False)
    assert pair_grid(1, 4, cpu) == ((10, 1), False)  # 10 items <= 4 waves of 3 programs
    assert pair_grid(2, 4, cpu) == ((3,), True)
    assert pair_grid(2, 4, cpu, persistent=False) == ((10, 2), False)
    assert pair_grid(1, 1, cpu, persistent=True) == ((1,), True)  # one item: one program
    assert pair_grid(0, 4, cpu, persistent=True) == ((10, 0), False)  # nothing to do
    monkeypatch.setenv("MRPRUNE_TRITON_PERSISTENT", "1")
    assert pair_grid(1, 2, cpu) == ((3,), True)
    assert pair_grid(1, 2, cpu, persistent=False) == ((3, 1), False)
    monkeypatch.setenv("MRPRUNE_TRITON_PERSISTENT", "0")
    assert pair_grid(8, 64, cpu) == ((2080, 8), False)
    monkeypatch.setenv("MRPRUNE_TRITON_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="MRPRUNE_TRITON_PERSISTENT"):
        pair_grid(1, 2, cpu)
    monkeypatch.undo()
    # on a GPU: PROGRAMS_PER_SM programs per SM (a stand-in tensor on a 132-SM device)
    monkeypatch.delenv("MRPRUNE_TRITON_PERSISTENT", raising=False)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_sm_count", lambda index: 132)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    programs = 132 * _common.PROGRAMS_PER_SM
    assert _common.persistent_programs(gpu) == programs
    assert pair_grid(1, 18, gpu) == ((171, 1), False)  # LLaVA-NeXT high-res view, 128-token tiles
    assert pair_grid(1, 512, gpu) == ((programs,), True)  # N = 64k, 128-token tiles: 131,328 pairs
