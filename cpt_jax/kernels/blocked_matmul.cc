// y = x @ [W_0 | W_1 | ...] in float32: x [M, K]; each W_i [K, N_i] stored as column blocks
// [N_i / 32, K, 32], which a step reads front to back; y [M, sum N_i]. One register tile is
// 8 rows x 32 columns, so a block's weights are read once per 8 rows. The column blocks of all
// W_i are shared out over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kCols = 32;
constexpr int64_t kRows = 8;
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));

inline f32x16 load(const float* p) { f32x16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// y[0:R, 0:32] = x[0:R, :] @ w, w one column block [K, 32].
template <int R>
void tile(const float* x, const float* w, float* y, int64_t k_dim, int64_t y_stride) {
  f32x16 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = f32x16{};
  for (int64_t k = 0; k < k_dim; ++k, w += kCols) {
    const f32x16 w_lo = load(w), w_hi = load(w + 16);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * k_dim + k];
      lo[r] += s * w_lo;
      hi[r] += s * w_hi;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(y + r * y_stride, lo[r]);
    store(y + r * y_stride + 16, hi[r]);
  }
}

using Tile = void (*)(const float*, const float*, float*, int64_t, int64_t);
constexpr Tile kTiles[kRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,
                                    tile<5>, tile<6>, tile<7>, tile<8>};

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// The caller and helpers on the thread pool claim column blocks one at a time; the caller
// returns once every block is written. A helper that starts late finds none left.
struct Work {
  const float* x;
  float* y;
  int64_t m_dim, k_dim, y_stride, blocks;
  std::vector<const float*> block_weights;  // [blocks]: each block's [K, 32] weights
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) {
      for (int64_t m = 0; m < m_dim; m += kRows) {
        kTiles[std::min(kRows, m_dim - m)](x + m * k_dim, block_weights[b],
                                           y + m * y_stride + b * kCols, k_dim, y_stride);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error BlockedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs kernels,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("blocked_matmul: x must be [M, K]");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->y = y->typed_data();
  work->m_dim = x_dims[0];
  work->k_dim = x_dims[1];
  for (size_t i = 0; i < kernels.size(); ++i) {
    auto kernel = kernels.get<ffi::Buffer<ffi::F32>>(i);
    if (!kernel.has_value()) return kernel.error();
    const auto dims = kernel->dimensions();
    if (dims.size() != 3 || dims[1] != work->k_dim || dims[2] != kCols)
      return ffi::Error::InvalidArgument("blocked_matmul: kernels must be [N / 32, K, 32]");
    for (int64_t b = 0; b < dims[0]; ++b)
      work->block_weights.push_back(kernel->typed_data() + b * work->k_dim * kCols);
  }
  work->blocks = static_cast<int64_t>(work->block_weights.size());
  work->y_stride = work->blocks * kCols;
  if (y->dimensions().size() != 2 || y->dimensions()[0] != work->m_dim ||
      y->dimensions()[1] != work->y_stride)
    return ffi::Error::InvalidArgument("blocked_matmul: y must be [M, 32 * blocks]");
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->blocks) relax();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cpt_blocked_matmul, BlockedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
