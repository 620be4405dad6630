"""Cost of a MeanFlow training step relative to flow matching, per du/dt strategy.

Measures, on one backbone and batch (presets in ``benchmarks/_presets.py``), the time of one
MeanFlow step (loss + backward, ``MeanFlowLoss(jvp=strategy)``) over one flow-matching step
(``FlowMatchingLoss``), for each strategy of ``meanflow.objective.JVP_STRATEGIES``; the bytes
the autograd graph keeps for backward relative to flow matching (eager only); on CUDA the peak
memory of a step above its start, relative to flow matching; and on the CPU (small presets,
eager) the matrix products of one loss evaluation (the floor of a matmul-bound net is 4/3 of
flow matching's time; the split strategy needs exactly one more product per Linear layer than
its JVP's two, docs/design.md). The default runs the MLP preset on the CPU:

    python benchmarks/step_cost.py
    python benchmarks/step_cost.py --model dit-s/2 --repeats 5
    python benchmarks/step_cost.py --model unet-cifar10 --batch 128 --amp bf16   # a GPU
    python benchmarks/step_cost.py --summarize PATH.jsonl                         # a table

Options: ``--device cpu|cuda``, ``--threads N``, ``--strategies split,func`` (``none``: flow
matching only), ``--native-linear`` (every ``layers.Linear`` swapped for ``torch.nn.Linear``),
``--jvp-attention math|chunked|triton`` (``set_jvp_attention``, checked at start-up),
``--amp bf16`` (loss and backward under bf16 autocast; ``--jvp-precision fp32|amp`` as
``objective.jvp_precision``; records du/dt's bf16 error against fp32), ``--guided``
(class-conditional, guidance omega 1, kappa 0.5, label dropout 0.1), ``--compile
[--compile-scope model|loss]`` (``torch.compile`` of the model, or of the whole loss
evaluation; every strategy's du/dt is first compared with eager and a strategy whose check
raised is not timed), ``--json PATH`` (one JSON line per measurement), ``--fm-ref PATH``
(reuse a matching flow-matching record: the GPU suite runs each compiled strategy in its own
process), ``--no-profile`` (skip the profiled step that names the attention kernels that ran),
``--count-products auto|on|off``. With dropout the split strategy is checked (eagerly) to draw
the same masks in its JVP and grad passes. A SIGTERM records the measurement under way as
TIMEOUT.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _presets  # noqa: E402  (benchmarks/: the scripts' shared helpers)
import _timing as tm  # noqa: E402

from meanflow.models.attention import check_attention_jvp, set_jvp_attention  # noqa: E402
from meanflow.objective import (JVP_STRATEGIES, FlowMatchingLoss, JVPStrategy,  # noqa: E402
                                MeanFlowLoss, resolve_jvp, u_and_dudt)

TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}   # compiled du/dt against eager, relative
KEY = ("model", "batch", "amp", "compile", "compile_scope", "guided", "native_linear", "device",
       "torch")  # what a flow-matching record of --fm-ref must match


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=sorted(_presets.PRESETS))
    p.add_argument("--batch", type=int, default=None, help="default: the preset's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (3; 5 compiled)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--strategies", nargs="*", default=None, help="comma or space separated")
    p.add_argument("--native-linear", action="store_true")
    p.add_argument("--jvp-attention", choices=("math", "chunked", "triton"), default="math")
    p.add_argument("--amp", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--jvp-precision", choices=("fp32", "amp"), default="fp32")
    p.add_argument("--guided", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-scope", choices=("model", "loss"), default="model")
    p.add_argument("--json", default=None, help="append JSON lines to this file")
    p.add_argument("--fm-ref", default=None, help="reuse its matching flow-matching record")
    p.add_argument("--count-products", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSONL")
    return p.parse_args(argv)


def parse_strategies(items: list[str] | None) -> list[str]:
    names = [s for item in items or [] for s in item.split(",") if s] or list(JVP_STRATEGIES)
    if names == ["none"]:
        return []
    unknown = [s for s in names if s not in JVP_STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}: choose from {', '.join(JVP_STRATEGIES)}"
                         " or 'none' (flow matching only)")
    return names


def find_fm(path: str | None, key: dict) -> dict | None:
    """The last flow-matching record of ``path`` that matches ``key``."""
    found = None
    if path and Path(path).exists():
        for rec in tm.read_json_lines(path):
            if rec.get("bench") == "step" and rec.get("strategy") == "fm" and all(
                    rec.get(k) == v for k, v in key.items()):
                found = rec
    return found


def check_dudt(net, model, scope: str | None, strategy: str, batch: tuple, amp: str,
               jvp_amp: bool, device: torch.device) -> dict[str, Any]:
    """Dropout off: (u, du/dt) of the compiled path the timed step runs (the compiled model, or
    the whole evaluation compiled) against eager ``net``; under bf16 also du/dt with the JVP in
    bf16 against fp32. Raises what the compiled code raises."""
    z, r, t, v, y = batch
    ctx, jvp, out = tm.amp_context(device, amp), JVPStrategy(strategy, autocast=jvp_amp), {}
    was_training = net.training
    net.eval()
    try:
        with ctx():
            u_ref, d_ref = jvp.u_and_dudt(net, z, r, t, v, y)
        out["dudt_dtype"] = str(d_ref.dtype).replace("torch.", "")
        if amp != "fp32":
            with torch.no_grad():
                with ctx():
                    d_amp = JVPStrategy(strategy, autocast=True).u_and_dudt(net, *batch)[1]
                d_32 = JVPStrategy(strategy).u_and_dudt(net, *batch)[1]
            out["err_bf16_vs_fp32"] = tm.rel_err(d_amp, d_32)
        if scope is not None:
            fn = (lambda *b: jvp.u_and_dudt(model, *b)) if scope == "model" else \
                torch.compile(lambda *b: jvp.u_and_dudt(net, *b))
            with ctx():
                u_got, d_got = fn(z, r, t, v, y)
            out["err_vs_eager"] = max(tm.rel_err(d_got, d_ref), tm.rel_err(u_got, u_ref))
    finally:
        net.train(was_training)
    return out


def dropout_check(net, batch: tuple, amp: str, device: torch.device) -> tuple[float, float]:
    """(u of ``split`` against u of one ``forward_ad`` pass from the same RNG state, u of a
    second ``split`` call, with fresh masks, against the same): the split strategy rewinds the
    RNG between its JVP and grad passes, so the first is a rounding-level difference, far below
    the second, where the masks differ."""
    z, r, t, v, y = batch
    state = (torch.get_rng_state(),
             torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    with tm.amp_context(device, amp)():   # grad on: the grad pass takes the training path
        u_one, _ = u_and_dudt(net, z, r, t, v, y, strategy="forward_ad")
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        u_split, _ = u_and_dudt(net, z, r, t, v, y, strategy="split")
        u_fresh, _ = u_and_dudt(net, z, r, t, v, y, strategy="split")
    return tm.rel_err(u_split, u_one), tm.rel_err(u_fresh, u_one)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        import summarize
        summarize.main(args.summarize)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    tm.install_term_handler(args.json)
    strategies = parse_strategies(args.strategies)
    preset, device = _presets.PRESETS[args.model], tm.get_device(args.device)
    B = args.batch = args.batch or preset.batch
    warmup = args.warmup if args.warmup is not None else (5 if args.compile else 3)
    scope = args.compile_scope if args.compile else None
    net = _presets.build(args.model, device, args.guided, args.native_linear)
    if args.jvp_attention != "math":
        set_jvp_attention(net, args.jvp_attention)
        fn = None
        if args.jvp_attention == "triton":
            from meanflow.models.attention_triton import attention_jvp_triton as fn
        check_attention_jvp(fn, dim=16, device=device)  # fails loudly if the rule is not used
    if args.compile:
        tm.raise_recompile_limit()
    model = torch.compile(net) if scope == "model" else net
    ctx = tm.amp_context(device, args.amp)
    x, y = _presets.batch(args.model, B, device, args.guided)
    e, _ = _presets.batch(args.model, B, device, seed=1)
    t = torch.rand(B, device=device, generator=torch.Generator(device).manual_seed(2))
    r = t * torch.rand(B, device=device, generator=torch.Generator(device).manual_seed(3))
    tt = t.reshape(-1, *[1] * (x.ndim - 1))
    check_batch = ((1 - tt) * x + tt * e, r, t, e - x, y)   # (z, r, t, v, y)
    objective = {**preset.objective, "jvp_precision": args.jvp_precision}
    cond = {"num_classes": preset.num_classes, "label_drop": 0.1} if args.guided else {}
    guide = {"omega": 1.0, "kappa": 0.5} if args.guided else {}
    fm = FlowMatchingLoss(**{k: v for k, v in objective.items() if k in ("mu", "sigma")}, **cond)

    def caller(loss_fn) -> Callable[[], Any]:
        if scope == "loss":   # the whole loss evaluation compiled, the JVP traced by Dynamo
            compiled = torch.compile(lambda xx, yy: loss_fn(net, xx, yy))
            return lambda: compiled(x, y)
        return lambda: loss_fn(model, x, y)

    def measure(prefix: str, call: Callable[[], Any], rec: dict) -> None:
        def step() -> None:
            with ctx():
                loss, _ = call()
                loss.mean().backward()
            net.zero_grad(set_to_none=True)

        rec["phase"] = "timing"
        s, times, warm_s = tm.time_steps(step, args.repeats, warmup, device)
        rec.update({f"{prefix}_ms": s * 1e3, f"{prefix}_img_s": B / s, "warmup_s": warm_s,
                    f"{prefix}_times_ms": [round(x * 1e3, 3) for x in times], "phase": "memory"})
        rec[f"{prefix}_peak_mib"], rec["mem_base_mib"] = tm.peak_mib(step, device)
        if not args.compile:   # saved-tensor hooks and compiled graphs do not mix
            rec[f"{prefix}_saved_bytes"] = tm.saved_bytes(lambda: _under(ctx, call))
        if not args.no_profile and (has_attention or args.compile):
            rec["phase"] = "profile"
            rec.update(tm.attention_path(step, device, args.compile, has_attention))

    has_attention = any(type(m).__name__ == "Attention" for m in net.modules())
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    base = {"bench": "step", **tm.env_record(device), "model": args.model,
            "params_M": round(params_m, 2), "batch": B, "amp": args.amp,
            "compile": args.compile, "compile_scope": scope, "guided": args.guided,
            "native_linear": args.native_linear, "jvp_attention": args.jvp_attention,
            "jvp_precision": args.jvp_precision, "repeats": args.repeats, "warmup": warmup,
            "objective": {**objective, **guide}}
    auto = resolve_jvp("auto", device_type=device.type, backbone=args.model,
                       compiled=args.compile)
    print(f"# {args.model} ({params_m:.1f}M params) {preset.options}, batch {B}, "
          f"{tm.device_name(device)}, torch {torch.__version__}, {args.amp}, "
          f"{f'compiled ({scope})' if scope else 'eager'}{', guided' if args.guided else ''}, "
          f"{'torch.nn.Linear' if args.native_linear else 'meanflow Linear'}, JVP attention "
          f"{args.jvp_attention}; jvp 'auto' runs {auto} here", flush=True)

    # ---- flow matching, or its record from --fm-ref (a compiled run may take the other scope's)
    key = {k: base[k] for k in KEY}
    fm_rec = find_fm(args.fm_ref, key) or (find_fm(args.fm_ref, {
        **key, "compile_scope": "loss" if scope == "model" else "model"}) if scope else None)
    if fm_rec is None:
        fm_rec = {**base, "strategy": "fm", "status": "ok", "error": None}
        with tm.in_progress(fm_rec):
            try:
                measure("fm", caller(fm), fm_rec)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(limit=-8)
                fm_rec.update(status="FAILED", error=tm.first_line(exc))
                net.zero_grad(set_to_none=True)
                tm.free_memory(device)
        tm.append_json(args.json, fm_rec)
    else:
        print(f"flow matching: the record of {fm_rec.get('time')} in {args.fm_ref}")
    fm_ms, fm_peak, fm_saved = (fm_rec.get(k) for k in ("fm_ms", "fm_peak_mib",
                                                         "fm_saved_bytes"))
    print("flow matching step: " + (f"{fm_ms:.2f} ms, {B / fm_ms * 1e3:.0f} samples/s"
                                    if fm_ms else f"{fm_rec['status']} ({fm_rec['error']})")
          + (f", peak {fm_peak:.0f} MiB" if fm_peak else "")
          + (f", attention: {fm_rec['attn_path']}" if fm_rec.get("attn_path") else ""),
          flush=True)

    # ---- MeanFlow, per strategy
    if strategies:
        print(f"{'strategy':12s} {'ms/step':>9s} {'time/FM':>8s} {'/(4/3)':>6s} "
              f"{'saved/FM':>9s} {'peak/FM':>8s} {'img/s':>7s} {'err':>8s}  notes", flush=True)
    for strategy in strategies:
        rec = {**base, "strategy": strategy, "status": "ok", "error": None, "fm_ms": fm_ms,
               "fm_img_s": fm_rec.get("fm_img_s"), "fm_peak_mib": fm_peak,
               "fm_compile_scope": fm_rec.get("compile_scope")}
        mf = MeanFlowLoss(jvp=strategy, **objective, **cond, **guide)
        failures = []
        with tm.in_progress(rec):
            tm.free_memory(device)
            try:
                rec["phase"] = "du/dt check"
                if args.compile or args.amp != "fp32":
                    rec.update(check_dudt(net, model, scope, strategy, check_batch, args.amp,
                                          args.jvp_precision == "amp", device))
                if rec.get("err_vs_eager", 0.0) > TOLERANCE[args.amp]:
                    failures.append(f"compiled du/dt off eager by {rec['err_vs_eager']:.2e}")
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(limit=-8)
                failures.append(f"du/dt check raised {tm.first_line(exc)}; not timed")
            else:
                try:
                    measure("mf", caller(mf), rec)
                    ratio = rec["mf_ms"] / fm_ms if fm_ms else None
                    mf_peak, mf_saved = rec.get("mf_peak_mib"), rec.get("mf_saved_bytes")
                    rec.update(ratio=ratio, ratio_to_floor=ratio / tm.FLOOR if ratio else None,
                               peak_ratio=mf_peak / fm_peak if mf_peak and fm_peak else None,
                               saved_ratio=mf_saved / fm_saved if mf_saved and fm_saved
                               else None)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc(limit=-8)
                    failures.append(tm.first_line(exc))
                    net.zero_grad(set_to_none=True)  # an OOM mid-step leaves gradients behind
                    tm.free_memory(device)
            if strategy == "split" and not args.compile and _presets.has_dropout(net):
                rec["phase"] = "dropout check"
                try:
                    rewound, fresh = dropout_check(net, check_batch, args.amp, device)
                    rec["dropout_u_diff"] = {"rewound": rewound, "fresh_masks": fresh}
                    if rewound > 0.5 * fresh:
                        failures.append(f"split's two passes drew different dropout masks "
                                        f"(u differs by {rewound:.1e}, fresh masks {fresh:.1e})")
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"dropout check raised {tm.first_line(exc)}")
        if failures:
            rec.update(status="FAILED", error="; ".join(failures))
        tm.append_json(args.json, rec)
        print_row(rec)

    count = args.count_products == "on" or (args.count_products == "auto" and not preset.big
                                            and device.type == "cpu" and not args.compile)
    if count and strategies:
        with ctx():
            counts = {"flow matching": tm.count_products(lambda: fm(model, x, y))}
            for strategy in strategies:
                mf = MeanFlowLoss(jvp=strategy, **objective, **cond, **guide)
                counts[strategy] = tm.count_products(lambda: mf(model, x, y))
        n = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
        print(f"matrix products per loss evaluation ({n} Linear layers"
              + (", attention adds its own" if has_attention else
                 f"; least possible: split {3 * n}, joint {2 * n}") + "): "
              + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)


def _under(ctx, call):
    with ctx():
        return call()


def print_row(rec: dict) -> None:
    def num(value, fmt, width):
        return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'n/a':>{width}}"

    err = rec.get("err_vs_eager", rec.get("err_bf16_vs_fp32"))
    notes = [f"{rec['status']}: {rec['error']}" if rec["status"] != "ok" else "",
             rec.get("attn_path") or ""]
    print(f"{rec['strategy']:12s} {num(rec.get('mf_ms'), '.2f', 9)} "
          f"{num(rec.get('ratio'), '.2f', 8)} {num(rec.get('ratio_to_floor'), '.2f', 6)} "
          f"{num(rec.get('saved_ratio'), '.2f', 9)} {num(rec.get('peak_ratio'), '.2f', 8)} "
          f"{num(rec.get('mf_img_s'), '.0f', 7)} {num(err, '.1e', 8)}  "
          f"{' | '.join(n for n in notes if n)}", flush=True)


if __name__ == "__main__":
    main()
