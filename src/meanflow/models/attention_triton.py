"""Fused forward-mode (JVP) attention: one Triton kernel for the tangent of softmax attention.

:func:`attention_jvp_triton` has the structure of
:func:`meanflow.models.attention_jvp.attention_jvp` (it subclasses its ``AttentionJVPFn``: the
primal is the fused ``scaled_dot_product_attention`` and the backward recomputes the attention
with grad), but its forward-AD rule launches one Triton kernel. For each (batch, head, block of
queries) the kernel streams over blocks of keys with an online softmax, accumulating in fp32
(m = running row maximum, e_j = exp(s_j − m), rescaled whenever m grows)::

    s = q·k/√d,  ds = (dq·k + q·dk)/√d
    l = Σ_j e_j,  A = Σ_j e_j v_j,  T = Σ_j e_j dv_j + Σ_j e_j ds_j v_j,  g = Σ_j e_j ds_j
    O = A/l,  dO = T/l − (g/l)·O

so neither the (N×N) probabilities nor their tangents ever exist in memory. Missing tangents
(None) specialise the kernel (constexpr flags) rather than being materialised as zeros.

Limits: inputs (B, H, N, d), self-attention (q, k, v of one shape), no mask, no dropout; any N
(tails are masked); head dims 16, 32, 64, 128; fp32, bf16 or fp16 (the tangent comes back in
the input dtype; fp32 inputs use IEEE-precision dots, no TF32). The tangent is not itself
differentiable (MeanFlow detaches du/dt). ``torch.func.jvp`` hands the rule tensors wrapped at
its level: the kernel runs on their data with functorch's stack cleared. Under ``vmap`` the rule
falls back to the chunked one (the kernel takes plain tensors; the chunked rule's torch ops can
be batched). Not checked under ``torch.compile``, which can drop a custom ``jvp`` silently
(docs/design.md, torch.compile): check compiled code with ``check_attention_jvp(fn=...)``. The
default tiles are chosen from ptxas' register/spill report, not from timings; pass
``block_m``/``block_n`` to tune.

triton is imported here, guarded: ``import meanflow`` never imports it (``attention.py`` imports
this module only when the "triton" JVP attention is chosen or runs). This module imports
``attention_jvp``, never ``attention``, so the import graph has no cycle. It needs a CUDA GPU,
or Triton's interpreter for tests on CPU: set ``TRITON_INTERPRET=1`` before triton is first
imported and pass CPU tensors (slow; use small sizes).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meanflow.models.attention_jvp import AttentionJVPFn, chunked_tangent

try:  # private, but what functorch itself uses to run code below its transforms
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack as _no_functorch
except ImportError:  # then wrapped tensors take the chunked rule
    _no_functorch = None

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 -- not installed, or an install that cannot load
    triton = None
    tl = None

__all__ = ["triton_available", "attention_jvp_triton", "attention_jvp_tangent", "HEAD_DIMS"]

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# the kernel below is decorated once, at import: whether it runs in the interpreter is fixed then
INTERPRET = triton is not None and _env_interpret()


def triton_available() -> bool:
    """True when triton imports (the kernel still needs a CUDA GPU or the interpreter)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the interpreter multiplies bf16 blocks as their raw uint16 bits, so there the
        # operands go to fp32 first (exact; the same products and fp32 sums as a bf16 MMA)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _attention_jvp_kernel(
            Q, K, V, DQ, DK, DV, O, DO,
            s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
            s_dqb, s_dqh, s_dqn, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
            s_ob, s_oh, s_on, s_dob, s_doh, s_don,
            N, qk_scale, ds_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
            HAS_DS: tl.constexpr, NEED_A: tl.constexpr, LOAD_O: tl.constexpr,
            STORE_O: tl.constexpr, PRECISION: tl.constexpr, N_LOOP: tl.constexpr,
            UPCAST: tl.constexpr):
        # grid: (query blocks, heads, batch); qk_scale = log2(e)/√d (exp2 domain); ds_scale = 1/√d.
        # N_LOOP: 0 on a GPU (loop to the runtime N); N in the interpreter, whose runtime scalars
        # (and assigned names) are 1-element arrays that range() cannot take under NumPy >= 2.4
        pid_m = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < N

        q = tl.load(Q + off_b * s_qb + off_h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        # DQ is Q when there is no dq (then this load is unused)
        dq = tl.load(DQ + off_b * s_dqb + off_h * s_dqh + offs_m[:, None] * s_dqn
                     + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        k_base = K + off_b * s_kb + off_h * s_kh
        v_base = V + off_b * s_vb + off_h * s_vh
        dk_base = DK + off_b * s_dkb + off_h * s_dkh
        dv_base = DV + off_b * s_dvb + off_h * s_dvh

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        g_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for start_n in range(0, N if N_LOOP == 0 else N_LOOP, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < N
            kT = tl.load(k_base + cols[None, :] * s_kn + offs_d[:, None],
                         mask=col_ok[None, :], other=0.0)                    # (d, BLOCK_N)
            v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :],
                        mask=col_ok[:, None], other=0.0)                     # (BLOCK_N, d)
            s = _dot(q, kT, PRECISION, UPCAST) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])                                  # e_j, fp32
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_t = acc_t * alpha[:, None]
            if NEED_A:
                acc_o = acc_o * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            if HAS_DV:
                dv = tl.load(dv_base + cols[:, None] * s_dvn + offs_d[None, :],
                             mask=col_ok[:, None], other=0.0)
                acc_t += _dot(p.to(dv.dtype), dv, PRECISION, UPCAST)
            if HAS_DS:
                ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_DQ:
                    ds += _dot(dq, kT, PRECISION, UPCAST)
                if HAS_DK:
                    dkT = tl.load(dk_base + cols[None, :] * s_dkn + offs_d[:, None],
                                  mask=col_ok[None, :], other=0.0)
                    ds += _dot(q, dkT, PRECISION, UPCAST)
                pds = p * (ds * ds_scale)                                    # e_j ds_j
                g_i = g_i * alpha + tl.sum(pds, 1)
                acc_t += _dot(pds.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new

        inv_l = 1.0 / l_i
        o_ptrs = O + off_b * s_ob + off_h * s_oh + offs_m[:, None] * s_on + offs_d[None, :]
        if LOAD_O:
            o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        else:
            o = acc_o * inv_l[:, None]
        d_o = acc_t * inv_l[:, None]
        if HAS_DS:
            d_o = d_o - (g_i * inv_l)[:, None] * o
        tl.store(DO + off_b * s_dob + off_h * s_doh + offs_m[:, None] * s_don + offs_d[None, :],
                 d_o.to(DO.dtype.element_ty), mask=row_ok[:, None])
        if STORE_O:
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])


def _default_config(d: int, dtype: torch.dtype, major: int = 9) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for a GPU of compute capability ``major``.x.
    Not timed (no GPU was at hand): chosen so that the build spills no or few registers
    (ptxas resource usage, all tangents; sm_90: bf16/fp16 128×64 tiles, 8 warps, 128×32 at
    d = 128; sm_80 needs smaller ones at d >= 64). fp32 IEEE dots run on the FMA units and
    spill at any tile size: small 32×32 tiles."""
    if dtype == torch.float32:
        return 32, 32, 8, 2
    if major >= 9:
        return 128, (64 if d <= 64 else 32), 8, 2
    return {16: (128, 64), 32: (128, 64), 64: (128, 32)}.get(d, (64, 32)) + (8, 2)


# (device, d, dtype) -> (block_m, block_n, num_warps, num_stages) that compiled after a default
# configuration ran out of shared memory or registers
_FALLBACK: dict[tuple, tuple[int, int, int, int]] = {}


def _check(q: Tensor, k: Tensor, v: Tensor, tangents: tuple) -> None:
    if triton is None:
        raise RuntimeError("the Triton JVP attention needs triton, which is not importable here")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"Triton JVP attention takes q, k, v of one shape (B, H, N, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_head_dim(q.shape[-1])
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"Triton JVP attention takes fp32, bf16 or fp16 q, k, v of one dtype; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    for t in tangents:
        if t is not None and t.shape != q.shape:
            raise ValueError(f"tangent of shape {tuple(t.shape)} for inputs {tuple(q.shape)}")
    devices = {t.device for t in (q, k, v, *tangents) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"Triton JVP attention: tensors on several devices "
                         f"{sorted(map(str, devices))}")
    _check_device(q)


def _check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"Triton JVP attention supports head dims 16, 32, 64, 128 (powers of two "
                         f"from 16 to 128); got {d}")


def _check_device(q: Tensor) -> None:
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton JVP attention needs a CUDA GPU (or TRITON_INTERPRET=1, set "
                           "before triton is imported, and CPU tensors, for testing)")


def _rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _power_of_two(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16; got {value}")
    return value


def attention_jvp_tangent(q: Tensor, k: Tensor, v: Tensor, q_t: Tensor | None = None,
                          k_t: Tensor | None = None, v_t: Tensor | None = None, *,
                          out: Tensor | None = None, return_out: bool = False,
                          block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None) -> Any:
    """The tangent dO of O = softmax(Q Kᵀ/√d) V along (q_t, k_t, v_t) (None: zero), by one
    launch of the Triton kernel; None when all three are None.

    out -- the primal O (e.g. the SDPA output), read instead of accumulating A = Σ e_j v_j
            (one GEMM fewer per key block; dO then inherits O's rounding).
    return_out -- also write and return the kernel's own O = A/l: returns (dO, O).
    block_m, block_n, num_warps, num_stages -- launch configuration (powers of two >= 16 for
            the blocks); by default a GPU guess, halved automatically if it does not fit.
    """
    tangents = (q_t, k_t, v_t)
    _check(q, k, v, tangents)
    if all(t is None for t in tangents):
        return (None, None) if return_out else None
    if out is not None and return_out:
        raise ValueError("pass either out (read O) or return_out (write O), not both")
    B, H, N, d = q.shape
    dtype = q.dtype
    q, k, v = (_rows(t, dtype) for t in (q, k, v))
    q_t, k_t, v_t = (None if t is None else _rows(t, dtype) for t in tangents)
    d_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    o_arg = None
    if out is not None:
        if out.shape != q.shape:
            raise ValueError(f"out of shape {tuple(out.shape)} for inputs {tuple(q.shape)}")
        o_arg = _rows(out, dtype)
    elif return_out:
        o_arg = torch.empty_like(d_out)
    has_ds = q_t is not None or k_t is not None
    flags = dict(HAS_DQ=q_t is not None, HAS_DK=k_t is not None, HAS_DV=v_t is not None,
                 HAS_DS=has_ds, NEED_A=(has_ds and out is None) or return_out,
                 LOAD_O=out is not None, STORE_O=return_out,
                 PRECISION="ieee")    # no TF32 for fp32; ignored for bf16/fp16 dots
    ptrs = [q, k, v, q_t if q_t is not None else q, k_t if k_t is not None else k,
            v_t if v_t is not None else v, o_arg if o_arg is not None else d_out, d_out]
    strides = [s for t in ptrs for s in t.stride()[:3]]
    scale = 1.0 / math.sqrt(d)

    key = (str(q.device), d, dtype)
    chosen = (block_m, block_n, num_warps, num_stages)
    major = torch.cuda.get_device_capability(q.device)[0] if q.device.type == "cuda" else 9
    config = list(_FALLBACK.get(key, _default_config(d, dtype, major)))
    for i, value in enumerate(chosen):
        if value is not None:
            config[i] = value
    _power_of_two("block_m", config[0])
    _power_of_two("block_n", config[1])
    if B > 65535 or H > 65535:
        raise ValueError(f"Triton JVP attention: batch {B} and heads {H} must be <= 65535 (grid)")
    # launch on q's GPU, not the current one
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    while True:
        bm, bn, warps, stages = config
        grid = (triton.cdiv(N, bm), H, B)
        try:
            with on_device:
                _attention_jvp_kernel[grid](
                    *ptrs, *strides, N, scale * LOG2E, scale,
                    HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, **flags, N_LOOP=N if INTERPRET else 0,
                    UPCAST=INTERPRET and dtype == torch.bfloat16,
                    num_warps=warps, num_stages=stages)
            break
        except Exception as exc:  # noqa: BLE001 -- retry smaller tiles only when out of resources
            if type(exc).__name__ != "OutOfResources" or chosen[:2] != (None, None):
                raise
            if bn > 16:
                config[1] = bn // 2
            elif bm > 16:
                config[0] = bm // 2
            elif stages > 1:
                config[3] = 1
            else:
                raise
            _FALLBACK[key] = tuple(config)
    return (d_out, o_arg) if return_out else d_out


def _plain(t: Tensor | None) -> Tensor | None | bool:
    """``t`` without functorch's grad/jvp-level wrappers (``torch.func.jvp`` hands the rule
    wrapped tensors; the kernel needs their data), or False when another wrapper (vmap's
    batching, functionalisation) is in the way."""
    if t is None:
        return None
    F_ = torch._C._functorch
    while F_.is_functorch_wrapped_tensor(t):
        if not F_.is_gradtrackingtensor(t):
            return False
        t = F_.get_unwrapped(t)
    return t


@dataclass(frozen=True)
class _Launch:
    """The launch options carried through the Function (one pytree leaf, so vmap's generated
    rule does not see them as inputs)."""
    block_m: int | None = None
    block_n: int | None = None
    saved_out: bool = False


class _TritonAttentionJVPFn(AttentionJVPFn):
    """O = softmax(Q Kᵀ/√d) V through fused SDPA (forward, and the recomputing backward, are the
    chunked function's), with the fused Triton kernel as the forward-AD rule. The last input is
    a :class:`_Launch` instead of the chunk size. Under vmap (batched tensors) the rule falls
    back to the chunked one, whose torch ops vmap can batch."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx: Any, q_t: Tensor | None, k_t: Tensor | None, v_t: Tensor | None,
            *_: Any) -> Tensor | None:
        if q_t is None and k_t is None and v_t is None:
            return None
        q, k, v, out = ctx.saved_tensors
        plain = [_plain(t) for t in (q, k, v, out, q_t, k_t, v_t)]
        if any(t is False for t in plain) or _no_functorch is None:
            return chunked_tangent(ctx, q_t, k_t, v_t, None)     # default chunk size
        q, k, v, out, q_t, k_t, v_t = plain
        launch = ctx.chunk
        # with functorch's levels cleared, new tensors (the output) are not wrapped again
        with _no_functorch():
            return attention_jvp_tangent(q, k, v, q_t, k_t, v_t,
                                         out=out if launch.saved_out else None,
                                         block_m=launch.block_m, block_n=launch.block_n)


def attention_jvp_triton(q: Tensor, k: Tensor, v: Tensor, block_m: int | None = None,
                         block_n: int | None = None, saved_out: bool = False) -> Tensor:
    """``scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) whose forward-mode AD
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) is the fused Triton JVP kernel; see the
    module docstring for the limits. ``saved_out`` makes the kernel read the SDPA output
    instead of recomputing O (one GEMM fewer per key block)."""
    # fail here, not first in the JVP pass (shapes are checked there: under vmap q is 3-D)
    if triton is None:
        raise RuntimeError("the Triton JVP attention needs triton, which is not importable here")
    _check_head_dim(q.shape[-1])
    _check_device(q)
    return _TritonAttentionJVPFn.apply(q, k, v, _Launch(block_m, block_n, bool(saved_out)))
