"""The forward-mode switch (models/forward_mode.py) and the models layer's import graph.

The objective marks each JVP evaluation with ``jvp_pass()``; layers read ``in_jvp_pass()``
(what attention needs while torch.compile traces, where a dual tensor cannot be seen). Only the
JVP evaluations are marked: not the split strategy's grad pass, not the guidance calls.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import meanflow.models as models_pkg
from meanflow import JVP_STRATEGIES, MeanFlowLoss, time_derivative
from meanflow.models import forward_mode
from meanflow.models.forward_mode import has_tangent, in_jvp_pass, jvp_pass, use_lean

MODELS_DIR = Path(models_pkg.__file__).parent


def test_jvp_pass_nests_and_unwinds_on_error():
    assert not in_jvp_pass()
    with jvp_pass():
        assert in_jvp_pass()
        with jvp_pass():
            assert in_jvp_pass()
        assert in_jvp_pass()
    assert not in_jvp_pass()
    with pytest.raises(RuntimeError):
        with jvp_pass():
            raise RuntimeError("boom")
    assert not in_jvp_pass()


def test_jvp_pass_is_per_thread():
    """Another thread's pass is not this thread's: the state is thread-local."""
    seen = []
    inside, release = threading.Event(), threading.Event()

    def other():
        with jvp_pass():
            inside.set()
            release.wait(5)
        seen.append(in_jvp_pass())

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(5)
    try:
        assert not in_jvp_pass()
    finally:
        release.set()
        thread.join()
    assert seen == [False]


def test_no_module_level_mutable_pass_counter():
    """The state lives behind jvp_pass()/in_jvp_pass(); layers.py no longer holds a counter."""
    from meanflow.models import layers
    assert not hasattr(layers, "FORWARD_AD_PASSES")
    assert not hasattr(layers, "in_forward_ad_pass")
    assert set(forward_mode.__all__) == {"jvp_pass", "in_jvp_pass", "has_tangent", "use_lean"}


def test_has_tangent_and_use_lean():
    x, xt = torch.randn(3), torch.randn(3)
    assert not has_tangent(x)
    with forward_ad.dual_level():
        assert has_tangent(forward_ad.make_dual(x, xt))
    seen = []

    def probe(a):
        seen.append(has_tangent(a))
        return a

    torch.func.jvp(probe, (x,), (xt,))
    assert seen == [True]
    assert use_lean(x) is False                      # grad on, no tangent: native kernels
    with torch.no_grad():
        assert use_lean(x) is True                   # no grad: the lean Functions
    with forward_ad.dual_level():
        assert use_lean(forward_ad.make_dual(x, xt)) is True


class _Spy(nn.Module):
    """u = a·z·(1 + t) + h, recording (in_jvp_pass, grad enabled, batch) for every call."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, z, t, h, y=None):
        self.calls.append((in_jvp_pass(), torch.is_grad_enabled(), z.shape[0]))
        col = (1 + t).reshape(-1, *([1] * (z.ndim - 1)))
        return self.a * z * col + h.reshape(-1, *([1] * (z.ndim - 1)))


@pytest.mark.parametrize("strategy", JVP_STRATEGIES)
def test_only_the_jvp_evaluations_are_marked(strategy):
    """split: the no-grad JVP call is marked, its grad pass is not; func / forward_ad: the one
    joint call is marked; guidance calls (h = 0, no grad) never are; none after the call."""
    net = _Spy()
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    loss_fn = MeanFlowLoss(jvp=strategy, num_classes=3, omega=1.5, kappa=0.3, label_drop=0.0)
    loss_fn(net, x, y, generator=torch.Generator().manual_seed(0))
    guidance, *rest = net.calls
    assert guidance == (False, False, 8)             # one doubled batch (κ != 0), unmarked
    if strategy == "split":
        assert rest == [(True, False, 4), (False, True, 4)]
    else:
        assert rest == [(True, True, 4)]
    assert not in_jvp_pass()
    net.calls.clear()
    time_derivative(net, x, torch.zeros(4, dtype=torch.float64),
                    torch.ones(4, dtype=torch.float64), x, strategy=strategy)
    assert net.calls == [(True, False, 4)]


def test_the_switch_is_seen_and_guarded_while_compiling():
    """Dynamo traces in_jvp_pass() (no graph break) and guards on it: code compiled outside a
    JVP pass is recompiled, not reused, inside one."""
    def f(x):
        return x * 2 if in_jvp_pass() else x + 1

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    x = torch.ones(2)
    torch._dynamo.reset()
    assert torch.equal(compiled(x), x + 1)
    with jvp_pass():
        assert torch.equal(compiled(x), x * 2)
    assert torch.equal(compiled(x), x + 1)

    def g(x):
        with jvp_pass():
            inside = f(x)
        return inside + f(x)

    assert torch.equal(torch.compile(g, backend="eager", fullgraph=True)(x), g(x))


# ----------------------------------------------------------------------------- import graph
def _imports(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """(models modules imported at module level, (module, private name) imported anywhere)."""
    tree = ast.parse(path.read_text())
    top, private = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meanflow.models"):
            names = [a.name for a in node.names]
            module = node.module
            if module == "meanflow.models":
                targets = {f"meanflow.models.{n}" for n in names
                           if (MODELS_DIR / f"{n}.py").exists()} or {module}
            else:
                targets = {module}
            if node in tree.body:
                top |= targets
            private |= {(module, n) for n in names if n.startswith("_")}
    return top, private


def test_models_import_graph_is_acyclic_and_imports_no_private_names():
    """Module-level imports between models/*.py form no cycle (attention_triton is imported
    lazily by attention, and imports attention_jvp, never attention), and no module imports
    another's private name."""
    graph, private = {}, set()
    for path in MODELS_DIR.glob("*.py"):
        name = "meanflow.models" if path.stem == "__init__" else f"meanflow.models.{path.stem}"
        top, priv = _imports(path)
        graph[name] = top - {name}
        private |= priv
    assert private == set()
    assert "meanflow.models.attention" not in graph["meanflow.models.attention_triton"]
    assert "meanflow.models.attention_triton" not in graph["meanflow.models.attention"]
    state: dict[str, int] = {}

    def visit(node: str, stack: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"import cycle: {' -> '.join(stack + (node,))}"
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, stack + (node,))
        state[node] = 2

    for node in graph:
        visit(node, ())
