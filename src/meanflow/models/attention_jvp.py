"""Softmax attention and its exact forward-mode rules, shared by ``attention`` (the module
backbones use) and ``attention_triton`` (the fused kernel), which import this module and not
each other.

- :func:`math_attention`: softmax(Q Kᵀ/√d) V with an explicit softmax, differentiated by
  PyTorch's own rules. It materialises the (N×N) scores, probabilities and their tangents for
  all queries at once.
- :func:`attention_jvp`: :class:`AttentionJVPFn`, an ``autograd.Function`` whose primal is the
  fused ``scaled_dot_product_attention`` and whose forward-AD rule is the online-softmax JVP,
  evaluated in query chunks so that only a (chunk×N) block of P and dS exists at a time::

      S = Q Kᵀ·s,  P = softmax(S),  O = P V
      dS = (dQ Kᵀ + Q dKᵀ)·s
      dO = P dV + (P∘dS) V − rowsum(P∘dS)∘O

  It works under ``torch.func.jvp`` and ``torch.autograd.forward_ad`` (and vmap, generated
  rule); its backward recomputes the attention with grad. ``attention_triton`` subclasses it
  and replaces only the ``jvp`` rule.
- :func:`check_attention_jvp`: a custom Function's ``jvp`` can be dropped silently under
  torch.compile (docs/design.md, torch.compile); this compares an implementation against the
  math path and is what tests and benchmarks call at start-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["math_attention", "AttentionJVPFn", "chunked_tangent", "attention_jvp",
           "check_attention_jvp", "CHUNK_ELEMENTS"]

# elements of one (chunk × N) block per batch·head, summed over batch·heads: chunks are sized
# so that the block stays under this many elements (64 MiB in fp32)
CHUNK_ELEMENTS = 1 << 24


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q Kᵀ / sqrt(d)) V with an explicit softmax: (..., N, d) -> (..., N, d)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])    # (..., N, N)
    return scores.softmax(dim=-1) @ v


def _chunk_rows(q: Tensor, k: Tensor, chunk: int | None) -> int:
    if chunk:
        return max(1, int(chunk))
    per_row = max(1, k.shape[-2] * (q.numel() // max(q.shape[-1] * q.shape[-2], 1)))
    return max(1, min(q.shape[-2], CHUNK_ELEMENTS // per_row))


class AttentionJVPFn(torch.autograd.Function):
    """O = softmax(Q Kᵀ/√d) V through fused SDPA, with a chunked, exact forward-AD rule.

    Inputs ``(q, k, v, chunk)``: q, k, v (..., N, d); ``chunk`` the query rows per block (None:
    as many as keep a block under ``CHUNK_ELEMENTS``). A subclass may pass another object as
    the last input (it is stored as ``ctx.chunk``) and override :meth:`jvp`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, chunk: Any) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        q, k, v, chunk = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)
        ctx.chunk = chunk

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple:
        if grad is None:
            return None, None, None, None
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves)
            grads = torch.autograd.grad(out, leaves, grad)
        return (*grads, None)

    @staticmethod
    def jvp(ctx: Any, q_t: Tensor | None, k_t: Tensor | None, v_t: Tensor | None,
            *_: Any) -> Tensor | None:
        return chunked_tangent(ctx, q_t, k_t, v_t, ctx.chunk)


def chunked_tangent(ctx: Any, q_t: Tensor | None, k_t: Tensor | None, v_t: Tensor | None,
                    chunk: int | None) -> Tensor | None:
    """The tangent dO of :class:`AttentionJVPFn` (the saved q, k, v, O of ``ctx``) along
    (q_t, k_t, v_t) (None: zero), by query blocks of ``chunk`` rows; None when all are None."""
    q, k, v, out = ctx.saved_tensors
    if q_t is None and k_t is None and v_t is None:
        return None
    scale = 1.0 / math.sqrt(q.shape[-1])
    kT = k.transpose(-2, -1)
    kT_t = k_t.transpose(-2, -1) if k_t is not None else None
    rows = _chunk_rows(q, k, chunk)
    pieces = []
    for start in range(0, q.shape[-2], rows):
        sl = slice(start, start + rows)
        qi = q[..., sl, :]
        p = ((qi @ kT) * scale).softmax(dim=-1)                       # (..., c, N)
        ds = None
        if q_t is not None:
            ds = q_t[..., sl, :] @ kT
        if kT_t is not None:
            term = qi @ kT_t
            ds = term if ds is None else ds.add_(term)
        d_out = None
        if ds is not None:
            pds = ds.mul_(p).mul_(scale)                               # P∘dS, in place
            d_out = pds @ v                                            # (..., c, d)
            d_out.addcmul_(pds.sum(-1, keepdim=True), out[..., sl, :], value=-1.0)
        if v_t is not None:
            term = p @ v_t
            d_out = term if d_out is None else d_out.add_(term)
        pieces.append(d_out)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, chunk: int | None = None) -> Tensor:
    """``scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) whose forward-mode AD
    is the chunked online-softmax JVP; ``chunk`` = query rows per block (default: as many as
    keep a block under ``CHUNK_ELEMENTS``)."""
    return AttentionJVPFn.apply(q, k, v, chunk)


def check_attention_jvp(fn: Any = None, tokens: int = 16, heads: int = 2, dim: int = 8,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tol: float | None = None) -> float:
    """Relative error of ``fn``'s (default :func:`attention_jvp`; pass a compiled wrapper to
    check compiled code) tangent against the math path's under ``torch.func.jvp``, for inputs
    (2, heads, tokens, dim); raises RuntimeError above ``tol`` (default 1e-4 in fp32, 1e-10 in
    fp64, 2e-2 otherwise), which catches a ``jvp`` rule that was dropped (its tangent then is
    zero or missing)."""
    fn = fn or attention_jvp
    g = torch.Generator().manual_seed(0)
    shape = (2, heads, tokens, dim)
    primals = [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
               for _ in range(3)]
    tangents = [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
                for _ in range(3)]
    with torch.no_grad():
        out, got = torch.func.jvp(fn, tuple(primals), tuple(tangents))
        ref_out, ref = torch.func.jvp(math_attention, tuple(primals), tuple(tangents))
    if got is None:
        raise RuntimeError("attention JVP returned no tangent (a dropped jvp rule?)")
    err = float((got - ref).double().norm() / ref.double().norm())
    err_out = float((out - ref_out).double().norm() / ref_out.double().norm())
    if tol is None:
        tol = {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 2e-2)
    if not (err <= tol and err_out <= tol):
        raise RuntimeError(f"attention JVP disagrees with the math path: tangent error "
                           f"{err:.2e}, output error {err_out:.2e} (tolerance {tol:g})")
    return err
