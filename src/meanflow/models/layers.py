"""Layers with forward-mode AD rules that cost no more than the math needs.

PyTorch's forward-AD rule for ``addmm`` multiplies the input by a *materialised zero* tangent
for the weights even when the weights carry none, so an eager JVP pays an extra GEMM per layer
(see README, Results, and ``benchmarks/step_cost.py``). :class:`Linear` computes the same
function through an ``autograd.Function`` whose ``jvp`` skips absent tangents: for an input
tangent ẋ it is just ẋ·Wᵀ. Values and gradients are those of ``torch.nn.Linear``.
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

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad @ weight if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = flat.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        grad_b = flat.sum(0) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_b

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None,
            bias_t: Tensor | None) -> Tensor | None:
        x, weight = ctx.saved_tensors
        out = F.linear(x_t, weight) if x_t is not None else None
        if weight_t is not None:
            term = F.linear(x, weight_t)
            out = term if out is None else out + term
        if bias_t is not None:
            out = bias_t.expand_as(out) if out is None else out + bias_t
        return out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with the lean JVP rule of :class:`Linear`."""
    return _LinearFn.apply(x, weight, bias)


class Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose forward-mode AD skips the weights' zero tangent."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
