"""The graph ops' spec written as explicit Python loops over float64 Python floats, independent of
``mrprune.reference``: the oracle the reference itself is tested against (shared by the graph-op test files)."""

from __future__ import annotations

import math

import torch


def unit(row: list[float]) -> list[float]:
    """``row / max(||row||, 1e-12)``."""
    norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
    return [v / norm for v in row]


def edge_softmax(similarities: list[float], threshold: float, temperature: float) -> tuple[list[float], float]:
    """One row of the official thresholded softmax: logits ``S / T`` where ``S >= threshold`` and ``|S / T| >= 1e-6``,
    -5000 elsewhere; returns the probabilities and the degree (edge count, or the row length without edges)."""
    logits, edges = [], 0
    for s in similarities:
        z = (s if s >= threshold else 0.0) / temperature
        edge = abs(z) >= 1e-6
        edges += edge
        logits.append(z if edge else -5000.0)
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    return [e / total for e in exps], float(edges if edges else len(similarities))


def cosine_graph(x: list[list[float]], threshold: float, temperature: float):
    """``(P, degree)`` of the rows of ``x`` as nested lists."""
    units = [unit(row) for row in x]
    rows = [
        edge_softmax([sum(a * b for a, b in zip(u, v, strict=True)) for v in units], threshold, temperature)
        for u in units
    ]
    return [p for p, _ in rows], [d for _, d in rows]


def propagate(graph: list[list[float]], degree: list[float], weights: list[float], iterations: int) -> list[float]:
    """``(w^T P^t)_j / degree_j`` with loops over i and j."""
    n = len(weights)
    mass = list(weights)
    for _ in range(iterations):
        mass = [sum(mass[i] * graph[i][j] for i in range(n)) for j in range(n)]
    return [mass[j] / degree[j] for j in range(n)]


def graph_scores(x: list[list[float]], weights, threshold: float, temperature: float, iterations: int) -> list[float]:
    """Cosine graph then ``iterations`` propagation steps; ``weights=None`` means the row norms."""
    w = [math.sqrt(sum(v * v for v in row)) for row in x] if weights is None else list(weights)
    graph, degree = cosine_graph(x, threshold, temperature)
    return propagate(graph, degree, w, iterations)


def transfer(queries, keys, mask, weights, threshold: float, temperature: float) -> list[float]:
    """``prop_i = sum_k w_k Q_ik / dc_i`` over the masked keys in ascending order (0 if none)."""
    selected = [k for k in range(len(keys)) if mask[k]]
    if not selected:
        return [0.0] * len(queries)
    w = [math.sqrt(sum(v * v for v in keys[k])) if weights is None else weights[k] for k in selected]
    key_units = [unit(keys[k]) for k in selected]
    out = []
    for q in queries:
        qu = unit(q)
        probs, degree = edge_softmax(
            [sum(a * b for a, b in zip(qu, ku, strict=True)) for ku in key_units], threshold, temperature
        )
        out.append(sum(wk * p for wk, p in zip(w, probs, strict=True)) / degree)
    return out


def tiny_random(n: int, dim: int, seed: int) -> list[list[float]]:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()


#: (rows, threshold, temperature): tiny cases with every corner of the edge rule.
TINY_GRAPH_CASES = {
    "random": (tiny_random(6, 4, seed=1), 0.5, 0.03),
    "random_t01": (tiny_random(7, 5, seed=2), 0.2, 0.1),
    "zero_vector": ([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.5, 0.1], [-1.0, 0.0, 3.0]], 0.5, 0.03),
    "high_threshold": ([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], 1.5, 0.03),
    "threshold_zero": ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1, 0.2, 0.0], [0.0, 0.0, 0.0]], 0.0, 0.1),
    "threshold_negative": ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.5], [0.3, -2.0, 1.0]], -0.4, 0.1),
    # cos([3, 4], [1, 0]) = 3/5 = 0.6 exactly: an entry equal to the threshold is an edge; the duplicates tie.
    "tie_at_threshold": ([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, 4.0]], 0.6, 0.05),
    # exp((-0.995 - 1) / 1e-3) underflows to 0, but that entry is still an edge: the degree counts it.
    "underflowing_edge": ([[1.0, 0.0], [-1.0, 0.1], [0.5, 0.5]], -1.0, 1e-3),
    "single": ([[0.5, -1.0, 2.0, 0.0, 1.0]], 0.5, 0.03),
}
