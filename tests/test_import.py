"""``import mrprune`` from a raw checkout: the Triton kernels come from the checkout, with or without an install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Drops the import hooks of editable installs (any checkout's), so that only PYTHONPATH (this checkout) can supply
# mrprune: the situation of a raw checkout with triton installed.
_SCRIPT = """
import sys
def _editable(finder):
    cls = finder if isinstance(finder, type) else type(finder)
    return "editable" in f"{cls.__module__}.{cls.__name__}".lower()
sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
import mrprune
from mrprune.triton_kernels import graph_scores
print(mrprune.__file__)
print(mrprune.triton_kernels.__file__)
print(graph_scores.__file__)
print(mrprune.HAS_TRITON)
"""


def test_import_from_raw_checkout(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MRPRUNE_SKIP_EXT": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *files, has_triton = result.stdout.strip().splitlines()[-4:]
    assert has_triton == "True"
    for file in files:
        assert ROOT in Path(file).resolve().parents, files
