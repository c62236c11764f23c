"""Microbenchmarks: every ``torch.ops.mrprune`` op and every pruning method, every implementation, checked then timed.

For each case (an op or a method with its arguments at a named shape) the eager reference runs first and is the
oracle; every other implementation's output is compared with it before it is timed, and a disagreement marks the
row ``FAIL`` and leaves it untimed. Implementations:

* ``reference`` — the eager PyTorch reference (:mod:`mrprune.reference`; methods with ``use_backend("reference")``).
* ``official`` — the official code's eager path, in its dense style and in float32 (mrprune's ``official=True``
  arithmetic), where one exists: G-Prune's threshold + softmax + ``torch.linalg.matrix_power``; MR-Pruner's
  sequence (dense affinity, ``torch.topk``, dense cross transfer); DivPrune's dense distance matrix and greedy
  loop; ``torch.topk`` for the top-k; and, ResPrune having no public code, an eager per-step greedy loop as the
  paper describes it (one Gram-Schmidt step and one GEMV per pick, batched, no host syncs).
* ``cpp``, ``triton``, ``cuda`` — whatever :func:`mrprune.backends.available` lists for the op on the device (op
  rows call the registered implementation directly: argument validation and dispatch are not timed).
* ``auto`` (methods only) — the default dispatch, the fastest implementation of each op: what a user gets.

CPU times come from ``torch.utils.benchmark.Timer`` (``blocked_autorange``; single timed calls once a call takes
longer than the per-row budget), GPU times from ``triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])`` (CUDA events
for calls slower than 50 ms). Triton under ``TRITON_INTERPRET=1`` is refused, or with ``allow_interpreter`` timed and
labelled ``interp (not a performance number)``. Eager rows (``reference``, ``official``) whose checked call took
:data:`SLOW_EAGER_S` or more are timed by that call alone (a minute-long eager loop is not worth repeating).

Methods that read more than the tokens get synthetic inputs (:mod:`mrprune.bench.vision`): the vision stage's
[CLS] attention and crops; the llm stage's prompt, attention rows, key norms and normed states at the first pruning
layer (PDrop, DART, SparseVLM: their selection cost, not a language model's); ToMe's row times its merges alone, every
block of the shape's ``merge_blocks`` over every crop with the current tokens as keys (no attention or MLP between
merges). Merging methods' results are checked by representatives, every token's group and its weight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from .. import backends, ops, reference
from ..layouts import LlavaNextLayout
from ..methods import (
    DART,
    SCOPE,
    TRIM,
    AgilePruner,
    CDPruner,
    DivPrune,
    FasterVLM,
    GPrune,
    HiRED,
    L2Norm,
    MRPruner,
    PDrop,
    PruMerge,
    Pruner,
    RandomPruner,
    ResPrune,
    SparseVLM,
    ToMe,
    VisionZip,
    VisPruner,
)
from ..methods.results import MergedTokens
from .report import Row
from .shapes import Shape, available_memory, eager_bytes, format_bytes
from .vision import (
    VisionInputs,
    llm_inputs,
    need_kwargs,
    official_scope,
    official_vispruner,
    token_sources,
    tome_blocks,
    vision_inputs,
)

__all__ = [
    "IMPLEMENTATIONS",
    "METHODS",
    "OPS",
    "Settings",
    "compare",
    "eager_greedy_loop",
    "method_cases",
    "op_cases",
    "run_cases",
    "time_call",
    "warm_up",
]

logger = logging.getLogger(__name__)

OPS = (
    "cosine_graph",
    "graph_propagate",
    "graph_scores",
    "transfer_scores",
    "greedy_residual_select",
    "diversity_select",
    "max_cosine",
    "topk_indices",
    "received_attention",
    "coverage_select",
    "bipartite_dedup",
    "bipartite_merge",
    "assign_merge",
    "knn_weighted_merge",
    "attention_rows",
    "density_peak_merge",
)
METHODS = (
    "mr_pruner",
    "g_prune",
    "resprune",
    "divprune",
    "random",
    "fastervlm",
    "hired",
    "scope",
    "vispruner",
    "cdpruner",
    "trim",
    "l2norm",
    "agilepruner",
    "visionzip",
    "prumerge_plus",
    "tome",
    "pdrop",
    "dart",
    "sparsevlm",
)
#: Implementation names, in table order (``eager`` is accepted for ``reference``).
IMPLEMENTATIONS = ("reference", "official", "cpp", "triton", "cuda", "auto")

#: A float output passes when at most this share of its entries (at least 2 of 100 or more: an edge at the threshold
#: that rounding flips changes one degree) lies outside ``|a - r| <= atol + RTOL |r|``.
RTOL = 1e-3
ATOL_SCALE = 1e-5  # atol = ATOL_SCALE * max |reference|
MAX_MISMATCH = 1e-3
#: An index output passes when every batch item misses at most this share of the reference's picks (at least one
#: of 20 or more: a near-tie that rounding decides differently).
INDEX_TOLERANCE = 0.02
#: A ``"cascade"`` output (see :func:`compare`) passes when every item shares at least this share of its picks with
#: the reference: one flipped near-tie in an early de-duplication round changes every later parity split, so kernels
#: that round differently from the reference legitimately pick other tokens (on the synthetic LLaVA-NeXT crops, float64
#: score gaps of 1e-8 occur), while a wrong de-duplication shares little beyond VisPruner's important half.
CASCADE_AGREEMENT = 0.75
#: GPU calls slower than this are timed with CUDA events (``repeat`` calls) instead of ``do_bench``.
SLOW_GPU_CALL_S = 0.05
TEXT_TOKENS = 16


@dataclass
class Settings:
    """Timing and selection settings of a microbenchmark run."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    impls: tuple[str, ...] = IMPLEMENTATIONS
    min_time: float = 0.2  # seconds of measurements per row (blocked_autorange / do_bench budget)
    repeat: int = 3  # at least this many measurements per row
    allow_interpreter: bool = False


@dataclass
class Case:
    """One thing to time: an op call or a method call, with the implementations that apply."""

    kind: str  # "op" | "method"
    name: str
    label: str
    shape: Shape
    batch: int
    tokens: int
    dim: int
    k: int | None
    impls: dict[str, Callable[[], Any]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ("float",)  # per output: "float", "index", "aligned" (float where indices agree)
    eager_bytes: int = 0
    oracle: Callable[[], Any] | None = None  # a low-memory oracle when the reference does not fit
    notes: dict[str, str] = field(default_factory=dict)


# --- timing -------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    measurements: int | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(seconds: Sequence[float]) -> Timing:
    t = torch.tensor(list(seconds), dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), len(seconds))


def time_call(
    fn: Callable[[], Any], device: torch.device, first_seconds: float, min_time: float, repeat: int
) -> Timing:
    """Time ``fn``, already called once (its checked first call) in ``first_seconds``, on ``device``.

    CPU: ``Timer.blocked_autorange`` with ``min_run_time = max(min_time, repeat * first_seconds)``, topped up with
    blocks of the same size to at least ``repeat`` measurements (each the mean of one block of calls). A call slower
    than ``min_time`` is measured ``repeat`` times one call at a time with ``time.perf_counter`` (the timer
    ``Timer`` uses), its first call included (a CPU call has no compilation or lazy set-up to keep out: the first
    call does the same work).

    CUDA: ``triton.testing.do_bench`` with ``rep = min_time`` (median, p20, p80 of its runs) after a warm call, or
    ``repeat`` CUDA-event timed calls for calls slower than 50 ms or without triton.
    """
    if device.type == "cuda":
        return _time_cuda(fn, device, first_seconds, min_time, repeat)
    if first_seconds >= min_time:  # (Timer.timeit(1) would add two warm-up calls to each measurement)
        times = [first_seconds]
        for _ in range(max(repeat, 1) - 1):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return _quantiles(times)
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=max(min_time, 1.05 * repeat * first_seconds))
    times = list(measurement.times)
    while len(times) < repeat:  # the block size came out so large that fewer blocks fit in min_run_time
        times.append(timer.timeit(measurement.number_per_run).median)
    return _quantiles(times)


def _time_cuda(fn: Callable[[], Any], device: torch.device, first_seconds: float, min_time: float, repeat: int):
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if first_seconds < 1.0:  # the first call may include compilation: estimate from a warm one
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        first_seconds = start.elapsed_time(end) / 1e3
    if do_bench is not None and first_seconds < SLOW_GPU_CALL_S:
        median, p20, p80 = do_bench(fn, warmup=25, rep=max(1, int(1e3 * min_time)), quantiles=[0.5, 0.2, 0.8])
        return Timing(float(median), float(p20), float(p80), None)
    times = []
    for _ in range(max(repeat, 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return _quantiles(times)


# --- checking -------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    ok: bool
    max_abs_err: float | None = None
    agreement: float | None = None
    note: str = ""


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, tuple | list) and not _is_kept_list(out) else (out,)


def _is_kept_list(out: Any) -> bool:
    return isinstance(out, list) and all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in out)


def _float_check(actual: torch.Tensor, expected: torch.Tensor, where: torch.Tensor | None = None) -> Check:
    """Elementwise closeness, chunked so that ``B x N x N`` outputs need no full-size temporaries."""
    if actual.shape != expected.shape:
        return Check(False, note=f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    a = actual.reshape(-1)
    r = expected.to(actual.device).reshape(-1)
    mask = None if where is None else where.to(actual.device).reshape(-1)
    chunk = 1 << 24
    scale = 0.0
    for start in range(0, r.numel(), chunk):
        y = r[start : start + chunk]
        y = y[torch.isfinite(y)]
        if y.numel():
            scale = max(scale, float(y.abs().max()))
    atol = ATOL_SCALE * scale
    bad, err, total = 0, 0.0, 0
    for start in range(0, a.numel(), chunk):
        x = a[start : start + chunk].double()
        y = r[start : start + chunk].double()
        close = torch.isclose(x, y, rtol=RTOL, atol=atol, equal_nan=True)
        both_finite = torch.isfinite(x) & torch.isfinite(y)
        if mask is not None:
            m = mask[start : start + chunk]
            close, both_finite = close | ~m, both_finite & m
            total += int(m.sum())
        else:
            total += x.numel()
        bad += int((~close).sum())
        if bool(both_finite.any()):
            err = max(err, float((x - y).abs()[both_finite].max()))
    share = 1.0 - bad / total if total else 1.0
    allowed = max(MAX_MISMATCH * total, 2 if total >= 100 else 0)
    return Check(bad <= allowed, err, share)


def _index_agreement(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> tuple[float, bool]:
    """(worst item's share of the reference's picks also picked, whether every item is within tolerance).

    A repeated or missing pick counts against the item; an item may miss ``INDEX_TOLERANCE`` of its picks (at least
    one of 20 or more)."""
    if len(actual) != len(expected):
        return 0.0, False
    worst, ok = 1.0, True
    for a, r in zip(actual, expected, strict=True):
        a, r = a[a >= 0], r[r >= 0]
        a_set, r_set = set(a.tolist()), set(r.tolist())
        extra = max(0, (a.numel() - len(a_set)) - (r.numel() - len(r_set)))
        size = max(len(a_set), len(r_set)) + extra
        misses = size - len(a_set & r_set)
        worst = min(worst, 1 - misses / size if size else 1.0)
        ok &= misses <= max(math.floor(INDEX_TOLERANCE * size), 1 if size >= 20 else 0)
    return worst, ok


def _merged_check(actual: Any, expected: Any, cascade: bool) -> Check:
    """Merged results per item: the representatives as ``"kept"`` (or ``"cascade"``), and every input token's group
    by its representative (``kept[sources[i]]``, -1 merged nowhere): at most ``INDEX_TOLERANCE`` of the input tokens
    (at least one of 20) in another group (``cascade``: at least ``CASCADE_AGREEMENT`` in the same), and their
    weights close where the groups agree."""
    if not (isinstance(actual, list) and all(isinstance(m, MergedTokens) for m in actual)):
        return Check(False, note=f"expected a list of MergedTokens, got {type(actual).__name__}")
    if len(actual) != len(expected):
        return Check(False, note=f"{len(actual)} items, the reference has {len(expected)}")
    kept = compare([m.kept for m in actual], [m.kept for m in expected], ("cascade",) if cascade else ("kept",))
    ok, agreement, err = kept.ok, kept.agreement, None
    for a, r in zip(actual, expected, strict=True):
        a, r = a.cpu(), r.cpu()
        if a.sources.shape != r.sources.shape:
            return Check(False, note=f"sources {tuple(a.sources.shape)} != reference {tuple(r.sources.shape)}")
        rep_a = torch.where(a.sources >= 0, a.kept[a.sources.clamp(min=0)], -1)
        rep_r = torch.where(r.sources >= 0, r.kept[r.sources.clamp(min=0)], -1)
        same = rep_a == rep_r
        n = same.numel()
        share = float(same.float().mean()) if n else 1.0
        agreement = min(agreement if agreement is not None else 1.0, share)
        if cascade:
            ok &= share >= CASCADE_AGREEMENT
        else:
            ok &= n - int(same.sum()) <= max(math.floor(INDEX_TOLERANCE * n), 1 if n >= 20 else 0)
        weights = _float_check(a.weights, r.weights, same)
        ok &= weights.ok
        if weights.max_abs_err is not None:
            err = weights.max_abs_err if err is None else max(err, weights.max_abs_err)
    note = "cascading rounds (merges): groups may differ past a float32 near-tie" if cascade else ""
    return Check(ok, err, agreement, note)


def compare(actual: Any, expected: Any, outputs: Sequence[str]) -> Check:
    """Compare an implementation's output with the reference's.

    ``outputs`` names each output's kind: ``"float"`` (elementwise closeness: at most ``MAX_MISMATCH`` of the entries
    outside ``rtol = 1e-3``, ``atol = 1e-5 max|ref|``), ``"index"`` (per batch item, at most ``INDEX_TOLERANCE`` of
    the reference's picks missed), ``"aligned"`` (floats compared where the preceding index output
    agrees position by position), ``"kept"`` (a method's list of kept-index tensors, as ``"index"``), or
    ``"cascade"`` (kept lists of a method whose rounds cascade through float32 near-ties, VisPruner's de-duplication:
    as many distinct picks as the reference, at least ``CASCADE_AGREEMENT`` of them the reference's), ``"merged"`` /
    ``"merged_cascade"`` (lists of :class:`MergedTokens`: representatives as ``"kept"`` / ``"cascade"``, each input
    token's group and weight, see :func:`_merged_check`).
    """
    if outputs in (("merged",), ("merged_cascade",)):
        return _merged_check(actual, expected, cascade=outputs == ("merged_cascade",))
    if outputs in (("kept",), ("cascade",)):
        if not _is_kept_list(actual):
            return Check(False, note=f"expected a list of index tensors, got {type(actual).__name__}")
        agreement, ok = _index_agreement([a.cpu() for a in actual], [r.cpu() for r in expected])
        if outputs == ("cascade",):  # near-ties reorder the rounds: same sizes, no repeats, most picks shared
            sizes = [(a.numel(), a.unique().numel(), r.numel()) for a, r in zip(actual, expected, strict=True)]
            ok = len(actual) == len(expected) and all(n == u == m for n, u, m in sizes)
            ok &= agreement >= CASCADE_AGREEMENT
            return Check(ok, None, agreement, "cascading rounds: picks may differ past a float32 near-tie")
        return Check(ok, None, agreement)
    actual, expected = _as_tuple(actual), _as_tuple(expected)
    if len(actual) != len(expected) or len(actual) != len(outputs):
        return Check(False, note=f"{len(actual)} outputs, the reference has {len(expected)}")
    ok, err, agreement, notes = True, None, None, []
    previous = None
    for kind, a, r in zip(outputs, actual, expected, strict=True):
        if kind == "index":
            if a.shape != r.shape:
                return Check(False, note=f"index shape {tuple(a.shape)} != reference {tuple(r.shape)}")
            share, within = _index_agreement(list(a.cpu()), list(r.cpu()))
            ok &= within
            agreement = share if agreement is None else min(agreement, share)
            previous = (a, r)
            continue
        where = None
        if kind == "aligned" and previous is not None:
            where = previous[0].to(r.device) == previous[1].to(r.device)
        check = _float_check(a, r, where)
        if check.note:
            notes.append(check.note)
        ok &= check.ok
        if check.max_abs_err is not None:
            err = check.max_abs_err if err is None else max(err, check.max_abs_err)
        if kind == "float" and check.agreement is not None:
            agreement = check.agreement if agreement is None else min(agreement, check.agreement)
    return Check(ok, err, agreement, "; ".join(notes))


# --- the official-code eager paths (dense, float32, one item at a time as the official code is batch 1) --------------


def _official_affinity(x: torch.Tensor, threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MR-Pruner / G-Prune affinity as the official code computes it (research/algorithms.md §2.3)."""
    xh = F.normalize(x, dim=-1)
    sim = xh @ xh.T
    sim = sim * (sim >= threshold)
    sim = sim / temperature
    sim = torch.where(sim.abs() < 1e-6, torch.full_like(sim, -5000.0), sim)
    a = torch.softmax(sim, dim=-1)
    return a, (a > 0).sum(-1).to(a.dtype)


def _official_cross(
    queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, threshold: float, temperature: float
) -> torch.Tensor:
    """MR-Pruner's cross transfer (§2.5 steps 3-4), 0 instead of 0/0 = NaN when there is no key (as mrprune)."""
    if keys.shape[0] == 0:
        return queries.new_zeros(queries.shape[0])
    cross = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    cross = cross * (cross >= threshold)
    cross = cross / temperature
    cross = torch.where(cross.abs() < 1e-6, torch.full_like(cross, -5000.0), cross)
    q = torch.softmax(cross, dim=-1)
    return (q @ weights) / (q > 0).sum(-1).to(q.dtype)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(reference.compute_dtype(x.dtype))


def official_cosine_graph(features, lengths, threshold=0.5, temperature=0.03):
    """Dense official affinity per item; degree counted as ``P > 0`` after the softmax."""
    batch, tokens, _ = features.shape
    dtype = reference.compute_dtype(features.dtype)
    graph = features.new_zeros(batch, tokens, tokens, dtype=dtype)
    degree = features.new_zeros(batch, tokens, dtype=dtype)
    for b in range(batch):
        n = int(lengths[b])
        graph[b, :n, :n], degree[b, :n] = _official_affinity(_f32(features[b, :n]), threshold, temperature)
    return graph, degree


def official_graph_propagate(graph, degree, weights, lengths, iterations=1):
    """``(w @ matrix_power(P, t)) / degree`` per item, as G-Prune."""
    scores = graph.new_zeros(degree.shape, dtype=reference.compute_dtype(graph.dtype))
    for b in range(graph.shape[0]):
        n = int(lengths[b])
        a = _f32(graph[b, :n, :n])
        if iterations > 1:
            a = torch.linalg.matrix_power(a, iterations)
        scores[b, :n] = (_f32(weights[b, :n])[None] @ a)[0] / _f32(degree[b, :n])
    return scores


def official_graph_scores(features, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1):
    """The official scoring sequence per item: affinity, ``matrix_power`` (t > 1), ``(w @ A) / degree``."""
    scores = features.new_zeros(features.shape[:2], dtype=reference.compute_dtype(features.dtype))
    for b in range(features.shape[0]):
        n = int(lengths[b])
        x = _f32(features[b, :n])
        a, degree = _official_affinity(x, threshold, temperature)
        if iterations > 1:
            a = torch.linalg.matrix_power(a, iterations)
        w = x.norm(dim=-1) if weights is None else _f32(weights[b, :n])
        scores[b, :n] = (w[None] @ a)[0] / degree
    return scores


def official_transfer_scores(queries, query_lengths, keys, key_mask, key_weights=None, threshold=0.5, temperature=0.03):
    """MR-Pruner's dense cross transfer per item."""
    prop = queries.new_zeros(queries.shape[:2], dtype=reference.compute_dtype(queries.dtype))
    for b in range(queries.shape[0]):
        m = int(query_lengths[b])
        selected = _f32(keys[b][key_mask[b]])
        w = selected.norm(dim=-1) if key_weights is None else _f32(key_weights[b][key_mask[b]])
        prop[b, :m] = _official_cross(_f32(queries[b, :m]), selected, w, threshold, temperature)
    return prop


def _official_divprune_picks(x: torch.Tensor, k: int, mask_picked: bool) -> torch.Tensor:
    """DivPrune's official loop on one item: dense ``1 - cos`` matrix; the first pick maximises the second-smallest
    distance of its column; each later pick maximises the minimum distance over the rows already picked,
    recomputed from those rows at every step as the official code does."""
    n = x.shape[0]
    xh = F.normalize(x, dim=-1)
    distance = 1.0 - xh @ xh.T
    picks = torch.empty(min(k, n), dtype=torch.int64, device=x.device)
    for i in range(min(k, n)):
        if i == 0:
            scores = torch.topk(distance, min(2, n), dim=0, largest=False).values[-1]
        else:
            scores = torch.index_select(distance, 0, picks[:i]).min(dim=0).values
            if mask_picked:
                scores = scores.index_fill(0, picks[:i], float("-inf"))
        picks[i] = torch.argmax(scores)
    return picks


def official_diversity_select(features, lengths, k, mask_picked=True):
    """DivPrune's official dense loop per item (with the picked-token mask when ``mask_picked``, as the op)."""
    indices = torch.full((features.shape[0], k), -1, dtype=torch.int64, device=features.device)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        if n and k:
            picks = _official_divprune_picks(_f32(features[b, :n]), k, mask_picked)
            indices[b, : picks.numel()] = picks
    return indices


def official_topk_indices(scores, lengths, k, sort_indices=False):
    """``torch.topk`` per item, as the official methods select (no tie-order guarantee)."""
    indices = torch.full((scores.shape[0], k), -1, dtype=torch.int64, device=scores.device)
    for b in range(scores.shape[0]):
        n = int(lengths[b])
        top = torch.topk(scores[b, :n], min(k, n)).indices
        if sort_indices:
            top = top.sort().values
        indices[b, : top.numel()] = top
    return indices


def eager_greedy_loop(features, lengths, k, gate=None, seed=None, exhaustion_tol=1e-5, algorithm="auto"):
    """ResPrune's greedy residual-energy selection as an eager per-step loop (research/algorithms.md §4.5).

    Batched over items, one pick per step for every item: ``argmax g * e`` (the seed first), twice-orthogonalised
    Gram-Schmidt step, then one GEMV ``V q`` to update every residual energy; no host synchronisation. Same
    semantics and outputs as :func:`mrprune.reference.greedy_residual_select` (exhaustion fill by gate, then index).
    """
    del algorithm
    dtype = reference.compute_dtype(features.dtype)
    v = features.to(dtype)
    batch, tokens, dim = v.shape
    device = v.device
    steps = min(k, tokens)
    valid = torch.arange(tokens, device=device)[None] < lengths[:, None]
    g = torch.ones(batch, tokens, dtype=dtype, device=device) if gate is None else gate.to(dtype)
    g = torch.where(valid, g, torch.zeros((), dtype=dtype, device=device))
    initial = (v * v).sum(-1)
    energy = initial.clone()
    picked = ~valid
    order = torch.sort(g, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(tokens, device=device).expand(batch, tokens))
    basis = v.new_zeros(batch, max(steps, 1), dim)
    indices = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    energies = v.new_zeros(batch, k)
    filling = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    never = torch.tensor(tokens, device=device)
    for t in range(steps):
        active = lengths > t
        score = torch.where(picked, torch.tensor(float("-inf"), dtype=dtype, device=device), g * energy)
        best = score.argmax(1)
        stalled = score.gather(1, best[:, None])[:, 0] <= 0
        if t == 0 and seed is not None:
            forced = seed >= 0
            filling = stalled & ~forced
            best = torch.where(forced, seed, best)
        else:
            filling = filling | stalled
        fill = torch.where(picked, never, rank).argmin(1)
        j = torch.where(filling, fill, best)
        j = torch.where(active, j, torch.zeros_like(j))
        e_j = energy.gather(1, j[:, None])[:, 0]
        indices[:, t] = torch.where(active, j, torch.full_like(j, -1))
        energies[:, t] = torch.where(active & ~filling, e_j, torch.zeros_like(e_j))
        picked = picked | (torch.nn.functional.one_hot(j, tokens).bool() & active[:, None])
        extend = active & ~filling & (e_j > 0)
        residual = v[rows, j]
        if t:
            q_prev = basis[:, :t]
            for _ in range(2):
                residual = residual - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", q_prev, residual), q_prev)
        norm = residual.norm(dim=-1, keepdim=True)
        q = torch.where(extend[:, None], residual / torch.where(norm > 0, norm, torch.ones_like(norm)), 0.0)
        basis[:, t] = q
        energy = (energy - torch.einsum("bnd,bd->bn", v, q) ** 2).clamp_min(0)
        energy = torch.where(energy <= exhaustion_tol * initial, torch.zeros_like(energy), energy)
        energy = energy.scatter(1, j[:, None], 0.0)
    return indices, energies


_OFFICIAL_OPS: dict[str, Callable] = {
    "cosine_graph": official_cosine_graph,
    "graph_propagate": official_graph_propagate,
    "graph_scores": official_graph_scores,
    "transfer_scores": official_transfer_scores,
    "greedy_residual_select": eager_greedy_loop,
    "diversity_select": official_diversity_select,
    "topk_indices": official_topk_indices,
}
_OFFICIAL_NOTES = {
    "cosine_graph": "official dense affinity",
    "graph_propagate": "official matrix_power",
    "graph_scores": "official dense sequence (matrix_power for t > 1)",
    "transfer_scores": "official dense cross transfer",
    "greedy_residual_select": "eager per-step loop (no official code)",
    "diversity_select": "official dense loop",
    "topk_indices": "torch.topk",
}


def chunked_graph_scores(
    features, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1, block: int = 4096
):
    """A low-memory eager oracle of ``graph_scores`` (O(block x N) extra memory): row blocks of the similarity are
    recomputed for every propagation step. Used to check kernels where the reference does not fit in memory."""
    dtype = reference.compute_dtype(features.dtype)
    scores = features.new_zeros(features.shape[:2], dtype=dtype)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        x = features[b, :n].to(dtype)
        w = x.norm(dim=-1) if weights is None else weights[b, :n].to(dtype)
        xh = reference.normalize_rows(x)

        def logits(r0: int, r1: int, xh=xh) -> tuple[torch.Tensor, torch.Tensor]:
            sim = xh[r0:r1] @ xh.T
            z = sim * (sim >= threshold) / temperature
            edge = z.abs() >= reference.ZERO_LOGIT_TOL
            return z.masked_fill(~edge, reference.EDGE_FILL_LOGIT), edge

        row_max, row_sum, degree = x.new_empty(n), x.new_empty(n), x.new_empty(n)
        for r0 in range(0, n, block):
            z, edge = logits(r0, min(n, r0 + block))
            m = z.max(dim=-1).values
            row_max[r0 : r0 + block] = m
            row_sum[r0 : r0 + block] = torch.exp(z - m[:, None]).sum(-1)
            edges = edge.sum(-1).to(dtype)
            degree[r0 : r0 + block] = torch.where(edges > 0, edges, torch.full_like(edges, n))
        mass = w
        for _ in range(iterations):
            new = torch.zeros_like(mass)
            for r0 in range(0, n, block):
                r1 = min(n, r0 + block)
                z, _ = logits(r0, r1)
                p = torch.exp(z - row_max[r0:r1, None]) / row_sum[r0:r1, None]
                new += mass[r0:r1] @ p
            mass = new
        scores[b, :n] = mass / degree
    return scores


# --- cases ------------------------------------------------------------------------------------------------------------


def _text(features: torch.Tensor, lengths: torch.Tensor, count: int = TEXT_TOKENS) -> torch.Tensor:
    """Synthetic text-token embeddings ``[B, count, D]``: noisy copies of spread-out visual tokens, so that the text
    relevance (max cosine) of the visual tokens varies as with real noun embeddings."""
    generator = torch.Generator().manual_seed(1234)
    batch, _, dim = features.shape
    rows = []
    for b in range(batch):
        n = int(lengths[b])
        picks = torch.randint(0, n, (count,), generator=generator)
        base = features[b, picks.to(features.device)].float().cpu()
        noise = torch.randn(count, dim, generator=generator) * base.norm(dim=-1, keepdim=True) / math.sqrt(dim)
        rows.append(base + 0.8 * noise)
    return torch.stack(rows).to(device=features.device, dtype=features.dtype)


def _pick_impls(op: str, device: torch.device, wanted: Sequence[str]) -> list[str]:
    """The non-reference backends of ``op`` on ``device`` that were asked for (a backend name this module does not
    know is always included: a newly registered backend gets benchmarked)."""
    names = [b for b in backends.available(op, device) if b != "reference"]
    return [b for b in names if b in wanted or b not in IMPLEMENTATIONS]


def op_cases(
    shape: Shape, features: torch.Tensor, lengths: torch.Tensor, selected: Sequence[str], settings: Settings
) -> list[Case]:
    """The op calls timed at ``shape``: the arguments each method passes to each op at this shape."""
    device = features.device
    batch, tokens, dim = features.shape
    impl_names = settings.impls
    layout = shape.layout
    generator = torch.Generator().manual_seed(7)
    if isinstance(layout, LlavaNextLayout):
        high_index = layout.highres_indices.to(device)
        graph_set = features[:, high_index].contiguous()  # MR-Pruner / G-Prune's high-resolution set
        base = features[:, : layout.num_base].contiguous()
    else:
        graph_set, base = features, None
    n_graph = graph_set.shape[1]
    graph_lengths = torch.full((batch,), n_graph, dtype=torch.int64, device=device)
    text = _text(features, lengths)
    text_lengths = torch.full((batch,), text.shape[1], dtype=torch.int64, device=device)

    specs: list[tuple[str, str, tuple, tuple[str, ...], int | None, int, int]] = []

    def add(op, label, args, outputs=("float",), k=None, n=n_graph, queries=0):
        if op in selected:
            specs.append((op, label, args, outputs, k, n, queries))

    if "cosine_graph" in selected:
        add("cosine_graph", f"N={n_graph}", (graph_set, graph_lengths, 0.5, 0.03), ("float", "float"))
    if "graph_propagate" in selected:
        graph, degree = ops.cosine_graph(graph_set, graph_lengths, 0.5, 0.03)
        norms = graph_set.float().norm(dim=-1)
        add("graph_propagate", f"N={n_graph} t=5", (graph, degree, norms, graph_lengths, 5))
    add("graph_scores", f"N={n_graph} t=1", (graph_set, graph_lengths, None, 0.5, 0.03, 1))
    add("graph_scores", f"N={n_graph} t=5", (graph_set, graph_lengths, None, 0.5, 0.03, 5))
    if base is not None:
        base_lengths = torch.full((batch,), base.shape[1], dtype=torch.int64, device=device)
        add("graph_scores", f"N={base.shape[1]} t=1", (base, base_lengths, None, 0.5, 0.03, 1), n=base.shape[1])
        pruned = (torch.rand(batch, n_graph, generator=generator) < 0.7).to(device)
        add(
            "transfer_scores",
            f"{base.shape[1]} x {n_graph} (70% pruned)",
            (base, base_lengths, graph_set, pruned, None, 0.5, 0.03),
            n=n_graph,
            queries=base.shape[1],
        )
    if "greedy_residual_select" in selected:
        if isinstance(layout, LlavaNextLayout):  # DESIGN target: K = 640 of the 2880 non-newline tokens
            keep = torch.cat([layout.base_indices, layout.highres_indices]).to(device)
            tokens_set = features[:, keep].contiguous()
        else:
            tokens_set = features
        n_set = tokens_set.shape[1]
        k = min(shape.budget or round(0.222 * n_set), n_set)
        set_lengths = torch.full((batch,), n_set, dtype=torch.int64, device=device)
        rho = ops.max_cosine(tokens_set, set_lengths, text, text_lengths)
        gate = rho.clamp_min(0) ** 0.75
        seed = ops.topk_indices(tokens_set.float().norm(dim=-1), set_lengths, 1)[:, 0]
        add(
            "greedy_residual_select",
            f"k={k} of {n_set} (gated)",
            (tokens_set, set_lengths, k, gate, seed, 1e-5, "auto"),
            ("index", "aligned"),
            k=k,
            n=n_set,
        )
    k_div = round(0.098 * tokens)
    add("diversity_select", f"k={k_div} of {tokens}", (features, lengths, k_div, True), ("index",), k=k_div, n=tokens)
    add(
        "max_cosine",
        f"{tokens} x {text.shape[1]} text",
        (features, lengths, text, text_lengths),
        n=tokens,
        queries=text.shape[1],
    )
    if "topk_indices" in selected:
        k_top = round(0.3 * n_graph)
        scores = torch.rand(batch, n_graph, generator=generator).to(device)
        add("topk_indices", f"k={k_top} of {n_graph}", (scores, graph_lengths, k_top, True), ("index",), k=k_top)

    if "received_attention" in selected:
        # Qwen2.5-VL's vision attention (16 heads of 80); its window layers attend within 8 x 8-patch windows
        heads, head_dim = 16, 80
        qk = torch.randn(2, batch, heads, tokens, head_dim, generator=generator).to(device=device, dtype=features.dtype)
        windows = (torch.arange(tokens, device=device) // 64).expand(batch, tokens).contiguous()
        label = f"H={heads} d={head_dim} N={tokens}"
        add("received_attention", f"{label} full", (qk[0], qk[1], lengths, None, None), n=tokens)
        add("received_attention", f"{label} windows of 64", (qk[0], qk[1], lengths, windows, None), n=tokens)
    k_cover = round(0.111 * tokens)  # SCOPE at LLaVA-1.5's 64 of 576
    saliency = torch.rand(batch, tokens, generator=generator).to(device)
    args = (features, lengths, k_cover, saliency, 1.0)
    add("coverage_select", f"k={k_cover} of {tokens}", args, ("index",), k=k_cover, n=tokens)
    # VisPruner de-duplicates one crop's tokens (the base view on LLaVA-NeXT): its rounds cascade, so on thousands of
    # near-tied synthetic tokens even the float32 and float64 references keep different sets, and an index check
    # would compare rounding, not kernels.
    crop = features[:, layout.base_indices.to(device)].contiguous() if isinstance(layout, LlavaNextLayout) else features
    n_crop = crop.shape[1]
    k_dedup = round(0.0556 * n_crop)  # VisPruner's diverse tokens at 64 of 576 (32 from the other 544)
    crop_lengths = torch.full((batch,), n_crop, dtype=torch.int64, device=device)
    args = (crop, crop_lengths, k_dedup, 8)
    add("bipartite_dedup", f"k={k_dedup} of {n_crop}", args, ("index",), k=k_dedup, n=n_crop)
    _add_merge_cases(add, features, lengths, generator)

    cases = []
    for op, label, args, outputs, k, n, queries in specs:
        impls: dict[str, Callable[[], Any]] = {}
        implementations = backends.implementations(op)
        impls["reference"] = _bind(reference.__dict__[op], args)
        notes = {}
        if "official" in impl_names and op in _OFFICIAL_OPS:
            impls["official"] = _bind(_OFFICIAL_OPS[op], args)
            notes["official"] = _OFFICIAL_NOTES[op]
        for name in _pick_impls(op, device, impl_names):
            impls[name] = _bind(implementations[name], args)
        oracle = None
        if op == "graph_scores":
            oracle = _bind(chunked_graph_scores, args)
        cases.append(
            Case(
                kind="op",
                name=op,
                label=label,
                shape=shape,
                batch=batch,
                tokens=n,
                dim=dim,
                k=k,
                impls=impls,
                outputs=outputs,
                eager_bytes=eager_bytes(op, n, queries, batch) or _new_op_eager_bytes(op, args, n),
                oracle=oracle,
                notes=notes,
            )
        )
    return cases


def _add_merge_cases(add: Callable, features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> None:
    """The merging ops and the LLM attention rows of issue 17 at the settings of their methods (metric: 64 features,
    like head-averaged keys)."""
    device = features.device
    batch, tokens, _ = features.shape
    metric = torch.randn(batch, tokens, 64, generator=generator).to(device=device, dtype=features.dtype)
    r = max(1, min(tokens // 36, (tokens - 1) // 2))  # ToMe's r = 16 per block at 576 tokens
    args = (features, metric, lengths, r, None, True, False)
    add("bipartite_merge", f"r={r} of {tokens}", args, ("float", "float", "index", "index"), k=r, n=tokens)
    count = 30  # VisionZip's function default: 30 contextual targets at a uniform stride
    step = max(1, tokens // count)
    targets = (torch.arange(count, device=device) * step).clamp_max(tokens - 1).expand(batch, count).contiguous()
    args = (features, metric, lengths, targets, False)
    add("assign_merge", f"{count} targets of {tokens}", args, ("float", "index", "index"), k=count, n=tokens)
    kept_count = max(1, round(0.055 * tokens))  # PruMerge's IQR keep ratio, ~5.5 %
    weights = torch.rand(batch, tokens, generator=generator).to(device)
    kept = torch.argsort(weights, dim=1, descending=True)[:, :kept_count].contiguous()
    args = (features, metric, weights, lengths, kept, min(32, tokens))
    add("knn_weighted_merge", f"{kept_count} kept, k=32 of {tokens}", args, ("float", "index"), k=kept_count, n=tokens)
    # SparseVLM raters / PDrop: 16 query rows of a 32-head (8 KV heads) x 128 LLM layer over image + 64 text tokens
    rows, heads, kv_heads, head_dim, length = 16, 32, 8, 128, tokens + 64
    q = torch.randn(batch, heads, rows, head_dim, generator=generator).to(device=device, dtype=features.dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(device=device, dtype=features.dtype)
    key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    positions = (length - rows + torch.arange(rows, device=device)).expand(batch, rows).contiguous()
    args = (q, k, key_mask, positions, None, True)
    add("attention_rows", f"M={rows} H={heads}/{kv_heads} L={length}", args, n=length, queries=rows)
    recycled = max(1, round(0.2 * tokens))  # SparseVLM: 30 % of the ~2/3 pruned tokens, n / 10 + 1 clusters
    clusters = recycled // 10 + 1
    sub = features[:, :recycled].contiguous()
    sub_lengths = torch.full((batch,), recycled, dtype=torch.int64, device=device)
    args = (sub, sub_lengths, clusters, None)
    add("density_peak_merge", f"{clusters} clusters of {recycled}", args, ("float", "index", "index"), n=recycled)


def _new_op_eager_bytes(op: str, args: tuple, tokens: int) -> int:
    """Peak memory of the references of the vision-stage ops (per item: float32 ``N x N`` buffers, one per head for
    ``received_attention``: logits, mask and softmax)."""
    n2 = 4 * tokens * tokens
    if op == "received_attention":
        return 3 * args[0].shape[1] * n2
    return {"coverage_select": 4 * n2, "bipartite_dedup": 3 * n2}.get(op, 0)


def _bind(fn: Callable, args: tuple) -> Callable[[], Any]:
    def call():
        with torch.no_grad():
            return fn(*args)

    return call


# --- methods ------------------------------------------------------------------------------------------------------


def _official_graph_method(pruner: MRPruner | GPrune, features, layouts, lengths) -> list[torch.Tensor]:
    """MR-Pruner / G-Prune's official code per image (research/algorithms.md §2, §3), dense, in the features' dtype
    as the official code runs (float16/bfloat16 models: half-precision normalisation and matmul), float32 else."""
    kept = []
    for b, layout in enumerate(layouts):
        x = features[b, : int(lengths[b])]
        x = x if x.dtype in (torch.float16, torch.bfloat16) else x.float()
        base_index = layout.base_indices.to(x.device)
        high_index = layout.highres_indices.to(x.device)
        low, high = x[base_index], x[high_index]
        w_low, w_high = low.norm(dim=-1)[None], high.norm(dim=-1)[None]
        if isinstance(pruner, MRPruner):
            total = int(pruner.keep_ratio * layout.num_tokens)
            share = w_low.mean() / (w_low.mean() + w_high.mean())
            k_low = min(int(total * share), low.shape[0])
            k_high = min(total - k_low, high.shape[0])
        else:
            k_low, k_high = int(pruner.keep_ratio * low.shape[0]), int(pruner.keep_ratio * high.shape[0])

        def scores(tokens, w):
            a, degree = _official_affinity(tokens, pruner.threshold, pruner.temperature)
            if pruner.iterations > 1:
                a = torch.linalg.matrix_power(a, pruner.iterations)
            return ((w @ a) / degree)[0]

        keep_high = torch.topk(scores(high, w_high), k_high).indices
        low_scores = scores(low, w_low)
        if isinstance(pruner, MRPruner):
            pruned = torch.ones(high.shape[0], dtype=torch.bool, device=x.device)
            pruned[keep_high] = False
            low_scores = low_scores + pruner.beta * _official_cross(
                low, high[pruned], w_high[0, pruned], pruner.cross_threshold, pruner.temperature
            )
        keep_low = torch.topk(low_scores, k_low).indices
        keep = torch.cat([base_index[keep_low], high_index[keep_high], layout.newline_indices.to(x.device)])
        kept.append(keep.sort().values)
    return kept


def _official_divprune(pruner: DivPrune, features, layouts, lengths) -> list[torch.Tensor]:
    kept = []
    for b in range(features.shape[0]):
        n = int(lengths[b])
        count = int(round(pruner.keep_ratio * n))
        picks = _official_divprune_picks(features[b, :n].float(), count, not pruner.official)
        kept.append(picks.unique())
    return kept


def _eager_resprune(pruner: ResPrune, features, layouts, lengths, texts) -> list[torch.Tensor]:
    """ResPrune with eager PyTorch only: dense max-cosine gate and :func:`eager_greedy_loop`."""
    x = features.float()
    counts = [pruner._count(n) for n in lengths.tolist()]
    gate = None
    if texts is not None and pruner.alpha:
        rho = torch.stack(
            [
                (F.normalize(x[b], dim=-1) @ F.normalize(t.float(), dim=-1).T).max(dim=1).values
                for b, t in enumerate(texts)
            ]
        )
        gate = rho.clamp_min(0) ** pruner.alpha
    norms = x.norm(dim=-1).masked_fill(torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None], -1)
    seeds = norms.argmax(dim=1)
    picks, _ = eager_greedy_loop(x, lengths, max(counts), gate, seeds, pruner.exhaustion_tol)
    return [picks[b, :c].sort().values for b, c in enumerate(counts)]


@dataclass(frozen=True)
class _MethodSpec:
    """A method as benchmarked: ``official(features, layouts, lengths, texts, vision)`` is the official code's eager
    path (``vision``: the :class:`~mrprune.bench.vision.VisionInputs` of a vision-stage method, else None)."""

    pruner: Pruner
    label: str
    ops: tuple[str, ...]
    official: Callable | None
    official_note: str = ""
    uses_text: bool = False
    vision: bool = False  # a vision-stage method: select_batch also gets the synthetic VisionInputs
    outputs: tuple[str, ...] = ("kept",)  # how compare() checks its kept lists
    llm: bool = False  # an llm-stage method: select_batch also gets the synthetic llm_inputs (step 0)
    #: instead of ``select_batch``: ``call(features, layouts, lengths, vision)`` (ToMe's blocks)
    call: Callable | None = None


def _method_specs(shape: Shape, selected: Sequence[str]) -> list[tuple[str, _MethodSpec]]:
    anyres = shape.family == "llava_next"
    specs = []
    if "mr_pruner" in selected:
        pruner = MRPruner(keep_ratio=0.3, official=anyres)
        official = (lambda f, lay, n, t, v, p=pruner: _official_graph_method(p, f, lay, n)) if anyres else None
        label = "keep=0.3" + (" official=True" if anyres else "")
        specs.append(
            (
                "mr_pruner",
                _MethodSpec(
                    pruner,
                    label,
                    ("graph_scores", "transfer_scores", "topk_indices"),
                    official,
                    "official dense sequence",
                ),
            )
        )
    if "g_prune" in selected:
        pruner = GPrune(keep_ratio=0.5, official=anyres)
        official = (lambda f, lay, n, t, v, p=pruner: _official_graph_method(p, f, lay, n)) if anyres else None
        label = "keep=0.5 t=5" + (" official=True" if anyres else "")
        specs.append(
            (
                "g_prune",
                _MethodSpec(pruner, label, ("graph_scores", "topk_indices"), official, "official dense + matrix_power"),
            )
        )
    if "resprune" in selected:
        alpha = "llava" if shape.family == "llava_next" or shape.name == "llava15" else "qwen"
        if shape.budget:
            pruner, label = ResPrune(budget=shape.budget, alpha=alpha), f"budget={shape.budget}"
        else:
            pruner, label = ResPrune(keep_ratio=0.222, alpha=alpha), "keep=0.222"
        specs.append(
            (
                "resprune",
                _MethodSpec(
                    pruner,
                    label + " text",
                    ("max_cosine", "topk_indices", "greedy_residual_select"),
                    lambda f, lay, n, t, v, p=pruner: _eager_resprune(p, f, lay, n, t),
                    "eager per-step loop (no official code)",
                    uses_text=True,
                ),
            )
        )
    if "divprune" in selected:
        pruner = DivPrune(keep_ratio=0.098, official=True)
        specs.append(
            (
                "divprune",
                _MethodSpec(
                    pruner,
                    "keep=0.098 official=True",
                    ("diversity_select",),
                    lambda f, lay, n, t, v, p=pruner: _official_divprune(p, f, lay, n),
                    "official dense loop",
                ),
            )
        )
    if "random" in selected:
        specs.append(("random", _MethodSpec(RandomPruner(keep_ratio=0.5), "keep=0.5", (), None)))
    return specs + _vision_specs(shape, selected)


def _vision_specs(shape: Shape, selected: Sequence[str]) -> list[tuple[str, _MethodSpec]]:
    """The issue-16 selectors at ``shape``, each keeping ``shape.selector_budget`` tokens per item (else
    ``budget``, else 22.2 %: the 77.8 % pruned setting). SCOPE and VisPruner run ``official=True`` on LLaVA-NeXT
    layouts, against the official per-crop selections (:mod:`mrprune.bench.vision`); the others run their default
    mode."""
    budget = shape.selector_budget or shape.budget or max(1, round(0.222 * shape.tokens))
    label = f"budget={budget}"
    crops = token_sources(shape.layout)[2]  # base view and tiles, or frames
    official = shape.family == "llava_next"
    layer = -2
    made: dict[str, tuple[Pruner, str, tuple[str, ...], Callable | None, str]] = {
        "fastervlm": (FasterVLM(budget=budget, layer=layer), label, ("topk_indices",), None, ""),
        "hired": (HiRED(budget=budget, budget_layer=0, select_layer=layer), label, ("topk_indices",), None, ""),
        "cdpruner": (
            CDPruner(budget=budget, layer=layer),
            label + " clip",
            ("max_cosine", "greedy_residual_select"),
            None,
            "",
        ),
        # TRIM cannot be built without a CLIP model; select_batch reads only the CLIP embeddings it is given
        "trim": (TRIM(keep_ratio=0.222, clip=object(), layer=layer), "keep=0.222 clip", ("topk_indices",), None, ""),
        "l2norm": (L2Norm(budget=budget), label, ("topk_indices",), None, ""),
        "agilepruner": (AgilePruner(budget=budget, layer=layer), label, ("topk_indices",), None, ""),
    }
    if official:  # the official token_num per image (SCOPE) and visual_token_num per crop (VisPruner)
        per_crop = max(1, budget // crops)
        made["scope"] = (
            SCOPE(budget=budget, layer=layer, official=True),
            label + " official=True",
            ("coverage_select",),
            lambda f, lay, n, t, v: official_scope(v, n, budget, layer),
            "official dense per-crop greedy (float32)",
        )
        made["vispruner"] = (
            VisPruner(budget=per_crop, layer=layer, official=True),
            f"budget={per_crop}/crop official=True",
            ("topk_indices", "bipartite_dedup"),
            lambda f, lay, n, t, v: official_vispruner(v, n, per_crop, layer),
            "official dense per-crop rounds (float32)",
        )
    else:
        made["scope"] = (SCOPE(budget=budget, layer=layer), label, ("coverage_select",), None, "")
        made["vispruner"] = (
            VisPruner(budget=budget, layer=layer),
            label,
            ("topk_indices", "bipartite_dedup"),
            None,
            "",
        )
    made["visionzip"] = (VisionZip(budget=budget, layer=layer), label, ("topk_indices", "assign_merge"), None, "")
    made["prumerge_plus"] = (
        PruMerge(budget=budget, layer=layer),
        label,
        ("topk_indices", "knn_weighted_merge"),
        None,
        "",
    )
    order = (
        "fastervlm",
        "hired",
        "scope",
        "vispruner",
        "cdpruner",
        "trim",
        "l2norm",
        "agilepruner",
        "visionzip",
        "prumerge_plus",
    )
    # de-duplication rounds: compare() checks them as "cascade"; merging methods return MergedTokens
    outputs = {"vispruner": ("cascade",), "visionzip": ("merged",), "prumerge_plus": ("merged",)}
    specs = [
        (name, _MethodSpec(*made[name], vision=name != "l2norm", outputs=outputs.get(name, ("kept",))))
        for name in order
        if name in selected
    ]
    return specs + _merge_and_llm_specs(shape, selected, budget)


#: ToMe's benchmark: LightCompress' r = 16 in each of the shape's ``merge_blocks`` (CLIP-L/336: 23).
TOME_R = 16


def _merge_and_llm_specs(shape: Shape, selected: Sequence[str], budget: int) -> list[tuple[str, _MethodSpec]]:
    """ToMe's per-block merging over every crop of the items (keys: the current tokens, synthetic: no attention or
    MLP between merges), and the issue-17 llm-stage methods' selection at their first pruning layer on
    :func:`~mrprune.bench.vision.llm_inputs`."""
    specs = []
    if "tome" in selected:
        tome = ToMe(r=TOME_R)

        def merge_blocks(features, layouts, lengths, texts, vision, pruner=tome):
            crops = vision.crop_features.flatten(0, 1)  # [B * C, P, D]: every crop of every item
            heads = 16 if crops.shape[-1] % 16 == 0 else 1
            return tome_blocks(pruner, crops, shape.merge_blocks, heads)

        label = f"r={TOME_R} x {shape.merge_blocks} blocks per crop, synthetic keys"
        specs.append(
            (
                "tome",
                _MethodSpec(tome, label, ("bipartite_merge",), None, outputs=("merged_cascade",), call=merge_blocks),
            )
        )
    made = {
        "pdrop": (PDrop(), "step 1 of 8/16/24: keep 50 %", ("topk_indices",)),
        "dart": (DART(budget=budget), f"budget={budget}", ("topk_indices",)),
        "sparsevlm": (SparseVLM(budget=128), "budget=128 step 1", ("topk_indices", "density_peak_merge")),
    }
    for name in ("pdrop", "dart", "sparsevlm"):
        if name in selected:
            outputs = ("merged",) if name == "sparsevlm" else ("kept",)
            specs.append((name, _MethodSpec(*made[name], None, llm=True, outputs=outputs)))
    return specs


def method_cases(
    shape: Shape,
    features: torch.Tensor,
    lengths: torch.Tensor,
    layouts: list,
    selected: Sequence[str],
    settings: Settings,
) -> list[Case]:
    """The pruning methods at ``shape``: each method's ``select_batch`` under every backend that serves its ops."""
    device = features.device
    batch, tokens, dim = features.shape
    text = _text(features, lengths)
    texts = [text[b] for b in range(batch)]
    cases = []
    specs = _method_specs(shape, selected)
    vision: VisionInputs | None = None
    if any(spec.vision or spec.call is not None for _, spec in specs):
        vision = vision_inputs(features, lengths, layouts)
    llm = llm_inputs(features, lengths) if any(spec.llm for _, spec in specs) else {}
    for name, spec in specs:
        args = (features, layouts, lengths, texts if spec.uses_text else None)
        extra = vision.kwargs(spec.pruner) if spec.vision and vision is not None else {}
        if spec.llm:
            extra = need_kwargs(spec.pruner, llm)

        def forced(backend: str, spec=spec, args=args, extra=extra) -> Callable[[], Any]:
            def call():
                with torch.no_grad(), backends.use_backend(backend):
                    if spec.call is not None:
                        return spec.call(*args, vision)
                    return spec.pruner.select_batch(*args, **extra)

            return call

        impls = {"reference": forced("reference")}
        notes = {}
        if spec.official is not None and "official" in settings.impls:
            impls["official"] = _bind(spec.official, (*args, vision))
            notes["official"] = spec.official_note
        served = {b for op in spec.ops for b in backends.available(op, device)}
        for backend in ("cpp", "triton", "cuda"):
            if backend in served and backend in settings.impls:
                impls[backend] = forced(backend)
        if spec.ops and "auto" in settings.impls:
            impls["auto"] = forced("auto")
        worst = max((eager_bytes(op, tokens) for op in spec.ops), default=0)
        cases.append(
            Case("method", name, spec.label, shape, batch, tokens, dim, None, impls, spec.outputs, worst, None, notes)
        )
    return cases


# --- running ------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _oom_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (MemoryError,)
    if hasattr(torch.cuda, "OutOfMemoryError"):
        errors += (torch.cuda.OutOfMemoryError,)
    return errors


def _first_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float | None]:
    """Run once: (output, seconds, extra peak MiB on CUDA)."""
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return out, seconds, peak


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(case: Case, impl: str, settings: Settings, **kwargs: Any) -> Row:
    return Row(
        case.kind,
        case.name,
        case.label,
        case.shape.name,
        case.batch,
        case.tokens,
        case.dim,
        str(settings.dtype).replace("torch.", ""),
        settings.device.type,
        impl,
        k=case.k,
        **kwargs,
    )


def _refusal(case: Case, impl: str, settings: Settings) -> str | None:
    """Why ``impl`` is not run for ``case`` (None: it runs)."""
    if impl == "triton" and _interpreting() and not settings.allow_interpreter:
        return (
            "TRITON_INTERPRET=1: Triton under the interpreter is not a performance number "
            "(--allow-interpreter times it anyway)"
        )
    if impl not in ("reference", "official") or not case.eager_bytes:
        return None
    free = available_memory(settings.device)
    if free is not None and case.eager_bytes > 0.9 * free:
        return (
            f"{impl} refused: needs about {format_bytes(case.eager_bytes)}, {format_bytes(free)} free on "
            f"{settings.device.type}"
        )
    return None


def _attempt(case: Case, impl: str, settings: Settings) -> tuple[Row, Any, float]:
    """Run one implementation once (its check call): the row so far, its output (None if it did not run), seconds."""
    note = case.notes.get(impl, "")
    refusal = _refusal(case, impl, settings)
    if refusal:
        return _row(case, impl, settings, status="refused", note=refusal), None, 0.0
    if impl == "triton" and _interpreting():
        note = "interp (not a performance number)" + (f"; {note}" if note else "")
    try:
        out, seconds, peak = _first_call(case.impls[impl], settings.device)
        if settings.device.type == "cuda" and seconds < 1.0:  # a warm call's peak (no compilation / autotuning)
            _, _, peak = _first_call(case.impls[impl], settings.device)
    except _oom_errors() as error:
        _free(settings.device)
        message = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        return _row(case, impl, settings, status="OOM", note=f"{impl}: {message}"), None, 0.0
    except Exception as error:  # an implementation that raises is reported, not fatal to the run
        logger.debug("%s %s %s failed", case.name, case.label, impl, exc_info=True)
        note = f"{impl}: {type(error).__name__}: {error}"[:300]
        return _row(case, impl, settings, status="error", note=note), None, 0.0
    status = "reference" if impl == "reference" else "ok"
    return _row(case, impl, settings, status=status, note=note, peak_mb=peak), out, seconds


#: Eager (reference / official) calls at least this slow are timed by their checked first call alone.
SLOW_EAGER_S = 10.0


def _time_into(row: Row, fn: Callable[[], Any], seconds: float, settings: Settings) -> None:
    repeat = settings.repeat
    if row.impl in ("reference", "official") and seconds >= SLOW_EAGER_S:
        repeat = 1  # a minute-long eager loop: one call says enough, and a repeat would double the run
        row.note = "; ".join(n for n in (row.note, f"slow eager call ({seconds:.0f} s): timed once") if n)
    timing = time_call(fn, settings.device, seconds, settings.min_time, repeat)
    row.median_ms, row.p20_ms, row.p80_ms, row.measurements = (
        timing.median_ms,
        timing.p20_ms,
        timing.p80_ms,
        timing.measurements,
    )


def run_case(case: Case, settings: Settings) -> list[Row]:
    """Check then time every implementation of one case (the reference first: it is the oracle)."""
    rows: list[Row] = []
    ref_row, expected, seconds = _attempt(case, "reference", settings)
    if case.kind == "method" and _is_kept_list(expected):
        case.k = ref_row.k = int(expected[0].numel())  # tokens kept by the first item
    if expected is not None and "reference" in settings.impls:
        _time_into(ref_row, case.impls["reference"], seconds, settings)
    oracle_note = ""
    if expected is None and case.oracle is not None:
        try:
            expected = case.oracle()
            oracle_note = "checked against the chunked eager oracle"
        except _oom_errors():
            _free(settings.device)
    if "reference" in settings.impls or ref_row.status != "reference":
        rows.append(ref_row)
    for impl in case.impls:
        if impl == "reference":
            continue
        if expected is None:
            rows.append(
                _row(
                    case,
                    impl,
                    settings,
                    status="refused",
                    note=f"no reference output to check {impl} against (reference: {ref_row.status})",
                )
            )
            continue
        row, out, seconds = _attempt(case, impl, settings)
        if out is not None:
            check = compare(out, expected, case.outputs)
            del out
            row.max_abs_err, row.agreement = check.max_abs_err, check.agreement
            row.note = "; ".join(n for n in (row.note, check.note, oracle_note) if n)
            if check.ok:
                _time_into(row, case.impls[impl], seconds, settings)
            else:
                row.status = "FAIL"
        rows.append(row)
        _free(settings.device)
    del expected
    _free(settings.device)
    _speedups(rows)
    return rows


def _speedups(rows: list[Row]) -> None:
    medians = {r.impl: r.median_ms for r in rows if r.median_ms}
    for row in rows:
        if not row.median_ms:
            continue
        if medians.get("reference") and row.impl != "reference":
            row.vs_reference = medians["reference"] / row.median_ms
        if medians.get("official") and row.impl != "official":
            row.vs_official = medians["official"] / row.median_ms


def warm_up(settings: Settings, op_names: Sequence[str], method_names: Sequence[str]) -> None:
    """Call every implementation once on the ``tiny`` shape, untimed: lazy imports and one-time set-up (the
    dispatcher's first call imports ``torch._dynamo``: seconds) must not land in the first timed row."""
    from .shapes import SHAPES

    shape = SHAPES["tiny"]
    features, lengths, layouts = shape.features(1, shape.dim, settings.dtype, str(settings.device))
    cases = op_cases(shape, features, lengths, op_names, settings)
    cases += method_cases(shape, features, lengths, layouts, method_names, settings)
    for case in cases:
        for impl, call in case.impls.items():
            if _refusal(case, impl, settings) is None:
                with contextlib.suppress(Exception):  # a failure shows up in its real row, with its message
                    call()
    _sync(settings.device)


def run_cases(
    cases: Sequence[Case], settings: Settings, progress: Callable[[int, int, Case, list[Row]], None] | None = None
) -> list[Row]:
    """Run every case in order; ``progress(i, total, case, rows)`` after each (the CLI logs one line per case)."""
    rows: list[Row] = []
    for i, case in enumerate(cases, 1):
        case_rows = run_case(case, settings)
        rows.extend(case_rows)
        if progress is not None:
            progress(i, len(cases), case, case_rows)
    return rows


@contextlib.contextmanager
def threads(count: int | None):
    """Temporarily set ``torch.set_num_threads`` (None: unchanged)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
