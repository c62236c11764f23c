"""The CUDA kernels executed on the CPU: csrc/include/mrprune/kernels/*.cuh compiled with g++ against the CUDA
emulation in csrc/emu (a fiber per CUDA thread, an OS thread per block, checked barriers and warp collectives,
bounds-checked dynamic shared memory, co-resident blocks for the cooperative greedy launch), launched with the
launchers' own plans (grid, block, chunking, workspaces), under three thread orders, against ``mrprune.reference``.

Checks: topk exactly (rank counting is exact); diversity exactly on exactly representable inputs and on the
gap-decided prefix elsewhere (near-maximisers everywhere); the greedy exactly on gap-screened inputs, by the tie-aware
trajectory check otherwise; coverage_select and bipartite_dedup exactly on exactly representable inputs (ties
everywhere) and hand examples, coverage on the gap-decided prefix of clustered inputs (near-maximisers everywhere),
the de-duplication exactly on inputs whose float64 rounds have no near-tied scores. Small shapes only, but every
kernel and every launch path: several tiles, chunked launches, the selection state in shared and in global memory,
the factor cache partly and fully in shared memory, one and several blocks per item (the cross-block exchange), the
fill phase, gates and seeds.

The emulated process ends on a detected error; its stderr is the failure message. Without g++ the tests skip.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import mrprune
from tests import diversity_oracle
from tests import test_bipartite_dedup as dedup
from tests import test_coverage_select as cover
from tests import test_diversity_select as div
from tests import test_greedy_residual_select as greedy
from tests import test_topk_indices as topk
from tests.cuda_emulation_driver import request
from tests.utils import assert_close, clustered, oracle, padded

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ["fwd", "rev", "rand"]
# The static shared memory of greedy_select_kernel<512> (kernels/greedy_residual_select.cuh: static_shared_bytes).
GREEDY_STATIC_SHARED = 2240

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs g++")


def build(tmp: Path, tsan: bool = False) -> Path:
    lib = tmp / ("libcudaemu-tsan.so" if tsan else "libcudaemu.so")
    command = ["bash", str(ROOT / "scripts" / "build_cuda_emulation.sh"), str(lib), *(["--tsan"] if tsan else [])]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lib


# --- cases: (driver request, check of its result) -----------------------------------------------------------------

Check = Callable[[dict], None]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


# The driver's element codes of half-precision features (passed as raw 16-bit words; float32: code 0).
ELEMENTS = {torch.float16: 1, torch.bfloat16: 2}


def _features(t: torch.Tensor) -> dict:
    """The case entries of features: float32 values, or a half-precision tensor's raw words and element code."""
    if t.dtype in ELEMENTS:
        return {"features": t.contiguous().view(torch.int16).numpy().view(np.uint16), "element": ELEMENTS[t.dtype]}
    return {"features": _np(t)}


def topk_case(kind: str, lengths: list[int], k: int, sort_indices: bool, max_grid_y: int = 65535):
    scores = topk.make_scores(kind, lengths, torch.float32, torch.Generator().manual_seed(len(lengths) + k))
    lens = torch.tensor(lengths)
    want = mrprune.reference.topk_indices(scores, lens, k, sort_indices)
    assert torch.equal(want, topk.brute_force(scores, lens, k, sort_indices))

    def check(result: dict) -> None:
        assert torch.equal(torch.from_numpy(result["indices"]), want)

    case = {
        "op": "topk_indices",
        "scores": _np(scores),
        "lengths": _np(lens),
        "k": k,
        "sort_indices": sort_indices,
        "max_grid_y": max_grid_y,
    }
    return case, check


def diversity_exact_case(lengths: list[int], k: int, mask_picked: bool):
    """Exactly representable tokens: every distance is exact, so the picks equal the brute force's."""
    g = torch.Generator().manual_seed(300 + k)
    features, lens = padded([div.exact_family(n, g).float() for n in lengths])
    want = div.brute_batch(features, lens, k, mask_picked)

    def check(result: dict) -> None:
        assert torch.from_numpy(result["indices"]).tolist() == want.tolist()

    case = {
        "op": "diversity_select",
        "features": _np(features),
        "lengths": _np(lens),
        "k": k,
        "mask_picked": mask_picked,
    }
    return case, check


def diversity_clustered_case(
    lengths: list[int], dim: int, k: int, mask_picked: bool, dtype: torch.dtype = torch.float32, **plan
):
    """Clustered tokens vs the float64 reference (on the exactly upcast features, for float16 / bfloat16 ones, which
    run the tensor-core Gram): exact on the gap-decided prefix, near-maximisers everywhere."""
    g = torch.Generator().manual_seed(sum(lengths) + dim)
    features, lens = padded([clustered(n, dim, generator=g).to(dtype) for n in lengths])
    want = oracle("diversity_select", features, lens, k, mask_picked)

    def check(result: dict) -> None:
        got = torch.from_numpy(result["indices"])
        for b, n in enumerate(lengths):
            count = min(k, n)
            picks, ref = got[b].tolist(), want[b].tolist()
            assert picks[count:] == [-1] * (k - count)
            if count == 0:
                continue
            d = diversity_oracle.distance64(features[b, :n])
            prefix = diversity_oracle.clear_prefix(d, ref[:count], mask_picked)
            assert prefix >= min(count, 8), f"item {b}: test input near-tied at step {prefix}"
            assert picks[:prefix] == ref[:prefix], (b, picks, ref)
            diversity_oracle.assert_greedy_consistent(d, picks[:count], mask_picked)

    case = {
        "op": "diversity_select",
        **_features(features),
        "lengths": _np(lens),
        "k": k,
        "mask_picked": mask_picked,
        **plan,
    }
    return case, check


def greedy_case(kind: str, variant: str, k: int, algorithm: str, dtype: torch.dtype = torch.float32, **plan):
    """greedy.gapped_batch (exact picks and energies) or greedy.random_batch (trajectory checks), in ``dtype`` (half
    precision: native reads and the tensor-core Gram, against the float64 reference on the upcast features)."""
    batch = greedy.gapped_batch if kind == "gapped" else greedy.random_batch
    features, lengths, gate, seed = batch(dtype, variant)[:4]
    want_idx, want_e = greedy.batch_oracle(kind, dtype, variant, k)

    def check(result: dict) -> None:
        assert result["status"] == 0
        idx, energies = torch.from_numpy(result["indices"]), torch.from_numpy(result["energies"])
        if kind == "gapped":
            assert idx.tolist() == want_idx.tolist()
            assert_close(energies, want_e, rtol=1e-4, atol=1e-4)
            return
        steps = 0
        for b in range(len(greedy.LENGTHS)):
            v, g, s = greedy._item_args(features, lengths, gate, seed, b)
            steps += greedy.check_trajectory(v, g, idx[b], energies[b], k, s)
        assert steps >= min(k, 20)

    case = {
        "op": "greedy_residual_select",
        **_features(features),
        "lengths": _np(lengths),
        "k": k,
        "gate": _np(None if gate is None else gate.float()),
        "seed": _np(seed),
        "algorithm": algorithm,
        **plan,
    }
    return case, check


def greedy_too_large_case():
    """min(k, N) past the shared memory left for the pivot row: the launcher's error, before any launch."""
    features, lengths, *_ = greedy.random_batch(torch.float32, "plain")

    def check(result: dict) -> None:
        assert result["status"] == 1

    case = {
        "op": "greedy_residual_select",
        "features": _np(features),
        "lengths": _np(lengths),
        "k": 50,
        "algorithm": "gram",
        "smem_optin": GREEDY_STATIC_SHARED + 16,
    }
    return case, check


def coverage_exact_case(lengths: list[int], k: int, with_saliency: bool, seed: int = 0, **plan):
    """Exactly representable tokens, power-of-two saliency (duplicates, zeros, exact ties): the brute force picks."""
    g = torch.Generator().manual_seed(500 + seed)
    features, lens = padded([cover.exact_family(n, g) for n in lengths])
    features[features == 1e4] = 0.0  # keep the input exact everywhere (padding included)
    saliency = 2.0 ** torch.randint(-2, 2, features.shape[:2], generator=g).double() if with_saliency else None
    want = cover.brute_batch(features, lens, k, saliency)

    def check(result: dict) -> None:
        assert torch.from_numpy(result["indices"]).tolist() == want.tolist()

    case = {
        "op": "coverage_select",
        "features": _np(features.float()),
        "lengths": _np(lens),
        "k": k,
        "saliency": _np(None if saliency is None else saliency.float()),
        **plan,
    }
    return case, check


def coverage_hand_case(with_saliency: bool):
    """test_coverage_select.test_hand_example: the diagonal token first, a duplicate's gain 0, the zero vector last."""
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [0.0, 0.0]]])
    saliency = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]]) if with_saliency else None
    want = [[0, 2, 1, 3, 4]] if with_saliency else [[3, 0, 2, 1, 4]]

    def check(result: dict) -> None:
        assert result["indices"].tolist() == want

    case = {"op": "coverage_select", "features": _np(features), "lengths": [5], "k": 5, "saliency": _np(saliency)}
    return case, check


def coverage_clustered_case(
    lengths: list[int], dim: int, k: int, alpha: float, dtype: torch.dtype = torch.float32, **plan
):
    """Clustered tokens with random saliency vs the float64 reference (on the upcast features for float16 / bfloat16,
    which run the tensor-core Gram): exact on the gap-decided prefix, near-maximisers everywhere
    (test_coverage_select.assert_near_greedy)."""
    g = torch.Generator().manual_seed(sum(lengths) + dim)
    features, lens = padded([clustered(n, dim, generator=g).to(dtype) for n in lengths])
    saliency = torch.rand(features.shape[:2], generator=g) + 0.05

    def check(result: dict) -> None:
        got = torch.from_numpy(result["indices"])
        cover.assert_near_greedy(got, features, lens, k, saliency, alpha, min_prefix=4)

    case = {
        "op": "coverage_select",
        **_features(features),
        "lengths": _np(lens),
        "k": k,
        "saliency": _np(saliency),
        "alpha": alpha,
        **plan,
    }
    return case, check


def dedup_exact_case(lengths: list[int], k: int, per_round: int, seed: int = 0, **plan):
    """Exactly representable tokens full of ties: the brute force's survivors in its order (the stable ranks)."""
    g = torch.Generator().manual_seed(600 + seed)
    features, lens = padded([dedup.exact_family(n, g) for n in lengths])
    want = dedup.brute_batch(features, lens, k, per_round)

    def check(result: dict) -> None:
        assert torch.from_numpy(result["indices"]).tolist() == want.tolist()

    case = {
        "op": "bipartite_dedup",
        "features": _np(features.float()),
        "lengths": _np(lens),
        "k": k,
        "per_round": per_round,
        **plan,
    }
    return case, check


def dedup_gapped_case(lengths: list[int], dim: int, k: int, per_round: int, dtype: torch.dtype = torch.float32, **plan):
    """Random tokens (in ``dtype``) whose float64 rounds have no near-tied scores (test_bipartite_dedup.min_round_gap):
    exactly the float64 reference (on the upcast features for half precision: the tensor-core Gram)."""
    g = torch.Generator().manual_seed(sum(lengths) * dim + k)
    items = []
    for n in lengths:
        for _ in range(50):
            item = torch.randn(n, dim, generator=g).to(dtype)
            if n <= k or dedup.min_round_gap(item, k, per_round) >= dedup.GAP:
                break
        else:
            raise AssertionError(f"no gapped input of {n} tokens in 50 draws")
        items.append(item)
    features, lens = padded(items)
    want = oracle("bipartite_dedup", features, lens, k, per_round)

    def check(result: dict) -> None:
        assert torch.from_numpy(result["indices"]).tolist() == want.tolist()

    case = {
        "op": "bipartite_dedup",
        **_features(features),
        "lengths": _np(lens),
        "k": k,
        "per_round": per_round,
        **plan,
    }
    return case, check


def dedup_fixed_case(features: list, k: int, per_round: int, want: list[int]):
    """test_bipartite_dedup's hand examples (duplicates and zero vectors; identical tokens)."""

    def check(result: dict) -> None:
        assert result["indices"].tolist() == [want]

    x = np.asarray([features], dtype=np.float32)
    case = {"op": "bipartite_dedup", "features": x, "lengths": [x.shape[1]], "k": k, "per_round": per_round}
    return case, check


# Every kernel and launch path, small. Greedy plans: sms (co-resident blocks) and workspace_bytes (chunking) pick
# the blocks per item; LENGTHS = (37, 0, 13, 50, 1), D = 19 (scalar loads).
CASES: dict[str, Callable[[], tuple[dict, Check]]] = {
    "topk-ties-k1": lambda: topk_case("ties", [37, 0, 20, 1], 1, False),
    "topk-ties-k20-sorted": lambda: topk_case("ties", [37, 0, 20, 1], 20, True),
    "topk-zeros-kN": lambda: topk_case("zeros", [37, 0, 20, 1], 37, False),
    # 3 tiles, partial tiles, 2 chunks of 3 items
    "topk-tiles-chunked": lambda: topk_case("random", [600, 0, 299, 257], 250, False, max_grid_y=3),
    "topk-tiles-chunked-sorted": lambda: topk_case("random", [600, 0, 299, 257], 250, True, max_grid_y=3),
    "topk-infs-sorted": lambda: topk_case("infs", [256, 255, 513], 256, True),
    "diversity-exact": lambda: diversity_exact_case([40, 0, 23], 12, True),
    "diversity-exact-unmasked-kN": lambda: diversity_exact_case([40, 0, 23], 40, False),
    # D % 4 != 0 (scalar Gram loads), 2 Gram tiles, state in global memory, one item per chunk
    "diversity-global-state-chunked": lambda: diversity_clustered_case(
        [150, 90], 7, 20, True, smem_optin=1024, workspace_bytes=1
    ),
    "diversity-shared-state": lambda: diversity_clustered_case([130, 0, 77], 16, 30, False),
    # 12 blocks for 5 items: 2 per item, cross-block exchange
    "greedy-gapped-gram-seeded": lambda: greedy_case("gapped", "gate_seed", 13, "gram", sms=12),
    # one item per chunk, 4 blocks per item, fill phase (k = N)
    "greedy-gapped-basis-chunked": lambda: greedy_case("gapped", "gate", 50, "basis", sms=4, workspace_bytes=1),
    # one block per item, factor cache of 4 entries per column (ldf 8): partly in shared memory
    "greedy-gapped-auto-small-cache": lambda: greedy_case(
        "gapped", "plain", 7, "auto", sms=3, smem_optin=GREEDY_STATIC_SHARED + 32 + 16 * 50
    ),
    "greedy-random-gram": lambda: greedy_case("random", "gate", 50, "gram", sms=6),
    "greedy-random-basis-seeded": lambda: greedy_case("random", "gate_seed", 13, "basis", sms=10),
    "greedy-too-large": greedy_too_large_case,
    # float16 / bfloat16 features read natively: the tensor-core Gram (gram_mma_kernel, 2 tiles, element-wise and
    # 16-byte loads, with and without the cosine scale) and the basis form's half-precision rows
    "diversity-bf16-shared-state": lambda: diversity_clustered_case([130, 0, 77], 16, 30, False, torch.bfloat16),
    "diversity-fp16-global-state-chunked": lambda: diversity_clustered_case(
        [150, 90], 7, 20, True, torch.float16, smem_optin=1024, workspace_bytes=1
    ),
    "greedy-gapped-gram-seeded-bf16": lambda: greedy_case("gapped", "gate_seed", 13, "gram", torch.bfloat16, sms=12),
    "greedy-gapped-basis-chunked-fp16": lambda: greedy_case(
        "gapped", "gate", 50, "basis", torch.float16, sms=4, workspace_bytes=1
    ),
    "greedy-random-gram-fp16": lambda: greedy_case("random", "gate", 50, "gram", torch.float16, sms=6),
    "greedy-gram-2-tiles-bf16": lambda: greedy_single_item_case(150, 24, 40, "gram", sms=3, dtype=torch.bfloat16),
    "coverage-bf16-shared-state": lambda: coverage_clustered_case([130, 77], 16, 20, 1.0, torch.bfloat16),
    "coverage-fp16-global-state-chunked": lambda: coverage_clustered_case(
        [150, 0, 90], 7, 12, 0.5, torch.float16, smem_optin=1024, workspace_bytes=1
    ),
    "dedup-bf16-shared-state": lambda: dedup_gapped_case([64, 33], 24, 10, 3, torch.bfloat16),
    "dedup-fp16-global-state-chunked": lambda: dedup_gapped_case(
        [170, 0, 61], 9, 20, 8, torch.float16, smem_optin=1024, workspace_bytes=1
    ),
    "coverage-exact": lambda: coverage_exact_case([8, 0, 5, 13], 5, False),
    "coverage-exact-saliency-kN": lambda: coverage_exact_case([8, 0, 5, 13], 13, True, seed=1),
    "coverage-hand": lambda: coverage_hand_case(False),
    "coverage-hand-saliency": lambda: coverage_hand_case(True),
    # D % 4 != 0 (scalar Gram loads), 2 Gram tiles, state in global memory, one item per chunk, alpha = 0.5 (powf)
    "coverage-global-state-chunked": lambda: coverage_clustered_case(
        [150, 0, 90], 7, 12, 0.5, smem_optin=1024, workspace_bytes=1
    ),
    "coverage-shared-state": lambda: coverage_clustered_case([130, 77], 16, 20, 1.0),
    "dedup-exact": lambda: dedup_exact_case([12, 0, 5, 23], 4, 3),
    "dedup-exact-k1": lambda: dedup_exact_case([12, 0, 5, 23], 1, 8, seed=1),
    "dedup-exact-nothing-to-drop": lambda: dedup_exact_case([12, 0, 5, 23], 23, 8, seed=2),
    "dedup-duplicates-zeros": lambda: dedup_fixed_case(
        [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], 4, 8, [2, 1, 3, 5]
    ),
    "dedup-identical": lambda: dedup_fixed_case([[1.0, 1.0, 1.0]] * 10, 3, 8, [9, 3, 7]),
    # 2 Gram tiles, D % 4 != 0, state in global memory, one item per chunk
    "dedup-global-state-chunked": lambda: dedup_gapped_case([170, 0, 61], 9, 20, 8, smem_optin=1024, workspace_bytes=1),
    "dedup-shared-state": lambda: dedup_gapped_case([64, 33], 24, 10, 3),
}


def greedy_single_item_case(n: int, dim: int, k: int, algorithm: str, sms: int, dtype: torch.dtype = torch.float32):
    """One random item over ``sms`` blocks (cross-block exchange every step), checked by its trajectory."""
    g = torch.Generator().manual_seed(n * dim + k)
    features = (torch.randn(1, n, dim, generator=g) * (0.5 + torch.rand(1, n, 1, generator=g))).to(dtype)
    lengths = torch.tensor([n])

    def check(result: dict) -> None:
        assert result["status"] == 0
        idx, energies = torch.from_numpy(result["indices"]), torch.from_numpy(result["energies"])
        assert greedy.check_trajectory(features[0], None, idx[0], energies[0], k) == min(k, n, dim)

    case = {
        "op": "greedy_residual_select",
        **_features(features),
        "lengths": _np(lengths),
        "k": k,
        "algorithm": algorithm,
        "sms": sms,
    }
    return case, check


# The ThreadSanitizer run (about 20 times slower): one case per kernel family, smaller still.
TSAN_CASES: dict[str, Callable[[], tuple[dict, Check]]] = {
    "topk-sorted-chunked": lambda: topk_case("random", [300, 0, 40], 50, True, max_grid_y=2),
    # D = 20: three k-tiles of the Gram kernel (its double buffering and barriers run)
    "diversity-shared-state": lambda: diversity_clustered_case([40, 23], 20, 6, True),
    "greedy-gram-3-blocks": lambda: greedy_single_item_case(40, 20, 6, "gram", sms=3),
    # the tensor-core Gram (16-byte loads, the cosine scale, the staged epilogue) on bfloat16 features
    "diversity-bf16": lambda: diversity_clustered_case([40, 23], 16, 6, True, torch.bfloat16),
    "coverage-shared-state": lambda: coverage_clustered_case([40, 23], 20, 6, 1.0),
    "dedup-exact": lambda: dedup_exact_case([23, 12], 4, 3),
}


@functools.cache
def _cases() -> tuple[list[str], list[dict], list[Check]]:
    names = list(CASES)
    built = [CASES[name]() for name in names]
    return names, [c for c, _ in built], [k for _, k in built]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """The emulation library, built once per test module."""
    return build(tmp_path_factory.mktemp("cudaemu-lib"))


@pytest.fixture(scope="module")
def emulated(emulator, tmp_path_factory):
    """``emulated(order)``: the results of every case under that thread order (one subprocess per order)."""
    tmp, lib = tmp_path_factory.mktemp("cudaemu"), emulator
    cache: dict[str, list[dict]] = {}

    def results(order: str) -> list[dict]:
        if order not in cache:
            proc, out = request(lib, _cases()[1], tmp, order=order, seed=7)
            assert out is not None, f"emulator exit code {proc.returncode}:\n{proc.stderr[-6000:]}"
            cache[order] = out
        return cache[order]

    return results


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("order", ORDERS)
def test_emulated_kernels_match_reference(emulated, order, name):
    """Every CUDA kernel, emulated on the CPU under forward, reverse and random thread orders, against the spec."""
    names, _, checks = _cases()
    index = names.index(name)
    checks[index](emulated(order)[index])


# --- the emulator's own checks -------------------------------------------------------------------------------------

# csrc/emu/selftest.cpp: test kernel -> (exit code, what the diagnosis must say).
DETECTED = {
    "divergent_barriers": (1, 86, "reached the __syncthreads of selftest.cpp"),
    "exit_before_barrier": (2, 86, "thread 5 exited while"),
    "divergent_shuffle": (3, 86, "exited while lane(s)"),
    "shuffle_mask_without_self": (4, 86, "leaves out the lane itself"),
    "shuffle_reads_outside_mask": (5, 86, "outside the mask 0x0000ffff"),
    "dynamic_shared_overflow": (6, 86, "wrote past its 400 bytes of dynamic shared memory"),
    "grid_deadlock": (7, 87, "did not finish within"),
    "wmma_load_half_warp": (12, 86, "wait at the nvcuda::wmma::load_matrix_sync of selftest.cpp:"),
    "wmma_mma_half_warp": (13, 86, "nvcuda::wmma::mma_sync of selftest.cpp:"),
    "wmma_different_pointers": (14, 86, "pass a different pointer"),
    "wmma_ldm_not_multiple": (15, 86, "nvcuda::wmma::load_matrix_sync: ldm 12 is not a multiple of 8"),
    "wmma_misaligned_pointer": (16, 86, "is not 32-byte aligned"),
    "wmma_store_ldm_not_multiple": (17, 86, "nvcuda::wmma::store_matrix_sync: ldm 18 is not a multiple of 4"),
    "wmma_lane_dependent_fragment": (18, 86, "pass a different accumulator fragment"),
    "wmma_load_without_syncwarp": (19, 86, "pass a different tile read from memory"),
    "syncwarp_half_warp": (20, 86, "wait at the __syncwarp of selftest.cpp:"),
}


@pytest.mark.parametrize("order", ORDERS)
def test_emulator_collectives_and_barriers(emulator, tmp_path, order):
    """Shuffles (xor, down past the warp), ballots, __syncthreads_count and shared memory behave as on a GPU."""
    proc, results = request(emulator, [{"op": "selftest", "which": 0}], tmp_path, order=order)
    assert results is not None, proc.stderr
    out = results[0]["out"].reshape(64, 5)
    t = np.arange(64)
    lane = t % 32
    assert out[:, 0].tolist() == [496] * 32 + [1520] * 32
    assert out[:, 1].tolist() == np.where(lane + 3 < 32, t + 3, t).tolist()
    assert out[:, 2].tolist() == [np.uint32(0xAAAAAAAA).astype(np.int32)] * 64
    assert out[:, 3].tolist() == [40] * 64
    assert out[:, 4].tolist() == [2016] * 64


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", sorted(DETECTED))
def test_emulator_detects(emulator, tmp_path, name, order):
    """Each class of bug the emulator claims to catch ends the run with its diagnosis, in every thread order."""
    which, code, message = DETECTED[name]
    proc, results = request(emulator, [{"op": "selftest", "which": which}], tmp_path, order=order, timeout_s=2)
    assert results is None and proc.returncode == code, (proc.returncode, proc.stderr)
    assert message in proc.stderr, proc.stderr


def _libtsan() -> str | None:
    proc = subprocess.run([os.environ.get("CXX", "g++"), "-print-file-name=libtsan.so"], capture_output=True, text=True)
    path = proc.stdout.strip()
    return path if proc.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(
    os.environ.get("MRPRUNE_CUDAEMU_TSAN") != "1", reason="opt-in: scripts/check_cuda_emulation_tsan.sh"
)
def test_emulated_kernels_under_thread_sanitizer(tmp_path):
    """A ThreadSanitizer build of the emulation: CUDA threads are TSan fibers switched without synchronisation,
    barriers and warp collectives are release/acquire pairs, so any shared-memory access between two barriers that
    races, and any unsynchronised global-memory access between blocks, is reported (and fails this test)."""
    libtsan = _libtsan()
    if libtsan is None:
        pytest.skip("libtsan not found")
    lib = build(tmp_path, tsan=True)
    env = {"LD_PRELOAD": libtsan, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"}
    # The annotations work: a shared-memory race between two threads of a block is reported, the same accesses
    # with a __syncthreads between them are not.
    proc, _ = request(lib, [{"op": "selftest", "which": 8}], tmp_path / "race", env=env)
    assert proc.returncode == 66 and "WARNING: ThreadSanitizer: data race" in proc.stderr, proc.stderr[-4000:]
    proc, _ = request(lib, [{"op": "selftest", "which": 9}, {"op": "selftest", "which": 0}], tmp_path / "ok", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    names = list(TSAN_CASES)
    built = [TSAN_CASES[name]() for name in names]
    proc, results = request(lib, [c for c, _ in built], tmp_path, order="rand", seed=3, env=env, timeout_s=600)
    assert "ThreadSanitizer" not in proc.stderr and results is not None, (
        f"exit code {proc.returncode}:\n{proc.stderr[-8000:]}"
    )
    for name, (_, check), result in zip(names, built, results, strict=True):
        try:
            check(result)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


# csrc/emu/selftest.cpp, selftests 10 (bf16) and 11 (fp16): {elements checked, mismatches} of 4 WMMA GEMMs (2 warps):
# 32 x 32 x 32 through shared memory (the pattern of kernels/gram_mma.cuh: A row-major, B column-major, the epilogue
# staged with store_matrix_sync + __syncwarp) on integer inputs (exact) and on random ones; 32 x 48 x 64 from global
# memory with C loaded and stored, A column-major / B row-major / C column-major on random inputs, the transposed
# layouts on integer inputs. Checked in C++ against a float64 reference (exactly for integers, within float
# accumulation error otherwise) and bitwise against the documented emulation order (k ascending from c, one fma each).
WMMA_GEMMS = [1024, 0, 1024, 0, 1536, 0, 1536, 0]


@pytest.mark.parametrize("order", ORDERS)
def test_emulator_wmma_gemm(emulator, tmp_path, order):
    """nvcuda::wmma (csrc/emu/mma.h) GEMMs of bf16 and fp16 inputs match the float64 reference in every thread order."""
    cases = [{"op": "selftest", "which": 10}, {"op": "selftest", "which": 11}]
    proc, results = request(emulator, cases, tmp_path, order=order, seed=5)
    assert results is not None, proc.stderr
    for dtype, result in zip(["bf16", "fp16"], results, strict=True):
        assert result["status"] == 0
        assert result["out"][:8].tolist() == WMMA_GEMMS, (dtype, result["out"][:8].tolist())


def _float_probes() -> np.ndarray:
    """float32 bit patterns that decide a float -> fp16 / bf16 rounding: every finite 16-bit value, every midpoint
    between neighbours (a tie) and the floats next to it, both signs; specials; random patterns."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    half = bits[:0x7C01].astype(np.uint16).view(np.float16).astype(np.float64)  # 0 .. inf
    mid_half = ((half[:-1] + half[1:]) / 2).astype(np.float32)  # exact: one more bit than fp16
    bf16 = bits[:0x7F81] << 16  # 0 .. inf
    mid_bf16 = (bf16[:-1] | 0x8000).view(np.float32)
    points = [half.astype(np.float32), bf16.view(np.float32)]
    for mid in (mid_half, mid_bf16):
        points += [mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))]
    magnitudes = np.concatenate(points).view(np.uint32)
    specials = np.array([1, 0x7FFFFF, 0x800000, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF])
    random = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint32)
    patterns = np.concatenate([magnitudes, magnitudes | 0x80000000, specials.astype(np.uint32), random])
    return patterns.view(np.float32)


def test_emulator_half_conversions(emulator):
    """csrc/emu/cuda_fp16.h and cuda_bf16.h: fp16 / bf16 -> float exactly for all 65536 bit patterns, float -> fp16 /
    bf16 rounded to nearest even (ties, subnormals, overflow) like numpy and torch; NaN -> CUDA's canonical 0x7fff."""
    lib = ctypes.CDLL(str(emulator))  # conversions only: no launch, nothing that could end this process
    lib.emu_convert_16bit.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.emu_convert_16bit.restype = ctypes.c_int

    def convert(kind: int, values: np.ndarray, dtype) -> np.ndarray:
        out = np.empty(values.shape, dtype=dtype)
        assert lib.emu_convert_16bit(kind, values.ctypes.data, out.ctypes.data, values.size) == 0
        return out

    def assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))

    bits = np.arange(1 << 16, dtype=np.uint16)
    assert_same_floats(convert(0, bits, np.float32), bits.view(np.float16).astype(np.float32))
    from_bf16 = convert(1, bits, np.float32)
    assert np.array_equal(from_bf16.view(np.uint32), bits.astype(np.uint32) << 16)
    assert_same_floats(from_bf16, torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy())

    x = _float_probes()
    nan = np.isnan(x)
    with np.errstate(all="ignore"):
        want_half = x.astype(np.float16).view(np.uint16)
    to_half, to_bf16 = convert(2, x, np.uint16), convert(3, x, np.uint16)
    for name, got, want in [
        ("fp16 (numpy)", to_half, want_half),
        ("fp16 (torch)", to_half, torch.from_numpy(x).half().view(torch.int16).numpy().view(np.uint16)),
        ("bf16 (torch)", to_bf16, torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)),
    ]:
        bad = np.flatnonzero((got != want) & ~nan)
        assert bad.size == 0, (name, [(hex(x.view(np.uint32)[i]), hex(got[i]), hex(want[i])) for i in bad[:5]])
        assert (got[nan] == 0x7FFF).all(), name


@pytest.mark.skipif(
    os.environ.get("MRPRUNE_CUDAEMU_TSAN") != "1", reason="opt-in: scripts/check_cuda_emulation_tsan.sh"
)
def test_emulated_wmma_under_thread_sanitizer(tmp_path):
    """The WMMA GEMMs under ThreadSanitizer: store_matrix_sync's one-writer-per-element stores, __syncwarp and the
    operand loads of shared memory raise no report on correct code."""
    libtsan = _libtsan()
    if libtsan is None:
        pytest.skip("libtsan not found")
    lib = build(tmp_path, tsan=True)
    env = {"LD_PRELOAD": libtsan, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"}
    cases = [{"op": "selftest", "which": 10}, {"op": "selftest", "which": 11}]
    proc, results = request(lib, cases, tmp_path, order="rand", seed=3, env=env, timeout_s=600)
    assert "ThreadSanitizer" not in proc.stderr and results is not None, (
        f"exit code {proc.returncode}:\n{proc.stderr[-8000:]}"
    )
    assert [result["out"][:8].tolist() for result in results] == [WMMA_GEMMS] * 2
