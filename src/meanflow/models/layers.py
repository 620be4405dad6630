"""Layers with forward-mode AD rules that cost no more than the math needs.

PyTorch's forward-AD rule for ``addmm`` multiplies the input by a *materialised zero* tangent
for the weights even when the weights carry none, so an eager JVP pays an extra GEMM per layer
(measured in docs/design.md, with ``benchmarks/step_cost.py``). :class:`Linear` computes the
same function through an ``autograd.Function`` whose ``jvp`` skips absent tangents: for an
input tangent ẋ it is just ẋ·Wᵀ. Values, gradients and tangents are those of
``torch.nn.Linear``. :class:`Conv2d` does the same for convolutions, whose native rule costs up
to three convolutions per layer where one is needed; :func:`group_norm` and :func:`layer_norm`
have exact rules of a few fused passes (:func:`rms_norm` too, for the iMF DiT);
:func:`dropout` has a one-multiply rule.

When each layer takes its lean path (:func:`meanflow.models.forward_mode.use_lean`), and why
they all step aside while torch.compile traces: see :mod:`meanflow.models.forward_mode`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanflow.models.forward_mode import has_tangent, use_lean

__all__ = ["Linear", "linear", "Conv2d", "conv2d", "group_norm", "layer_norm", "dropout",
           "rms_norm", "RMSNorm"]


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

    The lean rule is used when grad mode is off (the no-grad JVP pass of the ``split``
    strategies, and sampling) and when the input carries a forward-mode tangent (the joint
    ``func`` / ``forward_ad`` pass). A plain training forward is ``F.linear``, whose native
    backward is faster than a Python ``autograd.Function``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not use_lean(x):
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
    tangent when grad mode is off (the split strategies' JVP pass, sampling) or the input carries
    a tangent (the joint strategies); a plain training forward is the native convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("meanflow Conv2d supports numeric zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        if not use_lean(x):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                      self.groups)


class _GroupNormFn(torch.autograd.Function):
    """GroupNorm with a per-channel affine, ``y·w + b`` with y the group-normalised input,
    and a forward-AD rule of a few fused passes.

    For one group with n elements, y = (x − μ)·ρ (ρ = 1/σ) has the tangent
    ẏ = ρ·ẋ − ρ·mean(ẋ) − y·ρ·mean(y·ẋ): exact, no approximation. PyTorch's own rule for
    ``native_group_norm`` decomposes into about twenty kernels (docs/design.md); this one makes a
    sum, a batched dot product, y, and two ``addcmul`` per call. The output tangent is
    A·ẋ + C·y + B with per-(sample, channel) coefficients that fold the weight in.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> tuple:
        B, C = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, None, None, B, C, x.numel() // max(B * C, 1),
                                                groups, eps)
        shape = (1, C) + (1,) * (x.dim() - 2)
        return torch.addcmul(bias.view(shape), y, weight.view(shape)), mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, groups, eps = inputs
        _, mean, rstd = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.groups = groups

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Any) -> tuple:
        if grad is None:
            return (None,) * 5
        x, weight, mean, rstd = ctx.saved_tensors
        B, C = x.shape[:2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x, mean, rstd, weight, B, C, x.numel() // max(B * C, 1),
            ctx.groups, [need_x, need_w, need_b])
        return gx, gw, gb, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *_: Any) -> tuple:
        x, weight, mean, rstd = ctx.saved_tensors
        B, C, G = x.shape[0], x.shape[1], ctx.groups
        xg = x.reshape(B, G, -1)
        rho = rstd.reshape(B, G, 1)
        y = torch.addcmul(-mean.reshape(B, G, 1) * rho, xg, rho)       # (B, G, n) normalised
        out = None
        if x_t is not None:
            tg = x_t.reshape(B, G, -1)
            n = tg.shape[-1]
            s1 = tg.sum(-1, keepdim=True)                                # (B, G, 1)
            s2 = y.unsqueeze(-2) @ tg.unsqueeze(-1)                      # (B, G, 1, 1)
            a = rho                                                      # coefficient of ẋ
            b = -rho * s1 / n                                            # constant
            c = -rho * s2.squeeze(-1) / n                                # coefficient of y
            per = C // G

            def channels(coef: Tensor) -> Tensor:                        # (B, G, 1) -> (B, C, 1)
                return coef.expand(B, G, per).reshape(B, C, 1) * weight.reshape(1, C, 1)

            tc = x_t.reshape(B, C, -1)
            out = torch.addcmul(channels(b), tc, channels(a))
            out = out.addcmul_(y.reshape(B, C, -1), channels(c))
            out = out.reshape(x.shape)
        if weight_t is not None:
            shape = (1, C) + (1,) * (x.dim() - 2)
            term = y.reshape(x.shape) * weight_t.view(shape)
            out = term if out is None else out + term
        if bias_t is not None:
            shape = (1, C) + (1,) * (x.dim() - 2)
            term = bias_t.view(shape).expand(x.shape)
            out = term if out is None else out + term
        return out, None, None


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` with the lean forward-AD rule of
    :class:`_GroupNormFn` (affine included; weight and bias are required).

    ``x`` is made contiguous first: ``native_group_norm_backward`` reads a channels-last
    input (e.g. the sum of a transposed attention output and a feature map) as if it were
    contiguous and returns wrong gradients without an error."""
    return _GroupNormFn.apply(x.contiguous(), weight, bias, groups, eps)[0]


class _LayerNormFn(torch.autograd.Function):
    """LayerNorm over the last dimension without affine, y = (x − μ)·ρ (ρ = 1/σ), with the
    exact forward-AD rule ẏ = ρ·(ẋ − mean(ẋ)) − y·ρ·mean(y·ẋ): a mean, a dot product and two
    fused passes, where PyTorch's rule for ``native_layer_norm`` runs about twenty kernels."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, eps: float) -> tuple:
        return torch.native_layer_norm(x, x.shape[-1:], None, None, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, _ = inputs
        y, mean, rstd = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd)
        ctx.save_for_forward(y, rstd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Any) -> tuple:
        if grad is None:
            return None, None
        x, mean, rstd = ctx.saved_tensors
        gx, _, _ = torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), x, x.shape[-1:], mean, rstd, None, None, [True, False, False])
        return gx, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, *_: Any) -> tuple:
        if x_t is None:
            return None, None, None
        y, rstd = ctx.saved_tensors
        centred = x_t - x_t.mean(-1, keepdim=True)
        proj = (y * x_t).mean(-1, keepdim=True)                           # mean(y·ẋ)
        return torch.addcmul(centred, y, proj, value=-1.0).mul_(rstd), None, None


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """``F.layer_norm(x, x.shape[-1:], eps=eps)`` (no affine) with the lean forward-AD rule of
    :class:`_LayerNormFn`."""
    return _LayerNormFn.apply(x, eps)[0]


class _DropoutFn(torch.autograd.Function):
    """Inverted dropout that draws its mask exactly as CPU ``F.dropout`` does (``bernoulli_``
    on an empty tensor of the input's shape, divided by 1 − p), so that the split strategies'
    two passes still see the same mask, with a one-multiply forward-AD rule (the native
    composite rule adds several full-size temporaries)."""

    @staticmethod
    def forward(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
        noise = torch.empty_like(x).bernoulli_(1 - p)
        noise.div_(1 - p)
        return x * noise, noise

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Any) -> tuple:
        return (None if grad is None else grad * ctx.saved_tensors[0]), None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, *_: Any) -> tuple:
        return (None if x_t is None else x_t * ctx.saved_tensors[0]), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``; on CPU in the lean mode (no grad, or a tangent on ``x``)
    it runs :class:`_DropoutFn`, which consumes the RNG exactly as CPU ``F.dropout`` does.
    Elsewhere (CUDA's fused kernel draws differently) it is ``F.dropout`` itself."""
    if training and 0.0 < p < 1.0 and x.device.type == "cpu" and use_lean(x):
        return _DropoutFn.apply(x, p)[0]
    return F.dropout(x, p, training)


class _RMSNormFn(torch.autograd.Function):
    """RMS normalisation over the last dimension without a scale, y = x·ρ with
    ρ = 1/sqrt(mean(x²) + eps), and the exact forward-AD rule ẏ = ρ·(ẋ − y·mean(y·ẋ)): a dot
    product and one fused pass. The backward has the same form, ρ·(g − y·mean(y·g))."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, eps: float) -> tuple:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * rstd, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        y, rstd = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(y, rstd)
        ctx.save_for_forward(y, rstd)

    @staticmethod
    def _project(y: Tensor, rstd: Tensor, d: Tensor) -> Tensor:
        proj = (y * d).mean(-1, keepdim=True)                             # mean(y·d)
        return torch.addcmul(d, y, proj, value=-1.0).mul_(rstd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Any) -> tuple:
        if grad is None:
            return None, None
        y, rstd = ctx.saved_tensors
        return _RMSNormFn._project(y, rstd, grad), None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, *_: Any) -> tuple:
        if x_t is None:
            return None, None
        y, rstd = ctx.saved_tensors
        return _RMSNormFn._project(y, rstd, x_t), None


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x², last dim) + eps), no scale. Without grad or with a forward-mode
    tangent (outside autocast) it runs :class:`_RMSNormFn`, whose JVP is one projection; while
    torch.compile traces, or with a tangent under autocast, the same formula in plain tensor
    operations (PyTorch's own rules); otherwise (a plain training forward) ``F.rms_norm``."""
    if use_lean(x) and not torch.is_autocast_enabled(x.device.type):
        return _RMSNormFn.apply(x, eps)[0]
    if torch.compiler.is_compiling() or has_tangent(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return F.rms_norm(x, x.shape[-1:], eps=eps)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension (eps 1e-6) times a learned per-channel scale
    that starts at one."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps) * self.weight
