"""Smoke tests of benchmarks/: every script runs in a tiny CPU setting and prints its ratios,
the shared measuring helpers (benchmarks/_timing.py) measure what they claim, and no script
imports a private name of the library."""

from __future__ import annotations

import ast
import gc
import importlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from meanflow import MeanFlowLoss
from meanflow.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = ["step_cost", "step_interleaved", "attention_jvp", "sample_speed", "layer_norm_ab",
           "param_counts", "summarize"]


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    """Import the scripts as ``python benchmarks/NAME.py`` would: benchmarks/ on the path."""
    monkeypatch.syspath_prepend(str(BENCH))


def _load(name: str):
    return importlib.import_module(name)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_short_import_no_private_names_and_say_their_command(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 500
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meanflow"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private and "._" not in node.module, (node.module, private)
    # (citations of documents outside the repo: tests/test_layout.py checks every file)
    for word in ("split_func", "/tmp/", "/home/", "/usr/"):
        assert word not in text, word
    if not path.name.startswith("_"):
        doc = ast.get_docstring(ast.parse(text))
        assert doc and f"benchmarks/{path.name}" in doc   # the exact command


def test_shell_scripts_parse_and_have_no_machine_paths():
    for rel in ("benchmarks/gpu_suite.sh", "experiments/gpu_session.sh",
                "experiments/fmnist_preset_search.sh"):
        subprocess.run(["bash", "-n", str(ROOT / rel)], check=True)
        text = (ROOT / rel).read_text()
        for word in ("split_func", "/tmp/", "/home/", "/usr/share"):
            assert word not in text, (rel, word)


# ----------------------------------------------------------------------------- _timing
def test_saved_bytes_frees_the_graph():
    """After saved_bytes returns, the graph is gone, including an output its own node saved
    (exp saves its result): returning the saved tensor itself from the pack hook used to make an
    uncollectable cycle, which on the GPU grew memory by one training step per measurement."""
    saved_bytes = _load("_timing").saved_bytes
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
    saved_bytes = _load("_timing").saved_bytes
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(32, 2)
    counts = {s: saved_bytes(lambda s=s: MeanFlowLoss(jvp=s)(net, x)) for s in ("split", "func")}
    assert 0 < counts["split"] < counts["func"]


def test_count_products_and_native_linear():
    """The MLP's split loss makes 3 products per Linear layer with the lean Linear, 4 with
    torch.nn.Linear swapped in (its forward-AD rule multiplies by the weights' zero tangent)."""
    tm, presets = _load("_timing"), _load("_presets")
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8)
    x = torch.randn(8, 2)
    n = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    loss = MeanFlowLoss(jvp="split")
    assert tm.count_products(lambda: loss(net, x)) == 3 * n
    presets.native_linear(net)
    assert all(type(m) is not presets.Linear for m in net.modules())
    assert tm.count_products(lambda: loss(net, x)) == 4 * n


# ----------------------------------------------------------------------------- scripts
def test_step_cost_mlp_prints_ratios_products_and_records(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    _load("step_cost").main(["--batch", "8", "--repeats", "1", "--warmup", "0", "--threads",
                             "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "time/FM" in text and "matrix products per loss evaluation" in text
    records = _records(out)
    assert [r["strategy"] for r in records] == ["fm", "split", "func", "forward_ad"]
    for r in records[1:]:
        assert r["status"] == "ok" and r["ratio"] > 0 and r["saved_ratio"] > 0
    assert records[1]["saved_ratio"] == pytest.approx(1.0, rel=1e-3)   # FM's memory


def test_step_cost_dit_chunked_attention_and_fm_ref(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    common = ["--model", "dit-s/2", "--batch", "2", "--repeats", "1", "--warmup", "0",
              "--jvp-attention", "chunked", "--no-profile", "--count-products", "off",
              "--threads", "1", "--json", str(out)]
    step_cost = _load("step_cost")
    step_cost.main(common + ["--strategies", "split"])
    step_cost.main(common + ["--strategies", "forward_ad", "--fm-ref", str(out)])
    records = _records(out)
    assert [r["strategy"] for r in records] == ["fm", "split", "forward_ad"]   # FM reused
    assert all(r["status"] == "ok" and r["jvp_attention"] == "chunked" for r in records)
    assert all(r["ratio"] > 0 for r in records[1:])
    assert "flow matching: the record of" in capsys.readouterr().out


def test_step_cost_bf16_guided_records_the_bf16_error(tmp_path):
    out = tmp_path / "s.jsonl"
    _load("step_cost").main(["--batch", "8", "--repeats", "1", "--warmup", "0", "--amp", "bf16",
                             "--guided", "--strategies", "split", "func", "--threads", "1",
                             "--count-products", "off", "--json", str(out)])
    records = _records(out)
    assert all(r["status"] == "ok" and r["guided"] for r in records)
    for r in records[1:]:
        assert r["dudt_dtype"] == "float32" and 0 < r["err_bf16_vs_fp32"] < 5e-2


def test_step_cost_dropout_check_and_strategy_errors(tmp_path):
    """With dropout, split's JVP and grad passes draw the same masks: u agrees with one
    forward_ad pass from the same RNG state far better than with fresh masks."""
    step_cost = _load("step_cost")
    torch.manual_seed(0)
    net = build_model("mlp", dim=2, width=16, depth=2, emb_dim=8, dropout=0.5)
    z, v = torch.randn(8, 2), torch.randn(8, 2)
    t = torch.rand(8)
    rewound, fresh = step_cost.dropout_check(net, (z, t * 0.5, t, v, None), "fp32",
                                             torch.device("cpu"))
    assert rewound < 1e-5 < fresh
    with pytest.raises(SystemExit):
        step_cost.parse_strategies(["split,auto"])
    assert step_cost.parse_strategies(["none"]) == []


def test_summarize_prints_every_kind(tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    _load("step_cost").main(["--batch", "4", "--repeats", "1", "--warmup", "0", "--strategies",
                             "split", "--count-products", "off", "--json", str(out)])
    _load("sample_speed").main(["--model", "mlp", "--batch", "4", "--repeats", "1", "--warmup",
                                "0", "--amp", "fp32", "--device", "cpu", "--json", str(out)])
    _load("step_cost").main(["--summarize", str(out), str(tmp_path / "missing.jsonl")])
    text = capsys.readouterr().out
    assert "MF/FM" in text and "img/s" in text and "no such file" in text


def test_step_interleaved_prints_ratios(tmp_path, capsys):
    out = tmp_path / "i.jsonl"
    records = _load("step_interleaved").main(["--model", "mlp", "--batch", "4", "--rounds", "2",
                                              "--threads", "1", "--jvp-attention", "math",
                                              "chunked", "--json", str(out)])
    text = capsys.readouterr().out
    assert "split/chunked" in text and "forward_ad/math" in text and "MF/FM" in text
    assert [r["config"] for r in records] == [r["config"] for r in _records(out)]
    assert all(r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] for r in records)


def test_attention_jvp_benchmark_runs_and_records(tmp_path, capsys):
    """Both paths run on the CPU, and the chunked tangent matches the float64 reference."""
    out = tmp_path / "a.jsonl"
    _load("attention_jvp").main(["--tokens", "8", "20", "--repeats", "1", "--chunk", "6",
                                 "--head-dim", "4", "--triton", "off", "--json", str(out)])
    records = _records(out)
    assert [r["tokens"] for r in records] == [8, 20]
    for r in records:
        assert r["chunk_err"] < 1e-5 and r["math_err"] < 1e-5 and r["speedup"] > 0
    assert "speed-up" in capsys.readouterr().out
    _load("summarize").main([str(out)])
    assert "attention JVP" in capsys.readouterr().out


def test_sample_speed_runs(capsys):
    records = _load("sample_speed").main(["--model", "mlp", "--batch", "4", "--repeats", "1",
                                          "--warmup", "0", "--amp", "fp32", "bf16",
                                          "--device", "cpu", "--threads", "1"])
    assert [r["amp"] for r in records] == ["fp32", "bf16"]
    assert all(r["status"] == "ok" and r["finite"] and r["img_s"] > 0 for r in records)
    assert "images/s" in capsys.readouterr().out


def test_layer_norm_ab_prints_the_ratio_and_restores_the_lean_rule(capsys):
    import meanflow.models.dit as dit_module
    lean = dit_module.layer_norm
    records = _load("layer_norm_ab").main(["--batch", "2", "--input-size", "4", "--rounds", "1"])
    assert [r["pass"] for r in records] == ["no-grad JVP pass", "forward_ad + backward"]
    assert all(r["lean_ms"] > 0 and r["native_ms"] > 0 for r in records)
    assert dit_module.layer_norm is lean and "native/lean" in capsys.readouterr().out


def test_param_counts_match_the_official_cifar10_network(capsys):
    rows = _load("param_counts").main()
    assert ("unet-cifar10", {"in_channels": 3, "input_size": 32, "augment_dim": 6},
            55_932_419) in rows
    assert "official network: 55,932,419 (equal)" in capsys.readouterr().out


def test_gpu_suite_without_cuda_stops_and_says_how_to_smoke_it(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the suite would run for minutes")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("SUITE_CPU_SMOKE", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "10"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "SUITE_CPU_SMOKE=1" in proc.stdout


@pytest.mark.slow
def test_gpu_suite_cpu_smoke(tmp_path):
    """Every item of the suite on toy CPU sizes (minutes): it ends with the summary table."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SUITE_CPU_SMOKE": "1",
           "SMOKE_UNET": "mlp", "SMOKE_DIT": "mlp", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "900"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    table = (tmp_path / "table.txt").read_text()
    assert "MF/FM" in table and "sampling" in table
    # item (g): two gloo ranks trained (DDP, FSDP2) with their replica checks passing, and
    # their sharded samples equal one process's bit for bit on the CPU
    records = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("bench") == "suite" and r["item"].startswith("g-")]
    sharded = [r for r in records if r.get("bench") == "sharded_sampling"]
    assert sharded == [{"bench": "sharded_sampling", "ranks": 2, "n": 64, "max_abs_diff": 0.0}]
    assert "sampling ranks" in table
