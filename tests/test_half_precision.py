"""The C++ CPU kernels on float16/bfloat16 features without upcasting them, on every instruction-set level, with
exact ties for duplicate tokens, and with O(N D) memory at large N (issue 15 items 1 and 4; issue 14 problem 4).

The per-op test files already compare every input dtype (float16/bfloat16 included, now computed natively) with the
float64 reference to their tolerances and on gap-screened selections; this file checks what is specific to the native
path: the router hands the kernels half tensors, float16 (converted tile by tile) is bit-identical to the float32
computation on the upcast features, every instruction-set level (``MRPRUNE_CPU_ISA``) gives the same float32/float16
results bit for bit, the Gram is deterministic per pair (duplicates tie exactly, wherever they sit), the streaming
paths past the workspace budget agree with the in-memory ones, and a large N never allocates N x N.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mrprune  # noqa: F401  (registers the ops)
from mrprune import _library, reference
from tests.utils import assert_close, clustered

pytestmark = pytest.mark.skipif(
    not _library._has_kernel("_graph_scores_cpu", "CPU"), reason="the C++ extension is not built"
)

HALF = [torch.float16, torch.bfloat16]
ISA_LEVELS = ["portable", "avx512", "avx512_bf16", "amx"]


def cpp(op: str, *args):
    return getattr(torch.ops.mrprune, f"_{op}_cpu")(*args)


def _features(n: int = 300, dim: int = 72, seed: int = 0) -> torch.Tensor:
    """``[1, n, dim]`` float32 tokens around 6 centres (edges beyond the self-edges at the official threshold)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, dim, generator=gen)
    return (centres[torch.randint(0, 6, (n,), generator=gen)] + 0.6 * torch.randn(n, dim, generator=gen))[None]


def _calls(x: torch.Tensor) -> dict:
    """Each native-Gram op on features ``x [1, n, D]`` (private C++ ops, canonical arguments)."""
    n = x.shape[1]
    lengths = torch.tensor([n])
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, ::3] = True
    return {
        "cosine_graph": lambda: cpp("cosine_graph", x, lengths, 0.5, 0.03),
        "graph_scores": lambda: cpp("graph_scores", x, lengths, None, 0.5, 0.03, 5),
        "transfer_scores": lambda: cpp("transfer_scores", x, lengths, x, mask, None, 0.5, 0.03),
        "max_cosine": lambda: cpp("max_cosine", x, lengths, x[:, :7].contiguous(), torch.tensor([7])),
        "diversity_select": lambda: cpp("diversity_select", x, lengths, 40, True),
        "greedy_gram": lambda: cpp("greedy_residual_select", x, lengths, 40, None, None, 1e-5, "gram"),
        "greedy_basis": lambda: cpp("greedy_residual_select", x, lengths, 40, None, None, 1e-5, "basis"),
    }


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]


def test_router_passes_half_features_natively():
    """The canonical conversion keeps float16/bfloat16 CPU features as they are (no N x D float32 copy); float64,
    mixed query/key dtypes and non-CPU tensors (the CUDA kernels take float32) are converted."""
    lengths = torch.tensor([4])
    for dtype in HALF:
        x = torch.randn(1, 4, 8).to(dtype)
        for op in ("graph_scores", "cosine_graph", "diversity_select", "greedy_residual_select"):
            args = {
                "graph_scores": (x, lengths, None, 0.5, 0.03, 1),
                "cosine_graph": (x, lengths, 0.5, 0.03),
                "diversity_select": (x, lengths, 2, True),
                "greedy_residual_select": (x, lengths, 2, None, None, 1e-5, "auto"),
            }[op]
            assert _library._CANONICAL[op](*args)[0].dtype == dtype, op
        q, k = _library._CANONICAL["max_cosine"](x, lengths, x, lengths)[::2]
        assert q.dtype == k.dtype == dtype
        q, k = _library._CANONICAL["max_cosine"](x, lengths, x.float(), lengths)[::2]
        assert q.dtype == k.dtype == torch.float32
    assert _library._features(torch.randn(1, 4, 8, dtype=torch.float64)).dtype == torch.float32
    assert _library._features(torch.empty(1, 4, 8, dtype=torch.bfloat16, device="meta")).dtype == torch.float32


@pytest.mark.parametrize("op", list(_calls(_features(8, 8))))
def test_float16_is_bitwise_the_upcast_float32_computation(op):
    """float16 rows are converted one k-chunk of one tile at a time and every product is exact in float32, so the
    native float16 result equals the float32 kernel's on the upcast features bit for bit."""
    x = _features().half()
    got = [t.clone() for t in _flat(_calls(x)[op]())]
    want = _flat(_calls(x.float())[op]())
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), op


@pytest.mark.parametrize("dtype", HALF)
def test_half_matches_reference_on_upcast_features(dtype):
    """Native half graph scores, graph and transfer agree with the float32 reference on the upcast features."""
    x = _features(seed=1).to(dtype)
    calls = _calls(x)
    up = x.float()
    lengths = torch.tensor([x.shape[1]])
    assert_close(calls["graph_scores"](), reference.graph_scores(up, lengths, None, 0.5, 0.03, 5), rtol=1e-4)
    graph, degree = calls["cosine_graph"]()
    want_graph, want_degree = reference.cosine_graph(up, lengths, 0.5, 0.03)
    assert torch.equal(degree, want_degree)
    assert_close(graph, want_graph, rtol=1e-4, atol=1e-5)


def _run_isa_level(level: str, path: str, screen: str) -> None:
    # The helpers' source, not an import: `tests` is not an importable package outside pytest.
    helpers = "\n".join(textwrap.dedent(inspect.getsource(f)) for f in (cpp, _features, _calls, _flat))
    code = (
        "import torch, mrprune\n"
        + helpers
        + textwrap.dedent(
            f"""
        out = {{}}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = _features().to(dtype)
            for op, call in _calls(x).items():
                out[f"{{op}}/{{dtype}}"] = [t.clone() for t in _flat(call())]
        torch.save(out, {path!r})
        """
        )
    )
    env = dict(os.environ, MRPRUNE_CPU_ISA=level, MRPRUNE_CPU_SCREEN=screen)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("screen", ["0", "1"])
def test_instruction_set_levels_agree(tmp_path, screen):
    """Portable loops, AVX-512, AVX-512 BF16 and AMX (whatever of them this CPU has; higher levels fall back) give
    bit-identical float32 and float16 results, and so do bfloat16 rows converted to float32 (portable, AVX-512);
    bfloat16 on VDPBF16PS / AMX (which sum a pair's products in their own order) stays within the reference tolerance
    of the float32 result on the upcast features. With the graph screens forced on for this small D
    (MRPRUNE_CPU_SCREEN=1: int8 VNNI products from the AVX-512 level on, bfloat16 AMX products for float32 on AMX)
    every level still gives the unscreened bits."""
    results = {}
    for level in ISA_LEVELS:
        path = str(tmp_path / f"{level}.pt")
        _run_isa_level(level, path, screen)
        results[level] = torch.load(path)
    base = results["portable"]
    for level in ISA_LEVELS[1:]:
        for key, tensors in results[level].items():
            if key.endswith("bfloat16") and level != "avx512":
                continue
            for got, want in zip(tensors, base[key], strict=True):
                assert torch.equal(got, want), f"{level} {key}"
    for level in ISA_LEVELS:
        got = results[level]["graph_scores/torch.bfloat16"][0]
        want = results["portable"]["graph_scores/torch.bfloat16"][0]  # portable bfloat16 == float32 on upcast rows
        assert_close(got, want, rtol=1e-4)


def _with_duplicates(dtype: torch.dtype, n: int = 700, dim: int = 96) -> tuple[torch.Tensor, list[int]]:
    """Random tokens where token 5 is copied to positions in other Gram tiles and at odd offsets."""
    x = torch.randn(1, n, dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    copies = [5, 131, 300, 517, 699]
    x[0, copies] = x[0, 5].clone()
    return x.contiguous(), copies


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_duplicates_tie_exactly(dtype):
    """Issue 14 problem 4: identical tokens get bit-identical similarities wherever they sit (the Gram is computed
    per pair in a fixed order, not by a BLAS whose rounding depends on the position), so their graph rows and scores
    are equal and the selections order them by index."""
    x, copies = _with_duplicates(dtype)
    n = x.shape[1]
    lengths = torch.tensor([n])
    graph, degree = cpp("cosine_graph", x, lengths, 0.2, 0.03)
    for c in copies[1:]:
        assert torch.equal(graph[0, c], graph[0, copies[0]]), c
        assert torch.equal(graph[0, :, c], graph[0, :, copies[0]]), c
        assert degree[0, c] == degree[0, copies[0]]
    edges = graph[0] > 0
    assert torch.equal(edges, edges.T)  # S is bitwise symmetric, so the edge set is
    scores = cpp("graph_scores", x, lengths, None, 0.2, 0.03, 3)[0]
    assert len(set(scores[copies].tolist())) == 1
    # DivPrune: the duplicates' distances to every pick are equal, so the first of them to be picked is the lowest.
    picks = cpp("diversity_select", x, lengths, n, True)[0].tolist()
    order = [picks.index(c) for c in copies]
    assert order == sorted(order), picks
    # Greedy residual: make the duplicated token the largest; the first pick is the lowest copy, and its copies are
    # spanned (energy 0) until the rank is exhausted.
    y = x.clone()
    y[0, copies] = (x[0, 5].float() * 4).to(dtype)
    for algorithm in ("gram", "basis"):
        picks, energies = cpp("greedy_residual_select", y, lengths, 50, None, None, 1e-5, algorithm)
        assert picks[0, 0] == copies[0], algorithm
        assert not set(picks[0, 1:].tolist()) & set(copies), algorithm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("threshold", "iterations"), [(0.5, 1), (0.5, 5), (-1.0, 2), (0.2, 5)])
def test_graph_scores_streaming_matches_edge_lists(monkeypatch, dtype, threshold, iterations):
    """Past the workspace budget graph_scores streams Gram rows (1 + t passes) instead of storing edge lists; both
    agree with the reference, dense graphs (threshold -1) and rows without edges (zero vectors) included."""
    x = _features(n=260, seed=2)
    x[0, 7] = 0  # a row without edges: uniform, its fill is not 0 (it carries mass with explicit weights)
    x = x.to(dtype)
    lengths = torch.tensor([x.shape[1]])
    for weights in (None, torch.rand(1, x.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5):
        monkeypatch.delenv("MRPRUNE_CPU_WORKSPACE_BYTES", raising=False)
        edges = cpp("graph_scores", x, lengths, weights, threshold, 0.03, iterations)
        monkeypatch.setenv("MRPRUNE_CPU_WORKSPACE_BYTES", "1")
        streamed = cpp("graph_scores", x, lengths, weights, threshold, 0.03, iterations)
        want = reference.graph_scores(x, lengths, weights, threshold, 0.03, iterations)
        assert_close(edges, want, rtol=1e-4)
        assert_close(streamed, want, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diversity_streaming_matches_materialised(monkeypatch, dtype):
    """Past the workspace budget diversity_select recomputes cosine rows instead of storing the N x N Gram; on
    clustered tokens with clear gaps the picks are the same."""
    from tests.diversity_oracle import check_against_oracle

    x = clustered(300, 40, clusters=12, generator=torch.Generator().manual_seed(11))[None].to(dtype)
    lengths = torch.tensor([300])
    stored = cpp("diversity_select", x, lengths, 30, True)
    monkeypatch.setenv("MRPRUNE_CPU_WORKSPACE_BYTES", "1")
    streamed = check_against_oracle("cpp", x, lengths, 30, True)
    assert torch.equal(stored, streamed)


def test_large_n_memory_is_order_n_d():
    """N = 12,288 tokens (an N x N float32 matrix would be 576 MiB): graph_scores, diversity_select and
    greedy_residual_select stay far below that, in a subprocess with a capped address space."""
    code = textwrap.dedent(
        """
        import json, sys, torch
        from mrprune.bench.video import run_op
        torch.set_num_threads(2)
        out = [run_op(op, 12288, 32, torch.bfloat16, 16, 2.0)
               for op in ("graph_scores", "diversity_select", "greedy_residual_select")]
        sys.stdout.write(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-2000:]
    for result in json.loads(done.stdout.strip().splitlines()[-1]):
        assert result["extra_rss_bytes"] < 128 * 2**20, result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2304, 4096), (3, 300, 1000), (2, 5, 7), (1, 1, 2**20)])
def test_token_norms_are_the_upcast_float32_norms_bitwise(dtype, shape):
    """The methods' budget norms of half features upcast in chunks through one reused buffer: the bits of
    ``features.float().norm(dim=-1)`` for every batch, chunk edge and width (a chunk of one token at D = 2**20)."""
    from mrprune.methods import _checks

    features = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    lengths = torch.full((shape[0],), shape[1])
    assert torch.equal(_checks.token_norms("test", features, lengths), features.float().norm(dim=-1))
