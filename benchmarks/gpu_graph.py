"""GPU time and peak memory of the Triton graph kernels against the official eager path and the Gram-GEMM floor.

Cases (research/algorithms.md §2.3-2.5, §3.2):

* ``graph_scores``: LLaVA-NeXT views (N = 576 and 2304, D = 4096, batch 8) at t = 1 (MR-Pruner) and t = 5 (G-Prune),
  float16 and float32 inputs; video (one item of N = 16384 and 36864 tokens, D = 4096: 16 and 36 Qwen2.5-VL-like
  frames of 32 x 32 merged tokens), float16 (and float32 at t = 1).
* ``transfer_scores``: 576 base queries against 2304 high-res keys, half of them selected, batch 8.
* ``cosine_graph``: the materialised graph at N = 2304, batch 8.

Implementations:

* ``triton-<variant>``: the launchers of ``mrprune.triton_kernels`` (``stream``, ``materialize``, ``auto``), and
  ``triton-op``: the public op with the "triton" backend (validation included, the NaN scan off);
* ``official``: the official MR-Pruner / G-Prune code path in the input precision (normalize, Gram, threshold,
  divide by T, -5000 fill, softmax, ``(P > 0)`` degree, ``torch.linalg.matrix_power``, ``w @ P / degree``), batched
  over items with ``bmm`` (the official code runs one image at a time: batching only helps it);
* ``reference``: ``mrprune.reference`` (plain torch, float32 compute, a loop over items; no C++);
* ``gram``: the floor: one cuBLAS ``X^ X^T`` (batched) of the pre-normalised rows in the input precision (TF32 off
  for float32); ``ratio_to_gram`` is each implementation's time over it.

Times are medians of ``triton.testing.do_bench`` (milliseconds); ``peak_mib`` is ``torch.cuda.max_memory_allocated``
during one call minus what was allocated before it (inputs excluded). Out-of-memory is caught and reported. Each
Triton result is checked against the float32 eager reference (``max_rel_err`` over tokens that are not within 1e-3 of
the threshold; informative only). Targets to verify: >= 10x the official path at the LLaVA-NeXT shape, within 2x of
the Gram floor, and the video shapes in O(N D) memory where the eager paths run out.

Usage (GPU only; never under TRITON_INTERPRET)::

    python benchmarks/gpu_graph.py [--quick] [--cases graph,transfer,cosine,video] [--out PATH]

Writes ``benchmarks/results/gpu_graph-<device>-<date>.json`` (device, torch/triton versions, git commit, date and
every record) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import pathlib
import platform
import sys

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FILL, ZERO_TOL = -5000.0, 1e-6


# --- the official eager path ---------------------------------------------------------------------------------------


def official_graph(x: torch.Tensor, threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P and degree of the official code (batched over items), in the input precision: ``[B, N, D] -> [B, N, N]``."""
    xn = F.normalize(x, dim=-1)
    s = torch.bmm(xn, xn.transpose(1, 2))
    s = s * (s >= threshold)
    s = s / temperature
    s = s.masked_fill(s.abs() < ZERO_TOL, FILL)
    p = torch.softmax(s, dim=-1)
    return p, (p > 0).sum(-1).to(x.dtype)


def official_graph_scores(
    x: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03, iterations: int = 1
) -> torch.Tensor:
    """``(w P^t) / degree`` as the official MR-Pruner (t = 1) and G-Prune (t = 5, ``matrix_power``) code."""
    p, degree = official_graph(x, threshold, temperature)
    if iterations > 1:
        p = torch.linalg.matrix_power(p, iterations)
    w = x.norm(dim=-1, keepdim=True).transpose(1, 2)  # [B, 1, N]
    return torch.bmm(w, p)[:, 0] / degree


def official_transfer_scores(
    queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03
) -> torch.Tensor:
    """MR-Pruner's transfer, one item at a time (the selected keys differ per item), in the input precision."""
    out = []
    for q, k, m in zip(queries, keys, key_mask, strict=True):
        sel = k[m]
        c = F.normalize(q, dim=-1) @ F.normalize(sel, dim=-1).T
        c = c * (c >= threshold) / temperature
        c = c.masked_fill(c.abs() < ZERO_TOL, FILL)
        qs = torch.softmax(c, dim=-1)
        out.append((qs @ sel.norm(dim=-1)) / (qs > 0).sum(-1).to(q.dtype))
    return torch.stack(out)


# --- measuring -------------------------------------------------------------------------------------------------------


def _git_commit() -> str:
    """The checkout's HEAD, read from .git without running git (the GPU copy may have no .git: "unknown")."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return os.environ.get("MRPRUNE_GIT_COMMIT", "unknown")


def measure(fn, quick: bool) -> dict:
    """Median time (ms) and extra peak memory (MiB) of ``fn()``; OOM and other errors are reported, not raised."""
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        out = fn()  # warm-up: compilation and autotuning stay out of the timing
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
        ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200, return_mode="median")
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return {"status": "oom", "error": str(error).splitlines()[0]}
    except Exception as error:  # noqa: BLE001  (a failing implementation must not stop the others)
        torch.cuda.empty_cache()
        return {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
    return {"status": "ok", "time_ms": ms, "peak_mib": peak}


def rel_err(got: torch.Tensor, want: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    got, want = got.double(), want.double()
    if keep is not None:
        got, want = got[keep], want[keep]
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _features(batch: int, rows: int, cols: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Synthetic LLaVA-like high-res tokens (mrprune.testing) and the base view, batched, on the GPU."""
    from mrprune import testing

    items, bases = [], []
    for b in range(batch):
        x = testing.llava_next_features(rows, cols, dim, seed=seed + b)
        bases.append(x[:576])
        items.append(x[576:].reshape(rows, cols + 1, dim)[:, :cols].reshape(rows * cols, dim))
    return torch.stack(items).to("cuda", dtype), torch.stack(bases).to("cuda", dtype)


def _video_features(tokens: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """One Qwen2.5-VL-like video item: ``tokens / 1024`` correlated frames of 32 x 32 merged tokens."""
    from mrprune import testing

    frames = math.ceil(tokens / 1024)
    return testing.qwen2_5_vl_features(frames, 32, 32, dim, seed=0)[:tokens][None].to("cuda", dtype)


def _not_borderline(x: torch.Tensor, threshold: float, margin: float = 1e-3) -> torch.Tensor:
    """``[B, N]`` bool: tokens without a cosine within ``margin`` of the threshold (compared for accuracy)."""
    keep = []
    for item in x.float():
        u = F.normalize(item, dim=-1)
        keep.append(~((u @ u.T - threshold).abs() < margin).any(dim=1))
    return torch.stack(keep)


# --- cases -------------------------------------------------------------------------------------------------------


def _graph_impls(x, lengths, iterations, variants=("stream", "materialize", "auto"), eager=True):
    from mrprune.triton_kernels.graph_scores import graph_scores_triton

    from mrprune import reference

    def triton_variant(variant):
        return lambda: graph_scores_triton(x, lengths, None, 0.5, 0.03, iterations, variant=variant)

    impls = {f"triton-{v}": triton_variant(v) for v in variants}
    if eager:
        impls["triton-op"] = lambda: _public("graph_scores", x, lengths, None, 0.5, 0.03, iterations)
        impls["reference"] = lambda: reference.graph_scores(x, lengths, None, 0.5, 0.03, iterations)
    if eager or x.dtype == torch.float16:
        impls["official"] = lambda: official_graph_scores(x, 0.5, 0.03, iterations)
    return impls


def graph_cases(args, records: list[dict]) -> None:
    from mrprune import reference

    shapes = [(8, 24, 24), (8, 48, 48)] if not args.quick else [(8, 48, 48)]
    for batch, rows, cols in shapes:
        for dtype in (torch.float16, torch.float32):
            x, _ = _features(batch, rows, cols, 4096, dtype)
            lengths = torch.full((batch,), rows * cols, dtype=torch.int64, device="cuda")
            keep = _not_borderline(x, 0.5)
            gram = _gram(x, records, "graph_scores", dtype, args.quick)
            for iterations in (1, 5):
                want = reference.graph_scores(x, lengths, None, 0.5, 0.03, iterations)
                _run_impls(
                    records,
                    _graph_impls(x, lengths, iterations),
                    args.quick,
                    want,
                    keep,
                    gram,
                    op="graph_scores",
                    batch=batch,
                    tokens=rows * cols,
                    dim=4096,
                    dtype=str(dtype),
                    iterations=iterations,
                )


def video_cases(args, records: list[dict]) -> None:
    for tokens in (16384,) if args.quick else (16384, 36864):
        for dtype, iteration_set in ((torch.float16, (1, 5)), (torch.float32, (1,))):
            x = _video_features(tokens, 4096, dtype)
            lengths = torch.tensor([tokens], device="cuda")
            gram = _gram(x, records, "graph_scores", dtype, args.quick)
            for iterations in iteration_set:
                impls = _graph_impls(x, lengths, iterations, variants=("stream", "auto"), eager=False)
                _run_impls(
                    records,
                    impls,
                    args.quick,
                    None,
                    None,
                    gram,
                    op="graph_scores",
                    batch=1,
                    tokens=tokens,
                    dim=4096,
                    dtype=str(dtype),
                    iterations=iterations,
                )


def _transfer_impls(base, lengths, high, mask):
    from mrprune.triton_kernels.transfer_scores import transfer_scores_triton

    from mrprune import reference

    return {
        "triton": lambda: transfer_scores_triton(base, lengths, high, mask, None, 0.5, 0.03),
        "triton-op": lambda: _public("transfer_scores", base, lengths, high, mask, None, 0.5, 0.03),
        "official": lambda: official_transfer_scores(base, high, mask, 0.5, 0.03),
        "reference": lambda: reference.transfer_scores(base, lengths, high, mask, None, 0.5, 0.03),
    }


def transfer_cases(args, records: list[dict]) -> None:
    from mrprune import reference

    for dtype in (torch.float16, torch.float32):
        high, base = _features(8, 48, 48, 4096, dtype)
        mask = torch.rand(8, 2304, generator=torch.Generator().manual_seed(0)).lt(0.5).cuda()
        lengths = torch.full((8,), 576, dtype=torch.int64, device="cuda")
        want = reference.transfer_scores(base, lengths, high, mask, None, 0.5, 0.03)
        gram = _floor(
            _bmm_floor(F.normalize(base, dim=-1), F.normalize(high, dim=-1)),
            records,
            "transfer_scores",
            dtype,
            args.quick,
            batch=8,
            tokens=2304,
            queries=576,
        )
        _run_impls(
            records,
            _transfer_impls(base, lengths, high, mask),
            args.quick,
            want,
            None,
            gram,
            op="transfer_scores",
            batch=8,
            tokens=2304,
            queries=576,
            dim=4096,
            dtype=str(dtype),
        )


def _cosine_impls(x, lengths):
    from mrprune.triton_kernels.cosine_graph import cosine_graph_triton

    from mrprune import reference

    return {
        "triton": lambda: cosine_graph_triton(x, lengths, 0.5, 0.03)[1],
        "official": lambda: official_graph(x, 0.5, 0.03)[1],
        "reference": lambda: reference.cosine_graph(x, lengths)[1],
    }


def cosine_cases(args, records: list[dict]) -> None:
    from mrprune import reference

    for dtype in (torch.float16, torch.float32):
        x, _ = _features(8, 48, 48, 4096, dtype)
        lengths = torch.full((8,), 2304, dtype=torch.int64, device="cuda")
        gram = _gram(x, records, "cosine_graph", dtype, args.quick)
        want = reference.cosine_graph(x, lengths)[1]  # compare the degrees
        _run_impls(
            records,
            _cosine_impls(x, lengths),
            args.quick,
            want,
            _not_borderline(x, 0.5),
            gram,
            op="cosine_graph",
            batch=8,
            tokens=2304,
            dim=4096,
            dtype=str(dtype),
        )


def _public(op, *args):
    import mrprune

    with mrprune.backends.use_backend("triton"):
        return getattr(mrprune, op)(*args)


def _bmm_floor(a, b):
    return lambda: torch.bmm(a, b.transpose(1, 2))


def _gram(x, records, op, dtype, quick):
    xn = F.normalize(x, dim=-1)
    return _floor(_bmm_floor(xn, xn), records, op, dtype, quick, tokens=x.shape[1], batch=x.shape[0])


def _floor(fn, records, op, dtype, quick, **shape):
    result = measure(fn, quick)
    records.append({"op": op, "impl": "gram", "dtype": str(dtype), **shape, **result})
    return result.get("time_ms")


def _run_impls(records, impls, quick, want, keep, gram_ms, **case):
    official = None
    rows = []
    for name, fn in impls.items():
        result = measure(fn, quick)
        record = {**case, "impl": name, **result}
        if result["status"] == "ok" and want is not None and name.startswith("triton"):
            record["max_rel_err"] = rel_err(fn(), want, keep)
        if result["status"] == "ok" and gram_ms:
            record["ratio_to_gram"] = result["time_ms"] / gram_ms
        if name == "official" and result["status"] == "ok":
            official = result["time_ms"]
        rows.append(record)
    for record in rows:
        if official and record.get("status") == "ok":
            record["speedup_vs_official"] = official / record["time_ms"]
        records.append(record)


def _print(records: list[dict]) -> None:
    print(
        f"{'op':16s} {'B':>2s} {'N':>6s} {'dtype':14s} {'t':>2s} {'impl':20s} {'ms':>10s} {'peak MiB':>10s} "
        f"{'x official':>10s} {'/ gram':>7s} {'rel err':>9s}"
    )
    for r in records:
        time = f"{r['time_ms']:10.3f}" if r.get("status") == "ok" else f"{r.get('status', '?'):>10s}"
        peak = f"{r['peak_mib']:10.1f}" if "peak_mib" in r else " " * 10
        speed = f"{r['speedup_vs_official']:10.2f}" if "speedup_vs_official" in r else " " * 10
        ratio = f"{r['ratio_to_gram']:7.2f}" if "ratio_to_gram" in r else " " * 7
        err = f"{r['max_rel_err']:9.1e}" if "max_rel_err" in r else " " * 9
        print(
            f"{r['op']:16s} {r.get('batch', ''):>2} {r.get('tokens', ''):>6} {r['dtype']:14s} "
            f"{r.get('iterations', ''):>2} {r['impl']:20s} {time} {peak} {speed} {ratio} {err}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and short timing (a smoke test)")
    parser.add_argument(
        "--cases",
        default="graph,transfer,cosine,video",
        help="comma-separated subset of graph, transfer, cosine, video",
    )
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("gpu_graph.py times GPU kernels: unset TRITON_INTERPRET (never run the interpreter here)")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_graph.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    os.environ["MRPRUNE_CHECK_FINITE"] = "0"  # the public op's NaN scan syncs; time the kernels
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 floors and eager paths in IEEE float32
    torch.backends.cudnn.allow_tf32 = False
    import triton

    import mrprune

    if not getattr(mrprune, "HAS_TRITON", False):
        raise SystemExit("mrprune.triton_kernels did not load (is triton installed?)")
    records: list[dict] = []
    cases = {"graph": graph_cases, "transfer": transfer_cases, "cosine": cosine_cases, "video": video_cases}
    for name in args.cases.split(","):
        cases[name.strip()](args, records)
    device = torch.cuda.get_device_name()
    meta = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "autotune": os.environ.get("MRPRUNE_TRITON_AUTOTUNE", "1") != "0",
        "argv": sys.argv[1:],
    }
    out = args.out or RESULTS / f"gpu_graph-{device.replace(' ', '_')}-{meta['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"# {device}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit'][:12]}; -> {out}")
    _print(records)


if __name__ == "__main__":
    main()
