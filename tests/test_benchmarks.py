"""The benchmark's measuring helpers: counting saved tensors must not leak the graph."""

from __future__ import annotations

import gc
import importlib.util
import sys
import weakref
from pathlib import Path

import torch

from meanflow import MeanFlowLoss
from meanflow.models import build_model


def _step_cost():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
    spec = importlib.util.spec_from_file_location("step_cost", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_saved_bytes_frees_the_graph():
    """After saved_bytes returns, the graph is gone, including an output its own node saved
    (exp saves its result): returning the saved tensor itself from the pack hook used to make an
    uncollectable cycle, which on the GPU grew memory by one training step per measurement."""
    saved_bytes = _step_cost().saved_bytes
    a = torch.randn(1000, requires_grad=True)
    refs = []

    def fn():
        out = a.exp()
        refs.append(weakref.ref(out))
        return out.sum()

    assert saved_bytes(fn) == 4000   # exp keeps its (1000,) float32 output
    gc.collect()
    assert refs[0]() is None


def test_saved_bytes_split_keeps_less_than_joint():
    saved_bytes = _step_cost().saved_bytes
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(32, 2)
    counts = {s: saved_bytes(lambda s=s: MeanFlowLoss(jvp=s)(net, x)) for s in ("split", "func")}
    assert 0 < counts["split"] < counts["func"]


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_attention_jvp_benchmark_runs_and_records(tmp_path, capsys):
    """The microbenchmark runs both paths on CPU, and its chunked tangent matches the math
    reference (error recorded per token count)."""
    import json
    out = tmp_path / "a.jsonl"
    _load("attention_jvp").main(["--tokens", "8", "20", "--repeats", "1", "--chunk", "6",
                                 "--head-dim", "4", "--json", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in records] == [8, 20]
    for r in records:
        assert r["chunk_err"] < 1e-5 and r["math_err"] < 1e-5 and r["math_ms"] > 0
    _step_cost().summarize([str(out)])
    assert "attention JVP" in capsys.readouterr().out


def test_step_cost_with_chunked_jvp_attention(tmp_path):
    import json
    out = tmp_path / "s.jsonl"
    _step_cost().main(["--model", "dit-s/2", "--batch", "2", "--repeats", "1", "--warmup", "0",
                       "--strategies", "split", "--jvp-attention", "chunked", "--no-profile",
                       "--count-products", "off", "--threads", "1", "--json", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["strategy"] for r in records] == ["fm", "split"]
    assert all(r["status"] == "ok" and r["jvp_attention"] == "chunked" for r in records)


def test_step_interleaved_runs(capsys):
    _load("step_interleaved").main(["--model", "mlp", "--batch", "4", "--rounds", "2",
                                    "--threads", "1", "--jvp-attention", "math", "chunked"])
    out = capsys.readouterr().out
    assert "split/chunked" in out and "forward_ad/math" in out


def test_layer_norm_ab_benchmark_runs_and_restores_the_lean_rule(capsys):
    import meanflow.models.dit as dit_module
    lean = dit_module.layer_norm
    records = _load("layer_norm_ab").main(["--batch", "2", "--input-size", "4", "--rounds", "1"])
    assert [r["pass"] for r in records] == ["no-grad JVP pass", "forward_ad + backward"]
    assert all(r["lean_ms"] > 0 and r["native_ms"] > 0 for r in records)
    assert dit_module.layer_norm is lean and "native/lean" in capsys.readouterr().out
