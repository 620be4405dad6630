"""Layers with forward-mode AD rules that cost no more than the math needs.

PyTorch's forward-AD rule for ``addmm`` multiplies the input by a *materialised zero* tangent
for the weights even when the weights carry none, so an eager JVP pays an extra GEMM per layer
(see README, Results, and ``benchmarks/step_cost.py``). :class:`Linear` computes the same
function through an ``autograd.Function`` whose ``jvp`` skips absent tangents: for an input
tangent ẋ it is just ẋ·Wᵀ. Values, gradients and tangents are those of ``torch.nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear"]


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
