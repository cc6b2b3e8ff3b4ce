"""Fake (meta) implementations and autograd formulas of the `tasn` ops.

The C++ library names this module (`set_python_module`), so torch imports it whenever it needs a fake
implementation, including for a library loaded ahead of time; `tasn.ops.load()` imports it too.
Importing it before the library is loaded fails: the ops it registers would not exist yet.

Autograd: no gradient to the attention (TASN detaches it: the coordinates are marked
non-differentiable); the gradient to the images goes back through the bilinear gather, from the
coordinates the forward pass computed.
"""

from __future__ import annotations

import torch


def _coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("tasn::sampler_coordinates")
def _sampler_coordinates_fake(attention, size, out_size, dense, iters, power):
    torch._check(attention.dim() == 3, lambda: f"attention must be (n, h, w), got {tuple(attention.shape)}")
    torch._check(out_size >= 2, lambda: f"out_size must be >= 2, got {out_size}")
    return attention.new_empty((2, attention.shape[0], out_size), dtype=_coordinate_dtype(attention.dtype))


@torch.library.register_fake("tasn::bilinear_gather")
def _bilinear_gather_fake(images, coords):
    torch._check(images.dim() == 4, lambda: f"images must be (n, C, S, S), got {tuple(images.shape)}")
    torch._check(coords.dim() == 3, lambda: f"coords must be (2, n, out), got {tuple(coords.shape)}")
    n, c, out = images.shape[0], images.shape[1], coords.shape[2]
    return images.new_empty((n, c, out, out))


@torch.library.register_fake("tasn::bilinear_gather_backward")
def _bilinear_gather_backward_fake(grad_out, coords, size, dtype):
    n, c = grad_out.shape[0], grad_out.shape[1]
    return grad_out.new_empty((n, c, size, size), dtype=dtype)


def _gather_setup_context(ctx, inputs, output):
    images, coords = inputs
    ctx.save_for_backward(coords)
    ctx.size = images.shape[-1]
    ctx.dtype = images.dtype


def _gather_backward(ctx, grad):
    (coords,) = ctx.saved_tensors
    grad_images = None
    if ctx.needs_input_grad[0]:
        grad_images = torch.ops.tasn.bilinear_gather_backward(grad, coords, ctx.size, ctx.dtype)
    return grad_images, None


def _coordinates_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _coordinates_backward(ctx, grad):
    return None, None, None, None, None, None


torch.library.register_autograd("tasn::bilinear_gather", _gather_backward, setup_context=_gather_setup_context)
torch.library.register_autograd(
    "tasn::sampler_coordinates", _coordinates_backward, setup_context=_coordinates_setup_context
)
