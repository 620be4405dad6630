"""Smoke test of experiments/toy_ablations.py: the --quick path end to end, in-process."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "toy_ablations.py"


def _load():
    spec = importlib.util.spec_from_file_location("toy_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while defining
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_quick_run_writes_results_and_figure(tmp_path, capsys):
    toy = _load()
    out, fig = tmp_path / "res.json", tmp_path / "fig.png"
    results = toy.main(["--quick", "--steps", "10", "--out", str(out), "--figure", str(fig)])
    saved = json.loads(out.read_text())
    assert fig.is_file() and fig.stat().st_size > 1000
    assert saved["seeds"] == [0] and saved["settings"]["steps"] == 10
    assert saved["torch_version"] and saved["wall_seconds"] > 0
    # every variant of every group was trained and scored with finite numbers
    names = {name for rows in saved["groups"].values() for _, name in rows}
    assert names == set(saved["per_run"]) == set(results["per_run"])
    for name, runs in saved["per_run"].items():
        metrics = runs["0"]
        assert all(math.isfinite(v) for v in metrics.values()), name
        key = "euler1_map_rmse" if name == "flow_matching" else "step1_map_rmse"
        assert metrics[key] > 0
    # references: the exact map is as close to the data as a second data sample
    ref = saved["reference"]
    assert abs(ref["exact_map_energy"]) < 0.05
    assert ref["exact_v_euler100_map_rmse"] < ref["exact_v_euler10_map_rmse"] \
        < ref["exact_v_euler1_map_rmse"]
    table = capsys.readouterr().out
    assert "| setting |" in table and "flow matching" in table
