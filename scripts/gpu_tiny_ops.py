"""Tiny calls of every CUDA C++ op, for compute-sanitizer (memcheck, racecheck) in scripts/gpu_validate.sh.

Shapes are small (a few CTAs) but cover the paths that matter for memory and shared-memory races: several items,
a padded item, an empty item, ``k`` above an item's length, both greedy algorithms, a gate and a seed.
``--device cpu`` runs the same calls on the CPU kernels (a check of this script without a GPU).
"""

from __future__ import annotations

import argparse

import torch

import mrprune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, 64, generator=gen).to(device)
    lengths = torch.tensor([300, 123, 0]).to(device)
    gate = torch.rand(3, 300, generator=gen).to(device)
    seed = torch.tensor([5, -1, -1]).to(device)
    for algorithm in ("gram", "basis"):
        mrprune.greedy_residual_select(x, lengths, 50, gate, seed, algorithm=algorithm)
        mrprune.greedy_residual_select(x.half(), lengths, 150, algorithm=algorithm)
    mrprune.diversity_select(x, lengths, 50)
    mrprune.diversity_select(x.half(), lengths, 150, mask_picked=False)
    scores = x[:, :, 0].contiguous()
    mrprune.topk_indices(scores, lengths, 50, True)
    mrprune.topk_indices(scores, lengths, 200, False)
    if device == "cuda":
        torch.cuda.synchronize()
    print("tiny ops ok")


if __name__ == "__main__":
    main()
