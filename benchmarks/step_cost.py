"""Cost of a MeanFlow training step relative to flow matching, per du/dt strategy.

For each strategy it prints the time of one MeanFlow step (loss + backward) divided by one
flow-matching step on the same backbone and batch, the bytes saved for backward (activation
memory) relative to flow matching, and on CUDA the peak allocated memory ratio. The floor for a
matmul-bound net is about 4/3: the JVP adds one forward's work to FM's forward + backward.

It also counts the matrix products of one loss evaluation per strategy (CPU, small presets
only), to show whether the parameters' zero tangents cost an extra GEMM per layer (the eager
PyTorch behaviour noted in JVP-NOTES): the tangent needs exactly one extra product per Linear
layer, the zero-tangent path two or more.

    python benchmarks/step_cost.py [--model mlp] [--batch 256] [--device cpu] [--repeats 20]
                                   [--threads N] [--native-linear]
                                   [--strategies split,func | none] [--amp bf16]
                                   [--compile [--compile-scope model|loss]]
                                   [--guided] [--json PATH] [--fm-ref PATH]
                                   [--jvp-attention math|chunked|triton]
    python benchmarks/step_cost.py --summarize PATH.jsonl

Presets: ``mlp``, ``dit-s/2``, ``unet-small`` (CPU sizes, as before) and the paper's
``unet-cifar10`` (3x32x32, batch 128, CIFAR-10 objective: 75 % r != t, LN(-2, 2), p 0.75,
c 1e-3) and ``dit-b/2`` (4x32x32 latents, batch 64, ImageNet objective: 25 % r != t,
LN(-0.4, 1), p 1, c 0.01). ``--guided`` makes the model class-conditional (1000 classes for
DiT, 10 otherwise) and trains guidance into the target with omega 1.0, kappa 0.5, label
dropout 0.1.

``--amp bf16`` runs loss and backward under ``torch.autocast(dtype=bfloat16)``. MeanFlowLoss
has no precision policy of its own, so the JVP runs under the same autocast; the benchmark
records du/dt's dtype and its relative error against an fp32 JVP (``err_bf16_vs_fp32``).

``--compile`` wraps the model in ``torch.compile`` (default mode). Per strategy it first
compares du/dt of the compiled model with eager on a fixed batch (``time_derivative``, and for
the joint strategies also ``u_and_dudt`` with grad on) and marks the strategy FAILED if that
raises or the relative error exceeds 1e-2 (bf16) / 1e-4 (fp32). Dropout is switched off for
the check only. A strategy whose check raised is not timed (``--time-failed`` times it
anyway). ``--compile-scope loss`` compiles the whole loss evaluation instead of the model (the
JVP is then traced by dynamo, as in the official PyTorch port). With dropout, the split
strategies also check that the JVP and grad passes drew the same dropout masks.

A SIGTERM (``timeout``) writes the measurement in progress as a TIMEOUT record before exiting.

Each record also names the attention implementations that ran (aten ops and, on CUDA, GPU
kernels of one profiled step: fused SDPA flash / memory-efficient / cuDNN, or the explicit
softmax) and, when compiled, how many compiled graphs that step executed; "NO compiled graph
ran" means dynamo fell back to eager for the whole step.

``--json PATH`` appends one JSON object per measurement (one for flow matching, one per
strategy). ``--fm-ref PATH`` reuses a matching flow-matching record from that file instead of
measuring FM again (the GPU suite runs each compiled strategy in its own process).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import time
import traceback
import weakref
from typing import Any, Callable

import torch

from meanflow import JVP_STRATEGIES, FlowMatchingLoss, MeanFlowLoss
from meanflow.models import build_model
from meanflow.objective.jvp import time_derivative, u_and_dudt


@dataclasses.dataclass(frozen=True)
class Preset:
    options: dict            # build_model options
    shape: tuple             # one sample
    batch: int               # default batch
    objective: dict          # MeanFlowLoss options (time sampler shared with FM)
    big: bool = False        # skip CPU-only extras (matrix-product counts)
    num_classes: int = 10    # with --guided


_CPU_OBJECTIVE = {"fraction_r_neq_t": 1.0}   # the CPU presets' historical setting
_CIFAR10 = {"fraction_r_neq_t": 0.75, "mu": -2.0, "sigma": 2.0, "p": 0.75, "c": 1e-3}
_IMAGENET = {"fraction_r_neq_t": 0.25, "mu": -0.4, "sigma": 1.0, "p": 1.0, "c": 0.01}

PRESETS = {
    "mlp": Preset({"dim": 2, "width": 256, "depth": 4, "emb_dim": 64}, (2,), 256,
                  _CPU_OBJECTIVE),
    "dit-s/2": Preset({"in_channels": 4, "input_size": 8}, (4, 8, 8), 16, _CPU_OBJECTIVE),
    "unet-small": Preset({"in_channels": 1, "input_size": 28}, (1, 28, 28), 16, _CPU_OBJECTIVE),
    "unet-cifar10": Preset({"in_channels": 3, "input_size": 32}, (3, 32, 32), 128, _CIFAR10,
                           big=True),
    "dit-b/2": Preset({"in_channels": 4, "input_size": 32}, (4, 32, 32), 64, _IMAGENET,
                      big=True, num_classes=1000),
}

# compiled du/dt must match eager to this relative error (Frobenius norm of the difference)
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
FLOOR = 4 / 3


# ----------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thr)"


def amp_context(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    if amp == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp32; inf when not finite."""
    got, ref = got.detach().float(), ref.detach().float()
    value = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    return value if math.isfinite(value) else float("inf")


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(name: str, device: torch.device, guided: bool = False,
          options: dict | None = None) -> torch.nn.Module:
    """The preset's backbone on ``device`` with non-trivial outputs (see below)."""
    preset = PRESETS[name]
    opts = dict(preset.options, **(options or {}))
    if guided:
        opts["num_classes"] = preset.num_classes
    net = build_model(name, **opts).to(device)
    with torch.no_grad():
        if name in ("dit-s/2", "unet-small"):
            # historical CPU behaviour: all weights N(0, 0.02²) (zero-init outputs give u = 0)
            for p in net.parameters():
                p.normal_(0.0, 0.02)
        elif name != "mlp":
            # keep the real init, but give the zero-initialised layers (adaLN-Zero, residual
            # branch ends, output) small weights so u and du/dt look like a trained net's
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
    return net


def time_steps(step: Callable[[], Any], repeats: int, warmup: int,
               device: torch.device) -> tuple[float, list[float], float]:
    """(median seconds, all timed seconds, seconds spent warming up incl. compilation)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        sync(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times), times, warm_s


def peak_mib(step: Callable[[], Any], device: torch.device) -> tuple[float | None, float | None]:
    """(peak allocated MiB during one step *above* what was allocated before it, that base in
    MiB); None off CUDA. Measuring above the base keeps anything left over by an earlier
    measurement out of the ratio."""
    if device.type != "cuda":
        return None, None
    sync(device)
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, base / 2**20


class _Saved:
    """What the graph holds for one saved tensor: a box we can empty afterwards."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of distinct tensor storages that ``fn``'s autograd graph keeps for backward.

    Each saved tensor goes into a box that the graph holds; boxes of graph parts freed during
    ``fn`` (e.g. the split strategies' no-grad JVP) die and are not counted. An output saved by
    its own node makes a reference cycle through the graph that Python's GC cannot see, so the
    boxes are emptied before the graph is dropped: without that, every call leaked a whole
    graph (seen on the GPU as memory growing by one training step per measurement).
    """
    boxes: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> _Saved:
        box = _Saved(t)
        boxes.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        keep = fn()  # noqa: F841  (holds the graph while we count)
    storages = {}
    alive = [box for box in (ref() for ref in boxes) if box is not None]
    for box in alive:
        t = box.tensor
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # a forward-AD dual's storage cannot be inspected: count it
            storages[id(t)] = t.numel() * t.element_size()
    for box in alive:
        box.tensor = None  # break graph -> box -> tensor -> graph cycles
    del keep, alive
    return sum(storages.values())


def count_products(fn: Callable[[], Any]) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution")
    return sum(e.count for e in prof.key_averages() if e.key in names)


_ATTN_OPS = (  # forward ops only: (profiler key, label)
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "sdpa-flash-cpu"),
    ("aten::_scaled_dot_product_flash_attention", "sdpa-flash"),
    ("aten::_scaled_dot_product_efficient_attention", "sdpa-mem-efficient"),
    ("aten::_scaled_dot_product_cudnn_attention", "sdpa-cudnn"),
    ("aten::_scaled_dot_product_attention_math", "sdpa-math"),
    ("aten::_softmax", "explicit-softmax"),
)
_ATTN_WORDS = ("scaled_dot_product", "softmax", "flash", "fmha", "attention")
_REGION = "Torch-Compiled Region"  # the profiler's mark of a compiled graph's execution


def attention_ops(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Profiler events (aten ops, and GPU kernels on CUDA) of one call whose name mentions
    attention or softmax, and the executions of compiled graphs, with their counts."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    try:
        activities = cpu + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda"
                            else [])
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync(device)
    except Exception:  # noqa: BLE001  (no CUPTI: aten ops alone still name the kernels)
        with torch.profiler.profile(activities=cpu) as prof:
            fn()
            sync(device)
    found = {}
    for event in prof.key_averages():
        key = event.key
        if any(word in key.lower() for word in _ATTN_WORDS) or key.startswith(_REGION):
            found[key[:120]] = found.get(key[:120], 0) + event.count
    regions = {k: n for k, n in found.items() if k.startswith(_REGION)}
    ops = {k: n for k, n in found.items() if not k.startswith(_REGION)}
    ops = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:16])
    return ops | dict(sorted(regions.items()))


def attention_path(ops: dict[str, int], compiled: bool, attention: bool = True) -> str:
    """A short reading of ``attention_ops``: which attention implementations ran and, when
    compiled, how many compiled-graph executions the call made (0: it all ran eagerly)."""
    parts = [f"{label} x{ops[key]}" for key, label in _ATTN_OPS if ops.get(key)]
    if compiled:
        fused = sum(n for k, n in ops.items() if k.startswith("triton") and "softmax" in k)
        if fused:
            parts.append(f"inductor-softmax-kernels x{fused}")
    if attention and not parts:
        parts.append("no attention op seen")
    if compiled:
        regions = {k: n for k, n in ops.items() if k.startswith(_REGION)}
        calls = sum(regions.values())
        parts.append(f"compiled regions: {calls} runs of {len(regions)} graphs" if calls
                     else "NO compiled graph ran (eager fallback)")
    return ", ".join(parts)


def profiled_attention(fn: Callable[[], Any], device: torch.device, compiled: bool,
                       attention: bool = True) -> dict[str, Any]:
    """``attn_ops`` and ``attn_path`` of one call; a profiler failure is recorded, not raised."""
    try:
        ops = attention_ops(fn, device)
        return {"attn_ops": ops, "attn_path": attention_path(ops, compiled, attention)}
    except Exception as exc:  # noqa: BLE001
        return {"attn_path": f"profiler failed: {first_line(exc)}"}


def dynamo_stats() -> dict[str, Any]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    breaks = counters.get("graph_break", {})
    return {"unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(k)[:160] for k in list(breaks)[:3]]}


def raise_recompile_limit() -> None:
    """Grad/no-grad, dual/plain and train/eval calls each compile a graph: allow them all,
    so that no variant silently falls back to eager."""
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 512


def has_dropout(net: torch.nn.Module) -> bool:
    cfg = getattr(net, "cfg", None)
    return float(getattr(cfg, "dropout", 0.0) or 0.0) > 0 or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in net.modules())


def append_json(path: str | None, record: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()


def env_record(device: torch.device) -> dict[str, Any]:
    rec = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_name(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        rec["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        rec["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return rec


def parse_strategies(items: list[str] | None) -> list[str]:
    if not items:
        return list(JVP_STRATEGIES)
    names = [s for item in items for s in item.split(",") if s]
    if names == ["none"]:
        return []
    unknown = [s for s in names if s not in JVP_STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}: choose from {', '.join(JVP_STRATEGIES)} "
                         "or 'none' (flow matching only)")
    return names


def find_fm_record(path: str | None, key: dict) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    found = None
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("bench") == "step" and rec.get("strategy") == "fm" and all(
                    rec.get(k) == v for k, v in key.items()):
                found = rec
    return found


_PENDING: dict[str, Any] = {"rec": None, "path": None}


def _on_term(signum: int, frame: Any) -> None:
    """`timeout` sends SIGTERM: record the measurement in progress as TIMEOUT, then exit."""
    rec = _PENDING.get("rec")
    if rec is not None:
        rec.update(status="TIMEOUT", error=f"stopped by signal {signum} during "
                   f"{rec.pop('phase', '?')}")
        append_json(_PENDING.get("path"), rec)
        print(f"{rec.get('strategy', rec.get('amp'))}: TIMEOUT ({rec['error']})", flush=True)
    os._exit(124)


def install_term_handler(json_path: str | None) -> None:
    _PENDING["path"] = json_path
    signal.signal(signal.SIGTERM, _on_term)


# ----------------------------------------------------------------------------- checks
def check_dudt(net: torch.nn.Module, td: Callable | None, ud: Callable | None, strategy: str,
               batch: tuple, amp: str, device: torch.device) -> dict[str, Any]:
    """du/dt of the compiled ``td(z, r, t, v, y)`` (time_derivative) and, for the joint
    strategies, ``ud`` (u_and_dudt with grad on) against eager ``net`` on a fixed batch, dropout
    off; under bf16 also eager bf16 against eager fp32. Raises what the compiled code raises."""
    z, r, t, v, y = batch
    ctx = amp_context(device, amp)
    out: dict[str, Any] = {}
    was_training = net.training
    if has_dropout(net):
        net.eval()
    try:
        with ctx():
            ref = time_derivative(net, z, r, t, v, y, strategy)
        out["dudt_dtype"] = str(ref.dtype).replace("torch.", "")
        if amp != "fp32":
            ref32 = time_derivative(net, z, r, t, v, y, strategy)
            out["err_bf16_vs_fp32"] = rel_err(ref, ref32)
            del ref32
        if td is not None:
            with ctx():
                got = td(z, r, t, v, y)
            out["err_vs_eager"] = rel_err(got, ref)
            del got
        if ud is not None and strategy in ("func", "forward_ad"):
            # the joint strategies' training pass runs with grad on: another compiled graph
            with ctx():
                u_ref, d_ref = u_and_dudt(net, z, r, t, v, y, strategy)
                u_got, d_got = ud(z, r, t, v, y)
            out["err_train_vs_eager"] = max(rel_err(d_got, d_ref), rel_err(u_got, u_ref))
            del u_ref, d_ref, u_got, d_got
    finally:
        net.train(was_training)
    return out


def dropout_mismatch(model: Callable, strategy: str, batch: tuple, amp: str,
                     device: torch.device) -> tuple[float, float] | None:
    """Split strategies with dropout, train mode: relative difference between u from the no-grad
    JVP pass and u from the grad pass, (a) after the strategy's RNG rewind and (b) without it.
    Matching dropout masks make (a) a rounding-level difference (the two passes may use
    different attention kernels) far below (b), the difference that fresh masks make."""
    try:
        from meanflow.objective.jvp import _fn, _jvp_forward_ad, _jvp_func, _same_rng
    except ImportError:
        return None
    z, r, t, v, y = batch
    f = _fn(model, y)
    jvp = _jvp_func if strategy == "split_func" else _jvp_forward_ad
    with amp_context(device, amp)():
        with _same_rng(z.device) as rewind:
            with torch.no_grad():
                u_jvp, _ = jvp(f, z, r, t, v)
            rewind()
            u_same = f(z, r, t).detach()
            u_fresh = f(z, r, t).detach()
    return rel_err(u_same, u_jvp), rel_err(u_fresh, u_jvp)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 256 mlp, 16 dit-s/2 and unet-small, 128 unet-cifar10, "
                        "64 dit-b/2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 3; 5 with --compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--native-linear", action="store_true",
                        help="build the backbone with torch.nn.Linear instead of meanflow's "
                        "JVP-lean Linear, to measure what the lean rule saves")
    parser.add_argument("--jvp-attention", choices=("math", "chunked", "triton"),
                        default="math",
                        help="attention in the JVP pass: the math path, the chunked "
                        "online-softmax JVP function (models/attention.py) or the fused Triton "
                        "JVP kernel (models/attention_triton.py; CUDA)")
    parser.add_argument("--strategies", nargs="*", default=None,
                        help="subset of JVP strategies (space or comma separated; default all); "
                        "'none' measures flow matching only")
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: torch.autocast around loss and backward")
    parser.add_argument("--jvp-precision", choices=("fp32", "amp"), default="fp32",
                        help="under --amp bf16: the JVP pass in fp32 (default, the training "
                        "default objective.jvp_precision) or under autocast too")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (default mode); du/dt checked vs eager")
    parser.add_argument("--compile-scope", choices=("model", "loss"), default="model",
                        help="model: torch.compile(net); loss: compile the whole loss "
                        "evaluation (JVP included), as the official PyTorch port does")
    parser.add_argument("--time-failed", action="store_true",
                        help="time a compiled strategy even when its du/dt check raised")
    parser.add_argument("--guided", action="store_true",
                        help="class-conditional with guidance in the target (omega, kappa)")
    parser.add_argument("--omega", type=float, default=1.0)
    parser.add_argument("--kappa", type=float, default=0.5)
    parser.add_argument("--json", default=None, help="append JSON lines to this file")
    parser.add_argument("--fm-ref", default=None,
                        help="JSONL file: reuse its matching flow-matching record")
    parser.add_argument("--count-products", choices=("auto", "on", "off"), default="auto",
                        help="auto: on CPU, eager, small presets only")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the one profiled step that shows which attention ran")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSONL",
                        help="print a table of the records in these files and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return
    if args.native_linear:
        import meanflow.models.embeddings
        import meanflow.models.mlp
        meanflow.models.mlp.Linear = torch.nn.Linear
        meanflow.models.embeddings.Linear = torch.nn.Linear
    if args.threads:
        torch.set_num_threads(args.threads)
    install_term_handler(args.json)
    strategies = parse_strategies(args.strategies)
    preset = PRESETS[args.model]
    if args.batch is None:
        args.batch = preset.batch
    warmup = args.warmup if args.warmup is not None else (5 if args.compile else 3)
    scope = args.compile_scope if args.compile else None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu")
    torch.manual_seed(0)
    net = build(args.model, device, args.guided)
    if args.jvp_attention != "math":
        from meanflow.models.attention import check_attention_jvp, set_jvp_attention
        set_jvp_attention(net, args.jvp_attention)
        fn = None
        if args.jvp_attention == "triton":
            from meanflow.models.attention_triton import attention_jvp_triton as fn
        check_attention_jvp(fn, dim=16, device=device)  # fails loudly if the rule is not used
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    model: Callable = net
    if args.compile:
        raise_recompile_limit()
        if scope == "model":
            model = torch.compile(net)
    ctx = amp_context(device, args.amp)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, *preset.shape, device=device, generator=gen)
    y = (torch.randint(0, preset.num_classes, (args.batch,), device=device, generator=gen)
         if args.guided else None)
    # the fixed batch of the du/dt checks
    e = torch.randn(x.shape, device=device, generator=gen)
    t = torch.rand(args.batch, device=device, generator=gen)
    r = t * torch.rand(args.batch, device=device, generator=gen)
    tt = t.reshape(-1, *[1] * (x.ndim - 1))
    check_batch = ((1 - tt) * x + tt * e, r, t, e - x, y)

    objective = dict(preset.objective)
    objective["jvp_precision"] = args.jvp_precision
    sampler = {k: objective[k] for k in ("mu", "sigma") if k in objective}
    cond = {"num_classes": preset.num_classes, "label_drop": 0.1} if args.guided else {}
    guidance = {"omega": args.omega, "kappa": args.kappa} if args.guided else {}
    fm = FlowMatchingLoss(**sampler, **cond)

    def caller(loss_fn) -> Callable[[], Any]:
        """One loss evaluation on the benchmark batch: eager, through the compiled model, or
        the whole loss compiled (--compile-scope loss)."""
        if scope == "loss":
            compiled = torch.compile(lambda xx, yy: loss_fn(net, xx, yy))
            return lambda: compiled(x, y)
        return lambda: loss_fn(model, x, y)

    def make_step(call) -> Callable[[], None]:
        def step() -> None:
            with ctx():
                loss, _ = call()
                loss.mean().backward()
            net.zero_grad(set_to_none=True)
        return step

    def saved(call) -> int | None:
        if args.compile:
            return None  # saved-tensor hooks and compiled graphs do not mix; see peak memory

        def run():
            with ctx():
                return call()
        return saved_bytes(run)

    def derivatives(strategy: str) -> tuple[Callable | None, Callable | None]:
        """Compiled (time_derivative, u_and_dudt) to check against eager; None when eager."""
        if not args.compile:
            return None, None
        if scope == "model":
            return (lambda *a: time_derivative(model, *a, strategy),
                    lambda *a: u_and_dudt(model, *a, strategy))
        return (torch.compile(lambda z, r, t, v, y: time_derivative(net, z, r, t, v, y,
                                                                    strategy)),
                torch.compile(lambda z, r, t, v, y: u_and_dudt(net, z, r, t, v, y, strategy)))

    has_attention = any(type(m).__name__ == "Attention" for m in net.modules())
    profile = not args.no_profile and (has_attention or args.compile)
    base = {"bench": "step", **env_record(device), "model": args.model,
            "params_M": round(params_m, 2), "batch": args.batch, "amp": args.amp,
            "compile": bool(args.compile), "compile_scope": scope, "guided": bool(args.guided),
            "native_linear": bool(args.native_linear), "repeats": args.repeats,
            "jvp_attention": args.jvp_attention, "jvp_precision": args.jvp_precision,
            "warmup": warmup, "objective": {**objective, **guidance}}
    key = {k: base[k] for k in ("model", "batch", "amp", "compile", "compile_scope", "guided",
                                "native_linear", "device", "torch")}

    print(f"# {args.model} ({params_m:.1f}M params) {preset.options}, batch {args.batch}, "
          f"device {device_name(device)}, torch {torch.__version__}, amp {args.amp}, "
          f"{f'compiled ({scope})' if args.compile else 'eager'}"
          f"{', guided' if args.guided else ''}, "
          f"{'torch.nn.Linear' if args.native_linear else 'meanflow Linear'}, "
          f"JVP attention {args.jvp_attention}", flush=True)

    # ---- flow matching
    fm_rec = find_fm_record(args.fm_ref, key)
    if fm_rec is None and args.compile:  # the other compile scope's FM is a fair stand-in
        other = {**key, "compile_scope": "loss" if scope == "model" else "model"}
        fm_rec = find_fm_record(args.fm_ref, other)
    if fm_rec is not None:
        print(f"flow matching: reusing the record of {fm_rec.get('time')} from {args.fm_ref}"
              + (f" (compile scope {fm_rec.get('compile_scope')})"
                 if fm_rec.get("compile_scope") != scope else ""))
    else:
        fm_rec = {**base, "strategy": "fm", "status": "ok", "error": None}
        _PENDING["rec"] = fm_rec
        try:
            fm_rec["phase"] = "timing"
            fm_call = caller(fm)
            fm_step = make_step(fm_call)
            fm_time, fm_times, fm_warm = time_steps(fm_step, args.repeats, warmup, device)
            fm_rec.update(fm_ms=fm_time * 1e3, fm_img_s=args.batch / fm_time,
                          fm_times_ms=[round(s * 1e3, 3) for s in fm_times],
                          warmup_s=round(fm_warm, 2), phase="memory")
            fm_peak, mem_base = peak_mib(fm_step, device)
            fm_rec.update(fm_peak_mib=fm_peak, mem_base_mib=mem_base,
                          fm_saved_bytes=saved(fm_call), phase="profile")
            if profile:
                fm_rec.update(profiled_attention(fm_step, device, args.compile, has_attention))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc(limit=-8)
            fm_rec.update(status="FAILED", error=first_line(exc))
            net.zero_grad(set_to_none=True)
            free_memory(device)
        fm_rec.pop("phase", None)
        if args.compile:
            fm_rec["dynamo"] = dynamo_stats()
        _PENDING["rec"] = None
        append_json(args.json, fm_rec)
    fm_ms, fm_peak = fm_rec.get("fm_ms"), fm_rec.get("fm_peak_mib")
    if fm_ms is not None:
        print(f"flow matching step: {fm_ms:.2f} ms, {args.batch / fm_ms * 1e3:.0f} samples/s"
              + (f", peak {fm_peak:.0f} MiB" if fm_peak else "")
              + (f", attention: {fm_rec['attn_path']}" if fm_rec.get("attn_path") else ""),
              flush=True)
    if fm_rec["status"] != "ok":
        print(f"flow matching: {fm_rec['status']} ({fm_rec['error']})", flush=True)

    # ---- MeanFlow, per strategy
    if strategies:
        print(f"{'strategy':12s} {'ms/step':>9s} {'time/FM':>8s} {'/(4/3)':>6s} "
              f"{'saved/FM':>9s} {'peak/FM':>8s} {'img/s':>7s} {'err':>8s}  attention / notes",
              flush=True)
    for strategy in strategies:
        rec = {**base, "strategy": strategy, "status": "ok", "error": None,
               "fm_ms": fm_ms, "fm_img_s": fm_rec.get("fm_img_s"), "fm_peak_mib": fm_peak,
               "fm_compile_scope": fm_rec.get("compile_scope")}
        _PENDING["rec"] = rec
        mf = MeanFlowLoss(jvp=strategy, **objective, **cond, **guidance)
        failures, check_raised = [], False
        free_memory(device)
        try:
            rec["phase"] = "du/dt check"
            if args.compile or args.amp != "fp32":
                td, ud = derivatives(strategy)
                rec.update(check_dudt(net, td, ud, strategy, check_batch, args.amp, device))
            tol = TOLERANCE[args.amp]
            for name in ("err_vs_eager", "err_train_vs_eager"):
                if name in rec and not rec[name] <= tol:
                    failures.append(f"{name} {rec[name]:.2e} > {tol:g}")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc(limit=-8)
            failures.append(f"du/dt check raised {first_line(exc)}")
            check_raised = True
            free_memory(device)
        if check_raised and not args.time_failed:
            failures.append("not timed (the same compiled path raised in the check; "
                            "--time-failed times it anyway)")
        else:
            try:
                rec["phase"] = "timing"
                mf_call = caller(mf)
                mf_step = make_step(mf_call)
                mf_time, mf_times, mf_warm = time_steps(mf_step, args.repeats, warmup, device)
                ratio = mf_time * 1e3 / fm_ms if fm_ms else None
                rec.update(mf_ms=mf_time * 1e3, mf_img_s=args.batch / mf_time,
                           mf_times_ms=[round(s * 1e3, 3) for s in mf_times],
                           warmup_s=round(mf_warm, 2), ratio=ratio,
                           ratio_to_floor=ratio / FLOOR if ratio else None, phase="memory")
                mf_peak, mem_base = peak_mib(mf_step, device)
                mf_saved = saved(mf_call)
                rec.update(mf_peak_mib=mf_peak, mem_base_mib=mem_base,
                           peak_ratio=mf_peak / fm_peak if (mf_peak and fm_peak) else None,
                           mf_saved_bytes=mf_saved,
                           saved_ratio=(mf_saved / fm_rec["fm_saved_bytes"]
                                        if mf_saved and fm_rec.get("fm_saved_bytes") else None))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(limit=-8)
                failures.append(first_line(exc))
                net.zero_grad(set_to_none=True)  # an OOM mid-step leaves gradients behind
                free_memory(device)
        if (strategy.startswith("split") and has_dropout(net) and "mf_ms" in rec
                and scope != "loss"):
            rec["phase"] = "dropout check"
            try:
                diff = dropout_mismatch(model, strategy, check_batch, args.amp, device)
                if diff is not None:
                    rec["dropout_u_diff"] = {"rewound": diff[0], "fresh_masks": diff[1]}
                    if diff[0] > 0.5 * diff[1]:
                        failures.append(f"dropout masks differ between the JVP and grad passes "
                                        f"(u differs by {diff[0]:.1e}, fresh masks "
                                        f"{diff[1]:.1e})")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"dropout check raised {first_line(exc)}")
        if profile and "mf_ms" in rec:
            rec["phase"] = "profile"
            rec.update(profiled_attention(mf_step, device, args.compile, has_attention))
        rec.pop("phase", None)
        if failures:
            rec.update(status="FAILED", error="; ".join(failures))
        if args.compile:
            rec["dynamo"] = dynamo_stats()
        _PENDING["rec"] = None
        append_json(args.json, rec)
        print_row(rec, flush=True)

    # ---- matrix products of one loss evaluation (no backward)
    count = args.count_products == "on" or (
        args.count_products == "auto" and device.type == "cpu" and not preset.big
        and not args.compile)
    if count and strategies:
        print_products(net, model, fm, objective, cond, guidance, strategies, x, y, ctx)


def print_row(rec: dict, flush: bool = False) -> None:
    def num(value, fmt, width):
        return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'n/a':>{width}}"

    err = rec.get("err_vs_eager", rec.get("err_bf16_vs_fp32"))
    notes = [rec.get("attn_path") or ""]
    if rec.get("err_bf16_vs_fp32") is not None and rec.get("err_vs_eager") is not None:
        notes.insert(0, f"bf16-vs-fp32 {rec['err_bf16_vs_fp32']:.1e}")
    if rec["status"] != "ok":
        notes.insert(0, f"{rec['status']}: {rec['error']}")
    notes = " | ".join(n for n in notes if n)
    print(f"{rec['strategy']:12s} {num(rec.get('mf_ms'), '.2f', 9)} "
          f"{num(rec.get('ratio'), '.2f', 8)} {num(rec.get('ratio_to_floor'), '.2f', 6)} "
          f"{num(rec.get('saved_ratio'), '.2f', 9)} {num(rec.get('peak_ratio'), '.2f', 8)} "
          f"{num(rec.get('mf_img_s'), '.0f', 7)} {num(err, '.1e', 8)}  {notes}", flush=flush)


def print_products(net, model, fm, objective, cond, guidance, strategies, x, y, ctx) -> None:
    """FM's count is one forward; a MeanFlow step adds the JVP, which needs exactly one more
    product per Linear layer (the input tangent times the weights) when the weights' zero
    tangent is skipped."""
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    n_attn = sum(type(m).__name__ == "Attention" for m in net.modules())
    with ctx():
        counts = {"flow matching": count_products(lambda: fm(model, x, y))}
        for strategy in strategies:
            mf = MeanFlowLoss(jvp=strategy, **objective, **cond, **guidance)
            counts[strategy] = count_products(lambda: mf(model, x, y))
    print(f"matrix products per loss evaluation, {n_linear} Linear layers"
          + (f" and {n_attn} attention layers (whose own products add to these)" if n_attn
             else f" (least possible: split {3 * n_linear} = JVP {2 * n_linear} + grad "
                  f"forward {n_linear}; joint {2 * n_linear})") + ":")
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# ----------------------------------------------------------------------------- summary
def _mode(rec: dict) -> str:
    if not rec.get("compile"):
        return "eager"
    return "c-los" if rec.get("compile_scope") == "loss" else "c-mod"


def summarize(paths: list[str]) -> None:
    """A compact table of step and sample records (JSON lines) from the given files."""
    records = []
    for path in paths:
        if not os.path.exists(path):
            print(f"# {path}: no such file")
            continue
        with open(path) as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    devices = sorted({f"{r.get('device')} / torch {r.get('torch')}" for r in records
                      if r.get("device")})
    for d in devices:
        print(f"# {d}")
    print("# mode: eager, c-mod = torch.compile(model), c-los = the whole loss compiled; "
          "err: compiled du/dt vs eager (else bf16 vs fp32 du/dt)")

    def f(value, fmt=".2f"):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    steps = [r for r in records if r.get("bench") == "step"]
    if steps:
        print(f"{'model':12s} {'batch':>5s} {'amp':4s} {'mode':5s} {'strategy':10s} "
              f"{'status':6s} {'ms FM':>8s} {'ms MF':>8s} {'MF/FM':>6s} {'/(4/3)':>6s} "
              f"{'MiB FM':>7s} {'MiB MF':>7s} {'mem':>5s} {'img/s MF':>8s} {'err':>7s}  "
              f"attention / notes")
        for r in steps:
            err = r.get("err_vs_eager")
            if err is None:
                err = r.get("err_bf16_vs_fp32")
            note = r.get("attn_path") or ""
            if r.get("status") != "ok":
                note = f"{r.get('error')}" + (f" | {note}" if note else "")
            ms_mf = r.get("mf_ms")
            print(f"{r.get('model', '?'):12s} {r.get('batch', 0):5d} {r.get('amp', ''):4s} "
                  f"{_mode(r):5s} {r.get('strategy', ''):10s} "
                  f"{r.get('status', ''):6s} {f(r.get('fm_ms')):>8s} {f(ms_mf):>8s} "
                  f"{f(r.get('ratio')):>6s} {f(r.get('ratio_to_floor')):>6s} "
                  f"{f(r.get('fm_peak_mib'), '.0f'):>7s} {f(r.get('mf_peak_mib'), '.0f'):>7s} "
                  f"{f(r.get('peak_ratio')):>5s} {f(r.get('mf_img_s'), '.0f'):>8s} "
                  f"{f(err, '.1e'):>7s}  {note[:90]}")
    samples = [r for r in records if r.get("bench") == "sample"]
    if samples:
        print(f"{'sampling':12s} {'batch':>5s} {'amp':4s} {'mode':5s} {'NFE':>3s} "
              f"{'status':6s} {'ms':>8s} {'img/s':>8s} {'MiB':>7s}  attention / notes")
        for r in samples:
            note = r.get("attn_path") or ""
            if r.get("status") != "ok":
                note = f"{r.get('error')}" + (f" | {note}" if note else "")
            print(f"{r.get('model', '?'):12s} {r.get('batch', 0):5d} {r.get('amp', ''):4s} "
                  f"{_mode(r):5s} {r.get('steps', 1):3d} "
                  f"{r.get('status', ''):6s} {f(r.get('ms')):>8s} {f(r.get('img_s'), '.0f'):>8s} "
                  f"{f(r.get('peak_mib'), '.0f'):>7s}  {note[:90]}")
    attn = [r for r in records if r.get("bench") == "attention_jvp"]
    if attn:
        print(f"{'attention JVP':14s} {'dtype':5s} {'tokens':>6s} {'batch':>5s} {'fwd ms':>7s} "
              f"{'math ms':>8s} {'chunk ms':>8s} {'MiB math':>8s} {'MiB chunk':>9s} "
              f"{'err chunk':>9s}")
        for r in attn:
            print(f"{r.get('device', ''):14s} {r.get('dtype', ''):5s} {r.get('tokens', 0):6d} "
                  f"{r.get('batch', 0):5d} {f(r.get('fwd_ms'), '.3f'):>7s} "
                  f"{f(r.get('math_ms'), '.3f'):>8s} {f(r.get('chunk_ms'), '.3f'):>8s} "
                  f"{f(r.get('math_mib'), '.0f'):>8s} {f(r.get('chunk_mib'), '.0f'):>9s} "
                  f"{f(r.get('chunk_err'), '.1e'):>9s}")
    other = [r for r in records if r.get("bench") == "suite"]
    for r in other:
        print(f"suite: {r.get('item')} {r.get('status')} {r.get('note', '')}")


if __name__ == "__main__":
    main()
