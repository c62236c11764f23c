"""Dispatch that survives a failing kernel backend: warn once, demote the backend for the process, right result."""

from __future__ import annotations

import warnings

import pytest
import torch

import mrprune
from mrprune import backends, reference
from tests.utils import TRITON_DEVICE, assert_close


@pytest.fixture
def fallback(monkeypatch):
    """Fallback on (the test session turns it off), and no demotion leaks into other tests."""
    monkeypatch.setenv("MRPRUNE_FALLBACK", "1")
    monkeypatch.delenv("MRPRUNE_BACKEND", raising=False)
    backends.reset_demotions()
    yield
    backends.reset_demotions()


def _graph_inputs():
    x = torch.randn(2, 40, 16)
    return x, torch.tensor([40, 27])


def _failing(name: str):
    calls = []

    def impl(*args):
        calls.append(args)
        raise RuntimeError(f"{name} compile failed\nptxas fatal: something long\n  (a compiler traceback)")

    return impl, calls


def test_failing_backend_is_demoted_once_with_one_warning(monkeypatch, fallback):
    """The auto-chosen backend raises at 'launch': the call still returns the reference's result, one warning names
    the op, the backend and the replacement, and later calls go straight to the next backend."""
    x, lens = _graph_inputs()
    first = backends.available("graph_scores", "cpu")[0]
    assert first != "reference"
    impl, calls = _failing(first)
    monkeypatch.setitem(backends._registry, "graph_scores", {**backends._registry["graph_scores"], first: impl})
    with pytest.warns(RuntimeWarning, match=rf"mrprune.graph_scores: the {first} backend failed on cpu") as record:
        got = mrprune.graph_scores(x, lens)
    assert len(record) == 1 and "Traceback" not in str(record[0].message)
    assert_close(got, reference.graph_scores(x.double(), lens, None, 0.5, 0.03, 1))
    assert ("graph_scores", "cpu", first) in backends.demoted()
    assert first not in backends.available("graph_scores", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = mrprune.graph_scores(x, lens)
    assert len(calls) == 1
    torch.testing.assert_close(again, got)
    # another op is not affected
    assert backends.available("cosine_graph", "cpu")[0] == first


def test_no_demotion_when_asked_for_explicitly_or_disabled(monkeypatch, fallback):
    x, lens = _graph_inputs()
    first = backends.available("graph_scores", "cpu")[0]
    impl, _ = _failing(first)
    monkeypatch.setitem(backends._registry, "graph_scores", {**backends._registry["graph_scores"], first: impl})
    with backends.use_backend(first), pytest.raises(RuntimeError, match="compile failed"):
        mrprune.graph_scores(x, lens)
    monkeypatch.setenv("MRPRUNE_FALLBACK", "0")
    with pytest.raises(RuntimeError, match="compile failed"):
        mrprune.graph_scores(x, lens)
    assert not backends.demoted()


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA error: an illegal memory access was encountered"), torch.OutOfMemoryError("out of memory")],
)
def test_sticky_errors_are_not_masked(monkeypatch, fallback, error):
    """After a sticky CUDA error or OOM every backend would fail too: the original error surfaces."""
    x, lens = _graph_inputs()
    first = backends.available("graph_scores", "cpu")[0]

    def impl(*args):
        raise error

    monkeypatch.setitem(backends._registry, "graph_scores", {**backends._registry["graph_scores"], first: impl})
    with pytest.raises(type(error)):
        mrprune.graph_scores(x, lens)
    assert not backends.demoted()


def test_validation_errors_are_raised_before_dispatch(monkeypatch, fallback):
    """A bad argument is the caller's error, not the backend's: it raises and demotes nothing."""
    x, _ = _graph_inputs()
    with pytest.raises(ValueError, match="lengths"):
        mrprune.graph_scores(x, torch.tensor([41, 3]))
    assert not backends.demoted()


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="needs the Triton interpreter")
def test_real_triton_failure_falls_back(monkeypatch, fallback):
    """A genuine Triton failure (a token tile that is not a power of two: ``tl.arange`` rejects it) in the backend
    that auto picks first: the op warns, demotes Triton and returns the next backend's (correct) scores."""
    from mrprune.triton_kernels import graph_scores as triton_graph_scores

    monkeypatch.setitem(backends._AUTO_ORDER_OVERRIDES, ("graph_scores", "cpu"), ("triton", "cpp", "reference"))
    monkeypatch.setattr(triton_graph_scores, "token_block", lambda n, t, override=None: 24)
    x, lens = _graph_inputs()
    assert backends.available("graph_scores", "cpu")[0] == "triton"
    with pytest.warns(RuntimeWarning, match="the triton backend failed on cpu") as record:
        got = mrprune.graph_scores(x, lens)
    assert len(record) == 1
    assert_close(got, reference.graph_scores(x.double(), lens, None, 0.5, 0.03, 1))
    assert ("graph_scores", "cpu", "triton") in backends.demoted()
