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
