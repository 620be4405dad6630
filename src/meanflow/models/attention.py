"""Multi-head self-attention that works under forward-mode AD.

No fused attention kernel has a forward-AD rule (docs/design.md, lean forward-mode rules). An
ordinary forward (the grad pass, guidance, sampling) uses the fused
``scaled_dot_product_attention``; when a forward-mode tangent is present (the JVP pass, see
:mod:`meanflow.models.forward_mode`) :class:`Attention` runs one of three JVP implementations,
chosen per module (``Attention.jvp_impl``, :func:`set_jvp_attention`) with the module default
``JVP_ATTENTION``:

- ``"math"`` (default): :func:`~meanflow.models.attention_jvp.math_attention`, the explicit
  softmax differentiated by PyTorch's own rules; (N×N) scores and tangents for all queries.
- ``"chunked"``: :func:`~meanflow.models.attention_jvp.attention_jvp`, fused SDPA primal with
  the exact online-softmax JVP evaluated by blocks of queries.
- ``"triton"``: :func:`meanflow.models.attention_triton.attention_jvp_triton`, the same
  structure with one fused Triton kernel as the forward-AD rule (P and dS never exist). Needs
  triton and a CUDA GPU (Triton's interpreter, ``TRITON_INTERPRET=1``, for CPU tests); head
  dims 16–128 (powers of two). ``attention_triton`` is imported only when this implementation
  is chosen or runs, so ``import meanflow`` never imports triton.

While torch.compile traces, a tangent-carrying attention always takes the math path: a compiled
graph can drop a custom Function's ``jvp`` (see :mod:`meanflow.models.forward_mode`).
:func:`check_attention_jvp` checks an implementation (or a compiled wrapper) against the math
path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanflow.models.attention_jvp import attention_jvp, check_attention_jvp, math_attention
from meanflow.models.forward_mode import has_tangent, in_jvp_pass
from meanflow.models.layers import Linear

# attention_jvp, math_attention and check_attention_jvp live in models/attention_jvp.py; they
# are re-exported here, and Attention.forward looks attention_jvp up in this module's namespace
# (tests patch it here to count or break calls).
__all__ = ["Attention", "attention_jvp", "math_attention", "JVP_ATTENTION",
           "JVP_ATTENTION_IMPLS", "set_jvp_attention", "check_attention_jvp"]

JVP_ATTENTION_IMPLS = ("math", "chunked", "triton")
JVP_ATTENTION = "math"      # the module default for Attention.jvp_impl = None


def set_jvp_attention(net: nn.Module, impl: str | None) -> None:
    """Selects the JVP-pass attention of every :class:`Attention` in ``net`` (None: the module
    default ``JVP_ATTENTION``)."""
    if impl is not None and impl not in JVP_ATTENTION_IMPLS:
        raise ValueError(f"JVP attention {impl!r}: choose one of "
                         f"{', '.join(JVP_ATTENTION_IMPLS)}")
    if impl == "triton":
        from meanflow.models.attention_triton import triton_available
        if not triton_available():
            raise RuntimeError("JVP attention 'triton' needs triton, which is not importable "
                               "here: install triton or choose 'chunked'")
    for module in net.modules():
        if isinstance(module, Attention):
            module.jvp_impl = impl


class Attention(nn.Module):
    """Self-attention over tokens (B, N, D) with ``heads`` heads.

    mode -- "auto": fused SDPA unless a forward-mode tangent is present (the JVP passes), so
            the grad forward and sampling use the fused kernel; "math": always explicit.
    jvp_impl -- attention used when a tangent is present: "math", "chunked", "triton" (see the
            module docstring) or None for the module default ``JVP_ATTENTION``. Not a parameter
            or buffer: checkpoints are unaffected.
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
        # eagerly the tangent is seen on the tensors; while torch.compile traces it is not,
        # and the objective's jvp_pass() says whether this is a JVP pass. Keep this test
        # inline and in this order: Dynamo breaks the graph at has_tangent, and where it
        # resumes decides what compiles (see models/forward_mode.py)
        tangent = has_tangent(x) or has_tangent(q) or (compiling and in_jvp_pass())
        if self.mode == "math" or (tangent and compiling):
            # a compiled graph can drop a custom Function's jvp rule: the math path,
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
