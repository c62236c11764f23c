"""The ``torch.ops.mrprune`` library: one schema per op, its fake, and the router that validates then dispatches.

Each public op ``name`` is defined here once (Python ``DEF``; the C++ side only registers ``*_IMPL`` kernels). Its
CPU and CUDA kernels are this module's router, which validates the arguments (``mrprune._validation``) and calls the
implementation chosen by ``mrprune.backends``: the eager reference, the C++ CPU kernel (private op
``_<name>_cpu``), the CUDA C++ kernel (``_<name>_cuda``) or Triton (``_<name>_triton``, registered by
``mrprune.triton_kernels``). The private C++ ops share the public schema and receive canonical inputs: contiguous,
float32 features, int64 indices.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from . import _validation, backends, reference

# Shapes: B batch, N padded tokens, M padded query tokens, D features, k budget. Scores and graphs are float32
# (float64 for float64 input); indices int64.
SCHEMAS = {
    # features [B,N,D], lengths [B] -> graph [B,N,N], degree [B,N]
    "cosine_graph": (
        "(Tensor features, Tensor lengths, float threshold=0.5, float temperature=0.03) -> (Tensor, Tensor)"
    ),
    # graph [B,N,N], degree [B,N], weights [B,N], lengths [B] -> scores [B,N]
    "graph_propagate": "(Tensor graph, Tensor degree, Tensor weights, Tensor lengths, int iterations=1) -> Tensor",
    # features [B,N,D], lengths [B], weights [B,N]? -> scores [B,N]
    "graph_scores": (
        "(Tensor features, Tensor lengths, Tensor? weights=None, float threshold=0.5, float temperature=0.03, "
        "int iterations=1) -> Tensor"
    ),
    # queries [B,M,D], query_lengths [B], keys [B,N,D], key_mask [B,N] bool, key_weights [B,N]? -> prop [B,M]
    "transfer_scores": (
        "(Tensor queries, Tensor query_lengths, Tensor keys, Tensor key_mask, Tensor? key_weights=None, "
        "float threshold=0.5, float temperature=0.03) -> Tensor"
    ),
    # features [B,N,D], lengths [B], gate [B,N]?, seed [B]? -> indices [B,k] int64, energies [B,k]
    "greedy_residual_select": (
        "(Tensor features, Tensor lengths, int k, Tensor? gate=None, Tensor? seed=None, float exhaustion_tol=1e-05, "
        "str algorithm='auto') -> (Tensor, Tensor)"
    ),
    # features [B,N,D], lengths [B] -> indices [B,k] int64
    "diversity_select": "(Tensor features, Tensor lengths, int k, bool mask_picked=True) -> Tensor",
    # queries [B,M,D], query_lengths [B], keys [B,N,D], key_lengths [B] -> rho [B,M]
    "max_cosine": "(Tensor queries, Tensor query_lengths, Tensor keys, Tensor key_lengths) -> Tensor",
    # scores [B,N], lengths [B] -> indices [B,k] int64
    "topk_indices": "(Tensor scores, Tensor lengths, int k, bool sort_indices=False) -> Tensor",
    # q [B,H,N,d], k [B,H,N,d], lengths [B], segment_ids [B,N]? -> scores [B,N]
    "received_attention": (
        "(Tensor q, Tensor k, Tensor lengths, Tensor? segment_ids=None, float? scale=None) -> Tensor"
    ),
    # features [B,N,D], lengths [B], saliency [B,N]? -> indices [B,k] int64
    "coverage_select": ("(Tensor features, Tensor lengths, int k, Tensor? saliency=None, float alpha=1.0) -> Tensor"),
    # features [B,N,D], lengths [B] -> indices [B,k] int64
    "bipartite_dedup": "(Tensor features, Tensor lengths, int k, int per_round=8) -> Tensor",
    # x [B,N,D], metric [B,N,C], lengths [B], sizes [B,N]? -> merged [B,N-r,D], sizes [B,N-r], source [B,N],
    # out_lengths [B]
    "bipartite_merge": (
        "(Tensor x, Tensor metric, Tensor lengths, int r, Tensor? sizes=None, bool protect_first=True, "
        "bool spatial_order=False) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # x [B,N,D], metric [B,N,C], lengths [B], targets [B,T] -> merged [B,T,D], assignment [B,N], sizes [B,T]
    "assign_merge": (
        "(Tensor x, Tensor metric, Tensor lengths, Tensor targets, bool include_target=False) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    # x [B,N,D], metric [B,N,C], weights [B,N], lengths [B], kept [B,K] -> merged [B,K,D], neighbors [B,K,k]
    "knn_weighted_merge": (
        "(Tensor x, Tensor metric, Tensor weights, Tensor lengths, Tensor kept, int k=32) -> (Tensor, Tensor)"
    ),
    # q [B,H,M,d], k [B,H_kv,N,d], key_mask [B,N], query_positions [B,M]? -> probs [B,M,N] (reduce: [B,N])
    "attention_rows": (
        "(Tensor q, Tensor k, Tensor key_mask, Tensor? query_positions=None, float? scale=None, "
        "bool reduce=False) -> Tensor"
    ),
    # x [B,N,D], lengths [B] -> merged [B,c,D], assignment [B,N], centers [B,c]
    "density_peak_merge": ("(Tensor x, Tensor lengths, int clusters, int? neighbors=None) -> (Tensor, Tensor, Tensor)"),
}
#: Ops with a CUDA C++ kernel (``csrc/cuda/<op>.cu``).
CUDA_OPS = ("topk_indices", "greedy_residual_select", "diversity_select", "coverage_select", "bipartite_dedup")

_lib = torch.library.Library("mrprune", "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.define(f"_{_name}_cpu" + _schema)
for _name in CUDA_OPS:
    _lib.define(f"_{_name}_cuda" + SCHEMAS[_name])


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


# The C++ CPU kernels compute Grams of float16/bfloat16 features natively (float32 accumulation, never an upcast copy
# of the N x D features), and so do the CUDA selections (greedy_residual_select, diversity_select, coverage_select,
# bipartite_dedup) on sm_80+ GPUs (tensor cores); other dtypes and pairs of different dtypes are converted to float32.
_NATIVE_FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _features(t: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    native = t.device.type == "cpu" and t.dtype in _NATIVE_FEATURE_DTYPES and (other is None or other.dtype == t.dtype)
    return (t if native else t.to(torch.float32)).contiguous()


def _cuda_half_features(t: torch.Tensor) -> torch.Tensor:
    """Features of the CUDA selections that read half precision natively: float16/bfloat16 stay native on CPUs and on
    sm_80+ GPUs (WMMA with bf16 needs sm_80)."""
    if t.device.type == "cuda" and t.dtype in (torch.float16, torch.bfloat16):
        # without a CUDA runtime only fake tensors reach here (tracing): keep the dtype, the fake kernel takes it
        sm80 = not torch.cuda.is_available() or torch.cuda.get_device_capability(t.device) >= (8, 0)
        return t.contiguous() if sm80 else t.float().contiguous()
    return _features(t)


def _int64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int64).contiguous()


# --- canonical argument conversion for the C++ kernels (float32 values, int64 indices, contiguous) -----------------
_CANONICAL: dict[str, Callable[..., tuple]] = {
    "cosine_graph": lambda x, lens, thr, temp: (_features(x), _int64(lens), thr, temp),
    "graph_propagate": lambda g, deg, w, lens, it: (_float32(g), _float32(deg), _float32(w), _int64(lens), it),
    "graph_scores": lambda x, lens, w, thr, temp, it: (_features(x), _int64(lens), _float32(w), thr, temp, it),
    "transfer_scores": lambda q, ql, k, km, kw, thr, temp: (
        _features(q, k),
        _int64(ql),
        _features(k, q),
        km.contiguous(),
        _float32(kw),
        thr,
        temp,
    ),
    "greedy_residual_select": lambda x, lens, k, gate, seed, tol, alg: (
        _cuda_half_features(x),
        _int64(lens),
        k,
        _float32(gate),
        _int64(seed),
        tol,
        alg,
    ),
    "diversity_select": lambda x, lens, k, mask: (_cuda_half_features(x), _int64(lens), k, mask),
    "max_cosine": lambda q, ql, k, kl: (_features(q, k), _int64(ql), _features(k, q), _int64(kl)),
    "topk_indices": lambda s, lens, k, sort: (_float32(s), _int64(lens), k, sort),
    "received_attention": lambda q, k, lens, seg, scale: (_float32(q), _float32(k), _int64(lens), _int64(seg), scale),
    "coverage_select": lambda x, lens, k, sal, alpha: (_cuda_half_features(x), _int64(lens), k, _float32(sal), alpha),
    "bipartite_dedup": lambda x, lens, k, r: (_cuda_half_features(x), _int64(lens), k, r),
    # the merges read and write x in its own dtype (float16/bfloat16/float32; float64 goes to the reference)
    "bipartite_merge": lambda x, m, lens, r, sizes, protect, spatial: (
        _features(x),
        _features(m),
        _int64(lens),
        r,
        _float32(sizes),
        protect,
        spatial,
    ),
    "assign_merge": lambda x, m, lens, targets, inc: (_features(x), _features(m), _int64(lens), _int64(targets), inc),
    "knn_weighted_merge": lambda x, m, w, lens, kept, k: (
        _features(x),
        _features(m),
        _float32(w),
        _int64(lens),
        _int64(kept),
        k,
    ),
    "attention_rows": lambda q, k, mask, pos, scale, reduce: (  # q and k share a dtype (validated)
        _features(q),
        _features(k),
        mask.contiguous(),
        _int64(pos),
        scale,
        reduce,
    ),
    "density_peak_merge": lambda x, lens, c, m: (_features(x), _int64(lens), c, m),
}

_VALIDATE = {
    "cosine_graph": _validation.cosine_graph,
    "graph_propagate": _validation.graph_propagate,
    "graph_scores": _validation.graph_scores,
    "transfer_scores": _validation.transfer_scores,
    "greedy_residual_select": _validation.greedy_residual_select,
    "diversity_select": _validation.diversity_select,
    "max_cosine": _validation.max_cosine,
    "topk_indices": _validation.topk_indices,
    "received_attention": _validation.received_attention,
    "coverage_select": _validation.coverage_select,
    "bipartite_dedup": _validation.bipartite_dedup,
    "bipartite_merge": _validation.bipartite_merge,
    "assign_merge": _validation.assign_merge,
    "knn_weighted_merge": _validation.knn_weighted_merge,
    "attention_rows": _validation.attention_rows,
    "density_peak_merge": _validation.density_peak_merge,
}


def _private_op(name: str, suffix: str) -> Callable:
    private = getattr(torch.ops.mrprune, f"_{name}_{suffix}").default
    canonical = _CANONICAL[name]
    return lambda *args: private(*canonical(*args))


def _make_router(name: str) -> Callable:
    validate = _VALIDATE[name]
    signature = inspect.signature(getattr(reference, name))  # the schema's argument order and defaults

    def router(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        args = tuple(bound.arguments.values())
        validate(name, *args)
        first = args[0]
        return backends.call(name, first.device, first.dtype, args)  # demotes a backend that fails to compile or launch

    router.__name__ = f"{name}_router"
    return router


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mrprune::{op}", key)


def register_compiled_kernels() -> None:
    """Register the C++ CPU and CUDA kernels that the loaded extension provides (called after importing ``_C``)."""
    for name in SCHEMAS:
        if _has_kernel(f"_{name}_cpu", "CPU"):
            backends.register(name, "cpp", _private_op(name, "cpu"))
    for name in CUDA_OPS:
        if _has_kernel(f"_{name}_cuda", "CUDA"):
            backends.register(name, "cuda", _private_op(name, "cuda"))


for _name in SCHEMAS:
    backends.register(_name, "reference", getattr(reference, _name))
    torch.library.register_kernel(f"mrprune::{_name}", ("cpu", "cuda"), _make_router(_name), lib=_lib)


# --- fakes (shapes only; the same shape checks as the real call) ------------------------------------------------


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    return reference.compute_dtype(t.dtype)


@torch.library.register_fake("mrprune::cosine_graph", lib=_lib)
def _cosine_graph_fake(features, lengths, threshold=0.5, temperature=0.03):
    _validation.cosine_graph("cosine_graph", features, lengths, threshold, temperature)
    batch, tokens, _ = features.shape
    dtype = _score_dtype(features)
    return features.new_empty(batch, tokens, tokens, dtype=dtype), features.new_empty(batch, tokens, dtype=dtype)


@torch.library.register_fake("mrprune::graph_propagate", lib=_lib)
def _graph_propagate_fake(graph, degree, weights, lengths, iterations=1):
    _validation.graph_propagate("graph_propagate", graph, degree, weights, lengths, iterations)
    return graph.new_empty(graph.shape[:2], dtype=_score_dtype(graph))


@torch.library.register_fake("mrprune::graph_scores", lib=_lib)
def _graph_scores_fake(features, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1):
    _validation.graph_scores("graph_scores", features, lengths, weights, threshold, temperature, iterations)
    return features.new_empty(features.shape[:2], dtype=_score_dtype(features))


@torch.library.register_fake("mrprune::transfer_scores", lib=_lib)
def _transfer_scores_fake(queries, query_lengths, keys, key_mask, key_weights=None, threshold=0.5, temperature=0.03):
    _validation.transfer_scores(
        "transfer_scores", queries, query_lengths, keys, key_mask, key_weights, threshold, temperature
    )
    return queries.new_empty(queries.shape[:2], dtype=_score_dtype(queries))


@torch.library.register_fake("mrprune::greedy_residual_select", lib=_lib)
def _greedy_residual_select_fake(features, lengths, k, gate=None, seed=None, exhaustion_tol=1e-5, algorithm="auto"):
    _validation.greedy_residual_select(
        "greedy_residual_select", features, lengths, k, gate, seed, exhaustion_tol, algorithm
    )
    batch = features.shape[0]
    return (
        features.new_empty(batch, k, dtype=torch.int64),
        features.new_empty(batch, k, dtype=_score_dtype(features)),
    )


@torch.library.register_fake("mrprune::diversity_select", lib=_lib)
def _diversity_select_fake(features, lengths, k, mask_picked=True):
    _validation.diversity_select("diversity_select", features, lengths, k, mask_picked)
    return features.new_empty(features.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("mrprune::max_cosine", lib=_lib)
def _max_cosine_fake(queries, query_lengths, keys, key_lengths):
    _validation.max_cosine("max_cosine", queries, query_lengths, keys, key_lengths)
    return queries.new_empty(queries.shape[:2], dtype=_score_dtype(queries))


@torch.library.register_fake("mrprune::topk_indices", lib=_lib)
def _topk_indices_fake(scores, lengths, k, sort_indices=False):
    _validation.topk_indices("topk_indices", scores, lengths, k, sort_indices)
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("mrprune::received_attention", lib=_lib)
def _received_attention_fake(q, k, lengths, segment_ids=None, scale=None):
    _validation.received_attention("received_attention", q, k, lengths, segment_ids, scale)
    return q.new_empty(q.shape[0], q.shape[2], dtype=_score_dtype(q))


@torch.library.register_fake("mrprune::coverage_select", lib=_lib)
def _coverage_select_fake(features, lengths, k, saliency=None, alpha=1.0):
    _validation.coverage_select("coverage_select", features, lengths, k, saliency, alpha)
    return features.new_empty(features.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("mrprune::bipartite_dedup", lib=_lib)
def _bipartite_dedup_fake(features, lengths, k, per_round=8):
    _validation.bipartite_dedup("bipartite_dedup", features, lengths, k, per_round)
    return features.new_empty(features.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("mrprune::bipartite_merge", lib=_lib)
def _bipartite_merge_fake(x, metric, lengths, r, sizes=None, protect_first=True, spatial_order=False):
    _validation.bipartite_merge("bipartite_merge", x, metric, lengths, r, sizes, protect_first, spatial_order)
    batch, tokens, dim = x.shape
    return (
        x.new_empty(batch, tokens - r, dim),
        x.new_empty(batch, tokens - r, dtype=_score_dtype(x)),
        x.new_empty(batch, tokens, dtype=torch.int64),
        x.new_empty(batch, dtype=torch.int64),
    )


@torch.library.register_fake("mrprune::assign_merge", lib=_lib)
def _assign_merge_fake(x, metric, lengths, targets, include_target=False):
    _validation.assign_merge("assign_merge", x, metric, lengths, targets, include_target)
    batch, tokens, dim = x.shape
    slots = targets.shape[1]
    return (
        x.new_empty(batch, slots, dim),
        x.new_empty(batch, tokens, dtype=torch.int64),
        x.new_empty(batch, slots, dtype=torch.int64),
    )


@torch.library.register_fake("mrprune::knn_weighted_merge", lib=_lib)
def _knn_weighted_merge_fake(x, metric, weights, lengths, kept, k=32):
    _validation.knn_weighted_merge("knn_weighted_merge", x, metric, weights, lengths, kept, k)
    batch, slots, dim = x.shape[0], kept.shape[1], x.shape[2]
    return x.new_empty(batch, slots, dim), x.new_empty(batch, slots, k, dtype=torch.int64)


@torch.library.register_fake("mrprune::attention_rows", lib=_lib)
def _attention_rows_fake(q, k, key_mask, query_positions=None, scale=None, reduce=False):
    _validation.attention_rows("attention_rows", q, k, key_mask, query_positions, scale, reduce)
    batch, rows, tokens = q.shape[0], q.shape[2], k.shape[2]
    shape = (batch, tokens) if reduce else (batch, rows, tokens)
    return q.new_empty(shape, dtype=_score_dtype(q))


@torch.library.register_fake("mrprune::density_peak_merge", lib=_lib)
def _density_peak_merge_fake(x, lengths, clusters, neighbors=None):
    _validation.density_peak_merge("density_peak_merge", x, lengths, clusters, neighbors)
    batch, tokens, dim = x.shape
    return (
        x.new_empty(batch, clusters, dim),
        x.new_empty(batch, tokens, dtype=torch.int64),
        x.new_empty(batch, clusters, dtype=torch.int64),
    )
