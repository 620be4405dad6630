"""Measuring helpers shared by the scripts in benchmarks/ (not part of the library).

Timing (median of synchronised calls; CUDA events on a GPU), peak memory above a step's start,
bytes an autograd graph keeps for backward, matrix products of one call, which attention kernels
ran (profiler), and JSON-lines records with a SIGTERM handler that records the measurement in
progress as TIMEOUT (the GPU suite runs every item under ``timeout``).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import time
import weakref
from typing import Any, Callable, Iterator

import torch

FLOOR = 4 / 3   # MeanFlow/FM floor of a matmul-bound net: the JVP adds one forward's work


# ----------------------------------------------------------------------------- devices
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def get_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thr)"


def amp_context(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the precision context: bf16 autocast, or nothing for fp32."""
    if amp == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp32; inf when not finite."""
    got, ref = got.detach().float(), ref.detach().float()
    value = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    return value if math.isfinite(value) else float("inf")


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def loadavg() -> list[str]:
    """The 1, 5 and 15-minute load averages where the system reports them."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[:3]
    except OSError:
        return [f"{x:.2f}" for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


# ----------------------------------------------------------------------------- time, memory
def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one synchronised call."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_steps(step: Callable[[], Any], repeats: int, warmup: int,
               device: torch.device) -> tuple[float, list[float], float]:
    """(median seconds, all timed seconds, seconds spent warming up incl. compilation)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    if device.type != "cuda":
        times = [seconds(step, device) for _ in range(repeats)]
    else:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        sync(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    return statistics.median(times), times, warm_s


def median_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``repeats`` calls after one untimed call."""
    return time_steps(fn, repeats, 1, device)[0] * 1e3


def peak_mib(step: Callable[[], Any], device: torch.device) -> tuple[float | None, float | None]:
    """(peak allocated MiB during one call *above* what was allocated before it, that base in
    MiB); None off CUDA. Measuring above the base keeps what an earlier measurement left
    allocated out of the ratio."""
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
    """What the graph holds for one saved tensor: a box that can be emptied afterwards."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of distinct tensor storages that ``fn``'s autograd graph keeps for backward.

    Each saved tensor goes into a box that the graph holds; boxes of graph parts freed during
    ``fn`` (e.g. the split strategy's no-grad JVP) die and are not counted. An output saved by
    its own node makes a reference cycle through the graph that Python's GC cannot see, so the
    boxes are emptied before the graph is dropped: otherwise every call leaks a whole graph
    (seen on the GPU as memory growing by one training step per measurement).
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


# ----------------------------------------------------------------------------- profiler
_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution")
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


def count_products(fn: Callable[[], Any]) -> int:
    """Matrix products (mm, addmm, bmm, convolution) one call runs, from the CPU profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in _PRODUCTS)


def attention_path(fn: Callable[[], Any], device: torch.device, compiled: bool,
                   attention: bool = True) -> dict[str, Any]:
    """Which attention implementations one call ran (aten ops, and GPU kernels on CUDA) and,
    when compiled, how many compiled-graph executions it made ("NO compiled graph ran": Dynamo
    fell back to eager): ``{"attn_ops": {...}, "attn_path": "..."}``. A profiler failure is
    recorded, not raised."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    gpu = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    try:
        try:
            with torch.profiler.profile(activities=cpu + gpu) as prof:
                fn()
                sync(device)
        except Exception:  # noqa: BLE001  (no CUPTI: the aten ops alone still name the kernels)
            with torch.profiler.profile(activities=cpu) as prof:
                fn()
                sync(device)
        ops: dict[str, int] = {}
        for event in prof.key_averages():
            key = event.key[:120]
            if any(w in key.lower() for w in _ATTN_WORDS) or key.startswith(_REGION):
                ops[key] = ops.get(key, 0) + event.count
    except Exception as exc:  # noqa: BLE001
        return {"attn_path": f"profiler failed: {first_line(exc)}"}
    regions = {k: n for k, n in ops.items() if k.startswith(_REGION)}
    parts = [f"{label} x{ops[key]}" for key, label in _ATTN_OPS if ops.get(key)]
    if compiled:
        fused = sum(n for k, n in ops.items() if k.startswith("triton") and "softmax" in k)
        parts += [f"inductor-softmax-kernels x{fused}"] if fused else []
    if attention and not parts:
        parts.append("no attention op seen")
    if compiled:
        calls = sum(regions.values())
        parts.append(f"compiled regions: {calls} runs of {len(regions)} graphs" if calls
                     else "NO compiled graph ran (eager fallback)")
    top = dict(sorted(((k, n) for k, n in ops.items() if k not in regions),
                      key=lambda kv: -kv[1])[:16])
    return {"attn_ops": top | dict(sorted(regions.items())), "attn_path": ", ".join(parts)}


def raise_recompile_limit() -> None:
    """Grad/no-grad, dual/plain and train/eval calls each compile a graph: allow them all, so
    that no variant silently falls back to eager (``torch._dynamo.config``, torch's documented
    knobs; graph breaks themselves are shown with ``TORCH_LOGS=graph_breaks``)."""
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 512


# ----------------------------------------------------------------------------- records
def env_record(device: torch.device) -> dict[str, Any]:
    rec = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_name(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        rec["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        rec["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return rec


def append_json(path: str | None, record: dict) -> None:
    """Appends one JSON line to ``path`` (nothing when None), creating its folder."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def read_json_lines(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file; lines that do not parse are skipped."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


_PENDING: dict[str, Any] = {"rec": None, "path": None}


def _on_term(signum: int, frame: Any) -> None:
    rec = _PENDING["rec"]
    if rec is not None:
        rec.update(status="TIMEOUT",
                   error=f"stopped by signal {signum} during {rec.pop('phase', '?')}")
        append_json(_PENDING["path"], rec)
        print(f"{rec.get('strategy', rec.get('amp'))}: TIMEOUT ({rec['error']})", flush=True)
    os._exit(124)


def install_term_handler(json_path: str | None) -> None:
    """On SIGTERM (``timeout``), write the record of :func:`in_progress` as TIMEOUT and exit
    with 124."""
    _PENDING["path"] = json_path
    signal.signal(signal.SIGTERM, _on_term)


@contextlib.contextmanager
def in_progress(rec: dict) -> Iterator[dict]:
    """Marks ``rec`` as the measurement under way (its ``phase`` key says which part)."""
    _PENDING["rec"] = rec
    try:
        yield rec
    finally:
        _PENDING["rec"] = None
        rec.pop("phase", None)
