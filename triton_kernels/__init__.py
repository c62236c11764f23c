"""Triton kernels of mrprune, installed as ``mrprune.triton_kernels`` (never as a top-level ``triton_kernels``).

Importing the package registers the private ops ``mrprune::_cosine_graph_triton``, ``_graph_scores_triton``,
``_transfer_scores_triton`` and ``_received_attention_triton`` (``torch.library.custom_op`` for "cpu" and "cuda", so
that they also run, and can be ``opcheck``-ed, under ``TRITON_INTERPRET=1``) and makes them the "triton" backend of
the public ops (``mrprune.backends``). ``mrprune`` imports it when ``triton`` is installed.
"""

from . import cosine_graph, graph_scores, received_attention, transfer_scores

__all__ = ["cosine_graph", "graph_scores", "received_attention", "transfer_scores"]
