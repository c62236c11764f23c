"""The sm_90 cubin check of the Triton kernels (scripts/check_triton_compile.py) and the launch configs it guards.

The full check (every kernel x dtype x config, a few minutes) is its own CI step; here: the checker reads spills from
a real cubin (it fails on a config known to spill), every launch keeps at least one config, and the fixed config of
each launch is one the pruning allows.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mrprune

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not mrprune.HAS_TRITON, reason="needs triton")


def _script():
    spec = importlib.util.spec_from_file_location("check_triton_compile", ROOT / "scripts" / "check_triton_compile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


def _compile_in_subprocess(code: str) -> str:
    """Compiling needs a process without TRITON_INTERPRET (the test session interprets)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_ALWAYS_COMPILE"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_checker_reads_spills_from_the_cubin():
    """fp32 gram_store at BLOCK=128, BLOCK_D=64, 8 warps (the fixed config before the fix) spills kilobytes in the
    cubin (its PTX has no local loads or stores at all): the checker reports it, and passes the current fixed config."""
    code = f"""
import sys, json
sys.path.insert(0, {str(ROOT / "scripts")!r})
import check_triton_compile as c
base = next(s for s in c._specs(False, []) if s.kernel == "cosine_graph.gram_store_kernel" and s.dtype == "float32"
            and s.constexprs["BLOCK"] == 128 and s.origin == "fixed")
import dataclasses
bad = dataclasses.replace(base, constexprs={{**base.constexprs, "BLOCK_D": 64}}, num_warps=8, num_stages=3)
out = []
for spec in (bad, base):
    result = c.compile_spec(spec)
    out.append([result.get("spill_stores"), result.get("stack"), c.problems(spec, result)])
print(json.dumps(out))
"""
    import json

    (bad_stores, bad_stack, bad_problems), (_, good_stack, good_problems) = json.loads(_compile_in_subprocess(code))
    assert bad_stores > 1000 and bad_stack > 1000 and any("spills" in p for p in bad_problems), bad_problems
    assert good_stack == 0 and good_problems == [], good_problems


def test_every_launch_keeps_a_config_and_its_fixed_one_is_allowed():
    """For every tuned spec of the check: the autotuner has at least one config left, and the fixed config (no
    autotuning) satisfies the same no-spill rule, so the check compiles exactly what launches can run."""
    check = _script()
    from mrprune.triton_kernels import cosine_graph, graph_scores, transfer_scores

    launchers = {
        "cosine_graph.gram_store_kernel": cosine_graph._gram_store,
        "graph_scores._stream_stats_kernel": graph_scores._stream_stats,
        "graph_scores._stream_propagate_kernel": graph_scores._stream_propagate,
        "transfer_scores._transfer_kernel": transfer_scores._transfer,
    }
    specs = [s for s in check._specs(False, []) if s.kernel in launchers]
    assert specs
    for spec in specs:
        launcher = launchers[spec.kernel]
        constexprs = {k: v for k, v in spec.constexprs.items() if k != "BLOCK_D"}
        assert launcher.configs_for(constexprs), spec.label
        bd, warps, stages = launcher.fixed(constexprs)
        assert launcher.config_ok(constexprs, bd, warps, stages), spec.label


def test_every_kernel_has_a_spec():
    """A new @triton.jit kernel without a compile spec fails the check (the script lists it)."""
    check = _script()
    assert check._check_coverage(check._specs(False, [])) == []


@pytest.mark.slow
def test_all_cubins_compile_without_spills():
    """The whole check (CI runs it as its own step: python scripts/check_triton_compile.py --jobs 2)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_triton_compile.py"), "--jobs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
