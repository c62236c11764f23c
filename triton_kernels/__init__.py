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

