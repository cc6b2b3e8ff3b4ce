// Operator schemas of the `tasn` library, the composite `attention_sample`, and the CPU kernels.
//
// attention_sample = bilinear_gather(images, sampler_coordinates(attention)). It is a composite
// (CompositeImplicitAutograd) of two kernels so that the 1-D coordinates of the forward pass are
// what the backward pass reuses (they are an input of bilinear_gather, saved by its autograd
// formula) and so that torch.compile sees two ops with fake implementations instead of a graph
// break. The CPU kernels run the same per-element arithmetic as the CUDA kernels (sampler_math.h),
// serially per sample; they exist so that a machine without a GPU can test that arithmetic and the
// registrations (opcheck, torch.compile) against the PyTorch reference.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "sampler.h"
#include "sampler_math.h"

namespace tasn {

at::ScalarType coordinate_dtype(at::ScalarType attention_dtype) {
  return attention_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType opmath_dtype(at::ScalarType images_dtype) {
  return images_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_coordinates_args(const at::Tensor& attention, int64_t size, int64_t out_size, double dense,
                            int64_t iters) {
  TORCH_CHECK_VALUE(attention.dim() == 3, "tasn sampler: attention must be (n, h, w), got shape ",
                    attention.sizes());
  TORCH_CHECK_VALUE(attention.size(1) >= 1 && attention.size(2) >= 1,
                    "tasn sampler: attention maps must be at least 1x1, got ", attention.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(attention.scalar_type()),
                   "tasn sampler: attention must be a floating-point tensor, got ",
                   attention.scalar_type());
  TORCH_CHECK_VALUE(size >= 2, "tasn sampler: image size must be >= 2, got ", size);
  TORCH_CHECK_VALUE(out_size >= 2, "tasn sampler: out_size must be >= 2, got ", out_size);
  TORCH_CHECK_VALUE(size <= std::numeric_limits<int>::max() / 4 && out_size <= std::numeric_limits<int>::max() / 4 &&
                        attention.size(1) <= std::numeric_limits<int>::max() / 4 &&
                        attention.size(2) <= std::numeric_limits<int>::max() / 4,
                    "tasn sampler: sizes too large: image ", size, ", out ", out_size, ", map ",
                    attention.sizes());
  TORCH_CHECK_VALUE(dense > 0, "tasn sampler: dense must be > 0, got ", dense);
  TORCH_CHECK_VALUE(iters >= 1, "tasn sampler: iters must be >= 1, got ", iters);
}

static void check_coords(const at::Tensor& coords, int64_t n, at::ScalarType images_dtype) {
  TORCH_CHECK_VALUE(coords.dim() == 3 && coords.size(0) == 2 && coords.size(1) == n,
                    "tasn sampler: coords must be (2, n, out) with n = ", n, ", got shape ",
                    coords.sizes());
  TORCH_CHECK_VALUE(coords.size(2) >= 1, "tasn sampler: coords must hold at least one output index");
  TORCH_CHECK_TYPE(coords.scalar_type() == opmath_dtype(images_dtype), "tasn sampler: coords for ",
                   images_dtype, " images must be ", opmath_dtype(images_dtype), ", got ",
                   coords.scalar_type());
}

void check_gather_args(const at::Tensor& images, const at::Tensor& coords) {
  TORCH_CHECK_VALUE(images.dim() == 4, "tasn sampler: images must be (n, C, S, S), got shape ",
                    images.sizes());
  TORCH_CHECK_VALUE(images.size(2) == images.size(3), "tasn sampler: images must be square, got ",
                    images.size(2), "x", images.size(3));
  TORCH_CHECK_VALUE(images.size(2) >= 2, "tasn sampler: image size must be >= 2, got ", images.size(2));
  const auto t = images.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   "tasn sampler: images must be float32, float16, bfloat16 or float64, got ", t);
  TORCH_CHECK(images.device() == coords.device(), "tasn sampler: images on ", images.device(),
              " but coords on ", coords.device());
  check_coords(coords, images.size(0), t);
}

void check_gather_backward_args(const at::Tensor& grad_out, const at::Tensor& coords, int64_t size,
                                at::ScalarType dtype) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4, "tasn sampler: grad must be (n, C, out, out), got shape ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(size >= 2, "tasn sampler: image size must be >= 2, got ", size);
  check_coords(coords, grad_out.size(0), dtype);
  TORCH_CHECK_VALUE(grad_out.size(2) == coords.size(2) && grad_out.size(3) == coords.size(2),
                    "tasn sampler: grad of shape ", grad_out.sizes(), " does not match ",
                    coords.size(2), " output indices");
  TORCH_CHECK(grad_out.device() == coords.device(), "tasn sampler: grad on ", grad_out.device(),
              " but coords on ", coords.device());
}

namespace {

// ------------------------------------------------------------------------------------------------
// CPU kernels: one sample at a time, the same arithmetic as the CUDA kernels, serial reductions.
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
double wide_sum(const std::vector<acc_t>& v) {
  double s = 0;
  for (acc_t x : v) s += x;
  return s;
}

template <typename acc_t>
void coordinates_one(const acc_t* a, int h, int w, int size, int out, acc_t cap, int iters, acc_t power,
                     acc_t* gy, acc_t* gx) {
  const bool direct = h == size && w == size;
  const acc_t sh = align_corners_scale<acc_t>(h, size), sw = align_corners_scale<acc_t>(w, size);
  const int ncx = (!direct && 2 * w < size) ? 2 * w : size;  // candidate columns for py
  const int ncy = (!direct && 2 * h < size) ? 2 * h : size;  // candidate rows for px
  auto value = [&](int i, int j) {
    return clamp_min0(direct ? a[static_cast<int64_t>(i) * w + j]
                             : upsampled(a, w, make_tap(sh, i, h), make_tap(sw, j, w)));
  };
  std::vector<acc_t> d[2] = {std::vector<acc_t>(size), std::vector<acc_t>(size)};
  for (int i = 0; i < size; ++i) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int k = 0; k < ncx; ++k) m = nan_max(m, value(i, ncx == size ? k : segment_end(sw, size, w, k)));
    d[0][i] = power_of(m, power);
  }
  for (int j = 0; j < size; ++j) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int k = 0; k < ncy; ++k) m = nan_max(m, value(ncy == size ? k : segment_end(sh, size, h, k), j));
    d[1][j] = power_of(m, power);
  }
  const acc_t uniform = static_cast<acc_t>(1.0 / size);
  const acc_t out_f = static_cast<acc_t>(out), size_f = static_cast<acc_t>(size);
  for (auto& p : d) {  // sums and the cumulative sum run in float64, as torch's CPU sum and cumsum do
    const acc_t total = static_cast<acc_t>(wide_sum(p));
    const bool ok = std::isfinite(total) && total > 0;
    for (acc_t& v : p) v = (ok ? v / total : uniform) * out_f;
  }
  for (int t = 0; t < iters; ++t) {
    acc_t m = std::min(*std::max_element(d[0].begin(), d[0].end()), *std::max_element(d[1].begin(), d[1].end()));
    if (t == 0) m = std::min(m, cap);
    for (auto& p : d) {
      for (acc_t& v : p) v = std::min(v, m);
      const acc_t spread = (out_f - static_cast<acc_t>(wide_sum(p))) / size_f;
      for (acc_t& v : p) v = v + spread;
    }
  }
  std::vector<acc_t> c(size);
  acc_t* g[2] = {gy, gx};
  for (int axis = 0; axis < 2; ++axis) {
    double run = 0;
    c[0] = 0;
    for (int k = 1; k < size; ++k) c[k] = static_cast<acc_t>(run += (d[axis][k - 1] + d[axis][k]) * acc_t(0.5));
    for (int o = 0; o < out; ++o) g[axis][o] = invert(c.data(), size, o, out);
  }
}

at::Tensor sampler_coordinates_cpu(const at::Tensor& attention, int64_t size, int64_t out_size, double dense,
                                   int64_t iters, double power) {
  check_coordinates_args(attention, size, out_size, dense, iters);
  const auto acc = coordinate_dtype(attention.scalar_type());
  const auto a = attention.to(acc).contiguous();
  const int64_t n = a.size(0);
  const int h = a.size(1), w = a.size(2);
  auto coords = at::empty({2, n, out_size}, a.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "tasn_sampler_coordinates_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* cp = coords.mutable_data_ptr<scalar_t>();
    const auto cap = static_cast<scalar_t>(dense * out_size / size);
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        coordinates_one<scalar_t>(ap + b * h * w, h, w, size, out_size, cap, iters, static_cast<scalar_t>(power),
                                  cp + b * out_size, cp + (n + b) * out_size);
      }
    });
  });
  return coords;
}

at::Tensor bilinear_gather_cpu(const at::Tensor& images, const at::Tensor& coords) {
  check_gather_args(images, coords);
  const int64_t n = images.size(0), C = images.size(1), S = images.size(2), out = coords.size(2);
  auto output = at::empty({n, C, out, out}, images.options());
  const auto cc = coords.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "tasn_bilinear_gather_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* in = images.const_data_ptr<scalar_t>();
    scalar_t* o = output.mutable_data_ptr<scalar_t>();
    const opmath_t* g = cc.const_data_ptr<opmath_t>();
    const int64_t sN = images.stride(0), sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t r = 0; r < out; ++r) {
          for (int64_t q = 0; q < out; ++q) {
            const auto k = corners<opmath_t>(g[(n + b) * out + q], g[b * out + r], S);
            for (int64_t ch = 0; ch < C; ++ch) {
              const scalar_t* p = in + b * sN + ch * sC;
              opmath_t acc = 0;
              if (in_bounds(k.y0, k.x0, S)) acc += static_cast<opmath_t>(p[k.y0 * sH + k.x0 * sW]) * k.nw;
              if (in_bounds(k.y0, k.x0 + 1, S)) acc += static_cast<opmath_t>(p[k.y0 * sH + (k.x0 + 1) * sW]) * k.ne;
              if (in_bounds(k.y0 + 1, k.x0, S)) acc += static_cast<opmath_t>(p[(k.y0 + 1) * sH + k.x0 * sW]) * k.sw;
              if (in_bounds(k.y0 + 1, k.x0 + 1, S))
                acc += static_cast<opmath_t>(p[(k.y0 + 1) * sH + (k.x0 + 1) * sW]) * k.se;
              o[((b * C + ch) * out + r) * out + q] = static_cast<scalar_t>(acc);
            }
          }
        }
      }
    });
  });
  return output;
}

at::Tensor bilinear_gather_backward_cpu(const at::Tensor& grad_out, const at::Tensor& coords, int64_t size,
                                        at::ScalarType dtype) {
  check_gather_backward_args(grad_out, coords, size, dtype);
  const int64_t n = grad_out.size(0), C = grad_out.size(1), out = coords.size(2), S = size;
  const auto opmath = opmath_dtype(dtype);
  auto grad_in = at::zeros({n, C, S, S}, grad_out.options().dtype(opmath));
  const auto go = grad_out.to(opmath).contiguous();
  const auto cc = coords.contiguous();
  AT_DISPATCH_FLOATING_TYPES(opmath, "tasn_bilinear_gather_backward_cpu", [&] {
    const scalar_t* g = cc.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t r = 0; r < out; ++r) {
          for (int64_t q = 0; q < out; ++q) {
            const auto k = corners<scalar_t>(g[(n + b) * out + q], g[b * out + r], S);
            for (int64_t ch = 0; ch < C; ++ch) {
              const scalar_t v = gop[((b * C + ch) * out + r) * out + q];
              scalar_t* p = gi + (b * C + ch) * S * S;
              if (in_bounds(k.y0, k.x0, S)) p[k.y0 * S + k.x0] += k.nw * v;
              if (in_bounds(k.y0, k.x0 + 1, S)) p[k.y0 * S + k.x0 + 1] += k.ne * v;
              if (in_bounds(k.y0 + 1, k.x0, S)) p[(k.y0 + 1) * S + k.x0] += k.sw * v;
              if (in_bounds(k.y0 + 1, k.x0 + 1, S)) p[(k.y0 + 1) * S + k.x0 + 1] += k.se * v;
            }
          }
        }
      }
    });
  });
  return grad_in.to(dtype);
}

// ------------------------------------------------------------------------------------------------
// The composite: checks, then the two kernels through the dispatcher (so autograd, fake tensors and
// the CUDA/CPU choice all apply to each).
// ------------------------------------------------------------------------------------------------
at::Tensor attention_sample(const at::Tensor& images, const at::Tensor& attention, int64_t out_size, double dense,
                            int64_t iters, double power) {
  TORCH_CHECK_VALUE(images.dim() == 4, "tasn sampler: images must be (n, C, S, S), got shape ", images.sizes());
  TORCH_CHECK_VALUE(images.size(2) == images.size(3), "tasn sampler: images must be square, got ",
                    images.size(2), "x", images.size(3), " (crop or pad to S x S before sampling)");
  TORCH_CHECK_VALUE(attention.dim() == 3 && attention.size(0) == images.size(0),
                    "tasn sampler: attention must be (n, h, w) with n = ", images.size(0), ", got shape ",
                    attention.sizes());
  TORCH_CHECK(images.device() == attention.device(), "tasn sampler: images on ", images.device(),
              " but attention on ", attention.device());
  static auto coordinates_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("tasn::sampler_coordinates", "")
                                   .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, double, int64_t, double)>();
  static auto gather_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("tasn::bilinear_gather", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const auto coords =
      coordinates_op.call(attention.detach(), images.size(3), out_size, dense, iters, power);
  return gather_op.call(images, coords.to(opmath_dtype(images.scalar_type())));
}

}  // namespace

}  // namespace tasn

TORCH_LIBRARY(tasn, m) {
  // Fake (meta) implementations and autograd formulas live in this Python module; torch imports it
  // when it needs them, so a library loaded ahead of time still traces under torch.compile.
  m.set_python_module("tasn.ops._registrations");
  m.def("sampler_coordinates(Tensor attention, int size, int out_size, float dense, int iters, float power) -> Tensor");
  m.def("bilinear_gather(Tensor images, Tensor coords) -> Tensor");
  m.def("bilinear_gather_backward(Tensor grad_out, Tensor coords, int size, ScalarType dtype) -> Tensor");
  m.def("attention_sample(Tensor images, Tensor attention, int out_size, float dense, int iters, float power) -> Tensor");
}

TORCH_LIBRARY_IMPL(tasn, CPU, m) {
  m.impl("sampler_coordinates", &tasn::sampler_coordinates_cpu);
  m.impl("bilinear_gather", &tasn::bilinear_gather_cpu);
  m.impl("bilinear_gather_backward", &tasn::bilinear_gather_backward_cpu);
}

TORCH_LIBRARY_IMPL(tasn, CompositeImplicitAutograd, m) {
  m.impl("attention_sample", &tasn::attention_sample);
}
