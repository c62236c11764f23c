"""``mrprune bench``: time every op and pruning method against the eager PyTorch reference (and end to end).

Usage (also ``python -m mrprune.bench``)::

    mrprune bench                          # CPU: LLaVA-NeXT 672 x 672, batch 1; GPU: every shape, batches 1 and 8
    mrprune bench --quick                  # smoke test (D = 64, tiny timing budget): seconds
    mrprune bench --shapes llava15,qwen2_5_vl_4k --batch 1,4 --ops graph_scores --methods none
    mrprune bench --backends reference,official,triton --dtype bfloat16 --plot
    mrprune bench --e2e                    # prefill / TTFT / decode of an HF model, unpruned and with each pruner
    mrprune bench --e2e --model-size 7b    # GPU: random-weight LLaVA-NeXT-7B-size model, bf16, 672 x 672 images
    mrprune bench --e2e --model-size cpu   # CPU: CLIP-L/336 + 0.5B LLM, bf16, 672 x 672 images
    mrprune bench --list                   # shapes, ops, methods, implementations

Every implementation's output is compared with the eager reference before it is timed (a disagreement marks the row
``FAIL`` and leaves it untimed; the command then exits 1). Results go to stdout as a table and to
``--out`` (default ``benchmarks/results/``) as JSON and CSV with the device, versions, commit and date.
See ``benchmarks/README.md`` for the columns.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from . import ops as micro
from . import report
from .e2e import E2E_METHODS
from .shapes import DEFAULT_CPU_SHAPES, DEFAULT_GPU_SHAPES, SHAPES, cpu_refusal

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_DIM = 64
#: Feature width on a CPU unless --dim is given: the eager references at the models' 3584-4096 would take minutes.
CPU_DIM = 1024


def _names(value: str, allowed: tuple[str, ...], what: str, aliases: dict[str, str] | None = None) -> tuple[str, ...]:
    if value == "all":
        return allowed
    if value in ("none", ""):
        return ()
    names = []
    for name in value.split(","):
        name = (aliases or {}).get(name.strip(), name.strip())
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
        names.append(name)
    return tuple(n for n in allowed if n in names)  # canonical order


def _ints(value: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from error
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {value!r}")
    return values


def _ratios(value: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {value!r}") from error
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"pruned shares must lie in [0, 1), got {value!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mrprune bench`` options."""
    parser.description = (
        "Time every mrprune op and pruning method against eager PyTorch (checked first), or end to end."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"shapes: {', '.join(SHAPES)}\nops: {', '.join(micro.OPS)}\nmethods: {', '.join(micro.METHODS)}\n"
        f"implementations: {', '.join(micro.IMPLEMENTATIONS)} (eager = reference)\n"
        "Columns and result files: benchmarks/README.md"
    )
    what = parser.add_argument_group("what to run")
    what.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    what.add_argument("--ops", default="all", help="comma-separated ops, 'all' (default) or 'none'")
    what.add_argument("--methods", default="all", help="comma-separated methods, 'all' (default) or 'none'")
    what.add_argument("--shapes", help="comma-separated shapes (default: llava_next on a CPU, all but tiny on a GPU)")
    what.add_argument("--batch", type=_ints, help="batch sizes for every shape, e.g. 1,8 (default: per shape)")
    what.add_argument(
        "--dim",
        type=int,
        help=f"feature width (default: the model's on a GPU, {CPU_DIM} on a CPU, {QUICK_DIM} with --quick)",
    )
    what.add_argument(
        "--backends",
        default="all",
        help="implementations to time: reference (eager), official, cpp, triton, cuda, auto "
        "(comma-separated; default all; the reference always runs as the oracle)",
    )
    what.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="feature dtype (default float32)")
    what.add_argument(
        "--quick", action="store_true", help=f"smoke test: D={QUICK_DIM}, one short measurement per row (a few seconds)"
    )
    what.add_argument(
        "--allow-large",
        action="store_true",
        help="run shapes past 8192 tokens on a CPU (refused by default: the eager references need minutes and GiBs)",
    )
    what.add_argument(
        "--allow-interpreter",
        action="store_true",
        help="time Triton under TRITON_INTERPRET=1 (labelled: not a performance number)",
    )
    what.add_argument("--list", action="store_true", help="list shapes, ops, methods and implementations, then exit")
    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--repeat",
        type=int,
        help="at least this many measurements per row (default 3 on a GPU, 2 on a CPU, 1 with --quick)",
    )
    timing.add_argument(
        "--min-time",
        type=float,
        help="seconds of measurements per row (default 0.2; quick 0.005); slower calls are timed "
        "--repeat times, one call each",
    )
    timing.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    e2e = parser.add_argument_group("end to end (--e2e)")
    e2e.add_argument(
        "--e2e",
        action="store_true",
        help="prefill, time to first token and decode tokens/s of an HF LLaVA-NeXT model, unpruned and "
        "with each pruner",
    )
    e2e.add_argument(
        "--model-size",
        choices=("tiny", "small", "cpu", "7b"),
        help="tiny: test-size model; small: 672 x 672 token layout, narrow layers (CPU default); cpu: CLIP-L/336 + "
        "0.5B-parameter LLM, bf16 (realistic on a CPU); 7b: LLaVA-NeXT-7B-size bf16 (GPU default)",
    )
    e2e.add_argument(
        "--prune",
        type=_ratios,
        default=(0.5, 0.7, 0.9),
        help="pruned shares of the visual tokens (default 0.5,0.7,0.9)",
    )
    e2e.add_argument("--new-tokens", type=int, help="tokens generated for the decode rate (default 32 GPU, 8 CPU)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    out.add_argument("--no-save", action="store_true", help="print the table only")
    out.add_argument("--plot", action="store_true", help="also write a PNG chart (needs matplotlib)")


def _list() -> int:
    lines = ["shapes:"]
    for shape in SHAPES.values():
        lines.append(f"  {shape.name:16s} {shape.tokens:6d} tokens, D={shape.dim}: {shape.description}")
    lines.append("ops: " + ", ".join(micro.OPS))
    lines.append("methods: " + ", ".join(micro.METHODS))
    lines.append("implementations: " + ", ".join(micro.IMPLEMENTATIONS))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _device(requested: str | None) -> torch.device | None:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        logger.error("mrprune bench: --device cuda, but no CUDA device is available")
        return None
    return torch.device(requested)


def run(args: argparse.Namespace) -> int:
    """Run ``mrprune bench``; 0 when every check passed, 1 when an implementation failed its check or raised."""
    if args.list:
        return _list()
    try:
        op_names = _names(args.ops, micro.OPS, "op")
        # --e2e also takes the e2e-only methods (each name once: ToMe is both a micro-benchmark row and e2e)
        allowed = tuple(dict.fromkeys(micro.METHODS + (E2E_METHODS if args.e2e else ())))
        method_names = _names(args.methods, allowed, "method")
        impls = _names(args.backends, micro.IMPLEMENTATIONS, "implementation", {"eager": "reference"})
        shape_names = None if args.shapes is None else _names(args.shapes, tuple(SHAPES), "shape")
    except argparse.ArgumentTypeError as error:
        logger.error("mrprune bench: %s", error)
        return 2
    device = _device(args.device)
    if device is None:
        return 2
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        logger.warning("TRITON_INTERPRET=1 on a GPU machine: Triton rows are refused (never set it on a GPU)")
    with micro.threads(args.threads):
        env = report.environment(device)
        if args.e2e:
            from . import e2e

            rows = e2e.run_e2e(args, device, method_names, env)
            kind = "e2e"
        else:
            rows = _microbenchmarks(args, device, op_names, method_names, impls, shape_names, env)
            kind = "ops"
        if rows is None:
            return 2
        report.finish_environment(env)
    report.write_table(rows, env)
    if not args.no_save and rows:
        name = report.stem(env, kind, args.quick)
        json_path, csv_path = report.save(rows, env, args.out, name)
        logger.info("wrote %s and %s", json_path, csv_path)
        if args.plot:
            png = report.plot(rows, env, args.out / f"{name}.png")
            if png is not None:
                logger.info("wrote %s", png)
    elif args.plot and rows:
        logger.warning("--plot with --no-save: no chart written")
    failed = [r for r in rows if r.status in ("FAIL", "error")]
    for row in failed:
        logger.error(
            "%s %s %s (%s B=%d) %s: %s %s",
            row.kind,
            row.name,
            row.case,
            row.shape,
            row.batch,
            row.impl,
            row.status,
            row.note,
        )
    return 1 if failed else 0


def _microbenchmarks(args, device, op_names, method_names, impls, shape_names, env) -> list | None:
    quick = args.quick
    settings = micro.Settings(
        device=device,
        dtype=DTYPES[args.dtype],
        impls=impls,
        min_time=args.min_time if args.min_time is not None else (0.005 if quick else 0.2),
        repeat=args.repeat if args.repeat is not None else (1 if quick else 2 if device.type == "cpu" else 3),
        allow_interpreter=args.allow_interpreter,
    )
    if shape_names is None:
        shape_names = (
            ("llava_next_small",) if quick else DEFAULT_CPU_SHAPES if device.type == "cpu" else DEFAULT_GPU_SHAPES
        )
    shapes = []
    refused = []
    for name in shape_names:
        shape = SHAPES[name]
        reason = cpu_refusal(shape, args.allow_large) if device.type == "cpu" else None
        if reason:
            logger.warning("%s", reason)
            refused.append(reason)
            continue
        shapes.append(shape)
    env["refused_shapes"] = refused
    env["settings"] = {
        "dtype": args.dtype,
        "min_time": settings.min_time,
        "repeat": settings.repeat,
        "quick": quick,
        "impls": list(impls),
        "ops": list(op_names),
        "methods": list(method_names),
    }
    if not shapes:
        logger.error("mrprune bench: nothing to run (every shape was refused)")
        return None
    micro.warm_up(settings, op_names, method_names)
    rows = []
    for s, shape in enumerate(shapes, 1):
        dim = args.dim or (QUICK_DIM if quick else CPU_DIM if device.type == "cpu" else shape.dim)
        batches = args.batch or shape.default_batches(device.type) or (1,)
        for batch in batches:
            logger.info(
                "shape %d/%d: %s, batch %d, D=%d, %s on %s (%s)",
                s,
                len(shapes),
                shape.name,
                batch,
                dim,
                args.dtype,
                env["device_name"],
                shape.description,
            )
            features, lengths, layouts = shape.features(batch, dim, settings.dtype, str(device))
            cases = micro.op_cases(shape, features, lengths, op_names, settings)
            cases += micro.method_cases(shape, features, lengths, layouts, method_names, settings)
            rows += micro.run_cases(cases, settings, _progress)
            del features, cases
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _progress(i: int, total: int, case: micro.Case, rows: list) -> None:
    parts = []
    for row in rows:
        if row.median_ms is not None:
            speed = f" {row.vs_reference:.1f}x" if row.vs_reference else ""
            parts.append(f"{row.impl} {row.median_ms:.3g} ms{speed}")
        else:
            parts.append(f"{row.impl} {row.status}")
    logger.info("  [%d/%d] %s %s %s: %s", i, total, case.kind, case.name, case.label, ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    """``python -m mrprune.bench``: the same as ``mrprune bench``."""
    parser = argparse.ArgumentParser(prog="mrprune bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(args)
