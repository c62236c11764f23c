"""Bit-identity check for changes to the CPU Gram tile kernels (``csrc/include/mrprune/cpu/gram*.h``).

The tile kernels promise a fixed per-pair summation order, so a re-blocking (loop order, tile or chunk sizes,
packing, prefetching) must leave every output bit unchanged. Save the outputs of the ops that run on those tiles
with the current build, rebuild with the change, and compare::

    python scripts/check_gram_bits.py save /tmp/gram_ref.pt      # before the change
    python scripts/check_gram_bits.py compare /tmp/gram_ref.pt   # after rebuilding

Run both under the same ``MRPRUNE_CPU_ISA`` (unset, ``avx512_bf16``, ``avx512``, ``portable``) to cover each kernel.
Covers ``graph_scores``, ``cosine_graph``, ``diversity_select`` and ``transfer_scores`` for float32, bfloat16 and
float16 at N in {1, 31, 33, 257, 2304} and D in {2, 62, 64, 1000, 4096} with duplicate rows (about 30 s on 2 cores).
Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mrprune import ops


def outputs() -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    """Run the Gram-tile ops on fixed random inputs.

    Returns
    -------
    dict
        Output of each op call by ``"{dtype}-{N}-{D}-{op}"``: tensors, or tuples of tensors (``cosine_graph``).
    """
    out: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 31, 33, 257, 2304):
            for d in (2, 62, 64, 1000, 4096):
                if n * d > 2304 * 1000 and not (n == 2304 and d == 4096):
                    continue
                gen = torch.Generator().manual_seed(n * 7 + d)
                x = torch.randn(2, n, d, generator=gen)
                if n > 3:  # exact duplicates must stay exact ties
                    x[0, 2] = x[0, 0]
                    x[1, n - 1] = x[1, 1]
                x = x.to(dtype)
                lengths = torch.tensor([n, max(1, n - 2)])
                key = f"{dtype}-{n}-{d}"
                out[key + "-gs"] = ops.graph_scores(x, lengths, None, 0.05, 0.03, 1)
                if n <= 1100:
                    out[key + "-cg"] = ops.cosine_graph(x, lengths, 0.05, 0.03)
                out[key + "-div"] = ops.diversity_select(x, lengths, min(n, 17))
                q = x[:, : max(1, n // 2)].contiguous()
                mask = torch.rand(2, n, generator=gen) < 0.7
                qlen = torch.tensor([q.shape[1], q.shape[1]])
                out[key + "-tr"] = ops.transfer_scores(q, qlen, x, mask, None, 0.05, 0.03)
    return out


def _equal(a: torch.Tensor | tuple[torch.Tensor, ...], b: torch.Tensor | tuple[torch.Tensor, ...]) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def main() -> int:
    """Save or compare the outputs (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("path")
    args = parser.parse_args()
    out = outputs()
    if args.mode == "save":
        torch.save(out, args.path)
        sys.stdout.write(f"saved {len(out)} outputs to {args.path}\n")
        return 0
    ref = torch.load(args.path)
    bad = [key for key in ref if key not in out or not _equal(ref[key], out[key])]
    if bad:
        sys.stdout.write(f"MISMATCH in {len(bad)} of {len(ref)} outputs: {bad}\n")
        return 1
    sys.stdout.write(f"all {len(ref)} outputs bit-identical\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
