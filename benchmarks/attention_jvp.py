"""Attention under a JVP: the explicit-softmax math path, the chunked JVP rule, Triton.

For each token count it measures one no-grad JVP (``torch.func.jvp``, tangents on Q, K and V)
of ``math_attention`` (PyTorch's own forward-AD rules on the explicit softmax: the (N×N)
matrices of all queries at once) and of ``attention_jvp`` (fused SDPA primal, chunked
online-softmax JVP rule), both from ``meanflow.models.attention``, against the plain fused
forward: median milliseconds, the chunked rule's speed-up over the math path and its time as a
multiple of the forward, peak memory (CUDA: allocated above the start; the CPU: not measured),
and the tangents' relative error against a float64 reference (the chunked function in
float64). A start-up check (``check_attention_jvp``) fails loudly if the JVP rule was dropped.

With triton importable and ``--device cuda`` it also times
``meanflow.models.attention_triton.attention_jvp_triton`` (SDPA primal, fused Triton JVP
kernel; columns ``tri ms``, ``/fwd``, ``tri MiB``, ``err tri``) after its own start-up check;
otherwise it prints why triton is skipped (``--triton off`` skips it, ``--triton on`` makes a
missing one an error). ``--triton-ratio`` measures the kernel against its target, an attention
JVP of at most 3× the fused forward (docs/benchmarks.md, Triton attention JVP): only the fused
SDPA forward and the Triton variants are timed, each as a multiple of that forward: the whole
JVP (SDPA primal + kernel), the kernel alone (``attention_jvp_tangent``) and the kernel reading
the saved SDPA output instead of recomputing it (one product fewer per key block).

    python benchmarks/attention_jvp.py --threads 1 --repeats 3              # the CPU table
    python benchmarks/attention_jvp.py --device cuda --heads 12 --head-dim 64 --dtype bf16 \
        --tokens 256 1024 4096 --batch 64 16 4 [--triton-ratio]            # a GPU
    options: [--chunk N] [--json PATH] [--triton auto|on|off] [--triton-blocks BM BN]

Defaults: CPU, fp32, 2 heads of 32, batch 1, 256/1 024/4 096 tokens (fits a small machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402  (benchmarks/: the scripts' shared helpers)

from meanflow.models.attention import (attention_jvp, check_attention_jvp,  # noqa: E402
                                       math_attention)

TRITON_TARGET = 3.0   # the attention JVP should cost at most 3× the fused (flash) forward


def _inputs(n: int, b: int, args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype) -> tuple:
    """Seeded primals and tangents (3 each, (b, heads, n, head_dim)): float64 on the CPU, and
    the same values in ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(n)
    shape = (b, args.heads, n, args.head_dim)
    P64 = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    T64 = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    return (P64, T64, tuple(p.to(device, dtype) for p in P64),
            tuple(t.to(device, dtype) for t in T64))


def triton_setup(args, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(use triton, a one-line note): importable, a supported head dim, and its start-up check
    passed (which needs CUDA, or Triton's interpreter in the tests)."""
    if args.triton == "off":
        return False, "triton: off"
    try:
        from meanflow.models import attention_triton as tri
    except Exception as exc:  # noqa: BLE001
        reason = f"models.attention_triton not importable ({type(exc).__name__}: {exc})"
    else:
        if not tri.triton_available():
            reason = "triton is not importable"
        elif args.head_dim not in tri.HEAD_DIMS:
            reason = f"head dim {args.head_dim} not in {tri.HEAD_DIMS}"
        else:
            blocks = args.triton_blocks or (None, None)
            try:
                err = check_attention_jvp(
                    lambda q, k, v: tri.attention_jvp_triton(q, k, v, *blocks),
                    tokens=80, heads=2, dim=args.head_dim, device=device, dtype=dtype)
                import triton
                return True, f"triton {triton.__version__}: start-up check error {err:.1e}"
            except Exception as exc:  # noqa: BLE001 -- a kernel that fails is reported, not fatal
                reason = f"start-up check failed: {tm.first_line(exc)}"
    if args.triton == "on":
        raise SystemExit(f"--triton on: {reason}")
    return False, f"triton skipped: {reason}"


def triton_ratio(args, device: torch.device, dtype: torch.dtype, note: str) -> None:
    """--triton-ratio: the Triton JVP (whole, kernel alone, kernel with the saved output) as
    multiples of the fused SDPA forward."""
    from meanflow.models.attention_triton import attention_jvp_tangent, attention_jvp_triton
    bm, bn = args.triton_blocks or (None, None)
    print(f"# Triton JVP attention / fused SDPA forward, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'interpreter'}), "
          f"torch {torch.__version__}, {args.dtype}, "
          f"{args.heads} heads of {args.head_dim}, blocks {bm or 'default'}×{bn or 'default'}; "
          f"{note}; target ≤ {TRITON_TARGET:g}× the fused forward", flush=True)
    print(f"{'tokens':>6s} {'batch':>5s} {'fwd ms':>8s} {'jvp ms':>8s} {'×fwd':>5s} "
          f"{'kern ms':>8s} {'×fwd':>5s} {'saved ms':>8s} {'×fwd':>5s} {'MiB':>6s} "
          f"{'err jvp':>8s} {'err kern':>8s} {'err saved':>9s}", flush=True)
    batches = args.batch * len(args.tokens) if len(args.batch) == 1 else args.batch
    for n, b in zip(args.tokens, batches):
        P64, T64, P, T = _inputs(n, b, args, device, dtype)
        rec = {"bench": "attention_jvp_triton", "device": str(device), "dtype": args.dtype,
               "tokens": n, "batch": b, "heads": args.heads, "head_dim": args.head_dim,
               "block_m": bm, "block_n": bn, "torch": torch.__version__}
        with torch.no_grad():
            out = F.scaled_dot_product_attention(*P)
            runs = {
                "fwd": lambda: F.scaled_dot_product_attention(*P),
                "jvp": lambda: torch.func.jvp(
                    lambda q, k, v: attention_jvp_triton(q, k, v, bm, bn), P, T)[1],
                "kernel": lambda: attention_jvp_tangent(*P, *T, block_m=bm, block_n=bn),
                "saved": lambda: attention_jvp_tangent(*P, *T, out=out, block_m=bm,
                                                       block_n=bn),
            }
            for key, fn in runs.items():
                rec[f"{key}_ms"] = tm.median_ms(fn, args.repeats, device)
            rec["jvp_mib"] = tm.peak_mib(runs["jvp"], device)[0]
            try:
                ref = torch.func.jvp(lambda q, k, v: attention_jvp(q, k, v, 256),
                                     tuple(p.to(device) for p in P64),
                                     tuple(t.to(device) for t in T64))[1]
                for key in ("jvp", "kernel", "saved"):
                    rec[f"{key}_err"] = float((runs[key]().double() - ref).norm() / ref.norm())
            except torch.OutOfMemoryError:
                rec["ref_error"] = "float64 reference out of memory"
                torch.cuda.empty_cache()
        for key in ("jvp", "kernel", "saved"):
            rec[f"{key}_per_fwd"] = rec[f"{key}_ms"] / rec["fwd_ms"]

        def f(key, fmt=".3f", width=8):
            value = rec.get(key)
            return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
        print(f"{n:6d} {b:5d} {f('fwd_ms')} {f('jvp_ms')} {f('jvp_per_fwd', '.1f', 5)} "
              f"{f('kernel_ms')} {f('kernel_per_fwd', '.1f', 5)} {f('saved_ms')} "
              f"{f('saved_per_fwd', '.1f', 5)} {f('jvp_mib', '.0f', 6)} {f('jvp_err', '.1e')} "
              f"{f('kernel_err', '.1e')} {f('saved_err', '.1e', 9)}", flush=True)
        tm.append_json(args.json, rec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="one batch, or one per token count")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help="query rows per block")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-math-above", type=int, default=1 << 62,
                        help="do not run the math path above this many score elements")
    parser.add_argument("--json", default=None)
    parser.add_argument("--triton", choices=("auto", "on", "off"), default="auto",
                        help="time the Triton JVP kernel (auto: when triton and CUDA are there)")
    parser.add_argument("--triton-blocks", type=int, nargs=2, default=None,
                        metavar=("BLOCK_M", "BLOCK_N"), help="Triton tile sizes (default: its own)")
    parser.add_argument("--triton-ratio", action="store_true",
                        help="only the Triton JVP variants as multiples of the SDPA forward")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    use_triton, triton_note = triton_setup(args, device, dtype)
    if args.triton_ratio:
        if not use_triton:
            print(f"# --triton-ratio: nothing measured ({triton_note})", flush=True)
            return
        triton_ratio(args, device, dtype, triton_note)
        return
    start_err = check_attention_jvp(device=device, dtype=dtype)
    print(f"# attention JVP, {tm.device_name(device)}, "
          f"torch {torch.__version__}, {args.dtype}, {args.heads} heads of {args.head_dim}; "
          f"start-up check: tangent error vs math {start_err:.1e}", flush=True)
    print(f"# {triton_note}", flush=True)
    tri_cols = (f" {'tri ms':>8s} {'/fwd':>5s} {'tri MiB':>7s} {'err tri':>8s}"
                if use_triton else "")
    print(f"{'tokens':>6s} {'batch':>5s} {'fwd ms':>8s} {'math ms':>8s} {'chunk ms':>8s} "
          f"{'speed-up':>8s} {'/fwd':>5s} {'math MiB':>8s} {'chunk MiB':>9s} "
          f"{'err math':>8s} {'err chunk':>9s}{tri_cols}", flush=True)
    batches = args.batch * len(args.tokens) if len(args.batch) == 1 else args.batch
    for n, b in zip(args.tokens, batches):
        P64, T64, P, T = _inputs(n, b, args, device, dtype)
        rec = {"bench": "attention_jvp", "device": str(device), "dtype": args.dtype,
               "tokens": n, "batch": b, "heads": args.heads, "head_dim": args.head_dim,
               "torch": torch.__version__}
        with torch.no_grad():
            ref = None
            if n <= 1024 or device.type == "cuda":
                try:   # float64 reference; chunked too, so that 4096 tokens fits
                    ref = torch.func.jvp(lambda q, k, v: attention_jvp(q, k, v, 256),
                                         tuple(p.to(device) for p in P64),
                                         tuple(t.to(device) for t in T64))[1]
                except torch.OutOfMemoryError:
                    rec["ref_error"] = "float64 reference out of memory"
                    torch.cuda.empty_cache()

            def fwd():
                return F.scaled_dot_product_attention(*P)

            def math_jvp():
                return torch.func.jvp(math_attention, P, T)[1]

            def chunk_jvp():
                return torch.func.jvp(lambda q, k, v: attention_jvp(q, k, v, args.chunk),
                                      P, T)[1]

            rec["fwd_ms"] = tm.median_ms(fwd, args.repeats, device)
            if use_triton:
                from meanflow.models.attention_triton import attention_jvp_triton
                blocks = args.triton_blocks or (None, None)

                def tri_jvp():
                    return torch.func.jvp(
                        lambda q, k, v: attention_jvp_triton(q, k, v, *blocks), P, T)[1]

                rec["triton_ms"] = tm.median_ms(tri_jvp, args.repeats, device)
                rec["triton_mib"] = tm.peak_mib(tri_jvp, device)[0]
                rec["triton_per_fwd"] = rec["triton_ms"] / rec["fwd_ms"]
                if ref is not None:
                    rec["triton_err"] = float((tri_jvp().double() - ref).norm() / ref.norm())
            rec["chunk_ms"] = tm.median_ms(chunk_jvp, args.repeats, device)
            rec["chunk_mib"] = tm.peak_mib(chunk_jvp, device)[0]
            if ref is not None:
                got = chunk_jvp()
                rec["chunk_err"] = float((got.double() - ref).norm() / ref.norm())
            if b * args.heads * n * n <= args.skip_math_above:
                try:
                    rec["math_ms"] = tm.median_ms(math_jvp, args.repeats, device)
                    rec["math_mib"] = tm.peak_mib(math_jvp, device)[0]
                    if ref is not None:
                        got = math_jvp()
                        rec["math_err"] = float((got.double() - ref).norm() / ref.norm())
                except torch.OutOfMemoryError as exc:
                    rec["math_error"] = str(exc).splitlines()[0][:200]
                    torch.cuda.empty_cache()

        def f(key, fmt=".2f", width=8):
            value = rec.get(key)
            return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
        speed = (rec["math_ms"] / rec["chunk_ms"]) if rec.get("math_ms") else None
        rec["speedup"] = speed
        per_fwd = rec["chunk_ms"] / rec["fwd_ms"]
        print(f"{n:6d} {b:5d} {f('fwd_ms')} {f('math_ms')} {f('chunk_ms')} "
              f"{(f'{speed:8.2f}' if speed else '       -')} {per_fwd:5.1f} "
              f"{f('math_mib', '.0f')} {f('chunk_mib', '.0f', 9)} {f('math_err', '.1e')} "
              f"{f('chunk_err', '.1e', 9)}"
              + (f" {f('triton_ms')} {f('triton_per_fwd', '.1f', 5)} "
                 f"{f('triton_mib', '.0f', 7)} {f('triton_err', '.1e')}" if use_triton else ""),
              flush=True)
        tm.append_json(args.json, rec)


if __name__ == "__main__":
    sys.exit(main())
