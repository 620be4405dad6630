"""One optimiser step: micro-batches, the loss call (eager or compiled), backward, gradient
sync, clipping, Adam and the EMA (docs/design.md, One training step).

The loss call hands the EDM augmentation label to the network as ``cond={"aug": labels}``
(the loss repeats it where guidance doubles the batch). Compiled (``train.compile``), the whole
loss evaluation is one ``torch.compile`` call: compiling only the network loses forward-mode
tangents. The loss's random draws (times, noise, label dropout) are then made outside the
compiled region by the loss's own ``draw``, so a compiled run consumes the generator exactly
as an eager one does, and :func:`check_compiled` compares the compiled evaluation with eager
before the first step.

How gradients are synchronised under ``torchrun`` (:mod:`meanflow.train.distributed`): with
the split strategy the grad pass goes through the DDP wrapper and the no-grad passes (JVP,
guidance) take the unwrapped module; the joint strategies ("func", "forward_ad") run on the
module and the gradients are averaged by hand; FSDP2 runs every pass on the sharded module.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from meanflow.errors import ConfigError
from meanflow.objective import IMFLoss, MeanFlowLoss
from meanflow.train import distributed as dist_
from meanflow.train.ema import EMA
from meanflow.world import World, all_true

__all__ = ["COMPILE_BACKEND", "JOINT_STRATEGIES", "RAW_ERROR_STATS", "resolve_compile",
           "tf32_mode", "amp_context", "make_loss_call", "check_compiled", "TrainStep"]

# torch.compile backend of train.compile. Tests on the CPU set "aot_eager" (the same traced
# graphs and autograd, without inductor's C++ code generation, which takes minutes there).
COMPILE_BACKEND = "inductor"

# du/dt strategies that give u and du/dt in one pass, which cannot go through DDP
JOINT_STRATEGIES = ("func", "forward_ad")
# the loss's stats of the raw (unweighted) error, which must be finite for a step to count
RAW_ERROR_STATS = ("mse", "u_minus_v", "mse_v")


def _raw_error_finite(stats: dict[str, Tensor]) -> Tensor:
    """Whether the raw-error stats of one loss call are all finite (a bool tensor)."""
    ok = torch.ones((), dtype=torch.bool)
    for key in RAW_ERROR_STATS:
        if key in stats:
            ok = ok.to(stats[key].device) & torch.isfinite(stats[key]).all()
    return ok


def _what_failed(loss: Tensor, stats: dict[str, Tensor]) -> str:
    """What was non-finite in a skipped loss call, for the divergence message."""
    bad = [k for k in RAW_ERROR_STATS if k in stats and not bool(torch.isfinite(stats[k]).all())]
    if bad:
        return f"the raw error ({', '.join(bad)})"
    return "the loss" if not bool(torch.isfinite(loss)) else "a stat"


def resolve_compile(value: bool | str, device: torch.device, fsdp: bool = False) -> bool:
    """``train.compile`` for a run on ``device``: "auto" is on for CUDA devices, except under
    ``train.fsdp``, which does not compile (``compile: true`` with it is refused)."""
    if value == "auto":
        return torch.device(device).type == "cuda" and not fsdp
    return bool(value)


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device):  # noqa: ANN201 (a context manager)
    """With ``enabled`` on a CUDA device: float32 matmuls and cuDNN convolutions may use TF32
    (``torch.set_float32_matmul_precision("high")``, as the official PyTorch code) until the
    block ends, when the previous settings come back. Otherwise nothing changes."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    try:
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        # The process set TF32 with torch's newer per-backend flags, and reading the legacy
        # ones now raises: use the newer flags alone.
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        old = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = old
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def amp_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of every loss evaluation: bf16 autocast for ``train.amp: bf16`` (the JVP
    pass leaves it unless ``objective.jvp_precision: amp``), else nothing."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loss_call(loss_fn: Callable, compile_: bool = False,
                   backend: str | None = None) -> Callable:
    """``call(net, x, y, aug=None, *, generator=None, draws=None, jvp_net=None) -> (loss,
    stats)``: one evaluation of ``loss_fn``, with the augmentation label ``aug`` (B, D) handed
    to every network call as ``cond={"aug": aug}``, the random draws from ``generator`` or
    given as ``draws`` (a mapping from the loss's ``draw``), and ``jvp_net`` (the unwrapped
    module when ``net`` is a DDP wrapper; MeanFlow only) taking the no-grad passes.

    With ``compile_`` the whole evaluation (both passes of the JVP strategy and the target) is
    one ``torch.compile`` call, given all of its draws (``loss_fn.draw(x, generator)``, made
    outside) and no generator. ``backend`` defaults to ``COMPILE_BACKEND``."""
    def call(net: Callable, x: Tensor, y: Tensor | None, aug: Tensor | None = None, *,
             generator: torch.Generator | None = None, draws: dict[str, Tensor] | None = None,
             jvp_net: Callable | None = None) -> tuple:
        extra = {} if jvp_net is None else {"jvp_net": jvp_net}
        return loss_fn(net, x, y, generator=generator, draws=draws,
                       cond=None if aug is None else {"aug": aug}, **extra)
    return torch.compile(call, backend=backend or COMPILE_BACKEND) if compile_ else call


def check_compiled(model: nn.Module, loss_fn: Any, compiled_call: Callable, x: Tensor,
                   y: Tensor | None, aug: Tensor | None = None, rtol: float = 1e-3,
                   autocast: Any = None,
                   wrap: Callable[[nn.Module], nn.Module] | None = None) -> float:
    """Checks a compiled loss evaluation against eager before training starts.

    Compiled code can drop forward-mode tangents silently (docs/design.md, torch.compile). A
    fresh network's zero-initialised output makes du/dt zero, which would hide that, so the
    check runs on a copy of the network with perturbed weights, in eval mode, with r = 0 and
    t in [0.5, 1] so that every target leans on du/dt. It compares the raw squared error and
    the gradient. Returns the larger relative error; raises ConfigError above ``rtol`` or on
    any failure. Both calls get the same complete ``draws=`` and no generator.

    ``wrap`` (under torchrun with a split strategy: the DDP wrapper) wraps the probe for the
    grad pass, as in training (the probe itself takes the JVP, ``jvp_net``). With a different
    batch on each rank the compared gradients are then the averages over the ranks, so a
    compiled grad pass that skipped DDP's all-reduce would fail the check too.
    """
    probe = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    B = x.shape[0]
    t = (0.5 + 0.5 * torch.rand(B, generator=gen)).to(x.device)
    fixed = {"r": torch.zeros_like(t), "t": t,
             "e": torch.randn(x.shape, generator=gen).to(x.device, x.dtype)}
    # the loss's other draws (label dropout) from a seeded generator; r, t and e replaced
    draws = {k: fixed.get(k, v)
             for k, v in loss_fn.draw(x, torch.Generator(x.device).manual_seed(7)).items()}
    strategy = getattr(loss_fn, "jvp", "-")
    net = probe if wrap is None else wrap(probe)
    # jvp_net: the unwrapped probe, for MeanFlow's no-grad passes (flow matching has none)
    jvp_loss = isinstance(loss_fn, (MeanFlowLoss, IMFLoss))
    extra = ({"jvp_net": probe} if wrap is not None and jvp_loss
             else {})

    def run(call: Callable) -> tuple[Tensor, Tensor]:
        probe.zero_grad(set_to_none=True)
        with (autocast if autocast is not None else contextlib.nullcontext()):
            loss, stats = call(net, x, y, aug, draws=draws, **extra)
        loss.float().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in probe.parameters() if p.grad is not None])
        return stats["mse"].detach().float(), grad

    try:
        ref_mse, ref_grad = run(make_loss_call(loss_fn))
        got_mse, got_grad = run(compiled_call)
    except Exception as exc:  # noqa: BLE001 (any compiler failure becomes one clear line)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = "set train.compile=false or try another objective.jvp"
        if strategy == "forward_ad":
            # torch 2.13: the joint dual-tensor pass cannot be compiled (a compiled graph's
            # autograd Function has no jvp rule); the split passes and func.jvp can
            hint = "objective.jvp=forward_ad does not compile: use split or func, or " \
                   "set train.compile=false"
        raise ConfigError(f"train.compile: the compiled loss failed its start-up check "
                          f"({type(exc).__name__}: {first}); {hint}") from None
    errors = {"squared error": float((got_mse - ref_mse).abs() / ref_mse.abs().clamp_min(1e-12)),
              "gradient": float((got_grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12))}
    worst = max(errors, key=errors.get)
    if not errors[worst] <= rtol:  # also catches NaN
        raise ConfigError(f"train.compile changed the {worst} by {errors[worst]:.2e} (relative) "
                          f"against eager with objective.jvp={strategy}: the compiled JVP is "
                          "wrong; set train.compile=false or try another objective.jvp")
    return errors[worst]


class TrainStep:
    """One optimiser step of one rank on its share of the global batch.

    The share is split into ``accumulation`` micro-batches of ``micro`` samples; each is one
    loss call (``loss_call`` from :func:`make_loss_call`; compiled when ``compiled``, its draws
    then made here, outside it) under ``autocast``, and the backward of its mean divided by the
    number of micro-batches. Under DDP only the last micro-batch all-reduces (``no_sync`` on
    the others). A non-finite loss, raw error or gradient norm on any rank skips the update on
    every rank (``skipped`` says which); otherwise the
    joint strategies' gradients are averaged by hand, then clipping (``grad_clip``, None for
    none), Adam and ``ema.step``.

    The grad-carrying forward goes through DDP (``dist_.wrap_ddp``; its backward all-reduces
    the gradients) and the no-grad passes take the unwrapped module (``jvp_net``); one
    process, a joint strategy or FSDP use the module itself for every pass.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, loss_call: Callable,
                 opt: torch.optim.Optimizer, ema: EMA, *, world: World, device: torch.device,
                 micro: int, accumulation: int, compiled: bool,
                 autocast: contextlib.AbstractContextManager, grad_clip: float | None,
                 fsdp: bool) -> None:
        self.model, self.loss_fn, self.loss_call, self.opt, self.ema = (
            model, loss_fn, loss_call, opt, ema)
        self.world, self.device, self.fsdp = world, device, fsdp
        self.micro, self.accumulation, self.compiled = micro, accumulation, compiled
        self.autocast = autocast
        self.max_norm = grad_clip if grad_clip is not None else math.inf
        joint = getattr(loss_fn, "jvp", None) in JOINT_STRATEGIES
        self.train_net: nn.Module = (model if joint or fsdp
                                     else dist_.wrap_ddp(model, world, device))
        wrapped = self.train_net is not model
        self.jvp_net = model if wrapped and isinstance(loss_fn, (MeanFlowLoss, IMFLoss)) else None
        self.no_sync = getattr(self.train_net, "no_sync", None) if wrapped else None
        self.sync_by_hand = world.enabled and joint and not fsdp
        self.skipped = ""          # what was non-finite in the last skipped step

    def __call__(self, step: int, x: Tensor, y: Tensor | None, aug: Tensor | None,
                 generator: torch.Generator, lr: float) -> dict[str, Tensor] | None:
        """Step ``step`` (0-based) at learning rate ``lr``: the step's stats (means over its
        micro-batches, on the device, with ``grad_norm``), or None when it was skipped, with
        what was non-finite in ``skipped``.

        A step is applied only when the weighted loss, the raw error (``mse`` and
        ``u_minus_v``, which the weighted loss hides: it is about 1 with ``objective.p`` = 1)
        and the gradient norm are finite on every rank (docs/design.md, One training step)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.skipped = ""
        stats, finite = self._backward(x, y, aug, generator)
        if not finite:
            self.opt.zero_grad(set_to_none=True)
            return None
        if self.sync_by_hand:
            dist_.all_reduce_grads_(list(self.model.parameters()), self.world)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        norm = dist_.full_tensors({"n": norm}, cpu=False)["n"] if self.fsdp else norm
        if not all_true(torch.isfinite(norm), self.world, self.device):
            self.skipped = "the gradient norm"
            self.opt.zero_grad(set_to_none=True)
            return None
        stats["grad_norm"] = norm
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # every train.ema_every steps (by the step number, so a resumed run keeps the
        # schedule); a skipped step updates nothing, not even on a multiple
        self.ema.step(self.model, step + 1)
        return stats

    def _backward(self, x: Tensor, y: Tensor | None, aug: Tensor | None,
                  generator: torch.Generator) -> tuple[dict[str, Tensor], bool]:
        """Accumulates the gradient of every micro-batch; returns the summed stats and
        whether the loss and the raw error were finite (on every rank)."""
        stats: dict[str, Tensor] = {}
        world, n = self.world, self.accumulation
        all_finite = (torch.ones((), dtype=torch.bool, device=self.device) if world.enabled
                      else None)
        for i in range(n):
            part = slice(i * self.micro, (i + 1) * self.micro)
            last = i == n - 1      # DDP all-reduces in the backward of the last one only
            sync = (self.no_sync() if self.no_sync is not None and not last
                    else contextlib.nullcontext())
            with sync:
                loss, micro_stats = self._loss(x[part], None if y is None else y[part],
                                               None if aug is None else aug[part], generator)
                loss = loss.float().mean() / n
                finite = torch.isfinite(loss) & _raw_error_finite(micro_stats)
                if world.enabled:
                    # every rank runs every backward (DDP's all-reduce waits for all); a
                    # non-finite loss anywhere skips the step everywhere
                    all_finite &= finite
                elif not finite:
                    self.skipped = _what_failed(loss, micro_stats)
                    return stats, False
                loss.backward()
            for k, v in micro_stats.items():
                v = v.detach().float() / n
                stats[k] = stats[k] + v if k in stats else v
        if world.enabled:
            if not all_true(all_finite, world, self.device):
                self.skipped = "the loss or the raw error (on some rank)"
                return stats, False
        return stats, True

    def _loss(self, x: Tensor, y: Tensor | None, aug: Tensor | None,
              generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        if self.compiled:   # the draws outside the compiled region, in the loss's own order
            given: dict[str, Any] = {"draws": self.loss_fn.draw(x, generator)}
        else:
            given = {"generator": generator}
        with self.autocast:
            return self.loss_call(self.train_net, x, y, aug, jvp_net=self.jvp_net, **given)
