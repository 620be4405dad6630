"""Multi-head self-attention that works under forward-mode AD.

No fused attention kernel has a forward-AD rule (SPEC §4). The JVP pass therefore runs one of
three implementations (``JVP_ATTENTION``, per module ``Attention.jvp_impl``, or
:func:`set_jvp_attention`):

- ``"math"`` (default): the explicit softmax, differentiated by PyTorch's own rules. It
  materialises the (N×N) scores, probabilities and their tangents for all queries at once.
- ``"chunked"``: :func:`attention_jvp`, an ``autograd.Function`` whose primal is the fused
  ``scaled_dot_product_attention`` and whose forward-AD rule is the online-softmax JVP of sCM,
  evaluated in query chunks so that only a (chunk×N) block of P and dS exists at a time:

      S = Q Kᵀ·s,  P = softmax(S),  O = P V
      dS = (dQ Kᵀ + Q dKᵀ)·s
      dO = P dV + (P∘dS) V − rowsum(P∘dS)∘O

  It works under ``torch.func.jvp`` and ``torch.autograd.forward_ad`` (and vmap, generated
  rule); its backward recomputes the attention with grad. Under ``torch.compile`` a custom
  Function's ``jvp`` can be dropped silently (JVP-NOTES): :func:`check_attention_jvp` compares
  it against the math path and is what tests and benchmarks call at start-up.
- ``"triton"``: :func:`meanflow.models.attention_triton.attention_jvp_triton`, the same
  Function structure (SDPA primal, recomputing backward) with a fused Triton kernel as the
  forward-AD rule: one launch streams over key blocks with an online softmax (fp32
  accumulators l, Σ e·v, Σ e·dv + Σ e·ds·v, Σ e·ds) and writes dO; P and dS never exist.
  Needs triton and a CUDA GPU (Triton's interpreter, ``TRITON_INTERPRET=1``, for CPU tests);
  head dims 16–128 (powers of two). triton is imported only when this implementation runs;
  :func:`check_attention_jvp` verifies it (``fn=attention_jvp_triton``, ``dim`` >= 16).

An ordinary forward with grad (no tangent) always uses the fused SDPA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanflow.models.layers import Linear, has_tangent, in_forward_ad_pass

__all__ = ["Attention", "has_tangent", "attention_jvp", "math_attention", "JVP_ATTENTION",
           "JVP_ATTENTION_IMPLS", "set_jvp_attention", "check_attention_jvp"]

JVP_ATTENTION_IMPLS = ("math", "chunked", "triton")
JVP_ATTENTION = "math"      # the module default for Attention.jvp_impl = None

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


class _AttentionJVPFn(torch.autograd.Function):
    """O = softmax(Q Kᵀ/√d) V through fused SDPA, with a chunked, exact forward-AD rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, chunk: int | None) -> Tensor:
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
        q, k, v, out = ctx.saved_tensors
        if q_t is None and k_t is None and v_t is None:
            return None
        scale = 1.0 / math.sqrt(q.shape[-1])
        kT = k.transpose(-2, -1)
        kT_t = k_t.transpose(-2, -1) if k_t is not None else None
        rows = _chunk_rows(q, k, ctx.chunk)
        pieces = []
        for start in range(0, q.shape[-2], rows):
            sl = slice(start, start + rows)
            qi = q[..., sl, :]
            p = ((qi @ kT) * scale).softmax(dim=-1)                   # (..., c, N)
            ds = None
            if q_t is not None:
                ds = q_t[..., sl, :] @ kT
            if kT_t is not None:
                term = qi @ kT_t
                ds = term if ds is None else ds.add_(term)
            d_out = None
            if ds is not None:
                pds = ds.mul_(p).mul_(scale)                           # P∘dS, in place
                d_out = pds @ v                                        # (..., c, d)
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
    return _AttentionJVPFn.apply(q, k, v, chunk)


def set_jvp_attention(net: nn.Module, impl: str | None) -> None:
    """Selects the JVP-pass attention of every :class:`Attention` in ``net`` (None: the module
    default ``JVP_ATTENTION``)."""
    if impl is not None and impl not in JVP_ATTENTION_IMPLS:
        raise ValueError(f"JVP attention {impl!r}: choose one of {', '.join(JVP_ATTENTION_IMPLS)}")
    if impl == "triton":
        from meanflow.models.attention_triton import triton_available
        if not triton_available():
            raise RuntimeError("JVP attention 'triton' needs triton, which is not importable here")
    for module in net.modules():
        if isinstance(module, Attention):
            module.jvp_impl = impl


def check_attention_jvp(fn: Any = None, tokens: int = 16, heads: int = 2, dim: int = 8,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tol: float | None = None) -> float:
    """Relative error of ``fn``'s (default :func:`attention_jvp`; pass a compiled wrapper to
    check compiled code) tangent against the math path's under ``torch.func.jvp``; raises
    RuntimeError above ``tol`` (default 1e-4 in fp32, 1e-10 in fp64, 2e-2 otherwise), which
    catches a ``jvp`` rule that was dropped (its tangent then is zero or missing)."""
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


class Attention(nn.Module):
    """Self-attention over tokens (B, N, D) with ``heads`` heads.

    mode -- "auto": fused SDPA unless a forward-mode tangent is present (the JVP passes), so
            the grad forward and sampling use the fused kernel; "math": always explicit.
    jvp_impl -- attention used when a tangent is present: "math", "chunked", "triton" (see the
            module docstring) or None for the module default ``JVP_ATTENTION``. Not a parameter or
            buffer: checkpoints are unaffected.
    """

    def __init__(self, width: int, heads: int, mode: str, jvp_impl: str | None = None) -> None:
        super().__init__()
        self.heads, self.mode, self.jvp_impl = heads, mode, jvp_impl
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 × (B, heads, N, d)
        compiling = torch.compiler.is_compiling()
        # while torch.compile traces, a dual tensor is not visible: objective.jvp's pass
        # counter says whether this is a JVP pass
        tangent = has_tangent(x) or has_tangent(q) or (compiling and in_forward_ad_pass())
        if self.mode == "math" or (tangent and compiling):
            # compiled code drops a custom Function's jvp rule (JVP-NOTES): the math path,
            # differentiated by PyTorch's own (traced) rules
            out = math_attention(q, k, v)                                # (B, heads, N, d)
        elif tangent:
            impl = self.jvp_impl or JVP_ATTENTION
            if impl == "chunked":
                out = attention_jvp(q, k, v)
            elif impl == "triton":
                from meanflow.models.attention_triton import attention_jvp_triton
                out = attention_jvp_triton(q, k, v)
            else:
                out = math_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))          # (B, N, D)
