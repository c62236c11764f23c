// The host-side launch plan of a one-block-per-item selection over chunked FP32 cosine Grams (torch-free), shared by
// coverage_select and bipartite_dedup (kernels/coverage_select.cuh, kernels/bipartite_dedup.cuh) and their CPU
// emulation: per chunk of items, unit rows [chunk, N, D] (float32 features; half precision needs only [chunk, N]
// inverse norms, and the plan keeps the float32 sizing) and the Gram [chunk, N, N] (cuda/unit_gram.cuh), plus the
// selection kernel's per-token state in dynamic shared memory when it fits (else in global workspaces that count
// against the chunk).
#pragma once

#include <cstdint>

#include "mrprune/kernels/selection.cuh"

namespace mrprune::kernels::selection {

constexpr int64_t kBlockWorkspaceBytes = int64_t{1} << 30;
constexpr int64_t kMaxGridZ = 65535;

struct BlockPlan {
  bool state_in_shared;   // the selection state in dynamic shared memory (else global workspaces)
  int64_t state_bytes;    // N * state_per_token
  int64_t dynamic_bytes;  // of the selection kernel
  int64_t chunk;          // items per chunk (at least 1)
  int64_t tiles;          // Gram tiles per side
  bool vec4;              // gram_kernel<true> (the unit workspace is a fresh, aligned allocation)
};

// state_per_token: bytes of selection state per token; extra_per_token: bytes of other per-token workspaces (e.g.
// squared norms); dynamic_max: the opt-in shared memory per block minus the selection kernel's static shared memory.
inline BlockPlan block_plan(int64_t batch, int64_t tokens, int64_t dim, int64_t state_per_token,
                            int64_t extra_per_token, int64_t dynamic_max,
                            int64_t workspace_bytes = kBlockWorkspaceBytes) {
  BlockPlan p;
  p.state_bytes = tokens * state_per_token;
  p.state_in_shared = p.state_bytes <= dynamic_max;
  p.dynamic_bytes = p.state_in_shared ? p.state_bytes : 0;
  const int64_t per_item = tokens * tokens * 4 + tokens * dim * 4 + tokens * extra_per_token +
                           (p.state_in_shared ? 0 : p.state_bytes);
  int64_t chunk = workspace_bytes / (per_item > 1 ? per_item : 1);
  chunk = chunk < kMaxGridZ ? chunk : kMaxGridZ;
  chunk = chunk < batch ? chunk : batch;
  p.chunk = chunk > 1 ? chunk : 1;
  p.tiles = gram_tiles(tokens);
  p.vec4 = dim % 4 == 0;
  return p;
}

}  // namespace mrprune::kernels::selection
