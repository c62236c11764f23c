"""Shared test helpers: backends to compare, tolerances, input generators."""

from __future__ import annotations

import math
import os

import pytest
import torch

import mrprune
from mrprune import backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernels compute in float32; compared with the float64 reference on the same (rounded) inputs.
RTOL, ATOL = 2e-5, 1e-6


def triton_interpreted(device: str = "cpu") -> bool:
    """Whether Triton kernels would run under the (slow) CPU interpreter on ``device``."""
    return torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_backends(op: str, device: str = "cpu", interpreted: bool = True) -> list[str]:
    """The non-reference implementations of ``op`` on ``device`` (what the tests compare with the reference).

    ``interpreted=False`` leaves out Triton where it would run under the CPU interpreter: for large shapes and large
    parametrizations (the Triton-specific tests cover the kernels at small shapes instead)."""
    names = [b for b in backends.available(op, device) if b != "reference"]
    if not interpreted and triton_interpreted(device):
        names = [b for b in names if b != "triton"]
    return names


# On a GPU the Triton kernels would autotune every new shape (seconds of compiling each): the tests use the fixed
# launch configs, except where a test turns autotuning back on (the full-size GPU tests).
os.environ.setdefault("MRPRUNE_TRITON_AUTOTUNE", "0")

#: Where the Triton-specific tests run: the GPU if there is one, else the CPU under the interpreter, else nowhere.
TRITON_DEVICE = (
    ("cuda" if torch.cuda.is_available() else ("cpu" if triton_interpreted("cpu") else None))
    if getattr(mrprune, "HAS_TRITON", False)
    else None
)


def triton_test(fn):
    """Marks a Triton-specific test (``triton_interp``) and skips it where Triton cannot run."""
    fn = pytest.mark.triton_interp(fn)
    return pytest.mark.skipif(TRITON_DEVICE is None, reason="needs triton and a GPU or TRITON_INTERPRET=1")(fn)


def to_triton(t):
    """``t`` on :data:`TRITON_DEVICE` (``None`` and non-tensors pass through)."""
    return t.to(TRITON_DEVICE) if isinstance(t, torch.Tensor) else t


#: The CUDA C++ kernels as one more backend of the per-op tests (GPU only): :func:`run` copies the inputs to the GPU
#: and the results back, so every CPU-side check applies unchanged.
CUDA = pytest.param("cuda", marks=(pytest.mark.cuda, pytest.mark.ext), id="cuda")


def device_of(backend: str) -> str:
    """The device a backend of the per-op tests runs on (``"cuda"`` for the CUDA C++ kernels, else ``"cpu"``)."""
    return "cuda" if backend == "cuda" else "cpu"


def _to_device(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def run(op: str, backend: str, *args, **kwargs):
    """Call the public op with ``backend`` forced; fails if that backend does not serve the op. The ``"cuda"``
    backend runs on copies of the inputs on the GPU and returns its results on the CPU."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    on_gpu = backend == "cuda" and device.type == "cpu"
    if on_gpu:
        args, kwargs = _to_device(args, "cuda"), {k: _to_device(v, "cuda") for k, v in kwargs.items()}
        device = torch.device("cuda")
    assert backend in backends.available(op, device), f"{backend} does not implement {op} on {device}"
    with backends.use_backend(backend):
        out = getattr(mrprune, op)(*args, **kwargs)
    if on_gpu:
        assert all(t.device.type == "cuda" for t in (out if isinstance(out, tuple) else (out,)))
        out = _to_device(out, "cpu")
    return out


def oracle(op: str, *args, **kwargs):
    """The float64 reference on float64 copies of every floating tensor argument."""
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    return getattr(mrprune.reference, op)(*args, **kwargs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def padded(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_i, ...]`` tensors into a padded batch (padding filled with large garbage, which must be ignored)."""
    n_max = max(t.shape[0] for t in items)
    out = torch.full((len(items), n_max, *items[0].shape[1:]), 1e4, dtype=items[0].dtype)
    for b, t in enumerate(items):
        out[b, : t.shape[0]] = t
    return out, torch.tensor([t.shape[0] for t in items], dtype=torch.int64)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


#: Whether the C++ kernels can screen thresholded Gram tiles here (``MRPRUNE_CPU_SCREEN``): float32 rows with
#: bfloat16 AMX products, or rows whose exact products are float32 FMA with int8 VNNI products.
CPU_SCREEN = {"amx_bf16", "amx_tile", "avx512_bf16"} <= _cpu_flags() or "avx512_vnni" in _cpu_flags()


def near_threshold(n: int, dim: int, threshold: float, spread: float = 0.002, generator=None) -> torch.Tensor:
    """Token 0 plus ``n - 1`` tokens whose cosine with it lies uniformly in ``threshold +- spread`` (nearly
    orthogonal remainders in ``dim`` dimensions), with norms spread over six decades: pairs right at a threshold."""
    base = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    rest = torch.randn(n - 1, dim, generator=generator)
    rest = torch.nn.functional.normalize(rest - (rest @ base)[:, None] * base, dim=1)
    cosine = threshold + spread * (2 * torch.rand(n - 1, 1, generator=generator) - 1)
    tokens = torch.cat([base[None], cosine * base + (1 - cosine**2).sqrt() * rest])
    return tokens * 10 ** (6 * torch.rand(n, 1, generator=generator) - 3)


def quantization_worst_case(n: int, dim: int, generator=None) -> tuple[torch.Tensor, float]:
    """``(tokens [2n, dim], threshold)``: pairs on which an int8 screen's error bound is tight. Token ``i < n`` is a
    spike of 127 in channel 0 plus +-0.49 elsewhere (quantised with scale 1: the spike alone survives, every other
    channel rounds to 0 with error 0.49); token ``n + i`` is 0 in channel 0 and the same signs elsewhere, so its
    cosine with token ``i`` (about 0.087 at dim 512) is exactly the quantisation error, which a screen sees as 0.
    The threshold lies just below that cosine: a screen margin short of the proven bound drops these edges."""
    signs = torch.randint(0, 2, (n, dim - 1), generator=generator).float() * 2 - 1
    scale = 10 ** (2 * torch.rand(n, 1, generator=generator) - 1)
    spikes = torch.cat([torch.full((n, 1), 127.0), 0.49 * signs], dim=1) * scale
    aligned = torch.cat([torch.zeros(n, 1), signs], dim=1) * scale.flip(0)
    cosine = 0.49 * (dim - 1) / math.sqrt((127.0**2 + 0.49**2 * (dim - 1)) * (dim - 1))
    return torch.cat([spikes, aligned]), cosine - 0.004


def clustered(n: int, dim: int, clusters: int = 4, spread: float = 0.6, generator=None) -> torch.Tensor:
    """Tokens around a few centres plus a shared offset: cosine graphs at 0.5 with real structure."""
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(0, clusters, (n,), generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator) + 0.3


def check_crops_alone(result, features, scores, owned, shares, alone, *, layer: int) -> None:
    """``result`` (one item of a per-crop merging method: tokens ``features [n, D]``, ``scores [n]`` at vision layer
    ``layer``, crops ``owned [n]``) holds, for each crop ``c`` with ``shares[c]`` output tokens (``None``: a count the
    method sets), exactly ``alone(share)`` run on that crop's tokens by themselves, and its newlines (crop -1) as
    themselves (VisionZip's and PruMerge's check)."""
    lines = (owned < 0).nonzero()[:, 0]
    line_slots = torch.searchsorted(result.kept, lines)
    assert torch.equal(result.kept[line_slots], lines) and torch.equal(result.tokens[line_slots], features[lines])
    assert torch.equal(result.sources[lines], line_slots) and bool((result.weights[lines] == 1).all())
    for crop, share in shares.items():
        members = (owned == crop).nonzero()[:, 0]
        (one,) = alone(share).select_batch(features[None, members], [None], attention={layer: scores[None, members]})
        mine = torch.isin(result.kept, members)
        assert torch.equal(result.kept[mine], members[one.kept])
        assert torch.equal(result.tokens[mine], one.tokens)
        source, alone_source = result.sources[members], one.sources  # -1: dropped
        expected = torch.where(alone_source >= 0, members[one.kept[alone_source.clamp(min=0)]], -1)
        assert torch.equal(torch.where(source >= 0, result.kept[source.clamp(min=0)], -1), expected)
        assert torch.equal(result.weights[members], one.weights)
    if None not in shares.values():
        assert result.kept.numel() == lines.numel() + sum(shares.values())
