// Per-element arithmetic of the attention sampler, shared by the CUDA kernels and the CPU kernels.
//
// Every formula here is written to match the PyTorch reference (tasn/model/sampler.py) operation by
// operation: ATen's bilinear upsampling with align_corners, torch.pow's special-cased exponents,
// torch.searchsorted's lower bound, and grid_sample's bilinear align-corners gather with zero
// padding. Keeping them in one header is what lets the CPU build of the op test the arithmetic
// that the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TASN_HD __host__ __device__ __forceinline__
#else
#define TASN_HD inline
#endif

namespace tasn {

using std::floor;
using std::pow;
using std::sqrt;

// One axis of ATen's upsample_bilinear2d (align_corners=True): source index i0, step to the next
// source index (0 at the last one) and the two weights.
template <typename acc_t>
struct Tap {
  int i0;
  int step;
  acc_t l0;
  acc_t l1;
};

template <typename acc_t>
TASN_HD acc_t align_corners_scale(int in_size, int out_size) {
  return out_size > 1 ? static_cast<acc_t>(in_size - 1) / (out_size - 1) : acc_t(0);
}

template <typename acc_t>
TASN_HD int source_index(acc_t scale, int dst) {
  return static_cast<int>(scale * static_cast<acc_t>(dst));
}

template <typename acc_t>
TASN_HD Tap<acc_t> make_tap(acc_t scale, int dst, int in_size) {
  const acc_t src = scale * static_cast<acc_t>(dst);
  Tap<acc_t> t;
  t.i0 = static_cast<int>(src);
  t.step = t.i0 < in_size - 1 ? 1 : 0;
  t.l1 = src - static_cast<acc_t>(t.i0);
  t.l0 = acc_t(1) - t.l1;
  return t;
}

// The upsampled map at one position, from the (h, w) row-major map `a`.
template <typename acc_t>
TASN_HD acc_t upsampled(const acc_t* a, int w, const Tap<acc_t>& ty, const Tap<acc_t>& tx) {
  const acc_t* r0 = a + static_cast<int64_t>(ty.i0) * w;
  const acc_t* r1 = r0 + static_cast<int64_t>(ty.step) * w;
  return ty.l0 * (tx.l0 * r0[tx.i0] + tx.l1 * r0[tx.i0 + tx.step]) +
         ty.l1 * (tx.l0 * r1[tx.i0] + tx.l1 * r1[tx.i0 + tx.step]);
}

// clamp_min(0) as torch does it: NaN stays NaN.
template <typename acc_t>
TASN_HD acc_t clamp_min0(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// max that propagates NaN, like torch.amax.
template <typename acc_t>
TASN_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// x ** p with the exponents torch.pow special-cases (2 and 3 are products, 0.5 a square root).
template <typename acc_t>
TASN_HD acc_t power_of(acc_t x, acc_t p) {
  if (p == acc_t(1)) return x;
  if (p == acc_t(2)) return x * x;
  if (p == acc_t(3)) return x * x * x;
  if (p == acc_t(0.5)) return sqrt(x);
  if (p == acc_t(0)) return acc_t(1);
  return pow(x, p);
}

// torch.searchsorted(side="left") on c[0..n): the first k with c[k] >= u (n if none).
template <typename acc_t>
TASN_HD int lower_bound(const acc_t* c, int n, acc_t u) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (!(c[mid] >= u)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The first destination index whose source segment is >= s (binary search; source_index is
// non-decreasing in dst). Segment s of the piecewise-linear upsampled map covers destinations
// [first(s), first(s + 1)); a linear function on it peaks at one of the two ends, so these ends
// are the only positions a max over the upsampled axis needs to look at.
template <typename acc_t>
TASN_HD int first_in_segment(acc_t scale, int size, int s) {
  int lo = 0, hi = size;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (source_index(scale, mid) < s) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Candidate position 2s / 2s+1 of an upsampled axis of length `size` from `len` source samples:
// the first and last destination of segment s, clamped into [0, size).
template <typename acc_t>
TASN_HD int segment_end(acc_t scale, int size, int len, int idx) {
  const int s = idx >> 1;
  int j = (idx & 1) ? (s + 1 < len ? first_in_segment(scale, size, s + 1) : size) - 1
                    : first_in_segment(scale, size, s);
  return j < 0 ? 0 : (j > size - 1 ? size - 1 : j);
}

// Steps 4-5 of the sampler for one output index: target u on the cumulative density c[0..size),
// inverted and normalised to [-1, 1], as tasn.model.sampler._coordinates computes it.
template <typename acc_t>
TASN_HD acc_t invert(const acc_t* c, int size, int o, int out_size) {
  const acc_t frac = static_cast<acc_t>(o) / static_cast<acc_t>(out_size - 1);
  const acc_t u = frac * c[size - 1];
  int k = lower_bound(c, size, u);
  k = k < 1 ? 1 : (k > size - 1 ? size - 1 : k);
  const acc_t lo = c[k - 1];
  const acc_t step = c[k] - lo;
  acc_t p = static_cast<acc_t>(k - 1) + (u - lo) / (step > acc_t(0) ? step : acc_t(1));
  if (!(u > acc_t(0))) p = acc_t(0);
  return acc_t(2) * p / static_cast<acc_t>(size - 1) - acc_t(1);
}

// grid_sample's bilinear corners and weights for one normalised coordinate pair (align_corners).
template <typename opmath_t>
struct Corners {
  int x0, y0;
  opmath_t nw, ne, sw, se;
};

template <typename opmath_t>
TASN_HD Corners<opmath_t> corners(opmath_t gx, opmath_t gy, int size) {
  const opmath_t ix = ((gx + opmath_t(1)) / 2) * (size - 1);
  const opmath_t iy = ((gy + opmath_t(1)) / 2) * (size - 1);
  Corners<opmath_t> k;
  k.x0 = static_cast<int>(floor(ix));
  k.y0 = static_cast<int>(floor(iy));
  const opmath_t x1 = static_cast<opmath_t>(k.x0 + 1), y1 = static_cast<opmath_t>(k.y0 + 1);
  const opmath_t x0 = static_cast<opmath_t>(k.x0), y0 = static_cast<opmath_t>(k.y0);
  k.nw = (x1 - ix) * (y1 - iy);
  k.ne = (ix - x0) * (y1 - iy);
  k.sw = (x1 - ix) * (iy - y0);
  k.se = (ix - x0) * (iy - y0);
  return k;
}

TASN_HD bool in_bounds(int y, int x, int size) {
  return y >= 0 && y < size && x >= 0 && x < size;
}

}  // namespace tasn
