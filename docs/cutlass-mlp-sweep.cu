// The dense MLP's two GELU steps as CUTLASS (Hopper, sm_90a) GEMM epilogues, for docs/cutlass-mlp-sweep.py.
// Not part of tinylm: a measurement of whether fusing the GELU into the matrix products would pay.
//
//   forward:  h = x @ W1^T + b1 (stored, bf16), g = gelu(h)            one GEMM, epilogue bias + GELU + aux store
//   backward: dh = (dy @ W2) * gelu'(h), column sums of dh per row tile one GEMM, epilogue aux load + GELU' + sums
//
// Rounding follows autocast's unfused path: gelu of h rounded to bf16, gelu' applied to dy @ W2 rounded
// to bf16, the sums taken over fp32 dh. -DVARIANT picks the tile shape and kernel schedule (table below).
// Entry points are extern "C" (ctypes, no torch headers); each returns 0 or a CUTLASS/CUDA status code.
#include <cuda_runtime.h>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
using bf16 = cutlass::bfloat16_t;

#ifndef VARIANT
#define VARIANT 0
#endif

// Epilogue functors: Sm90Compute applies them to fragments, T = cutlass::Array<float, N>.
// gelu(z) for z rounded to bf16 first (z is what autocast's linear would have stored); exact erf GELU.
template <class T> struct GeluOfRounded {
  CUTLASS_HOST_DEVICE T operator()(T const& z) const {
    T y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
      float x = float(bf16(z[i]));
      y[i] = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
    return y;
  }
};

// dh = da * gelu'(h), da rounded to bf16 first (the product autocast would have stored)
template <class T> struct DGeluOfRounded {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& h) const {
    T y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
      float g = float(bf16(acc[i]));
      float x = h[i];
      float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
      float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
      y[i] = g * (cdf + x * pdf);
    }
    return y;
  }
};

// Tile (M x N x K per CTA) and schedule. Cooperative: two consumer warpgroups share one tile, so the
// epilogue runs between tiles; pingpong: each warpgroup owns a tile and its epilogue overlaps the
// other's products. Variant 6 pairs CTAs in clusters of two along M.
//            variant:  0    1    2    3    4    5    6
constexpr int kTileM[] = {128,  64, 128, 128,  64, 256, 128};
constexpr int kTileN[] = {128, 128, 128, 256, 256, 128, 256};
constexpr bool kPingpong = VARIANT == 1 || VARIANT == 2 || VARIANT == 4;
using TileMNK = Shape<Int<kTileM[VARIANT]>, Int<kTileN[VARIANT]>, _64>;
using Cluster = Shape<Int<VARIANT == 6 ? 2 : 1>, _1, _1>;
using KSched = cute::conditional_t<kPingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                   cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
using ESched = cute::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                                   cutlass::epilogue::TmaWarpSpecializedCooperative>;
using RowMajor = cutlass::layout::RowMajor;
using ColMajor = cutlass::layout::ColumnMajor;
constexpr int kAlign = 8;
constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;

// One GEMM, A (M x K) row-major, D (M x N) row-major bf16, with the given epilogue fusion (an operation
// from cutlass/epilogue/fusion/operations.hpp or an epilogue visitor tree).
template <class Fusion, class LayoutB>
struct MlpGemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileMNK, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, RowMajor, kAlign, bf16, RowMajor, kAlign, ESched, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf16, RowMajor, kAlign, bf16, LayoutB, kAlign, float,
      TileMNK, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // D = A @ B^T for packed operands; the caller fills in the epilogue's own arguments.
  static typename Gemm::Arguments arguments(const void* a, const void* b, void* d, int M, int N, int K) {
    auto sA = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
    auto sB = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
    auto sD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));
    return {cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
            {static_cast<const bf16*>(a), sA, static_cast<const bf16*>(b), sB},
            {{}, nullptr, sD, static_cast<bf16*>(d), sD}};
  }
};

// ---- forward: h = x @ W1^T + b (bf16, aux), g = gelu(h); W1 is (N x K) row-major = column-major B ----
using FwdFusion = cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<
    RowMajor, GeluOfRounded, bf16, float, bf16, bf16, bf16, float>;
using Fwd = MlpGemm<FwdFusion, ColMajor>;
using FwdGemm = Fwd::Gemm;

// ---- backward: dh = (dy @ W2) * gelu'(h); column sums of dh per row tile; W2 is (K x N) row-major ----
namespace fu = cutlass::epilogue::fusion;
using DGelu = fu::Sm90EVT<fu::Sm90Compute<DGeluOfRounded, float, float, RN>,
                          fu::Sm90AccFetch,
                          fu::Sm90AuxLoad<0, void, bf16, RowMajor, void, void, kAlign, false>>;
using ColSums = fu::Sm90RowReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileMNK, float, float, RN,
                                     Stride<_0, _1, _0>, 4, false, false>;
using BwdEVT = fu::Sm90EVT<fu::Sm90Compute<cutlass::epilogue::thread::Identity, bf16, float, RN>,
                           fu::Sm90EVT<ColSums, DGelu>>;
using Bwd = MlpGemm<BwdEVT, RowMajor>;
using BwdGemm = Bwd::Gemm;

// h may be null (no aux store: the evaluation forward).
static FwdGemm::Arguments fwd_args(const void* x, const void* w, const void* bias, void* h, void* g,
                                   int M, int N, int K) {
  auto a = Fwd::arguments(x, w, g, M, N, K);
  auto& t = a.epilogue.thread;
  t.alpha = 1.0f;
  t.beta = 0.0f;
  t.bias_ptr = static_cast<const bf16*>(bias);
  t.aux_ptr = static_cast<bf16*>(h);
  t.dAux = cutlass::make_cute_packed_stride(decltype(t.dAux){}, make_shape(M, N, 1));
  return a;
}

static BwdGemm::Arguments bwd_args(const void* dy, const void* w2, const void* h, void* dh, float* part,
                                   int M, int N, int K) {
  auto a = Bwd::arguments(dy, w2, dh, M, N, K);
  auto sAux = cutlass::make_cute_packed_stride(cutlass::gemm::TagToStrideC_t<RowMajor>{}, make_shape(M, N, 1));
  // EVT arguments nest like the tree: ((acc, aux h, gelu'), column sums), identity
  a.epilogue.thread = {{{{}, {static_cast<const bf16*>(h), bf16(0), sAux}, {}}, {part, 0.0f, {}}}, {}};
  return a;
}

// 0, or where it failed: 1000 + cutlass::Status from can_implement, 2000 + from initialize, 3000 + from
// run, 4000 + cudaError_t after the launch, 5000 when the workspace given is too small.
template <class Gemm, class Args>
static int launch(Args const& args, void* ws, size_t ws_bytes, cudaStream_t s) {
  Gemm gemm;
  if (Gemm::get_workspace_size(args) > ws_bytes) return 5000;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return 1000 + int(st);
  st = gemm.initialize(args, ws, s);
  if (st != cutlass::Status::kSuccess) return 2000 + int(st);
  st = gemm.run(s);
  if (st != cutlass::Status::kSuccess) return 3000 + int(st);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : 4000 + int(e);
}

extern "C" {
int tinylm_tile_m() { return int(size<0>(TileMNK{})); }
int tinylm_tile_n() { return int(size<1>(TileMNK{})); }
size_t tinylm_fc_gelu_fwd_workspace(int M, int N, int K) {
  return FwdGemm::get_workspace_size(fwd_args(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K));
}
size_t tinylm_fc_dgelu_bwd_workspace(int M, int N, int K) {
  return BwdGemm::get_workspace_size(bwd_args(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K));
}
int tinylm_fc_gelu_fwd(const void* x, const void* w, const void* bias, void* h, void* g, int M, int N, int K,
                       void* ws, size_t ws_bytes, cudaStream_t s) {
  return launch<FwdGemm>(fwd_args(x, w, bias, h, g, M, N, K), ws, ws_bytes, s);
}
int tinylm_fc_dgelu_bwd(const void* dy, const void* w2, const void* h, void* dh, float* part, int M, int N, int K,
                        void* ws, size_t ws_bytes, cudaStream_t s) {
  return launch<BwdGemm>(bwd_args(dy, w2, h, dh, part, M, N, K), ws, ws_bytes, s);
}
}
