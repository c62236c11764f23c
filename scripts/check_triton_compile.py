"""Compile every Triton kernel of mrprune to a real sm_90 cubin, without a GPU, and check its resources.

For every kernel x input dtype (float16, bfloat16, float32) x launch config a real launch can use (the fixed config
and every autotune config its ``Launcher`` keeps, ``Launcher.configs_for``; the symmetric tile-pair kernels with
``PERSISTENT`` off and on, ``_common.pair_grid``), the kernel is specialised
exactly as a launch on an H100/H200 specialises it: the arguments go through Triton's own binder
(``create_function_from_signature``: pointers and integers divisible by 16 get ``tt.divisibility=16``, integers equal
to 1 become constants) with the argument values of the LLaVA-NeXT shapes, and compiled through Triton's whole
pipeline with the ``ptxas`` that ships with Triton (its ``-v`` log is read for spills). Registers, stack and static
shared memory are read from the cubin (``cuobjdump --dump-resource-usage``, also the one that ships with Triton),
dynamic shared memory from the compiled kernel's metadata.

Fails (exit 1) on any spill store/load or stack frame beyond the allowance written next to the kernel
(``SPILL_ALLOWANCES`` in its module, with the reason), on shared memory over 227 KiB, on a compile error, and on a
``@triton.jit`` kernel of the package that has no spec here (so a new kernel cannot skip the check).

Usage: ``python scripts/check_triton_compile.py [--jobs 2] [--json out.json] [--only substring] [--all-configs]``.
``--all-configs`` compiles the unpruned autotune list too (to see what the pruning removes); ``--extra-config
kernel:dtype:BLOCK_D:num_warps:num_stages`` adds a config (to show the check failing on a spilling one).
Needs no GPU; must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = 90
SHARED_LIMIT = 227 * 1024  # the opt-in maximum of shared memory per block on sm_90
DTYPES = ("float16", "bfloat16", "float32")
MODULES = tuple(sorted(p.stem for p in (ROOT / "triton_kernels").glob("*.py") if p.stem != "__init__"))
#: Kernels only tests launch (never a user's call): not checked.
TEST_ONLY = {"_common._offset_probe_kernel", "_common._tile_pair_probe_kernel", "_common._work_item_probe_kernel"}
# Token counts of the shapes that decide the token tiles: LLaVA-NeXT's base view (576 -> BLOCK 64) and its high-res
# view (2304 -> BLOCK 128); D = 4096 (Vicuna/Mistral-7B width). All are multiples of 16, like most VLM shapes.
SMALL_N, LARGE_N, DIM = 576, 2304, 4096


@dataclasses.dataclass
class Spec:
    """One compile: ``kernel`` (``module.name``) with named argument values, constexprs and launch options."""

    kernel: str
    dtype: str
    args: dict  # name -> ("tensor", dtype) | int | float
    constexprs: dict
    num_warps: int
    num_stages: int
    origin: str  # "fixed" | "tuned" | "extra" | "unpruned"

    @property
    def label(self) -> str:
        const = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{self.dtype}] {const} w{self.num_warps} s{self.num_stages} ({self.origin})"


def _t(dtype: str) -> tuple[str, str]:
    return ("tensor", dtype)


F32, I64, I32, U8 = _t("float32"), _t("int64"), _t("int32"), _t("uint8")


def _specs(all_configs: bool, extra: list[str]) -> list[Spec]:
    import torch
    from mrprune.triton_kernels import _common, graph_scores, received_attention, transfer_scores
    from mrprune.triton_kernels import cosine_graph as cg

    out: list[Spec] = []

    def fixed(kernel, dtype, args, constexprs, num_warps, num_stages=3):
        out.append(Spec(kernel, dtype, args, constexprs, num_warps, num_stages, "fixed"))

    def tuned(kernel, launcher, dtype, args, constexprs):
        """The fixed config the launcher uses without autotuning, and every config the autotuner may pick; for the
        symmetric tile-pair kernels in both launch shapes (one program per pair, persistent programs)."""
        shapes = [{"PERSISTENT": False}, {"PERSISTENT": True}] if "PERSISTENT" in launcher.kernel.arg_names else [{}]
        for shape in shapes:
            const = {**constexprs, **shape}
            bd, warps, stages = launcher.fixed(const)
            out.append(Spec(kernel, dtype, args, {**const, "BLOCK_D": bd}, warps, stages, "fixed"))
            kept = {(c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) for c in launcher.configs_for(const)}
            for c in launcher.configs:
                key = (c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
                if key in kept or all_configs:
                    origin = "tuned" if key in kept else "unpruned"
                    out.append(Spec(kernel, dtype, args, {**const, "BLOCK_D": key[0]}, key[1], key[2], origin))

    for dtype in DTYPES:
        x = _t(dtype)
        upcast = dtype == "float32"  # a real GPU launch: float32 upcasts, float16/bfloat16 use the tensor cores
        fixed(
            "_common._row_norms_kernel",
            dtype,
            dict(x=x, norms=F32, inv_norms=F32, N=LARGE_N, D=DIM, stride_xb=LARGE_N * DIM, stride_xn=DIM),
            dict(BLOCK_R=32, BLOCK_D=256),
            4,
        )
        for n in (SMALL_N, LARGE_N):
            block = _common.token_block_cuda(n)
            tile = dict(
                x=x,
                inv_norms=F32,
                lengths=I64,
                B=8,
                N=n,
                D=DIM,
                stride_xb=n * DIM,
                stride_xn=DIM,
                N_BUCKET=_common.next_power_of_2(n),
                D_BUCKET=DIM,
            )
            tuned(
                "cosine_graph.gram_store_kernel",
                cg._gram_store,
                dtype,
                dict(tile, S=F32, stride_sb=n * n),
                dict(BLOCK=block, UPCAST=upcast),
            )
            stream = dict(tile, stride_pb=n * n // block, stride_ps=n, threshold=0.5, temperature=0.03)
            # the sparse variant: float32 takes 64-token tiles (graph_scores_triton)
            sparse_block = min(block, 64) if upcast else block
            sparse = dict(stream, stride_pb=n * n // sparse_block)
            for count_clear, tokens_tile, args in ((False, block, stream), (True, sparse_block, sparse)):
                tuned(
                    "graph_scores._stream_stats_kernel",
                    graph_scores._stream_stats,
                    dtype,
                    dict(args, part_m=F32, part_l=F32, part_c=F32, part_k=U8 if count_clear else F32),
                    dict(BLOCK=tokens_tile, UPCAST=upcast, COUNT_CLEAR=count_clear),
                )
            tuned(
                "graph_scores._stream_propagate_kernel",
                graph_scores._stream_propagate,
                dtype,
                dict(stream, row_max=F32, coef=F32, part_v=F32),
                dict(BLOCK=block, UPCAST=upcast),
            )
            tuned(
                "graph_scores._edge_write_kernel",
                graph_scores._edge_write,
                dtype,
                dict(
                    tile,
                    row_max=F32,
                    slot_start=I64,
                    slot_count=I64,
                    slot_clear=U8,
                    edge_col=I32,
                    edge_w=F32,
                    stride_sb=n * n // sparse_block,
                    stride_ss=n,
                    threshold=0.5,
                    temperature=0.03,
                ),
                dict(BLOCK=sparse_block, UPCAST=upcast, SUB=16),
            )
        # received attention over an LLM layer's queries and keys: 32 heads of 128 features, 64-token tiles
        heads, head_dim = 32, 128
        attention = dict(
            q=x,
            k=x,
            seg=I64,
            lengths=I64,
            ranges=_t("int32"),
            row_max=F32,
            row_sum=F32,
            N=LARGE_N,
            D=head_dim,
            H=heads,
            stride_qb=heads * LARGE_N * head_dim,
            stride_qh=LARGE_N * head_dim,
            stride_qn=head_dim,
            scale=head_dim**-0.5,
        )
        for has_seg in (False, True):
            block_d, warps = received_attention.launch_config(head_dim, upcast, on_gpu=True)
            tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, HAS_SEG=has_seg, UPCAST=upcast)
            fixed("received_attention._row_stats_kernel", dtype, attention, tiles, warps)
            fixed("received_attention._column_kernel", dtype, dict(attention, part=F32), tiles, warps)
        for m, n in ((SMALL_N, LARGE_N), (LARGE_N, SMALL_N), (SMALL_N, SMALL_N), (LARGE_N, LARGE_N)):
            bm, bn = transfer_scores.cuda_tiles(m, n, upcast)
            args = dict(
                q=x,
                k=x,
                q_inv=F32,
                k_inv=F32,
                k_weights=F32,
                k_mask=U8,
                q_lengths=I64,
                part_m=F32,
                part_l=F32,
                part_a=F32,
                part_c=F32,
                M=m,
                N=n,
                D=DIM,
                stride_qb=m * DIM,
                stride_kb=n * DIM,
                stride_n=DIM,
                stride_pb=4 * m,
                stride_ps=m,
                TILES_PER_SPLIT=3,
                threshold=0.5,
                temperature=0.03,
                N_BUCKET=_common.next_power_of_2(n),
                D_BUCKET=DIM,
            )
            tuned(
                "transfer_scores._transfer_kernel",
                transfer_scores._transfer,
                dtype,
                args,
                dict(BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast),
            )

        # issue 17 merging ops: even/odd (ToMe) or token-to-target (VisionZip) best match on head-averaged keys of
        # 64 features, the CSR segment sum over 1024-wide rows, and 16 LLM attention rows (32 heads, 8 KV heads, 128)
        fixed(
            "_merge._best_match_kernel",
            dtype,
            dict(
                x=x,
                inv=F32,
                rows=I64,
                cols=I64,
                best=F32,
                arg=I64,
                R=LARGE_N // 2,
                C=LARGE_N // 2,
                N=LARGE_N,
                D=64,
                stride_xb=LARGE_N * 64,
                stride_xn=64,
            ),
            dict(BLOCK_R=64, BLOCK_C=64, BLOCK_D=32 if upcast else 64, UPCAST=upcast),
            4,
        )
        fixed(
            "_merge._segment_sum_kernel",
            dtype,
            dict(x=x, entry_rows=I64, entry_coef=F32, offsets=I64, out=x, D=1024),
            dict(BLOCK_D=256),
            4,
        )
        for has_pos in (False, True):
            fixed(
                "attention_rows._attention_rows_kernel",
                dtype,
                dict(
                    q=x,
                    k=x,
                    mask=U8,
                    pos=I64,
                    probs=F32,
                    H=32,
                    HKV=8,
                    M=16,
                    N=LARGE_N,
                    D=128,
                    scale=128**-0.5,
                    stride_qb=32 * 16 * 128,
                    stride_qh=16 * 128,
                    stride_qm=128,
                    stride_kb=8 * LARGE_N * 128,
                    stride_kh=LARGE_N * 128,
                    stride_kn=128,
                ),
                dict(
                    HAS_POS=has_pos,
                    BLOCK_M=16 if upcast else 64,
                    BLOCK_N=32 if upcast else 64,
                    BLOCK_D=128,
                    UPCAST=upcast,
                ),
                4,
            )

    # dtype-independent kernels (float32 buffers only)
    n = LARGE_N
    rows = dict(
        S=F32,
        P=F32,
        lengths=I64,
        weights=F32,
        row_max=F32,
        row_sum=F32,
        degree=F32,
        coef=F32,
        N=n,
        stride_sb=n * n,
        threshold=0.5,
        temperature=0.03,
    )
    for write_p, write_stats in ((True, False), (False, True)):
        fixed(
            "cosine_graph.dense_rows_kernel",
            "float32",
            rows,
            dict(BLOCK_R=32, BLOCK_C=128, WRITE_P=write_p, WRITE_STATS=write_stats),
            4,
        )
    slots = dict(lengths=I64, N=n, stride_pb=n * 18, stride_ps=n, ROWS_PER_SLOT=128)
    fixed(
        "graph_scores._stats_combine_kernel",
        "float32",
        dict(slots, part_m=F32, part_l=F32, part_c=F32, weights=F32, row_max=F32, row_sum=F32, degree=F32, coef=F32),
        dict(BLOCK_R=128),
        4,
    )
    fixed(
        "graph_scores._sparse_step_kernel",
        "float32",
        dict(
            row_ptr=I64,
            edge_col=I32,
            edge_w=F32,
            coef=F32,
            fill=F32,
            fill_total=F32,
            lengths=I64,
            divisor=F32,
            out=F32,
            N=n,
        ),
        dict(BLOCK_R=64, BLOCK_E=32),
        4,
    )
    fixed(
        "graph_scores._slot_reduce_kernel",
        "float32",
        dict(slots, part_v=F32, divisor=F32, out=F32),
        dict(BLOCK_R=128),
        4,
    )
    fixed(
        "graph_scores._dense_propagate_kernel",
        "float32",
        dict(
            S=F32,
            lengths=I64,
            row_max=F32,
            coef=F32,
            part_v=F32,
            N=n,
            stride_sb=n * n,
            stride_pb=n * 4,
            stride_ps=n,
            ROWS_PER_SLOT=576,
            threshold=0.5,
            temperature=0.03,
        ),
        dict(BLOCK_R=32, BLOCK_C=128),
        4,
    )
    fixed(
        "transfer_scores._transfer_combine_kernel",
        "float32",
        dict(
            part_m=F32,
            part_l=F32,
            part_a=F32,
            part_c=F32,
            q_lengths=I64,
            selected_count=I64,
            out=F32,
            M=n,
            stride_pb=n * 4,
            stride_ps=n,
            SPLITS=4,
        ),
        dict(BLOCK_R=128),
        4,
    )

    # the sequential selections over a materialised float32 cosine matrix (one program per item, 64-token sweeps)
    selection = dict(S=F32, lengths=I64, out=I64, N=n, K=640, stride_sb=n * n)
    fixed(
        "bipartite_dedup._dedup_rounds_kernel",
        "float32",
        dict(selection, order=_t("int32"), score=F32, per_round=8),
        dict(BLOCK=64),
        4,
    )
    fixed(
        "coverage_select._coverage_greedy_kernel",
        "float32",
        dict(selection, weights=F32, cur=F32, picked=_t("int8")),
        dict(BLOCK_I=64, BLOCK_J=64),
        4,
    )

    for item in extra:  # kernel:dtype:BLOCK_D:num_warps:num_stages, on the large shape's first spec of that kernel
        kernel, dtype, bd, warps, stages = item.split(":")
        base = next(s for s in reversed(out) if s.kernel.endswith(kernel) and s.dtype == dtype)
        out.append(
            dataclasses.replace(
                base,
                constexprs={**base.constexprs, "BLOCK_D": int(bd)},
                num_warps=int(warps),
                num_stages=int(stages),
                origin="extra",
            )
        )
    del torch
    unique, seen = [], set()
    for spec in out:  # the fixed config is often one of the tuned ones: compile it once
        key = (spec.kernel, spec.dtype, repr(spec.args), repr(spec.constexprs), spec.num_warps, spec.num_stages)
        if key not in seen:
            seen.add(key)
            unique.append(spec)
    return unique


def _check_coverage(specs: list[Spec]) -> list[str]:
    """``@triton.jit`` kernels of the package without a spec (helpers called from kernels are not launched)."""
    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under the interpreter

    covered = {s.kernel for s in specs} | TEST_ONLY
    missing = []
    for module in MODULES:
        mod = importlib.import_module(f"mrprune.triton_kernels.{module}")
        for name, obj in vars(mod).items():
            defined_here = getattr(getattr(obj, "fn", None), "__module__", None) == mod.__name__
            if isinstance(obj, KernelInterface) and defined_here and name.endswith("_kernel"):
                if f"{module}.{name}" not in covered:
                    missing.append(f"{module}.{name}")
    return missing


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_spec(spec: Spec) -> dict:
    """Compile one spec for sm_90 and return its resources (``error`` set when the compile failed)."""
    import torch
    import triton
    from mrprune.triton_kernels import _common
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module, name = spec.kernel.split(".")
    kernel = getattr(importlib.import_module(f"mrprune.triton_kernels.{module}"), name)
    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    values = []
    for arg in kernel.arg_names:
        if arg in spec.constexprs:
            values.append(spec.constexprs[arg])
        elif arg not in spec.args:
            return {"error": f"spec has no value for argument {arg!r} (kernel signature changed?)"}
        elif isinstance(spec.args[arg], tuple):
            values.append(torch.empty(64, dtype=getattr(torch, spec.args[arg][1])))  # 64-byte aligned, like CUDA's
        else:
            values.append(spec.args[arg])
    kwargs = dict(num_warps=spec.num_warps, num_stages=spec.num_stages, **_common.LAUNCH_OPTIONS, debug=False)
    bound, specialization, options = binder(*values, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # the ptxas -v log of Triton's own ptxas call
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as error:  # noqa: BLE001 (a compile error is a finding)
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"}
    seconds = time.perf_counter() - start
    result = {
        "seconds": round(seconds, 2),
        "dynamic_shared": compiled.metadata.shared,
        "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
        "cp_async": compiled.asm["ptx"].count("cp.async"),
    }
    match = _PTXAS.search(log.getvalue())
    regs = _REGS.search(log.getvalue())
    if match is None or regs is None:
        return {**result, "error": "no ptxas -v log (was the cubin taken from a cache?)"}
    result.update(
        ptxas_registers=int(regs.group(1)),
        stack=int(match.group(1)),
        spill_stores=int(match.group(2)),
        spill_loads=int(match.group(3)),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
    found = _RES.search(res.stdout)
    if found is None:
        return {**result, "error": f"cuobjdump gave no resource usage: {res.stdout[-300:]} {res.stderr[-300:]}"}
    result.update(
        registers=int(found.group(1)),
        cubin_stack=int(found.group(2)),
        static_shared=int(found.group(3)),
        local=int(found.group(4)),
    )
    return result


def _worker(spec: Spec) -> tuple[Spec, dict]:
    return spec, compile_spec(spec)


def _allowance(kernel: str) -> tuple[int, str]:
    module, name = kernel.split(".")
    table = getattr(importlib.import_module(f"mrprune.triton_kernels.{module}"), "SPILL_ALLOWANCES", {})
    return table.get(name, (0, ""))


def problems(spec: Spec, result: dict) -> list[str]:
    """Why this compile fails the check (empty when it passes)."""
    if "error" in result:
        return [result["error"]]
    found = []
    allowed, _ = _allowance(spec.kernel)
    spill = max(result["spill_stores"], result["spill_loads"], result["stack"], result["cubin_stack"])
    if spill > allowed:
        found.append(
            f"spills: {result['spill_stores']} B stores, {result['spill_loads']} B loads, "
            f"{max(result['stack'], result['cubin_stack'])} B stack (allowed {allowed})"
        )
    if spec.constexprs.get("UPCAST") is False and result["wgmma"] == 0:
        found.append("float16/bfloat16 dot not on the wgmma tensor-core path")
    shared = result["dynamic_shared"] + result["static_shared"]
    if shared > SHARED_LIMIT:
        found.append(f"shared memory {shared} B > {SHARED_LIMIT} B")
    return found


def run(specs: list[Spec], jobs: int) -> list[tuple[Spec, dict]]:
    if jobs <= 1:
        return [_worker(s) for s in specs]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_worker, specs, chunksize=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--only", default="", help="only kernels whose label contains this")
    parser.add_argument("--all-configs", action="store_true", help="also the autotune configs the pruning drops")
    parser.add_argument("--extra-config", action="append", default=[], metavar="KERNEL:DTYPE:BD:WARPS:STAGES")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    # A fresh cache and no cache hits: a cached cubin would come without the ptxas log.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mrprune-cubin-check-")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    sys.path.insert(0, str(ROOT))
    import mrprune

    if not mrprune.HAS_TRITON:
        print("check_triton_compile: mrprune.triton_kernels did not load", file=sys.stderr)
        return 1
    specs = _specs(args.all_configs, args.extra_config)
    missing = _check_coverage(specs)
    specs = [s for s in specs if args.only in s.label]
    start = time.perf_counter()
    results = run(specs, args.jobs)
    failed = 0
    rows = []
    for spec, result in results:
        found = problems(spec, result)
        # the unpruned configs are informational: the autotuner never runs them
        failed += bool(found) and spec.origin != "unpruned"
        status = "FAIL" if found and spec.origin != "unpruned" else ("drop" if found else "ok")
        regs = result.get("registers", "-")
        print(
            f"{status:4} {spec.label}: regs {regs}, spill {result.get('spill_stores', '-')}/"
            f"{result.get('spill_loads', '-')} B, stack {result.get('stack', '-')} B, shared "
            f"{result.get('dynamic_shared', 0) + result.get('static_shared', 0)} B, "
            f"{result.get('seconds', '-')} s" + (f"  <- {'; '.join(found)}" if found else "")
        )
        rows.append({**dataclasses.asdict(spec), **result, "problems": found})
    for name in missing:
        print(f"FAIL {name}: a @triton.jit kernel without a compile spec in scripts/check_triton_compile.py")
    failed += len(missing)
    print(
        f"check_triton_compile: {len(results)} cubins for sm_{ARCH} in {time.perf_counter() - start:.0f} s, "
        f"{failed} failing"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
