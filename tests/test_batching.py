"""pad_batch (mrprune/batching.py) and the host-side finite scan (mrprune/_validation.finite): the cheap paths added
for issue 15 (no copy when nothing needs padding; one min/max pass instead of an infinity norm) keep their
contracts."""

from __future__ import annotations

import pytest
import torch

from mrprune import _validation
from mrprune.batching import HUGE_PAGE_GATHER_BYTES, gather_rows, pad_batch


def test_single_item_is_a_view():
    x = torch.randn(7, 5)
    batch, lengths = pad_batch([x])
    assert batch.shape == (1, 7, 5) and lengths.tolist() == [7]
    assert batch.data_ptr() == x.data_ptr()  # no copy
    assert torch.equal(batch[0], x)


def test_equal_lengths_stack():
    items = [torch.randn(4, 3), torch.randn(4, 3)]
    batch, lengths = pad_batch(items, pad_value=float("nan"))
    assert lengths.tolist() == [4, 4]
    assert torch.equal(batch, torch.stack(items))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_rows_padded_with_the_value(dtype):
    items = [torch.randn(2, 3).to(dtype), torch.randn(5, 3).to(dtype), torch.zeros(0, 3, dtype=dtype)]
    batch, lengths = pad_batch(items, pad_value=-7.0)
    assert batch.dtype == dtype and batch.shape == (3, 5, 3) and lengths.tolist() == [2, 5, 0]
    for i, item in enumerate(items):
        assert torch.equal(batch[i, : item.shape[0]], item)
        assert bool((batch[i, item.shape[0] :] == -7.0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 4097, -1])
def test_finite_finds_one_bad_value_anywhere(dtype, bad, where):
    """One NaN/Inf anywhere (first, middle, last element; next to large values of either sign) is reported."""
    x = torch.randn(1, 40, 4096).to(dtype)
    x[0, 3, 0], x[0, 5, 1] = -100.0, 100.0  # the finite extremes both sides of the bad value
    x.view(-1)[where] = bad
    with pytest.raises(ValueError, match=r"mrprune\.op: features contains NaN or Inf"):
        _validation.finite("op", "features", x, vectors=True)


def test_finite_bound_on_either_sign():
    x = torch.zeros(1, 2, 4)
    bound = _validation.max_abs_for_norms(torch.float32, 4)
    _validation.finite("op", "features", x + bound / 2, vectors=True)
    for value in (2 * bound, -2 * bound):
        y = x.clone()
        y[0, 1, 2] = value
        with pytest.raises(ValueError, match="squared norms could overflow"):
            _validation.finite("op", "features", y, vectors=True)


def test_scan_once_rescans_a_tensor_modified_in_place():
    """Within scan_once a tensor object is scanned once, until it changes: a NaN written in place is still found."""
    x = torch.randn(1, 8, 16)
    calls = []
    original = torch.aminmax

    def counting(t):
        calls.append(t)
        return original(t)

    with _validation.scan_once():
        torch.aminmax = counting
        try:
            _validation.finite("op", "features", x)
            _validation.finite("op", "features", x, vectors=True)
            assert len(calls) == 1  # the second check reuses the first scan
            x[0, 2, 3] = float("nan")
            with pytest.raises(ValueError, match="NaN or Inf"):
                _validation.finite("op", "features", x)
            y = x[:, :4]  # another tensor object (a view): scanned on its own
            with pytest.raises(ValueError, match="NaN or Inf"):
                _validation.finite("op", "features", y)
        finally:
            torch.aminmax = original
    assert _validation._scanned.get() is None


@pytest.mark.parametrize("padded", [False, True])
def test_method_norms_vouch_for_unpadded_features(padded):
    """MR-Pruner's budget norms already prove every row finite: its ops read unpadded features for NaN/Inf no second
    time; padded ones (the norms skip padding, the ops' scan does not) are still scanned. A NaN is still found."""
    from mrprune.layouts import LlavaNextLayout
    from mrprune.methods import MRPruner
    from mrprune.testing import llava_next_features

    grids = [(4, 4), (4, 3)] if padded else [(4, 4)]  # two image sizes: the smaller one's high-res tokens are padded
    items = [llava_next_features(*grid, 32, seed=1) for grid in grids]
    features = torch.zeros(len(items), max(len(x) for x in items), 32)
    for b, x in enumerate(items):
        features[b, : len(x)] = x
    lengths = torch.tensor([len(x) for x in items])
    layouts = [LlavaNextLayout(*grid) for grid in grids]
    calls = []
    original = torch.aminmax

    def counting(t):
        calls.append(t)
        return original(t)

    torch.aminmax = counting
    try:
        MRPruner(keep_ratio=0.5).select_batch(features, layouts, lengths)
        scanned = len(calls)
        features[0, 577, 0] = float("nan")  # a high-resolution token
        with pytest.raises(ValueError, match="NaN or Inf"):
            MRPruner(keep_ratio=0.5).select_batch(features, layouts, lengths)
    finally:
        torch.aminmax = original
    assert scanned == (1 if padded else 0)  # padded: the high-resolution tokens only


@pytest.mark.parametrize("method", ["MRPruner", "GPrune"])
def test_nan_in_a_newline_token_raises(method, monkeypatch):
    """Newline tokens are kept without being scored (no op and no budget norm reads them), yet a NaN there is found
    like anywhere else; MRPRUNE_CHECK_FINITE=0 turns the check off (and the newline is still kept)."""
    from mrprune import methods
    from mrprune.layouts import LlavaNextLayout
    from mrprune.testing import llava_next_features

    layout = LlavaNextLayout(4, 4)
    features = llava_next_features(4, 4, 32, seed=2)[None].clone()
    newline = int(layout.newline_indices[1])
    features[0, newline, 5] = float("nan")
    lengths = torch.tensor([features.shape[1]])
    pruner = getattr(methods, method)(keep_ratio=0.5)
    with pytest.raises(ValueError, match=f"mrprune.{method}: features contain NaN or Inf"):
        pruner.select_batch(features, [layout], lengths)
    monkeypatch.setenv("MRPRUNE_CHECK_FINITE", "0")
    kept = pruner.select_batch(features, [layout], lengths)  # one kept-index tensor per image
    assert newline in kept[0].tolist()


def test_scan_once_takes_inference_tensors():
    with torch.inference_mode():
        x = torch.randn(1, 4, 8)
        with _validation.scan_once():
            _validation.finite("op", "features", x)
            _validation.finite("op", "features", x)  # inference tensors keep no version count: the memo still works
            with pytest.raises(ValueError, match="NaN or Inf"):
                _validation.finite("op", "features", torch.full((1, 2, 2), float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 2304])
def test_gather_rows_equals_index_select(dtype, rows):
    """Small gathers and large ones (on huge pages where the system allows) equal index_select."""
    x = torch.randn(2 * rows + 5, 4096).to(dtype)
    index = torch.randperm(x.shape[0])[:rows]
    got = gather_rows(x, index)
    assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, x.index_select(0, index))
    assert (got.nbytes >= HUGE_PAGE_GATHER_BYTES) == (rows == 2304 and dtype == torch.float32)
