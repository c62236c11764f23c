"""Video-scale CPU check: every op that sees all of a video's tokens at once, at N = 65,536 (D = 1024, bfloat16).

Usage::

    python -m mrprune.bench.video                       # N = 65536, D = 1024, bfloat16, 2 threads
    python -m mrprune.bench.video --tokens 16384 --ops graph_scores,topk_indices --out benchmarks/results/

Each op runs in a fresh subprocess whose address space is capped (``RLIMIT_AS``) at its size after the inputs exist
plus ``--cap-gib`` (default 4), so an implementation that materialises an N x N matrix (16 GiB at N = 65,536) fails
with an out-of-memory error instead of taking the machine down. The child reports its wall time and its peak
resident memory above the resident size just before the call (``VmHWM`` after resetting it, Linux); the inputs are
generated in bfloat16 directly, chunk by chunk, so no float32 copy of the features inflates the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "run_op"]

logger = logging.getLogger(__name__)

OPS = ("graph_scores", "diversity_select", "greedy_residual_select", "topk_indices")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _features(tokens: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Clustered unit-scale features ``[1, tokens, dim]`` made chunk by chunk in ``dtype`` (video frames repeat
    content: 512 centres plus noise, so the cosine graph has real edges beyond the self-edges)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(512, dim, generator=gen)
    out = torch.empty(1, tokens, dim, dtype=dtype)
    for start in range(0, tokens, 4096):
        stop = min(tokens, start + 4096)
        pick = torch.randint(0, 512, (stop - start,), generator=gen)
        out[0, start:stop] = (centres[pick] + 1.2 * torch.randn(stop - start, dim, generator=gen)).to(dtype)
    return out


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def run_op(op: str, tokens: int, dim: int, dtype: torch.dtype, k: int, cap_gib: float) -> dict:
    """Run one op once in this process (the child side) and return its measurements."""
    import mrprune  # noqa: F401  (registers the ops)

    def calls(x: torch.Tensor, scores: torch.Tensor, picks: int) -> dict:
        lengths = torch.tensor([x.shape[1]])
        return {
            "graph_scores": lambda: torch.ops.mrprune.graph_scores(x, lengths, None, 0.5, 0.03, 5),
            "diversity_select": lambda: torch.ops.mrprune.diversity_select(x, lengths, picks),
            "greedy_residual_select": lambda: torch.ops.mrprune.greedy_residual_select(x, lengths, picks),
            "topk_indices": lambda: torch.ops.mrprune.topk_indices(scores, lengths, x.shape[1] // 10),
        }

    # Warm the op on a tiny input first (imports, thread pool, lazy initialisation).
    calls(_features(64, dim, dtype), torch.rand(1, 64), 4)[op]()
    x = _features(tokens, dim, dtype)
    call = calls(x, torch.rand(1, tokens, generator=torch.Generator().manual_seed(1)), k)[op]
    limit = _status_bytes("VmSize") + int(cap_gib * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    _reset_peak_rss()
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {
        "op": op,
        "tokens": tokens,
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "k": k
        if op in ("diversity_select", "greedy_residual_select")
        else (tokens // 10 if op == "topk_indices" else None),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "features_bytes": x.numel() * x.element_size(),
        "baseline_rss_bytes": baseline,
        "extra_rss_bytes": max(0, peak - baseline),
        "address_space_cap_gib": cap_gib,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--k", type=int, default=128, help="picks of the greedy selections")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="folder for a JSON file of the results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child is not None:
        result = run_op(args.child, args.tokens, args.dim, DTYPES[args.dtype], args.k, args.cap_gib)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    results = []
    for op in args.ops.split(","):
        command = [sys.executable, "-m", "mrprune.bench.video", "--child", op, "--tokens", str(args.tokens)]
        command += ["--dim", str(args.dim), "--dtype", args.dtype, "--k", str(args.k), "--threads", str(args.threads)]
        command += ["--cap-gib", str(args.cap_gib)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            result = {"op": op, "tokens": args.tokens, "error": done.stderr.strip().splitlines()[-1:]}
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        if "error" in result:
            sys.stdout.write(f"{op:24s} FAILED: {result['error']}\n")
        else:
            sys.stdout.write(
                f"{op:24s} N={result['tokens']} D={result['dim']} {result['dtype']}: {result['seconds']:.2f} s, "
                f"extra peak RSS {result['extra_rss_bytes'] / 2**30:.3f} GiB "
                f"(features {result['features_bytes'] / 2**30:.3f} GiB)\n"
            )
        sys.stdout.flush()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = args.out / f"video-cpu-{args.tokens}-{stamp}.json"
        machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}
        path.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
        sys.stdout.write(f"wrote {path}\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
