// CUDA kernels of the attention sampler: two launches for the whole batch.
//
// 1. coordinates_kernel, one block per sample: the row and column max profiles of the bilinearly
//    upsampled map (evaluated on the fly, never materialised as S x S: on each source segment the
//    upsampled map is linear, so only the segment ends can hold a maximum), the power, the
//    normalisation, the clip-and-spread iterations (block reductions), the trapezoid cumulative
//    density (block scan) and its inversion at every output index (binary search). Output: the 1-D
//    coordinates gy, gx as a (2, n, out) tensor, a few kilobytes.
// 2. gather_kernel: grid_sample's bilinear align-corners gather for every output pixel, reading the
//    images through their strides (contiguous or channels-last) and accumulating in float32 (float64
//    for float64 images). The (n, out, out, 2) grid of the reference is never built.
// The backward pass (gather_backward_kernel) scatters the output gradient onto the image with
// atomicAdd, from the coordinates the forward pass computed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "sampler.h"
#include "sampler_math.h"

namespace tasn {
namespace {

constexpr int kCoordThreads = 1024;  // one block per sample; a multiple of 32
constexpr int kGatherX = 32;         // output columns per block (one warp: coalesced stores)
constexpr int kGatherY = 8;          // output rows per block
constexpr unsigned kFullMask = 0xffffffffu;

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Reduce two values over the block at once; every thread gets both results.
// `scratch` holds 64 values; the leading barrier also orders this call after the previous one.
template <typename T, typename Op>
__device__ __forceinline__ void block_reduce2(T& a, T& b, Op op, T* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    a = op(a, __shfl_xor_sync(kFullMask, a, off));
    b = op(b, __shfl_xor_sync(kFullMask, b, off));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = scratch[0];
  b = scratch[32];
  for (int k = 1; k < static_cast<int>(blockDim.x >> 5); ++k) {
    a = op(a, scratch[k]);
    b = op(b, scratch[32 + k]);
  }
}

// Exclusive prefix sums of two per-thread values, in thread order.
template <typename T>
__device__ __forceinline__ void block_exclusive_scan2(T& a, T& b, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T ia = a, ib = b;
  for (int off = 1; off < 32; off <<= 1) {
    const T ta = __shfl_up_sync(kFullMask, ia, off), tb = __shfl_up_sync(kFullMask, ib, off);
    if (lane >= off) {
      ia += ta;
      ib += tb;
    }
  }
  T ea = __shfl_up_sync(kFullMask, ia, 1), eb = __shfl_up_sync(kFullMask, ib, 1);
  if (lane == 0) ea = eb = T(0);
  __syncthreads();
  if (lane == 31) {
    scratch[warp] = ia;
    scratch[32 + warp] = ib;
  }
  __syncthreads();
  T pa = T(0), pb = T(0);
  for (int k = 0; k < warp; ++k) {
    pa += scratch[k];
    pb += scratch[32 + k];
  }
  a = pa + ea;
  b = pb + eb;
}

// Shared memory of coordinates_kernel: d (2S), c (2S) in acc_t, then the candidate positions.
template <typename acc_t>
size_t coordinates_smem(int size, int ncx, int ncy) {
  return 4 * static_cast<size_t>(size) * sizeof(acc_t) + static_cast<size_t>(ncx + ncy) * sizeof(int);
}

// ncx/ncy: number of stored candidate columns/rows; 0 means "every position" (the map is already
// S x S, or has at least S/2 samples along that axis, so the candidates would not be fewer).
template <typename acc_t>
__global__ void __launch_bounds__(kCoordThreads)
    coordinates_kernel(const acc_t* __restrict__ attention, int64_t n, int h, int w, int size, int out,
                       int ncx, int ncy, acc_t cap, int iters, acc_t power, acc_t* __restrict__ coords) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* d = reinterpret_cast<acc_t*>(smem);  // [0, S): dy, [S, 2S): dx
  acc_t* c = d + 2 * size;                    // cumulative densities, same layout
  int* cand = reinterpret_cast<int*>(c + 2 * size);  // [0, ncx): columns, then [ncx, ncx + ncy): rows
  __shared__ double scratch[64];  // reductions and scans run in float64, as torch's CPU sums/cumsum do

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t b = blockIdx.x;
  const acc_t* a = attention + b * h * w;
  const bool direct = h == size && w == size;
  const acc_t sh = align_corners_scale<acc_t>(h, size), sw = align_corners_scale<acc_t>(w, size);

  // Candidate positions: the two ends of each source segment.
  for (int k = tid; k < ncx; k += nthreads) cand[k] = segment_end(sw, size, w, k);
  for (int k = tid; k < ncy; k += nthreads) cand[ncx + k] = segment_end(sh, size, h, k);
  __syncthreads();

  // Steps 1-2: profiles py (max over columns, per row) and px (max over rows, per column), powered.
  const int nx = ncx ? ncx : size, ny = ncy ? ncy : size;
  for (int item = tid; item < 2 * size; item += nthreads) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    if (item < size) {
      const int i = item;
      const Tap<acc_t> ty = make_tap(sh, i, h);
      for (int k = 0; k < nx; ++k) {
        const int j = ncx ? cand[k] : k;
        const acc_t v = direct ? a[static_cast<int64_t>(i) * w + j] : upsampled(a, w, ty, make_tap(sw, j, w));
        m = nan_max(m, clamp_min0(v));
      }
    } else {
      const int j = item - size;
      const Tap<acc_t> tx = make_tap(sw, j, w);
      for (int k = 0; k < ny; ++k) {
        const int i = ncy ? cand[ncx + k] : k;
        const acc_t v = direct ? a[static_cast<int64_t>(i) * w + j] : upsampled(a, w, make_tap(sh, i, h), tx);
        m = nan_max(m, clamp_min0(v));
      }
    }
    d[item] = power_of(m, power);
  }
  __syncthreads();

  // Normalise each profile to sum 1 (uniform when the sum is not positive and finite), times out.
  const acc_t out_f = static_cast<acc_t>(out), size_f = static_cast<acc_t>(size);
  const acc_t uniform = static_cast<acc_t>(1.0 / size);
  double ty_wide = 0, tx_wide = 0;
  for (int i = tid; i < size; i += nthreads) {
    ty_wide += d[i];
    tx_wide += d[size + i];
  }
  block_reduce2(ty_wide, tx_wide, SumOp(), scratch);
  const acc_t ty_sum = static_cast<acc_t>(ty_wide), tx_sum = static_cast<acc_t>(tx_wide);
  const bool ok_y = isfinite(ty_sum) && ty_sum > acc_t(0), ok_x = isfinite(tx_sum) && tx_sum > acc_t(0);
  for (int i = tid; i < size; i += nthreads) {
    d[i] = (ok_y ? d[i] / ty_sum : uniform) * out_f;
    d[size + i] = (ok_x ? d[size + i] / tx_sum : uniform) * out_f;
  }

  // Step 3: clip at the smaller peak (and at `cap` the first time), spread the clipped mass evenly.
  // Each thread touches the same elements in every loop below, so only the reductions synchronise.
  for (int t = 0; t < iters; ++t) {
    double my = -std::numeric_limits<double>::infinity(), mx = my;
    for (int i = tid; i < size; i += nthreads) {
      my = my > d[i] ? my : d[i];
      mx = mx > d[size + i] ? mx : d[size + i];
    }
    block_reduce2(my, mx, MaxOp(), scratch);
    acc_t m = static_cast<acc_t>(my < mx ? my : mx);
    if (t == 0) m = m < cap ? m : cap;
    double sy = 0, sx = 0;
    for (int i = tid; i < size; i += nthreads) {
      d[i] = d[i] < m ? d[i] : m;
      d[size + i] = d[size + i] < m ? d[size + i] : m;
      sy += d[i];
      sx += d[size + i];
    }
    block_reduce2(sy, sx, SumOp(), scratch);
    const acc_t spread_y = (out_f - static_cast<acc_t>(sy)) / size_f;
    const acc_t spread_x = (out_f - static_cast<acc_t>(sx)) / size_f;
    for (int i = tid; i < size; i += nthreads) {
      d[i] = d[i] + spread_y;
      d[size + i] = d[size + i] + spread_x;
    }
  }
  __syncthreads();

  // Step 4: trapezoid cumulative density. Each thread sums a contiguous chunk of increments,
  // the chunk offsets come from a block scan, then each thread writes its chunk.
  const int chunk = (size - 1 + nthreads - 1) / nthreads;
  const int lo = 1 + tid * chunk, hi = min(size, lo + chunk);
  double oy = 0, ox = 0;
  for (int k = lo; k < hi; ++k) {
    oy += (d[k - 1] + d[k]) * acc_t(0.5);
    ox += (d[size + k - 1] + d[size + k]) * acc_t(0.5);
  }
  block_exclusive_scan2(oy, ox, scratch);
  for (int k = lo; k < hi; ++k) {
    oy += (d[k - 1] + d[k]) * acc_t(0.5);
    ox += (d[size + k - 1] + d[size + k]) * acc_t(0.5);
    c[k] = static_cast<acc_t>(oy);
    c[size + k] = static_cast<acc_t>(ox);
  }
  if (tid == 0) {
    c[0] = acc_t(0);
    c[size] = acc_t(0);
  }
  __syncthreads();

  // Step 5: invert at each output index.
  for (int o = tid; o < out; o += nthreads) {
    coords[b * out + o] = invert(c, size, o, out);
    coords[(n + b) * out + o] = invert(c + size, size, o, out);
  }
}

// One thread per output pixel (b, r, q), looping over channels: the weights are computed once.
// kChannels > 0 fixes the channel count at compile time (3 for images), so the loop unrolls and all
// its loads are in flight together; 0 reads `channels`.
template <typename scalar_t, typename opmath_t, int kChannels>
__global__ void __launch_bounds__(kGatherX* kGatherY)
    gather_kernel(const scalar_t* __restrict__ images, const opmath_t* __restrict__ coords,
                  scalar_t* __restrict__ output, int64_t n, int runtime_channels, int size, int out, int64_t sN,
                  int64_t sC, int64_t sH, int64_t sW) {
  const int channels = kChannels > 0 ? kChannels : runtime_channels;
  const int q = blockIdx.y * kGatherX + threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGatherY + threadIdx.y;
  if (q >= out || row >= n * out) return;
  const int64_t b = row / out;
  const int r = static_cast<int>(row - b * out);
  const auto k = corners<opmath_t>(coords[(n + b) * out + q], coords[b * out + r], size);
  const bool in_nw = in_bounds(k.y0, k.x0, size), in_ne = in_bounds(k.y0, k.x0 + 1, size);
  const bool in_sw = in_bounds(k.y0 + 1, k.x0, size), in_se = in_bounds(k.y0 + 1, k.x0 + 1, size);
  const int64_t o_nw = k.y0 * sH + k.x0 * sW;
  const scalar_t* p = images + b * sN;
  scalar_t* o = output + (b * channels * out + r) * out + q;
  const int64_t o_stride = static_cast<int64_t>(out) * out;
#pragma unroll 4
  for (int ch = 0; ch < channels; ++ch, p += sC, o += o_stride) {
    opmath_t acc = 0;
    if (in_nw) acc += static_cast<opmath_t>(p[o_nw]) * k.nw;
    if (in_ne) acc += static_cast<opmath_t>(p[o_nw + sW]) * k.ne;
    if (in_sw) acc += static_cast<opmath_t>(p[o_nw + sH]) * k.sw;
    if (in_se) acc += static_cast<opmath_t>(p[o_nw + sH + sW]) * k.se;
    *o = static_cast<scalar_t>(acc);
  }
}

// grad_in (n, C, S, S) contiguous in opmath_t, zero-initialised; grad_out (n, C, out, out) contiguous.
template <typename opmath_t>
__global__ void __launch_bounds__(kGatherX* kGatherY)
    gather_backward_kernel(const opmath_t* __restrict__ grad_out, const opmath_t* __restrict__ coords,
                           opmath_t* __restrict__ grad_in, int64_t n, int channels, int size, int out) {
  const int q = blockIdx.y * kGatherX + threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGatherY + threadIdx.y;
  if (q >= out || row >= n * out) return;
  const int64_t b = row / out;
  const int r = static_cast<int>(row - b * out);
  const auto k = corners<opmath_t>(coords[(n + b) * out + q], coords[b * out + r], size);
  const bool in_nw = in_bounds(k.y0, k.x0, size), in_ne = in_bounds(k.y0, k.x0 + 1, size);
  const bool in_sw = in_bounds(k.y0 + 1, k.x0, size), in_se = in_bounds(k.y0 + 1, k.x0 + 1, size);
  const int64_t plane = static_cast<int64_t>(size) * size, o_plane = static_cast<int64_t>(out) * out;
  const int64_t o_nw = static_cast<int64_t>(k.y0) * size + k.x0;
  opmath_t* g = grad_in + b * channels * plane;
  const opmath_t* go = grad_out + (b * channels * out + r) * out + q;
  for (int ch = 0; ch < channels; ++ch, g += plane, go += o_plane) {
    const opmath_t v = *go;
    if (in_nw) atomicAdd(g + o_nw, k.nw * v);
    if (in_ne) atomicAdd(g + o_nw + 1, k.ne * v);
    if (in_sw) atomicAdd(g + o_nw + size, k.sw * v);
    if (in_se) atomicAdd(g + o_nw + size + 1, k.se * v);
  }
}

dim3 gather_grid(int64_t n, int out) {
  const int64_t rows = (n * out + kGatherY - 1) / kGatherY;
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int>::max(), "tasn sampler: batch too large for one launch (",
                    n, " x ", out, " output rows)");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((out + kGatherX - 1) / kGatherX));
}

at::Tensor sampler_coordinates_cuda(const at::Tensor& attention, int64_t size, int64_t out_size, double dense,
                                    int64_t iters, double power) {
  check_coordinates_args(attention, size, out_size, dense, iters);
  const c10::cuda::CUDAGuard guard(attention.device());
  const auto a = attention.to(coordinate_dtype(attention.scalar_type())).contiguous();
  const int64_t n = a.size(0);
  const int h = a.size(1), w = a.size(2), S = size, out = out_size;
  auto coords = at::empty({2, n, out_size}, a.options());
  if (n == 0) return coords;
  const bool direct = h == S && w == S;
  const int ncx = (!direct && 2 * w < S) ? 2 * w : 0, ncy = (!direct && 2 * h < S) ? 2 * h : 0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tasn_sampler_coordinates_cuda", [&] {
    const size_t smem = coordinates_smem<scalar_t>(S, ncx, ncy);
    int device_max = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.get_device()));
    TORCH_CHECK_VALUE(smem + 64 * sizeof(scalar_t) <= static_cast<size_t>(device_max), "tasn sampler: image size ",
                      S, " needs ", smem, " bytes of shared memory per block for ", a.scalar_type(),
                      " coordinates; this device allows ", device_max, " (use the reference sampler)");
    auto kernel = coordinates_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(n), kCoordThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        a.const_data_ptr<scalar_t>(), n, h, w, S, out, ncx, ncy, static_cast<scalar_t>(dense * out_size / size),
        static_cast<int>(iters), static_cast<scalar_t>(power), coords.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return coords;
}

at::Tensor bilinear_gather_cuda(const at::Tensor& images, const at::Tensor& coords) {
  check_gather_args(images, coords);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t n = images.size(0), C = images.size(1), S = images.size(2), out = coords.size(2);
  auto output = at::empty({n, C, out, out}, images.options());
  if (output.numel() == 0) return output;
  const auto cc = coords.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "tasn_bilinear_gather_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto kernel = C == 3 ? gather_kernel<scalar_t, opmath_t, 3> : gather_kernel<scalar_t, opmath_t, 0>;
    kernel<<<gather_grid(n, out), dim3(kGatherX, kGatherY), 0, c10::cuda::getCurrentCUDAStream()>>>(
        images.const_data_ptr<scalar_t>(), cc.const_data_ptr<opmath_t>(), output.mutable_data_ptr<scalar_t>(), n,
        static_cast<int>(C), static_cast<int>(S), static_cast<int>(out), images.stride(0), images.stride(1),
        images.stride(2), images.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor bilinear_gather_backward_cuda(const at::Tensor& grad_out, const at::Tensor& coords, int64_t size,
                                         at::ScalarType dtype) {
  check_gather_backward_args(grad_out, coords, size, dtype);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t n = grad_out.size(0), C = grad_out.size(1), out = coords.size(2);
  const auto opmath = opmath_dtype(dtype);
  auto grad_in = at::zeros({n, C, size, size}, grad_out.options().dtype(opmath));
  if (grad_out.numel() == 0) return grad_in.to(dtype);
  const auto go = grad_out.to(opmath).contiguous();
  const auto cc = coords.contiguous();
  AT_DISPATCH_FLOATING_TYPES(opmath, "tasn_bilinear_gather_backward_cuda", [&] {
    gather_backward_kernel<scalar_t><<<gather_grid(n, out), dim3(kGatherX, kGatherY), 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
        go.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(), grad_in.mutable_data_ptr<scalar_t>(), n,
        static_cast<int>(C), static_cast<int>(size), static_cast<int>(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in.to(dtype);
}

}  // namespace
}  // namespace tasn

TORCH_LIBRARY_IMPL(tasn, CUDA, m) {
  m.impl("sampler_coordinates", &tasn::sampler_coordinates_cuda);
  m.impl("bilinear_gather", &tasn::bilinear_gather_cuda);
  m.impl("bilinear_gather_backward", &tasn::bilinear_gather_backward_cuda);
}
