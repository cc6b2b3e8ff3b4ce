// Checks and dtype rules shared by the CPU kernels and registrations (ops.cpp) and the CUDA kernels
// (sampler_cuda.cu), so that both backends reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

namespace tasn {

// The dtype the sampling coordinates are computed in: float64 for float64 maps, float32 otherwise
// (as tasn.model.sampler.sampler_coordinates does).
at::ScalarType coordinate_dtype(at::ScalarType attention_dtype);

// The dtype the bilinear gather computes in: float64 for float64 images, float32 otherwise
// (the reference samples half types in float32 and casts the result back).
at::ScalarType opmath_dtype(at::ScalarType images_dtype);

// Argument checks that name the offending value; each kernel calls the one for its op.
void check_coordinates_args(const at::Tensor& attention, int64_t size, int64_t out_size, double dense,
                            int64_t iters);
void check_gather_args(const at::Tensor& images, const at::Tensor& coords);
void check_gather_backward_args(const at::Tensor& grad_out, const at::Tensor& coords, int64_t size,
                                at::ScalarType dtype);

}  // namespace tasn
