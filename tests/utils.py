"""Shared test helpers: backends to compare, tolerances, input generators."""

from __future__ import annotations

import torch

import mrprune
from mrprune import backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernels compute in float32; compared with the float64 reference on the same (rounded) inputs.
RTOL, ATOL = 2e-5, 1e-6


def kernel_backends(op: str, device: str = "cpu") -> list[str]:
    """The non-reference implementations of ``op`` on ``device`` (what the tests compare with the reference)."""
    return [b for b in backends.available(op, device) if b != "reference"]


def run(op: str, backend: str, *args, **kwargs):
    """Call the public op with ``backend`` forced; fails if that backend does not serve the op."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    assert backend in backends.available(op, device), f"{backend} does not implement {op} on {device}"
    with backends.use_backend(backend):
        return getattr(mrprune, op)(*args, **kwargs)


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


def clustered(n: int, dim: int, clusters: int = 4, spread: float = 0.6, generator=None) -> torch.Tensor:
    """Tokens around a few centres plus a shared offset: cosine graphs at 0.5 with real structure."""
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(0, clusters, (n,), generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator) + 0.3

