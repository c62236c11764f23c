"""CPU time of every op's C++ kernel against its eager reference at the LLaVA-NeXT shape.

One 672x672 LLaVA-NeXT image: 576 base tokens and a 48x48 high-resolution grid (2304 tokens), D = 4096, synthetic
LLaVA-like features (mrprune.testing). Timed with torch.utils.benchmark in one run; prints a table of medians and
ratios. A stop-gap until the ``mrprune bench`` CLI: ``python benchmarks/ops_cpu.py [--quick]``.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark

import mrprune
from mrprune import reference, testing

BASE, ROWS, COLS = 576, 48, 48


def _cases(quick: bool):
    dim = 512 if quick else 4096
    feats = testing.llava_next_features(ROWS, COLS, dim)
    newline = torch.zeros(feats.shape[0], dtype=torch.bool)
    newline[BASE + COLS :: COLS + 1] = True
    base = feats[None, :BASE]
    high = feats[BASE:][~newline[BASE:]][None]
    one = lambda t: torch.tensor([t.shape[1]])  # noqa: E731
    graph, degree = reference.cosine_graph(high, one(high))
    norms = high.norm(dim=-1)
    pruned = torch.rand(1, high.shape[1], generator=torch.Generator().manual_seed(0)) < 0.7
    all_tokens = feats[None, ~newline]
    scores = reference.graph_scores(high, one(high))
    return {
        "cosine_graph (N=2304)": ("cosine_graph", (high, one(high), 0.5, 0.03)),
        "graph_propagate (N=2304, t=5)": ("graph_propagate", (graph, degree, norms, one(high), 5)),
        "graph_scores (N=2304, t=1)": ("graph_scores", (high, one(high), None, 0.5, 0.03, 1)),
        "graph_scores (N=576, t=1)": ("graph_scores", (base, one(base), None, 0.5, 0.03, 1)),
        "graph_scores (N=2304, t=5)": ("graph_scores", (high, one(high), None, 0.5, 0.03, 5)),
        "transfer_scores (576 x 2304)": ("transfer_scores", (base, one(base), high, pruned, None, 0.5, 0.03)),
        "greedy_residual_select (k=640 of 2880)": (
            "greedy_residual_select",
            (all_tokens, one(all_tokens), 640, None, None, 1e-5, "auto"),
        ),
        "topk_indices (k=691 of 2304)": ("topk_indices", (scores, one(high), 691, True)),
    }


def _time(fn, min_run_time: float) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D = 512 and short timing (a smoke test)")
    args = parser.parse_args()
    if not mrprune.HAS_EXTENSION:
        raise SystemExit("mrprune._C is not built: nothing to compare the reference with")
    min_run = 0.05 if args.quick else 1.0
    cpu = platform.processor() or platform.machine()
    print(f"# CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'op':42s} {'reference ms':>13s} {'C++ ms':>9s} {'speed-up':>9s}")
    for label, (op, op_args) in _cases(args.quick).items():
        ref, cpp = getattr(reference, op), mrprune.backends.implementations(op)["cpp"]
        t_ref = _time(lambda f=ref, a=op_args: f(*a), min_run)
        t_cpp = _time(lambda f=cpp, a=op_args: f(*a), min_run)
        print(f"{label:42s} {t_ref * 1e3:13.1f} {t_cpp * 1e3:9.1f} {t_ref / t_cpp:8.1f}x")


if __name__ == "__main__":
    main()
