"""Shared pieces of the Triton kernels: interpreter detection, tile-size choice, launch configs and the graph math.

Conventions of every kernel in this package (research/engineering.md §3.3, §4.2):

* Values are loaded in their storage dtype and upcast to float32 for every computation. ``tl.dot`` runs on the raw
  float16/bfloat16 inputs on GPUs (tensor cores: exact products, float32 accumulation) and on float32 operands
  otherwise (float32 inputs, mixed dtypes, and bfloat16 under the interpreter, which computes bfloat16 arithmetic on
  raw bit patterns; :func:`dot_upcast`), always with ``input_precision="ieee"`` (ignored for half operands) so that
  GPU float32 dots are not silently TF32.
* Cosine similarities are ``(x_i . x_j) * r_i * r_j`` with ``r = 1 / max(||x||, 1e-12)`` from a small pre-kernel
  (:func:`row_norms`): the dot of the raw rows followed by two scalings, so half inputs keep the tensor cores and the
  rounding stays that of float32 (same dynamic range as the C++ kernels, which sum squares in float32 too).
* Offsets into ``[B, N, N]`` or ``[B, N, D]`` buffers are int64: every kernel promotes its batch index
  (``tl.program_id(...).to(tl.int64)``) and builds its base pointers with :func:`tile_offsets` once, outside its
  loops, which then only advance pointers by small steps (``N * N`` exceeds 2**31 from ``N = 46341`` on). Loop bodies
  call as few nested ``@triton.jit`` helpers as possible: the interpreter re-patches ``triton.language`` on every
  such call (milliseconds each).
* Tile sizes that shape a buffer (the token tile ``BLOCK``) are chosen on the host (:func:`token_block`); only the
  feature tile ``BLOCK_D``, ``num_warps`` and ``num_stages`` are autotuned, on CUDA only (:class:`Launcher`).
  Under the interpreter (no driver: ``triton.autotune`` and ``do_bench`` fail) a fixed config is used.
* The graph rule (research/algorithms.md §2.3, ``mrprune.reference``): an entry is an edge iff ``S >= threshold`` and
  ``|S / T| >= 1e-6``; its logit is ``S / T``; every other valid entry keeps the logit -5000 inside the softmax
  (:func:`edge_logits`), so a row without edges is uniform and a row whose edge logits all lie far below -5000 puts
  its mass on the non-edges, exactly as the official softmax does.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mrprune import reference

__all__ = [
    "EDGE_FILL_LOGIT",
    "NORM_EPS",
    "TUNE_CONFIGS",
    "ZERO_LOGIT_TOL",
    "Launcher",
    "autotune_enabled",
    "check_device",
    "compile_for_target",
    "device_guard",
    "dot_upcast",
    "edge_logits",
    "expected_tile_offsets",
    "feature_block",
    "gram_tile",
    "interpreting",
    "next_power_of_2",
    "num_programs_target",
    "probe_tile_offsets",
    "row_norms",
    "tile_offsets",
    "tile_pairs",
    "token_block",
]

#: The spec's constants (mrprune.reference), as compile-time constants of the kernels.
EDGE_FILL_LOGIT = tl.constexpr(reference.EDGE_FILL_LOGIT)
ZERO_LOGIT_TOL = tl.constexpr(reference.ZERO_LOGIT_TOL)
NORM_EPS = tl.constexpr(reference.NORM_EPS)


# --- environment ------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1`` when they were decorated)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(op: str, t: torch.Tensor) -> None:
    """A clear error instead of Triton's "0 active drivers" for CPU tensors outside the interpreter."""
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"mrprune.{op}: the Triton backend needs CUDA tensors; on the CPU it runs only under the Triton "
            "interpreter (TRITON_INTERPRET=1 set before mrprune is imported, as the tests do)"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"mrprune.{op}: the Triton backend does not serve {t.device.type} tensors")


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def autotune_enabled(t: torch.Tensor) -> bool:
    """Autotune on CUDA unless ``MRPRUNE_TRITON_AUTOTUNE=0``; never under the interpreter."""
    return t.device.type == "cuda" and not interpreting() and os.environ.get("MRPRUNE_TRITON_AUTOTUNE", "1") != "0"


def dot_upcast(*tensors: torch.Tensor) -> bool:
    """Whether the dot loops must upcast their operands to float32 (constexpr ``UPCAST`` of the kernels): for
    float32 inputs (a no-op), for mixed dtypes, and for bfloat16 under the interpreter. float16 keeps the native
    dot (tensor cores on GPUs, and exact under the interpreter), and so does bfloat16 on GPUs."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1 or torch.float32 in dtypes:
        return True
    return torch.bfloat16 in dtypes and interpreting()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_target(t: torch.Tensor) -> int:
    """About how many programs a launch should have to fill the device (4 waves of the SMs on CUDA; 1 under the
    interpreter, where programs run one after another)."""
    if t.device.type != "cuda":
        return 1
    return 4 * _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


# --- tile sizes ----------------------------------------------------------------------------------------------------


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def token_block(n: int, t: torch.Tensor, override: int | None = None) -> int:
    """The token tile (rows and columns of a similarity tile). It shapes the partial-result buffers, so it is chosen
    here, not autotuned. Under the interpreter the largest tile up to 256 (numpy cost is per operation, not per
    element, so fewer, larger programs are faster); on GPUs 128 (the tensor-core sweet spot for a ``BLOCK x BLOCK x
    BLOCK_D`` tile with a two-sided softmax epilogue), 64 for small ``N`` so that the grid still fills the SMs."""
    if override is not None:
        if override < 16 or override & (override - 1):
            raise ValueError(f"token block must be a power of two >= 16, got {override}")
        return override
    if interpreting() or t.device.type != "cuda":
        return min(256, max(16, next_power_of_2(n)))
    return 128 if n >= 1024 else 64


def feature_block(d: int, t: torch.Tensor, override: int | None = None) -> int:
    """The fixed feature tile ``BLOCK_D`` (used when not autotuning)."""
    if override is not None:
        if override < 16 or override & (override - 1):
            raise ValueError(f"feature block must be a power of two >= 16, got {override}")
        return override
    if interpreting() or t.device.type != "cuda":
        return min(256, max(16, next_power_of_2(d)))
    return 64


# --- launching -----------------------------------------------------------------------------------------------------


#: ``(BLOCK_D, num_warps, num_stages)`` tried by the autotuner: a short list, because every config costs a compile
#: (seconds) on the first launch of each kernel (configs that exceed shared memory are skipped by the autotuner).
TUNE_CONFIGS = ((64, 8, 3), (64, 4, 3), (64, 8, 4), (32, 8, 4), (32, 4, 4), (128, 8, 2), (128, 4, 3), (32, 8, 3))


def _default_configs(block_d_options: Sequence[int]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s) for bd, w, s in TUNE_CONFIGS if bd in block_d_options
    ]


class Launcher:
    """A jitted kernel with two ways to launch it, kept apart (research/engineering.md §3.3).

    * fixed: ``kernel[grid](..., BLOCK_D=..., num_warps=..., num_stages=...)`` under the interpreter, on CPU
      tensors, or with ``MRPRUNE_TRITON_AUTOTUNE=0``;
    * tuned: ``triton.autotune(configs, key)(kernel)``, built lazily on the first CUDA launch (building it needs no
      driver, but keeping it out of import time keeps the CPU path free of it). The tuned parameters are
      ``BLOCK_D``, ``num_warps`` and ``num_stages``; the kernel must be idempotent (it is benchmarked on the real
      arguments), which every kernel launched through this class is (they only write fresh outputs).
    """

    def __init__(self, kernel, key: Sequence[str], block_d_options: Sequence[int] = (32, 64, 128)):
        self.kernel = kernel
        self.key = list(key)
        self.block_d_options = tuple(block_d_options)
        self._tuned = None

    @property
    def tuned(self):
        if self._tuned is None:
            self._tuned = triton.autotune(configs=_default_configs(self.block_d_options), key=self.key)(self.kernel)
        return self._tuned

    def __call__(
        self,
        grid,
        *args,
        like: torch.Tensor,
        block_d: int,
        num_warps: int = 4,
        num_stages: int = 2,
        force_fixed: bool = False,
        **kwargs,
    ):
        if autotune_enabled(like) and not force_fixed:
            self.tuned[grid](*args, **kwargs)
        else:
            self.kernel[grid](*args, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages, **kwargs)


@functools.cache
def _tile_pairs_cpu(tiles: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(tiles, tiles)  # row-major over the upper triangle: pairs sharing I are adjacent
    return torch.stack([rows, cols], dim=1).to(torch.int32).contiguous()


_PAIRS_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def tile_pairs(tiles: int, device: torch.device) -> torch.Tensor:
    """``[T (T + 1) / 2, 2]`` int32: the tile pairs ``(I, J)``, ``I <= J``, of a symmetric ``T x T`` tiling."""
    key = (tiles, torch.device(device))
    if key not in _PAIRS_ON_DEVICE:
        _PAIRS_ON_DEVICE[key] = _tile_pairs_cpu(tiles).to(device)
    return _PAIRS_ON_DEVICE[key]


# --- jitted helpers ------------------------------------------------------------------------------------------------


@triton.jit
def tile_offsets(batch, rows, cols, stride_b, stride_r, stride_c):
    """int64 offsets ``batch * stride_b + rows[:, None] * stride_r + cols[None, :] * stride_c`` of a 2-D tile.

    Every index is promoted to int64 before it is multiplied: ``i * N`` overflows int32 for ``N * N > 2**31``, and
    ``b * N * D`` for large batches."""
    base = batch.to(tl.int64) * stride_b
    return base + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def gram_tile(
    a_base,
    b_base,
    offs_a,
    offs_b,
    mask_a,
    mask_b,
    D,
    stride_n,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``[BLOCK_A, BLOCK_B]`` float32 tile of ``X_a X_b^T`` for rows ``offs_a`` of ``a_base`` and ``offs_b`` of
    ``b_base`` (row stride ``stride_n``, unit feature stride), looping over the features in ``BLOCK_D`` steps.
    Masked rows and the feature tail load 0."""
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = a_base + (offs_a.to(tl.int64)[:, None] * stride_n + offs_d[None, :])
    b_ptrs = b_base + (offs_d[:, None] + offs_b.to(tl.int64)[None, :] * stride_n)
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        a = tl.load(a_ptrs, mask=mask_a[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=d_ok[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_D
        b_ptrs += BLOCK_D
    return acc


@triton.jit
def tile_pair(pairs, lengths, BLOCK: tl.constexpr):
    """This program's tile pair ``(ti, tj)``, ``ti <= tj``, of item ``program_id(1)``: the item (int64), both tiles'
    token offsets and validity masks, and whether the pair touches the item's valid tokens at all."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ti = tl.load(pairs + 2 * pid)
    tj = tl.load(pairs + 2 * pid + 1)
    n = tl.load(lengths + b).to(tl.int32)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    return b, ti, tj, offs_i, offs_j, offs_i < n, offs_j < n, tj * BLOCK < n


@triton.jit
def cosine_tile(
    x,
    inv_norms,
    b,
    offs_i,
    offs_j,
    ok_i,
    ok_j,
    N,
    D,
    stride_xb,
    stride_xn,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``[BLOCK, BLOCK]`` float32 cosine similarities of rows ``offs_i`` x ``offs_j`` of item ``b`` (the raw Gram
    tile times both rows' inverse norms); 0 where masked."""
    base = x + b * stride_xb
    acc = gram_tile(base, base, offs_i, offs_j, ok_i, ok_j, D, stride_xn, BLOCK, BLOCK, BLOCK_D, UPCAST)
    r_i = tl.load(inv_norms + b * N + offs_i, mask=ok_i, other=0.0)
    r_j = tl.load(inv_norms + b * N + offs_j, mask=ok_j, other=0.0)
    return acc * (r_i[:, None] * r_j[None, :])


@triton.jit
def edge_logits(s, valid, threshold, temperature):
    """The spec's softmax logits of a similarity tile: ``S / T`` on edges, -5000 on the other valid entries, ``-inf``
    outside ``valid`` (so they drop out of the softmax). Returns ``(logits, is_edge)``."""
    z = s / temperature
    edge = valid & (s >= threshold) & (tl.abs(z) >= ZERO_LOGIT_TOL)
    z = tl.where(edge, z, EDGE_FILL_LOGIT)
    z = tl.where(valid, z, float("-inf"))
    return z, edge


@triton.jit
def _row_norms_kernel(x, norms, inv_norms, N, D, stride_xb, stride_xn, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = x + tile_offsets(b, rows, offs_d, stride_xb, stride_xn, 1)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        v = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
        ptrs += BLOCK_D
    norm = tl.sqrt(acc)
    out = b * N + rows
    tl.store(norms + out, norm, mask=row_ok)
    tl.store(inv_norms + out, 1.0 / tl.maximum(norm, NORM_EPS), mask=row_ok)


def row_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||x_i||, 1 / max(||x_i||, 1e-12))`` as float32 ``[B, N]`` for contiguous ``x [B, N, D]`` (every row,
    padding included: cheap, and the kernels mask padding themselves)."""
    batch, tokens, dim = x.shape
    norms = torch.empty(batch, tokens, dtype=torch.float32, device=x.device)
    inv = torch.empty_like(norms)
    if norms.numel() == 0:
        return norms, inv
    on_gpu = x.device.type == "cuda" and not interpreting()
    block_r = 32 if on_gpu else min(256, max(16, next_power_of_2(tokens)))
    block_d = min(256, max(16, next_power_of_2(dim)))
    grid = (triton.cdiv(tokens, block_r), batch)
    with device_guard(x):
        _row_norms_kernel[grid](
            x, norms, inv, tokens, dim, x.stride(0), x.stride(1), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4
        )
    return norms, inv


# --- an int64 offset probe (tests) ------------------------------------------------------------------------------


@triton.jit
def _offset_probe_kernel(out, batch, row0, col0, stride_b, stride_r, stride_c, BLOCK: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK)
    cols = col0 + tl.arange(0, BLOCK)
    offs = tile_offsets(batch, rows, cols, stride_b, stride_r, stride_c)
    local = tl.arange(0, BLOCK)
    tl.store(out + local[:, None] * BLOCK + local[None, :], offs)


def probe_tile_offsets(
    batch: int, row0: int, col0: int, strides: tuple[int, int, int], block: int = 16, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``[block, block]`` int64: the offsets :func:`tile_offsets` computes in a kernel for the tile at
    ``(batch, row0, col0)`` of a buffer with the given logical strides (nothing of that size is allocated)."""
    out = torch.empty(block, block, dtype=torch.int64, device=device)
    _offset_probe_kernel[(1,)](out, batch, row0, col0, *strides, BLOCK=block)
    return out


def expected_tile_offsets(batch: int, row0: int, col0: int, strides: tuple[int, int, int], block: int = 16):
    """The same offsets in Python integers (exact)."""
    sb, sr, sc = strides
    return [[batch * sb + (row0 + r) * sr + (col0 + c) * sc for c in range(block)] for r in range(block)]


# --- ahead-of-time compilation without a GPU (CI) -----------------------------------------------------------------


def compile_for_target(
    kernel,
    types: dict[str, str],
    constexprs: dict[str, object],
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
) -> dict[str, object]:
    """Compile ``kernel`` (a ``@triton.jit`` function, in a process without ``TRITON_INTERPRET``) for CUDA ``sm_<arch>``
    through Triton's whole pipeline, ptxas included, without a GPU or driver, and summarise the result.

    ``types`` maps argument names to Triton signature types (``"*fp16"``, ``"i32"``, ``"fp32"``...); pointers not
    named default to ``"*fp32"``. Returns ``{"shared": bytes, "wgmma": count, "mma": count, "local": count}`` (PTX
    instruction counts: ``wgmma`` is Hopper's tensor-core path, ``local`` loads/stores mean register spills). The
    interpreter accepts code that the compiler rejects (loop-carried type changes, layouts), so CI compiles every
    kernel with this (tests/test_*: ``test_triton_kernels_compile_for_sm90``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "*fp32")) for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm.get("ptx", "")
    return {
        "shared": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma": ptx.count("mma.sync"),
        "local": ptx.count("ld.local") + ptx.count("st.local"),
    }
