"""Argument checks shared by every op, run before any implementation (and, for shapes, by the fakes).

Shape, dtype and device checks work on fake tensors; value checks (lengths in range, finite features, seeds in range)
read data and are skipped while tracing. All raise ``ValueError`` (``TypeError`` for a wrong dtype) naming the op and
the argument.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"


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
    if not _is_fake(lengths) and lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > tokens):
        raise ValueError(f"mrprune.{op}: {name} must lie in [0, {tokens}], got {lengths.tolist()}")


def finite(op: str, name: str, x: torch.Tensor) -> None:
    if check_finite_enabled() and not _is_fake(x) and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"mrprune.{op}: {name} contains NaN or Inf")


def weights(op: str, name: str, w: torch.Tensor | None, expected: tuple[int, ...], non_negative: bool = False) -> None:
    if w is None:
        return
    features(op, name, w, rank=len(expected))
    shape(op, name, w, expected)
    finite(op, name, w)
    if non_negative and not _is_fake(w) and w.numel() and bool((w < 0).any()):
        raise ValueError(f"mrprune.{op}: {name} must be non-negative")


def queries_and_keys(op: str, queries: torch.Tensor, keys: torch.Tensor) -> int:
    """Queries ``[B, M, D]`` and keys ``[B, N, D]`` must agree on ``B`` and ``D``; returns ``B``."""
    batch, _, dim = queries.shape
    if keys.shape[0] != batch or keys.shape[2] != dim:
        raise ValueError(
            f"mrprune.{op}: keys must be [B={batch}, N, D={dim}] like the queries, got {tuple(keys.shape)}"
        )
    return batch


def graph_hyper(op: str, threshold: float, temperature: float) -> None:
    if not math.isfinite(threshold):
        raise ValueError(f"mrprune.{op}: threshold must be finite, got {threshold}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"mrprune.{op}: temperature must be positive and finite, got {temperature}")


def iterations(op: str, iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"mrprune.{op}: iterations must be >= 1, got {iterations}")


def budget(op: str, k: int, tokens: int) -> None:
    if not 0 <= k <= tokens:
        raise ValueError(f"mrprune.{op}: k must lie in [0, N={tokens}] (the padded token count), got {k}")


# --- per-op checks -----------------------------------------------------------------------------------------------


def cosine_graph(op: str, x: torch.Tensor, lens: torch.Tensor, threshold: float, temperature: float) -> None:
    features(op, "features", x)
    same_device(op, x, lengths=lens)
    lengths(op, lens, x.shape[0], x.shape[1])
    graph_hyper(op, threshold, temperature)
    finite(op, "features", x)


def graph_propagate(
    op: str, graph: torch.Tensor, degree: torch.Tensor, w: torch.Tensor, lens: torch.Tensor, iters: int
) -> None:
    features(op, "graph", graph)
    batch, tokens, cols = graph.shape
    if cols != tokens:
        raise ValueError(f"mrprune.{op}: graph must be square per item [B, N, N], got {tuple(graph.shape)}")
    same_device(op, graph, "graph", degree=degree, weights=w, lengths=lens)
    weights(op, "degree", degree, (batch, tokens))
    weights(op, "weights", w, (batch, tokens))
    lengths(op, lens, batch, tokens)
    iterations(op, iters)
    finite(op, "graph", graph)
    if not _is_fake(degree):
        for b, n in enumerate(lens.tolist()):
            if n and bool((degree[b, :n] <= 0).any()):
                raise ValueError(f"mrprune.{op}: degree must be positive on valid tokens (item {b})")


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
    if key_mask.dtype != torch.bool:
        raise TypeError(f"mrprune.{op}: key_mask must be bool, got {key_mask.dtype}")
    shape(op, "key_mask", key_mask, tuple(keys.shape[:2]))
    weights(op, "key_weights", key_weights, tuple(keys.shape[:2]))
    graph_hyper(op, threshold, temperature)
    finite(op, "queries", queries)
    finite(op, "keys", keys)


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
        if seed.dtype not in INDEX_DTYPES:
            raise TypeError(f"mrprune.{op}: seed must be int32 or int64, got {seed.dtype}")
        shape(op, "seed", seed, (batch,))
        if not _is_fake(seed) and bool((seed >= lens).any()):
            raise ValueError(f"mrprune.{op}: seed must be < lengths (or negative for none), got {seed.tolist()}")
    if not (math.isfinite(exhaustion_tol) and 0 <= exhaustion_tol < 1):
        raise ValueError(f"mrprune.{op}: exhaustion_tol must lie in [0, 1), got {exhaustion_tol}")
    if algorithm not in ("auto", "gram", "basis"):
        raise ValueError(f"mrprune.{op}: algorithm must be 'auto', 'gram' or 'basis', got {algorithm!r}")
    finite(op, "features", x)


def diversity_select(op: str, x: torch.Tensor, lens: torch.Tensor, k: int, mask_picked: bool) -> None:
    features(op, "features", x)
    same_device(op, x, lengths=lens)
    lengths(op, lens, x.shape[0], x.shape[1])
    budget(op, k, x.shape[1])
    finite(op, "features", x)


def max_cosine(
    op: str, queries: torch.Tensor, query_lengths: torch.Tensor, keys: torch.Tensor, key_lengths: torch.Tensor
) -> None:
    features(op, "queries", queries)
    features(op, "keys", keys)
    same_device(op, queries, "queries", query_lengths=query_lengths, keys=keys, key_lengths=key_lengths)
    batch = queries_and_keys(op, queries, keys)
    lengths(op, query_lengths, batch, queries.shape[1], name="query_lengths")
    lengths(op, key_lengths, batch, keys.shape[1], name="key_lengths")
    finite(op, "queries", queries)
    finite(op, "keys", keys)


def topk_indices(op: str, scores: torch.Tensor, lens: torch.Tensor, k: int, sort_indices: bool) -> None:
    features(op, "scores", scores, rank=2)
    same_device(op, scores, "scores", lengths=lens)
    lengths(op, lens, scores.shape[0], scores.shape[1])
    budget(op, k, scores.shape[1])
    if not _is_fake(scores) and bool(torch.isnan(scores).any()):
        raise ValueError(f"mrprune.{op}: scores contain NaN")
