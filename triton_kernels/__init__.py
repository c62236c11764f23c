"""Triton kernels of mrprune, installed as ``mrprune.triton_kernels`` (never as a top-level ``triton_kernels``).

Importing the package registers the private ops ``mrprune::_<op>_triton`` of the ops it serves (cosine_graph,
graph_scores, transfer_scores, received_attention, coverage_select, bipartite_dedup; ``torch.library.custom_op``
for "cpu" and "cuda", so that they also run, and can be ``opcheck``-ed, under ``TRITON_INTERPRET=1``) and makes
them the "triton" backend of the public ops (``mrprune.backends``). ``mrprune`` imports it when ``triton`` is installed.
"""

from . import bipartite_dedup, cosine_graph, coverage_select, graph_scores, received_attention, transfer_scores

__all__ = [
    "bipartite_dedup",
    "cosine_graph",
    "coverage_select",
    "graph_scores",
    "received_attention",
    "transfer_scores",
]


# The merging ops of issue 17 (bipartite_merge, assign_merge) and the multi-row LLM attention (attention_rows).
from . import assign_merge, attention_rows, bipartite_merge, density_peak_merge, knn_weighted_merge  # noqa: E402

__all__ += ["assign_merge", "attention_rows", "bipartite_merge", "density_peak_merge", "knn_weighted_merge"]
