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
* The symmetric tile-pair kernels (Gram store, streaming statistics and propagation, sparse edge lists) take their
  pair from a flat index in banded order (:func:`triangle_pair`) and launch one of two ways (:func:`pair_grid`): one
  program per pair and item (grid ``(pairs, B)``, :func:`tile_pair`), or, at video sizes (N = 36k-64k tokens: 10^5 -
  10^6 pairs), a fixed grid of about ``PROGRAMS_PER_SM`` programs per SM that each loop over the work items
  ``program_id, program_id + programs, ...`` (``PERSISTENT`` constexpr, :func:`work_range`, :func:`work_tile_pair`):
  the programs resident at one moment then walk the bands together, which is what the banded order's L2 reuse needs,
  and no wave ends in a launch tail. Each pair writes its own output slots (no atomics), so both give the same bits
  under the same launch config (the autotuner tunes the two shapes apart: ``PERSISTENT`` is part of its key). Not
  yet measured on a GPU (none was available when it was written): ``scripts/gpu_validate.py`` times both.
* The graph rule (research/algorithms.md §2.3, ``mrprune.reference``): an entry is an edge iff ``S >= threshold`` and
  ``|S / T| >= 1e-6``; its logit is ``S / T``; every other valid entry keeps the logit -5000 inside the softmax
  (:func:`edge_logits`), so a row without edges is uniform and a row whose edge logits all lie far below -5000 puts
  its mass on the non-edges, exactly as the official softmax does.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from mrprune import reference

__all__ = [
    "EDGE_FILL_LOGIT",
    "NORM_EPS",
    "LAUNCH_OPTIONS",
    "TUNE_CONFIGS",
    "ZERO_LOGIT_TOL",
    "Launcher",
    "autotune_enabled",
    "check_device",
    "device_guard",
    "dot_upcast",
    "edge_logits",
    "expected_tile_offsets",
    "feature_block",
    "gram_tile",
    "interpreting",
    "next_power_of_2",
    "num_programs_target",
    "pair_grid",
    "persistent_programs",
    "probe_tile_offsets",
    "row_norms",
    "symmetric_config_ok",
    "symmetric_fixed_config",
    "tile_offsets",
    "num_tile_pairs",
    "probe_tile_pairs",
    "probe_work_items",
    "triangle_pair",
    "token_block",
    "token_block_cuda",
    "work_range",
    "work_tile_pair",
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


def _device_sms(t: torch.Tensor) -> int:
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def num_programs_target(t: torch.Tensor) -> int:
    """About how many programs a launch should have to fill the device (4 waves of the SMs on CUDA; 1 under the
    interpreter, where programs run one after another)."""
    if t.device.type != "cuda":
        return 1
    return 4 * _device_sms(t)


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
    return token_block_cuda(n)


def token_block_cuda(n: int) -> int:
    """The token tile of a launch on a GPU: 128 (the tensor-core sweet spot for a ``BLOCK x BLOCK x BLOCK_D`` tile with
    a two-sided softmax epilogue), 64 for small ``N`` so that the grid still fills the SMs."""
    return 128 if n >= 1024 else 64


def feature_block(d: int, t: torch.Tensor, override: int | None = None) -> int | None:
    """The feature tile ``BLOCK_D`` of a fixed-config launch: ``override``, else under the interpreter the largest
    useful one, else ``None`` (on GPUs :class:`Launcher` takes it from its fixed config, which depends on the
    token tile and the dtype)."""
    if override is not None:
        if override < 16 or override & (override - 1):
            raise ValueError(f"feature block must be a power of two >= 16, got {override}")
        return override
    if interpreting() or t.device.type != "cuda":
        return min(256, max(16, next_power_of_2(d)))
    return None


# --- launching -----------------------------------------------------------------------------------------------------

#: Launch options passed to every kernel, never left to Triton's defaults: FMA contraction stays on (Triton 3.9's
#: default, which the numbers and tolerances were measured with; Triton 3.10 turns the default off, and an unset
#: ``TRITON_DEFAULT_FP_FUSION`` warns).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

#: ``(BLOCK_D, num_warps, num_stages)`` the autotuner may try, before :class:`Launcher` removes those that spill
#: for the launch's token tiles and dtype (every config costs a compile, seconds, on the first launch of each kernel).
TUNE_CONFIGS = (
    (64, 8, 3),
    (64, 4, 3),
    (64, 8, 4),
    (32, 8, 4),
    (32, 4, 4),
    (128, 8, 2),
    (128, 4, 3),
    (32, 8, 3),
    (16, 8, 3),
    (16, 4, 3),
)


def symmetric_config_ok(constexprs: dict, bd: int, warps: int, stages: int) -> bool:
    """Whether ``(BLOCK_D, num_warps, num_stages)`` compiles without spills on sm_90 for the symmetric-tile kernels
    (Gram store, streaming statistics and propagation) with these constexprs (``BLOCK``, ``UPCAST``). Measured by
    ``scripts/check_triton_compile.py``, which compiles every config this keeps and fails on any spill."""
    block, upcast = constexprs["BLOCK"], constexprs["UPCAST"]
    if upcast:
        # float32 operands take Triton's FMA dot, which keeps the whole BLOCK_D slice of both operands in
        # registers: BLOCK_D >= 64 spills kilobytes; a 128-token tile leaves room for 16 only, with 8 warps; a
        # 64-token tile takes 4 warps (with 8, ptxas caps the stream statistics kernel at 80 registers and spills).
        return (bd == 16 and warps == 8) if block >= 128 else (bd <= 32 and warps == 4)
    # a 128-token tile needs 8 warps: with 4 the accumulator and the softmax epilogue exceed 255 registers
    return warps == 8 or block < 128


def symmetric_fixed_config(constexprs: dict) -> tuple[int, int, int]:
    """``(BLOCK_D, num_warps, num_stages)`` of a launch of a symmetric-tile kernel without autotuning on a GPU."""
    block, upcast = constexprs["BLOCK"], constexprs["UPCAST"]
    warps = 8 if block >= 128 else 4
    if upcast:
        return (16 if block >= 128 else 32), warps, 3
    return 64, warps, 3


class Launcher:
    """A jitted kernel with two ways to launch it, kept apart (research/engineering.md §3.3).

    * fixed: ``kernel[grid](..., BLOCK_D=..., num_warps=..., num_stages=...)`` under the interpreter, on CPU
      tensors, with ``MRPRUNE_TRITON_AUTOTUNE=0``, or while a CUDA graph is being captured and this key has not been
      tuned yet (the autotuner benchmarks with synchronisations, which capture forbids);
    * tuned: ``triton.autotune(configs, key + ["BLOCK*"], prune_configs_by=...)(kernel)``, built lazily on the first
      CUDA launch, trying only the configs that compile without spills (``config_ok``; checked on the cubins by
      ``scripts/check_triton_compile.py``). The tuned parameters are ``BLOCK_D``, ``num_warps`` and
      ``num_stages``; the kernel must be idempotent (it is benchmarked on the real arguments), which every kernel
      launched through this class is (they only write fresh outputs).
    """

    def __init__(
        self,
        kernel,
        key: Sequence[str],
        config_ok: Callable[[dict, int, int, int], bool] = symmetric_config_ok,
        fixed_config: Callable[[dict], tuple[int, int, int]] = symmetric_fixed_config,
    ):
        self.kernel = kernel
        self.config_ok = config_ok
        self.fixed = fixed_config
        block_keys = [n for n in ("BLOCK", "BLOCK_M", "BLOCK_N", "PERSISTENT") if n in kernel.arg_names]
        self.key = list(key) + block_keys  # a config tuned for one token tile (or grid shape) is not reused for another
        self.configs = [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s) for bd, w, s in TUNE_CONFIGS]
        self._tuned = None
        self._warm: set[tuple] = set()

    def configs_for(self, constexprs: dict) -> list:
        """The configs the autotuner may pick for a launch with these constexprs: those that do not spill
        (``config_ok``), else the fixed one. The autotuner's ``early_config_prune``."""
        kept = [c for c in self.configs if self.config_ok(constexprs, c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)]
        if kept:
            return kept
        bd, warps, stages = self.fixed(constexprs)
        return [triton.Config({"BLOCK_D": bd}, num_warps=warps, num_stages=stages)]

    def _prune(self, configs: list, named_args: dict, **kwargs) -> list:
        return self.configs_for(kwargs)  # the launch's constexprs come as keyword arguments

    @property
    def tuned(self):
        if self._tuned is None:
            self._tuned = triton.autotune(
                configs=self.configs, key=self.key, prune_configs_by={"early_config_prune": self._prune}
            )(self.kernel)
        return self._tuned

    def _tune_key(self, args: tuple, kwargs: dict) -> tuple:
        named = {**dict(zip(self.kernel.arg_names, args, strict=False)), **kwargs}
        dtypes = tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
        return tuple(named[k] for k in self.key if k in named) + dtypes  # as triton.autotune keys: those passed

    def __call__(self, grid, *args, like: torch.Tensor, block_d: int | None, force_fixed: bool = False, **kwargs):
        fixed_bd, warps, stages = self.fixed(kwargs)
        if autotune_enabled(like) and not force_fixed and block_d is None:
            key = self._tune_key(args, kwargs)
            if key in self._warm or not torch.cuda.is_current_stream_capturing():
                self.tuned[grid](*args, **kwargs, **LAUNCH_OPTIONS)
                self._warm.add(key)
                return
            # capturing a CUDA graph with an untuned key: the fixed config (autotune before capturing to get the
            # tuned one)
        self.kernel[grid](
            *args,
            BLOCK_D=fixed_bd if block_d is None else block_d,
            num_warps=warps,
            num_stages=stages,
            **kwargs,
            **LAUNCH_OPTIONS,
        )


def num_tile_pairs(tiles: int) -> int:
    """How many tile pairs ``(I, J)``, ``I <= J``, a symmetric ``tiles x tiles`` tiling has (the grid's first axis
    of the symmetric kernels; :func:`triangle_pair` maps a program to its pair on the device)."""
    return tiles * (tiles + 1) // 2


#: Persistent programs per SM of the symmetric-tile kernels (:func:`pair_grid`); the GPU session tunes it. A 128-token
#: tile with 8 warps takes 213-254 registers a thread (sm_90 cubins), so one program is resident per SM and the second
#: one waits, walking the bands after it; a 64-token tile with 4 warps (128-246 registers) fits two to four.
PROGRAMS_PER_SM = 2
#: Persistent programs under the interpreter, where programs run one after another: few, so that the tests see every
#: program loop over several work items.
INTERPRETER_PROGRAMS = 3
#: ``auto`` launches persistent programs once one program per pair and item would take more waves than this of the
#: persistent grid (video-scale N: 10^5 - 10^6 pairs); below it one program per pair costs a short launch tail only.
PERSISTENT_MIN_WAVES = 4
PERSISTENT_MODES = ("auto", "0", "1")


def persistent_programs(t: torch.Tensor) -> int:
    """How many programs a persistent symmetric-tile launch on ``t``'s device has: ``PROGRAMS_PER_SM`` per SM on
    CUDA, ``INTERPRETER_PROGRAMS`` under the interpreter."""
    if interpreting() or t.device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _device_sms(t)


def pair_grid(batch: int, tiles: int, t: torch.Tensor, persistent: bool | None = None) -> tuple[tuple, bool]:
    """The grid of a symmetric-tile kernel over ``batch`` items of ``tiles`` token tiles, and its ``PERSISTENT``
    constexpr.

    ``((pairs, batch), False)``: one program per tile pair and item (:func:`tile_pair`). ``((programs,), True)``: a
    fixed grid of :func:`persistent_programs` programs, each looping over the ``batch * pairs`` work items with stride
    ``programs`` (:func:`work_range`, :func:`work_tile_pair`): the programs resident at one moment walk the bands of
    :func:`triangle_pair` together and there is no launch tail per wave. Every work item writes its own output slots, so
    both give the same bits under the same launch config. Persistent when ``persistent`` (tests, benchmarks) says so,
    else as ``MRPRUNE_TRITON_PERSISTENT`` (``0``, ``1`` or ``auto``, the default) says: ``auto`` is persistent once the
    work items exceed ``PERSISTENT_MIN_WAVES`` times the programs. The choice and the grid come from host integers only
    (no device read: CUDA-graph capture is fine). Not yet measured on a GPU: the constants are guesses until a GPU
    session tunes them (``scripts/gpu_validate.py`` times both)."""
    pairs = num_tile_pairs(tiles)
    work = batch * pairs
    programs = persistent_programs(t)
    if persistent is None:
        mode = os.environ.get("MRPRUNE_TRITON_PERSISTENT", "auto")
        if mode not in PERSISTENT_MODES:
            raise ValueError(f"MRPRUNE_TRITON_PERSISTENT={mode!r}: choose one of {PERSISTENT_MODES}")
        persistent = work > PERSISTENT_MIN_WAVES * programs if mode == "auto" else mode == "1"
    if persistent and 0 < work < 2**31:  # the work index is int32 on the device
        return (min(work, programs),), True
    return (pairs, batch), False


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


#: Tile rows per band of the symmetric kernels' program order (:func:`triangle_pair`); the GPU session tunes it.
TILE_GROUP = tl.constexpr(8)


@triton.jit
def _first_of_band(g, T, GROUP: tl.constexpr):
    """How many pairs the bands before band ``g`` hold: ``g G (2T + 1 - G g) / 2`` (band ``g'`` is full:
    ``G (G + 1) / 2`` pairs in its triangle and ``G (T - (g' + 1) G)`` right of it)."""
    return g * GROUP * (2 * T + 1 - GROUP * g) // 2


@triton.jit
def triangle_pair(p, T, GROUP: tl.constexpr):
    """The ``p``-th pair ``(i, j)``, ``i <= j < T``, of the upper triangle in banded order (scalars or blocks).

    The tile rows form bands of ``GROUP``; band by band, the pairs of a band go column by column (``j`` ascending,
    the band's rows ``i <= j`` within a column). Programs running at once then share a few column tiles and one
    band's ``GROUP`` row tiles, so at video sizes (features far larger than L2) each tile is read from HBM about
    ``1 / GROUP`` as often as in row-major order, where every concurrent program reads its own column tile.
    ``GROUP = 1`` is row-major order. The band is the floor of the smaller root of the band-start quadratic, in
    float32 and corrected by one step either way (the rounding of the square root), so no table of pairs is copied
    to the device."""
    t2 = 2 * T + 1
    root = tl.sqrt((t2 * t2 - 8 * p).to(tl.float32))
    g = ((t2 - root) * (0.5 / GROUP)).to(tl.int32)
    g = tl.where(_first_of_band(g, T, GROUP) > p, g - 1, g)
    g = tl.where(_first_of_band(g + 1, T, GROUP) <= p, g + 1, g)
    g = tl.minimum(g, (T - 1) // GROUP)  # the formula holds for full bands; the last band may be partial
    q = p - _first_of_band(g, T, GROUP)
    i0 = g * GROUP
    rows = tl.minimum(T - i0, GROUP)
    head = rows * (rows + 1) // 2  # the band's own triangle: column c holds rows 0 .. c
    c = q * 0  # the triangle's column: how many columns before it end at or before q
    for t in tl.static_range(1, GROUP):
        c += (t * (t + 1) // 2 <= q).to(tl.int32)
    rest = q - head  # right of the triangle: GROUP rows per column
    i = tl.where(q < head, i0 + q - c * (c + 1) // 2, i0 + rest % GROUP)
    j = tl.where(q < head, i0 + c, i0 + GROUP + rest // GROUP)
    return i, j


@triton.jit
def tile_pair(N, lengths, BLOCK: tl.constexpr):
    """This program's tile pair ``(ti, tj)``, ``ti <= tj``, of item ``program_id(1)`` (a launch with one program per
    pair and item, grid ``(pairs, B)``): the item (int64), both tiles' token offsets and validity masks, and whether
    the pair touches the item's valid tokens at all."""
    return _item_tile_pair(tl.program_id(1).to(tl.int64), tl.program_id(0), N, lengths, BLOCK)


@triton.jit
def work_range(B, N, BLOCK: tl.constexpr):
    """``(first, end, step)`` of a persistent program's work items: ``for w in range(first, end, step)`` visits
    ``program_id(0), program_id(0) + num_programs(0), ...`` below ``B * pairs`` (grid ``(programs,)``), so the
    programs resident at one moment hold consecutive items of the banded order (:func:`work_tile_pair`)."""
    tiles = tl.cdiv(N, BLOCK)
    return tl.program_id(0), B * (tiles * (tiles + 1) // 2), tl.num_programs(0)


@triton.jit
def work_tile_pair(w, N, lengths, BLOCK: tl.constexpr):
    """:func:`tile_pair` of work item ``w`` of a persistent launch. Items are item-major (``w = b * pairs + p``,
    ``p`` the banded pair index), the order in which a ``(pairs, B)`` grid is scheduled: the programs working at one
    moment share one band of one item's tiles (the L2 reuse of :func:`triangle_pair`), where pair-major order would
    spread them over ``B`` items' features."""
    tiles = tl.cdiv(N, BLOCK)
    pairs = tiles * (tiles + 1) // 2
    return _item_tile_pair((w // pairs).to(tl.int64), w % pairs, N, lengths, BLOCK)


@triton.jit
def _item_tile_pair(b, p, N, lengths, BLOCK: tl.constexpr):
    """Pair ``p`` (banded order) of item ``b``: see :func:`tile_pair`."""
    ti, tj = triangle_pair(p, tl.cdiv(N, BLOCK), TILE_GROUP)
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
            x,
            norms,
            inv,
            tokens,
            dim,
            x.stride(0),
            x.stride(1),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=4,
            **LAUNCH_OPTIONS,
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


@triton.jit
def _tile_pair_probe_kernel(out, first, T, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    p = first + tl.arange(0, BLOCK)
    i, j = triangle_pair(p, T, GROUP)
    tl.store(out + 2 * tl.arange(0, BLOCK), i)
    tl.store(out + 2 * tl.arange(0, BLOCK) + 1, j)


def probe_tile_pairs(tiles: int, first: int, count: int = 64, group: int = TILE_GROUP.value) -> torch.Tensor:
    """``[count, 2]`` int32: the pairs :func:`triangle_pair` computes in a kernel for programs ``first ...``."""
    out = torch.empty(count, 2, dtype=torch.int32)
    _tile_pair_probe_kernel[(1,)](out, first, tiles, BLOCK=count, GROUP=group)
    return out


@triton.jit(do_not_specialize=["B"])
def _work_item_probe_kernel(out, lengths, B, N, ROWS, BLOCK: tl.constexpr):
    first, end, step = work_range(B, N, BLOCK)
    for w in range(first, end, step):
        b, ti, tj, _, _, _, _, live = work_tile_pair(w, N, lengths, BLOCK)
        row = out + tl.minimum(w, ROWS - 1) * 6  # the last row collects work items past the end
        tl.atomic_add(row, 1)
        tl.store(row + 1, tl.program_id(0))
        tl.store(row + 2, b.to(tl.int32))
        tl.store(row + 3, ti)
        tl.store(row + 4, tj)
        tl.store(row + 5, live.to(tl.int32))


def probe_work_items(
    lengths: Sequence[int], tokens: int, block: int, programs: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``[B * pairs + 1, 6]`` int32: what a persistent launch of ``programs`` programs over items of these lengths
    (padded to ``tokens``, ``block``-token tiles) visits, by work item ``w``: ``(visits, program, item, ti, tj,
    live)``; the last row counts visits of work items past the end. Unvisited rows are -1 (visits 0)."""
    batch = len(lengths)
    rows = batch * num_tile_pairs(triton.cdiv(tokens, block)) + 1
    out = torch.full((rows, 6), -1, dtype=torch.int32, device=device)
    out[:, 0] = 0
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    _work_item_probe_kernel[(programs,)](out, lengths_t, batch, tokens, rows, BLOCK=block)
    return out.cpu()


def expected_tile_offsets(batch: int, row0: int, col0: int, strides: tuple[int, int, int], block: int = 16):
    """The same offsets in Python integers (exact)."""
    sb, sr, sc = strides
    return [[batch * sb + (row0 + r) * sr + (col0 + c) * sc for c in range(block)] for r in range(block)]
