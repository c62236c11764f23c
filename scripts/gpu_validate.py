#!/usr/bin/env python3
"""The smoke run of scripts/gpu_validate.sh: mrprune's Triton and CUDA kernels on one H100/H200 (about 2 minutes).

Run from the repository root after the extension is built with CUDA. Writes ``$RESULTS/gpu_validate.json`` and
prints PASS/FAIL/INFO/TIME lines. ``--dry-run`` runs the same code on tiny shapes on the CPU (Triton interpreter;
CUDA-only checks skipped, timings labelled CPU) so that the script itself is checked without a GPU (CI).

Order (most information per second first): environment and dispatch; full-size correctness of the Triton graph ops
(float16) against a float64 reference on the GPU, plus determinism, symmetry, stream == materialize; every op captured
in a CUDA graph and replayed (no host synchronisation on the CUDA path); stream-ordering checks (private ops on a side
stream); timings of every op (CUDA events, medians) against its H200 floor; resource usage of every Triton kernel
compiled in this run (registers, spills, shared memory); selection ops (CUDA) against the reference; bfloat16 graph
ops; an optional autotune probe. Sections that would start after ``--budget-s`` are skipped, not killed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
import traceback

parser = argparse.ArgumentParser()
parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
parser.add_argument("--budget-s", type=float, default=150.0, help="skip remaining sections after this many seconds")
parser.add_argument("--autotune-probe", action="store_true", help="also time one autotuned launch (compiles 8 configs)")
args = parser.parse_args()
DRY = args.dry_run
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("MRPRUNE_SKIP_EXT", "1")
os.environ.setdefault("MRPRUNE_TRITON_AUTOTUNE", "0")  # fixed configs: no multi-second autotune per shape

import torch  # noqa: E402

import mrprune  # noqa: E402
from mrprune import backends, reference, testing  # noqa: E402

DEV = "cpu" if DRY else "cuda"
OUT = os.environ.get("RESULTS") or os.environ.get("OUT") or "/tmp/gpu_validate_out"
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
R: dict = {"checks": {}, "info": {}, "timings_ms": {}, "kernels": {}}
FAILED: list[str] = []
# shapes: (rows, cols, D) of the LLaVA-NeXT image, greedy/diversity (N, D, k), video N list
LLAVA = (6, 6, 64) if DRY else (48, 48, 4096)
SEL = (200, 64, 40) if DRY else (2880, 4096, 640)
VIDEO = [256] if DRY else [16384, 65536]
DTYPES = [torch.float16] if DRY else [torch.float16, torch.bfloat16]
if not DRY:
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64/float32 references on the GPU must be IEEE
    torch.backends.cudnn.allow_tf32 = False


def left() -> float:
    return args.budget_s - (time.time() - T0)


def check(name, ok, detail=None):
    R["checks"][name] = {"ok": bool(ok), "detail": detail}
    if not ok:
        FAILED.append(name)
    print(f"{'PASS' if ok else 'FAIL'} {name}" + ("" if detail is None else f"  {detail}"), flush=True)


def info(name, value):
    R["info"][name] = value
    print(f"INFO {name}: {value}", flush=True)


def section(name):
    def deco(fn):
        def run():
            if left() < 0:
                info(f"{name} skipped", "time budget spent")
                return
            t = time.time()
            print(f"== {name}", flush=True)
            try:
                fn()
            except Exception:  # noqa: BLE001  (report and go on to the next section)
                check(f"{name}: no exception", False, traceback.format_exc(limit=6)[-3000:])
            R["info"][f"{name} seconds"] = round(time.time() - t, 1)
            dump()

        return run

    return deco


def dump():
    with open(os.path.join(OUT, "gpu_validate.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)


@contextlib.contextmanager
def persistent_mode(mode):
    """``MRPRUNE_TRITON_PERSISTENT=mode`` inside the block (read by the Triton launchers at every call)."""
    before = os.environ.get("MRPRUNE_TRITON_PERSISTENT")
    os.environ["MRPRUNE_TRITON_PERSISTENT"] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ["MRPRUNE_TRITON_PERSISTENT"]
        else:
            os.environ["MRPRUNE_TRITON_PERSISTENT"] = before


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps=10, warmup=2):
    if DRY:  # the interpreter: one call checks the code; its time means nothing
        reps, warmup = 1, 0
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(got, want, mask=None):
    got, want = got.double(), want.double()
    if mask is not None:
        got, want = got[mask], want[mask]
    if got.numel() == 0:
        return 0.0
    return float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())


def ambiguous_rows(x, threshold, delta=1e-5, keys=None):
    """Rows of x with a float64 cosine (against keys, default x itself) within delta of the threshold."""
    u = reference.normalize_rows(x.double())
    v = u if keys is None else reference.normalize_rows(keys.double())
    return ((u @ v.T - threshold).abs() < delta).any(dim=1)


def llava_views(dtype):
    rows, cols, dim = LLAVA
    x = testing.llava_next_features(rows, cols, dim, seed=0)
    high = x[576:].reshape(rows, cols + 1, dim)[:, :cols].reshape(1, rows * cols, dim)
    low = x[:576].reshape(1, 576, dim)
    return high.to(DEV, dtype), low.to(DEV, dtype)


def lengths_of(x):
    return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)


# ------------------------------------------------------------------------------------------------------------------
@section("environment")
def environment():
    import triton

    info("torch", torch.__version__)
    info("triton", triton.__version__)
    info("HAS_EXTENSION", mrprune.HAS_EXTENSION)
    info("HAS_TRITON", mrprune.HAS_TRITON)
    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        info("device", f"{p.name} sm_{p.major}{p.minor} SMs={p.multi_processor_count} mem={p.total_memory >> 30} GiB")
    for op in sorted(mrprune._library.SCHEMAS):
        info(f"auto backend order for {op} on {DEV}", backends.available(op, DEV))
    if DEV == "cuda":
        for op in ("greedy_residual_select", "diversity_select", "topk_indices", "coverage_select", "bipartite_dedup"):
            check(
                f"CUDA kernel registered for {op}",
                torch._C._dispatch_has_kernel_for_dispatch_key(f"mrprune::_{op}_cuda", "CUDA"),
            )
        for op in ("graph_scores", "transfer_scores", "cosine_graph"):
            check(f"auto picks triton for {op}", backends.available(op, "cuda")[0] == "triton")


# ------------------------------------------------------------------------------------------------------------------
def graph_ops(dtypes):
    from mrprune.triton_kernels import cosine_graph as tcg
    from mrprune.triton_kernels import graph_scores as tgs
    from mrprune.triton_kernels._common import feature_block, row_norms, token_block

    for dtype in dtypes:
        high, low = llava_views(dtype)
        name = str(dtype).split(".")[-1]
        lengths = lengths_of(high)
        amb = ambiguous_rows(high[0], 0.5).cpu()
        info(f"{name}: rows within 1e-5 of the threshold", int(amb.sum()))
        for t in (1, 5):
            want = reference.graph_scores(high.double(), lengths, None, 0.5, 0.03, t)[0].cpu()
            outs = {}
            for variant in ("stream", "sparse", "materialize"):
                with tgs.use_variant(variant):
                    with backends.use_backend("triton"):
                        a = mrprune.graph_scores(high, lengths, None, 0.5, 0.03, t)[0]
                        b = mrprune.graph_scores(high, lengths, None, 0.5, 0.03, t)[0]
                check(f"graph_scores {name} t={t} {variant}: deterministic (bitwise)", torch.equal(a, b))
                err = rel_err(a.cpu(), want, ~amb)
                check(
                    f"graph_scores {name} t={t} {variant}: vs float64 (rtol 5e-5, ambiguous rows excluded)",
                    err < 5e-5,
                    f"max rel err {err:.2e}",
                )
                outs[variant] = a.cpu()
            err = rel_err(outs["stream"], outs["materialize"], ~amb)
            info(f"graph_scores {name} t={t}: stream vs materialize max rel diff", f"{err:.2e}")
            # the kept set at MR-Pruner's budget (30 %): boundary flips between GPU and float64 reference
            k = int(0.3 * want.numel())
            gpu_set = set(torch.topk(outs["materialize"].double(), k).indices.tolist())
            ref_set = set(torch.topk(want, k).indices.tolist())
            info(f"graph_scores {name} t={t}: top-30% kept-set differences vs float64", len(gpu_set ^ ref_set) // 2)

        # the materialised S must be bitwise symmetric; P rows sum to 1
        _, inv = row_norms(high)
        S = torch.zeros(1, high.shape[1], high.shape[1], dtype=torch.float32, device=DEV)
        tcg.gram_store(high, inv, lengths, S, token_block(high.shape[1], high), feature_block(high.shape[2], high))
        sync()
        check(f"gram_store {name}: S bitwise symmetric", torch.equal(S[0], S[0].T))
        d = S[0].diagonal()
        info(f"gram_store {name}: diagonal range", (float(d.min()), float(d.max())))
        # how far the tensor-core cosines are from float64: this sets the threshold-ambiguity DELTA of the tests
        u = reference.normalize_rows(high[0].double())
        err = (S[0].double() - u @ u.T).abs().flatten()
        q = torch.quantile(
            err[:: max(1, err.numel() // 4_000_000)].float(), torch.tensor([0.5, 0.999, 0.99999], device=err.device)
        )
        info(
            f"gram_store {name}: |S - S_float64| median / 99.9% / 99.999% / max",
            [f"{float(v):.2e}" for v in (*q, err.max())],
        )
        del u, err
        with backends.use_backend("triton"):
            P, deg = mrprune.cosine_graph(high, lengths)
        rs = P[0].sum(1)
        check(f"cosine_graph {name}: rows sum to 1", float((rs - 1).abs().max()) < 1e-4, float((rs - 1).abs().max()))
        want_deg = reference.cosine_graph(high.double(), lengths)[1][0]
        same = (deg[0].double() == want_deg) | amb.to(DEV)
        check(f"cosine_graph {name}: degree == float64 on unambiguous rows", bool(same.all()), int((~same).sum()))

        # transfer: base-view queries vs high-res keys, about 70 % selected
        gen = torch.Generator().manual_seed(1)
        mask = (torch.rand(1, high.shape[1], generator=gen) < 0.7).to(DEV)
        with backends.use_backend("triton"):
            a = mrprune.transfer_scores(low, lengths_of(low), high, mask, None, 0.5, 0.03)[0]
            b = mrprune.transfer_scores(low, lengths_of(low), high, mask, None, 0.5, 0.03)[0]
        check(f"transfer_scores {name}: deterministic", torch.equal(a, b))
        want = reference.transfer_scores(low.double(), lengths_of(low), high.double(), mask, None, 0.5, 0.03)[0].cpu()
        amb_q = ambiguous_rows(low[0], 0.5, keys=high[0][mask[0]]).cpu()
        err = rel_err(a.cpu(), want, ~amb_q)
        check(
            f"transfer_scores {name}: vs float64 (rtol 5e-5)",
            err < 5e-5,
            f"max rel err {err:.2e}, {int(amb_q.sum())} ambiguous queries",
        )


# ------------------------------------------------------------------------------------------------------------------
@section("selection ops (CUDA C++)")
def selection_ops():
    n, dim, k = SEL
    rows = 48 if not DRY else 6
    x = testing.llava_next_features(rows, rows, dim, seed=2)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[576 + torch.arange(rows) * (rows + 1) + rows] = False  # drop the (identical) newline tokens
    x = x[keep][:n][None].to(DEV)
    lengths = lengths_of(x)
    # topk: bitwise equal to the CPU reference on the same scores, with planted exact ties
    scores = torch.randn(4, 4096 if not DRY else 300, generator=torch.Generator().manual_seed(3)).round(decimals=1)
    lens = torch.tensor([scores.shape[1], 1000 if not DRY else 100, 0, 17])
    for sort in (False, True):
        want = reference.topk_indices(scores, lens, 64, sort)
        got = mrprune.topk_indices(scores.to(DEV), lens.to(DEV), 64, sort).cpu()
        check(f"topk_indices sort={sort}: equal to the reference (ties to the lower index)", torch.equal(got, want))
    # greedy: the float64 reference on the GPU as oracle; report the agreeing prefix
    want_idx, want_e = reference.greedy_residual_select(x.double(), lengths, k)
    for alg in ("gram", "basis"):
        idx, e = mrprune.greedy_residual_select(x.half(), lengths, k, algorithm=alg)
        idx2, _ = mrprune.greedy_residual_select(x.half(), lengths, k, algorithm=alg)
        check(f"greedy {alg}: deterministic", torch.equal(idx, idx2))
        agree = (idx[0].cpu() == want_idx[0].cpu()).long().cumprod(0).sum()
        info(f"greedy {alg}: picks equal to float64 for the first", f"{int(agree)} of {k}")
        info(f"greedy {alg}: kept-set overlap with float64", len(set(idx[0].tolist()) & set(want_idx[0].tolist())))
    # batch composition must not change a result (bitwise)
    xb = torch.cat([x, x.flip(1).contiguous()])  # item 1: other tokens, shorter length, garbage past it
    lb = torch.tensor([n, n // 2], device=DEV)
    one, _ = mrprune.greedy_residual_select(x, lengths, k)
    two, _ = mrprune.greedy_residual_select(xb, lb, k)
    check("greedy: batch composition does not change picks", torch.equal(one[0], two[0]))
    # half precision read natively (tensor-core Gram) vs float32 on the exactly upcast features
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt)
        idx_h, e_h = mrprune.greedy_residual_select(xh, lengths, k, algorithm="gram")
        idx_f, e_f = mrprune.greedy_residual_select(xh.float(), lengths, k, algorithm="gram")
        agree = int((idx_h[0] == idx_f[0]).long().cumprod(0).sum())
        info(f"greedy {dt}: picks equal to float32 (upcast features) for the first", f"{agree} of {k}")
        close = torch.allclose(e_h[0, :agree].float(), e_f[0, :agree].float(), rtol=1e-3, atol=1e-3 * float(e_f.max()))
        check(f"greedy {dt}: energies of the agreeing prefix match float32", agree > 0 and close)
        div_h = mrprune.diversity_select(xh, lengths, k)
        div_f = mrprune.diversity_select(xh.float(), lengths, k)
        agree = int((div_h[0] == div_f[0]).long().cumprod(0).sum())
        info(f"diversity {dt}: picks equal to float32 (upcast features) for the first", f"{agree} of {k}")
    want_div = reference.diversity_select(x.double(), lengths, k)
    got_div = mrprune.diversity_select(x.half(), lengths, k)
    agree = (got_div[0].cpu() == want_div[0].cpu()).long().cumprod(0).sum()
    info("diversity: picks equal to float64 for the first", f"{int(agree)} of {k}")
    check("diversity: deterministic", torch.equal(got_div, mrprune.diversity_select(x.half(), lengths, k)))


# ------------------------------------------------------------------------------------------------------------------
@section("stream ordering (private ops on a side stream, inputs written after a GPU sleep)")
def streams():
    if DEV != "cuda":
        info("streams", "CUDA only")
        return
    high, _ = llava_views(torch.float16)
    lengths = lengths_of(high)
    x32 = high.float().contiguous()
    scores = torch.randn(1, high.shape[1], device=DEV)
    ops = {
        "_graph_scores_triton": (
            lambda x: torch.ops.mrprune._graph_scores_triton(x, lengths, None, 0.5, 0.03, 1),
            high,
        ),
        "_topk_indices_cuda": (lambda s: torch.ops.mrprune._topk_indices_cuda(s, lengths, 100, False), scores),
        "_greedy_residual_select_cuda": (
            lambda x: torch.ops.mrprune._greedy_residual_select_cuda(x, lengths, 64, None, None, 1e-5, "auto")[0],
            x32,
        ),
        "_diversity_select_cuda": (lambda x: torch.ops.mrprune._diversity_select_cuda(x, lengths, 64, True), x32),
    }
    side = torch.cuda.Stream()
    for name, (fn, inp) in ops.items():
        want = fn(inp)  # also compiles / warms up
        torch.cuda.synchronize()
        buf = torch.zeros_like(inp)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time on the side stream
            buf.copy_(inp)
            got = fn(buf)
        torch.cuda.synchronize()
        check(f"{name} runs on the current (side) stream", torch.equal(got, want))


# ------------------------------------------------------------------------------------------------------------------
@section("compiled Triton kernels: registers, spills, shared memory")
def kernel_resources():
    import importlib

    from mrprune import triton_kernels

    for module in [m for m in dir(triton_kernels) if not m.startswith("__")] + ["_common"]:
        mod = importlib.import_module(f"mrprune.triton_kernels.{module}")
        for attr in dir(mod):
            fn = getattr(mod, attr)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for compiled in list(cache.values()):
                    try:
                        compiled._init_handles()
                    except Exception:  # noqa: BLE001
                        pass
                    meta = compiled.metadata
                    consts = (
                        {k: v for k, v in getattr(compiled, "src", None).constants.items()}
                        if hasattr(getattr(compiled, "src", None), "constants")
                        else {}
                    )
                    key = f"{attr} w{getattr(meta, 'num_warps', '?')} s{getattr(meta, 'num_stages', '?')} {consts}"
                    rec = {
                        "regs": getattr(compiled, "n_regs", None),
                        "spills": getattr(compiled, "n_spills", None),
                        "shared": getattr(meta, "shared", None),
                    }
                    R["kernels"][key] = rec
                    print(f"INFO kernel {key}: {rec}", flush=True)
                    if rec["spills"]:
                        check(f"no register spills: {key}", False, rec)


# ------------------------------------------------------------------------------------------------------------------
@section("timings (CUDA events, medians) against the floors")
def timings():
    peak, bw = 990e12, 4.8e12  # dense fp16/bf16 tensor-core FLOP/s, HBM bytes/s (H200; H100: 3.35e12)

    def report(name, ms, flops=None, bytes_=None):
        if DRY:
            name = f"[CPU dry run, interpreter: not a GPU timing] {name}"
        floor = max(flops / peak if flops else 0.0, bytes_ / bw if bytes_ else 0.0) * 1e3
        R["timings_ms"][name] = {"ms": round(ms, 4), "floor_ms": round(floor, 4)}
        print(
            f"TIME {name}: {ms:.3f} ms (floor {floor:.3f} ms, x{ms / floor if floor else float('nan'):.1f})", flush=True
        )

    from mrprune.triton_kernels import _common
    from mrprune.triton_kernels import graph_scores as tgs

    high, low = llava_views(torch.float16)
    n, d = high.shape[1], high.shape[2]
    lengths = lengths_of(high)
    for variant in ("stream", "materialize"):
        with tgs.use_variant(variant):
            priv = lambda: torch.ops.mrprune._graph_scores_triton(high, lengths, None, 0.5, 0.03, 1)  # noqa: E731
            report(f"graph_scores N={n} t=1 {variant} (private op)", median_ms(priv), flops=n * n * d)
    with backends.use_backend("triton"):
        pub = lambda: mrprune.graph_scores(high, lengths)  # noqa: E731
        report(f"graph_scores N={n} t=1 auto (public op: validation, dispatch)", median_ms(pub), flops=n * n * d)
    hb = high.expand(8 if not DRY else 2, -1, -1).contiguous()
    priv8 = lambda: torch.ops.mrprune._graph_scores_triton(hb, lengths_of(hb), None, 0.5, 0.03, 1)  # noqa: E731
    report(f"graph_scores B=8 N={n} t=1 auto (private op)", median_ms(priv8), flops=8 * n * n * d)
    mask = torch.rand(1, n, device=DEV) < 0.7
    tr = lambda: torch.ops.mrprune._transfer_scores_triton(low, lengths_of(low), high, mask, None, 0.5, 0.03)  # noqa: E731
    report(f"transfer_scores M=576 N={n}", median_ms(tr), flops=2 * 576 * n * d)
    cg = lambda: torch.ops.mrprune._cosine_graph_triton(high, lengths, 0.5, 0.03)  # noqa: E731
    report(f"cosine_graph N={n}", median_ms(cg), flops=n * n * d, bytes_=3 * 4 * n * n)
    if DEV == "cuda":
        s = torch.randn(1, n, device=DEV)
        report(f"topk_indices N={n}", median_ms(lambda: torch.ops.mrprune._topk_indices_cuda(s, lengths, 690, False)))
        n_sel, d_sel, k_sel = SEL
        for dt, gram in ((torch.float32, "FP32 FFMA Gram"), (torch.bfloat16, "tensor-core Gram")):
            xs = torch.randn(1, n_sel, d_sel, device=DEV).to(dt)
            ls = lengths_of(xs)
            for k in (1, k_sel):
                g = lambda k=k, xs=xs, ls=ls: torch.ops.mrprune._greedy_residual_select_cuda(
                    xs, ls, k, None, None, 1e-5, "gram"
                )  # noqa: E731
                report(
                    f"greedy gram {dt} N={n_sel} k={k} ({gram} + k steps)",
                    median_ms(g, reps=3, warmup=1),
                    flops=n_sel * n_sel * d_sel,
                )
                dv = lambda k=k, xs=xs, ls=ls: torch.ops.mrprune._diversity_select_cuda(xs, ls, k, True)  # noqa: E731
                report(
                    f"diversity {dt} N={n_sel} k={k} ({gram})",
                    median_ms(dv, reps=3, warmup=1),
                    flops=n_sel * n_sel * d_sel,
                )
    # the ops without a Triton or CUDA kernel (batched "torch" backend on GPUs): memory-bound floors
    graph, degree = mrprune.cosine_graph(high, lengths)
    w = torch.rand(1, n, device=DEV)
    for t in (1, 5):
        gp = lambda t=t: mrprune.graph_propagate(graph, degree, w, lengths, t)  # noqa: E731
        report(f"graph_propagate N={n} t={t}", median_ms(gp), bytes_=t * 4 * n * n)
    text = torch.randn(1, 64, d, device=DEV, dtype=torch.float16)
    mc = lambda: mrprune.max_cosine(high, lengths, text, lengths_of(text))  # noqa: E731
    report(f"max_cosine M={n} N=64", median_ms(mc), flops=2 * n * 64 * d, bytes_=2 * n * d)
    if left() > 30:  # float32 on the fixed config (BLOCK=128, BLOCK_D=16, 8 warps: no spills on sm_90)
        h32 = high.float().contiguous()
        with tgs.use_variant("materialize"):
            f32 = lambda: torch.ops.mrprune._graph_scores_triton(h32, lengths, None, 0.5, 0.03, 1)  # noqa: E731
            report(
                f"graph_scores N={n} t=1 materialize FLOAT32 (fixed config; 67 TFLOP/s FFMA would be "
                f"{n * n * d / 67e12 * 1e3:.2f} ms)",
                median_ms(f32, reps=3, warmup=1),
                flops=n * n * d,
            )
    for nv in VIDEO:
        if left() < 20:
            break
        xv = torch.randn(1, nv, 4096 if not DRY else 64, device=DEV, dtype=torch.float16)
        lv = lengths_of(xv)
        info(f"graph_scores video N={nv}: persistent programs", _common.persistent_programs(xv))
        # t = 1 streams (2 Gram passes); t = 5 (G-Prune) streams 1 + t passes or builds edge lists (2 passes). The
        # tile-pair kernels run as one program per pair (persistent 0) or as persistent programs (1, pair_grid).
        both = ("0", "1")
        for t, variant, passes, modes in ((1, "stream", 2, both), (5, "stream", 6, ("auto",)), (5, "sparse", 2, both)):
            outs = {}
            for mode in modes:
                with tgs.use_variant(variant), persistent_mode(mode):
                    gv = functools.partial(torch.ops.mrprune._graph_scores_triton, xv, lv, None, 0.5, 0.03, t)
                    outs[mode] = gv()  # also the warm-up of the timing
                    report(
                        f"graph_scores video N={nv} t={t} {variant} persistent={mode} ({passes} Gram passes; floor = 1 "
                        "pass)",
                        median_ms(gv, reps=2, warmup=0),
                        flops=nv * nv * xv.shape[2],
                    )
            if len(outs) == 2:
                check(
                    f"graph_scores video N={nv} t={t} {variant}: persistent programs change no bit",
                    torch.equal(outs["0"], outs["1"]),
                )
        if DEV == "cuda":
            sv = torch.randn(1, nv, device=DEV)
            report(
                f"topk_indices N={nv}",
                median_ms(lambda sv=sv, lv=lv, nv=nv: torch.ops.mrprune._topk_indices_cuda(sv, lv, nv // 10, False)),
            )


# ------------------------------------------------------------------------------------------------------------------
def op_inputs(name, n=1024, d=256):
    """Inputs of the public op ``name`` at a small batched shape (two items, one padded), or None if unknown."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, n, d, generator=g).to(DEV, torch.float16)
    lens = torch.tensor([n, n // 2 + 3], device=DEV)
    if name in ("cosine_graph", "graph_scores"):
        return (x, lens)
    if name == "transfer_scores":
        return (x[:, : n // 4].contiguous(), lens // 4, x, torch.rand(2, n, generator=g).to(DEV) < 0.7)
    if name == "graph_propagate":
        graph, degree = mrprune.cosine_graph(x, lens)
        return (graph, degree, torch.rand(2, n, generator=g).to(DEV), lens, 3)
    if name == "greedy_residual_select":
        return (x, lens, 64, torch.rand(2, n, generator=g).to(DEV), torch.tensor([3, -1], device=DEV))
    if name == "diversity_select":
        return (x, lens, 64)
    if name == "max_cosine":
        return (x, lens, x[:, :40].contiguous(), torch.tensor([40, 0], device=DEV))
    if name == "topk_indices":
        return (x[:, :, 0].float().contiguous(), lens, 100)
    return None


@section("CUDA-graph capture of every op (no host synchronisation on the CUDA path)")
def capture():
    if DEV != "cuda":
        info("capture", "CUDA only")
        return
    for name in sorted(mrprune._library.SCHEMAS):
        inputs = op_inputs(name)
        if inputs is None:
            info(f"capture {name}", "no inputs known to this script")
            continue
        op = getattr(mrprune, name)
        want = op(*inputs)  # eager, also warms compiles (autotuning is off: fixed configs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                got = op(*inputs)
            graph.replay()
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001  (a host sync under capture raises here)
            check(f"capture {name}", False, f"{type(error).__name__}: {str(error)[:300]}")
            torch.cuda.synchronize()
            continue
        wants, gots = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        check(f"capture {name}: replay equals eager", all(torch.equal(a, b) for a, b in zip(wants, gots, strict=True)))


# ------------------------------------------------------------------------------------------------------------------
@section("autotune probe (one shape, 8 configs)")
def autotune_probe():
    if not args.autotune_probe or DEV != "cuda":
        info("autotune probe", "not requested")
        return
    os.environ["MRPRUNE_TRITON_AUTOTUNE"] = "1"
    high, _ = llava_views(torch.float16)
    t = time.time()
    torch.ops.mrprune._graph_scores_triton(high, lengths_of(high), None, 0.5, 0.03, 1)
    torch.cuda.synchronize()
    info("first autotuned graph_scores call (compile + benchmark), s", round(time.time() - t, 1))
    os.environ["MRPRUNE_TRITON_AUTOTUNE"] = "0"


graph_ops_fp16 = section("graph ops at the LLaVA-NeXT shape, float16 (Triton, fixed configs)")(
    lambda: graph_ops(DTYPES[:1])
)
graph_ops_bf16 = section("graph ops at the LLaVA-NeXT shape, bfloat16 (Triton, fixed configs)")(
    lambda: graph_ops(DTYPES[1:])
)
# correctness of the default dtype first, then the GPU-only checks and timings, then the rest
for run in (
    environment,
    graph_ops_fp16,
    capture,
    streams,
    timings,
    kernel_resources,
    selection_ops,
    graph_ops_bf16,
    autotune_probe,
):
    run()
R["failed"] = FAILED
R["seconds"] = round(time.time() - T0, 1)
dump()
print(f"\n{len(FAILED)} failed: {FAILED}\ntotal {R['seconds']} s", flush=True)
sys.exit(1 if FAILED else 0)
