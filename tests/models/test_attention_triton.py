"""The fused Triton JVP attention (models/attention_triton.py).

On CPU the kernel runs in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is first imported, so the checks run in one subprocess (one thread) that prints
its measurements as JSON; the tests assert on them. References: float64 ``torch.func.jvp`` of
the explicit-softmax ``math_attention``, and the chunked ``attention_jvp``. Sizes are small
(the interpreter is slow) but cover N not a multiple of the blocks, several key blocks with a
moving row maximum, batch·heads > 1, head dims 16 and 32, and every subset of tangents. A
CUDA-only test runs the compiled kernel at 256 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = str(Path(__file__).resolve().parents[2])
SRC = os.path.join(ROOT, "src")

SCRIPT = textwrap.dedent(r'''
    import json, os, sys, time
    import torch
    import meanflow
    from meanflow.models.attention import (Attention, attention_jvp, check_attention_jvp,
                                           math_attention)
    res = {"triton_on_import": "triton" in sys.modules}
    from meanflow.models import attention_triton as AT
    from torch.autograd import forward_ad
    res["interpret"] = AT.INTERPRET
    t0 = time.time()

    def rand(shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm())

    def point(B, H, N, d, seed=0, spread=1.0):
        P = [rand((B, H, N, d), seed + i) * spread for i in range(3)]
        T = [rand((B, H, N, d), seed + 3 + i) for i in range(3)]
        return P, T

    def fwd_ad(fn, P, T):
        """forward_ad with duals only where T has a tangent (the rule then sees None)."""
        with forward_ad.dual_level():
            args = [p if t is None else forward_ad.make_dual(p, t) for p, t in zip(P, T)]
            out = fn(*args)
            o, t = forward_ad.unpack_dual(out)
            return o.clone(), None if t is None else t.clone()

    tri = lambda q, k, v: AT.attention_jvp_triton(q, k, v, 16, 16)

    # fp32 against the float64 math path and the chunked Function; N = 40 (three key blocks of
    # 16, the last one partial), N = 1 and 17, B·H = 2 or 3, and a large spread of scores (the
    # running maximum moves from block to block)
    for B, H, N, d, spread in [(1, 3, 40, 16, 1.0), (2, 1, 40, 32, 1.0), (1, 2, 1, 16, 1.0),
                               (1, 2, 17, 32, 3.0)]:
        P, T = point(B, H, N, d, seed=N + d, spread=spread)
        if N == 40:
            P[1][..., 33:, :] *= 4     # the row maximum jumps in the last key block
        ref_o, ref_t = torch.func.jvp(math_attention, tuple(P), tuple(T))
        P32, T32 = [p.float() for p in P], [t.float() for t in T]
        o, t = torch.func.jvp(tri, tuple(P32), tuple(T32))
        co, ct = torch.func.jvp(attention_jvp, tuple(P32), tuple(T32))
        name = f"fp32_N{N}_d{d}"
        res[name] = {"tangent": rel(t, ref_t), "out": rel(o, ref_o), "vs_chunked": rel(t, ct),
                     "dtype": str(t.dtype)}
        dO, O = AT.attention_jvp_tangent(*P32, *T32, return_out=True, block_m=32, block_n=16)
        res[name]["kernel_out"] = rel(O, ref_o)
        res[name]["kernel_tangent"] = rel(dO, ref_t)
        res[name]["saved_out"] = rel(AT.attention_jvp_tangent(
            *P32, *T32, out=o, block_m=32, block_n=16), ref_t)

    # every subset of tangents, the missing ones None (forward_ad) or zero (reference)
    P, T = point(1, 2, 20, 16, seed=7)
    P32 = [p.float() for p in P]
    for mask in ["q", "k", "v", "qk", "qv", "kv"]:
        Tm = [t if c in mask else None for t, c in zip(T, "qkv")]
        Tz = [t if c in mask else torch.zeros_like(t) for t, c in zip(T, "qkv")]
        ref_o, ref_t = torch.func.jvp(math_attention, tuple(P), tuple(Tz))
        o, t = fwd_ad(tri, P32, [None if t is None else t.float() for t in Tm])
        direct = AT.attention_jvp_tangent(*P32, *[None if t is None else t.float() for t in Tm],
                                          block_m=16, block_n=16)
        res[f"subset_{mask}"] = {"tangent": rel(t, ref_t), "out": rel(o, ref_o),
                                 "direct": rel(direct, ref_t)}
    res["no_tangent"] = AT.attention_jvp_tangent(*P32, block_m=16, block_n=16) is None

    # forward_ad and func.jvp agree, with all tangents
    o1, t1 = fwd_ad(tri, P32, [t.float() for t in T])
    o2, t2 = torch.func.jvp(tri, tuple(P32), tuple(t.float() for t in T))
    res["engines_agree"] = rel(t1, t2)

    # a non-contiguous head dimension (made contiguous) and permuted views (strides passed)
    qkv = rand((2, 40, 3, 2, 16), 11).float()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    tq, tk, tv = [rand((2, 2, 16, 40), 12 + i).float().transpose(-1, -2) for i in range(3)]
    ref = torch.func.jvp(math_attention, (q.double(), k.double(), v.double()),
                         (tq.double(), tk.double(), tv.double()))[1]
    res["strided"] = rel(AT.attention_jvp_tangent(q, k, v, tq, tk, tv, block_m=16,
                                                  block_n=16), ref)

    # bf16 and fp16 inputs: fp32 accumulation, the tangent in the input dtype
    for dtype in (torch.bfloat16, torch.float16):
        P, T = point(2, 2, 40, 16, seed=21)
        ref_o, ref_t = torch.func.jvp(math_attention, tuple(P), tuple(T))
        o, t = torch.func.jvp(tri, tuple(p.to(dtype) for p in P), tuple(t.to(dtype) for t in T))
        res[f"lowp_{str(dtype)[6:]}"] = {"tangent": rel(t, ref_t), "out": rel(o, ref_o),
                                         "dtype": str(t.dtype)}

    # the start-up check accepts it
    res["check_attention_jvp"] = check_attention_jvp(
        lambda q, k, v: AT.attention_jvp_triton(q, k, v, 16, 16), tokens=40, dim=16)

    # backward (recompute through SDPA) gives SDPA's gradients
    P, T = point(2, 2, 40, 16, seed=31)
    leaves = [p.float().requires_grad_() for p in P]
    grads = torch.autograd.grad(tri(*leaves), leaves, T[0].float())
    ref_grads = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(*leaves),
                                    leaves, T[0].float())
    res["backward"] = max(rel(a, b) for a, b in zip(grads, ref_grads))

    # a whole Attention module (heads of 16) with jvp_impl="triton": func.jvp and forward_ad
    # give the math path's tangent, with the parameters requiring grad as in the joint
    # strategies
    torch.manual_seed(0)
    mods = {impl: Attention(32, 2, "auto", jvp_impl=impl) for impl in ("math", "triton")}
    mods["triton"].load_state_dict(mods["math"].state_dict())
    x, xt = rand((2, 40, 32), 41).float(), rand((2, 40, 32), 42).float()
    out = {}
    for impl, mod in mods.items():
        out[impl, "func"] = torch.func.jvp(mod, (x,), (xt,))
        out[impl, "fwd_ad"] = fwd_ad(mod, [x], [xt])
    res["module"] = {
        "func_vs_math": rel(out["triton", "func"][1], out["math", "func"][1]),
        "fwd_ad_vs_math": rel(out["triton", "fwd_ad"][1], out["math", "func"][1]),
        "func_vs_fwd_ad": rel(out["triton", "func"][1], out["triton", "fwd_ad"][1]),
        "out_vs_math": rel(out["triton", "func"][0], out["math", "func"][0]),
    }
    # vmap over the Function falls back to the chunked rule (the kernel takes plain tensors)
    P, T = point(2, 2, 17, 16, seed=51)
    ref_t = torch.func.jvp(math_attention, tuple(P), tuple(T))[1]
    t = torch.func.jvp(torch.vmap(tri), tuple(p.float() for p in P),
                       tuple(t.float() for t in T))[1]
    res["vmap"] = rel(t, ref_t)

    # du/dt of a tiny fp32 DiT (heads of 16) with the triton JVP attention equals the math
    # path's, for a split and a joint strategy
    from meanflow import time_derivative
    from meanflow.models import build_model
    from meanflow.models.attention import set_jvp_attention
    torch.manual_seed(0)
    net = build_model("dit-s/2", in_channels=3, input_size=8, num_classes=5, patch=2, depth=2,
                      width=32, heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    z, v = rand((2, 3, 8, 8), 61).float(), rand((2, 3, 8, 8), 62).float()
    r, t, y = torch.tensor([0.2, 0.35]), torch.tensor([0.7, 0.4]), torch.tensor([1, 5])
    res["dit"] = {}
    for strategy in ("split", "forward_ad"):
        dudt = {}
        for impl in ("math", "triton"):
            set_jvp_attention(net, impl)
            dudt[impl] = time_derivative(net, z, r, t, v, y, strategy=strategy)
        res["dit"][strategy] = rel(dudt["triton"], dudt["math"])

    # the limits: one-line ValueErrors
    errors = {}
    for label, kw in [("d8", dict(d=8)), ("d24", dict(d=24)), ("d256", dict(d=256))]:
        P = [rand((1, 1, 16, kw["d"]), i).float() for i in range(3)]
        try:
            AT.attention_jvp_tangent(*P, P[0])
            errors[label] = None
        except ValueError as exc:
            errors[label] = str(exc)
    P = [rand((1, 1, 16, 16), i).float() for i in range(3)]
    try:
        AT.attention_jvp_tangent(*P, P[0], block_m=24)
        errors["block24"] = None
    except ValueError as exc:
        errors["block24"] = str(exc)
    try:
        AT.attention_jvp_tangent(*[p.double() for p in P], P[0].double())
        errors["fp64"] = None
    except ValueError as exc:
        errors["fp64"] = str(exc)
    res["errors"] = errors

    # benchmarks/attention_jvp.py times triton (here in the interpreter) with error columns,
    # and its --triton-ratio microbenchmark
    import importlib.util, tempfile
    spec = importlib.util.spec_from_file_location(
        "attention_jvp_bench", os.path.join(sys.argv[1], "benchmarks", "attention_jvp.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = os.path.join(tempfile.mkdtemp(), "a.jsonl")
    common = ["--tokens", "20", "--head-dim", "16", "--repeats", "1", "--threads", "1",
              "--triton-blocks", "16", "16", "--json", path]
    bench.main(common + ["--triton", "on"])
    bench.main(common + ["--triton-ratio"])
    with open(path) as fh:
        res["bench"] = [json.loads(line) for line in fh]
    res["seconds"] = time.time() - t0
    print("RESULTS " + json.dumps(res))
''')


@pytest.fixture(scope="module")
def interp() -> dict:
    """Runs SCRIPT under Triton's interpreter (CPU, one thread) and returns its results."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ROOT], env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def test_triton_is_not_imported_by_meanflow(interp):
    assert interp["interpret"] and not interp["triton_on_import"]


@pytest.mark.parametrize("case", ["fp32_N40_d16", "fp32_N40_d32", "fp32_N1_d16", "fp32_N17_d32"])
def test_fp32_tangent_matches_float64_math_and_chunked(interp, case):
    r = interp[case]
    assert r["dtype"] == "torch.float32"
    for key in ("tangent", "out", "vs_chunked", "kernel_out", "kernel_tangent", "saved_out"):
        assert r[key] < 1e-5, (key, r)


@pytest.mark.parametrize("mask", ["q", "k", "v", "qk", "qv", "kv"])
def test_missing_tangents_are_zero(interp, mask):
    r = interp[f"subset_{mask}"]
    assert max(r.values()) < 1e-5, r


def test_no_tangent_engines_strides_vmap_and_startup_check(interp):
    assert interp["no_tangent"]
    assert interp["engines_agree"] < 1e-6
    assert interp["strided"] < 1e-5
    assert interp["vmap"] < 1e-5
    assert interp["check_attention_jvp"] < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs(interp, dtype):
    r = interp[f"lowp_{dtype}"]
    assert r["dtype"] == f"torch.{dtype}"
    assert r["tangent"] < 2e-2 and r["out"] < 2e-2, r


def test_backward_equals_sdpa(interp):
    assert interp["backward"] < 1e-6


def test_attention_module_with_triton_jvp(interp):
    r = interp["module"]
    assert max(r.values()) < 1e-5, r


def test_dit_dudt_with_triton_attention_equals_math(interp):
    assert max(interp["dit"].values()) < 1e-5, interp["dit"]


def test_limits_raise_one_line_value_errors(interp):
    errors = interp["errors"]
    for label in ("d8", "d24", "d256"):
        assert errors[label] and "16, 32, 64, 128" in errors[label]
    assert errors["block24"] and "power of two" in errors["block24"]
    assert errors["fp64"] and "fp32, bf16 or fp16" in errors["fp64"]
    assert all("\n" not in e for e in errors.values())


def test_benchmark_times_triton_with_errors_and_ratio(interp):
    table, ratio = interp["bench"]
    assert table["bench"] == "attention_jvp" and ratio["bench"] == "attention_jvp_triton"
    assert table["triton_err"] < 1e-5 and table["chunk_err"] < 1e-5
    assert table["triton_per_fwd"] > 0
    for key in ("jvp", "kernel", "saved"):
        assert ratio[f"{key}_err"] < 1e-5 and ratio[f"{key}_per_fwd"] > 0


def test_cpu_without_interpreter_needs_a_gpu():
    from meanflow.models import attention_triton as AT
    if AT.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set in this process")
    P = [torch.randn(1, 1, 16, 16) for _ in range(3)]
    for call in (lambda: AT.attention_jvp_tangent(*P, P[0]), lambda: AT.attention_jvp_triton(*P)):
        with pytest.raises(RuntimeError, match="needs a CUDA GPU") as info:
            call()
        assert "\n" not in str(info.value) and "TRITON_INTERPRET=1" in str(info.value)


@pytest.mark.parametrize("dtype,d,flags", [
    ("bf16", 64, dict(HAS_DQ=True, HAS_DK=True, HAS_DV=True, LOAD_O=False, STORE_O=False)),
    ("fp16", 128, dict(HAS_DQ=False, HAS_DK=False, HAS_DV=True, LOAD_O=True, STORE_O=False)),
    ("fp32", 32, dict(HAS_DQ=True, HAS_DK=False, HAS_DV=False, LOAD_O=False, STORE_O=True)),
])
def test_kernel_compiles_for_sm90(dtype, d, flags):
    """The interpreter runs the kernel as Python, so it cannot catch what only the compiler
    rejects: build it (to PTX and a cubin, no GPU needed) for sm_90 with the default tiles."""
    from meanflow.models import attention_triton as AT
    if AT.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set in this process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = AT._attention_jvp_kernel
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    bm, bn, warps, stages = AT._default_config(d, torch_dtype, 9)
    has_ds = flags["HAS_DQ"] or flags["HAS_DK"]
    const = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, PRECISION="ieee", N_LOOP=0, UPCAST=False,
                 HAS_DS=has_ds, NEED_A=(has_ds and not flags["LOAD_O"]) or flags["STORE_O"],
                 **flags)
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "DQ", "DK", "DV", "O", "DO"):
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
    try:
        src = ASTSource(kernel, sig, constexprs=const)
    except TypeError as exc:   # another triton's internal API
        pytest.skip(f"ASTSource API differs: {exc}")
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    assert compiled.asm["cubin"] and compiled.metadata.shared < 200 * 1024


def test_triton_is_a_jvp_attention_choice():
    from meanflow.models.attention import JVP_ATTENTION_IMPLS, Attention, set_jvp_attention
    assert "triton" in JVP_ATTENTION_IMPLS
    net = torch.nn.Sequential(Attention(32, 2, "auto"))
    set_jvp_attention(net, "triton")
    assert net[0].jvp_impl == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_passes_the_startup_check(dtype):
    from meanflow.models.attention import check_attention_jvp
    from meanflow.models.attention_triton import attention_jvp_triton
    err = check_attention_jvp(attention_jvp_triton, tokens=256, heads=4, dim=64, device="cuda",
                              dtype=dtype, tol=1e-5 if dtype == torch.float32 else 2e-2)
    assert err < (1e-5 if dtype == torch.float32 else 2e-2)
