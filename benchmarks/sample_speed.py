"""One-step (1-NFE) sampling throughput with ``meanflow.sample``, in images/s.

For each requested precision (fp32, bf16 autocast) and mode (eager, ``torch.compile``) it times
``sample(net, noise, steps, y)`` on one batch of noise (eval mode, no grad): the median of
``--repeats`` calls after warm-up, the peak memory above the start (CUDA), and which attention
kernels ran. Backbones are the presets of ``benchmarks/_presets.py``; default batch 512 for
``unet-cifar10``, 256 for ``dit-b/2``, 64 otherwise; ``--guided`` samples a class-conditional
model with random labels. Items (e) of ``benchmarks/gpu_suite.sh``:

    python benchmarks/sample_speed.py [--model unet-cifar10] [--batch 512] [--amp fp32 bf16]
        [--compile off|on|both] [--steps 1] [--repeats 10] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _presets  # noqa: E402  (benchmarks/: the scripts' shared helpers)
import _timing as tm  # noqa: E402

from meanflow import sample  # noqa: E402

DEFAULT_BATCH = {"unet-cifar10": 512, "dit-b/2": 256}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-cifar10", choices=sorted(_presets.PRESETS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--steps", type=int, default=1, help="network calls per sample")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default 3; 5 when compiled)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--guided", action="store_true", help="class-conditional, random labels")
    parser.add_argument("--json", default=None, help="append JSON lines to this file")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tm.install_term_handler(args.json)
    device = tm.get_device(args.device)
    batch = args.batch or DEFAULT_BATCH.get(args.model, 64)
    net = _presets.build(args.model, device, args.guided).eval()
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    noise, y = _presets.batch(args.model, batch, device, args.guided)
    attention = any(type(m).__name__ == "Attention" for m in net.modules())
    print(f"# sampling {args.model} ({params_m:.1f}M params), batch {batch}, {args.steps} NFE, "
          f"{tm.device_name(device)}, torch {torch.__version__}", flush=True)
    records = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        if compiled:
            tm.raise_recompile_limit()
        model = torch.compile(net) if compiled else net
        warmup = args.warmup if args.warmup is not None else (5 if compiled else 3)
        for amp in args.amp:
            ctx = tm.amp_context(device, amp)
            rec = {"bench": "sample", **tm.env_record(device), "model": args.model,
                   "params_M": round(params_m, 2), "batch": batch, "amp": amp,
                   "compile": compiled, "guided": args.guided, "steps": args.steps,
                   "repeats": args.repeats, "warmup": warmup, "status": "ok", "error": None}

            def call() -> torch.Tensor:
                with ctx():
                    return sample(model, noise, args.steps, y)

            with tm.in_progress(rec):
                try:
                    rec["phase"] = "warm-up and timing"
                    tm.free_memory(device)
                    s, times, warm_s = tm.time_steps(call, args.repeats, warmup, device)
                    peak, base = tm.peak_mib(call, device)
                    out = call()
                    rec.update(ms=s * 1e3, img_s=batch / s, warmup_s=round(warm_s, 2),
                               times_ms=[round(x * 1e3, 3) for x in times], peak_mib=peak,
                               mem_base_mib=base, out_dtype=str(out.dtype).replace("torch.", ""),
                               finite=bool(torch.isfinite(out).all()))
                    if not args.no_profile and (attention or compiled):
                        rec.update(tm.attention_path(call, device, compiled, attention))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc(limit=-8)
                    rec.update(status="FAILED", error=tm.first_line(exc))
                    tm.free_memory(device)
            tm.append_json(args.json, rec)
            records.append(rec)
            mode = "compiled" if compiled else "eager"
            if rec["status"] != "ok":
                print(f"{amp:4s} {mode:8s} FAILED: {rec['error']}", flush=True)
                continue
            print(f"{amp:4s} {mode:8s} {rec['ms']:9.2f} ms {rec['img_s']:9.0f} images/s"
                  + (f", peak {rec['peak_mib']:.0f} MiB" if rec["peak_mib"] else "")
                  + (f", warm-up {rec['warmup_s']:.1f} s" if compiled else "")
                  + (f", attention: {rec['attn_path']}" if rec.get("attn_path") else ""),
                  flush=True)
    return records


if __name__ == "__main__":
    main()
