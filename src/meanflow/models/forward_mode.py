"""What a layer must do under forward-mode AD: the one page a backbone author reads.

**The passes a backbone sees.** ``meanflow.objective.jvp`` evaluates the network in up to three
kinds of forward pass:

- the *grad pass*: an ordinary forward with grad on (u_θ, whose graph the loss backpropagates);
- the *JVP pass*: du/dt = JVP of f(z, r, t) = net(z, t, t − r, y) along (v, 0, 1). The
  ``split`` strategy runs it under ``torch.no_grad()`` on dual tensors
  (``torch.autograd.forward_ad``) before its grad pass; the joint strategies (``func`` through
  ``torch.func.jvp``, ``forward_ad`` on dual tensors) run one pass with grad on that gives u and
  du/dt at once;
- *no-grad passes without a tangent*: the guidance calls of the loss, and sampling.

A layer computes the same function in all of them; only how its tangent is computed changes.

**What a layer must do.**

1. Every operation needs a forward-mode rule. Ordinary tensor operations have PyTorch's own;
   fused attention kernels (SDPA's flash, memory-efficient and cuDNN kernels) have none, so
   attention switches path when a tangent is present (below).
2. Prefer the lean layers of :mod:`meanflow.models.layers` (``Linear``, ``Conv2d``,
   ``group_norm``, ``layer_norm``, ``dropout``): ``autograd.Function``\\ s whose ``jvp`` computes
   only the tangents that exist. PyTorch's rule for ``addmm``/convolution multiplies the input by
   a materialised *zero* tangent of the weights (one extra GEMM per layer), and its GroupNorm
   and LayerNorm rules run about twenty kernels where the lean ones run a few. The rules and
   their measured gains: docs/design.md (lean forward-mode rules).
3. Take the lean path exactly when :func:`use_lean` says so: always with grad off (the split
   JVP pass, guidance, sampling: no autograd graph to keep, so the Function's Python backward
   never runs), and with grad on only when the input carries a tangent (the joint pass, whose
   native rules would pay for the weights' zero tangents). A plain grad pass keeps PyTorch's
   native kernels and their faster backward.
4. **Step aside while torch.compile traces.** A compiled graph can drop a custom Function's
   ``jvp`` rule silently (the tangent comes back zero or missing; docs/design.md, torch.compile),
   so :func:`use_lean` is False while compiling: the compiled code takes PyTorch's own rules,
   which Dynamo traces and fuses. The training loop's start-up check compares the compiled loss
   with eager and refuses a compiled JVP that is wrong.
5. Draw randomness from the global RNG only (dropout): the split strategy rewinds it between
   its two passes so that both draw the same masks. ``layers.dropout`` draws its mask exactly
   as CPU ``F.dropout`` does, so the lean and the native path agree mask for mask.
6. Conditioning (labels y, the EDM augmentation label ``aug=``) carries no tangent: the loss
   passes it as plain tensors outside the JVP's primals.

**Attention with a tangent** (``models/attention.py``). An ordinary forward uses fused
``scaled_dot_product_attention``. When a tangent is present it takes the JVP-pass implementation
chosen per module (``Attention.jvp_impl``, ``set_jvp_attention``): ``math`` (the explicit softmax
differentiated by PyTorch's rules; the default), ``chunked`` (SDPA primal with the exact
online-softmax JVP evaluated by blocks of queries, ``models/attention_jvp.py``) or ``triton``
(the same with a fused Triton kernel, ``models/attention_triton.py``). While torch.compile
traces, a tangent-carrying attention always takes ``math`` (rule 4).

**How the JVP pass is recognised.** Eagerly, from the tensor itself: :func:`has_tangent` is True
for a forward-AD dual tensor and inside ``torch.func.jvp`` (functorch-wrapped). While
torch.compile traces, a dual tensor cannot be recognised, so the objective marks its JVP
evaluations explicitly: ``objective.jvp`` runs every JVP inside :func:`jvp_pass`, and
:func:`in_jvp_pass` reports it. Only ``objective.jvp`` enters :func:`jvp_pass` (tests may too);
layers only read it. Attention asks, in its own ``forward``::

    compiling = torch.compiler.is_compiling()
    tangent = has_tangent(x) or has_tangent(q) or (compiling and in_jvp_pass())

The order matters under torch.compile (PyTorch 2.13): Dynamo cannot trace ``has_tangent`` (it
calls ``torch._C._functorch.is_functorch_wrapped_tensor``) and breaks the graph there, once per
attention call; the compiled ``split`` and ``func`` strategies and the refusal of a compiled
``forward_ad`` were measured with those breaks (docs/design.md, torch.compile). Moving the
same test into a helper function changes where Dynamo resumes and makes the compiled ``split``
JVP pass reach fused attention, which has no forward-AD rule.

The state is a depth counter in a ``threading.local``, so threads do not see each other's
passes. Not a ``contextvars.ContextVar``: Dynamo cannot trace ``ContextVar.get``/``set`` (PyTorch
2.13: a graph break, and the frame falls back to eager, which would leave the JVP pass
uncompiled), while it traces an attribute of a ``threading.local`` and guards on its value, so
code compiled inside a JVP pass is recompiled, not reused, outside one.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = ["jvp_pass", "in_jvp_pass", "has_tangent", "use_lean"]


class _PassState(threading.local):
    """How many JVP passes of ``meanflow.objective.jvp`` enclose the current code (per thread).
    Nested passes (a JVP inside a JVP) count twice."""

    def __init__(self) -> None:
        self.depth = 0


_STATE = _PassState()


@contextlib.contextmanager
def jvp_pass() -> Iterator[None]:
    """Marks the enclosed code as a JVP pass of the objective (see the module docstring):
    ``in_jvp_pass()`` is True inside it, also while torch.compile traces."""
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def in_jvp_pass() -> bool:
    """True inside :func:`jvp_pass`, i.e. during the objective's JVP evaluation of du/dt."""
    return _STATE.depth > 0


def has_tangent(x: Tensor) -> bool:
    """True when ``x`` carries a forward-mode tangent that can be seen eagerly: a forward-AD
    dual tensor, or a tensor inside ``torch.func.jvp`` (functorch-wrapped). While
    torch.compile traces, a dual tensor cannot be recognised; there :func:`in_jvp_pass` tells
    (see the module docstring for the order in which a layer asks)."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(x)
            or forward_ad.unpack_dual(x).tangent is not None)


def use_lean(x: Tensor) -> bool:
    """Whether a layer takes its lean ``autograd.Function``: always without grad (the split
    strategy's JVP pass, guidance, sampling), and with grad only when ``x`` carries a tangent
    (the joint strategies' one pass). A plain training forward keeps the native kernels and
    backward. Never while torch.compile traces: it can drop a custom Function's ``jvp`` rule,
    so compiled code takes PyTorch's own rules, which it traces and fuses."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or has_tangent(x)
