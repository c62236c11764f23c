"""Benchmark rows, the run's environment, and their outputs: the table, JSON, CSV and an optional PNG chart.

Every result row carries what identifies it: ``kind`` (``op``, ``method`` or ``e2e``), ``name`` (op or method),
``case`` (its arguments), ``shape``, ``batch``, ``tokens``, ``dim``, ``dtype``, ``device`` and ``impl``; the files also
carry the run's environment (device name, versions, git commit, date). The CSV repeats the environment on every row
and adds a ``key`` column (``kind/name/case/shape/B/D/dtype/impl``), so results of many runs and machines can be
concatenated and joined on ``key`` plus ``device_name`` and ``git_commit``.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["E2ERow", "Row", "environment", "plot", "save", "write_table"]

logger = logging.getLogger(__name__)

#: Row statuses. ``ok``: checked against the reference, then timed. ``reference``: the eager reference itself (the
#: oracle of the checks). ``FAIL``: the output disagrees with the reference (never timed). ``refused``: not run, see
#: ``note``. ``OOM``: ran out of memory. ``error``: raised (see ``note``).
STATUSES = ("ok", "reference", "FAIL", "refused", "n/a", "OOM", "error")

#: Environment fields repeated on every CSV row.
ENV_COLUMNS = ("device_name", "torch", "triton", "cuda", "driver", "git_commit", "date")


@dataclass
class BenchRow:
    """What every result row has: what was run (``key`` identifies it across runs) and how it went."""

    kind: str
    name: str
    case: str
    shape: str
    batch: int
    tokens: int
    dim: int
    dtype: str
    device: str
    impl: str
    status: str = "ok"
    measurements: int | None = None
    note: str = ""

    @property
    def key(self) -> str:
        return "/".join(
            str(v) for v in (self.kind, self.name, self.case, self.shape, self.batch, self.dim, self.dtype, self.impl)
        )


@dataclass
class Row(BenchRow):
    """One implementation of one op or method at one shape (a line of the table).

    Times are milliseconds per call (median and 20th/80th percentiles of the measurements); ``vs_reference`` and
    ``vs_official`` are the speed-ups ``reference median / this median`` and ``official median / this median``;
    ``peak_mb`` is the extra CUDA memory the call allocated at its peak (outputs included; CUDA only);
    ``max_abs_err`` the largest absolute difference of its float outputs from the reference; ``agreement`` the
    fraction of float entries within tolerance, or for index outputs the share of the reference's picks it also made
    (the worst batch item).
    """

    k: int | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    vs_reference: float | None = None
    vs_official: float | None = None
    peak_mb: float | None = None
    max_abs_err: float | None = None
    agreement: float | None = None


@dataclass
class E2ERow(BenchRow):
    """One configuration of the end-to-end benchmark (no pruning, or one pruner at one pruning ratio).

    ``prefill_ms`` is a patched ``model(**inputs)`` forward (vision encoder, pruning, language-model prefill);
    ``ttft_ms`` the time from a ``generate`` call to its first token's logits; ``decode_tok_s`` the batch's tokens
    per second over that call's later steps; ``prune_ms`` the pruning step
    alone (from the integration's ``handle.last``, or a timed ``select_batch`` on the same features);
    ``visual_tokens`` / ``kept_tokens`` per prompt; the speed-ups are against the unpruned model.
    """

    keep_ratio: float | None = None
    kept_tokens: float | None = None
    prefill_ms: float | None = None
    prefill_p20_ms: float | None = None
    prefill_p80_ms: float | None = None
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    prune_ms: float | None = None
    prune_source: str = ""
    prefill_speedup: float | None = None
    ttft_speedup: float | None = None


# --- environment ------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The checkout's HEAD commit, read from ``.git`` without running git ("unknown" outside a checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        git = parent / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            text = git.read_text().strip()
            if text.startswith("gitdir:"):
                git = (parent / text.split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head
            ref = head.split(":", 1)[1].strip()
            common = git
            if (git / "commondir").is_file():
                common = (git / (git / "commondir").read_text().strip()).resolve()
            for base in (git, common):
                if (base / ref).is_file():
                    return (base / ref).read_text().strip()
            for base in (git, common):
                packed = base / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0]
        except OSError:
            return "unknown"
        return "unknown"
    return "unknown"


def _driver_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils import collect_env

        version = collect_env.get_nvidia_driver_version(collect_env.run)
        if version:
            return str(version).strip()
    except Exception as error:  # nvidia-smi missing or unexpected output: the driver stays unknown
        logger.debug("driver version unavailable: %s", error)
    try:
        return f"CUDA driver API {torch._C._cuda_getDriverVersion()}"
    except Exception:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """What the results were measured on: device, versions, commit, date, load."""
    import mrprune

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    env: dict[str, Any] = {
        "tool": "mrprune bench",
        "mrprune": mrprune.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "driver": _driver_version() if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": _load(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "has_extension": bool(getattr(mrprune, "HAS_EXTENSION", False)),
        "command": " ".join(["mrprune", *sys.argv[1:]]) if sys.argv else "",
    }
    try:
        env["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        env["transformers"] = None
    return env


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def finish_environment(env: dict[str, Any]) -> None:
    """Record the load average at the end of the run next to the one at its start."""
    env["load_average_end"] = _load()


# --- table --------------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}" if value < 1e4 else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}x" if value < 0.1 else f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _err(row: Row) -> str:
    if row.status == "reference":
        return "oracle"
    parts = []
    if row.max_abs_err is not None:
        parts.append(f"{row.max_abs_err:.1e}")
    if row.agreement is not None and row.agreement < 1:
        parts.append(f"{100 * row.agreement:.1f}%")
    elif row.agreement is not None:
        parts.append("100%")
    return " ".join(parts) or "-"


def _header(env: dict[str, Any]) -> str:
    load = env.get("load_average")
    load_end = env.get("load_average_end")
    loads = ""
    if load:
        loads = f"; load average {load[0]:.1f}" + (f" -> {load_end[0]:.1f}" if load_end else "")
        if load[0] > 0.75 * (env.get("cores") or 1):
            loads += " (busy machine: CPU times are inflated)"
    where = env["device_name"]
    if env["device"] == "cpu":
        where = f"CPU {where}, {env['cores']} cores, {env['threads']} threads"
    else:
        where = f"GPU {where} (driver {env.get('driver')}, CUDA {env.get('cuda')})"
    versions = f"torch {env['torch']}, triton {env.get('triton')}"
    return f"# mrprune bench on {where}; {versions}; commit {env['git_commit'][:12]}; {env['date']}{loads}"


def write_table(rows: Sequence[Row | E2ERow], env: dict[str, Any], stream: TextIO | None = None) -> None:
    """Print the results as a fixed-width table (grouped by case) to ``stream`` (stdout by default)."""
    stream = sys.stdout if stream is None else stream
    stream.write(_header(env) + "\n")
    micro = [r for r in rows if isinstance(r, Row)]
    e2e = [r for r in rows if isinstance(r, E2ERow)]
    if micro:
        _micro_table(micro, stream)
    if e2e:
        _e2e_table(e2e, stream)
    notes = sorted({r.note for r in rows if r.note and r.status in ("refused", "n/a", "OOM", "error", "FAIL")})
    for note in notes:
        stream.write(f"# note: {note}\n")
    stream.flush()


def _micro_table(rows: Sequence[Row], stream: TextIO) -> None:
    cuda = any(r.device == "cuda" for r in rows)
    head = ["case", "shape", "B", "impl", "median ms", "p20 ms", "p80 ms", "n", "vs eager", "vs official"]
    head += ["peak MiB"] if cuda else []
    head += ["check", "max err / agree"]
    table = [head]
    previous = None
    for row in rows:
        group = (row.kind, row.name, row.case, row.shape, row.batch, row.dim)
        case = f"{row.kind} {row.name} {row.case}" if group != previous else ""
        shape = f"{row.shape} D={row.dim}" if group != previous else ""
        batch = str(row.batch) if group != previous else ""
        previous = group
        impl = row.impl + ("*" if _interpreted(row) else "")
        line = [
            case,
            shape,
            batch,
            impl,
            _ms(row.median_ms),
            _ms(row.p20_ms),
            _ms(row.p80_ms),
            "-" if row.measurements is None else str(row.measurements),
            _ratio(row.vs_reference),
            _ratio(row.vs_official),
        ]
        line += [_ms(row.peak_mb)] if cuda else []
        line += [row.status, _err(row)]
        table.append(line)
    _emit(table, stream, right_from=4)
    if any(_interpreted(r) for r in rows):
        stream.write("# * Triton under TRITON_INTERPRET=1: not a performance number\n")


def _interpreted(row: Row) -> bool:
    return row.note.startswith("interp (")


def _e2e_table(rows: Sequence[E2ERow], stream: TextIO) -> None:
    head = [
        "model",
        "B",
        "pruner",
        "keep",
        "visual -> kept",
        "prefill ms",
        "p20",
        "p80",
        "vs none",
        "TTFT ms",
        "vs none",
        "decode tok/s",
        "prune ms",
        "status",
    ]
    table = [head]
    for row in rows:
        kept = "-" if row.kept_tokens is None else f"{row.tokens} -> {row.kept_tokens:.0f}"
        table.append(
            [
                f"{row.shape} D={row.dim}",
                str(row.batch),
                row.name,
                "-" if row.keep_ratio is None else f"{row.keep_ratio:g}",
                kept,
                _ms(row.prefill_ms),
                _ms(row.prefill_p20_ms),
                _ms(row.prefill_p80_ms),
                _ratio(row.prefill_speedup),
                _ms(row.ttft_ms),
                _ratio(row.ttft_speedup),
                "-" if row.decode_tok_s is None else f"{row.decode_tok_s:.1f}",
                _ms(row.prune_ms),
                row.status,
            ]
        )
    _emit(table, stream, right_from=4)


def _emit(table: list[list[str]], stream: TextIO, right_from: int) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for n, line in enumerate(table):
        cells = [
            c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        stream.write("  ".join(cells).rstrip() + "\n")
        if n == 0:
            stream.write("  ".join("-" * w for w in widths) + "\n")


# --- files --------------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def stem(env: dict[str, Any], kind: str, quick: bool) -> str:
    """File name stem of a run: ``<kind>-<device>-<UTC date-time>[-quick]``."""
    when = env["date"].replace("+00:00", "").replace(":", "").replace("-", "")
    device = _slug(("cpu-" if env["device"] == "cpu" else "") + str(env["device_name"]))
    return f"{kind}-{device}-{when}" + ("-quick" if quick else "")


def _records(rows: Iterable[Row | E2ERow]) -> list[dict[str, Any]]:
    return [{"key": r.key, **asdict(r)} for r in rows]


def save(rows: Sequence[Row | E2ERow], env: dict[str, Any], out: Path, name: str) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` (``{"environment": ..., "results": [...]}``) and ``<out>/<name>.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    records = _records(rows)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    with open(json_path, "w") as f:
        json.dump({"environment": env, "results": records}, f, indent=1, default=str)
        f.write("\n")
    columns = ["key", *ENV_COLUMNS]
    for cls in (Row, E2ERow):
        if any(isinstance(r, cls) for r in rows):
            columns += [f.name for f in fields(cls) if f.name not in columns]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({**{c: env.get(c) for c in ENV_COLUMNS}, **record})
    return json_path, csv_path


def plot(rows: Sequence[Row | E2ERow], env: dict[str, Any], path: Path) -> Path | None:
    """A PNG chart: speed-up over the eager reference per case and implementation (microbenchmarks), or prefill time
    per configuration (end to end). Needs matplotlib; without it, logs a warning and returns None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("--plot needs matplotlib (pip install matplotlib); no chart written")
        return None
    micro = [r for r in rows if isinstance(r, Row) and r.status == "ok" and r.vs_reference]
    e2e = [r for r in rows if isinstance(r, E2ERow) and r.prefill_ms]
    panels = [p for p in (micro, e2e) if p]
    if not panels:
        logger.warning("--plot: no timed rows to draw")
        return None
    height = sum(max(2.0, 0.28 * len(p) + 1.2) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, height), squeeze=False)
    axes = axes[:, 0]
    i = 0
    if micro:
        ax = axes[i]
        i += 1
        labels = [f"{r.name} {r.case} | {r.shape} B={r.batch} | {r.impl}" for r in micro]
        values = [r.vs_reference for r in micro]
        colours = ["tab:green" if v >= 1 else "tab:red" for v in values]
        ax.barh(range(len(micro)), [v - 1 for v in values], left=1, color=colours)  # bars from 1x: faster or slower
        ax.set_yticks(range(len(micro)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speed-up over the eager reference (median, log scale)")
    if e2e:
        ax = axes[i]
        labels = [f"{r.name} keep={r.keep_ratio if r.keep_ratio is not None else 1:g}" for r in e2e]
        ax.barh(range(len(e2e)), [r.prefill_ms for r in e2e], color="tab:blue")
        ax.set_yticks(range(len(e2e)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"prefill ms ({e2e[0].shape}, batch {e2e[0].batch})")
    fig.suptitle(textwrap.fill(_header(env).lstrip("# "), 150), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
