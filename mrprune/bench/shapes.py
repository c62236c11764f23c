"""Named benchmark shapes: the visual-token sets of real VLM inputs, filled with synthetic LLaVA-like features.

Every shape is one image (or video) per batch item, all items alike in size (batch item ``b`` uses seed ``b``):

================  ===============================================  =======  ====  ==================
name              token layout                                      tokens   D     batch (GPU / CPU)
================  ===============================================  =======  ====  ==================
llava15           LLaVA-1.5, 24 x 24 grid                             576   4096  1, 8 / 1
llava_next        LLaVA-NeXT 672 x 672: 576 base + 48 x 48 + 48 nl   2928   4096  1, 8 / 1
qwen2_5_vl_4k     Qwen2.5-VL image, 64 x 64 merged grid              4096   3584  1, 4 / 1
qwen2_5_vl_16k    Qwen2.5-VL image, 128 x 128 merged grid           16384   3584  1 / refused
video_36k         Qwen2.5-VL video, 36 frames of 32 x 32            36864   3584  1 / refused
llava_next_small  576 base + 12 x 12 + 12 newline (--quick)            732     64  1 / 1
tiny              8 x 8 grid (tests, interpreter runs)                 64     32  1 / 1
================  ===============================================  =======  ====  ==================

The eager references materialise several ``N x N`` float32 matrices per item, so shapes past :data:`CPU_TOKEN_LIMIT`
tokens are refused on a CPU unless asked for with ``--allow-large`` (and even then refused where the estimated memory
exceeds what the machine has; ``video_36k`` needs about 30 GiB per reference call).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from .. import testing
from ..layouts import GridLayout, LlavaNextLayout

__all__ = [
    "CPU_TOKEN_LIMIT",
    "DEFAULT_CPU_SHAPES",
    "DEFAULT_GPU_SHAPES",
    "SHAPES",
    "Shape",
    "available_memory",
    "cpu_refusal",
    "eager_bytes",
    "format_bytes",
]

logger = logging.getLogger(__name__)

#: Shapes with more tokens per item than this are refused on a CPU unless ``--allow-large`` is given.
CPU_TOKEN_LIMIT = 8192


@dataclass(frozen=True)
class Shape:
    """One named benchmark shape.

    Attributes
    ----------
    name : str
    family : {"llava_next", "grid"}
        ``llava_next``: base view + high-resolution grid + newline tokens (:class:`~mrprune.LlavaNextLayout`);
        ``grid``: a ``frames x height x width`` raster (:class:`~mrprune.GridLayout`).
    dim : int
        Feature width of the model (the LLM hidden size the projector maps to).
    grid : tuple of int
        ``(rows, cols)`` of the high-resolution grid (``llava_next``) or ``(frames, height, width)`` (``grid``).
    batches_gpu, batches_cpu : tuple of int
        Batch sizes timed by default on each device (empty: refused there unless asked).
    description : str
    budget : int or None
        Tokens ResPrune keeps per item (the greedy selection's ``k``); None: 22.2 % of the tokens (77.8 % pruned).
    selector_budget : int or None
        Tokens the vision-stage selectors (FasterVLM, HiRED, SCOPE, VisPruner, CDPruner, L2-norm, AgilePruner) keep
        per item; None: ``budget``, else 22.2 % of the tokens.
    merge_blocks : int
        Vision-encoder blocks ToMe's benchmark merges in (CLIP-L/336 up to LLaVA's feature layer -2: 23).
    """

    name: str
    family: str
    dim: int
    grid: tuple[int, ...]
    batches_gpu: tuple[int, ...]
    batches_cpu: tuple[int, ...]
    description: str
    budget: int | None = None
    selector_budget: int | None = None
    merge_blocks: int = 23

    @property
    def layout(self) -> LlavaNextLayout | GridLayout:
        """The token layout of one item."""
        if self.family == "llava_next":
            return LlavaNextLayout(*self.grid)
        return GridLayout(*self.grid)

    @property
    def tokens(self) -> int:
        """Tokens per item (LLaVA-NeXT newline tokens included)."""
        return self.layout.num_tokens

    def default_batches(self, device_type: str) -> tuple[int, ...]:
        return self.batches_gpu if device_type == "cuda" else self.batches_cpu

    def features(
        self, batch: int, dim: int | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Synthetic features of a batch: ``(features [B, N, D], lengths [B] int64, layouts)``.

        Item ``b`` is generated with seed ``b`` (:mod:`mrprune.testing`), on the CPU in float32, then cast and moved.
        """
        dim = self.dim if dim is None else dim
        items = [_item(self.name, self.family, self.grid, dim, seed) for seed in range(batch)]
        features = torch.stack(items).to(device=device, dtype=dtype)
        lengths = torch.full((batch,), self.tokens, dtype=torch.int64, device=device)
        return features, lengths, [self.layout] * batch


@functools.lru_cache(maxsize=8)
def _item(name: str, family: str, grid: tuple[int, ...], dim: int, seed: int) -> torch.Tensor:
    if family == "llava_next":
        return testing.llava_next_features(*grid, dim, seed=seed)
    frames, height, width = grid
    if name == "llava15":
        return testing.llava15_features(dim, seed=seed)
    return testing.qwen2_5_vl_features(frames, height, width, dim, seed=seed)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llava15", "grid", 4096, (1, 24, 24), (1, 8), (1,), "LLaVA-1.5 336 px: 24 x 24 tokens"),
        Shape(
            "llava_next",
            "llava_next",
            4096,
            (48, 48),
            (1, 8),
            (1,),
            "LLaVA-NeXT 672 x 672 anyres: 576 base + 48 x 48 high-res + 48 newline tokens",
            budget=640,
        ),
        Shape("qwen2_5_vl_4k", "grid", 3584, (1, 64, 64), (1, 4), (1,), "Qwen2.5-VL image, 64 x 64 merged tokens"),
        Shape("qwen2_5_vl_16k", "grid", 3584, (1, 128, 128), (1,), (), "Qwen2.5-VL image, 128 x 128 merged tokens"),
        Shape("video_36k", "grid", 3584, (36, 32, 32), (1,), (), "Qwen2.5-VL video, 36 frames of 32 x 32 tokens"),
        Shape(
            "llava_next_small",
            "llava_next",
            64,
            (12, 12),
            (1,),
            (1,),
            "LLaVA-NeXT layout with a 12 x 12 high-res grid, D = 64 (--quick)",
            selector_budget=48,  # the selectors' per-step loops stay short in the CI smoke run
            merge_blocks=2,  # and so do ToMe's eager merges
        ),
        Shape("tiny", "grid", 32, (1, 8, 8), (1,), (1,), "8 x 8 grid, D = 32 (tests, interpreter runs)"),
    )
}

#: What ``mrprune bench`` times on a CPU when no ``--shapes`` is given (the GPU default is every shape but ``tiny``).
DEFAULT_CPU_SHAPES = ("llava_next",)
DEFAULT_GPU_SHAPES = ("llava15", "llava_next", "qwen2_5_vl_4k", "qwen2_5_vl_16k", "video_36k")


def eager_bytes(op: str, tokens: int, queries: int = 0, batch: int = 1) -> int:
    """Rough peak memory of the eager reference (and official dense path) of ``op`` on items of ``tokens`` tokens.

    The references loop over the batch but build each item's ``N x N`` matrices in float32 (similarity, mask,
    logits, softmax, sort buffers: about 8 of them at once); ``cosine_graph`` also returns the ``B x N x N`` graph.
    """
    n2 = 4 * tokens * tokens
    per_op = {
        "cosine_graph": (8 + batch) * n2,
        "graph_scores": (8 + batch) * n2,
        "graph_propagate": 3 * n2,
        "transfer_scores": 8 * 4 * queries * tokens,
        "diversity_select": 10 * n2,
        "max_cosine": 8 * 4 * queries * tokens,
    }
    return per_op.get(op, 0)


def available_memory(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (``MemAvailable`` on a CPU, ``mem_get_info`` on CUDA), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def cpu_refusal(shape: Shape, allow_large: bool) -> str | None:
    """Why ``shape`` is not run on a CPU (None: it runs)."""
    worst = max(eager_bytes(op, shape.tokens) for op in ("cosine_graph", "diversity_select"))
    memory = available_memory(torch.device("cpu"))
    if memory is not None and worst > 0.8 * memory:
        return (
            f"{shape.name} ({shape.tokens} tokens/item) is refused on this CPU: its eager reference needs about "
            f"{format_bytes(worst)} and {format_bytes(memory)} is available (run it on a GPU)"
        )
    if shape.tokens > CPU_TOKEN_LIMIT and not allow_large:
        return (
            f"{shape.name} ({shape.tokens} tokens/item) is refused on a CPU: its eager reference needs about "
            f"{format_bytes(worst)} and minutes per call; pass --allow-large to run it anyway"
        )
    return None
