// The CUDA launchers of csrc/cuda/*.cu replayed on the CPU emulation (cuda_runtime.h in this folder): the same
// torch-free device code (csrc/include/mrprune/kernels/*.cuh), the same host-side plans (grid, block, chunking,
// workspace sizes, shared memory), with host vectors for the workspaces and the device limits as arguments. A C API
// for ctypes (tests/cuda_emulation_driver.py); every pointer is a contiguous host array of the documented shape.
//
// Workspaces the launchers allocate uninitialised are filled with NaN (floats) or 0xff bytes here, so a kernel that
// reads one before writing it shows up in the results.
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cuda_runtime.h"

// Dynamic shared memory: the arrays the kernels' `extern __shared__ float smem[]` declarations name, one per OS
// thread (block), sized for the largest opt-in of current GPUs (227 KiB on sm_90) plus room for the canary.
constexpr size_t kSharedCapacity = 232448 + 4096;
namespace mrprune::kernels::greedy {
alignas(16) thread_local float smem[kSharedCapacity / sizeof(float)];
}
namespace mrprune::kernels::diversity {
alignas(16) thread_local float smem[kSharedCapacity / sizeof(float)];
}
namespace mrprune::kernels::coverage {
alignas(16) thread_local float smem[kSharedCapacity / sizeof(float)];
}
namespace mrprune::kernels::dedup {
alignas(16) thread_local float smem[kSharedCapacity / sizeof(float)];
}

#include "mrprune/kernels/bipartite_dedup.cuh"
#include "mrprune/kernels/coverage_select.cuh"
#include "mrprune/kernels/diversity_select.cuh"
#include "mrprune/kernels/gram_mma.cuh"
#include "mrprune/kernels/greedy_residual_select.cuh"
#include "mrprune/kernels/topk.cuh"

namespace {

namespace ks = mrprune::kernels::selection;
namespace kg = mrprune::kernels::greedy;
namespace kd = mrprune::kernels::diversity;
namespace kt = mrprune::kernels::topk;
namespace kc = mrprune::kernels::coverage;
namespace kb = mrprune::kernels::dedup;

void* greedy_smem() { return kg::smem; }
void* diversity_smem() { return kd::smem; }
const cudaemu::DynamicShared kGreedyShared{&greedy_smem, kSharedCapacity};
const cudaemu::DynamicShared kDiversityShared{&diversity_smem, kSharedCapacity};
void* coverage_smem() { return kc::smem; }
void* dedup_smem() { return kb::smem; }
const cudaemu::DynamicShared kCoverageShared{&coverage_smem, kSharedCapacity};
const cudaemu::DynamicShared kDedupShared{&dedup_smem, kSharedCapacity};

template <class F>
void launch(const char* name, dim3 grid, dim3 block, F&& body) {
  cudaemu::launch(name, grid, block, 0, nullptr, false, 0, std::function<void()>(body));
}

std::vector<float> garbage_floats(int64_t n) {
  return std::vector<float>(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());
}

// The launchers' Gram of a chunk (mrprune/cuda/gram_launch.h): FP32 gram_kernel for float32 features, the tensor-core
// gram_mma_kernel for half precision (scale: inverse norms, or null).
void launch_gram(ks::Element element, bool vec, dim3 grid, const void* x, const int64_t* len, int n_tokens, int n_dim,
                 const float* scale, float* gram) {
  ks::with_element(element, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    if constexpr (std::is_same_v<T, float>) {
      if (vec) {
        launch("gram_kernel<true>", grid, ks::kGramThreads,
               [&] { ks::gram_kernel<true>(xt, len, n_tokens, n_dim, gram); });
      } else {
        launch("gram_kernel<false>", grid, ks::kGramThreads,
               [&] { ks::gram_kernel<false>(xt, len, n_tokens, n_dim, gram); });
      }
    } else if (vec) {
      launch("gram_mma_kernel<true>", grid, ks::kMmaThreads,
             [&] { ks::gram_mma_kernel<T, true>(xt, len, n_tokens, n_dim, scale, gram); });
    } else {
      launch("gram_mma_kernel<false>", grid, ks::kMmaThreads,
             [&] { ks::gram_mma_kernel<T, false>(xt, len, n_tokens, n_dim, scale, gram); });
    }
  });
}

// Bytes per feature element of the C API's `element` (0 float32, 1 float16, 2 bfloat16; kernels: ks::Element).
int64_t element_bytes(int element) { return element == 0 ? 4 : 2; }

// Rows b0... of x [B, N, D] of `element`.
const void* item_rows(const void* x, int element, int64_t b0, int64_t tokens, int64_t dim) {
  return static_cast<const char*>(x) + b0 * tokens * dim * element_bytes(element);
}

// 16-byte loads of half-precision features: whole 16-byte chunks per row, 16-byte aligned rows.
bool half_vec(const void* x, int64_t dim) { return dim % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0; }

// The launchers' cosine Gram of a chunk (mrprune/cuda/unit_gram.cuh): unit rows then the FP32 Gram for float32,
// inverse norms then the scaled tensor-core Gram of the raw rows for half precision. rows_ws: [items, N, D] or
// [items, N] floats (cosine_workspace); vec as there.
void cosine_gram(ks::Element element, const void* x, const int64_t* len, int64_t items, int n_tokens, int n_dim,
                 int64_t tiles, bool vec, float* rows_ws, float* sim) {
  const int64_t rows = items * n_tokens;
  const dim3 norm_grid(static_cast<unsigned>(ks::row_blocks(rows)));
  const bool raw_rows = element != ks::Element::kFloat32;
  ks::with_element(element, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    if constexpr (std::is_same_v<T, float>) {
      launch("row_norm_kernel<256, kUnitRow>", norm_grid, ks::kNormThreads, [&] {
        ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kUnitRow, T>(xt, len, rows, n_tokens, n_dim, nullptr,
                                                                       rows_ws);
      });
    } else {
      launch("row_norm_kernel<256, kInverseNorm>", norm_grid, ks::kNormThreads, [&] {
        ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kInverseNorm, T>(xt, len, rows, n_tokens, n_dim, rows_ws,
                                                                           nullptr);
      });
    }
  });
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles), static_cast<unsigned>(items));
  launch_gram(element, vec, grid, raw_rows ? x : rows_ws, len, n_tokens, n_dim, raw_rows ? rows_ws : nullptr, sim);
}

// out[r] = ||x_r||^2 for the `rows` rows of x (mrprune/cuda/gram_launch.h: launch_squared_norms).
void squared_norms(ks::Element element, const void* x, const int64_t* len, int64_t rows, int n_tokens, int n_dim,
                   float* out) {
  ks::with_element(element, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch("row_norm_kernel<256, kSquaredNorm>", dim3(static_cast<unsigned>(ks::row_blocks(rows))), ks::kNormThreads,
           [&] {
             ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kSquaredNorm, T>(static_cast<const T*>(x), len, rows,
                                                                                n_tokens, n_dim, out, nullptr);
           });
  });
}

// Floats of the normalisation workspace per item (mrprune/cuda/unit_gram.cuh: cosine_workspace).
int64_t cosine_workspace(int element, int64_t tokens, int64_t dim) { return element == 0 ? tokens * dim : tokens; }

}  // namespace

extern "C" {

// Scheduling of every later launch: order 0 forward, 1 reverse, 2 random (seed); watchdog timeout in seconds; OS
// threads of a plain launch.
void emu_configure(int order, uint64_t seed, double timeout_s, int workers) {
  cudaemu::configure(order, seed, timeout_s, workers);
}

// topk_indices_cuda: scores [B, N] float32, lengths [B] int64, out [B, k] int64. max_grid_y: the chunking limit
// (kt::kMaxGridY on a GPU; smaller values exercise the chunked launches).
void emu_topk_indices(const float* scores, const int64_t* lengths, int64_t batch, int64_t tokens, int64_t k,
                      int sort_indices, int64_t max_grid_y, int64_t* out) {
  constexpr int kBlock = kt::kDefaultBlock;
  if (batch == 0 || k == 0) return;
  const kt::LaunchPlan plan = kt::plan_launch(batch, tokens, max_grid_y);
  const int n_tokens = static_cast<int>(tokens), budget = static_cast<int>(k);
  std::vector<uint8_t> keep;
  std::vector<int> tile_kept;
  if (sort_indices) {
    keep.assign(static_cast<size_t>(batch * tokens), 0xff);
    tile_kept.assign(static_cast<size_t>(batch * plan.tiles), -1);
  }
  for (int64_t b0 = 0; b0 < batch; b0 += plan.chunk) {
    const int64_t chunk = std::min(plan.chunk, batch - b0);
    const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(chunk));
    const float* s = scores + b0 * tokens;
    const int64_t* len = lengths + b0;
    int64_t* o = out + b0 * k;
    if (sort_indices) {
      uint8_t* kp = keep.data() + b0 * tokens;
      int* tk = tile_kept.data() + b0 * plan.tiles;
      launch("topk_rank_kernel<256, true>", grid, kBlock,
             [&] { kt::topk_rank_kernel<kBlock, true>(s, len, n_tokens, budget, o, kp, tk); });
      launch("topk_compact_kernel<256>", grid, kBlock,
             [&] { kt::topk_compact_kernel<kBlock>(len, n_tokens, budget, kp, tk, o); });
    } else {
      launch("topk_rank_kernel<256, false>", grid, kBlock,
             [&] { kt::topk_rank_kernel<kBlock, false>(s, len, n_tokens, budget, o, nullptr, nullptr); });
    }
  }
}

// diversity_select_cuda: x [B, N, D] of `element` (0 float32, 1 float16, 2 bfloat16: raw 16-bit words), lengths [B]
// int64, out [B, k] int64. smem_optin: the GPU's opt-in shared memory per block (small values put the selection state
// in global memory); workspace_bytes: the chunking budget (kd::kWorkspaceBytes on a GPU).
void emu_diversity_select(const void* x, int element, const int64_t* lengths, int64_t batch, int64_t tokens,
                          int64_t dim, int64_t k, int mask_picked, int64_t smem_optin, int64_t workspace_bytes,
                          int64_t* out) {
  constexpr int kSelect = kd::kSelectThreads;
  if (batch == 0 || k == 0) return;
  std::memset(out, 0xff, static_cast<size_t>(batch * k) * sizeof(int64_t));
  const kd::Plan plan = kd::plan(batch, tokens, dim, smem_optin - kd::static_shared_bytes<kSelect>(), workspace_bytes);
  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  std::vector<float> norm_ws = garbage_floats(plan.chunk * cosine_workspace(element, tokens, dim));
  std::vector<float> sim = garbage_floats(plan.chunk * tokens * tokens);
  std::vector<float> first = garbage_floats(plan.chunk * tokens);
  const ks::Element kind = static_cast<ks::Element>(element);
  const bool vec = element != 0 ? half_vec(x, dim) : plan.vec4;
  std::vector<float> nearest;
  std::vector<uint8_t> picked;
  if (!plan.state_in_shared) {
    nearest = garbage_floats(plan.chunk * tokens);
    picked.assign(static_cast<size_t>(plan.chunk * tokens), 0xff);
  }
  float* nearest_ptr = plan.state_in_shared ? nullptr : nearest.data();
  uint8_t* picked_ptr = plan.state_in_shared ? nullptr : picked.data();
  const bool state_in_shared = plan.state_in_shared;
  for (int64_t b0 = 0; b0 < batch; b0 += plan.chunk) {
    const int64_t items = std::min(plan.chunk, batch - b0);
    const int64_t rows = items * tokens;
    const int64_t* len = lengths + b0;
    cosine_gram(kind, item_rows(x, element, b0, tokens, dim), len, items, n_tokens, n_dim, plan.tiles, vec,
                norm_ws.data(), sim.data());
    launch("first_score_kernel<256>", dim3(static_cast<unsigned>(ks::row_blocks(rows, kd::kScoreThreads))),
           kd::kScoreThreads,
           [&] { kd::first_score_kernel<kd::kScoreThreads>(sim.data(), len, rows, n_tokens, first.data()); });
    int64_t* o = out + b0 * k;
    const std::function<void()> select = [&] {
      kd::diversity_select_kernel<kSelect>(sim.data(), first.data(), len, n_tokens, static_cast<int>(k),
                                           mask_picked != 0, state_in_shared, nearest_ptr, picked_ptr, o);
    };
    cudaemu::launch("diversity_select_kernel<1024>", dim3(static_cast<unsigned>(items)), kSelect,
                    static_cast<size_t>(plan.dynamic_bytes), &kDiversityShared, false, 0, select);
  }
}

// greedy_residual_select_cuda: x [B, N, D] of `element` (as emu_diversity_select), lengths [B] int64, gate [B, N]
// float32 or null, seed [B] int64 or null, out_indices [B, k] int64, out_energies [B, k] float32. form: 0 auto, 1
// gram, 2 basis (rows). sms: the GPU's multiprocessors (co-resident selection blocks); smem_optin: its opt-in shared
// memory per block; workspace_bytes: the chunking budget (kg::kWorkspaceBytes on a GPU). Returns 0, or 1 when
// min(k, N) does not fit in shared memory (the launcher's error).
int emu_greedy_residual_select(const void* x, int element, const int64_t* lengths, int64_t batch, int64_t tokens,
                               int64_t dim, int64_t k, const float* gate, const int64_t* seed, double tol, int form,
                               int sms, int64_t smem_optin, int64_t workspace_bytes, int64_t* out_indices,
                               float* out_energies) {
  constexpr int kSelect = kg::kSelectThreads;
  if (batch == 0 || k == 0) return 0;
  std::memset(out_indices, 0xff, static_cast<size_t>(batch * k) * sizeof(int64_t));
  std::memset(out_energies, 0, static_cast<size_t>(batch * k) * sizeof(float));
  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  const ks::Element kind = static_cast<ks::Element>(element);

  std::vector<float> initial = garbage_floats(batch * tokens);
  squared_norms(kind, x, lengths, batch * tokens, n_tokens, n_dim, initial.data());

  const kg::Form forms[] = {kg::Form::kAuto, kg::Form::kGram, kg::Form::kRows};
  const kg::Plan plan = kg::plan(batch, tokens, k, forms[form], sms, workspace_bytes, element != 0);
  const int64_t dynamic_max = smem_optin - kg::static_shared_bytes<kSelect>();
  if (plan.pivot_bytes > dynamic_max) return 1;

  std::vector<float> gram = plan.use_gram ? garbage_floats(plan.chunk * tokens * tokens) : std::vector<float>();
  std::vector<float> factor(static_cast<size_t>(plan.chunk * tokens * plan.ldf));
  std::vector<float> energy = garbage_floats(plan.chunk * tokens);
  std::vector<uint8_t> picked(static_cast<size_t>(plan.chunk * tokens));
  std::vector<ks::Slot> slots(static_cast<size_t>(plan.slot_ints / 4));
  const bool vec_x = dim % (16 / element_bytes(element)) == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;

  for (int64_t b0 = 0; b0 < batch; b0 += plan.chunk) {
    const int64_t items = std::min(plan.chunk, batch - b0);
    const kg::ChunkPlan part = kg::plan_chunk(plan, n_tokens, items, dynamic_max);
    const void* xc = item_rows(x, element, b0, tokens, dim);
    const int64_t* len = lengths + b0;
    if (plan.use_gram) {
      const dim3 grid(static_cast<unsigned>(ks::gram_tiles(tokens)), static_cast<unsigned>(ks::gram_tiles(tokens)),
                      static_cast<unsigned>(items));
      launch_gram(kind, vec_x, grid, xc, len, n_tokens, n_dim, nullptr, gram.data());
    }
    std::fill(factor.begin(), factor.end(), 0.f);
    std::fill(picked.begin(), picked.end(), 0);
    std::fill(slots.begin(), slots.end(), ks::Slot{0.f, 0.f, 0, 0});

    kg::Params p{};
    p.x = xc;
    p.gram = plan.use_gram ? gram.data() : nullptr;
    p.initial = initial.data() + b0 * tokens;
    p.gate = gate != nullptr ? gate + b0 * tokens : nullptr;
    p.seed = seed != nullptr ? seed + b0 : nullptr;
    p.lengths = len;
    p.energy = energy.data();
    p.picked = picked.data();
    p.factor = factor.data();
    p.slots = slots.data();
    p.out_indices = out_indices + b0 * k;
    p.out_energies = out_energies + b0 * k;
    p.n_tokens = n_tokens;
    p.dim = n_dim;
    p.k = static_cast<int>(k);
    p.ldf = static_cast<int>(plan.ldf);
    p.blocks_per_item = part.blocks_per_item;
    p.cache_cols = static_cast<int>(part.cache_cols);
    p.cache_ld = static_cast<int>(part.cache_ld);
    p.tol = static_cast<float>(tol);
    p.vec_x = vec_x && element == 0;
    const std::function<void()> body = ks::with_element(kind, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return plan.use_gram ? std::function<void()>([&] { kg::greedy_select_kernel<kSelect, true>(p); })
                           : std::function<void()>([&] { kg::greedy_select_kernel<kSelect, false, T>(p); });
    });
    // One 512-thread block with large shared memory per SM: the co-residency limit of the cooperative launch.
    cudaemu::launch(plan.use_gram ? "greedy_select_kernel<512, gram>" : "greedy_select_kernel<512, rows>",
                    dim3(static_cast<unsigned>(items * part.blocks_per_item)), kSelect,
                    static_cast<size_t>(part.dynamic_bytes), &kGreedyShared, true, sms, body);
  }
  return 0;
}

// coverage_select_cuda: x [B, N, D] of `element` (as emu_diversity_select), lengths [B] int64, saliency [B, N]
// float32 or null, out [B, k] int64.
// smem_optin: the GPU's opt-in shared memory per block (small values put the selection state in global memory);
// workspace_bytes: the chunking budget (ks::kBlockWorkspaceBytes on a GPU).
void emu_coverage_select(const void* x, int element, const int64_t* lengths, int64_t batch, int64_t tokens,
                         int64_t dim, int64_t k, const float* saliency, double alpha, int64_t smem_optin,
                         int64_t workspace_bytes, int64_t* out) {
  constexpr int kSelect = kc::kSelectThreads;
  if (batch == 0 || k == 0) return;
  std::memset(out, 0xff, static_cast<size_t>(batch * k) * sizeof(int64_t));
  const kc::Plan plan = kc::plan(batch, tokens, dim, smem_optin - kc::static_shared_bytes<kSelect>(), workspace_bytes);
  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  std::vector<float> norm2 = garbage_floats(plan.chunk * tokens);
  std::vector<float> unit = garbage_floats(plan.chunk * cosine_workspace(element, tokens, dim));
  const ks::Element kind = static_cast<ks::Element>(element);
  std::vector<float> sim = garbage_floats(plan.chunk * tokens * tokens);
  std::vector<float> cur, weight;
  std::vector<uint8_t> picked;
  if (!plan.state_in_shared) {
    cur = garbage_floats(plan.chunk * tokens);
    weight = garbage_floats(plan.chunk * tokens);
    picked.assign(static_cast<size_t>(plan.chunk * tokens), 0xff);
  }
  float* cur_ptr = plan.state_in_shared ? nullptr : cur.data();
  float* weight_ptr = plan.state_in_shared ? nullptr : weight.data();
  uint8_t* picked_ptr = plan.state_in_shared ? nullptr : picked.data();
  const bool state_in_shared = plan.state_in_shared;
  const float alpha_f = static_cast<float>(alpha);
  for (int64_t b0 = 0; b0 < batch; b0 += plan.chunk) {
    const int64_t items = std::min(plan.chunk, batch - b0);
    const int64_t rows = items * tokens;
    const int64_t* len = lengths + b0;
    const void* xc = item_rows(x, element, b0, tokens, dim);
    squared_norms(kind, xc, len, rows, n_tokens, n_dim, norm2.data());
    cosine_gram(kind, xc, len, items, n_tokens, n_dim, plan.tiles, element != 0 ? half_vec(x, dim) : plan.vec4,
                unit.data(), sim.data());
    const float* sal = saliency != nullptr ? saliency + b0 * tokens : nullptr;
    int64_t* o = out + b0 * k;
    const std::function<void()> select = [&] {
      kc::coverage_select_kernel<kSelect>(sim.data(), norm2.data(), sal, alpha_f, len, n_tokens, static_cast<int>(k),
                                          state_in_shared, cur_ptr, weight_ptr, picked_ptr, o);
    };
    cudaemu::launch("coverage_select_kernel<1024>", dim3(static_cast<unsigned>(items)), kSelect,
                    static_cast<size_t>(plan.dynamic_bytes), &kCoverageShared, false, 0, select);
  }
}

// bipartite_dedup_cuda: x [B, N, D] of `element` (as emu_diversity_select), lengths [B] int64, out [B, k] int64.
// smem_optin and workspace_bytes as for emu_coverage_select.
void emu_bipartite_dedup(const void* x, int element, const int64_t* lengths, int64_t batch, int64_t tokens,
                         int64_t dim, int64_t k, int64_t per_round, int64_t smem_optin, int64_t workspace_bytes,
                         int64_t* out) {
  constexpr int kRounds = kb::kRoundThreads;
  if (batch == 0 || k == 0) return;
  std::memset(out, 0xff, static_cast<size_t>(batch * k) * sizeof(int64_t));
  const kb::Plan plan = kb::plan(batch, tokens, dim, smem_optin - kb::static_shared_bytes<kRounds>(), workspace_bytes);
  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  const int per_round_int = static_cast<int>(std::min<int64_t>(per_round, tokens));
  std::vector<float> unit = garbage_floats(plan.chunk * cosine_workspace(element, tokens, dim));
  const ks::Element kind = static_cast<ks::Element>(element);
  std::vector<float> sim = garbage_floats(plan.chunk * tokens * tokens);
  std::vector<int> order;
  std::vector<float> score;
  if (!plan.state_in_shared) {
    order.assign(static_cast<size_t>(plan.chunk * 2 * tokens), -1);
    score = garbage_floats(plan.chunk * tokens);
  }
  int* order_ptr = plan.state_in_shared ? nullptr : order.data();
  float* score_ptr = plan.state_in_shared ? nullptr : score.data();
  const bool state_in_shared = plan.state_in_shared;
  for (int64_t b0 = 0; b0 < batch; b0 += plan.chunk) {
    const int64_t items = std::min(plan.chunk, batch - b0);
    const int64_t* len = lengths + b0;
    cosine_gram(kind, item_rows(x, element, b0, tokens, dim), len, items, n_tokens, n_dim, plan.tiles,
                element != 0 ? half_vec(x, dim) : plan.vec4, unit.data(), sim.data());
    int64_t* o = out + b0 * k;
    const std::function<void()> rounds = [&] {
      kb::dedup_rounds_kernel<kRounds>(sim.data(), len, n_tokens, static_cast<int>(k), per_round_int, state_in_shared,
                                       order_ptr, score_ptr, o);
    };
    cudaemu::launch("dedup_rounds_kernel<1024>", dim3(static_cast<unsigned>(items)), kRounds,
                    static_cast<size_t>(plan.dynamic_bytes), &kDedupShared, false, 0, rounds);
  }
}

}  // extern "C"
