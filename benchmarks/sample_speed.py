"""One-step (1-NFE) sampling throughput with ``meanflow.sampling.sample``, in images/s.

For each requested (precision, mode) it times ``sample(net, noise, steps)`` on one batch of
noise (eval mode, no grad), the median of ``--repeats`` calls after warm-up, and records the
peak memory and which attention implementation ran (the sampler calls the net with grad off,
which ``models/attention.py`` routes to the explicit softmax).

    python benchmarks/sample_speed.py [--model unet-cifar10] [--batch 512] [--amp fp32 bf16]
                                      [--compile off|on|both] [--steps 1] [--json PATH]

Default batch: 512 for unet-cifar10, 256 for dit-b/2, 64 otherwise. Presets are those of
``step_cost.py``; ``--guided`` samples a class-conditional model with random labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_cost as sc  # noqa: E402  (the benchmarks' shared helpers)

from meanflow.sampling import sample  # noqa: E402

DEFAULT_BATCH = {"unet-cifar10": 512, "dit-b/2": 256}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-cifar10", choices=sorted(sc.PRESETS))
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
    sc.install_term_handler(args.json)  # a `timeout` kill records the run in progress
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu")
    preset = sc.PRESETS[args.model]
    batch = args.batch or DEFAULT_BATCH.get(args.model, 64)
    torch.manual_seed(0)
    net = sc.build(args.model, device, args.guided).eval()
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    gen = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(batch, *preset.shape, device=device, generator=gen)
    y = (torch.randint(0, preset.num_classes, (batch,), device=device, generator=gen)
         if args.guided else None)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    compiled_net = None
    print(f"# sampling {args.model} ({params_m:.1f}M params), batch {batch}, {args.steps} NFE, "
          f"device {sc.device_name(device)}, torch {torch.__version__}", flush=True)
    for compiled in modes:
        if compiled and compiled_net is None:
            sc.raise_recompile_limit()
            compiled_net = torch.compile(net)
        model = compiled_net if compiled else net
        warmup = args.warmup if args.warmup is not None else (5 if compiled else 3)
        for amp in args.amp:
            ctx = sc.amp_context(device, amp)
            rec = {"bench": "sample", **sc.env_record(device), "model": args.model,
                   "params_M": round(params_m, 2), "batch": batch, "amp": amp,
                   "compile": compiled, "guided": bool(args.guided), "steps": args.steps,
                   "repeats": args.repeats, "warmup": warmup, "status": "ok", "error": None}

            def call() -> torch.Tensor:
                with ctx():
                    return sample(model, noise, args.steps, y)

            sc._PENDING["rec"] = rec
            try:
                rec["phase"] = "warm-up and timing"
                sc.free_memory(device)
                seconds, times, warm_s = sc.time_steps(call, args.repeats, warmup, device)
                peak, base = sc.peak_mib(call, device)
                out = call()
                rec.update(ms=seconds * 1e3, img_s=batch / seconds, warmup_s=round(warm_s, 2),
                           times_ms=[round(s * 1e3, 3) for s in times], peak_mib=peak,
                           mem_base_mib=base, out_dtype=str(out.dtype).replace("torch.", ""),
                           finite=bool(torch.isfinite(out).all()))
                attention = any(type(m).__name__ == "Attention" for m in net.modules())
                if not args.no_profile and (attention or compiled):
                    rec.update(sc.profiled_attention(call, device, compiled, attention))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(limit=-8)
                rec.update(status="FAILED", error=sc.first_line(exc))
                sc.free_memory(device)
            rec.pop("phase", None)
            if compiled:
                rec["dynamo"] = sc.dynamo_stats()
            sc._PENDING["rec"] = None
            sc.append_json(args.json, rec)
            if rec["status"] == "ok":
                print(f"{amp:4s} {'compiled' if compiled else 'eager':8s} {rec['ms']:9.2f} ms "
                      f"{rec['img_s']:9.0f} images/s"
                      + (f", peak {peak:.0f} MiB" if peak else "")
                      + (f", warm-up {warm_s:.1f} s" if compiled else "")
                      + (f", attention: {rec['attn_path']}" if rec.get("attn_path") else ""),
                      flush=True)
            else:
                print(f"{amp:4s} {'compiled' if compiled else 'eager':8s} FAILED: {rec['error']}",
                      flush=True)


if __name__ == "__main__":
    main()
