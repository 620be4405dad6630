"""The built-in demo: MeanFlow against flow matching on the 8-Gaussian ring, about a minute on
two CPU cores.

It trains a MeanFlow MLP and a flow-matching MLP for the same number of steps, samples both,
writes ``figure.png`` (data, MeanFlow 1- and 2-step samples, flow matching with 1 step, and the
learned one-step map) and ``metrics.json`` (energy distance of each sample set to the data, next
to the floor of two independent data samples of the same size, and the share of samples on a
mode). Re-running it in the same folder reuses the finished runs and only redraws.

The folder is the demo's own (docs/design.md, "What meanflow may overwrite"): a new or empty
one is marked for ``meanflow demo`` (:func:`meanflow.fileio.claim_folder`), a marked one is
reused, and any other (a user's ``figure.png`` and ``metrics.json`` included) is refused before
anything is trained. A demo folder made before the marker is recognised by its two runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import time
from pathlib import Path
from typing import Any

import torch

from meanflow.data import build_dataset
from meanflow.errors import ConfigError
from meanflow.fileio import atomic_write_text, claim_folder, exclusive
from meanflow.metrics import energy_distance
from meanflow.runs.config import RunConfig, apply_overrides
from meanflow.runs.load import load
from meanflow.train.loop import train

__all__ = ["demo_config", "run_demo", "DEFAULT_STEPS"]

DEFAULT_STEPS = 2000
DEMO_FILES = {"meanflow", "flow_matching", "figure.png", "metrics.json"}
COMMAND = "meanflow demo"      # the owner marked in the output folder
NUM_SAMPLES = 4000
SAMPLE_SEED0 = 1_000_000      # sampling seeds, disjoint from the data seeds below
DATA_SEEDS = (7, 8)           # reference data and the independent copy for the floor


def demo_config(kind: str, steps: int, seed: int = 0,
                overrides: list[str] | None = None) -> RunConfig:
    """The demo's settings: the paper's MeanFlow defaults (LN(-0.4, 1), 25 % r != t,
    c = 1e-3) except p = 0.5 (pseudo-Huber, Tab. 1e's runner-up): at this budget p = 1 left
    1-step samples at energy distance 0.0525 against 0.0191 for p = 0.5
    (``meanflow demo --set objective.p=1.0``; README, Results)."""
    return RunConfig.from_dict(apply_overrides({
        "model": {"name": "mlp", "options": {"width": 128, "depth": 3, "emb_dim": 64}},
        "data": {"name": "8gaussians"},
        "objective": {"kind": kind, "p": 0.5},
        "optim": {"lr": 1e-3, "warmup_steps": 100},
        "train": {"steps": steps, "batch_size": 128, "seed": seed, "ema_decays": [0.995],
                  "ema_warmup": False,    # the rule its recorded numbers were made with
                  "energy_every": 0,      # it measures its own distances, untimed
                  "log_every": 100, "checkpoint_every": steps},
    }, list(overrides or []))).validate()


def _train_timed(cfg: RunConfig, run_dir: Path, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    train(cfg, run_dir, resume=True)
    return round(time.perf_counter() - start, 1)


def _on_mode(points: torch.Tensor, centers: torch.Tensor, std: float) -> float:
    """Share of points within 3 standard deviations of a mode (98.9% for the data itself)."""
    return float((torch.cdist(points.double(), centers.double()).min(1).values < 3 * std)
                 .double().mean())


def _figure(path: Path, panels: list[tuple[str, torch.Tensor]], field: dict[str, Any],
            lim: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4.6))
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue", linewidths=0)
        ax.set_title(title, fontsize=10)
    ax = axes[-1]
    g, u = field["grid"], field["u"]
    e, x = field["noise"], field["jump"]
    angle = torch.atan2(x[:, 1], x[:, 0])            # colour each jump by where it lands
    colors = plt.cm.hsv(((angle + math.pi) / (2 * math.pi)).numpy())
    for i in range(e.shape[0]):
        ax.plot([e[i, 0], x[i, 0]], [e[i, 1], x[i, 1]], color=colors[i], lw=0.4, alpha=0.35)
    ax.scatter(e[:, 0], e[:, 1], s=2, color="0.3", zorder=3, linewidths=0)
    ax.scatter(x[:, 0], x[:, 1], s=4, color=colors, zorder=3, linewidths=0)
    ax.quiver(g[:, 0], g[:, 1], -u[:, 0], -u[:, 1], color="black", angles="xy",
              scale_units="xy", scale=5.0, width=0.005, alpha=0.7, zorder=4)
    ax.set_title("one-step map: noise (grey) -> sample\n"
                 "arrows: -u(z, r=0, t=1), 1/5 length", fontsize=10)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str | Path = "demo", steps: int = DEFAULT_STEPS, seed: int = 0,
             progress: bool = True, overrides: list[str] | None = None) -> dict[str, Any]:
    """Trains both models (or reuses finished runs in ``out_dir``), writes the figure and the
    metrics, and returns the metrics. ``overrides`` (``section.key=value``) apply to both runs;
    ``objective.kind`` and ``data.name`` are the demo's own and may not be overridden."""
    for item in overrides or []:
        if item.split("=", 1)[0].strip() in ("objective.kind", "data.name"):
            raise ConfigError(f"the demo compares MeanFlow with flow matching on 8gaussians: "
                              f"drop --set {item}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"demo output {out_dir} is a file: choose a folder with --out")
    claim_folder(out_dir, COMMAND, _is_old_demo, write=False)
    cfgs = {kind: demo_config(kind, steps, seed, overrides)
            for kind in ("meanflow", "flow_matching")}
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir, COMMAND):
        claim_folder(out_dir, COMMAND, _is_old_demo)
        return _run(out_dir, cfgs, steps, progress)


def _is_old_demo(folder: Path) -> bool:
    """A demo folder written before folders carried an owner marker: the demo's names only,
    and its MeanFlow run."""
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return names <= DEMO_FILES and (folder / "meanflow" / "config.json").is_file()


def _run(out_dir: Path, cfgs: dict[str, RunConfig], steps: int,
         progress: bool) -> dict[str, Any]:
    """The demo in a folder it holds: train (or reuse), sample, measure, draw."""
    cfgs["meanflow"].train.progress = progress
    cfgs["flow_matching"].train.progress = False
    # The two models train at once, one core each: tiny nets gain little from a second
    # thread, so this halves the demo's wall time on two cores.
    threads = torch.get_num_threads()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        background = pool.submit(_train_timed, cfgs["flow_matching"], out_dir / "flow_matching",
                                 max(1, threads // 2))
        train_seconds = {"meanflow": _train_timed(cfgs["meanflow"], out_dir / "meanflow",
                                                  max(1, threads - threads // 2))}
        if progress:
            print("waiting for the flow-matching run ...", flush=True)
        train_seconds["flow_matching"] = background.result()
    torch.set_num_threads(threads)
    runs = {kind: load(out_dir / kind) for kind in cfgs}

    ds = build_dataset("8gaussians")
    data, _ = ds.batch(NUM_SAMPLES, torch.Generator().manual_seed(DATA_SEEDS[0]))
    other, _ = ds.batch(NUM_SAMPLES, torch.Generator().manual_seed(DATA_SEEDS[1]))
    seeds = range(SAMPLE_SEED0, SAMPLE_SEED0 + NUM_SAMPLES)
    # batches of 1024 seeds, as the recorded numbers were made (the float32 matrix products,
    # and so the last bits of each sample, depend on the batch size)
    sets = {f"meanflow_{k}step": runs["meanflow"].sample(seeds=seeds, steps=k,
                                                          batch_size=1024).samples
            for k in (1, 2)}
    for k in (1, 2, 10, 100):    # flow matching: Euler steps (its run's sampler)
        sets[f"flow_matching_{k}step"] = runs["flow_matching"].sample(
            seeds=seeds, steps=k, batch_size=1024).samples
    floor = energy_distance(data, other)
    metrics: dict[str, Any] = {
        "dataset": "8gaussians", "num_samples": NUM_SAMPLES, "train_steps": steps,
        "train_seconds": train_seconds, "metric": "energy distance (U-statistic, float64)",
        "floor_two_data_samples": floor,
        "data_on_mode": _on_mode(other, ds.centers, ds.std),
        "sets": {name: {"energy_distance": energy_distance(pts, data),
                        "on_mode": _on_mode(pts, ds.centers, ds.std)}
                 for name, pts in sets.items()},
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    lin = torch.linspace(-2.5, 2.5, 9)
    grid = torch.cartesian_prod(lin, lin)
    net = runs["meanflow"].net
    with torch.no_grad():
        ones = torch.ones(grid.shape[0])
        u = net(grid, ones, ones)                       # u(z, r = 0, t = 1): h = 1
    noise = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s))
                         for s in range(SAMPLE_SEED0, SAMPLE_SEED0 + 200)])
    field = {"grid": grid, "u": u, "noise": noise, "jump": sets["meanflow_1step"][:200]}
    ed = {k: v["energy_distance"] for k, v in metrics["sets"].items()}
    panels = [
        (f"data (floor ED {floor:.4f})", data),
        (f"MeanFlow, 1 step  ED {ed['meanflow_1step']:.4f}", sets["meanflow_1step"]),
        (f"MeanFlow, 2 steps  ED {ed['meanflow_2step']:.4f}", sets["meanflow_2step"]),
        (f"flow matching, 1 step  ED {ed['flow_matching_1step']:.4f}",
         sets["flow_matching_1step"]),
    ]
    _figure(out_dir / "figure.png", panels, field, lim=6.0)
    return metrics
