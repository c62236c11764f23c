"""Argument checks shared by every op, run before any implementation (and, for shapes, by the fakes).

Shape, dtype and device checks work on fake tensors. Value checks (lengths in range, finite features, seeds in range)
read data: on CPU tensors on the host, raising ``ValueError``; on GPU tensors without any host synchronisation, as
asynchronous device assertions (``torch._assert_async``: the op stays capturable in a CUDA graph, and a bad value
surfaces at the next synchronisation as a device-side assert carrying the same message); they are skipped for fake
CPU and meta tensors (tracing: the real call checks them). All name the op and the argument (``TypeError`` for a wrong
dtype).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import operator
import os
from collections.abc import Callable, Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
#: Smallest supported softmax temperature: the logits ``S / T`` (``|S| <= 1``) stay below 1e30, far from float32
#: overflow (3.4e38) even after a kernel's rescaling, so the softmax never sees ``inf - inf`` (docs/numerics.md).
MIN_TEMPERATURE = 1e-30


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"


def _on_host(t: torch.Tensor) -> bool:
    """A real CPU tensor: its values are checked on the host."""
    return t.device.type == "cpu" and not _is_fake(t)


def _on_device(t: torch.Tensor) -> bool:
    """A GPU tensor, real or fake (tracing a GPU call): checked by device assertions, never read on the host."""
    return t.device.type not in ("cpu", "meta")


def _check(t: torch.Tensor, ok: Callable[[], torch.Tensor], message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok()`` (a bool scalar tensor computed from ``t``) holds: on the host for
    CPU tensors, as an asynchronous device assertion on GPU tensors, not at all for fake CPU or meta tensors."""
    if _on_host(t):
        if not bool(ok()):
            raise ValueError(message)
    elif _on_device(t):
        torch._assert_async(ok(), message)


def check_finite_enabled() -> bool:
    """Whether features are scanned for NaN/Inf (``MRPRUNE_CHECK_FINITE=0`` turns it off; on CUDA it syncs)."""
    return os.environ.get("MRPRUNE_CHECK_FINITE", "1") != "0"


def features(op: str, name: str, x: torch.Tensor, rank: int = 3) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mrprune.{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"mrprune.{op}: {name} must be {rank}-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mrprune.{op}: {name} must be float16/bfloat16/float32/float64, got {x.dtype}")


def same_device(
    op: str, reference: torch.Tensor, reference_name: str = "features", **tensors: torch.Tensor | None
) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"mrprune.{op}: {name} is on {t.device} but {reference_name} is on {reference.device}")


def shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"mrprune.{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def lengths(op: str, lengths: torch.Tensor, batch: int, tokens: int, name: str = "lengths") -> None:
    """``lengths`` must be an integer ``[batch]`` tensor with values in ``[0, tokens]``."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"mrprune.{op}: {name} must be an int64 Tensor of shape ({batch},)")
    if lengths.dtype not in INDEX_DTYPES:
        raise TypeError(f"mrprune.{op}: {name} must be int32 or int64, got {lengths.dtype}")
    shape(op, name, lengths, (batch,))
    if not lengths.numel():
        return
    message = f"mrprune.{op}: {name} must lie in [0, {tokens}]"
    if _on_host(lengths):
        message += f", got {lengths.tolist()}"
    _check(lengths, lambda: ((lengths >= 0) & (lengths <= tokens)).all(), message)


def max_abs_for_norms(dtype: torch.dtype, dim: int) -> float:
    """Largest ``|x|`` for which a ``dim``-long row's squared norm cannot overflow its compute dtype (float32, or
    float64 for float64), with a factor 2 of headroom for rounding in the sum."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return math.sqrt(torch.finfo(compute).max / (2 * max(dim, 1)))


#: Within :func:`scan_once`: id(tensor) -> (tensor, its version, min, max) of every host tensor scanned so far.
_scanned: contextvars.ContextVar[dict[int, tuple[torch.Tensor, int, float, float]] | None] = contextvars.ContextVar(
    "mrprune_scanned", default=None
)


@contextlib.contextmanager
def scan_once() -> Iterator[None]:
    """Within the block, :func:`finite` scans each host tensor object once (until it is modified in place): a method
    hands the same features to several ops, and each scan reads all of them (4 ms per 38 MB of float32)."""
    token = _scanned.set({})
    try:
        yield
    finally:
        _scanned.reset(token)


def vouch_finite(x: torch.Tensor) -> None:
    """Within :func:`scan_once`, :func:`finite` skips ``x`` (until it is modified in place): the caller found the
    float32 norm of every row of ``x`` finite, so no entry is NaN/Inf and no squared norm overflows (the exact
    condition that ``finite(vectors=True)``'s bound on the largest entry guards). Saves a read of the features."""
    memo = _scanned.get()
    if memo is not None and _on_host(x):
        memo[id(x)] = (x, _version(x), 0.0, 0.0)  # nothing to report: within any bound


def _version(x: torch.Tensor) -> int:
    """The in-place modification count of ``x`` (-1 for an inference tensor, which has none)."""
    return -1 if x.is_inference() else x._version


def _host_min_max(x: torch.Tensor) -> tuple[float, float]:
    memo = _scanned.get()
    if memo is not None and (hit := memo.get(id(x))) is not None and hit[0] is x and hit[1] == _version(x):
        return hit[2], hit[3]
    # One vectorised min/max pass (NaN propagates into both), no temporary: an order of magnitude cheaper than an
    # infinity norm of bfloat16/float16 data, which upcasts element by element.
    low, high = (float(v) for v in torch.aminmax(x))
    if memo is not None:
        memo[id(x)] = (x, _version(x), low, high)  # holds x, so its id is not reused within the block
    return low, high


def finite(op: str, name: str, x: torch.Tensor, vectors: bool = False) -> None:
    """No NaN/Inf in ``x``; with ``vectors``, also no entry so large that a row's squared norm overflows."""
    if not check_finite_enabled() or not x.numel():
        return
    if _on_device(x):
        largest = torch.linalg.vector_norm(x, ord=math.inf, dtype=torch.float32)  # one reduction; NaN propagates
        torch._assert_async(torch.isfinite(largest), f"mrprune.{op}: {name} contains NaN or Inf")
        if vectors:
            bound = max_abs_for_norms(x.dtype, x.shape[-1])
            message = f"mrprune.{op}: {name} has entries so large that squared norms could overflow (|x| > {bound:.3g})"
            torch._assert_async(torch.le(largest, bound), message)
        return
    if not _on_host(x):
        return
    low, high = _host_min_max(x)
    largest = max(-low, high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"mrprune.{op}: {name} contains NaN or Inf")
    if vectors and largest > (bound := max_abs_for_norms(x.dtype, x.shape[-1])):
        raise ValueError(
            f"mrprune.{op}: {name} has entries up to {largest:.3g}; with D = {x.shape[-1]} squared norms could "
            f"overflow (|x| must stay <= {bound:.3g}); scale the features down (cosines and selections are "
            "scale-invariant)"
        )


def tensor(op: str, name: str, t: object) -> None:
    """A required tensor argument is a tensor (not ``None``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mrprune.{op}: {name} must be a Tensor, got {type(t).__name__}")


def integer(op: str, name: str, value: object) -> int:
    """An integer argument (Python or NumPy int, never a bool or float, which the dispatcher would coerce)."""
    if isinstance(value, torch.SymInt):  # traced
        return value
    message = f"mrprune.{op}: {name} must be an int, got {type(value).__name__} {value!r}"
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(message)
    try:
        return operator.index(value)
    except TypeError:  # e.g. a float or multi-element tensor
        raise TypeError(message) from None


def boolean(op: str, name: str, value: object) -> bool:
    """A flag argument is a bool (``None`` or 0/1 would silently mean something)."""
    if not isinstance(value, bool):
        raise TypeError(f"mrprune.{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def real(op: str, name: str, value: object) -> float:
    """A finite real argument (int or float, never a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"mrprune.{op}: {name} must be a finite number, got {value!r}")
    return float(value)


def weights(op: str, name: str, w: torch.Tensor | None, expected: tuple[int, ...], non_negative: bool = False) -> None:
    if w is None:
        return
    features(op, name, w, rank=len(expected))
    shape(op, name, w, expected)
    finite(op, name, w)
    if non_negative and w.numel():
        _check(w, lambda: torch.logical_not((w < 0).any()), f"mrprune.{op}: {name} must be non-negative")


def queries_and_keys(op: str, queries: torch.Tensor, keys: torch.Tensor) -> int:
    """Queries ``[B, M, D]`` and keys ``[B, N, D]`` must agree on ``B`` and ``D``; returns ``B``."""
    batch, _, dim = queries.shape
    if keys.shape[0] != batch or keys.shape[2] != dim:
        raise ValueError(
            f"mrprune.{op}: keys must be [B={batch}, N, D={dim}] like the queries, got {tuple(keys.shape)}"
        )
    return batch


def graph_hyper(op: str, threshold: float, temperature: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ValueError(f"mrprune.{op}: threshold must be finite (a number), got {threshold!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE)
    ):
        raise ValueError(
            f"mrprune.{op}: temperature must be positive and finite, >= {MIN_TEMPERATURE:g} (smaller ones overflow "
            f"the logits S / temperature and turn the softmax into NaN), got {temperature!r}"
        )


def iterations(op: str, iterations: int) -> None:
    if integer(op, "iterations", iterations) < 1:
        raise ValueError(f"mrprune.{op}: iterations must be >= 1, got {iterations}")


def budget(op: str, k: int, tokens: int) -> None:
    if not 0 <= integer(op, "k", k) <= tokens:
        raise ValueError(f"mrprune.{op}: k must lie in [0, N={tokens}] (the padded token count), got {k}")


def tolerance(op: str, tol: float, name: str = "exhaustion_tol") -> None:
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not (math.isfinite(tol) and 0 <= tol < 1):
        raise ValueError(f"mrprune.{op}: {name} must lie in [0, 1), got {tol!r}")


def index_tensor(op: str, name: str, t: object, expected: tuple[int, ...]) -> None:
    """An integer index tensor of shape ``expected`` (a seed per item, ...)."""
    tensor(op, name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"mrprune.{op}: {name} must be int32 or int64, got {t.dtype}")
    shape(op, name, t, expected)


# --- per-op checks -----------------------------------------------------------------------------------------------


def cosine_graph(op: str, x: torch.Tensor, lens: torch.Tensor, threshold: float, temperature: float) -> None:
    features(op, "features", x)
    same_device(op, x, lengths=lens)
    lengths(op, lens, x.shape[0], x.shape[1])
    graph_hyper(op, threshold, temperature)
    finite(op, "features", x, vectors=True)


def graph_propagate(
    op: str, graph: torch.Tensor, degree: torch.Tensor, w: torch.Tensor, lens: torch.Tensor, iters: int
) -> None:
    features(op, "graph", graph)
    tensor(op, "degree", degree)
    tensor(op, "weights", w)
    batch, tokens, cols = graph.shape
    if cols != tokens:
        raise ValueError(f"mrprune.{op}: graph must be square per item [B, N, N], got {tuple(graph.shape)}")
    same_device(op, graph, "graph", degree=degree, weights=w, lengths=lens)
    weights(op, "degree", degree, (batch, tokens))
    weights(op, "weights", w, (batch, tokens))
    lengths(op, lens, batch, tokens)
    iterations(op, iters)
    finite(op, "graph", graph)
    if degree.numel():
        bad = (degree <= 0) & (torch.arange(tokens, device=degree.device) < lens.unsqueeze(1))
        message = f"mrprune.{op}: degree must be positive on valid tokens"
        if _on_host(degree) and bool(bad.any()):
            message += f" (item {int(bad.any(dim=1).nonzero()[0, 0])})"
        _check(degree, lambda: torch.logical_not(bad.any()), message)


def graph_scores(
    op: str,
    x: torch.Tensor,
    lens: torch.Tensor,
    w: torch.Tensor | None,
    threshold: float,
    temperature: float,
    iters: int,
) -> None:
    cosine_graph(op, x, lens, threshold, temperature)
    same_device(op, x, weights=w)
    weights(op, "weights", w, tuple(x.shape[:2]))
    iterations(op, iters)


def transfer_scores(
    op: str,
    queries: torch.Tensor,
    query_lengths: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    key_weights: torch.Tensor | None,
    threshold: float,
    temperature: float,
) -> None:
    features(op, "queries", queries)
    features(op, "keys", keys)
    same_device(
        op, queries, "queries", query_lengths=query_lengths, keys=keys, key_mask=key_mask, key_weights=key_weights
    )
    batch = queries_and_keys(op, queries, keys)
    lengths(op, query_lengths, batch, queries.shape[1], name="query_lengths")
    tensor(op, "key_mask", key_mask)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"mrprune.{op}: key_mask must be bool, got {key_mask.dtype}")
    shape(op, "key_mask", key_mask, tuple(keys.shape[:2]))
    weights(op, "key_weights", key_weights, tuple(keys.shape[:2]))
    graph_hyper(op, threshold, temperature)
    finite(op, "queries", queries, vectors=True)
    finite(op, "keys", keys, vectors=True)


def greedy_residual_select(
    op: str,
    x: torch.Tensor,
    lens: torch.Tensor,
    k: int,
    gate: torch.Tensor | None,
    seed: torch.Tensor | None,
    exhaustion_tol: float,
    algorithm: str,
) -> None:
    features(op, "features", x)
    same_device(op, x, lengths=lens, gate=gate, seed=seed)
    batch, tokens, _ = x.shape
    lengths(op, lens, batch, tokens)
    budget(op, k, tokens)
    weights(op, "gate", gate, (batch, tokens), non_negative=True)
    if seed is not None:
        index_tensor(op, "seed", seed, (batch,))
        message = f"mrprune.{op}: seed must be < lengths (or negative for none)"
        if _on_host(seed):
            message += f", got {seed.tolist()}"
        _check(seed, lambda: torch.logical_not((seed >= lens).any()), message)
    tolerance(op, exhaustion_tol)
    if algorithm not in ("auto", "gram", "basis"):
        raise ValueError(f"mrprune.{op}: algorithm must be 'auto', 'gram' or 'basis', got {algorithm!r}")
    finite(op, "features", x, vectors=True)


def diversity_select(op: str, x: torch.Tensor, lens: torch.Tensor, k: int, mask_picked: bool) -> None:
    features(op, "features", x)
    boolean(op, "mask_picked", mask_picked)
    same_device(op, x, lengths=lens)
    lengths(op, lens, x.shape[0], x.shape[1])
    budget(op, k, x.shape[1])
    finite(op, "features", x, vectors=True)


def max_cosine(
    op: str, queries: torch.Tensor, query_lengths: torch.Tensor, keys: torch.Tensor, key_lengths: torch.Tensor
) -> None:
    features(op, "queries", queries)
    features(op, "keys", keys)
    same_device(op, queries, "queries", query_lengths=query_lengths, keys=keys, key_lengths=key_lengths)
    batch = queries_and_keys(op, queries, keys)
    lengths(op, query_lengths, batch, queries.shape[1], name="query_lengths")
    lengths(op, key_lengths, batch, keys.shape[1], name="key_lengths")
    finite(op, "queries", queries, vectors=True)
    finite(op, "keys", keys, vectors=True)


def topk_indices(op: str, scores: torch.Tensor, lens: torch.Tensor, k: int, sort_indices: bool) -> None:
    features(op, "scores", scores, rank=2)
    boolean(op, "sort_indices", sort_indices)
    same_device(op, scores, "scores", lengths=lens)
    lengths(op, lens, scores.shape[0], scores.shape[1])
    budget(op, k, scores.shape[1])
    if scores.numel():
        # padding is never ranked, so only the valid scores matter (as in the other ops)
        valid = torch.arange(scores.shape[1], device=scores.device) < lens.unsqueeze(1)
        _check(
            scores, lambda: torch.logical_not((torch.isnan(scores) & valid).any()), f"mrprune.{op}: scores contain NaN"
        )


def received_attention(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    lens: torch.Tensor,
    segment_ids: torch.Tensor | None,
    scale: float | None,
) -> None:
    features(op, "q", q, rank=4)
    features(op, "k", k, rank=4)
    if k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(
            f"mrprune.{op}: k must match q in shape [B, H, N, d] and dtype, got q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)} {k.dtype}"
        )
    same_device(op, q, "q", k=k, lengths=lens, segment_ids=segment_ids)
    batch, heads, tokens, dim = q.shape
    if heads < 1 or dim < 1:
        raise ValueError(f"mrprune.{op}: q and k need at least one head and one feature, got {tuple(q.shape)}")
    lengths(op, lens, batch, tokens)
    if segment_ids is not None:
        index_tensor(op, "segment_ids", segment_ids, (batch, tokens))
    if scale is not None and not (real(op, "scale", scale) > 0):
        raise ValueError(f"mrprune.{op}: scale must be positive, got {scale!r}")
    finite(op, "q", q, vectors=True)
    finite(op, "k", k, vectors=True)


def coverage_select(
    op: str, x: torch.Tensor, lens: torch.Tensor, k: int, saliency: torch.Tensor | None, alpha: float
) -> None:
    features(op, "features", x)
    same_device(op, x, lengths=lens, saliency=saliency)
    batch, tokens, _ = x.shape
    lengths(op, lens, batch, tokens)
    budget(op, k, tokens)
    weights(op, "saliency", saliency, (batch, tokens), non_negative=True)
    if real(op, "alpha", alpha) < 0:
        raise ValueError(f"mrprune.{op}: alpha must be >= 0, got {alpha!r}")
    finite(op, "features", x, vectors=True)


def bipartite_dedup(op: str, x: torch.Tensor, lens: torch.Tensor, k: int, per_round: int) -> None:
    features(op, "features", x)
    same_device(op, x, lengths=lens)
    lengths(op, lens, x.shape[0], x.shape[1])
    budget(op, k, x.shape[1])
    if integer(op, "per_round", per_round) < 1:
        raise ValueError(f"mrprune.{op}: per_round must be >= 1, got {per_round}")
    finite(op, "features", x, vectors=True)


# --- token merging and multi-row attention (issue 17) ------------------------------------------------------------


def _tokens_and_metric(op: str, x: torch.Tensor, metric: torch.Tensor, lens: torch.Tensor) -> tuple[int, int]:
    """``x [B, N, D]`` and ``metric [B, N, C]`` (same B and N), ``lengths [B]``; returns ``(B, N)``."""
    features(op, "x", x)
    features(op, "metric", metric)
    same_device(op, x, "x", metric=metric, lengths=lens)
    batch, tokens, _ = x.shape
    if tuple(metric.shape[:2]) != (batch, tokens):
        raise ValueError(f"mrprune.{op}: metric must be [B={batch}, N={tokens}, C] like x, got {tuple(metric.shape)}")
    lengths(op, lens, batch, tokens)
    return batch, tokens


def slot_positions(op: str, name: str, t: object, batch: int, lens: torch.Tensor, distinct: bool) -> None:
    """``t [B, S]`` integer positions, each ``-1`` (unused) or in ``[0, lengths[b])``; with ``distinct``, no position
    twice in an item."""
    tensor(op, name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"mrprune.{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] != batch:
        raise ValueError(f"mrprune.{op}: {name} must have shape ({batch}, S), got {tuple(t.shape)}")
    same_device(op, lens, "lengths", **{name: t})
    if not t.numel():
        return
    in_range = (t == -1) | ((t >= 0) & (t < lens[:, None]))
    _check(t, lambda: in_range.all(), f"mrprune.{op}: {name} must be -1 or lie in [0, lengths[b])")
    if distinct and t.shape[1] > 1:
        ordered = t.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        _check(t, lambda: ~repeated.any(), f"mrprune.{op}: {name} must not repeat a position within an item")


def bipartite_merge(
    op: str,
    x: torch.Tensor,
    metric: torch.Tensor,
    lens: torch.Tensor,
    r: int,
    sizes: torch.Tensor | None,
    protect_first: bool,
    spatial_order: bool,
) -> None:
    batch, tokens = _tokens_and_metric(op, x, metric, lens)
    boolean(op, "protect_first", protect_first)
    boolean(op, "spatial_order", spatial_order)
    most = max(tokens - (1 if protect_first else 0), 0) // 2
    if not 0 <= integer(op, "r", r) <= most:
        raise ValueError(
            f"mrprune.{op}: r must lie in [0, {most}] (at most half of the N={tokens} padded tokens"
            f"{', the protected first one excluded' if protect_first else ''}; ToMe caps r there), got {r}"
        )
    same_device(op, x, "x", sizes=sizes)
    weights(op, "sizes", sizes, (batch, tokens))
    if sizes is not None and sizes.numel():
        valid = torch.arange(tokens, device=sizes.device) < lens[:, None]
        _check(sizes, lambda: ~((sizes <= 0) & valid).any(), f"mrprune.{op}: sizes must be positive on valid tokens")
    finite(op, "x", x)
    finite(op, "metric", metric, vectors=True)


def assign_merge(
    op: str, x: torch.Tensor, metric: torch.Tensor, lens: torch.Tensor, targets: torch.Tensor, include_target: bool
) -> None:
    batch, _ = _tokens_and_metric(op, x, metric, lens)
    slot_positions(op, "targets", targets, batch, lens, distinct=True)
    boolean(op, "include_target", include_target)
    finite(op, "x", x)
    finite(op, "metric", metric, vectors=True)


def knn_weighted_merge(
    op: str,
    x: torch.Tensor,
    metric: torch.Tensor,
    w: torch.Tensor,
    lens: torch.Tensor,
    kept: torch.Tensor,
    k: int,
) -> None:
    batch, tokens = _tokens_and_metric(op, x, metric, lens)
    tensor(op, "weights", w)
    same_device(op, x, "x", weights=w)
    weights(op, "weights", w, (batch, tokens))
    slot_positions(op, "kept", kept, batch, lens, distinct=False)
    budget(op, k, tokens)
    finite(op, "x", x)
    finite(op, "metric", metric, vectors=True)


def attention_rows(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    query_positions: torch.Tensor | None,
    scale: float | None,
    reduce: bool,
) -> None:
    features(op, "q", q, rank=4)
    features(op, "k", k, rank=4)
    batch, heads, rows, dim = q.shape
    if k.dtype != q.dtype:
        raise TypeError(f"mrprune.{op}: k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"mrprune.{op}: k must be [B={batch}, H_kv, N, d={dim}] like q, got {tuple(k.shape)}")
    kv_heads, tokens = k.shape[1], k.shape[2]
    if heads < 1 or dim < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"mrprune.{op}: q needs H >= 1 heads, a multiple of k's H_kv >= 1, and d >= 1; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    same_device(op, q, "q", k=k, key_mask=key_mask, query_positions=query_positions)
    tensor(op, "key_mask", key_mask)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"mrprune.{op}: key_mask must be bool, got {key_mask.dtype}")
    shape(op, "key_mask", key_mask, (batch, tokens))
    if query_positions is not None:
        index_tensor(op, "query_positions", query_positions, (batch, rows))
        if query_positions.numel():
            _check(
                query_positions,
                lambda: ((query_positions >= -1) & (query_positions < tokens)).all(),
                f"mrprune.{op}: query_positions must be -1 (a padded row) or lie in [0, N={tokens})",
            )
    if scale is not None and not (real(op, "scale", scale) > 0):
        raise ValueError(f"mrprune.{op}: scale must be positive, got {scale!r}")
    boolean(op, "reduce", reduce)
    finite(op, "q", q, vectors=True)
    finite(op, "k", k, vectors=True)


def density_peak_merge(op: str, x: torch.Tensor, lens: torch.Tensor, clusters: int, neighbors: int | None) -> None:
    features(op, "x", x)
    same_device(op, x, "x", lengths=lens)
    lengths(op, lens, x.shape[0], x.shape[1])
    if not 0 <= integer(op, "clusters", clusters) <= x.shape[1]:
        raise ValueError(f"mrprune.{op}: clusters must lie in [0, N={x.shape[1]}], got {clusters}")
    if neighbors is not None and integer(op, "neighbors", neighbors) < 1:
        raise ValueError(f"mrprune.{op}: neighbors must be >= 1 (or None), got {neighbors}")
    finite(op, "x", x, vectors=True)
