"""Layers with forward-mode AD rules that cost no more than the math needs.

PyTorch's forward-AD rule for ``addmm`` multiplies the input by a *materialised zero* tangent
for the weights even when the weights carry none, so an eager JVP pays an extra GEMM per layer
(see README, Results, and ``benchmarks/step_cost.py``). :class:`Linear` computes the same
function through an ``autograd.Function`` whose ``jvp`` skips absent tangents: for an input
tangent ẋ it is just ẋ·Wᵀ. Values, gradients and tangents are those of ``torch.nn.Linear``.
:class:`Conv2d` does the same for convolutions, whose native rule costs up to three
convolutions per layer (JVP-NOTES) where one is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear", "Conv2d", "conv2d"]


class _LinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b with an explicit JVP rule that only multiplies the tangents that exist."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not as zeros
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None
        ctx.out_dtype = output.dtype  # differs from the inputs' under autocast

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        # Under autocast the incoming grad is low precision while x and the weight are not:
        # multiply in the grad's dtype (as autocast did forward), return each input's dtype.
        dtype = grad.dtype
        grad_x = (grad @ weight.to(dtype)).to(x.dtype) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = ((flat.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype)
                  if need_w else None)
        grad_b = flat.sum(0).to(weight.dtype) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_b

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None,
            bias_t: Tensor | None) -> Tensor | None:
        x, weight = ctx.saved_tensors
        terms = []
        if x_t is not None:
            terms.append(F.linear(x_t, weight))
        if weight_t is not None:
            terms.append(F.linear(x, weight_t))
        if bias_t is not None:
            terms.append(bias_t.expand(*x.shape[:-1], weight.shape[0]))
        if not terms:
            return None
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out.to(ctx.out_dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with the lean JVP rule of :class:`Linear`."""
    return _LinearFn.apply(x, weight, bias)


class Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose forward-mode AD skips the weights' zero tangent.

    The lean rule is used when grad mode is off: the no-grad JVP pass of the ``split``
    strategies, and sampling. With grad on (the training forward) this is plain ``F.linear``,
    whose native backward is faster than a Python ``autograd.Function``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


class _Conv2dFn(torch.autograd.Function):
    """2-D convolution with an explicit JVP rule that only convolves the tangents that exist."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple,
                dilation: tuple, groups: int) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.out_dtype = output.dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return (None,) * 7
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = grad.dtype
        grad_x = (torch.nn.grad.conv2d_input(x.shape, weight.to(dtype), grad, stride, padding,
                                             dilation, groups).to(x.dtype) if need_x else None)
        grad_w = (torch.nn.grad.conv2d_weight(x.to(dtype), weight.shape, grad, stride, padding,
                                              dilation, groups).to(weight.dtype)
                  if need_w else None)
        grad_b = grad.sum((0, 2, 3)).to(weight.dtype) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_b, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *_: Any) -> Tensor | None:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        out = None
        if x_t is not None:
            out = F.conv2d(x_t, weight, None, stride, padding, dilation, groups)
        if weight_t is not None:
            term = F.conv2d(x, weight_t, None, stride, padding, dilation, groups)
            out = term if out is None else out + term
        if bias_t is not None:
            term = bias_t[None, :, None, None]
            if out is None:
                out = term.expand(x.shape[0], -1, *_conv_out_hw(x, weight, ctx.geometry))
            else:
                out = out + term
        return None if out is None else out.to(ctx.out_dtype)


def _conv_out_hw(x: Tensor, weight: Tensor, geometry: tuple) -> tuple[int, int]:
    stride, padding, dilation, _ = geometry
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
                 // stride[i] + 1 for i in range(2))


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """``F.conv2d`` (numeric padding only) with the lean JVP rule of :class:`Conv2d`."""
    return _Conv2dFn.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation),
                           groups)


class Conv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (zero padding) whose forward-mode AD skips the weights' zero
    tangent when grad mode is off (the split strategies' JVP pass, sampling); with grad on it is
    the native convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("meanflow Conv2d supports numeric zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                      self.groups)
