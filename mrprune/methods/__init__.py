"""Pruning methods: given each image's visual tokens, the indices to keep (they call ops only, never model code).

Stages
------
A method is a :class:`Pruner` that declares where it acts, its :class:`Stage`, and what it reads there, its
:class:`Need` set (:mod:`mrprune.methods.stages`):

* ``vision`` — scored by the vision encoder's attention at the layers the method names (the [CLS] row on CLIP
  towers, per crop on LLaVA-NeXT; the attention each token receives on Qwen2.5-VL);
  or merging inside the encoder's blocks (``Need.VISION_MERGE``, ToMe: the integration runs each block through the
  method's merge and hands it each token's merged group);
* ``projector`` — scored on the tokens in the LLM input space, their layout, optionally text embeddings;
* ``llm`` — scored inside the language model at each of its pruning layers ``layers`` (hidden states, attention
  rows, key norms and final-norm states recomputed from a decoder layer's own modules), pruned further at each.

Every method implements one ``_select_batch(features [B, N, D], layouts, lengths, texts, **needs)`` returning kept
indices per item, or, for merging methods (``merges = True``), :class:`MergedTokens` (output tokens, source map and
the representative whose position each output token takes; :mod:`mrprune.methods.results`); integrations deliver
each need as a keyword argument and never look at the method's type. Each
model adapter of an integration implements each stage once, so adding a method is one file here and one test file.
"""

from .agilepruner import AgilePruner
from .base import KeptCountUnknown, Pruner
from .baselines import DivPrune, RandomPruner
from .cdpruner import CDPruner
from .dart import DART
from .fastervlm import FasterVLM
from .fastv import FastV
from .graph import GPrune, MRPruner
from .hired import HiRED
from .l2norm import L2Norm
from .pdrop import PDrop
from .presets import PRESETS, preset
from .prumerge import PruMerge
from .resprune import ALPHA_PRESETS, ResPrune
from .results import MergedTokens, kept_indices
from .scope import SCOPE
from .sparsevlm import SparseVLM
from .stages import Need, Stage
from .tome import ToMe
from .trim import TRIM
from .visionzip import VisionZip
from .vispruner import VisPruner

__all__ = [
    "ALPHA_PRESETS",
    "PRESETS",
    "AgilePruner",
    "CDPruner",
    "DART",
    "DivPrune",
    "FastV",
    "FasterVLM",
    "GPrune",
    "HiRED",
    "L2Norm",
    "MRPruner",
    "KeptCountUnknown",
    "MergedTokens",
    "PDrop",
    "Need",
    "Pruner",
    "PruMerge",
    "RandomPruner",
    "ResPrune",
    "SCOPE",
    "SparseVLM",
    "TRIM",
    "ToMe",
    "Stage",
    "VisPruner",
    "VisionZip",
    "kept_indices",
    "preset",
]
